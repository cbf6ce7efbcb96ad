"""Outside examination of session 28 (H62): damage to the files a store owns that earlier reviews did not try
(links where block files belong, lost+found that is not a folder), and what the messages say. Each test is a
finding that failed on the HEAD it was found on."""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import blockstore
from blockstore.errors import ChecksumMismatch, IOErrorBS
from blockstore.tools import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_review_session26 import make_store  # noqa: E402  (a closed sync store of sealed blocks)


def second_block(store: Path) -> Path:
    return sorted((store / "blocks").glob("*.blk"))[1]


def keys_in(store: Path, block: Path) -> set[bytes]:
    bid = int(block.name.split(".")[0], 16)
    with blockstore.open(store, read_only=True) as s:
        return {key for key, loc in s.iter_locations() if loc.block_id == bid}


def flip_payload_byte(block: Path) -> None:
    with open(block, "r+b") as f:
        f.seek(8192 + 100)  # inside the first record's payload (5000 bytes: aligned, after its header page)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def read_all(store: Path, acked: dict[bytes, bytes]) -> dict[bytes, bytes | None]:
    with blockstore.open(store, read_only=True) as s:
        return {key: (None if (v := s.get(key)) is None else bytes(v)) for key in acked}


def test_a_dangling_link_where_a_block_file_belongs_is_repaired(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    """A block file replaced by a symbolic link to a missing file: fsck called it 'vanished during the check';
    `--repair` dropped the block's entries, then stopped with exit 8 ('open ...: NotFound') when it synced the
    block files, leaving the store unclean with a block file name the directory no longer named, so the engine
    refused to open it ('the directory lost writes') and every further repair stopped the same way. Now fsck
    names the link, repair moves it to lost+found, and the store opens with every other key."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = second_block(store)
    lost = keys_in(store, victim)
    assert lost
    victim.unlink()
    victim.symlink_to(tmp_path / "no-such-file")
    assert cli.main(["fsck", str(store)]) == 4
    assert "symbolic link" in capsys.readouterr().out
    assert cli.main(["fsck", "--repair", str(store)]) == 1
    capsys.readouterr()
    assert cli.main(["fsck", str(store)]) == 0
    assert os.path.islink(store / "lost+found" / victim.name)
    with blockstore.open(store) as s:  # a writable open: the engine takes the store again
        for key, value in acked.items():
            got = s.get(key)
            assert (got is None) if key in lost else (got is not None and bytes(got) == value), key


def test_repair_with_a_file_where_lost_found_belongs_changes_nothing(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """STORE/lost+found is a file and a block has a damaged payload: `--repair` evacuated the block (its
    directory batch, which stops naming the block, synced) and then failed to move the file ('[Errno 17] File
    exists'), leaving a store the engine refused to open (a block file the directory does not name) and that
    no repair could fix while the file stayed. Now repair refuses first, naming lost+found, and changes
    nothing: the store opens and reads as before."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = second_block(store)
    flip_payload_byte(victim)
    (store / "lost+found").write_bytes(b"someone's notes")
    before = {p.name: p.read_bytes() for p in (store / "blocks").iterdir()}
    assert cli.main(["fsck", "--repair", str(store)]) == 8
    err = capsys.readouterr().err
    assert "lost+found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in (store / "blocks").iterdir()} == before
    assert (store / "lost+found").read_bytes() == b"someone's notes"
    with blockstore.open(store) as s:  # writable: not refused as a directory that lost writes
        damaged = 0
        for key, value in acked.items():
            try:
                got = s.get(key)
            except ChecksumMismatch:
                damaged += 1
                continue
            assert got is not None and bytes(got) == value, key
        assert damaged == 1
    (store / "lost+found").unlink()
    assert cli.main(["fsck", "--repair", str(store)]) == 1
    assert cli.main(["fsck", str(store)]) == 0


def test_a_checksum_error_does_not_name_an_earlier_os_error(tmp_path: Path) -> None:
    """A read that failed with EISDIR (a folder where a block file belongs), then on the same thread a read whose
    payload fails its checksum: the ChecksumMismatch said 'ChecksumMismatch (EISDIR: Is a directory)', the
    errno of the earlier failure (bs_last_errno is not reset by a failure that is not the OS's). Now an errno
    is named only beside the error it caused."""
    store = tmp_path / "s"
    acked = make_store(store)
    blocks = sorted((store / "blocks").glob("*.blk"))
    folder, damaged = blocks[1], blocks[2]
    folder_keys, damaged_keys = keys_in(store, folder), keys_in(store, damaged)
    kept = folder.read_bytes()
    folder.unlink()
    folder.mkdir()
    flip_payload_byte(damaged)
    with blockstore.open(store, read_only=True) as s:
        with pytest.raises(IOErrorBS, match="EISDIR"):
            s.get(min(folder_keys))
        with pytest.raises(ChecksumMismatch) as caught:
            s.get_many(sorted(damaged_keys))
    assert "EISDIR" not in str(caught.value) and "Is a directory" not in str(caught.value), caught.value
    folder.rmdir()
    folder.write_bytes(kept)
    got = read_all(store, {k: v for k, v in acked.items() if k not in damaged_keys})
    assert all(got[k] == acked[k] for k in got)


def test_a_damaged_rocksdict_config_does_not_make_the_directory_unreadable(tmp_path: Path) -> None:
    """directory/rocksdict-config.json (rocksdict's own file: raw_mode, prefix extractors) with raw_mode turned
    false: the first open failed with 'rocksdict: does not match existing comparator' (IOErrorBS, naming no
    repair), and a first `fsck --repair` called the directory unreadable, moved it to lost+found and rebuilt it
    from the blocks; the file is derived from blockstore's options and rocksdict rewrites it as it opens. Now
    the open reads every record and fsck finds nothing."""
    store = tmp_path / "s"
    acked = make_store(store)
    config = store / "directory" / "rocksdict-config.json"

    def damage() -> None:
        settings = json.loads(config.read_text())
        settings["raw_mode"] = False
        config.write_text(json.dumps(settings))

    damage()
    assert read_all(store, acked) == acked
    damage()
    assert cli.main(["fsck", "--repair", str(store)]) == 0
    assert not (store / "lost+found").exists()


def test_repair_of_a_block_file_with_a_huge_sparse_tail_keeps_it_without_reading_it_whole(tmp_path: Path) -> None:
    """A sealed block file extended by 16 GiB of hole (truncate -s): fsck found the footer invalid, and
    `--repair` read the 16 GiB after the data end into memory to save it to lost+found: MemoryError, a
    traceback and exit status 1 (fsck's 'corrected'). Now the bytes are copied a piece at a time, holes kept as
    holes, and the repair finishes (run here with its address space capped at 3 GiB)."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = second_block(store)
    size = victim.stat().st_size
    os.truncate(victim, size + (16 << 30))

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", "fsck", "--repair", str(store)],
                       capture_output=True, text=True, preexec_fn=cap_memory,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert victim.stat().st_size == size
    saved = [p for p in (store / "lost+found").iterdir() if ".footer@" in p.name]
    assert len(saved) == 1 and saved[0].stat().st_size == (16 << 30) + 64
    assert saved[0].stat().st_blocks * 512 < 16 << 20  # still sparse
    assert cli.main(["fsck", str(store)]) == 0
    assert read_all(store, acked) == acked


def test_a_fifo_where_a_block_file_belongs_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """A FIFO in place of a block file (mkfifo): a get of one of its keys, `blockstore fsck` and `dump --block`
    waited forever in open() for a writer to the FIFO. Now each is an IOErrorBS naming the file (exit 8), as for
    a folder there. Run in a subprocess with a timeout, so that the old behaviour fails instead of hanging."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = second_block(store)
    key = min(keys_in(store, victim))
    victim.unlink()
    os.mkfifo(victim)
    root = str(Path(__file__).resolve().parents[1])
    read = (f"import blockstore\nwith blockstore.open({str(store)!r}, read_only=True) as s:\n"
            f"    try:\n        s.get({key!r})\n    except blockstore.IOErrorBS as e:\n        print('raised', e)")
    for argv in (["-c", read], ["-m", "blockstore.tools.cli", "dump", str(store), "--block", victim.name.split(".")[0]]):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": root})
        said = r.stdout + r.stderr
        assert "not a regular file" in said and victim.name in said and "Traceback" not in said, said
        assert r.returncode == (0 if argv[0] == "-c" else 8), said
    # fsck: a finding (exit 4) that repair fixes by moving the FIFO to lost+found, as a link to nothing there
    # (H63: it was exit 8 that no repair could fix; the user had to delete the FIFO by hand)
    for argv, code in ((["fsck", str(store)], 4), (["fsck", "--repair", str(store)], 1), (["fsck", str(store)], 0)):
        r = subprocess.run([sys.executable, "-m", "blockstore.tools.cli", *argv], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PYTHONPATH": root})
        assert r.returncode == code and "Traceback" not in r.stderr, (argv, r.stdout, r.stderr)
        if code == 4:
            assert f"{victim.name} is a FIFO" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not victim.exists() and any((store / "lost+found").iterdir())
    got = read_all(store, acked)
    assert all(got[k] == acked[k] for k in acked if got[k] is not None) and got[key] is None


@pytest.mark.parametrize("name", ["MANIFEST.json", "directory/CURRENT", "directory/IDENTITY", "LOCK"])
def test_a_fifo_among_the_stores_own_files_is_damage_not_a_hang(tmp_path: Path, name: str) -> None:
    """A FIFO in place of MANIFEST.json or one of RocksDB's files: every open, read-only or not, and fsck waited
    forever in open(); in place of LOCK, fsck did (reading the holder's pid). Now the open raises CorruptionError
    naming the file, fsck reports it (exit 4) and --repair rewrites the MANIFEST or rebuilds the
    directory, after which every record reads; a FIFO LOCK is no finding (a writer can hold a lock on it)."""
    store = tmp_path / "s"
    acked = make_store(store)
    victim = store / name
    victim.unlink()
    os.mkfifo(victim)
    root = str(Path(__file__).resolve().parents[1])

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": root})

    fsck = run("-m", "blockstore.tools.cli", "fsck", str(store))
    if name == "LOCK":
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        return
    assert fsck.returncode == 4 and "not a regular file" in fsck.stdout, fsck.stdout + fsck.stderr
    opened = run("-c", f"import blockstore\ntry:\n    blockstore.open({str(store)!r}, read_only=True)\n"
                       f"except blockstore.CorruptionError as e:\n    print(e)")
    said = opened.stdout
    assert opened.returncode == 0 and "not a regular file" in said and name.split("/")[-1] in said, opened
    repair = run("-m", "blockstore.tools.cli", "fsck", "--repair", str(store))
    assert repair.returncode == 1, repair.stdout + repair.stderr
    assert read_all(store, acked) == acked


# ------------------------------------------------------------------ permissions: not damage


def _as_user_without_access(store: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `blockstore ARGV` as a user who owns the store but lacks read permission on the file the test took it
    from: this user when it is not root, else root without its capabilities (setpriv: root with
    CAP_DAC_OVERRIDE reads any file). Not another user: the repository and its venv may sit in a folder only
    root may enter (a CI clone under `mktemp -d`), where another user cannot even import blockstore."""
    cmd = [sys.executable, "-m", "blockstore.tools.cli", *argv]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: cannot take a permission away")
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder any user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="bs-review-28-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("taken", ["MANIFEST.json", "directory tables"])
def test_a_file_the_user_may_not_read_is_not_damage_to_repair(open_tmp: Path, taken: str) -> None:
    """MANIFEST.json, or the directory's tables, unreadable for lack of permission (chmod 000): fsck reported a
    `manifest` / `directory` finding and `--repair` 'fixed' it: it moved the good MANIFEST to lost+found and
    wrote a new one with the default 64 MiB block size (the store's was 64 KiB), or moved the whole directory
    away and rebuilt it from the blocks (0 entries salvaged). Now both are an operational error (exit 8) that
    says nothing is damaged, and repair changes nothing."""
    store = open_tmp / "s"
    acked = make_store(store)
    manifest = (store / "MANIFEST.json").read_bytes()
    victims = [store / "MANIFEST.json"] if taken == "MANIFEST.json" else sorted((store / "directory").glob("*.sst"))
    assert victims
    for v in victims:
        v.chmod(0)
    for argv in (["fsck", str(store)], ["fsck", "--repair", str(store)]):
        r = _as_user_without_access(store, argv)
        assert r.returncode == 8, (r.stdout, r.stderr)
        assert "nothing is damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (store / "lost+found").exists()
    for v in victims:
        v.chmod(0o644)
    assert (store / "MANIFEST.json").read_bytes() == manifest
    assert read_all(store, acked) == acked


# ------------------------------------------------------------------ tensors of odd kinds


def _odd_tensors() -> list[tuple[str, object]]:
    torch = pytest.importorskip("torch")
    return [
        ("sparse", torch.arange(6.0).reshape(2, 3).to_sparse()),
        ("nested", torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])),
        ("quantized", torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)),
    ]


def test_tensors_whose_bytes_are_not_their_values_are_invalid(tmp_path: Path) -> None:
    """put_tensor of a sparse or nested torch tensor raised torch's RuntimeError (outside the hierarchy); a
    quantized one was stored without its scale and zero point and read back as a qint8 tensor with no
    quantizer (its values lost); a numpy array of a structured dtype was stored as '|V12' and read back as raw
    void records (its fields lost). Each is InvalidArgument now, and nothing is written."""
    np = pytest.importorskip("numpy")
    cases = [*_odd_tensors(), ("structured", np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]))]
    with blockstore.open(tmp_path / "s") as s:
        for name, t in cases:
            with pytest.raises(blockstore.InvalidArgument):
                s.put_tensor(name.encode(), t)
            assert s.get(name.encode()) is None, name


def test_lazy_conjugate_and_negative_views_store_their_values_and_are_refused_as_out(tmp_path: Path) -> None:
    """A conj() or _neg_view() tensor: put_tensor raised torch's RuntimeError ('view is not supported for
    conjugate view tensors'), and so did get_tensor(out=...) into one. Now put stores the values the view shows,
    and such an out is InvalidArgument (writing the record's bytes under the view would read back conjugated or
    negated)."""
    torch = pytest.importorskip("torch")
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    f = torch.tensor([1.0, -2.0])
    with blockstore.open(tmp_path / "s") as s:
        s.put_tensor(b"conj", z.conj())
        s.put_tensor(b"neg", f._neg_view())
        assert torch.equal(s.get_tensor(b"conj"), z.conj().resolve_conj())
        assert torch.equal(s.get_tensor(b"neg"), -f)
        for key, out in ((b"conj", torch.zeros(2, dtype=torch.complex64).conj()), (b"neg", torch.zeros(2)._neg_view())):
            with pytest.raises(blockstore.InvalidArgument, match="view"):
                s.get_tensor(key, out=out)


# ------------------------------------------------------------------ opening


def test_a_store_that_cannot_be_created_there_is_a_blockstore_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A new store at a path where its folders cannot be made: on /proc, open raised FileNotFoundError from
    os.makedirs; where the user may not write (EACCES, here simulated: the tests run as root), PermissionError.
    Both left the BlockstoreError hierarchy. Now NotFound / IOErrorBS naming the store."""
    with pytest.raises(blockstore.NotFound, match="create store"):
        blockstore.open("/proc/self/blockstore-review-28")

    def refuse(path: str, *_a: object, **_k: object) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(IOErrorBS, match="create store") as caught:
        blockstore.open(tmp_path / "new" / "store")
    assert caught.value.errno == 13


def test_a_closed_mmap_or_released_memoryview_is_an_invalid_argument(tmp_path: Path) -> None:
    """put/put_many of a closed mmap or a released memoryview, or one given as get_many's out, raised Python's
    ValueError ('mmap closed or invalid', 'operation forbidden on released memoryview object') from
    memoryview(), outside the BlockstoreError hierarchy. Now InvalidArgument naming the argument."""
    closed = mmap.mmap(-1, 4096)
    closed.close()
    released = memoryview(bytearray(10))
    released.release()
    with blockstore.open(tmp_path / "s") as s:
        s.put(b"b", b"x" * 10)
        for bad in (closed, released):
            with pytest.raises(blockstore.InvalidArgument, match="value"):
                s.put(b"a", bad)
            with pytest.raises(blockstore.InvalidArgument, match="value"):
                s.put_many([(b"a", bad)])
            with pytest.raises(blockstore.InvalidArgument, match=r"out\[0\]"):
                s.get_many([b"b"], out=[bad])
        assert s.get(b"a") is None


# ------------------------------------------------------------------ the command line


def test_dump_of_a_block_that_is_a_folder_or_shorter_than_its_header(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`blockstore dump --block ID` where the block file is a folder printed nothing and exited 0, as for an
    empty block; where it was cut inside its header page (0 or 100 bytes) it said 'scan block: InvalidArgument'.
    Now a folder is an operational error naming the file (exit 8, as fsck and reads do), and a short file is an
    'invalid' row saying where the file ends."""
    store = tmp_path / "s"
    make_store(store)
    victim = second_block(store)
    bid = victim.name.split(".")[0]
    kept = victim.read_bytes()
    victim.unlink()
    victim.mkdir()
    assert cli.main(["dump", str(store), "--block", bid]) == 8
    err = capsys.readouterr().err
    assert victim.name in err and "folder" in err and len(err.strip().splitlines()) == 1, err
    victim.rmdir()
    for size in (0, 100):
        victim.write_bytes(kept[:size])
        assert cli.main(["dump", str(store), "--block", bid]) == 0
        out, err = capsys.readouterr()
        assert "InvalidArgument" not in err
        assert out.strip() == f"offset={size}  kind=invalid  detail=the file ends at {size}, inside its block header"
