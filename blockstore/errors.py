"""One exception hierarchy for everything the store raises.

Each C error code (native/blockstore.h, BS_E*) maps to exactly one class here (see CODE_TO_ERROR);
errors raised on the Python side use the same classes, so callers catch one family.
"""

from __future__ import annotations

import errno as _errno
import os


class BlockstoreError(Exception):
    """Base of every error blockstore raises on purpose."""


class InvalidArgument(BlockstoreError, ValueError):
    """An argument breaks a documented limit (key size, payload size, bad config...). Nothing was written."""


class IOErrorBS(BlockstoreError, OSError):
    """The operating system reported an I/O error. Acknowledged data is unaffected."""


class NoSpace(IOErrorBS):
    """The disk is full (ENOSPC/EDQUOT). The failed operation was not acknowledged; earlier ones stand."""


class RemoteNotConfirmed(IOErrorBS):
    """`durability="remote"`: the object store did not confirm a write's block in time (unreachable, or
    slower than `remote_timeout`). The write is durable locally and stays queued for upload; it is not
    acknowledged as remote (the remote tier's status() says what is pending)."""


class CorruptionError(BlockstoreError):
    """Bytes on disk do not parse as docs/format.md says."""


class TruncatedError(CorruptionError):
    """A file ends inside a structure (a torn write, or a truncated copy)."""


class ChecksumMismatch(CorruptionError):
    """A structure parsed, but its checksum disagrees: the bytes changed after they were written."""


class FormatVersionError(CorruptionError):
    """Written by a newer format version than this build understands."""


class OutOfMemory(BlockstoreError, MemoryError):
    """The C core could not allocate its scratch memory."""


class NotFound(BlockstoreError, KeyError):
    """A required file or record is missing (a plain miss on get is None, not this)."""

    def __str__(self) -> str:  # KeyError would print the message as a repr
        return str(self.args[0]) if self.args else ""


class StoreLocked(BlockstoreError):
    """Another process holds the store's writer lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "an unknown process"
        super().__init__(
            f"store {path!r} is locked by {holder}; open it with read_only=True, or stop that writer"
        )
        self.path = path
        self.pid = pid


class StoreClosed(BlockstoreError):
    """The store was closed (or abandoned after a simulated crash) and cannot serve calls."""


class ReadOnlyStore(BlockstoreError):
    """A write was attempted on a store opened with read_only=True."""


# C error codes (native/blockstore.h) -> exception class. Kept next to the classes on purpose.
CODE_TO_ERROR: dict[int, type[BlockstoreError]] = {
    -1: InvalidArgument,
    -2: IOErrorBS,
    -3: NoSpace,
    -4: CorruptionError,
    -5: ChecksumMismatch,
    -6: FormatVersionError,
    -7: OutOfMemory,
    -8: NotFound,
    -9: TruncatedError,
}


def error_for_code(code: int, what: str, os_errno: int = 0) -> BlockstoreError:
    """Build the exception for a C error code, naming the operation and, if any, the OS error."""
    cls = CODE_TO_ERROR.get(code, BlockstoreError)
    detail = f"{what}: {cls.__name__}"
    if os_errno and not issubclass(cls, OSError) and _code_of_errno(os_errno) != code:
        # bs_last_errno is that of the thread's last failing OS call, not reset by a failure of another kind
        # (a checksum, a short file): named beside one, it was a stale errno ("ChecksumMismatch (EISDIR...)")
        os_errno = 0
    if os_errno:
        detail += f" ({_errno.errorcode.get(os_errno, os_errno)}: {_os_strerror(os_errno)})"
    err: BlockstoreError
    if issubclass(cls, OSError):
        err = cls(os_errno or _errno.EIO, detail)
    else:
        err = cls(detail)
    return err


def _code_of_errno(os_errno: int) -> int:
    """The C code bs_os_error (native/io.c) gives an errno."""
    if os_errno in (_errno.ENOSPC, _errno.EDQUOT):
        return -3
    return {_errno.ENOENT: -8, _errno.ENOMEM: -7, _errno.EINVAL: -1}.get(os_errno, -2)


def error_for_os(exc: OSError, what: str) -> BlockstoreError:
    """Translate an OSError from the pure-Python backend into the same hierarchy."""
    code = exc.errno or 0
    if code in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(code, f"{what}: NoSpace ({exc.strerror})")
    if code == _errno.ENOENT:
        return NotFound(f"{what}: NotFound ({exc.strerror})")
    # as bs_os_error (native/io.c) maps them: both backends raise the same class for the same errno
    if code == _errno.ENOMEM:
        return OutOfMemory(f"{what}: OutOfMemory ({exc.strerror})")
    if code == _errno.EINVAL:
        return InvalidArgument(f"{what}: InvalidArgument ({exc.strerror})")
    return IOErrorBS(code or _errno.EIO, f"{what}: IOErrorBS ({exc.strerror})")


def _os_strerror(code: int) -> str:
    return os.strerror(code)
