"""One progress reporter for every long phase (certify, graft's phases, train epochs, run's jobs).

On a TTY it is a tqdm bar on stderr (with rate and ETA). Off a TTY (CI logs, ``nohup``, Slurm) it prints a
one-line record to stderr at most every :data:`INTERVAL_S` seconds::

    certify: 320/1000 images (32%), 2.1 images/s, ETA 5.4 min

Both print, once, an estimate of the whole phase after its first measured step, when it is expected to take
:data:`ESTIMATE_MIN_S` or more::

    certify: 1000 images, ~8.0 min at the measured rate

``disabled`` (``-q``, ``--no-progress``) silences all of it.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

__all__ = ["INTERVAL_S", "Progress", "progress_factory", "format_duration"]

INTERVAL_S = 30.0  # off a TTY: seconds between two progress records (tests patch it to 0)
ESTIMATE_MIN_S = 20.0  # the estimate line is printed for phases expected to take at least this long


def format_duration(seconds: float) -> str:
    """42 -> '42 s', 150 -> '2.5 min', 7200 -> '2.0 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``update(n)`` after each step of ``total`` units. A context manager; ``write(msg)`` prints a log line
    without tearing a bar; ``set_postfix(**kw)`` adds fields (loss, eps) to the bar and the records."""

    def __init__(self, total: int, desc: str, disabled: bool = False, *, unit: str = "images", initial: int = 0):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = int(initial)
        self.disable = bool(disabled)
        self.tty = sys.stderr.isatty()
        self._t0 = time.monotonic()
        self._n0 = self.n  # units already done when timing started (resumed work is not counted in the rate)
        self._last = self._t0
        self._estimated = False
        self._postfix: dict[str, Any] = {}
        self._bar = None
        if not self.disable and self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=self.n, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def skip(self, n: int) -> None:
        """Count n units that were already done (resumed): they advance the bar, not the measured rate."""
        self.n += n
        self._n0 += n
        if self._bar is not None:
            self._bar.update(n)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        if self.disable:
            return
        now = time.monotonic()
        rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
        if not self._estimated and self.n < self.total and self.n > self._n0:
            self._estimated = True
            expected = (self.total - self._n0) / rate
            if expected >= ESTIMATE_MIN_S:
                self.write(f"{self.desc}: {self.total} {self.unit}, ~{format_duration(expected)} at the measured rate")
        if self._bar is None and now - self._last >= INTERVAL_S:
            self._last = now
            click.echo(self._record(rate), err=True)

    def _record(self, rate: float) -> str:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = format_duration((self.total - self.n) / rate) if rate > 0 else "?"
        extra = "".join(f", {k} {v}" for k, v in self._postfix.items())
        done = f"{self.n}/{self.total} {self.unit} ({pct:.0f}%)"
        return f"{self.desc}: {done}, {rate:.3g} {self.unit}/s, ETA {eta}{extra}"

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = kw
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def write(self, msg: str) -> None:
        """Print a line on stderr (above the bar on a TTY)."""
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            click.echo(msg, err=True)


def progress_factory(disabled: bool):
    """``make(total, desc, unit="images", initial=0) -> Progress``: what the library's long phases call."""

    def make(total: int, desc: str, unit: str = "images", initial: int = 0) -> Progress:
        return Progress(total, desc, disabled, unit=unit, initial=initial)

    return make
