"""Fuzzing (fuzz/README.md): the seed corpus replays clean, each fixed finding has a named regression
test, and (slow) every target fuzzes for a short fixed time through the runner without a finding.

The long runs (each target >= 1 M executions, and the sanitizer build) are `python -m fuzz ...`
commands, not tests: fuzz/README.md gives them and their last results.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fuzz.run import TARGETS, missing_needs  # noqa: E402

FUZZ_SECONDS = int(os.environ.get("BLOCKSTORE_FUZZ_SECONDS", "8"))


def _target_or_skip(name: str):  # type: ignore[no-untyped-def]
    lacking = missing_needs(TARGETS[name])
    if lacking:
        pytest.skip(f"target {name} needs {', '.join(lacking)}")
    return importlib.import_module(f"fuzz.targets.{name}")


# ---- seeds and regression inputs: every file in fuzz/corpus/<target>/ passes the target's checks ----

@pytest.mark.parametrize("name", list(TARGETS))
def test_seed_corpus_replays_clean(name: str) -> None:
    target = _target_or_skip(name)
    seeds = os.path.join(ROOT, "fuzz", "corpus", name)
    files = sorted(os.listdir(seeds))
    assert files, f"no seeds in {seeds}"
    for f in files:
        with open(os.path.join(seeds, f), "rb") as fh:
            data = fh.read()
        target.test_one_input(data)  # raises on a finding


def test_seed_corpus_is_small() -> None:
    corpus = os.path.join(ROOT, "fuzz", "corpus")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(corpus) for f in fs)
    assert total < 200_000, f"committed seeds are {total} bytes; generate big ones with fuzz/make_corpus.py"


# ---- one named regression test per finding (the same inputs are regress-* seeds) ----

def test_regress_python_scan_refuses_end_before_start_like_the_c_core(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from blockstore.errors import InvalidArgument
    from blockstore.native import NativeBackend
    from blockstore.purepy import PythonBackend

    p = tmp_path / "b.blk"
    p.write_bytes(bytes(4096))
    fd = os.open(p, os.O_RDONLY)
    try:
        for backend in (NativeBackend(), PythonBackend()):
            with pytest.raises(InvalidArgument):
                backend.scan(fd, 4096, 0, False)
            with pytest.raises(InvalidArgument):
                backend.scan(fd, 4092, 8192, False)
    finally:
        os.close(fd)


@pytest.mark.parametrize("backend", ["native", "python"])
def test_regress_record_len_beyond_a_page_of_padding_is_corrupt_and_scan_never_overflows(backend: str,
                                                                                          tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A header with a valid checksum claiming record_len 2**63 made a scan whose end lay past the file
    (an untrusted data_end) pread at a negative offset: InvalidArgument from C, OverflowError from
    Python. record_len is the payload's end rounded up to 8 or 4096, so more padding is corrupt."""
    from blockstore.backend import get_backend
    from blockstore.errors import CorruptionError
    from blockstore.records import ScanStop
    from fuzz.fixups import fix_record_header

    b = get_backend(backend)
    head = bytearray(struct.pack("<4sBBHIIIIQQQQ", b"BSR1", 1, 1, 0, 1, 0, 72, 1, 8, 80, 1, 0) + bytes(8) + b"k")
    fix_record_header(head)
    assert b.decode_record(bytes(head)).record_len == 80
    for record_len in (80 + 4096, 1 << 63):
        head[32:40] = record_len.to_bytes(8, "little")
        fix_record_header(head)
        with pytest.raises(CorruptionError):
            b.decode_record(bytes(head))
    p = tmp_path / "b.blk"
    p.write_bytes(bytes(4096) + bytes(head).ljust(512, b"\0"))
    fd = os.open(p, os.O_RDONLY)
    try:
        res = b.scan(fd, 4096, (1 << 64) - 1, True)
    finally:
        os.close(fd)
    assert res.stop == ScanStop.INVALID and res.next_offset == 4096 and not res.records


def test_regress_directory_values_that_do_not_parse_are_corruption() -> None:
    from blockstore.directory import BlockEntry, Location
    from blockstore.errors import CorruptionError, FormatVersionError

    for raw in (b"", b"\x01" * 55, b"\x00" + bytes(55)):
        with pytest.raises(CorruptionError):
            Location.decode(raw)
    with pytest.raises(FormatVersionError):
        Location.decode(b"\x03" + bytes(55))  # version 2 is a location with copies (docs/copies.md)
    with pytest.raises(CorruptionError):
        Location.decode(b"\x02" + bytes(55))  # ...and one without its copy count is damage
    entry = struct.pack("<BBHIQQQQQQQQQQ", 1, 2, 0, 50, *([0] * 10))
    for raw in (b"", entry[:87], entry + b"short partition"):
        with pytest.raises(CorruptionError):
            BlockEntry.decode(1, raw)
    with pytest.raises(FormatVersionError):
        BlockEntry.decode(1, b"\x09" + entry[1:] + bytes(50))
    assert BlockEntry.decode(1, entry + bytes(50)).partition == bytes(50)


