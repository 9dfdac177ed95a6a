"""A time limit on decoding one sample, so that a video that hangs the decoder is a bad video."""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class DecodeTimeout(Exception):
    """Decoding one sample took longer than its time limit."""


class Deadline:
    """The end time of one sample's decoding; ``check()`` raises once it has passed."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.end = time.monotonic() + self.seconds if self.seconds > 0 else None

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def check(self) -> None:
        if self.expired():
            raise DecodeTimeout(f"decoding took more than {self.seconds:g} s (data.decode_timeout_s)")


def _can_alarm() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0)


@contextmanager
def time_limit(seconds: float) -> Iterator[Deadline]:
    """Limit the body to ``seconds`` (``<= 0``: no limit); raises :class:`DecodeTimeout`.

    Three guards share the yielded :class:`Deadline`: on the main thread of a process, a
    ``SIGALRM`` timer (Python runs the handler between bytecodes, so it stops Python-level
    work but not one long call inside FFmpeg); the decode loops' ``Deadline.check()`` once
    per frame (any thread); and ``Deadline.seconds`` passed to ``av.open(..., timeout=...)``,
    whose FFmpeg interrupt callback stops a read that blocks (a stalled network file
    system). Off the main thread, where ``SIGALRM`` does not exist, or while another
    ``ITIMER_REAL`` timer runs, only the last two apply.
    """
    deadline = Deadline(seconds)
    if deadline.end is None or not _can_alarm():
        yield deadline
        return

    def _on_alarm(signum, frame):
        raise DecodeTimeout(f"decoding took more than {deadline.seconds:g} s (data.decode_timeout_s)")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, deadline.seconds)
    try:
        yield deadline
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
