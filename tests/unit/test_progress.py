from __future__ import annotations

import io

import pytest

from cli.progress import Progress


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shares(text: str) -> list[str]:
    return [line.split("]")[1].split()[0] for line in text.splitlines()]


def test_progress_off_a_terminal_prints_a_line_per_quarter_of_slow_work() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("replay", 100, "bids", stream=stream, quiet_s=10, clock=clock)

    for _ in range(100):
        clock.now += 1
        bar.advance()
    bar.finish()

    assert shares(stream.getvalue()) == ["25%", "50%", "75%", "100%"]
    assert stream.getvalue().splitlines()[-1] == (
        "replay     [##############################] 100% 100/100 bids (1/s)"
    )


def test_progress_off_a_terminal_prints_one_line_for_quick_work() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("export", 3_378, "lines", stream=stream, quiet_s=10, clock=clock)

    for _ in range(3_378):
        clock.now += 0.001
        bar.advance()
    bar.finish()

    assert shares(stream.getvalue()) == ["100%"]
    assert "3,378/3,378 lines" in stream.getvalue()


def test_progress_of_unknown_size_counts_and_rates() -> None:
    stream, clock = io.StringIO(), Clock()
    with Progress("land", None, "records", stream=stream, quiet_s=10, clock=clock) as bar:
        for _ in range(4):
            clock.now += 6
            bar.advance(500)

    assert stream.getvalue().splitlines() == [
        "land       1,000 records (83/s)",
        "land       2,000 records (83/s)",
    ]


def test_progress_left_by_an_error_shows_how_far_it_got() -> None:
    stream = io.StringIO()

    with pytest.raises(RuntimeError), Progress("stream", 8, "files", stream=stream) as bar:
        bar.advance(2)
        raise RuntimeError("batch failed")

    assert shares(stream.getvalue()) == ["25%"]
    assert "2/8 files" in stream.getvalue()


def test_progress_on_a_terminal_redraws_one_line() -> None:
    stream = Terminal()

    with Progress("replay", 4, "bids", stream=stream, width=4) as bar:
        for _ in range(4):
            bar.advance()

    text = stream.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1
    assert text.rsplit("\r", 1)[1].startswith("replay     [####] 100% 4/4 bids")


def test_slow_steps_show_the_time_taken_instead_of_a_rate() -> None:
    stream, clock = io.StringIO(), Clock()
    bar = Progress("nightly", 5, "stages", stream=stream, clock=clock)
    clock.now = 40.0
    bar.advance(5)
    bar.finish()

    assert stream.getvalue().rstrip().endswith("5/5 stages (40 s)")
