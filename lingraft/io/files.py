"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target.

An interrupted run never leaves a half-written result or checkpoint behind (a killed writer may leave its temp
file ``.NAME.PID-XXXXXXXX.tmp``; the next successful write of the same target removes it). Also JSONL appends and
reads (with the repair of a line torn by a kill), file hashes, and write errors that name the path and the cause.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lingraft.errors import LingraftError

# A temp file of a killed writer is removed by the next write of the same target once it is this old (seconds)
# and its writer (the pid in its name) is gone; any such file older than STALE_TEMP_MAX_AGE_S goes regardless.
STALE_TEMP_AGE_S = 5.0
STALE_TEMP_MAX_AGE_S = 24 * 3600.0
_ACTIVE_TEMPS: set[str] = set()  # temp files this process is writing right now (never removed as stale)
_ACTIVE_LOCK = threading.Lock()


class FileWriteError(LingraftError, OSError):
    """Writing a file failed: one line naming the path and the real cause (also an OSError with errno and
    filename, so code that catches OSError keeps working)."""

    def __init__(self, message: str, err: int | None = None, filename=None):
        OSError.__init__(self, err, message, None if filename is None else os.fspath(filename))
        self.message = message
        self.args = (message,)

    def __str__(self) -> str:
        return self.message


def describe_os_error(e: OSError, path=None) -> str:
    """The real cause of ``e`` (raised while accessing ``path``) in words, e.g. "/a/b is not a directory" where
    Python says "File exists" because a folder on the way is a regular file."""
    p = Path(os.fspath(path if path is not None else e.filename or "."))
    if e.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(e, (NotADirectoryError, FileExistsError)):
        for parent in [p.parent, *p.parent.parents]:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    return f"{parent} is not a directory"
                break
    if e.errno == errno.EISDIR:
        return f"{p} is a directory"
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return (e.strerror or str(e)).rstrip(".")


_FIX = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check the folder's permissions or write elsewhere",
    errno.EPERM: "check the folder's permissions or write elsewhere",
    errno.ENOTDIR: "choose another folder",
    errno.EISDIR: "give a file name",
}


def _write_error(e: OSError, path: Path) -> FileWriteError:
    cause = describe_os_error(e, path)
    err = e.errno
    if cause.endswith("is not a directory"):
        err = errno.ENOTDIR
    fix = _FIX.get(err)
    return FileWriteError(f"cannot write {path}: {cause}" + (f"; {fix}" if fix else ""), err, path)


