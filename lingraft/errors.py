"""Error types with exit codes. The CLI turns a LingraftError into one line on stderr."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class LingraftError(Exception):
    """A user-facing error: one line naming the problem and the fix.

    exit_code: 1 for bad input files / runtime failures, 2 for bad usage.
    """

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(LingraftError):
    """Bad option values or combinations (exit code 2)."""

    exit_code = EXIT_USAGE


class UnsupportedModelError(LingraftError):
    """The network contains an operator the bound engine cannot bound (exit code 1)."""
