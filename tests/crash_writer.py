"""Writer subprocess for the kill -9 tests (tests/test_crash.py). Not a test module.

Runs random puts, overwrites, deletes and chunk updates against a store, journaling each operation's
intent *before* issuing it and its acknowledgement *after* (line-buffered, so a kill -9 loses no
journal line the writer finished). Values are derived from (key, version) so the supervisor can
recompute and compare them byte for byte.

    python tests/crash_writer.py STORE JOURNAL DURABILITY SEED [KILL_AT_HOOK KILL_AFTER_N]
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import blockstore
from blockstore import hooks

KEYS = 40


def value_for(key: int, version: int) -> bytes:
    rng = random.Random(key * 1_000_003 + version)
    size = rng.choice([100, 5000, 70_000, 300_000])
    return rng.randbytes(size)


def main() -> None:
    path, journal, durability, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if len(sys.argv) > 6:
        hook, after = sys.argv[5], int(sys.argv[6])
        count = [0]

        def maybe_die(*_a: object) -> None:
            count[0] += 1
            if count[0] >= after:
                os.kill(os.getpid(), signal.SIGKILL)

        hooks.register(hook, maybe_die)
    rng = random.Random(seed)
    versions: dict[int, int] = {}
    with open(journal, "a", buffering=1) as j, blockstore.open(path, durability=durability, block_size=1 << 20) as s:
        print("opened", flush=True)  # the supervisor's kill timer starts here, not at process start
        # resume version numbers from the journal so values stay unique across cycles
        for line in Path(journal).read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[1] == "put":
                versions[int(parts[2])] = max(versions.get(int(parts[2]), 0), int(parts[3]))
        while True:
            op = rng.random()
            if op < 0.6:
                batch = rng.sample(range(KEYS), rng.randint(1, 4))
                vs = [versions.get(k, 0) + 1 for k in batch]
                for k, v in zip(batch, vs):
                    versions[k] = v
                    j.write(f"I put {k} {v}\n")
                s.put_many([(b"key%d" % k, value_for(k, v)) for k, v in zip(batch, vs)])
                for k, v in zip(batch, vs):
                    j.write(f"A put {k} {v}\n")
            elif op < 0.8:
                k = rng.randrange(KEYS)
                j.write(f"I del {k} 0\n")
                s.delete(b"key%d" % k)
                j.write(f"A del {k} 0\n")
            else:
                k = rng.randrange(8)
                v = versions.get(1000 + k, 0) + 1
                versions[1000 + k] = v
                j.write(f"I chunk {k} {v}\n")
                s.put_chunk("u", "s", f"c{k}", f"chunk {k} version {v}", ts_ns=k)
                j.write(f"A chunk {k} {v}\n")


if __name__ == "__main__":
    main()
