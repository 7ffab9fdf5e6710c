"""SIGINT and SIGTERM, handled alike: both become a ``KeyboardInterrupt`` (exit 130 in the CLI).

``docker stop``, Slurm, CI timeouts and cancelled jobs send SIGTERM, which by default kills the process on the
spot (rc -15) without saving anything. While an :class:`InterruptGuard` is active, SIGTERM raises
KeyboardInterrupt like Ctrl-C does, so the code that keeps resume state (training, ``certify --state``, sweeps)
saves it and the CLI exits 130. Inside :func:`critical` (a results line being appended, an optimizer step) the
signal is remembered and raised right after the block, so nothing is left half-done.

A command that saved something on interrupt says so in one line (what was saved, how to resume): it raises
:func:`interrupted` ``(message, log)``. Under the CLI (:func:`cli_reports`) the CLI prints that line itself, once;
elsewhere (the Python API) the message goes to ``log`` as before.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "Interrupted",
    "InterruptGuard",
    "critical",
    "interrupted",
    "cli_reports",
    "message_of",
    "keep_handlers",
    "forget_unhandled_interrupt",
    "DEFAULT_MESSAGE",
]

DEFAULT_MESSAGE = "interrupted"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt carrying the one line to print (what was saved and how to resume)."""

    def __init__(self, message: str = DEFAULT_MESSAGE):
        super().__init__(message)
        self.message = message


class _State:
    """Process-wide: how deep inside :func:`critical` we are, whether a signal waits, whether the CLI reports."""

    critical_depth = 0
    pending: int | None = None
    cli_reports = False


def _handler(signum: int, frame: Any) -> None:
    if _State.critical_depth > 0:
        _State.pending = signum
        return
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class InterruptGuard:
    """While active (``with InterruptGuard():``), SIGINT and SIGTERM raise KeyboardInterrupt, deferred past any
    :func:`critical` block. Nests; restores the previous handlers on exit. Signals a parent set to SIG_IGN stay
    ignored (e.g. a background job). Off the main thread it does nothing (signal.signal only works there)."""

    def __init__(self) -> None:
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN:
                    continue
                self._saved[sig] = old
                signal.signal(sig, _handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._saved.clear()

    def critical(self) -> contextlib.AbstractContextManager[None]:
        """The same as the module-level :func:`critical`."""
        return critical()


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Defer SIGINT/SIGTERM (when a guard is active) until the block is done, then raise KeyboardInterrupt."""
    _State.critical_depth += 1
    try:
        yield
    finally:
        _State.critical_depth -= 1
    if _State.critical_depth == 0 and _State.pending is not None:
        signum, _State.pending = _State.pending, None
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name} during a write")


def interrupted(message: str, log: Callable[[str], Any] | None = None) -> Interrupted:
    """The exception to raise after an interrupt was handled (state saved): ``raise interrupted(msg, log) from e``.
    Logs ``message`` unless the CLI prints it itself (:func:`cli_reports`)."""
    if log is not None and not _State.cli_reports:
        log(message)
    return Interrupted(message)


@contextlib.contextmanager
def cli_reports() -> Iterator[None]:
    """While active, :func:`interrupted` leaves printing the line to the CLI (which prints it once)."""
    old, _State.cli_reports = _State.cli_reports, True
    try:
        yield
    finally:
        _State.cli_reports = old


def message_of(exc: BaseException) -> str:
    """The one line to print for an interrupt."""
    return exc.message if isinstance(exc, Interrupted) else DEFAULT_MESSAGE


def forget_unhandled_interrupt() -> None:
    """Tell CPython that the KeyboardInterrupt just caught was handled; call it where an interrupt is turned into
    an exit code.

    A KeyboardInterrupt that leaves code run by ``exec`` of a string (dataclasses and namedtuple build their
    methods that way, so a signal during a lazy import such as torch's first ``torch._dynamo`` import lands there
    often) sets an interpreter flag that catching it does not clear. A program run as ``python -m`` then ends by
    killing itself with SIGINT after its own ``sys.exit(130)`` (status -2). Each ``exec`` of a string starts by
    resetting that flag, so an empty one clears it."""
    exec("")  # a constant empty string: its only effect is the reset


@contextlib.contextmanager
def keep_handlers() -> Iterator[Callable[[], None]]:
    """Save the SIGINT/SIGTERM handlers now in force and put them back when the block ends, for code that lets a
    library install its own (``ray.init`` sets a SIGTERM handler). The block gets a function that puts them back
    at once, too. Off the main thread nothing is saved (the handlers cannot be set there)."""
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}

    def restore() -> None:
        for sig, handler in saved.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(sig, handler)

    try:
        yield restore
    finally:
        restore()
