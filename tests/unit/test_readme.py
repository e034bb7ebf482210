from __future__ import annotations

import re
from pathlib import Path

from encore.settings import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_matches_the_settings_code() -> None:
    embedded = re.search(
        r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->",
        README.read_text(),
        re.S,
    )

    assert embedded is not None, "README lost its settings table markers"
    assert embedded.group(1) == settings_table(), "regenerate with: encore settings"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()

    assert "make test" in README.read_text()
    assert ci.strip().splitlines()[-1] == "make test"