def ensure_parent(path: str | os.PathLike) -> None:
    """Create the folder of ``path`` (and its parents); a failure is a :class:`FileWriteError` naming ``path`` and
    the real cause (e.g. "/a/b is not a directory" where Python says "File exists")."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(e, path) from None


def atomic_write(
    path: str | os.PathLike,
    writer: Callable[[Any], None],
    mode: str = "wb",
    before_replace: Callable[[Path], None] | None = None,
) -> None:
    """Call ``writer(fileobj)`` on a temp file next to ``path``, then atomically rename it to ``path``.

    ``before_replace(temp_path)``, if given, runs after the temp file is complete and synced and before the
    rename (e.g. to write a sidecar describing the new bytes first); if it raises, nothing is renamed.
    An OSError (full disk, a regular file where a folder should be, ...) becomes a :class:`FileWriteError`
    naming ``path`` and the real cause. After a successful write, temp files that killed writers left for the
    same target are removed (see :func:`_remove_stale_temps`).
    """
    path = Path(path)
    ensure_parent(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        with _ACTIVE_LOCK:  # created and registered at once: another thread's cleanup never sees it unregistered
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=str(path.parent))
            _ACTIVE_TEMPS.add(tmp)
    except OSError as e:
        raise _write_error(e, path) from None
    try:
        try:
            # mkstemp creates 0600 files; give the result the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, mode) as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace(Path(tmp))
            os.replace(tmp, path)
        except FileWriteError:
            raise
        except OSError as e:
            raise _write_error(e, path) from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE_TEMPS.discard(tmp)
    _remove_stale_temps(path)


def _temp_pattern(name: str) -> re.Pattern:
    # mkstemp adds 8 characters from [a-z0-9_]; lingraft puts "PID-" in front (older versions did not)
    return re.compile(r"\." + re.escape(name) + r"\.(?:(\d+)-)?[a-z0-9_]{8}\.tmp\Z")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell cheaply (and os.kill(pid, 0) would send Ctrl-C on Windows): keep its file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True  # exists (owned by someone else) or cannot tell: keep its file
    return True


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files of ``path`` that killed writers left behind: names exactly ``.NAME.[PID-]XXXXXXXX.tmp``
    (another target's temp files never match), regular files, not being written by this process, unchanged for
    STALE_TEMP_AGE_S, and whose writer is gone: no pid in the name (older lingraft), our own pid (an earlier
    process that had it), a pid that no longer runs, or older than STALE_TEMP_MAX_AGE_S whatever the pid.
    Best effort: errors are ignored."""
    pat = _temp_pattern(path.name)
    prefix = f".{path.name}."
    me = os.getpid()
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for ent in entries:
        if not ent.name.startswith(prefix):
            continue
        m = pat.match(ent.name)
        if m is None:
            continue
        full = os.path.join(path.parent, ent.name)
        with _ACTIVE_LOCK:
            if full in _ACTIVE_TEMPS:
                continue
        try:
            if not ent.is_file(follow_symlinks=False):
                continue
            age = now - ent.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if age < STALE_TEMP_AGE_S:
            continue  # maybe being written right now (by another process)
        pid = int(m.group(1)) if m.group(1) else None
        # pid == me but not in flight here: left by an earlier process that had our pid (containers reuse pids)
        if pid is None or pid == me or not _pid_alive(pid) or age > STALE_TEMP_MAX_AGE_S:
            try:
                os.unlink(full)
            except OSError:
                pass


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def append_jsonl(path, obj: Any) -> None:
    """Append one JSON line with a single write + fsync. A kill can only leave a torn last line (a prefix of the
    line, without its newline): :func:`read_jsonl` skips it, and ``read_jsonl(path, repair=True)`` removes it,
    which every resuming writer does before its first append so that nothing is glued onto a fragment."""
    line = json.dumps(obj, default=json_default) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # e.g. a full disk: name the file (a partial line is a torn tail, repaired on resume)
        raise _write_error(e, Path(path)) from None


class JsonlError(LingraftError, ValueError):
    """A JSON-lines file is damaged (a bad line that is not a torn last line) or not UTF-8 text."""


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def read_jsonl(
    path,
    *,
    repair: bool = False,
    what: str = "file",
    fix: str = "delete that line and rerun",
    log: Callable[[str], Any] | None = None,
) -> list:
    """Every value of the JSON-lines file ``path`` in file order ([] when it does not exist).

    A *torn* last line (what a kill during :func:`append_jsonl` leaves) is skipped: the file does not end in a
    newline and its last line is not valid JSON. With ``repair=True`` the file is also made safe to append to:
    a torn last line is truncated away (``log`` is told), and a complete last line that only lacks its newline
    gets one. Any other bad line (a line in the middle, or a newline-terminated last line) raises
    :class:`JsonlError` naming the file and the line (``what`` names the kind of file, ``fix`` the remedy), and
    nothing is changed; so does text that is not UTF-8.
    """
    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():
        raise JsonlError(f"{what} {p} is a directory; give a .jsonl file")
    data = p.read_bytes()
    body, tail = data, b""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        body, tail = data[:cut], data[cut:]
    torn = bool(tail) and not _parses(tail)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonlError(f"{what} {p} is not UTF-8 JSON lines; move it away or pick another file") from None
    lines = text.split("\n")
    if tail and not torn:
        lines[-1] = tail.decode("utf-8")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise JsonlError(f"{what} {p} line {i + 1} is not valid JSON; {fix}") from None
    if repair and tail:
        try:
            if torn:
                if log is not None:
                    log(f"dropping a torn last line from {p} (an interrupted write)")
                os.truncate(p, len(body))  # in place: keeps the inode (and any lock held on it)
            else:
                with open(p, "ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise _write_error(e, p) from None
    return out


def json_default(o: Any) -> Any:
    """``json.dumps`` ``default=`` for the values results and metadata hold: paths become strings, 0-d tensors
    and numpy scalars numbers, tensors and arrays (nested) lists. Duck-typed, so torch and numpy are not imported.
    Anything else raises TypeError."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    item = getattr(o, "item", None)
    if callable(item) and getattr(o, "shape", None) == ():
        return item()
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


_json_default = json_default  # the older private name (lingraft.io.checkpoint imports it)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
