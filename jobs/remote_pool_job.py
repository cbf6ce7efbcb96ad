"""LMCache across nodes (issue 18): two ``lmcache server`` processes, each with blockstore as its L2 tier on its
own disk (``blockstore.connector.remote_tier.RemoteTierL2Adapter``), sharing one bucket of a real SeaweedFS
cluster (tests/seaweed_cluster.py: master, 3 volume servers with replication 001, filer, S3 gateway).

1. Build the tiny random model (``jobs.tiny_model``), start the cluster and both servers (node-a, node-b).
2. vLLM (CPU) with server A serves a prompt of several LMCache chunks: A stores them in its own store, seals
   the block once idle and uploads it with its key index.
3. vLLM is restarted against server B, whose store is empty: B's pool has ingested A's index, so the same
   prompt is a hit through B (its lookup and load fall back to the pool: verified ranged GETs), and vLLM's
   output is the same as A's. A second prompt under another ``cache_salt`` (another tenant) is not a hit.

    python -m jobs.remote_pool_job [--work DIR]

Last stdout line: one JSON object (the checks, B's remote hits, the timings)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import tiny_model
from .main_job import CHUNK, ENV_DEFAULTS, LMCacheServer, free_port, make_llm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from seaweed_cluster import SeaweedCluster  # type: ignore[import-not-found]  # noqa: E402

T0 = time.monotonic()
CHUNKS = 3  # the prompt's whole LMCache chunks (vLLM stores only whole chunks)


WORK_MARK = ".remote-pool-job"  # marks --work as this job's scratch, so a later run may empty it


def log(msg: str) -> None:
    print(f"[remote-pool-job {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def adapter_config(store: Path, s3: dict[str, str], bucket: str, node: str) -> dict[str, Any]:
    return {"type": "plugin", "module_path": "blockstore.connector.remote_tier", "class_name": "RemoteTierL2Adapter",
            "adapter_params": {"path": str(store), "compaction": None, "remote": {
                "endpoint": s3["endpoint"], "bucket": bucket, "access_key": s3["access_key"],
                "secret_key": s3["secret_key"], "node_id": node, "upload_interval_s": 0.5,
                "poll_interval_s": 0.5, "seal_after_s": 1.0, "timeout_s": 10.0}}}


def remote_status(server: LMCacheServer) -> dict[str, Any]:
    [adapter] = server.status()["storage_manager"]["l2_adapters"]
    return dict(adapter)


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.3)


def generate(llm: Any, ids: list[int], salt: str | None = None) -> tuple[list[int], int]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, detokenize=False)
    prompt = TokensPrompt(prompt_token_ids=ids)
    if salt is not None:
        prompt["cache_salt"] = salt
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.remote_pool_job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/blockstore-remote-pool-job",
                    help="scratch folder: absent, empty, or one an earlier run of this job made (its stores and "
                         "cluster are emptied first; any other non-empty folder is refused)")
    args = ap.parse_args(argv)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    work = Path(args.work).resolve()
    if work.exists() and any(work.iterdir()):
        # only a folder this job marked as its own is emptied: a store someone keeps there is never deleted
        if not (work / WORK_MARK).is_file():
            raise SystemExit(f"--work {work} is not empty and was not made by this job; give an empty folder")
        shutil.rmtree(work / "seaweed", ignore_errors=True)
        for node in ("a", "b"):
            shutil.rmtree(work / f"store-{node}", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARK).write_text("scratch of python -m jobs.remote_pool_job: its stores and cluster are emptied "
                                  "by the next run\n")
    model_dir = tiny_model.build(work / "model-tiny", log=log, shape="tiny")
    rng = random.Random(18)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    warm = [rng.randrange(10, vocab) for _ in range(CHUNK // 2)]
    prompt = [rng.randrange(10, vocab) for _ in range(CHUNKS * CHUNK + 7)]
    cluster = SeaweedCluster(work / "seaweed")
    servers: dict[str, LMCacheServer] = {}
    llm = None
    result: dict[str, Any] = {"job": "remote_pool", "chunks": CHUNKS}
    try:
        cluster.start()
        log(f"SeaweedFS up in {cluster.startup_s:.1f}s at {cluster.endpoint}")
        bucket = f"kv-{uuid.uuid4().hex[:8]}"
        cluster.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        for node in ("a", "b"):
            ports = argparse.Namespace(port=free_port(), http_port=free_port(), no_metrics=True)
            servers[node] = LMCacheServer(ports, adapter_config(work / f"store-{node}", cluster.s3_settings(), bucket,
                                                                f"node-{node}"), work / "logs" / f"server-{node}.log")
            servers[node].start()
        for s in servers.values():
            s.wait_ready()
        a, b = servers["a"], servers["b"]

        t = time.perf_counter()
        llm = make_llm(model_dir, a.args.port)
        generate(llm, warm)
        ids_a, cached_a = generate(llm, prompt)
        a.wait_stored(CHUNKS)
        up = wait_for("node A's upload", lambda: (lambda r: r if r["uploaded_blocks"] and not r["pending_blocks"]
                                                   else None)(remote_status(a)["remote"]))
        log(f"node A: served the prompt ({cached_a} tokens from LMCache), stored {CHUNKS} chunks, uploaded "
            f"{up['uploaded_blocks']} block(s) in {time.perf_counter() - t:.1f}s")
        tiny_model.close_llm(llm)
        llm = None

        wait_for("node B's pool to ingest A's index", lambda: remote_status(b)["remote"]["pool_objects_ingested"])
        llm = make_llm(model_dir, b.args.port)
        generate(llm, warm)
        t = time.perf_counter()
        ids_b, cached_b = generate(llm, prompt)
        b_latency = time.perf_counter() - t
        _ids_other, cached_other = generate(llm, prompt, salt="another-tenant")
        st_b = remote_status(b)
        rb = st_b["remote"]
        log(f"node B: {cached_b} prompt tokens from LMCache, remote lookups hit {rb['lookup_hits']}, remote loads "
            f"{rb['load_hits']} ({rb['load_bytes'] / 2**20:.1f} MiB); another tenant: {cached_other} cached")
        checks = {
            "a_computed_everything": cached_a == 0,
            "b_local_store_had_none_of_it": int(st_b["counters"]["load_hits"]) == 0,
            "b_hit_through_the_pool": cached_b >= CHUNKS * CHUNK and rb["load_hits"] >= CHUNKS,
            "same_output_on_both_nodes": ids_a == ids_b,
            "other_tenant_no_hit": cached_other == 0,
        }
        result.update(checks=checks, b_cached_tokens=cached_b, b_remote=rb, b_request_s=round(b_latency, 3),
                      a_uploaded_blocks=up["uploaded_blocks"], cluster_startup_s=round(cluster.startup_s, 1))
    finally:
        if llm is not None:
            tiny_model.close_llm(llm)
        for s in servers.values():
            with contextlib.suppress(Exception):
                s.stop()
        cluster.stop()
    ok = all(result.get("checks", {"ran": False}).values())
    print("checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["checks"].items()))
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
