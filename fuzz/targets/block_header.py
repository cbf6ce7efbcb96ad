"""Block header parsing (docs/format.md §2.1): `decode_block_header` of the C core and the Python twin.

Input: one control byte, then the bytes at the start of a block file. Control bit 0: recompute the
frame checksum first.

Contract, for both backends: a BlockHeader or CorruptionError (TruncatedError, ChecksumMismatch,
FormatVersionError included); both agree on every input; a BlockHeader has version 1, and encoding it
and decoding the result gives it back (the reserved field [48, 56) is not decoded, so the bytes may
differ there).
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
    got_c = harness.decode_both(NATIVE, PYTHON, "decode_block_header", raw, CorruptionError)
    if got_c is None:
        return
    assert got_c.format_version == FORMAT_VERSION, got_c
    again = NATIVE.encode_block_header(got_c)
    assert again == PYTHON.encode_block_header(got_c), "the backends encode differently"
    assert again[:48] == raw[:48], "re-encoded header differs"
    assert NATIVE.decode_block_header(again) == got_c


if __name__ == "__main__":
    harness.main(test_one_input, sys.argv)
