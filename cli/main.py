"""encore: the command line of the Encore pipeline.

Exit codes: 0 success; 1 the pipeline ran but a check failed; 2 an expected
error (a service unreachable, a bad setting, a missing file, no stack up),
printed as one line saying what and what to do, with no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encore.settings import SettingsError

if TYPE_CHECKING:
    from producers.loader import AlreadyLoaded

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="encore", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    up = commands.add_parser(
        "up", help="start Postgres and the AWS endpoint and leave them running"
    )
    up.add_argument("--json", action="store_true", help="print the endpoint and the DSN as JSON")
    commands.add_parser("down", help="stop what `encore up` started")
    commands.add_parser("status", help="slot lag, events captured and landed, feed age, last night")
    load = commands.add_parser(
        "load",
        help="load an export into the running stack and replay its bids, captured and landed",
    )
    load.add_argument("export", type=Path, help="a CSV shaped like the marketplace's export")
    commands.add_parser("capture", help="run the capture Lambda once against the running stack")
    commands.add_parser("land", help="run the local Firehose stand-in once")
    commands.add_parser("stream", help="run the popularity job over everything landed, then stop")
    commands.add_parser("batch", help="run the nightly recommendation job once")
    url = commands.add_parser("url", help="print a presigned URL for a user's recommendations")
    url.add_argument("user_id")
    url.add_argument(
        "--expires-in", type=_positive_int, default=900, help="seconds (capped at 7 days)"
    )

    settings = commands.add_parser("settings", help="print the settings table")
    settings.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the table in README.md with the current one",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (`encore status | head`): nothing left to say to it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except _expected_errors() as exc:
        print(f"encore {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except UnicodeDecodeError as exc:
        export = getattr(args, "export", None)
        what = f"{export} is" if export else "a file is"
        print(f"encore {args.command}: {what} not UTF-8 text ({exc})", file=sys.stderr)
        return EXIT_ERROR


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors with a message that says what to do: printed as one line, exit code 2."""
    from batch.evaluation import EvaluationError
    from batch.landing import LandingError
    from cli.operate import StackDown
    from local.services import ServiceError
    from producers.loader import ExportError
    from spark_streaming.popularity import PopularityError

    return (
        SettingsError,
        ConnectionError,
        FileNotFoundError,
        ServiceError,
        StackDown,
        ExportError,
        LandingError,
        PopularityError,
        EvaluationError,
    )


