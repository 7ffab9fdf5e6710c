"""Reading VNN-LIB / counterexample text: file loading (plain or gzipped), tokens and S-expressions.

Errors raise :class:`VnnlibError` with one line ``path:line:col: what is wrong (how to fix)``; positions are
token indices (see :class:`Source`).
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path
from typing import cast

from lingraft.errors import LingraftError

PathOrText = str | bytes | os.PathLike

# Deeper nesting than this is never produced by real benchmarks; the cap keeps the (recursive)
# semantic pass far away from Python's recursion limit.
MAX_DEPTH = 100

TOKEN_RE = re.compile(r";[^\n]*|[()]|[^\s();]+")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
#: a variable name: X_i (input) or Y_j (output)
VAR_RE = re.compile(r"([XY])_(\d+)\Z")
START = -1  # position meaning "character offset 0" (line 1, column 1)


class VnnlibError(LingraftError):
    """A malformed or unsupported VNN-LIB / counterexample file (exit code 1).

    The message is one line: ``path:line:col: what is wrong (how to fix)``.
    """


class Source:
    """Decoded file text plus its display name, for ``name:line:col`` messages.

    Parse-tree nodes store a token index, not a character offset (collecting offsets for every token
    would double the reading time); :meth:`offset` recovers the offset when an error is reported.
    A position ``-1 - k`` denotes the raw character offset ``k`` (used before tokenizing).
    """

    __slots__ = ("text", "name")

    def __init__(self, text: str, name: str):
        self.text = text
        self.name = name

    def offset(self, pos: int) -> int:
        if pos < 0:
            return -1 - pos
        for i, m in enumerate(TOKEN_RE.finditer(self.text)):
            if i == pos:
                return m.start()
        return len(self.text)

    def where(self, pos: int) -> str:
        off = self.offset(pos)
        line = self.text.count("\n", 0, off) + 1
        col = off - self.text.rfind("\n", 0, off)
        return f"{self.name}:{line}:{col}"

    def error(self, pos: int, msg: str) -> VnnlibError:
        return VnnlibError(f"{self.where(pos)}: {msg}")


class Sym:
    """An atom (symbol or numeral) and its token index."""

    __slots__ = ("text", "pos")

    def __init__(self, text: str, pos: int):
        self.text = text
        self.pos = pos


class SexprList(list):
    """A parenthesised list of nodes; ``pos`` is the token index of its '('."""

    __slots__ = ("pos",)

    def __init__(self, pos: int):
        super().__init__()
        self.pos = pos


Node = Sym | SexprList


def _looks_like_text(s: str) -> bool:
    # A path never contains these; VNN-LIB text always contains '(' (or is empty / only comments).
    return s == "" or "(" in s or "\n" in s or ";" in s


def load_source(path_or_text: PathOrText) -> tuple[Source, str | None]:
    """Return the decoded source and the file path (None for in-memory text)."""
    path: str | None = None
    if isinstance(path_or_text, str) and _looks_like_text(path_or_text):
        return Source(path_or_text, "<string>"), None
    if isinstance(path_or_text, (bytes, bytearray)):
        raw, name = bytes(path_or_text), "<bytes>"
    else:
        path = os.fspath(path_or_text)
        name = path
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise VnnlibError(f"{name}:1:1: file not found (check the property path)") from None
        except OSError as e:
            raise VnnlibError(f"{name}:1:1: cannot read file: {e.strerror} (check the property path)") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic: detect by content, not suffix
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise VnnlibError(
                f"{name}:1:1: truncated or corrupt gzip data ({e}; re-copy or re-compress the file)"
            ) from None
    if raw[:3] == b"\xef\xbb\xbf":  # UTF-8 byte order mark
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        off = e.start
        line = raw.count(b"\n", 0, off) + 1
        col = off - raw.rfind(b"\n", 0, off)
        raise VnnlibError(
            f"{name}:{line}:{col}: invalid byte 0x{raw[off]:02x}, not a text file "
            "(pass a plain or gzipped VNN-LIB file)"
        ) from None
    return Source(text, name), path


def read_sexprs(src: Source) -> list[Node]:
    """Tokenize and build the S-expression forest iteratively (no recursion, depth capped)."""
    top: list[Node] = []
    cur: list = top
    stack: list[list] = []
    for i, tok in enumerate(TOKEN_RE.findall(src.text)):
        c = tok[0]
        if c == "(":
            node = SexprList(i)
            cur.append(node)
            stack.append(cur)
            cur = node
            if len(stack) > MAX_DEPTH:
                raise src.error(i, f"expressions nested deeper than {MAX_DEPTH} levels (flatten the formula)")
        elif c == ")":
            if not stack:
                raise src.error(i, "unexpected ')' (remove it or add the matching '(')")
            cur = stack.pop()
        elif c != ";":
            cur.append(Sym(tok, i))
    if stack:
        # cur is the innermost list still open
        raise src.error(cast(SexprList, cur).pos, "unclosed '(' (add the missing ')')")
    return top


def parse_number(text: str) -> float | None:
    if _NUMBER_RE.match(text):
        return float(text)
    return None
