"""One clock for elapsed times and deadlines inside one process: :func:`now` and :class:`Stopwatch`.

Both read :func:`time.monotonic`, which never jumps when the wall clock is set (NTP, daylight saving, a user), so
a measured time or a deadline ``now() + seconds`` stays right. Its values mean nothing on their own and nothing
in another process; a deadline that travels to other machines (Ray workers) is wall-clock time instead.
"""

from __future__ import annotations

import time

__all__ = ["DeadlineExceeded", "Stopwatch", "check_deadline", "now"]


def now() -> float:
    """Seconds on the process's clock: compare it with a deadline ``now() + seconds`` or subtract two readings."""
    return time.monotonic()


class DeadlineExceeded(Exception):
    """A long computation (e.g. one CROWN pass over a large network) stopped at its deadline; the caller that set
    the deadline turns it into its own ``timeout``."""


def check_deadline(deadline: float | None) -> None:
    """Raise :class:`DeadlineExceeded` when ``deadline`` (a :func:`now` value; None: no deadline) has passed."""
    if deadline is not None and now() > deadline:
        raise DeadlineExceeded


class Stopwatch:
    """Measures elapsed seconds from its creation (or the last :meth:`restart`)."""

    __slots__ = ("start",)

    def __init__(self) -> None:
        self.start = now()

    def elapsed(self) -> float:
        """Seconds since the start."""
        return now() - self.start

    def restart(self) -> float:
        """Seconds since the start; the watch then starts again from now."""
        t = now()
        elapsed, self.start = t - self.start, t
        return elapsed
