"""Progress of long work: a tqdm bar on a terminal, plain lines (count/total, rate, ETA) in a log file.

A redirected tqdm bar writes its whole history as one line of carriage returns; a log wants a
readable line every so often instead, with the rate and the time left for the whole job.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``update(n)`` as work is done; shown as tqdm on a terminal, else as a line every ``every_s`` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every_s: float = 30.0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.enabled, self.every_s = enabled, every_s
        self.postfix: dict[str, Any] = {}
        self._start, self._start_count = time.perf_counter(), initial
        self._last_line = self._start
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (time.perf_counter() - self._last_line >= self.every_s or self.count >= self.total):
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values, refresh=False)

    def rate(self) -> float:
        """Units per second since this display started."""
        return (self.count - self._start_count) / max(time.perf_counter() - self._start, 1e-9)

    def _line(self) -> None:
        self._last_line = time.perf_counter()
        rate = self.rate()
        left = (self.total - self.count) / rate if rate > 0 else float("inf")
        eta = format_duration(left) if left != float("inf") else "?"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.count}/{self.total} {self.unit} ({100 * self.count / max(self.total, 1):.0f}%), "
              f"{rate:.3g} {self.unit}/s, ETA {eta}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.count < self.total and self.count > self._start_count:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
