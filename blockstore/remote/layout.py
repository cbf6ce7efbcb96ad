"""Object names and the key-index format: the only place that knows how the bucket is laid out.

  blocks/<node>/<block id, 16 hex>-<xxh3 of the file, 16 hex>   the sealed block file, byte for byte
  index/<node>/<publication number, 16 hex>-<block id, 16 hex>  its key index (JSON), written after it
  gc/<node>/<gc number, 16 hex>-<block id, 16 hex>            a "superseded" marker (JSON): the block's
                                                              object is being reclaimed (reclaim.py)

A data name never repeats: a node id is unique, a block id is never reused by its store, and the content
hash makes even a reused id (a wiped node starting over under the same name) a different object. The
publication number grows per node (the uploader's ledger, continued from the bucket by a fresh ledger),
so one node's index names sort in publication order and a reader lists them with a cursor."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from blockstore.remote.errors import RemoteError

INDEX_VERSION = 1
BLOCKS = "blocks/"
INDEX = "index/"
GC = "gc/"
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not _NODE.match(node_id):
        raise RemoteError(f"node id must be 1-63 characters of [A-Za-z0-9_.-], not {node_id!r}")
    return node_id


def object_name(node_id: str, block_id: int, file_xxh3: int) -> str:
    return f"{node_id}/{block_id:016x}-{file_xxh3:016x}"


def data_key(name: str) -> str:
    return BLOCKS + name


def index_key(name: str) -> str:
    return INDEX + name


def index_name(node_id: str, seq: int, block_id: int) -> str:
    """The name (under INDEX) of the index that node `node_id` publishes as number `seq` for `block_id`."""
    return f"{node_id}/{seq:016x}-{block_id:016x}"


def gc_key(node_id: str, gc_seq: int, block_id: int) -> str:
    return f"{GC}{node_id}/{gc_seq:016x}-{block_id:016x}"


def name_seq(name: str) -> int:
    """The publication (or gc) number an index or gc object's name starts its last part with."""
    return int(name.rsplit("/", 1)[1].split("-", 1)[0], 16)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One record of a remote block: where it is in the object and what a verified read checks."""

    ns: str  # the namespace's name: ids are per store, names are what nodes share
    key: bytes
    kind: int
    offset: int
    payload_off: int
    record_len: int
    payload_len: int
    seq: int
    payload_xxh3: int
    data_key: str = ""
    node: str = ""

    def row(self) -> list[object]:
        return [self.ns, self.key.hex(), self.kind, self.offset, self.payload_off, self.record_len,
                self.payload_len, self.seq, self.payload_xxh3]


@dataclass(frozen=True, slots=True)
class BlockIndex:
    node: str
    block_id: int
    data_key: str
    file_xxh3: int
    size: int
    entries: list[IndexEntry]
    # name -> the node's id of every namespace the block's records use, chunk records' included: a
    # restore (restore.py) names the namespaces of a directory rebuilt from the block files with it.
    # Optional (indexes published before it have none; readers of this version ignore what they lack)
    namespaces: dict[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({
            "v": INDEX_VERSION, "node": self.node, "block_id": self.block_id, "data_key": self.data_key,
            "file_xxh3": self.file_xxh3, "size": self.size, "entries": [e.row() for e in self.entries],
            "namespaces": self.namespaces,
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BlockIndex:
        """RemoteError if `raw` is not an index object this version reads."""
        try:
            d = json.loads(raw)
            if d["v"] != INDEX_VERSION:
                raise RemoteError(f"index version {d['v']} (this build reads {INDEX_VERSION})")
            node, dkey = str(d["node"]), str(d["data_key"])
            entries = [IndexEntry(str(ns), bytes.fromhex(k), int(kind), int(off), int(poff), int(rlen), int(plen),
                                  int(seq), int(cks), dkey, node)
                       for ns, k, kind, off, poff, rlen, plen, seq, cks in d["entries"]]
            namespaces = {str(n): int(i) for n, i in d.get("namespaces", {}).items()}
            return cls(node, int(d["block_id"]), dkey, int(d["file_xxh3"]), int(d["size"]), entries, namespaces)
        except RemoteError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RemoteError(f"not a key-index object: {e}") from e


@dataclass(frozen=True, slots=True)
class Superseded:
    """A block object of `node` that its node no longer holds (compaction moved its live records into
    later blocks, or they died): pools drop every pointer of `keys` that still names `data_key`. Applied
    by a pool only once it has ingested `after_index` (the node's index that holds the moved records'
    new places; "" when none was needed), so no pool loses a live record's pointer on the way."""

    node: str
    block_id: int
    data_key: str
    index_key: str
    after_index: str
    keys: list[tuple[str, bytes]]

    def encode(self) -> bytes:
        return json.dumps({
            "v": INDEX_VERSION, "node": self.node, "block_id": self.block_id, "data_key": self.data_key,
            "index_key": self.index_key, "after_index": self.after_index,
            "keys": [[ns, k.hex()] for ns, k in self.keys],
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Superseded:
        """RemoteError if `raw` is not a gc marker this version reads."""
        try:
            d = json.loads(raw)
            if d["v"] != INDEX_VERSION:
                raise RemoteError(f"gc marker version {d['v']} (this build reads {INDEX_VERSION})")
            return cls(str(d["node"]), int(d["block_id"]), str(d["data_key"]), str(d["index_key"]),
                       str(d["after_index"]), [(str(ns), bytes.fromhex(k)) for ns, k in d["keys"]])
        except RemoteError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteError(f"not a gc marker object: {e}") from e
