"""`blockstore metrics PATH`: one store's Prometheus metrics, printed once (the text exposition format, or
`--json`). The store is opened read-only, so this is safe beside a running writer; it shows what the
store itself records (records, bytes, blocks, amplification, the φ histogram of sealed blocks, the last
recovery). Per-operation counters and latencies live in the writing process: scrape its endpoint
(`blockstore.metrics.serve(port)`, or the L2 adapter's `metrics_port`) for those.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from blockstore.errors import BlockstoreError
from blockstore.metrics import StoreCollector
from blockstore.store import Store
from blockstore.tools.cli_common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError, open_read_only


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


def run_alone(command: str, register_command: Callable[[Any], None], argv: list[str] | None) -> int:
    """`python -m blockstore.tools.<module> ARGS`: one command on its own, with `blockstore`'s exit codes
    (0 ok, 8 operational error, 16 usage error)."""
    parser = argparse.ArgumentParser(prog="blockstore")
    sub = parser.add_subparsers(dest="command", required=True)
    register_command(sub)
    try:
        args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as exc:
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"blockstore {command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BlockstoreError as exc:
        print(f"blockstore {command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    return run_alone("metrics", register, argv)


if __name__ == "__main__":
    sys.exit(main())
