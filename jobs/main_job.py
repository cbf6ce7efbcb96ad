"""The main job: vLLM (CPU) with `lmcache server` and an L2 disk tier, then blended KV from blockstore.

    python -m jobs.main_job [--store DIR] [--work DIR] [--adapter blockstore|fs] [--quick]
                            [--model-shape speed|tiny] [--no-blend]

The prefix-reuse passes run on the ``speed`` random-weights model (about 100 M parameters, GQA; see
``tiny_model``): on a 2-core CPU its prefill of a 1k-token prompt takes seconds while the prompt's KV is
8 MiB, so KV served from L2 cuts the time to first token (the tiny 4 M model recomputes a prompt about
as fast as its KV moves through the server, and reuse did not pay there: issue 15). The blend scenario
runs on the trained model (``jobs.trained_model``), where greedy agreement means something.

What it does, in order (each step timed; progress on stderr, the report on stdout):

1. Build the random model into WORK/model-SHAPE (skipped when its stamp matches, see ``tiny_model``).
2. Start ``lmcache server`` (the flags of ``shared/notes/vllm-cpu.md``, chunk 256, L1 1 GB, one
   ``--l2-adapter``: LMCache's own ``fs`` adapter or blockstore's plugin). While it starts, run the
   **baseline**: a separate ``LLM`` without any KV connector and with prefix caching off, so no
   token of it can come from a cache. (The first pass of the connector-enabled engine is no baseline:
   later turns of a conversation and repeated documents already hit chunks stored earlier in the
   same pass.)
3. ``LLM`` with ``LMCacheMPConnector`` (prefix caching off, so every hit comes from LMCache):
   **cold** pass on the empty server; wait until the server has written every chunk to L2.
   (Without ``--quick``: a **L1** replay, hits from the server's RAM.)
4. ``POST /cache/clear {"tier": "l1", "force": true}``, then the **L2** replay: every hit must be
   loaded from the L2 tier.
5. Stop vLLM and the server (SIGINT), start both again, **restart** replay: L2 hits across a restart.
6. Blend scenario (``blend_scenario``; skipped with ``--no-blend``): held-out chunks come back in new
   orders and combinations; full prefill without a connector, then vLLM with ``MultiConnector`` (the
   blend connector first, ``LMCacheMPConnector`` on the same server second); the blend connector's
   chunk KV store is WORK/store-blend.
7. Report: per pass the tokens LMCache served (vLLM's count) split by tier (the server's lookup
   counters), hit rate, time to first token and latency, whether the greedy token ids equal the
   baseline's and the largest top-5 log-probability difference; then the L2 store's own numbers; then
   the blend scenario's tokens served blended, TTFT against full prefill and greedy agreement.

The server's tier counters (``lmcache_mp.lookup_hit_l1`` / ``_l2`` tokens) exist only as OpenTelemetry
metrics, served in Prometheus format at ``GET /metrics`` of its HTTP port; ``/status`` has none. So the
server runs with the note's flags minus ``--disable-metrics`` (``--no-metrics`` restores them exactly;
the tier split then reads "n/a" and only vLLM's counts remain).

Every process started here is stopped on success, error, Ctrl-C or SIGTERM: the server with SIGINT
(it has been seen to ignore SIGTERM and keep its port), vLLM through its engine shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import blend_scenario, tiny_model
from .trained_model import DEFAULT_MODEL_DIR as TRAINED_MODEL_DIR

CHUNK = 256
MAX_MODEL_LEN = 2048
MAX_TOKENS = 16
TOP_LOGPROBS = 5
ENV_DEFAULTS = {
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "LMCACHE_TRACK_USAGE": "false",
    "PYTHONHASHSEED": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM logs to stdout by default; stdout is for the report.
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[main-job {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    """SIGINT or SIGTERM turned into an exception, so that every ``finally`` runs."""


# ---------------------------------------------------------------------------------------------
# Workload


@dataclass
class Request:
    name: str
    ids: list[int]


@dataclass
class Workload:
    requests: list[Request]
    description: str
    warmup_ids: list[int]  # < one chunk: warms a fresh engine without storing anything

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.ids) for r in self.requests)

    def distinct_chunks(self) -> int:
        """Full 256-token chunks the server should hold after one pass (prefix-hashed, so shared
        prefixes count once)."""
        seen = set()
        for r in self.requests:
            for end in range(CHUNK, len(r.ids) + 1, CHUNK):
                seen.add(tuple(r.ids[:end]))
        return len(seen)


def build_workload(model_dir: Path, quick: bool) -> Workload:
    """Multi-turn conversations whose prompts grow, and long documents asked several questions.

    Prompts are token ids (fixed segments concatenated), so every pass sends exactly the same
    prompts whatever the model answers; every prompt is > 512 tokens so at least two full chunks
    are stored, and none is a multiple of 256.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    gen = tiny_model.TextGenerator(seed=4242)

    def segment(n_tokens: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n_tokens:
            ids += tok.encode(" " + gen.paragraph(4)).ids
        return ids[:n_tokens]

    n_conv, n_turns = (2, 3) if quick else (3, 5)
    n_docs, n_questions = (2, 2) if quick else (2, 3)
    convs = []
    for c in range(n_conv):
        system = segment(520 + 7 * c)
        turns = [(segment(110 + 5 * t), segment(90 + 3 * t)) for t in range(n_turns)]  # (user, assistant)
        convs.append((system, turns))
    docs = [(segment(1100 + 37 * d), [segment(60 + 9 * q) for q in range(n_questions)]) for d in range(n_docs)]

    reqs: list[Request] = []
    for step in range(max(n_turns, n_questions)):
        for c, (system, turns) in enumerate(convs):
            if step < n_turns:
                history = [t for u, a in turns[:step] for t in u + a]
                reqs.append(Request(f"conv{c}.turn{step + 1}", system + history + turns[step][0]))
        for d, (doc, questions) in enumerate(docs):
            if step < n_questions:
                reqs.append(Request(f"doc{d}.q{step + 1}", doc + questions[step]))
    for r in reqs:
        assert 2 * CHUNK < len(r.ids) <= MAX_MODEL_LEN - MAX_TOKENS and len(r.ids) % CHUNK, (r.name, len(r.ids))
    desc = (f"{len(reqs)} requests ({n_conv} conversations x {n_turns} turns, {n_docs} documents x "
            f"{n_questions} questions), prompts {min(len(r.ids) for r in reqs)}-{max(len(r.ids) for r in reqs)} "
            f"tokens")
    return Workload(reqs, desc, segment(CHUNK - 1))


# ---------------------------------------------------------------------------------------------
# lmcache server


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode() or "null")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels folded)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def _die_with_parent():
    """A preexec_fn asking Linux to send the child SIGINT if this process dies without cleaning up
    (kill -9): the one case no ``finally`` covers. Everything it calls is resolved before the fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigint = 1, int(signal.SIGINT)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigint, 0, 0, 0)

    return preexec


class LMCacheServer:
    """One ``lmcache server`` subprocess, in its own session so a terminal Ctrl-C reaches only us and
    we stop it in order (SIGINT, as the note says)."""

    def __init__(self, args: argparse.Namespace, l2_adapter: dict, log_path: Path) -> None:
        self.args = args
        self.l2_adapter = l2_adapter
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.http = f"http://127.0.0.1:{args.http_port}"

    def command(self) -> list[str]:
        exe = shutil.which("lmcache", path=os.path.dirname(sys.executable)) or shutil.which("lmcache")
        if exe is None:
            raise RuntimeError("the `lmcache` command is not installed (pip install lmcache==0.5.6)")
        cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(self.args.port),
               "--chunk-size", str(CHUNK), "--l1-size-gb", "1", "--eviction-policy", "LRU",
               "--supported-transfer-mode", "auto", "--http-port", str(self.args.http_port)]
        if self.args.no_metrics:
            cmd += ["--disable-metrics"]
        return cmd + ["--l2-adapter", json.dumps(self.l2_adapter)]

    def start(self) -> None:
        ports = [self.args.port, self.args.http_port]
        busy = [p for p in ports if port_in_use(p)]
        if busy:
            raise RuntimeError(f"port(s) {busy} already in use on 127.0.0.1: is another lmcache server running?")
        cmd = self.command()
        log(f"starting lmcache server (log {self.log_path}): {' '.join(cmd[1:-1])} '{cmd[-1]}'")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=os.environ.copy(),
                                         preexec_fn=_die_with_parent())

    def wait_ready(self, timeout: float = 180.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmcache server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if http_json("GET", self.http + "/healthcheck", timeout=2).get("status") == "healthy":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"lmcache server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def status(self) -> dict:
        return http_json("GET", self.http + "/status")

    def metrics(self) -> dict[str, float] | None:
        if self.args.no_metrics:
            return None
        with urllib.request.urlopen(self.http + "/metrics", timeout=5) as resp:
            return parse_prometheus(resp.read().decode())

    def clear_l1(self) -> None:
        r = http_json("POST", self.http + "/cache/clear", {"tier": "l1", "force": True})
        if r.get("status") != "ok":
            raise RuntimeError(f"/cache/clear answered {r}")

    def wait_stored(self, expected_chunks: int, timeout: float = 120.0) -> dict:
        """Until L1 holds the expected chunks and the store controller has handed all to L2."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            sm = self.status()["storage_manager"]
            l1, sc = sm["l1_manager"], sm["store_controller"]
            snap = (l1["total_object_count"], l1["write_locked_count"], sc["pending_keys_count"],
                    sc["in_flight_task_count"])
            if snap[0] >= expected_chunks and snap[1:] == (0, 0, 0) and snap == last:
                return {"l1_objects": snap[0], "l1_bytes": l1["memory_used_bytes"]}
            last = snap
            time.sleep(0.5)
        raise RuntimeError(f"server did not settle in {timeout:.0f}s (l1 objects, write-locked, pending, in flight)"
                           f" = {last}, expected {expected_chunks} chunks")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT, wait; SIGINT again; then SIGTERM, SIGKILL as last resorts. Idempotent."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        log(f"stopping lmcache server pid {p.pid} (SIGINT)")
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGINT, 10), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if p.poll() is not None:
                break
            if sig != signal.SIGINT or wait != timeout:
                log(f"lmcache server pid {p.pid} still running; sending {signal.Signals(sig).name}")
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
        rc = p.poll()
        for port in (self.args.port, self.args.http_port):
            for _ in range(20):
                if not port_in_use(port):
                    break
                time.sleep(0.25)
            else:
                log(f"WARNING: port {port} still answers after the server stopped")
        log(f"lmcache server stopped (exit {rc})")


