"""A dependency-free progress line for long writes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressSpec = bool | None | Callable[[int, int], None]


class Progress:
    """Report ``done / total`` as a single refreshing line on a stream.

    Parameters
    ----------
    label
        What is counted, e.g. ``"l1: images"``.
    total
        Number of items.
    enabled
        True, False, None (only when the stream is a terminal) or a callable
        ``f(done, total)`` that receives the updates instead.
    """

    def __init__(self, label: str, total: int, enabled: ProgressSpec = None, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.callback = enabled if callable(enabled) else None
        self.enabled = bool(enabled) if enabled is not None and not callable(enabled) else self.stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.callback is not None:
            self.callback(self.done, self.total)
        elif self.enabled and (time.monotonic() - self._last > 0.2 or self.done >= self.total):
            self._last = time.monotonic()
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(30 * frac)
            elapsed = time.monotonic() - self.start
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {elapsed:6.1f} s")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
