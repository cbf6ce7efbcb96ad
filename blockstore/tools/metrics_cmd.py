"""`blockstore metrics PATH`: one store's Prometheus metrics, printed once (the text exposition format, or
`--json`). The store is opened read-only, so this is safe beside a running writer; it shows what the
store itself records (records, bytes, blocks, amplification, the φ histogram of sealed blocks, the last
recovery). Per-operation counters and latencies live in the writing process: scrape its endpoint
(`blockstore.metrics.serve(port)`, or the L2 adapter's `metrics_port`) for those.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from blockstore.errors import BlockstoreError, NotFound
from blockstore.manifest import MANIFEST
from blockstore.metrics import StoreCollector
from blockstore.store import Store
from blockstore.tools.fsck_decode import require_store

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 8, 16  # as tools/cli.py's


def open_read_only(path: str) -> Store:
    """The store at `path`, opened read-only; "no store at PATH (why)" as the other commands say it.
    A read-only open sees the directory as of the moment it opened: reopen to see newer writes."""
    root = require_store(path)
    if not os.path.exists(os.path.join(root, MANIFEST)):
        raise NotFound(f"no store at {root!r} (no {MANIFEST} there; `blockstore fsck` checks a damaged one)")
    return Store(root, create=False, read_only=True)


def store_registry(store: Store) -> CollectorRegistry:
    """A registry holding only this store's scrape-time metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(lambda: [store]))
    return registry


def as_json(registry: CollectorRegistry) -> dict[str, Any]:
    """The registry's metrics as one JSON-able document: name, type, help and samples of each family."""
    return {"metrics": [
        {"name": fam.name, "type": fam.type, "help": fam.documentation,
         "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value} for s in fam.samples]}
        for fam in registry.collect()
    ]}


def cmd_metrics(args: argparse.Namespace) -> int:
    with open_read_only(args.path) as store:
        registry = store_registry(store)
        if args.json:
            print(json.dumps({"path": store.path, **as_json(registry)}, indent=2))
        else:
            sys.stdout.write(generate_latest(registry).decode("utf-8"))
    return EXIT_OK


def register(sub: Any) -> None:
    """Add `metrics` to the `blockstore` command's subparsers."""
    p = sub.add_parser(
        "metrics", help="print a store's Prometheus metrics once (read-only; safe beside a writer)",
        description=__doc__.split("\n\n", 1)[0].replace("\n", " ") if __doc__ else None,
    )
    p.add_argument("path", help="store directory")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the text exposition format")
    p.set_defaults(func=cmd_metrics)


def main(argv: list[str] | None = None) -> int:
    """`python -m blockstore.tools.metrics_cmd PATH`: the command on its own (the same exit codes)."""
    parser = argparse.ArgumentParser(prog="blockstore")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    try:
        args = parser.parse_args(["metrics", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return EXIT_OK if exc.code == 0 else EXIT_USAGE
    try:
        return int(args.func(args))
    except BlockstoreError as exc:
        print(f"blockstore metrics: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