def test_regress_affinity_group_claiming_65535_keys_in_no_bytes_fails_fast() -> None:
    from blockstore.compaction.affinity import Group

    with pytest.raises(ValueError, match="ends inside its keys"):
        Group.decode(1, struct.pack("<BBHdQdQ", 2, 1, 65535, 1.0, 1, 0.0, 0))


def test_regress_manifest_store_id_must_be_a_u64_and_deep_json_is_corruption(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from blockstore.errors import CorruptionError
    from blockstore.manifest import load_manifest

    p = tmp_path / "MANIFEST.json"
    for body in (b'{"magic": "blockstore", "format_version": 1, "store_id": -1}',
                 b'{"magic": "blockstore", "format_version": 1, "store_id": 18446744073709551616}',
                 b"[" * 5000):
        p.write_bytes(body)
        with pytest.raises(CorruptionError):
            load_manifest(str(tmp_path))


@pytest.mark.parametrize("ts", ["-5", "Infinity", "18446744073709551616"])
def test_regress_chunk_meta_ts_ns_outside_u64_is_corruption_not_overflow(ts: str) -> None:
    from blockstore.chunks import _decode
    from blockstore.directory import Location
    from blockstore.errors import CorruptionError
    from blockstore.keys import SPACE_CHUNK, chunk_session_key, chunk_session_key_strict, encode_chunk_key, key_suffix
    from blockstore.records import Kind

    meta = b'{"user": "u", "session": "s", "chunk": "c", "ts_ns": ' + ts.encode() + b"}"
    if ts == "Infinity":
        with pytest.raises(CorruptionError):
            _decode(meta, b"text")
    key = encode_chunk_key(b"u", b"s", b"c")
    loc = Location(Kind.CHUNK, 0, 128, 1, 4096, 256, 4, 1, 0, meta)
    with pytest.raises(CorruptionError):
        chunk_session_key_strict(key_suffix(1, SPACE_CHUNK, key), loc)
    chunk_session_key(key_suffix(1, SPACE_CHUNK, key), loc)  # never raises


def test_regress_l2_cursor_with_deeply_nested_json_is_a_valueerror() -> None:
    l2 = pytest.importorskip("blockstore.connector.l2_keys")
    import base64

    with pytest.raises(ValueError, match="malformed list_l2_keys cursor"):
        l2.decode_cursor(l2.CURSOR_TAG + base64.urlsafe_b64encode(b"[" * 5000).decode())


@pytest.mark.parametrize("setting", [
    {"block_size": "\u00b2"},                 # str.isdigit() is True, int() refuses it
    {"block_size": "9" * 4400},               # more digits than int() converts
    {"path": "/kv/{worker_id[0]}"},           # TypeError inside str.format
    {"path": "/kv/{worker_id.real.x}"},       # AttributeError inside str.format
    {"compaction": "{" + '"a": [' * 1000},   # RecursionError inside json.loads
])
def test_regress_plugin_config_bad_values_raise_its_error_class(setting: dict[str, str]) -> None:
    rp = pytest.importorskip("blockstore.connector.remote_plugin")
    extra = {f"remote_storage_plugin.blockstore.{k}": v for k, v in {"path": "/kv", **setting}.items()}
    with pytest.raises(rp.BlockstorePluginConfigError):
        rp.BlockstorePluginConfig.from_extra_config(extra, "blockstore")


# ---- the runner, for a short fixed time per target (slow: about 2-3 minutes in all) ----

def _run_fuzz(tmp_path, *args: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "fuzz", *args, "--summary", str(summary)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert summary.exists(), proc.stdout + proc.stderr
    doc = json.loads(summary.read_text())
    for r in doc["results"]:
        if r["status"] != "skipped":
            log = ""
            if r.get("log"):
                with open(os.path.join(ROOT, r["log"]), errors="replace") as f:
                    log = f.read()[-4000:]
            assert r["status"] == "ok" and r["crashes"] == 0, f"{r}\n{log}"
            assert r["executions"] > 0, r
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return doc


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_short_run_finds_nothing(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is in the dev extra; this runs where it is installed")
    _target_or_skip(name)
    _run_fuzz(tmp_path, "--target", name, "--seconds", str(FUZZ_SECONDS))


@pytest.mark.slow
def test_fuzz_sanitized_c_core_short_run_finds_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The C parsers under ASan + UBSan (the sanitized build, gcc's runtime preloaded)."""
    gcc = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
    if gcc.returncode != 0 or not os.path.exists(os.path.realpath(gcc.stdout.strip())):
        pytest.skip("gcc's AddressSanitizer runtime (libasan) is not installed")
    doc = _run_fuzz(tmp_path, "--target", "record_header,block_footer,block_scan", "--seconds", "5", "--sanitize")
    assert all(r["sanitize"] for r in doc["results"])
