"""Logging conventions: blockstore logs through the standard `logging` module and is quiet by default.

Loggers are named `blockstore.<part>` under the library's root logger `blockstore`:

    blockstore.open        a store opened: created, clean, recovered, or read-only (INFO)
    blockstore.recovery    what recovery after an unclean stop did (INFO; WARNING when it dropped records)
    blockstore.blocks      a block sealed (INFO); a block deleted (DEBUG)
    blockstore.compaction  a compaction pass that moved something (INFO), a failed pass (WARNING)
    blockstore.fsck        fsck's findings (INFO)
    blockstore.repair      repair's actions (INFO); anything moved to lost+found or left damaged (WARNING)
    blockstore.metrics     the metrics endpoint started (INFO)

Levels: INFO says what the store did; WARNING means data was lost or quarantined (records dropped by
recovery, files moved to lost+found, damage left as it is), or an operation failed and will be retried.

As a library blockstore adds only a `NullHandler` (at import): an application that configures logging
(`logging.basicConfig(level=logging.INFO)`) sees these lines; one that does not sees nothing, not even
Python's last-resort stderr output for warnings. The `blockstore` command calls `configure(verbosity)`
for `-v`/`-q`.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

ROOT = "blockstore"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logging.getLogger(ROOT).addHandler(logging.NullHandler())


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler configure() installs, told apart from an application's own handlers."""


def level_for(verbosity: int) -> int:
    """The level a command line's verbosity means: -1 or less (-q) errors only, 0 warnings (the
    default), 1 (-v) INFO, 2 or more (-vv) DEBUG."""
    if verbosity < 0:
        return logging.ERROR
    return (logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG


def configure(verbosity: int = 0, stream: TextIO | None = None) -> None:
    """Send blockstore's log lines at the level `verbosity` means (level_for) to `stream` (stderr).
    For programs such as the `blockstore` command; calling it again replaces the handler it installed,
    never an application's own."""
    log = logging.getLogger(ROOT)
    for h in [h for h in log.handlers if isinstance(h, _CliHandler)]:
        log.removeHandler(h)
    handler = _CliHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    log.addHandler(handler)
    log.setLevel(level_for(verbosity))


def unconfigure() -> None:
    """Undo configure(): remove its handler and give the `blockstore` logger its level back (NOTSET)."""
    log = logging.getLogger(ROOT)
    for h in [h for h in log.handlers if isinstance(h, _CliHandler)]:
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)


def get(part: str) -> logging.Logger:
    """The logger of one part of blockstore (`blockstore.<part>`)."""
    return logging.getLogger(f"{ROOT}.{part}")
