"""Write the seed corpus of every fuzz target (fuzz/corpus/<target>/) from a real store.

    .venv/bin/python -m fuzz.make_corpus            # rewrites the generated seeds in place

Seeds are what the parsers see in real life, produced by the code that writes them: a small store is
created with `blockstore.open`, given KV records (one large enough to be page-aligned), a tensor, a
chunk and a delete, and closed (its blocks sealed); then its block files, record headers, footers,
block headers, directory values and MANIFEST are cut into seeds, and the connector's own encoders
make the key, cursor and config seeds. Every file is small (the whole corpus stays well under
200 KB), so the seeds are committed; regression inputs of fixed findings sit beside them under
names starting with `regress-`, and this script leaves those alone.

Control bytes (the first byte of a seed for the targets that take one) are documented in each
target's docstring.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def _write(target: str, name: str, data: bytes) -> None:
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def _clear_generated(target: str) -> None:
    d = os.path.join(CORPUS, target)
    if os.path.isdir(d):
        for name in os.listdir(d):
            if not name.startswith("regress-"):
                os.unlink(os.path.join(d, name))


def store_seeds() -> None:
    import numpy as np

    import blockstore
    from blockstore.compaction.affinity import SOURCE_HINT, Group, group_id
    from blockstore.directory import Location
    from blockstore.keys import SPACE_KV, TAG_BLOCK, TAG_KEY, key_suffix
    from blockstore.purepy import PythonBackend

    for t in ("record_header", "block_footer", "block_header", "block_scan", "directory_values", "affinity_group",
              "chunk_meta", "manifest"):
        _clear_generated(t)
    tmp = tempfile.mkdtemp(prefix="blockstore-fuzz-corpus-")
    try:
        path = os.path.join(tmp, "store")
        with blockstore.open(path, block_size=64 << 10, durability="sync") as s:
            s.put(b"kv-small", b"hello, blocks")
            s.put_many([(b"req-1/a", b"a" * 40), (b"req-1/b", b"b" * 24)], partition="req-1")
            s.put(b"kv-aligned", bytes(range(256)) * 18)  # >= 4096 bytes: a page-aligned payload
            s.put_tensor(b"kv-tensor", np.arange(12, dtype=np.float16).reshape(3, 4))
            s.put_chunk("alice", "s1", "c7", "text of the memory", meta={"turn": 3}, kv_keys=[b"kv-small"])
            s.put(b"kv-gone", b"deleted soon")
            s.delete(b"kv-gone")
            locations = [(k, v) for k, v in s.dir.scan_prefix(TAG_KEY)]
            entries = [(k, v) for k, v in s.dir.scan_prefix(TAG_BLOCK)]
        with open(os.path.join(path, "MANIFEST.json"), "rb") as f:
            _write("manifest", "store-manifest.json", f.read())
        _write("manifest", "minimal.json", b'{"magic": "blockstore", "format_version": 1, "store_id": 7}')

        py = PythonBackend()
        blocks_dir = os.path.join(path, "blocks")
        for i, name in enumerate(sorted(os.listdir(blocks_dir))):
            with open(os.path.join(blocks_dir, name), "rb") as f:
                block = f.read()
            tag = f"block{i}"
            _write("block_header", f"{tag}-header", b"\x00" + block[:64])
            _write("block_footer", f"{tag}-footer", b"\x00" + block[-64:])
            _write("block_footer", f"{tag}-footer-fix", b"\x01" + block[-64:])
            _write("block_scan", f"{tag}-verify", b"\x08" + block)  # as recovery scans it
            _write("block_scan", f"{tag}-fixall-verify", b"\x0f" + block)
            _write("block_scan", f"{tag}-records-only", b"\x1b" + block[4096:-64])
            _write("block_scan", f"{tag}-end-from-footer", b"\x2f" + block)
            fd = os.open(os.path.join(blocks_dir, name), os.O_RDONLY)
            try:
                res = py.scan(fd, 4096, len(block) - 64, True)
            finally:
                os.close(fd)
            if res.records:
                last = res.records[-1]
                torn = block[: last.offset + last.info.payload_off + last.info.payload_len // 2]
                _write("block_scan", f"{tag}-torn", b"\x08" + torn)  # an unsealed block with a torn tail
            for j, r in enumerate(res.records):
                head = block[r.offset : r.offset + 64 + r.info.key_len + r.info.meta_len]
                _write("record_header", f"{tag}-rec{j}-kind{r.info.kind}", b"\x00" + head)
            if res.records:
                r = res.records[0]
                _write("record_header", f"{tag}-rec0-padded-fix", b"\x01" + block[r.offset : r.offset + r.info.payload_off])

        for i, (k, v) in enumerate(locations):
            _write("directory_values", f"location{i}", b"\x00" + v)
            if k[5] == 2:  # a chunk record: its meta and its user key
                _write("chunk_meta", f"chunk-meta{i}", b"\x00" + Location.decode(v).meta)
                _write("chunk_meta", f"chunk-key{i}", b"\x01" + k[6:])
        for i, (_k, v) in enumerate(entries):
            _write("directory_values", f"block-entry{i}", b"\x01" + v)

        keys = sorted(key_suffix(1, SPACE_KV, k) for k in (b"kv-small", b"req-1/a", b"req-1/b"))
        for i, ks in enumerate((keys, keys[:2])):
            g = Group(group_id(ks), tuple(ks), 3.5, 42, SOURCE_HINT, 1.0, 4096 * (i + 1))
            _write("affinity_group", f"group{i}", g.encode())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def connector_seeds() -> None:
    from lmcache.v1.distributed.api import ObjectKey

    from blockstore.connector.l2_keys import CURSOR_TAG, encode_cursor, encode_object_key, namespace_for

    for t in ("object_key", "l2_cursor", "l2_config", "plugin_config"):
        _clear_generated(t)
    keys = [
        ObjectKey(chunk_hash=bytes(range(32)), model_name="meta-llama/Llama-3-8B", kv_rank=0),
        ObjectKey(chunk_hash=b"\x01\x02", model_name="tiny", kv_rank=-3, object_group_id=2**63, cache_salt="tenant-7"),
        ObjectKey(chunk_hash=b"", model_name="", kv_rank=2**63 - 1),
    ]
    for i, k in enumerate(keys):
        _write("object_key", f"key{i}", encode_object_key(k))
    ns = namespace_for("tiny", "tenant-7")
    cursor = encode_cursor(ns, encode_object_key(keys[1]))
    _write("l2_cursor", "cursor", b"\x00" + cursor.encode())
    _write("l2_cursor", "cursor-json", b"\x01" + base64.urlsafe_b64decode(cursor[len(CURSOR_TAG):]))

    configs = [
        {"path": "/data/kv", "capacity_bytes": 200000000000},
        {"type": "plugin", "path": "/data/kv", "durability": "sync", "block_size": 67108864, "workers": 8,
         "lock_ttl_s": 0, "compaction": {"policy": "aggressive", "gc_invalid_ratio": 0.4, "background": False}},
        {"path": "/data/kv", "compaction": None},
        {"path": "/data/kv", "compaction": "no-gc", "lock_ttl_s": 12.5},
    ]
    for i, c in enumerate(configs):
        _write("l2_config", f"params{i}", json.dumps(c).encode())

    prefix = "remote_storage_plugin.blockstore."
    plugin = [
        (0x00, {prefix + "module_path": "blockstore.connector.remote_plugin",
                prefix + "class_name": "BlockstoreConnectorAdapter", prefix + "path": "/data/kv/rank{worker_id}",
                prefix + "durability": "cache", prefix + "compaction": "full"}),
        (0x02, {"path": "/data/kv/{world_size}/{worker_id}", "block_size": "67108864",
                "compaction": '{"policy": "no-relocation", "min_hits": 3}'}),
        (0x03, {"path": "/data/b", "durability": "sync", "compaction": "none", "remote_storage_plugin.blockstore.x": 1}),
        (0x06, {"path": "/kv", "compaction": {"policy": "full", "background": True}, "block_size": 65536}),
    ]
    for i, (ctl, ec) in enumerate(plugin):
        _write("plugin_config", f"extra{i}", bytes([ctl]) + json.dumps(ec).encode())


def main() -> int:
    sys.path.insert(0, ROOT)
    store_seeds()
    try:
        import lmcache  # noqa: F401
    except ImportError:
        print("make_corpus: lmcache not installed; connector seeds left as they are", file=sys.stderr)
    else:
        connector_seeds()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
    print(f"fuzz/corpus: {sum(len(fs) for _, _, fs in os.walk(CORPUS))} files, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
