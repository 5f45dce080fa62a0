"""Progress output: plain lines off a terminal (a few, never carriage-return redraws), none
when disabled, and a loop's last state said once."""

from __future__ import annotations

import io

from noisystudent import progress
from noisystudent.progress import Lines, bar


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_and_the_last_state_once(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    lines = Lines(range(10), "train", None, out, every_s=30.0)
    for k in lines:
        clock.t += 10.0 if k < 9 else 0.0  # 9 steps of 10 s, then the last one at once
        lines.set_postfix(loss=f"{k:.1f}")
    text = out.getvalue()
    assert "\r" not in text
    got = text.splitlines()
    # a line at 30, 60 and 90 s; the last state (10/10) gets its own line, printed once
    assert [g.split(" in ")[0] for g in got] == [
        "train: 3/10 (30%)",
        "train: 6/10 (60%)",
        "train: 9/10 (90%)",
        "train: 10/10 (100%)",
    ]
    assert got[-1].endswith("loss=9.0")


def test_a_loop_that_ends_on_a_printed_line_is_not_repeated(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    for _ in Lines(range(3), "eval", None, out, every_s=30.0):
        clock.t += 10.0  # the 3rd step reaches 30 s: that line is the last state already
    assert out.getvalue().splitlines() == ["eval: 3/3 (100%) in 30s, 0.1/s"]


def test_short_loops_print_nothing_and_disabled_bars_are_silent():
    out = io.StringIO()
    assert list(bar(range(5), "fast", stream=out)) == list(range(5))  # not a terminal
    assert out.getvalue() == ""
    assert list(bar(range(5), "off", enabled=False, stream=out)) == list(range(5))
    assert out.getvalue() == ""
