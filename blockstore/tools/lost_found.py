"""STORE/lost+found/: where repair moves or saves what it cannot re-attach, never deleting it; each file
is noted in lost+found/fsck-log.jsonl with why."""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

from blockstore import logs
from blockstore.errors import IOErrorBS
from blockstore.manifest import fsync_dir

_log = logs.get("repair")

LOST_FOUND = "lost+found"
_LOG = "fsck-log.jsonl"
_PIECE = 1 << 20  # bytes read at a time by save_range


class LostFound:
    """STORE/lost+found/: files moved or saved there, each noted in fsck-log.jsonl with why."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, LOST_FOUND)
        self.written: list[str] = []

    def require_usable(self) -> None:
        """Raise IOErrorBS naming lost+found when something other than a folder has its name. Called before
        repair changes anything: a move that fails half-way through a phase (its directory batch already
        synced) left a store the engine refuses to open until lost+found is a folder again."""
        if os.path.lexists(self.dir) and not os.path.isdir(self.dir):
            raise IOErrorBS(errno.ENOTDIR, f"{self.dir} is not a folder: repair moves what it cannot re-attach "
                            "there; move that file away and run the repair again (nothing was changed)")

    def target(self, name: str) -> str:
        """A free path for `name` in lost+found (NAME, NAME.1, ...), the folder made if missing."""
        os.makedirs(self.dir, exist_ok=True)
        path, n = os.path.join(self.dir, name), 0
        while os.path.lexists(path):
            n += 1
            path = os.path.join(self.dir, f"{name}.{n}")
        return path

    def move(self, src: str, name: str, why: str, **info: Any) -> str:
        dst = self.target(name)
        os.rename(src, dst)
        fsync_dir(os.path.dirname(src))
        fsync_dir(self.dir)
        self._note(dst, why, {"from": os.path.relpath(src, self.root), **info})
        return dst

    def save(self, name: str, data: bytes, why: str, **info: Any) -> str:
        dst = self.target(name)
        with open(dst, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.dir)
        self._note(dst, why, info)
        return dst

    def save_range(self, name: str, src: str, start: int, end: int, why: str, **info: Any) -> str:
        """Save bytes [start, end) of the file `src`, a piece at a time and holes kept as holes: a block file
        extended far past its data (a sparse tail of many GiB) was read into memory whole (MemoryError)."""
        dst = self.target(name)
        fi = os.open(src, os.O_RDONLY)
        try:
            with open(dst, "xb") as out:
                off = start
                while off < end:
                    try:
                        off = min(os.lseek(fi, off, os.SEEK_DATA), end)  # skip a hole
                    except OSError as exc:  # ENXIO: only a hole is left
                        if exc.errno != errno.ENXIO:
                            raise
                        break
                    chunk = os.pread(fi, min(_PIECE, end - off), off)
                    if not chunk:
                        break
                    out.seek(off - start)
                    out.write(chunk)
                    off += len(chunk)
                out.truncate(end - start)
                out.flush()
                os.fsync(out.fileno())
        finally:
            os.close(fi)
        fsync_dir(self.dir)
        self._note(dst, why, info)
        return dst

    def _note(self, path: str, why: str, info: dict[str, Any]) -> None:
        self.written.append(path)
        _log.warning("%s: put %s in lost+found: %s", self.root, os.path.basename(path), why)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "file": os.path.basename(path),
                 "why": why, **info}
        with open(os.path.join(self.dir, _LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
