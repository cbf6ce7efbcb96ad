"""The engine never imports compaction or a connector (issue 14): a store opened without compaction
puts, gets and closes with neither of them, nor LMCache or torch, ever imported. Compaction is a
plugin the store starts by name (`compaction=`), so the engine depends on it only when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROGRAM = """
import sys
import blockstore

with blockstore.open(sys.argv[1]) as s:
    s.put(b"k", b"v" * 5000)
    s.put_many([(b"a", b"1"), (b"b", b"2")], ns="other")
    assert s.get(b"k") == b"v" * 5000 and s.get_many([b"a", b"b"], ns="other")[1] == b"2"
    s.put_chunk("u", "s", "c", "a memory")
    assert s.get_chunk("u", "s", "c").text == "a memory"
    assert s.delete(b"k")
with blockstore.open(sys.argv[1], read_only=True) as s:
    assert s.get(b"k") is None and s.get(b"a", ns="other") == b"1"
forbidden = ("blockstore.compaction", "blockstore.connector", "lmcache", "torch")
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(" ".join(loaded))
"""


def test_engine_imports_neither_compaction_nor_a_connector(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path / "s")], capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported without compaction: {r.stdout.strip()}"
