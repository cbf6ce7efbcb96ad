"""STORE/lost+found/: where repair moves or saves what it cannot re-attach, never deleting it; each file
is noted in lost+found/fsck-log.jsonl with why."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from blockstore import logs

_log = logs.get("repair")

LOST_FOUND = "lost+found"
_LOG = "fsck-log.jsonl"


class LostFound:
    """STORE/lost+found/: files moved or saved there, each noted in fsck-log.jsonl with why."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.dir = os.path.join(root, LOST_FOUND)
        self.written: list[str] = []

    def _target(self, name: str) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path, n = os.path.join(self.dir, name), 0
        while os.path.lexists(path):
            n += 1
            path = os.path.join(self.dir, f"{name}.{n}")
        return path

    def move(self, src: str, name: str, why: str, **info: Any) -> str:
        dst = self._target(name)
        os.rename(src, dst)
        fsync_dir(os.path.dirname(src))
        fsync_dir(self.dir)
        self._note(dst, why, {"from": os.path.relpath(src, self.root), **info})
        return dst

    def save(self, name: str, data: bytes, why: str, **info: Any) -> str:
        dst = self._target(name)
        with open(dst, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
