"""The Python side's copies of the C core's facts agree with native/blockstore.h.

records.py repeats the format constants (the pure-Python backend needs them without the C core),
errors.py maps the BS_E* codes to exception classes, and native/build_native.py's cdef repeats the
header's prototypes. Each copy is checked here against the header itself, so a change on one side
that is not made on the other fails the suite instead of corrupting data.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from blockstore import errors, records

ROOT = Path(__file__).resolve().parent.parent
HEADER = (ROOT / "native" / "blockstore.h").read_text()


def _defines() -> dict[str, int]:
    out = {}
    for name, value in re.findall(r"^#define\s+(BS_[A-Z0-9_]+)\s+(-?(?:0x[0-9A-Fa-f]+|\d+))(?:ull|u|ULL)?\b",
                                  HEADER, re.M):
        out[name] = int(value, 0)
    return out


DEFINES = _defines()


@pytest.mark.parametrize(("py_name", "c_name"), [
    ("FORMAT_VERSION", "BS_FORMAT_VERSION"),
    ("BLOCK_HEADER_SIZE", "BS_BLOCK_HEADER_SIZE"),
    ("RECORD_HEADER_SIZE", "BS_RECORD_HEADER_SIZE"),
    ("FOOTER_SIZE", "BS_FOOTER_SIZE"),
    ("PAGE", "BS_PAGE"),
    ("MAX_KEY", "BS_MAX_KEY"),
    ("MAX_META", "BS_MAX_META"),
    ("MAX_PAYLOAD", "BS_MAX_PAYLOAD"),
    ("REC_ALIGNED", "BS_REC_ALIGNED"),
])
def test_format_constants_match_the_header(py_name: str, c_name: str) -> None:
    assert getattr(records, py_name) == DEFINES[c_name]


def test_record_kinds_match_the_header() -> None:
    assert {k.name: int(k) for k in records.Kind} == {
        n[len("BS_KIND_"):]: v for n, v in DEFINES.items() if n.startswith("BS_KIND_")}


def test_every_error_code_maps_to_its_class() -> None:
    names = {
        "BS_EINVAL": errors.InvalidArgument, "BS_EIO": errors.IOErrorBS, "BS_ENOSPC": errors.NoSpace,
        "BS_ECORRUPT": errors.CorruptionError, "BS_ECHECKSUM": errors.ChecksumMismatch,
        "BS_EVERSION": errors.FormatVersionError, "BS_ENOMEM": errors.OutOfMemory, "BS_ENOENT": errors.NotFound,
        "BS_ETRUNCATED": errors.TruncatedError,
    }
    codes = {n: v for n, v in DEFINES.items() if re.fullmatch(r"BS_E[A-Z]+", n)}
    assert set(codes) == set(names), "a BS_E* code was added or removed: map it in errors.CODE_TO_ERROR"
    for name, cls in names.items():
        assert errors.CODE_TO_ERROR[codes[name]] is cls, name


def test_compiled_constants_match_the_python_copies() -> None:
    native = pytest.importorskip("blockstore.native", reason="C core not built")
    lib = native.lib
    for name, value in DEFINES.items():
        if hasattr(lib, name):
            assert getattr(lib, name) == value, name


def _prototypes(text: str) -> dict[str, str]:
    """Function name -> normalized declaration, for every `bs_*(...)` prototype in C text."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    out = {}
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?\b(bs_\w+)\s*\([^;{]*\))\s*;", text):
        out[m.group(2)] = re.sub(r"\s+", " ", m.group(1)).replace("( ", "(").replace(" )", ")").strip()
    return out


def test_cdef_prototypes_are_the_headers() -> None:
    build = (ROOT / "native" / "build_native.py").read_text()
    cdef = re.search(r'CDEF = """(.*?)"""', build, re.S)
    assert cdef is not None
    in_cdef, in_header = _prototypes(cdef.group(1)), _prototypes(HEADER)
    assert in_cdef, "no prototype found in the cdef"
    missing = sorted(set(in_cdef) - set(in_header))
    assert not missing, f"the cdef declares functions the header does not: {missing}"
    for name, decl in in_cdef.items():
        assert decl == in_header[name], f"{name}: cdef {decl!r} != header {in_header[name]!r}"


@pytest.mark.parametrize(("os_errno", "code"), [
    ("ENOSPC", "BS_ENOSPC"), ("EDQUOT", "BS_ENOSPC"), ("ENOENT", "BS_ENOENT"), ("ENOMEM", "BS_ENOMEM"),
    ("EINVAL", "BS_EINVAL"), ("EIO", "BS_EIO"), ("EACCES", "BS_EIO"),
])
def test_both_backends_map_an_os_error_to_the_same_class(os_errno: str, code: str) -> None:
    """native/io.c's bs_os_error and errors.error_for_os (the Python backend) agree errno by errno."""
    n = getattr(errno, os_errno)
    from_c = errors.error_for_code(DEFINES[code], "op", n)
    from_python = errors.error_for_os(OSError(n, os.strerror(n)), "op")
    assert type(from_python) is type(from_c), f"{os_errno}: C {type(from_c).__name__}, Python {type(from_python).__name__}"
