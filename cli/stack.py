"""The local stack: Postgres, the AWS endpoint and the provisioned resources, up and down.

Everything lives under one state folder (``.encore/`` in the checkout unless
``ENCORE_STATE_DIR`` says otherwise), binds 127.0.0.1 and is stopped by
process id. When ``AWS_ENDPOINT_URL`` is set to an endpoint that already
answers (LocalStack from ``docker-compose.localstack.yml``), that endpoint is
used and no moto server is started.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from encore.settings import Settings, redact_dsn
from infra.provision import provision
from local.services import LocalPostgres, MotoServer, ServiceError, free_port, port_open

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT_PORT = 4566
#: Local credentials: moto and LocalStack accept any; setting them keeps boto3
#: from looking for real ones (or an instance metadata endpoint).
LOCAL_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def state_dir() -> Path:
    default = Path(__file__).resolve().parent.parent / ".encore"
    return Path(os.environ.get("ENCORE_STATE_DIR", default)).resolve()


@dataclass
class LocalStack:
    settings: Settings
    postgres: LocalPostgres | None
    endpoint: MotoServer | None
    state_file: Path | None = None

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    def describe(self, heading: str = "local stack up") -> str:
        """For people: the database and the AWS endpoint, where the state lives, what next."""
        root = self.state_file.parent if self.state_file is not None else state_dir()
        postgres = "" if self.postgres else " (ENCORE_DATABASE_DSN, not started here)"
        endpoint = " (moto's server)" if self.endpoint else " (AWS_ENDPOINT_URL, not started here)"
        return "\n".join(
            [
                f"{heading} (state in {root})",
                f"  Postgres      {redact_dsn(self.settings.require_dsn())}{postgres}",
                f"  AWS endpoint  {self.settings.aws_endpoint_url}{endpoint}",
                f"  bucket        s3://{self.settings.bucket}, stream {self.settings.stream_name}",
                "`encore load EXPORT` loads an export; `encore down` stops the stack.",
            ]
        )


def use_local_credentials() -> None:
    for name, value in LOCAL_AWS_ENV.items():
        os.environ.setdefault(name, value)


STACK_FILE = "stack.json"


def start_stack(
    root: Path | None = None, fresh: bool = True, endpoint_port: int | None = None
) -> LocalStack:
    """Start Postgres and an AWS endpoint, provision the resources, record them in stack.json.

    ``fresh`` starts from an empty database. The endpoint is moto's server on
    ``endpoint_port`` (4566 by default) unless ``AWS_ENDPOINT_URL`` names one
    that already answers. The services keep running until :meth:`LocalStack.stop`
    (or ``encore down``) stops them by process id.
    """
    root = root or state_dir()
    use_local_credentials()
    if (root / STACK_FILE).exists():
        raise ServiceError("a stack started by `encore up` is running: stop it with `encore down`")

    external = os.environ.get("AWS_ENDPOINT_URL")
    moto: MotoServer | None = None
    if external and port_open(urlsplit(external).port or 443, urlsplit(external).hostname or ""):
        endpoint_url = external
        logger.info("using the AWS endpoint at %s", endpoint_url)
    else:
        moto = MotoServer(root / "moto", endpoint_port or DEFAULT_ENDPOINT_PORT)
        endpoint_url = moto.endpoint_url
        if port_open(moto.port):
            raise ServiceError(
                f"127.0.0.1:{moto.port} is already in use; stop what listens there "
                "or set AWS_ENDPOINT_URL to use it"
            )
    # Only now, with nothing else in the way, is the old database thrown away.
    if fresh and (root / "postgres").exists():
        shutil.rmtree(root / "postgres")

    postgres = None
    dsn = os.environ.get("ENCORE_DATABASE_DSN")
    if not dsn:
        postgres = LocalPostgres(root / "postgres", free_port())
        dsn = postgres.dsn

    stack = LocalStack(
        Settings.load(aws_endpoint_url=endpoint_url, database_dsn=dsn), postgres, moto
    )
    try:
        if moto is not None:
            moto.start()
        if postgres is not None:
            postgres.start()
        provision(stack.settings)
    except BaseException:
        stack.stop()
        raise
    (root / STACK_FILE).write_text(
        json.dumps(
            {
                "aws_endpoint_url": endpoint_url,
                "database_dsn": dsn,
                "postgres": {"root": str(postgres.root), "port": postgres.port}
                if postgres
                else None,
                "moto": {"root": str(moto.root), "port": moto.port} if moto else None,
            },
            indent=2,
        )
    )
    stack.state_file = root / STACK_FILE
    return stack


def running_stack(root: Path | None = None) -> LocalStack | None:
    """The stack ``encore up`` started, from its stack.json; None when nothing is up."""
    root = root or state_dir()
    path = root / STACK_FILE
    if not path.exists():
        return None
    use_local_credentials()
    recorded = json.loads(path.read_text())
    postgres = recorded.get("postgres")
    moto = recorded.get("moto")
    return LocalStack(
        Settings.load(
            aws_endpoint_url=recorded["aws_endpoint_url"], database_dsn=recorded["database_dsn"]
        ),
        LocalPostgres(Path(postgres["root"]), postgres["port"]) if postgres else None,
        MotoServer(Path(moto["root"]), moto["port"]) if moto else None,
        state_file=path,
    )


@contextmanager
def local_stack(
    root: Path | None = None, fresh: bool = True, endpoint_port: int | None = None
) -> Iterator[LocalStack]:
    """:func:`start_stack` for the length of a ``with`` block."""
    stack = start_stack(root, fresh, endpoint_port)
    try:
        yield stack
    finally:
        stack.stop()
