"""Session 27's review: configuration surfaces fed wrong types and out-of-range values, the CLI under
misuse, and close racing background work. Each test failed on the code before its fix."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import blockstore


@pytest.mark.parametrize("value", [float("inf"), 10**400])
def test_open_refuses_an_unbounded_idle_seal_seconds(tmp_path: Path, value: float) -> None:
    # Before: open accepted inf, and then every put raised OverflowError (outside BlockstoreError) from the
    # placement's idle cutoff: a store that could not take a single write.
    with pytest.raises(blockstore.InvalidArgument, match="idle_seal_seconds"):
        blockstore.open(tmp_path / "s", idle_seal_seconds=value)
    assert not (tmp_path / "s").exists()


def test_a_large_finite_idle_seal_seconds_still_writes(tmp_path: Path) -> None:
    with blockstore.open(tmp_path / "s", idle_seal_seconds=1e9) as s:
        s.put(b"k", b"v")
        assert s.get(b"k") == b"v"


BLEND_BAD = [
    ("blend.min_chunk_tokens", 0),  # before: accepted, then find_chunk_spans raised in the scheduler at each prompt
    ("blend.min_chunk_tokens", -4),
    ("blend.min_reused_tokens", -1),  # before: accepted; every prompt with any stored chunk was claimed
    ("blend.check_layer", 1.7),  # before: silently int() -> 1
    ("blend.check_layer", "abc"),  # before: a bare ValueError without the key
    ("blend.sink_tokens", None),  # before: TypeError
    ("blend.ratio", "abc"),  # before: ValueError "could not convert string to float"
    ("blend.ratio", [0.1]),  # before: TypeError
    ("blend.gradual", float("nan")),  # before: accepted (nan < 1 is False)
    ("blend.gradual", float("inf")),
    ("blend.separator_ids", "128000"),  # before: (1, 2, 8, 0, 0, 0): no prompt ever matched, silently
    ("blend.separator_ids", 5),  # before: TypeError 'int' object is not iterable
    ("blend.separator_ids", [7, -1]),
    ("blend.namespace", 5),  # before: str(5)
    ("blend.store_path", 5),
]


@pytest.mark.parametrize(("key", "value"), BLEND_BAD, ids=[f"{k}={v!r}" for k, v in BLEND_BAD])
def test_blend_settings_refuse_bad_values_naming_the_key(tmp_path: Path, key: str, value: object) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from blockstore.connector.blend_connector import BlendSettings

    base = {"blend.store_path": str(tmp_path / "kv"), "blend.separator_ids": [7, 7]}
    with pytest.raises(blockstore.InvalidArgument, match=key.replace(".", r"\.")):
        BlendSettings.from_extra_config({**base, key: value}, str(tmp_path))


def test_blend_settings_keep_accepting_good_values(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("vllm")
    from blockstore.connector.blend_connector import BlendSettings

    base = {"blend.store_path": str(tmp_path / "kv"), "blend.separator_ids": (7, 8)}
    s = BlendSettings.from_extra_config({**base, "blend.ratio": 1, "blend.check_layer": "2", "blend.gradual": 100,
                                         "blend.min_chunk_tokens": 1, "blend.min_reused_tokens": 0}, str(tmp_path))
    assert (s.separator_ids, s.ratio, s.check_layer, s.gradual, s.min_chunk_tokens) == ((7, 8), 1.0, 2, 100.0, 1)


def _memory_objects() -> Any:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_remote_tier_memory import MemoryObjects

    return MemoryObjects


def test_remote_tier_survives_more_than_1024_failed_uploads_in_a_row(tmp_path: Path) -> None:
    # Before: the backoff computed retry_min_s * 2 ** (failures - 1); at 1025 failures in a row (under 3 hours of
    # an unreachable bucket at the default 10 s cap) that overflowed a float, the tier's thread died of
    # OverflowError, and nothing was uploaded again until a restart, even once the bucket came back.
    from blockstore.remote import RemoteTier
    from blockstore.remote.errors import RemoteUnavailable

    class FlakyObjects(_memory_objects()):  # type: ignore[misc]
        down = True

        def put(self, key: str, data: bytes) -> None:
            if self.down:
                raise RemoteUnavailable("bucket down")
            super().put(key, data)

    objects = FlakyObjects()
    with blockstore.open(tmp_path / "s", block_size=1 << 16) as s:
        tier = RemoteTier(s, objects, "n1", retry_min_s=1e-6, retry_max_s=1e-6)
        try:
            for i in range(100):
                s.put(b"k%d" % i, b"x" * 1000)
            s.seal_open_blocks()
            deadline = time.monotonic() + 60
            while tier.status().failures_in_a_row < 1100 and tier.status().running:
                assert time.monotonic() < deadline, "the tier did not fail 1100 times in 60 s"
                time.sleep(0.01)
            objects.down = False
            assert tier.drain(30), tier.status()
            assert tier.status().running
        finally:
            tier.close(drain=False)


@pytest.mark.parametrize("kw", [{"poll_s": float("inf")}, {"poll_s": float("nan")}, {"poll_s": "5"},
                                {"retry_min_s": "1"}, {"retry_max_s": 10**400}, {"retry_min_s": 2, "retry_max_s": 1}])
def test_remote_tier_refuses_unusable_timings(tmp_path: Path, kw: dict[str, Any]) -> None:
    # Before: poll_s inf or 10**400 was accepted and the tier's thread died at its first wait (OverflowError),
    # silently (status().running False, nothing uploaded); nan was accepted; a str raised TypeError.
    from blockstore.remote import RemoteTier

    with blockstore.open(tmp_path / "s") as s:
        with pytest.raises(blockstore.InvalidArgument, match=next(iter(kw)).split("_s")[0]):
            RemoteTier(s, _memory_objects()(), "n1", **kw)


def test_remote_tier_thread_outlives_a_failed_ledger_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: rocksdict raises a bare Exception (a ledger write on a full disk: "IO error: No space left on
    # device"); it went through the tier's `except BlockstoreError` and killed its thread: nothing was uploaded
    # (nor any local copy dropped under local_capacity_bytes) again until a restart.
    from blockstore.remote import RemoteTier
    from blockstore.remote.ledger import Ledger

    real = Ledger.reserve_many
    fails = {"left": 3}

    def flaky(self: Ledger, seqs: dict[int, int], next_seq: int) -> None:
        if fails["left"]:
            fails["left"] -= 1
            raise Exception("IO error: No space left on device")  # what rocksdict raises
        real(self, seqs, next_seq)

    monkeypatch.setattr(Ledger, "reserve_many", flaky)
    with blockstore.open(tmp_path / "s", block_size=1 << 16) as s:
        tier = RemoteTier(s, _memory_objects()(), "n1", retry_min_s=0.01, retry_max_s=0.05)
        try:
            for i in range(100):
                s.put(b"k%d" % i, b"x" * 1000)
            assert tier.drain(30), tier.status()
            assert tier.status().running and fails["left"] == 0
        finally:
            tier.close(drain=False)


def test_remote_tier_ledger_under_a_file_is_a_blockstore_error(tmp_path: Path) -> None:
    # Before: a bare `Exception: ... Not a directory (os error 20)` from rocksdict.
    from blockstore.remote import RemoteTier

    (tmp_path / "file").write_bytes(b"x")
    with blockstore.open(tmp_path / "s") as s:
        with pytest.raises(blockstore.BlockstoreError, match="ledger"):
            RemoteTier(s, _memory_objects()(), "n1", ledger_path=str(tmp_path / "file" / "ledger"))


@pytest.mark.parametrize("spec", [{"policy": "full", "background": "false"}, {"policy": "full", "background": 0},
                                  {"policy": {"policy": "aggressive"}}, {"policy": {}}])
def test_compaction_spec_refuses_a_background_that_is_not_a_bool_and_a_nested_policy(tmp_path: Path,
                                                                                      spec: dict[str, Any]) -> None:
    # Before: background went through bool(), so "false" started the background thread; a dict as "policy" was
    # resolved as a spec of its own (its knobs applied, or 'full' for {}), silently.
    with pytest.raises(blockstore.InvalidArgument, match="background|policy"):
        blockstore.open(tmp_path / "s", compaction=spec)


def test_a_store_on_a_read_only_file_system_reads_and_checks(tmp_path: Path) -> None:
    # Before: rocksdict rewrites its rocksdict-config.json at every open, read-only ones too, so a store on a
    # read-only mount (a snapshot, a backup) could not be opened read_only=True, `blockstore get/scan/stats`
    # failed, and `blockstore fsck` reported the intact directory as "cannot be opened" (exit 4).
    from test_enospc import mounted_tmpfs

    from blockstore.tools.cli import main

    with mounted_tmpfs(tmp_path / "mnt", "16m") as mnt:
        path = mnt / "s"
        with blockstore.open(path) as s:
            s.put_many([(b"k%d" % i, b"v%d" % i) for i in range(100)])
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with blockstore.open(path, read_only=True) as s:
            assert [bytes(v) for v in s.get_many([b"k0", b"k99"])] == [b"v0", b"v99"]
        assert main(["fsck", "--quiet", str(path)]) == 0
        with pytest.raises(blockstore.BlockstoreError):
            blockstore.open(path)  # a writer: a clear error, not a silent read-only store


def test_ctrl_c_in_a_command_is_one_line_and_exit_8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # Before: Ctrl-C during `blockstore fsck --repair` or `compact` printed a Python traceback and the process
    # died of SIGINT (status -2 / 130), outside the documented exit codes.
    from blockstore.tools.cli import main

    with blockstore.open(tmp_path / "s") as s:
        s.put(b"k", b"v")

    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(blockstore.Store, "stats", interrupted)
    assert main(["stats", str(tmp_path / "s")]) == 8
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    # a read-only command changed nothing: no advice to run it again to finish (H58)
    assert "run it again" not in err


def test_ctrl_c_in_fsck_repair_says_to_run_it_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from blockstore.tools import cli_fsck
    from blockstore.tools.cli import main

    with blockstore.open(tmp_path / "s") as s:
        s.put(b"k", b"v")

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_fsck, "repair", interrupted)
    assert main(["fsck", "--repair", str(tmp_path / "s")]) == 8
    err = capsys.readouterr().err
    assert "interrupted; run it again to finish" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["file", "file/below"])
def test_bench_dir_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   where: str) -> None:
    # Before: `python -m bench.throughput --dir FILE` started, then died of a FileExistsError traceback.
    import argparse

    from bench.common import standard_args

    (tmp_path / "file").write_bytes(b"x")
    ap = argparse.ArgumentParser()
    standard_args(ap, "x")
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(["--dir", str(tmp_path / where)])
    assert exc.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert ap.parse_args(["--dir", str(tmp_path / "new" / "deeper")]).dir == str(tmp_path / "new" / "deeper")


def test_a_path_that_is_not_utf8_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    # Before: open made blocks/ and then failed in rocksdict with an IOErrorBS "[Errno 5] ... can't encode
    # character '\udcff'": an I/O error that was none, and a half-made store left behind.
    path = os.path.join(os.fsdecode(bytes(tmp_path)), os.fsdecode(b"\xffstore"))
    with pytest.raises(blockstore.InvalidArgument, match="UTF-8"):
        blockstore.open(path)
    assert not os.path.lexists(path)


S3_BAD = [("endpoint", "127.0.0.1:9000"), ("endpoint", "http://"), ("endpoint", 5), ("bucket", "a b"), ("bucket", ""),
          ("timeout_s", "30"), ("timeout_s", float("inf")), ("timeout_s", -1), ("retries", -1), ("retries", "3"),
          ("secret_key", None)]


@pytest.mark.parametrize("client", ["obstore", "boto3"])
@pytest.mark.parametrize(("field", "value"), S3_BAD, ids=[f"{f}={v!r}" for f, v in S3_BAD])
def test_s3_settings_a_client_cannot_use_are_refused_naming_the_field(client: str, field: str, value: Any) -> None:
    # Before: accepted; an endpoint without a scheme or a bucket with a space made obstore panic at the first
    # request (pyo3's PanicException is a BaseException: it ended the remote tier's upload thread); the others
    # raised TypeError/OverflowError/ValueError/botocore errors from inside the clients.
    pytest.importorskip("obstore")
    from blockstore.remote.errors import RemoteError
    from blockstore.remote.objects import S3Settings, make_object_store

    good = {"endpoint": "http://127.0.0.1:1", "bucket": "b", "access_key": "a", "secret_key": "s"}
    with pytest.raises(RemoteError, match=field) as exc:
        make_object_store(S3Settings(**{**good, field: value}), client)
    assert "'s'" not in str(exc.value)  # the secret is never shown
    make_object_store(S3Settings(**good), client)


def test_restore_command_with_an_unusable_endpoint_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: make_object_store ran outside the command's error handling (with the settings check of this session,
    # a RemoteError traceback; before that check, obstore's panic at the first request).
    pytest.importorskip("obstore")
    from blockstore.remote.restore import main

    rc = main(["--endpoint", "127.0.0.1:8333", "--bucket", "b", "--access-key", "a", "--secret-key", "s",
               "--node", "n1", "--target", "/nonexistent/never-made"])
    assert rc == 8  # an operational error, as the blockstore command's (2 before session 28)
    assert "restore failed: S3 settings: endpoint" in capsys.readouterr().err


def test_a_bad_backend_from_the_environment_names_the_variable(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "unknown backend 'bogus'" to a caller (or a `blockstore` command) that passed no backend at all.
    monkeypatch.setenv("BLOCKSTORE_BACKEND", "bogus")
    with pytest.raises(blockstore.InvalidArgument, match=r"\$BLOCKSTORE_BACKEND"):
        blockstore.open(tmp_path / "s")
    with pytest.raises(blockstore.InvalidArgument, match="from backend="):
        blockstore.open(tmp_path / "s", backend="other")


def test_bench_policy_knob_takes_a_word_and_names_a_bad_value() -> None:
    # Before: NAME:KNOB=VALUE ran json.loads on the value, so `full:copy_to=stream` (the knob's documented value)
    # failed with "Expecting value: line 1 column 1 (char 0)", and so did `full:min_hits=abc`, naming nothing.
    from bench.compaction import policy_spec
    from blockstore.compaction.policy import resolve

    assert resolve(policy_spec("full:copy_to=stream")).copy_to == "stream"
    with pytest.raises(blockstore.InvalidArgument, match="min_hits"):
        resolve(policy_spec("full:min_hits=abc"))


@pytest.mark.parametrize("args", [["--runs", "-5"], ["--runs", "0"], ["--seconds", "nan"], ["--seconds", "inf"],
                                  ["--seconds", "-1"], ["--reproduce", "/"]])
def test_fuzz_runner_refuses_counts_that_never_end_or_crash(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Before: --runs -5 became libFuzzer's -runs=-5 ("forever"), --seconds nan/inf raised a traceback once the
    # run had started, and --reproduce DIR fuzzed from that folder as a corpus, never ending.
    from fuzz.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--target", "manifest", *args])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_l2_config_lock_ttl_too_large_for_a_float_names_the_key() -> None:
    # Before: a bare OverflowError from float(ttl) (JSON carries such an int), outside BlockstoreError.
    pytest.importorskip("lmcache")
    from blockstore.connector.l2_adapter import BlockstoreL2AdapterConfig

    with pytest.raises(blockstore.InvalidArgument, match="lock_ttl_s"):
        BlockstoreL2AdapterConfig.from_dict({"path": "/tmp/x", "lock_ttl_s": 10**400})
    assert BlockstoreL2AdapterConfig.from_dict({"path": "/tmp/x", "lock_ttl_s": float("inf")}).lock_ttl_s == math.inf


def test_l2_config_refuses_a_compaction_background_that_is_not_a_bool() -> None:
    # Before: accepted by the validator; at start, bool("no") ran the background compactor it meant to stop (the
    # engine refuses it since ca6fc25, but only once the adapter opens its store).
    pytest.importorskip("lmcache")
    from blockstore.connector.l2_adapter import BlockstoreL2AdapterConfig

    with pytest.raises(blockstore.InvalidArgument, match="background"):
        BlockstoreL2AdapterConfig.from_dict({"path": "/tmp/x", "compaction": {"policy": "full", "background": "no"}})


REMOTE_BAD = [("poll_interval_s", float("inf")), ("seal_after_s", float("inf")), ("upload_interval_s", 10**400),
              ("timeout_s", float("inf")), ("retries", 10**6), ("gc_grace_s", "x"), ("gc_grace_s", -1),
              ("local_capacity_bytes", "1G"), ("client", "s3cmd")]


@pytest.mark.parametrize(("key", "value"), REMOTE_BAD, ids=[f"{k}={v!r}"[:40] for k, v in REMOTE_BAD])
def test_l2_remote_config_refuses_values_that_fail_later(key: str, value: Any) -> None:
    # Before: accepted. poll_interval_s inf killed the pool thread at its first wait (OverflowError): no polling,
    # no idle sealing, stored KV never uploaded; gc_grace_s "x" raised TypeError from the Reclaimer at start; the
    # others failed at start inside RemoteTier or the S3 client instead of naming the key.
    pytest.importorskip("lmcache")
    from blockstore.connector.remote_tier import RemoteTierConfig

    base = {"endpoint": "http://127.0.0.1:8333", "bucket": "b", "access_key": "a", "secret_key": "s", "node_id": "n1"}
    with pytest.raises(blockstore.InvalidArgument, match=key):
        RemoteTierConfig.from_dict({**base, key: value})
    RemoteTierConfig.from_dict(base)


def test_remote_plugin_refuses_a_compaction_background_that_is_not_a_bool() -> None:
    # Before: accepted; the store's open then refused it with InvalidArgument, which LMCache retries every 10 s
    # (only BlockstorePluginConfigError is irrecoverable for it).
    pytest.importorskip("lmcache")
    from blockstore.connector.remote_plugin import BlockstorePluginConfig, BlockstorePluginConfigError

    p = "remote_storage_plugin.blockstore."
    with pytest.raises(BlockstorePluginConfigError, match="background"):
        BlockstorePluginConfig.from_extra_config({p + "path": "/tmp/x", p + "compaction": '{"policy": "full", '
                                                  '"background": "no"}'}, "blockstore")


def test_remote_tier_closed_after_its_store_still_releases_its_ledger(tmp_path: Path) -> None:
    # Before: tier.close() after the store's close (the natural order with a `with blockstore.open(...)` block)
    # raised StoreClosed from its drain, leaving the tier's thread running and its ledger open: a tier for the
    # reopened store could not open the ledger again in this process ("lock hold by current process").
    from blockstore.remote import RemoteTier

    objects = _memory_objects()()
    with blockstore.open(tmp_path / "s", block_size=1 << 16) as s:
        tier = RemoteTier(s, objects, "n1")
        for i in range(50):
            s.put(b"k%d" % i, b"v" * 2000)
    assert tier.close() in (True, False)
    assert not tier._thread.is_alive()
    with blockstore.open(tmp_path / "s") as s:
        again = RemoteTier(s, objects, "n1")
        try:
            assert again.drain(30) and not again.status().pending_blocks
        finally:
            again.close()


def test_a_remote_wait_ends_when_the_store_is_closed(tmp_path: Path) -> None:
    # Before: store.close() returned at once, but a durability="remote" put waiting for its block's confirmation
    # slept out the whole remote_timeout (30 s by default) before raising RemoteNotConfirmed.
    import threading

    from blockstore.remote import RemoteTier

    class SlowObjects(_memory_objects()):  # type: ignore[misc]
        def put(self, key: str, data: bytes) -> None:
            time.sleep(1.5)
            super().put(key, data)

    s = blockstore.open(tmp_path / "s", durability="remote", block_size=1 << 16, remote_timeout=60)
    tier = RemoteTier(s, SlowObjects(), "n1")
    got: list[BaseException | None] = []

    def write() -> None:
        try:
            s.put(b"k", b"v" * 100)
            got.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the writer saw is the assertion
            got.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5)
    s.close()
    writer.join(10)
    tier.close(drain=False)
    assert not writer.is_alive(), "the waiting put outlived its store's close by 10 s"
    assert got and (got[0] is None or isinstance(got[0], blockstore.RemoteNotConfirmed)), got
    with blockstore.open(tmp_path / "s", read_only=True) as s:
        assert s.get(b"k") == b"v" * 100  # durable locally either way


def test_remote_tier_status_after_close_is_store_closed(tmp_path: Path) -> None:
    # Before: rocksdict.DbClosedError ("DB instance already closed"), outside BlockstoreError, for a monitor that
    # asks a closed tier for its status.
    from blockstore.remote import RemoteTier

    with blockstore.open(tmp_path / "s") as s:
        tier = RemoteTier(s, _memory_objects()(), "n1")
        tier.close()
        with pytest.raises(blockstore.StoreClosed, match="remote tier is closed"):
            tier.status()


def test_restore_command_usage_errors_exit_16_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    # Before (session 28): argparse's own exit code 2, the one an operational error also gave; the blockstore
    # command uses 16 for usage and 8 for operational errors (README, "Exit codes").
    from blockstore.remote.restore import main

    assert main(["--bucket", "b"]) == 16  # --endpoint, --node, --target missing
    assert "usage:" in capsys.readouterr().err
    assert main(["--endpoint", "http://127.0.0.1:1", "--bucket", "b", "--node", "n", "--target", "t",
                 "--access-key", "", "--secret-key", ""]) == 16  # no credentials
    assert "credentials" in capsys.readouterr().err
    assert main(["--help"]) == 0
