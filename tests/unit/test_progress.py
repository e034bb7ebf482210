from __future__ import annotations

import io

from cli.progress import Progress


def test_progress_off_a_terminal_prints_one_line_per_quarter() -> None:
    stream = io.StringIO()
    bar = Progress("replay", 100, "bids", stream=stream)

    for _ in range(100):
        bar.advance()
    bar.finish()

    lines = stream.getvalue().splitlines()
    assert [line.split("]")[1].split()[0] for line in lines] == ["25%", "50%", "75%", "100%"]
    assert lines[-1].startswith("replay") and "100/100 bids" in lines[-1]