# ---------------------------------------------------------------------------------------------
# vLLM


def make_llm(model_dir: Path, server_port: int | None):
    from vllm import LLM

    transfer = None
    if server_port is not None:
        from vllm.config import KVTransferConfig

        transfer = KVTransferConfig(
            kv_connector="LMCacheMPConnector", kv_role="kv_both",
            kv_connector_extra_config={"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": server_port})
    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
               enable_prefix_caching=False, disable_log_stats=False, seed=0, kv_transfer_config=transfer)


@dataclass
class Result:
    name: str
    prompt_tokens: int
    token_ids: list[int]
    top_logprobs: list[dict[int, float]]
    cached_tokens: int
    ttft_s: float | None
    latency_s: float


@dataclass
class Pass:
    name: str
    results: list[Result]
    wall_s: float
    server_delta: dict[str, float] | None = None  # the server's counters over the pass


def run_pass(llm, workload: Workload, name: str, server: LMCacheServer | None = None) -> Pass:
    """Requests one at a time (a later turn can then reuse what an earlier one stored, and each time
    to first token is the request's own, not a queue's)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_LOGPROBS, ignore_eos=True,
                        detokenize=False)
    # A fresh engine's first request pays one-off set-up (seen: TTFT 3.2 s instead of 0.2 s); a prompt
    # shorter than a chunk takes it without storing or hitting anything.
    llm.generate([TokensPrompt(prompt_token_ids=workload.warmup_ids)], sp, use_tqdm=False)
    before = server.metrics() if server else None
    results = []
    t_pass = time.perf_counter()
    for r in workload.requests:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=r.ids)], sp, use_tqdm=False)[0]
        latency = time.perf_counter() - t
        comp = out.outputs[0]
        tops = [{tid: lp.logprob for tid, lp in pos.items()} for pos in (comp.logprobs or [])]
        ttft = getattr(out.metrics, "first_token_latency", None) if out.metrics is not None else None
        results.append(Result(r.name, len(r.ids), list(comp.token_ids), tops, out.num_cached_tokens or 0,
                              ttft if ttft else None, latency))
        log(f"  {name} | {r.name}: {len(r.ids)} prompt tokens, {results[-1].cached_tokens} from LMCache, "
            f"TTFT {1000 * (ttft or 0):.1f} ms, latency {1000 * latency:.1f} ms")
    wall = time.perf_counter() - t_pass
    p = Pass(name, results, wall)
    if server is not None and before is not None:
        time.sleep(1.5)  # the lookup counters are emitted through the server's event bus
        after = server.metrics() or {}
        p.server_delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        slug = "".join(c if c.isalnum() else "-" for c in name.lower())
        (server.log_path.parent / f"metrics-{slug}.json").write_text(
            json.dumps({k: v for k, v in sorted(p.server_delta.items()) if v}, indent=1))
    cached = sum(x.cached_tokens for x in results)
    log(f"pass {name}: {len(results)} requests in {wall:.1f}s, {cached}/{workload.prompt_tokens} prompt tokens "
        f"served by LMCache")
    return p


# ---------------------------------------------------------------------------------------------
# Report


# The server's OpenTelemetry counters as its Prometheus exposition names them (unit and _total added).
M_REQUESTED = "lmcache_mp_lookup_requested_tokens_total"  # chunk-aligned prompt tokens looked up
M_HIT = "lmcache_mp_lookup_hit_tokens_total"  # of those, the contiguous prefix found (L1 + L2)
M_HIT_L1 = "lmcache_mp_lookup_hit_l1_tokens_total"  # ... that L1 already held
M_HIT_L2 = "lmcache_mp_lookup_hit_l2_tokens_total"  # ... that had to come from L2
M_L2_LOADED = "lmcache_mp_l2_prefetch_load_completed_chunks_total"  # chunks loaded from L2
M_L2_STORED = "lmcache_mp_l2_store_completed_objects_chunks_total"  # chunks written to L2


def metric(delta: dict[str, float] | None, name: str) -> float | None:
    if delta is None:
        return None
    return delta.get(name, 0.0)


def compare(base: Pass, other: Pass) -> tuple[int, float, int]:
    """(requests whose greedy ids differ, max |logprob diff| over top-5 tokens both hold, positions
    whose top-5 token sets differ)."""
    differ, max_diff, set_diff = 0, 0.0, 0
    for b, o in zip(base.results, other.results):
        assert b.name == o.name
        if b.token_ids != o.token_ids:
            differ += 1
        for pb, po in zip(b.top_logprobs, o.top_logprobs):
            if set(pb) != set(po):
                set_diff += 1
            for tid in set(pb) & set(po):
                max_diff = max(max_diff, abs(pb[tid] - po[tid]))
    return differ, max_diff, set_diff


# The blend scenario's greedy first tokens must agree with full prefill at least this often (ratio 0.15).
BLEND_FIRST_TOKEN_FLOOR = 0.75


def blend_checks(blend: blend_scenario.BlendOutcome) -> list[tuple[str, bool]]:
    c = blend.counters
    served = sum(b.cached_tokens for _, b in blend.mix_pairs())
    agree = blend.first_token_agreement()
    return [
        (f"blend: the connector blended every mix ({c.get('requests_blended')}/{len(blend.workload.mixes)}) "
         f"without a failure ({c.get('load_failures')})",
         c.get("requests_blended") == len(blend.workload.mixes) and c.get("load_failures") == 0),
        (f"blend: tokens vLLM took from a connector for the mixes ({served}) = tokens the blend connector wrote "
         f"({c.get('tokens_written')}) > 0", served == c.get("tokens_written") and served > 0),
        (f"blend: greedy first token agrees with full prefill for >= {BLEND_FIRST_TOKEN_FLOOR:.0%} of the mixes "
         f"({agree:.0%})", agree >= BLEND_FIRST_TOKEN_FLOOR),
    ]


def checks(workload: Workload, passes: list[Pass], blend: blend_scenario.BlendOutcome | None = None,
           scraped: dict[str, float] | None = None) -> list[tuple[str, bool]]:
    """What the run must show; the job exits 1 if any fails."""
    base, out = passes[0], blend_checks(blend) if blend is not None else []
    if scraped is not None:
        out.append(("blockstore's metrics endpoint scraped during the job shows L2 hits and records",
                    scraped.get("blockstore_adapter_hits_total", 0) > 0 and scraped.get("blockstore_records", 0) > 0))
    # Only full chunks are stored, and vLLM computes at least the prompt's last token itself.
    servable = sum((len(r.ids) - 1) // CHUNK * CHUNK for r in workload.requests)
    for p in passes[1:]:
        differ, max_diff, _ = compare(base, p)
        out.append((f"{p.name}: greedy token ids identical to the no-cache baseline", differ == 0))
        out.append((f"{p.name}: top-5 log-probabilities within 1e-5 of the baseline (max {max_diff:.1e})",
                    max_diff <= 1e-5))
        served = sum(r.cached_tokens for r in p.results)
        if p.name.startswith("L2"):
            l1, l2 = metric(p.server_delta, M_HIT_L1), metric(p.server_delta, M_HIT_L2)
            tier = "" if l2 is None else f", server: {int(l1 or 0)} from L1, {int(l2)} from L2"
            out.append((f"{p.name}: every full chunk served ({served}/{servable} tokens){tier}",
                        served == servable and (l2 is None or (l2 == served and not l1))))
    return out


def report_json(args, workload: Workload, passes: list[Pass], timings: list[tuple[str, float]],
                blend: blend_scenario.BlendOutcome | None = None, scraped: dict[str, float] | None = None) -> dict:
    base = passes[0]
    out: dict = {"adapter": args.adapter, "quick": args.quick, "model_shape": args.model_shape,
           "requests": len(workload.requests),
           "prompt_tokens": workload.prompt_tokens, "distinct_chunks": workload.distinct_chunks(), "passes": [],
           "checks": [{"check": what, "ok": ok} for what, ok in checks(workload, passes, blend, scraped)],
           "timings_s": dict(timings)}
    for p in passes:
        ttfts = [r.ttft_s for r in p.results if r.ttft_s is not None]
        differ, max_diff, set_diff = compare(base, p) if p is not base else (0, 0.0, 0)
        d = p.server_delta
        out["passes"].append({
            "name": p.name, "served_tokens": sum(r.cached_tokens for r in p.results),
            "from_l1_tokens": metric(d, M_HIT_L1), "from_l2_tokens": metric(d, M_HIT_L2),
            "server_requested_tokens": metric(d, M_REQUESTED), "server_hit_tokens": metric(d, M_HIT),
            "l2_chunks_loaded": metric(d, M_L2_LOADED), "l2_chunks_stored": metric(d, M_L2_STORED),
            "ttft_ms_median": 1000 * statistics.median(ttfts) if ttfts else None,
            "ttft_ms_mean": 1000 * statistics.mean(ttfts) if ttfts else None,
            "latency_ms_mean": 1000 * statistics.mean(r.latency_s for r in p.results),
            "requests_differing_from_baseline": differ, "max_top5_logprob_diff": max_diff,
            "positions_with_different_top5": set_diff, "wall_s": p.wall_s,
        })
    if blend is not None:
        out["blend"] = blend_scenario.report_json(blend)
    return out


def report(args, workload: Workload, passes: list[Pass], timings: list[tuple[str, float]], store_lines: list[str],
           model_dir: Path, blend: blend_scenario.BlendOutcome | None = None,
           scraped: dict[str, float] | None = None) -> str:
    base = passes[0]

    def n(x: float | None) -> str:
        return "n/a" if x is None else str(int(x))

    # Column order (served, hit rate, from L1, from L2 first; "(ref)" on the baseline row) is what
    # tests/test_main_job.py parses; WORK/report.json holds the same numbers for machines.
    head = (f"{'pass':<20}{'served':>8}{'hit':>7}{'from L1':>9}{'from L2':>9}{'srv hit':>9}{'L2 load/':>10}"
            f"{'TTFT p50':>10}{'TTFT mean':>11}{'lat mean':>10}{'ids =':>7}{'max |dlogp|':>13}")
    head2 = (f"{'':<20}{'tokens':>8}{'rate':>7}{'tokens':>9}{'tokens':>9}{'rate':>9}{'store ch':>10}"
             f"{'ms':>10}{'ms':>11}{'ms':>10}{'base':>7}{'top-5':>13}")
    lines = [
        f"== blockstore main job: vLLM {_version('vllm')} (CPU) + lmcache {_version('lmcache')} server, "
        f"L2 adapter: {args.adapter} ==",
        model_line(args.model_shape, model_dir),
        f"workload: {workload.description}; {workload.prompt_tokens} prompt tokens, "
        f"{workload.distinct_chunks()} distinct full chunks; greedy, max_tokens {MAX_TOKENS}, logprobs {TOP_LOGPROBS}",
        "", head, head2,
    ]
    for p in passes:
        served = sum(r.cached_tokens for r in p.results)
        ttfts = [r.ttft_s for r in p.results if r.ttft_s is not None]
        lat = [r.latency_s for r in p.results]
        d = p.server_delta
        req, hit = metric(d, M_REQUESTED), metric(d, M_HIT)
        srv_rate = f"{hit / req:.1%}" if hit is not None and req else "n/a"
        l2io = "n/a" if d is None else f"{n(metric(d, M_L2_LOADED))}/{n(metric(d, M_L2_STORED))}"
        if p is base:
            same, dlp = "(ref)", "(ref)"
        else:
            differ, max_diff, set_diff = compare(base, p)
            same = "yes" if differ == 0 else f"NO:{differ}"
            dlp = f"{max_diff:.2e}" + (f" ({set_diff} sets)" if set_diff else "")
        ttft_p50 = f"{1000 * statistics.median(ttfts):.1f}" if ttfts else "n/a"
        ttft_mean = f"{1000 * statistics.mean(ttfts):.1f}" if ttfts else "n/a"
        lines.append(
            f"{p.name:<20}{served:>8}{served / workload.prompt_tokens:>7.1%}{n(metric(d, M_HIT_L1)):>9}"
            f"{n(metric(d, M_HIT_L2)):>9}{srv_rate:>9}{l2io:>10}{ttft_p50:>10}{ttft_mean:>11}"
            f"{1000 * statistics.mean(lat):>10.1f}{same:>7}{dlp:>13}")
    lines += [
        "",
        "served: prompt tokens vLLM took from LMCache (RequestOutput.num_cached_tokens; prefix caching is off);",
        "  hit rate = served / all prompt tokens. from L1/L2, srv hit rate, L2 load/store: the server's counters",
        "  (lookup_hit_l1/_l2 tokens; lookup_hit / lookup_requested over full chunks; L2 chunks loaded / stored).",
        "TTFT: vLLM's first_token_latency, one request at a time, after one warm-up request per engine.",
        "ids = base: greedy token ids equal to the no-cache baseline's for every request; max |dlogp|: largest",
        "  difference of a top-5 log-probability present in both runs.",
    ]
    b_ttft = [r.ttft_s for r in base.results if r.ttft_s]
    parts = [f"without reuse (baseline) {1000 * statistics.median(b_ttft):.1f} ms"] if b_ttft else []
    for p in passes[1:]:
        x = [r.ttft_s for r in p.results if r.ttft_s]
        if x and p.name != "cold (server empty)":
            speedup = f" ({statistics.median(b_ttft) / statistics.median(x):.2f}x faster)" if b_ttft else ""
            parts.append(f"{p.name} {1000 * statistics.median(x):.1f} ms{speedup}")
    if parts:
        lines.append("TTFT median: " + "; ".join(parts))
    lines.append("")
    lines += store_lines
    lines.append("")
    if blend is not None:
        lines += [f"== blend scenario: {TRAINED_MODEL_DIR.name} (trained) with the blend connector before LMCache's "
                  f"in vLLM's MultiConnector, ratio {blend_scenario.RATIO} =="]
        lines += blend_scenario.report_lines(blend) + [""]
    lines += [f"check: {'PASS' if ok else 'FAIL'}  {what}" for what, ok in checks(workload, passes, blend, scraped)]
    lines.append("")
    lines.append("phase timings: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in timings))
    return "\n".join(lines)


def model_line(shape_name: str, model_dir: Path) -> str:
    shape = tiny_model.SHAPES[shape_name]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return (f"model: {shape_name} random-weights Llama ({shape.num_layers} layers, hidden {shape.hidden}, "
            f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads, {shape.params(vocab) / 1e6:.0f} M parameters, "
            f"float32) at {model_dir}; chunk {CHUNK} tokens = {CHUNK * shape.kv_bytes_per_token() / 2**20:g} MiB of KV")


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg if pkg != "vllm" else "vllm-cpu")
    except PackageNotFoundError:
        return "?"


def fs_store_lines(path: Path) -> list[str]:
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return [f"L2 store (LMCache fs adapter) at {path}: {len(files)} files, {size / 2**20:.1f} MiB"]


def blockstore_store_lines(path: Path) -> list[str]:
    """``blockstore stats PATH`` (it opens the store read-only), captured for the report."""
    import io

    from blockstore.tools import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["stats", str(path)])
    lines = [f"L2 store (blockstore; `blockstore stats {path}`, read-only, after the run):"]
    lines += ["  " + line for line in buf.getvalue().splitlines()]
    if rc != 0:
        lines.append(f"  (blockstore stats exited with {rc})")
    return lines


def adapter_status_lines(status: dict | None) -> list[str]:
    """The L2 adapter's part of the server's GET /status (storage_manager.l2_adapters), in a few lines."""
    if status is None:
        return ["L2 adapter status (lmcache GET /status): not captured"]
    adapters = status.get("storage_manager", {}).get("l2_adapters", [])
    lines = [f"L2 adapter status (lmcache GET /status, after the last pass): {len(adapters)} adapter(s), "
             f"server healthy: {status.get('is_healthy')}"]
    for a in adapters:
        if a.get("type") != "BlockstoreL2Adapter":
            lines.append(f"  {a.get('type', '?')}: healthy {a.get('is_healthy')}")
            continue
        c = a.get("counters", {})

        def ratio(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.2f}"

        comp = a.get("compaction") or {}
        lines += [
            f"  blockstore at {a.get('path')}: healthy {a.get('is_healthy')}, {a.get('records')} records, "
            f"{a.get('used_bytes', 0) / 2**20:.1f} MiB, durability {a.get('durability')}, "
            f"recovered at start {a.get('recovered_keys')}",
            f"  lookups {c.get('lookup_keys')} keys, hit ratio {ratio(a.get('lookup_hit_ratio'))}; loads "
            f"{c.get('load_keys')} keys, hit ratio {ratio(a.get('load_hit_ratio'))}, "
            f"{c.get('load_bytes', 0) / 2**20:.1f} MiB; blocks/request (loads) "
            f"{ratio(a.get('load_blocks_per_request'))}",
            "  compaction: off" if not comp else
            f"  compaction: policy {comp.get('policy')}, running {comp.get('running')}, passes {comp.get('passes')}, "
            f"{comp.get('groups_tracked')} groups tracked from {comp.get('requests_observed')} lookups, "
            f"relocated {comp.get('relocated_bytes_total', 0) / 2**20:.1f} MiB, "
            f"GC copied {comp.get('gc_bytes_total', 0) / 2**20:.1f} MiB",
        ]
    return lines


# ---------------------------------------------------------------------------------------------
# Main


def l2_adapter_config(adapter: str, store: Path, metrics_port: int | None = None) -> dict:
    if adapter == "fs":
        return {"type": "fs", "base_path": str(store)}
    params: dict = {"path": str(store)}
    if metrics_port is not None:  # blockstore's Prometheus endpoint, served from the server process
        params["metrics_port"] = metrics_port
    return {"type": "plugin", "module_path": "blockstore.connector.l2_adapter",
            "class_name": "BlockstoreL2Adapter", "adapter_params": params}


def scrape_blockstore_metrics(port: int) -> dict[str, float]:
    """blockstore's own Prometheus endpoint in the lmcache server (the adapter's metrics_port), read while
    the server runs: the figures an operator's Prometheus would see."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse_prometheus(resp.read().decode())