def _demo(args: argparse.Namespace) -> int:
    from cli import demo

    export = args.export or Path(os.environ.get("ENCORE_EXPORT", demo.DEFAULT_EXPORT))
    if not export.exists():
        raise FileNotFoundError(
            f"no export at {export}: the bundled data sits beside the checkout, in "
            "../shared/data; pass --export PATH, or set ENCORE_EXPORT (with make demo)"
        )
    try:
        progress = sys.stderr if args.json else sys.stdout
        summary = demo.run_demo(export, say=lambda line: print(line, file=progress, flush=True))
    except demo.CheckFailed as exc:
        print(f"encore demo: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(json.dumps(summary, indent=2, default=str) if args.json else demo.render(summary))
    return EXIT_OK


def _up(args: argparse.Namespace) -> int:
    from cli import pipeline
    from cli.stack import running_stack, start_stack

    stack = running_stack()
    if stack is None:
        stack = start_stack(fresh=True)
        pipeline.prepare_database(stack.settings)
        heading = "local stack up"
    else:
        heading = "local stack already up"
    if args.json:
        _print(
            {
                "aws_endpoint_url": stack.settings.aws_endpoint_url,
                "database_dsn": stack.settings.database_dsn,
            }
        )
    else:
        print(stack.describe(heading))
    return EXIT_OK


def _down(args: argparse.Namespace) -> int:
    from cli.stack import running_stack

    stack = running_stack()
    if stack is None:
        print("no local stack is up")
        return EXIT_OK
    stack.stop()
    print("stopped")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from cli import operate

    _print(operate.status(operate.current().settings))
    return EXIT_OK


def _capture(args: argparse.Namespace) -> int:
    from cli import operate, pipeline

    _print(pipeline.capture_once(operate.current().settings))
    return EXIT_OK


def _land(args: argparse.Namespace) -> int:
    from cli import operate, pipeline
    from cli.progress import Progress

    settings = operate.current().settings
    with Progress("land", None, "records") as bar:
        landed = pipeline.land_once(settings, bar.advance)
    _print(landed.__dict__)
    return EXIT_OK


def _spark_job(args: argparse.Namespace) -> int:
    from cli import operate
    from cli.progress import Progress

    _print(operate.run_spark_job(operate.current().settings, args.command, Progress))
    return EXIT_OK


def _load(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from cli import operate, pipeline
    from cli.progress import Progress, counting
    from cli.stack import state_dir

    if not args.export.is_file():
        what = "a folder" if args.export.is_dir() else "no such file"
        raise FileNotFoundError(
            f"{args.export} is {what}: pass the path of the marketplace's CSV export"
        )
    settings = operate.current().settings
    anchor = datetime.now(UTC).replace(microsecond=0)
    pipeline.prepare_database(settings)
    load = pipeline.load_export(
        settings,
        args.export,
        state_dir() / "rejects" / f"{args.export.stem}.rejects.csv",
        anchor,
        progress=Progress,
    )
    # A load with nothing new still closes the auctions that ended since and drains the
    # capture, but has no bids to show a bar for.
    with counting(Progress if load.bids else None, "replay", len(load.bids), "bids") as on_progress:
        flow = pipeline.replay_live(settings, load, anchor, on_progress=on_progress)
    _print(
        {
            "rows_read": load.export.rows_read,
            "rows_rejected": len(load.export.rejected),
            "rows_merged": load.export.rows_merged,
            "rows_already_loaded": len(load.already_loaded),
            "rows_loaded": len(load.export.interactions) - len(load.already_loaded),
            "rows_disagreeing": sum(not item.agrees for item in load.already_loaded),
            "rejects_file": str(load.rejects_path),
            "listings": len(load.listings),
            "bids_inserted": flow.bids_inserted,
            "auctions_closed": flow.auctions_closed,
            "changes_captured": flow.changes_captured,
            "landed": flow.landed,
        }
    )
    return _say_skipped(args.export, load.already_loaded)


def _say_skipped(export: Path, already_loaded: list[AlreadyLoaded]) -> int:
    """Name the rows of ``export`` that were loaded before and so skipped; exit code 1 when
    some disagree with the bids the database holds for them."""
    if not already_loaded:
        return EXIT_OK
    print(
        f"encore load: {len(already_loaded)} rows of {export} were already loaded (their "
        "bidder has bids on their listing): skipped (rows_already_loaded)",
        file=sys.stderr,
    )
    disagreeing = [item for item in already_loaded if not item.agrees]
    if not disagreeing:
        return EXIT_OK
    named = "; ".join(
        f"{item.row.user_id} on {item.row.title!r}: {item.bid_count} bids, {item.bid_total}"
        f" in the database, {item.row.bid_count} bids, {item.row.bid_total} in the export"
        for item in disagreeing[:3]
    )
    more = f"; {len(disagreeing) - 3} more" if len(disagreeing) > 3 else ""
    print(
        f"encore load: check failed: {len(disagreeing)} of the skipped rows disagree with the "
        f"bids in the database ({named}{more}); the database keeps its bids "
        "(`encore down`, then `encore up`, starts an empty stack)",
        file=sys.stderr,
    )
    return EXIT_CHECK_FAILED


def _url(args: argparse.Namespace) -> int:
    """Print the URL the app would get; refuse one for a document that does not exist yet."""
    import boto3
    from botocore.exceptions import ClientError

    from cli import operate
    from lambdas.presign.handler import presigned_url_for_user

    if not args.user_id.strip():
        print(
            "encore url: the user id is empty: give a user's id (the export's uid)", file=sys.stderr
        )
        return EXIT_ERROR
    settings = operate.current().settings
    answer = presigned_url_for_user(settings, args.user_id, args.expires_in)
    try:
        boto3.client("s3", **settings.boto3_kwargs()).head_object(
            Bucket=settings.bucket, Key=answer["key"]
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in {"404", "NoSuchKey"}:
            raise
        raise FileNotFoundError(
            f"nothing is published at s3://{settings.bucket}/{answer['key']} yet: "
            "run `encore stream` (feeds) and `encore batch` (recommendations) first"
        ) from exc
    if answer["expires_in"] < args.expires_in:
        print(
            f"encore url: expiry shortened to {answer['expires_in']} s "
            "(at most 7 days, ENCORE_PRESIGN_MAX_EXPIRY_S and the credentials' life)",
            file=sys.stderr,
        )
    _print(answer)
    return EXIT_OK


def _settings(args: argparse.Namespace) -> int:
    from encore.settings import settings_table

    table = settings_table()
    if not args.write_readme:
        print(table)
        return EXIT_OK
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text, count = re.subn(
        r"(<!-- settings-table:start -->\n).*?(\n<!-- settings-table:end -->)",
        lambda match: match.group(1) + table + match.group(2),
        readme.read_text(),
        flags=re.S,
    )
    if count != 1:
        raise FileNotFoundError(f"{readme} has no settings table markers")
    readme.write_text(text)
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


COMMANDS = {
    "demo": _demo,
    "up": _up,
    "down": _down,
    "status": _status,
    "load": _load,
    "capture": _capture,
    "land": _land,
    "stream": _spark_job,
    "batch": _spark_job,
    "url": _url,
    "settings": _settings,
}


if __name__ == "__main__":
    sys.exit(main())
