"""`python -m blockstore.remote.restore`: restore a node whose disk was lost from the bucket (the work is
`blockstore.remote.restoring.restore_node`; docs/remote.md, "Restoring a node"). Kept apart from it so the
package can export the function without `-m` running an already-imported module."""

from __future__ import annotations

import argparse
import os
import sys

from blockstore.errors import BlockstoreError
from blockstore.remote.objects import S3Settings, make_object_store
from blockstore.remote.restoring import restore_node
from blockstore.tools.cli_common import EXIT_ERROR, EXIT_OK, EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Exit codes as the `blockstore` command's (README, "Exit codes"): 0 restored; 1 restored with objects
    skipped as corrupt or fsck findings on the result; 8 operational error (nothing usable restored); 16
    usage error."""
    ap = argparse.ArgumentParser(
        prog="python -m blockstore.remote.restore",
        description="Restore a node whose disk was lost from the object store: download its live block objects "
                    "(skipping those remote GC superseded), verify each by the xxh3 in its name, rebuild a store "
                    "from them in TARGET (an empty folder) and flag its blocks remote. KV records, tombstones and "
                    "chunk records come back, in their namespaces, newest version of each key. docs/remote.md, "
                    "'Restoring a node'.")
    ap.add_argument("--endpoint", required=True, help="S3 endpoint URL, e.g. http://127.0.0.1:8333")
    ap.add_argument("--bucket", required=True, help="the bucket the node uploaded to")
    ap.add_argument("--access-key", default=os.environ.get("BLOCKSTORE_S3_ACCESS_KEY"),
                    help="S3 access key (default: $BLOCKSTORE_S3_ACCESS_KEY)")
    ap.add_argument("--secret-key", default=os.environ.get("BLOCKSTORE_S3_SECRET_KEY"),
                    help="S3 secret key (default: $BLOCKSTORE_S3_SECRET_KEY; prefer the variable over the flag)")
    ap.add_argument("--region", default="us-east-1", help="S3 region (default: us-east-1)")
    ap.add_argument("--client", choices=("obstore", "boto3"), default="obstore", help="S3 client (default: obstore)")
    ap.add_argument("--node", required=True, help="the node id the lost node uploaded under")
    ap.add_argument("--target", required=True, help="folder for the restored store: absent or empty")
    ap.add_argument("--skip-corrupt", action="store_true",
                    help="restore without objects that fail verification (default: refuse, naming them); newer "
                         "versions they held are then lost and older ones may show")
    ap.add_argument("--no-flag", action="store_true",
                    help="do not flag the restored blocks remote (a tier on the restored store then uploads them "
                         "again as new objects)")
    ap.add_argument("--parallel", type=int, default=4,
                    help="objects fetched at once (default 4; each is held in memory whole until written)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines, only the summary")
    try:
        a = ap.parse_args(argv)
        if not a.access_key or not a.secret_key:
            ap.error("S3 credentials needed: --access-key/--secret-key or $BLOCKSTORE_S3_ACCESS_KEY/_SECRET_KEY")
    except SystemExit as exc:  # argparse printed the usage (or --help): 16 as the blockstore command's, not 2
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    try:  # the settings' own check too (RemoteError): one line, not a traceback
        objects = make_object_store(S3Settings(a.endpoint, a.bucket, a.access_key, a.secret_key, a.region), a.client)
        res = restore_node(objects, a.node, a.target, skip_corrupt=a.skip_corrupt, flag_remote=not a.no_flag,
                           parallel=a.parallel,
                           progress=None if a.quiet else (lambda m: print(m, flush=True)))
    except BlockstoreError as exc:
        print(f"restore failed: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # one line, not a traceback; what was written is a partial store
        print(f"restore interrupted: {a.target} holds a partial restore; empty it and run the restore again",
              file=sys.stderr)
        return EXIT_ERROR
    print(f"restored {len(res.blocks)} block(s) ({res.bytes_downloaded} bytes) of node {a.node} into {res.target} "
          f"in {res.seconds:.1f} s; {len(res.skipped_superseded)} superseded object(s) skipped, {res.flagged} "
          f"flagged remote, {len(res.unindexed)} without an index (uploaded again by a tier)")
    for key, why in sorted(res.corrupt.items()):
        print(f"corrupt, skipped: {key}: {why}", file=sys.stderr)
    if res.unnamed_namespaces:
        print(f"namespaces whose name is lost: {res.unnamed_namespaces}", file=sys.stderr)
    if res.fsck_findings:
        print(f"fsck findings on the restored store: {res.fsck_findings}", file=sys.stderr)
        return 1
    return 1 if res.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