def prepare_store(store: Path, explicit: bool, reset: bool) -> None:
    """Each run starts from an empty L2, or the cold pass would not be cold. A directory the job chose
    itself is emptied; one the user named is emptied only with --reset-store."""
    if store.exists() and any(store.iterdir()):
        if explicit and not reset:
            raise SystemExit(f"--store {store} is not empty; pass --reset-store to let the job empty it")
        log(f"emptying L2 store directory {store}")
        shutil.rmtree(store)
    store.mkdir(parents=True, exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_ports(args: argparse.Namespace) -> None:
    """The note's ports unless taken (say, by a second job on the same machine); ports named on the
    command line are used as given, and a busy one is an error at server start."""
    for attr, default in (("port", 5555), ("http_port", 8085), ("metrics_port", 9464)):
        if getattr(args, attr) is None:
            port = default
            if port_in_use(port):
                port = free_port()
                log(f"port {default} is taken; the server uses {port} instead (--{attr.replace('_', '-')})")
            setattr(args, attr, port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.main_job",
                                 description="vLLM on CPU + lmcache server with an L2 disk tier, end to end.")
    ap.add_argument("--work", default=os.environ.get("BLOCKSTORE_MAIN_JOB_WORK", "/tmp/blockstore-main-job"),
                    help="working directory: the tiny model, logs, default store (default %(default)s)")
    ap.add_argument("--store", help="L2 store directory (default WORK/store-ADAPTER; emptied at start)")
    ap.add_argument("--reset-store", action="store_true", help="allow emptying a non-empty --store")
    ap.add_argument("--adapter", choices=("blockstore", "fs"), default="blockstore",
                    help="L2 tier: blockstore's plugin or LMCache's own fs adapter (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="smaller workload, no L1 replay pass")
    ap.add_argument("--model-shape", choices=sorted(tiny_model.SHAPES), default="speed",
                    help="random-weights model of the prefix-reuse passes: speed (~100 M parameters, where "
                         "reusing KV beats recomputing it on a CPU) or tiny (4 M); default %(default)s")
    ap.add_argument("--no-blend", action="store_true",
                    help="skip the blend scenario (trained model, blend connector + LMCache via MultiConnector)")
    ap.add_argument("--port", type=int, help="lmcache server ZMQ port (default 5555, or a free one if taken)")
    ap.add_argument("--http-port", type=int, help="lmcache server HTTP port (default 8085, or a free one if taken)")
    ap.add_argument("--metrics-port", type=int,
                    help="blockstore's Prometheus endpoint in the server (default 9464, or a free one if taken)")
    ap.add_argument("--no-metrics", action="store_true",
                    help="run the server with --disable-metrics (the note's exact flags; no L1/L2 split)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    choose_ports(args)
    work = Path(args.work).resolve()
    model_dir = work / f"model-{args.model_shape}"
    store = Path(args.store).resolve() if args.store else work / f"store-{args.adapter}"
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    stop_signal: list[int] = []

    def on_signal(signum, frame):
        # Ctrl-C reaches vLLM's engine processes too (same process group); they may die first and the
        # next call fails with EngineDeadError, so the flag, not the exception type, says "interrupted".
        stop_signal.append(signum)
        raise Interrupted(signal.Signals(signum).name)

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    timings: list[tuple[str, float]] = []
    server: LMCacheServer | None = None
    llm = None

    @contextlib.contextmanager
    def phase(name: str):
        log(f"phase: {name}")
        t = time.perf_counter()
        yield
        timings.append((name, time.perf_counter() - t))
        log(f"phase: {name} done in {timings[-1][1]:.1f}s")

    passes: list[Pass] = []
    scraped: dict[str, float] | None = None
    store_lines: list[str] = []
    blend: blend_scenario.BlendOutcome | None = None
    server_status: dict | None = None
    try:
        with phase("build model"):
            tiny_model.build(model_dir, log=log, shape=args.model_shape)
            workload = build_workload(model_dir, args.quick)
            log(f"workload: {workload.description}")
        prepare_store(store, explicit=bool(args.store), reset=args.reset_store)
        adapter_cfg = l2_adapter_config(args.adapter, store,
                                        args.metrics_port if args.adapter == "blockstore" else None)

        with phase("baseline (no cache; server starting meanwhile)"):
            server = LMCacheServer(args, adapter_cfg, logs / "server-1.log")
            server.start()
            llm = make_llm(model_dir, None)
            passes.append(run_pass(llm, workload, "baseline (no cache)"))
            tiny_model.close_llm(llm)
            llm = None
        with phase("server ready"):
            server.wait_ready()
        with phase("vLLM start (connector)"):
            llm = make_llm(model_dir, args.port)
        with phase("cold pass"):
            passes.append(run_pass(llm, workload, "cold (server empty)", server))
            settled = server.wait_stored(workload.distinct_chunks())
            log(f"server settled: {settled['l1_objects']} chunks in L1 ({settled['l1_bytes'] / 2**20:.0f} MiB), "
                f"all handed to L2")
        if not args.quick:
            with phase("L1 replay"):
                passes.append(run_pass(llm, workload, "L1 replay", server))
        with phase("L2 replay (after L1 clear)"):
            server.clear_l1()
            n = server.status()["storage_manager"]["l1_manager"]["total_object_count"]
            log(f"L1 cleared ({n} objects left)")
            passes.append(run_pass(llm, workload, "L2 after L1 clear", server))
            if args.adapter == "blockstore":
                scraped = scrape_blockstore_metrics(args.metrics_port)
                log(f"blockstore metrics (scraped at :{args.metrics_port} during the job): "
                    f"{int(scraped.get('blockstore_adapter_hits_total', 0))} L2 hits, "
                    f"{int(scraped.get('blockstore_records', 0))} records, "
                    f"{int(scraped.get('blockstore_operation_seconds_count', 0))} store calls")
        with phase("restart server and vLLM"):
            tiny_model.close_llm(llm)
            llm = None
            server.stop()
            server = LMCacheServer(args, adapter_cfg, logs / "server-2.log")
            server.start()
            server.wait_ready()
            llm = make_llm(model_dir, args.port)
        with phase("replay after restart"):
            passes.append(run_pass(llm, workload, "L2 after restart", server))
            try:
                server_status = server.status()
            except Exception as e:  # noqa: BLE001 - the report says it was not captured
                log(f"GET /status failed: {type(e).__name__}: {e}")
        tiny_model.close_llm(llm)
        llm = None
        if not args.no_blend:
            with phase("blend scenario (trained model)"):
                blend_store = work / "store-blend"
                shutil.rmtree(blend_store, ignore_errors=True)
                blend = blend_scenario.run_blend_scenario(
                    TRAINED_MODEL_DIR, blend_store, blend_scenario.build_blend_workload(TRAINED_MODEL_DIR, args.quick),
                    log, lmcache_port=args.port)
        with phase("shutdown"):
            server.stop()
            server = None
        with phase("store stats"):
            store_lines = fs_store_lines(store) if args.adapter == "fs" else blockstore_store_lines(store)
            store_lines += [""] + adapter_status_lines(server_status)
    except BaseException as e:
        if not stop_signal and not isinstance(e, KeyboardInterrupt):
            raise
        log(f"interrupted by {signal.Signals(stop_signal[0]).name if stop_signal else 'SIGINT'} "
            f"({type(e).__name__}); shutting down")
        return 130
    finally:
        for sig in old_handlers:  # a second Ctrl-C must not cut the cleanup short: it stops the server
            signal.signal(sig, signal.SIG_IGN)
        try:
            if llm is not None:
                try:
                    tiny_model.close_llm(llm)
                except Exception as e:  # noqa: BLE001 - the engine may already be dead; keep cleaning up
                    log(f"vLLM shutdown: {type(e).__name__}: {e}")
            if server is not None:
                server.stop()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)

    print(report(args, workload, passes, timings, store_lines, model_dir, blend, scraped), flush=True)
    (work / "report.json").write_text(
        json.dumps(report_json(args, workload, passes, timings, blend, scraped), indent=1) + "\n")
    failed = [what for what, ok in checks(workload, passes, blend, scraped) if not ok]
    log(f"done in {time.monotonic() - T0:.1f}s" + (f"; {len(failed)} check(s) FAILED" if failed else ", all checks pass"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
