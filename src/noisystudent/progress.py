"""Progress output: tqdm bars on a terminal, periodic plain lines elsewhere.

A log file or CI captures every redraw of a carriage-return bar; there a line every
`LINE_EVERY_S` seconds (and a last one for a loop that printed any) says the same in a few lines.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

LINE_EVERY_S = 30.0


def bar(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
        enabled: bool = True, stream: Any = None) -> Any:  # fmt: skip
    """A progress wrapper over `iterable` (or a manual one with `total` and `update(n)`).
    Disabled: silent. On a terminal: a tqdm bar that disappears when done. Otherwise: plain
    lines."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(iterable, desc=desc, total=total, disable=True)
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, desc=desc, total=total, leave=False, file=stream)
    return Lines(iterable, desc, total, stream)


class Lines:
    """tqdm's interface used here (iteration, update, set_postfix, close) as plain lines."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, stream: Any,
                 every_s: float = LINE_EVERY_S):  # fmt: skip
        self.iterable, self.desc, self.stream, self.every_s = iterable, desc, stream, every_s
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.postfix = total, 0, ""
        self.t0 = self.last = time.monotonic()
        self.printed = False
        self.printed_n = -1  # the count the last line showed

    def __iter__(self) -> Iterator:
        for x in self.iterable or ():
            yield x
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        el = now - self.t0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / el:.1f}/s" if el > 0 else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of}{pct} in {el:.0f}s{rate}{post}", file=self.stream,
              flush=True)  # fmt: skip
        self.printed, self.printed_n = True, self.n

    def close(self) -> None:
        # a loop long enough to report gets its last line too, unless that one said it already
        if self.printed and self.printed_n != self.n:
            self._line(time.monotonic())
        self.printed = False
