"""Ctrl-C and SIGTERM that stop a long loop at its next safe point instead of mid-write.

A loop wraps its work in ``deferred()``: while inside, the first SIGINT or SIGTERM only records the signal,
and the loop polls ``requested()`` (or ``check()``) where stopping loses nothing (after an update, between
shards or batches), saves what it has and raises ``Interrupted`` with what it kept. A second signal restores
the default handlers and raises KeyboardInterrupt at once: whoever presses twice wants out now, and every
writer in cgn_dist is atomic (temporary names, commit markers), so a hard stop leaves nothing that looks
complete. The loops know nothing of the command line; the CLI turns ``Interrupted`` into its one line.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signal numbers seen inside the outermost deferred()
_depth = [0]


class Interrupted(KeyboardInterrupt):
    """A loop stopped after a signal, at a safe point. ``done`` of ``total`` (updates, or committed shards)
    are kept in ``where`` (a checkpoint, or the shard folder); ``kind`` is "train" or "generate".
    A KeyboardInterrupt, so no ``except Exception`` (a retry loop) swallows it."""

    def __init__(self, signum: int, kind: str = "", done: int | None = None, total: int | None = None,
                 where: object = None):
        super().__init__(signum)
        self.signum, self.kind, self.done, self.total = signum, kind, done, total
        self.where = None if where is None else str(where)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended: 130, 143

    def kept(self, kind: str, done: int, total: int, where: object) -> "Interrupted":
        """The same interrupt, with what the loop kept."""
        return Interrupted(self.signum, kind, done, total, where)


def _handler(signum: int, frame) -> None:
    if _received:  # the second one: stop at once
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        raise KeyboardInterrupt
    _received.append(signum)
    # os.write, not print or logging: a handler may run in the middle of a write to the same stream
    os.write(2, f"{signal.Signals(signum).name}: stopping at the next safe point "
                f"(again to stop at once)\n".encode())


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGINT / SIGTERM set a flag instead of raising. Only the main thread can take signals (a Ray
    Train loop runs in another thread): elsewhere, and when nested, this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _depth[0] == 0
    if outermost:
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        _received.clear()
        for s in SIGNALS:
            signal.signal(s, _handler)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if outermost:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            _received.clear()


def requested() -> int | None:
    """The signal that asked to stop, or None."""
    return _received[0] if _received else None


def check() -> None:
    """Raise ``Interrupted`` (without what was kept: the caller adds that) if a stop was asked for."""
    if _received:
        raise Interrupted(_received[0])
