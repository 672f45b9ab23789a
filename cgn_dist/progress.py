"""Progress bars only where a person watches them.

On a terminal, a tqdm bar. In a file or a pipe (a batch job's log, ``| tee``), a bar is a stream of ``\\r``
redraws (one job's log grew 128 KB in 4 minutes), so there a plain log line is written per interval instead,
or none at all where the caller logs its own progress lines (the training loops do, every train.log_every).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("cgn_dist.progress")


def on_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's calls (update, set_postfix, set_postfix_str, close, iteration) as a log line every ``every_s``
    seconds and one at the end; silent with ``lines=False``."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0,
                 desc: str = "", unit: str = "it", every_s: float = 30.0, lines: bool = True):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.every_s, self.lines, self.postfix = every_s, lines, ""
        self._start_n, self._t0 = initial, time.monotonic()
        self._last = self._t0
        self._closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        if not self.lines:
            return
        rate = (self.n - self._start_n) / max(now - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        log.info(f"{self.desc}: {self.n}{of} {self.unit}{pct}, {rate:.1f} {self.unit}/s"
                 + (f", {self.postfix}" if self.postfix else ""))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n > self._start_n:
                self._line(time.monotonic())


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 unit: str = "it", enabled: bool = True, lines: bool = True, every_s: float = 30.0,
                 **tqdm_kw: Any):
    """A tqdm bar on a terminal (stderr); elsewhere a LineProgress (``lines=False``: no lines, the caller logs
    its own). ``enabled=False``: neither."""
    if enabled and on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, **tqdm_kw)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, unit=unit, every_s=every_s,
                        lines=lines and enabled)
