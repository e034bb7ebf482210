-- Users, categories and sub-categories: the marketplace's reference data.
CREATE TABLE users (
    id          text PRIMARY KEY,
    user_name   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE categories (
    id     bigint PRIMARY KEY,
    title  text NOT NULL UNIQUE
);

CREATE TABLE sub_categories (
    id           bigint PRIMARY KEY,
    category_id  bigint NOT NULL REFERENCES categories (id),
    title        text NOT NULL,
    UNIQUE (category_id, title)
);
