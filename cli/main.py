"""``encore``: the command line of the Encore pipeline.

Exit codes: 0 success; 1 the pipeline ran but a check failed; 2 an expected
error (a service unreachable, a bad setting, a missing file), printed as one
line saying what and what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from encore.settings import SettingsError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encore", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline locally on the marketplace's export"
    )
    demo.add_argument(
        "--export",
        type=Path,
        default=None,
        help="the export CSV (default: ../shared/data/encore/user_interaction.csv)",
    )
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")

    settings = commands.add_parser("settings", help="print the settings table")
    settings.add_argument("--write-readme", action="store_true",
                          help="replace the table in README.md with the current one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "settings":
            return _settings(args)
    except (SettingsError, ConnectionError, FileNotFoundError, OSError) as exc:
        print(f"encore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR


def _demo(args: argparse.Namespace) -> int:
    from cli import demo
    from local.services import ServiceError

    export = args.export or Path(os.environ.get("ENCORE_EXPORT", demo.DEFAULT_EXPORT))
    if not export.exists():
        raise FileNotFoundError(f"no export at {export}: pass --export PATH")
    try:
        summary = demo.run_demo(export, say=lambda line: print(line, flush=True))
    except ServiceError as exc:
        print(f"encore demo: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except demo.CheckFailed as exc:
        print(f"encore demo: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(json.dumps(summary, indent=2, default=str) if args.json else demo.render(summary))
    return EXIT_OK


def _settings(args: argparse.Namespace) -> int:
    import re

    from encore.settings import settings_table

    table = settings_table()
    if not args.write_readme:
        print(table)
        return EXIT_OK
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text, count = re.subn(
        r"(<!-- settings-table:start -->\n).*?(\n<!-- settings-table:end -->)",
        lambda match: match.group(1) + table + match.group(2),
        readme.read_text(), flags=re.S,
    )
    if count != 1:
        raise FileNotFoundError(f"{readme} has no settings table markers")
    readme.write_text(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
