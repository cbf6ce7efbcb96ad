"""Block footer parsing (docs/format.md §2.3): `decode_footer` of the C core and of the Python twin.

Input: one control byte, then the bytes read where a footer should be (normally the file's last 64).
Control bit 0: recompute the frame checksum first, so mutated versions and fields reach the checks
after it.

Contract, for both backends: a Footer or CorruptionError (TruncatedError, ChecksumMismatch,
FormatVersionError included); both agree on every input; a Footer has version 1 and re-encodes to
exactly the 64 bytes it came from (every field of the frame is decoded).
"""

from __future__ import annotations

import sys

from fuzz import fixups, harness

with harness.instrumented(__name__):
    from blockstore.errors import CorruptionError
    from blockstore.native import NativeBackend
    from blockstore.purepy import PythonBackend
    from blockstore.records import FORMAT_VERSION

NATIVE = NativeBackend()
PYTHON = PythonBackend()
FIX_CHECKSUM = 1


def test_one_input(data: bytes) -> None:
    ctl, body = harness.split_control(data)
    buf = bytearray(body)
    if ctl & FIX_CHECKSUM:
        fixups.fix_frame(buf)
    raw = bytes(buf)
    got_c = harness.decode_both(NATIVE, PYTHON, "decode_footer", raw, CorruptionError)
    if got_c is None:
        return
    assert got_c.format_version == FORMAT_VERSION, got_c
    assert NATIVE.encode_footer(got_c) == raw[:64] == PYTHON.encode_footer(got_c), "re-encoded footer differs"


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
