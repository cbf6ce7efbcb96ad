"""What every `blockstore` subcommand shares: exit codes, the usage error, opening a store read-only with one
wording for "not a store", key and block-id arguments, printable escaping of bytes, JSON output."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from blockstore.errors import BlockstoreError, InvalidArgument, NotFound
from blockstore.manifest import MANIFEST
from blockstore.store import Store
from blockstore.tools.fsck_decode import require_store
from blockstore.validate import check_ns

EXIT_OK = 0
EXIT_ERROR = 8  # operational error (the fsck convention: a bitmask, 8 = operational)
EXIT_USAGE = 16  # a usage error: a bad flag, a bad flag value, flags that do not go together


class UsageError(BlockstoreError):
    """A command's arguments are wrong in a way argparse cannot see (a flag that needs another, a key that
    is not valid hex): `blockstore` prints the subcommand's usage with the message and exits EXIT_USAGE."""


def no_store(path: str, why: str) -> NotFound:
    """The one wording for a path that is not a store, used by every command (fsck's require_store too)."""
    return NotFound(f"no store at {path!r} ({why})")


def open_read_only(path: str) -> Store:
    """The store at `path`, read-only: safe beside a live writer, it sees what was committed when it opened."""
    root = require_store(path)
    if not os.path.exists(os.path.join(root, MANIFEST)):
        raise no_store(root, f"no {MANIFEST} there; `blockstore fsck` checks a damaged one")
    return Store(root, create=False, read_only=True)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


_PRINTABLE = frozenset(range(0x21, 0x7F)) - {ord("\\")}


def escape(data: bytes) -> str:
    """`data` printable and unambiguous (ldb's idea): visible ASCII as is, a backslash as \\\\, every other
    byte (space, control bytes, NUL, non-ASCII) as \\xNN. parse_key() reads it back."""
    return "".join(chr(b) if b in _PRINTABLE else "\\\\" if b == 0x5C else f"\\x{b:02x}" for b in data)


def terminal_text(value: bytes) -> str:
    """A value shown on a terminal: UTF-8 text as is (newlines and tabs too), every other control character or
    undecodable byte escaped, so an escape sequence in a value cannot take over the user's terminal."""
    text = value.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c in "\n\t" else escape(c.encode()) for c in text)


_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|\\)")


def parse_key(text: str, hex_input: bool) -> bytes:
    """A key given on the command line: hex with --hex, else the text's UTF-8 bytes with escape()'s \\xNN and
    \\\\ read back (so a key `blockstore scan` prints can be pasted into `blockstore get`)."""
    if hex_input:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise UsageError(f"--hex: {text!r} is not hex (two digits a byte, e.g. 00ff6b)") from None
    raw = text.encode("utf-8", "surrogateescape")
    if b"\\" in _ESCAPE.sub(b"", raw):
        raise UsageError(f"{text!r}: a backslash starts \\xNN (one byte) or \\\\ (a backslash); use --hex for "
                         "arbitrary bytes")
    return _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]), raw)


def block_id(text: str) -> int:
    """argparse type of --block: a block id in hex, as `blockstore dump` and fsck print it."""
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a block id is hex (as `blockstore dump` lists them), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a block id is not negative, got {text!r}")
    return value


def namespace(text: str) -> str:
    """argparse type of --ns / --namespace: a name that cannot be a namespace (empty, over 255 bytes) is a bad
    flag value, a usage error (exit 16), not an error of the store."""
    try:
        return check_ns(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="the store's directory")


def add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON instead of text")


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def print_json_rows(rows: Iterable[dict[str, Any]]) -> None:
    """A JSON array written as it is produced: a long listing does not sit in memory first."""
    out = sys.stdout
    out.write("[")
    sep = "\n  "
    for row in rows:
        out.write(sep + json.dumps(row))
        sep = ",\n  "
    out.write("]\n" if sep == "\n  " else "\n]\n")
