"""Seeded workload traces for the compaction benchmark (`bench/compaction.py`).

Each generator returns a `Trace`: a list of operations a store replays in order.

    Put(keys, sizes, partition, ns)   one put_many: records written together, in one placement partition
    Delete(keys, ns)                  one delete_many
    Request(keys, ns)                 one get_many: the records one inference request or one memory
                                      retrieval needs (every key is live when the request is issued)

The shapes follow the workloads of the Akashic paper (LoCoMo, WebArena, SWE-bench) plus a KV-cache
workload shaped like LMCache under vLLM, and two families of our own (issue 16): `shared` (heavy
sharing of documents between tenants) and `sessions` (many concurrent sessions, mixed chunk and KV
requests, Zipf-skewed tenant activity, updates and deletes). They are synthetic: sizes, interleaving, reuse and churn are
modelled, contents are not (the replay writes pseudo-random bytes of the given sizes).

Every generator takes `seed` (same seed, same trace, on any machine and Python hash seed) and `scale`
(1.0 is the quick size, about 10-30 MB put per trace; the benchmark's full mode uses 4.0). Scale
multiplies the number of users / tasks / chats, so the interleaving and per-request shapes stay the
same and only the amount of history grows. Every other keyword overrides one shape parameter.

Requests of fewer than two keys are not emitted: one record always sits in one block, so such reads
say nothing about placement.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

KiB = 1 << 10
NS = "bench"


@dataclass(frozen=True, slots=True)
class Put:
    keys: tuple[bytes, ...]
    sizes: tuple[int, ...]
    partition: str
    ns: str = NS


@dataclass(frozen=True, slots=True)
class Delete:
    keys: tuple[bytes, ...]
    ns: str = NS


@dataclass(frozen=True, slots=True)
class Request:
    keys: tuple[bytes, ...]
    ns: str = NS


Op = Put | Delete | Request


@dataclass(slots=True)
class Trace:
    name: str
    ops: list[Op]
    params: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        puts = [o for o in self.ops if isinstance(o, Put)]
        reqs = [o for o in self.ops if isinstance(o, Request)]
        dels = [o for o in self.ops if isinstance(o, Delete)]
        sizes: dict[tuple[str, bytes], int] = {}
        for o in self.ops:  # request bytes: each key's size at the time of the request
            if isinstance(o, Put):
                for k, n in zip(o.keys, o.sizes):
                    sizes[(o.ns, k)] = n
        keys_put = sum(len(o.keys) for o in puts)
        distinct = len({(o.ns, k) for o in puts for k in o.keys})
        return {
            "ops": len(self.ops),
            "puts": len(puts),
            "records_put": keys_put,
            "distinct_keys": distinct,
            "rewrites": keys_put - distinct,
            "bytes_put": sum(sum(o.sizes) for o in puts),
            "deletes": sum(len(o.keys) for o in dels),
            "requests": len(reqs),
            "keys_per_request": round(sum(len(r.keys) for r in reqs) / max(1, len(reqs)), 2),
            "max_record_bytes": max((max(o.sizes) for o in puts), default=0),
        }


class _Zipf:
    """Ranks 0..n-1 with P(rank r) proportional to 1 / (r + 1) ** s."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self.rng = rng
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))

    def __call__(self) -> int:
        return bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])

    def distinct(self, k: int) -> list[int]:
        k = min(k, len(self.cum))
        out: list[int] = []
        while len(out) < k:
            r = self()
            if r not in out:
                out.append(r)
        return out


class _Pool:
    """A list with O(1) add, remove and uniform choice (random.choice on a set is not seed-stable)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.pos: dict[Any, int] = {}

    def add(self, x: Any) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def remove(self, x: Any) -> None:
        i = self.pos.pop(x)
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def __contains__(self, x: Any) -> bool:
        return x in self.pos

    def __len__(self) -> int:
        return len(self.items)

    def choice(self, rng: random.Random) -> Any:
        return self.items[rng.randrange(len(self.items))]


def _interleave(rng: random.Random, concurrent: int, start: Callable[[], Any | None],
                step: Callable[[Any], bool]) -> None:
    """Run up to `concurrent` actors at once, one step of a randomly chosen actor at a time (so their
    writes interleave in time as concurrent users' do). `start()` returns a new actor or None when none
    is left; `step(actor)` returns False once the actor is finished."""
    active: list[Any] = []
    while True:
        while len(active) < concurrent:
            a = start()
            if a is None:
                break
            active.append(a)
        if not active:
            return
        i = rng.randrange(len(active))
        if not step(active[i]):
            active[i] = active[-1]
            active.pop()


def _kib_rounded(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo // 64, hi // 64) * 64


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    import math

    return int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) // 64 * 64


# ---------------------------------------------------------------------------------------------- LoCoMo


def locomo(seed: int = 0, scale: float = 1.0, *, users: int | None = None, sessions: int = 10,
           turns: tuple[int, int] = (8, 16), concurrent: int = 12, topics: int = 12, topic_zipf: float = 1.0,
           session_topics: int = 3, focus: float = 0.7, chunk_bytes: tuple[int, int] = (1 * KiB, 3584),
           chunk_p: float = 1.0, two_chunk_p: float = 0.25, request_p: float = 1.0, k: int = 8,
           update_frac: float = 0.10, delete_frac: float = 0.05, partition_by: str = "user") -> Trace:
    """Long multi-session chat memory (LoCoMo).

    `users` users (default 20 x scale) each hold `sessions` sessions of `turns` turns. At most
    `concurrent` sessions are active at once, always of different users, and a turn is taken by a
    random active session, so the sessions of different users interleave in time; a user's sessions
    are sequential but spread over the whole trace. (12 stays below the engine's 16 open blocks, one of
    which the namespace's tombstones take: with more partitions active than open blocks, the engine
    seals partially filled blocks early, which changes what is measured.)

    A turn appends, with probability `chunk_p` (the chunk gate; a session writes at least one), one
    chunk record (two with probability `two_chunk_p`) of `chunk_bytes` (1 to 3.5 KiB: below 4 KiB, so
    records pack into pages rather than each taking one) to the partition f"u{user}/s{session}". Every chunk has a topic among the user's `topics`: user-level popularity
    is Zipf(`topic_zipf`), and each session focuses on `session_topics` of them (a chunk's topic is
    one of the session's focus topics with probability `focus`).

    Churn: about `update_frac` of chunks are later rewritten (reconciliation refines a prior memory:
    a live chunk of a previous session of the same user and of one of the current session's topics
    gets a new version, written into the current session's partition) and about `delete_frac` are
    deleted (a stale memory of a previous session dropped).

    Requests: with probability `request_p` (default 1: Akashic retrieves at the admission of every
    request) a turn first retrieves memory: a topic (a focus topic of the session with probability
    `focus`, else the user's Zipf), then the `k` most recent live chunks of that topic from the user's
    previous sessions (the current session is in the prompt already).
    Topics recur within and across sessions, so the same groups are requested again and again; a group
    shifts when a session of the user ends with new chunks of its topic.
    """
    rng = random.Random(f"locomo-{seed}")
    n_users = users if users is not None else max(2, round(20 * scale))
    zipf = _Zipf(topics, topic_zipf, rng)
    next_session = [0] * n_users
    waiting = _Pool()
    for u in range(n_users):
        waiting.add(u)
    # per user: chunk id -> [session, topic, live]; per (user, topic) chunk ids in creation order
    chunks: list[dict[int, list[int]]] = [{} for _ in range(n_users)]
    by_topic: list[list[list[int]]] = [[[] for _ in range(topics)] for _ in range(n_users)]
    alive: list[_Pool] = [_Pool() for _ in range(n_users)]
    counter = [0] * n_users
    ops: list[Op] = []

    def key(u: int, cid: int) -> bytes:
        return b"locomo/u%03d/s%02d/c%05d" % (u, chunks[u][cid][0], cid)

    def start() -> dict[str, Any] | None:
        if not len(waiting):
            return None
        u = waiting.choice(rng)
        waiting.remove(u)
        s = next_session[u]
        next_session[u] += 1
        return {"u": u, "s": s, "left": rng.randint(*turns), "focus": zipf.distinct(session_topics), "wrote": 0}

    def topic_of(a: dict[str, Any]) -> int:
        return rng.choice(a["focus"]) if rng.random() < focus else zipf()

    def older_live(u: int, s: int, t: int) -> list[int]:
        return [c for c in by_topic[u][t] if chunks[u][c][2] and chunks[u][c][0] < s]

    def step(a: dict[str, Any]) -> bool:
        u, s = a["u"], a["s"]
        part = f"u{u:03d}/s{s:02d}" if partition_by == "session" else f"u{u:03d}"
        if rng.random() < request_p:
            t = topic_of(a)
            got: list[int] = []
            for c in reversed(by_topic[u][t]):
                rec = chunks[u][c]
                if rec[2] and rec[0] < s:
                    got.append(c)
                    if len(got) == k:
                        break
            if len(got) >= 2:
                ops.append(Request(tuple(key(u, c) for c in reversed(got))))  # in temporal order
        n = (2 if rng.random() < two_chunk_p else 1) if rng.random() < chunk_p or a["left"] == 1 and not a["wrote"] else 0
        a["wrote"] += n
        new = []
        for _ in range(n):
            cid = counter[u]
            counter[u] += 1
            t = topic_of(a)
            chunks[u][cid] = [s, t, 1]
            by_topic[u][t].append(cid)
            alive[u].add(cid)
            new.append(cid)
        if new:
            ops.append(Put(tuple(key(u, c) for c in new), tuple(_kib_rounded(rng, *chunk_bytes) for _ in new), part))
        for _ in range(n):
            if rng.random() < update_frac:
                cands = older_live(u, s, rng.choice(a["focus"]))
                if cands:
                    c = rng.choice(cands)
                    ops.append(Put((key(u, c),), (_kib_rounded(rng, *chunk_bytes),), part))
            if rng.random() < delete_frac and len(alive[u]):
                c = alive[u].choice(rng)
                if chunks[u][c][0] < s:
                    chunks[u][c][2] = 0
                    alive[u].remove(c)
                    ops.append(Delete((key(u, c),)))
        a["left"] -= 1
        if a["left"] == 0:
            if next_session[u] < sessions:
                waiting.add(u)
            return False
        return True

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, users=n_users, sessions=sessions, turns=turns, concurrent=concurrent,
                  topics=topics, topic_zipf=topic_zipf, session_topics=session_topics, focus=focus,
                  chunk_bytes=chunk_bytes, chunk_p=chunk_p, two_chunk_p=two_chunk_p, request_p=request_p, k=k,
                  update_frac=update_frac, delete_frac=delete_frac, partition_by=partition_by)
    return Trace("locomo", ops, params)


# -------------------------------------------------------------------------------------------- WebArena


def webarena(seed: int = 0, scale: float = 1.0, *, tasks: int | None = None, sites: int = 5,
             steps: tuple[int, int] = (6, 16), concurrent: int = 10, out_bytes: tuple[int, int] = (4 * KiB, 64 * KiB),
             two_output_p: float = 0.3, site_pages: int = 6, pages_per_task: tuple[int, int] = (1, 3),
             page_zipf: float = 1.0, window: int = 10, refresh_p: float = 0.05, discard_p: float = 0.3) -> Trace:
    """Web-agent trajectories (WebArena).

    `tasks` tasks (default 60 x scale), each on one of `sites` sites, with `steps` steps; at most
    `concurrent` tasks run at once and their steps interleave. Partition = the task id.

    Each step writes its tool outputs (one; two with probability `two_output_p`), log-uniform in
    `out_bytes` (4-64 KiB: page observations, API results). A step reads (one request) the task's
    first output (the goal and first observation), its last `window` outputs, and the site's shared
    pages the task uses (`pages_per_task` of the site's `site_pages`, Zipf(`page_zipf`): home, login,
    navigation pages that every task of the site reuses). A shared page is written by the first task
    that needs it (into that task's partition) and re-fetched (rewritten) with probability
    `refresh_p` when a task starts using it. So a task's requests grow step by step (each one
    contains the last) until the window slides, and site pages are requested by many tasks.

    Churn: when a task ends, its own outputs are deleted with probability `discard_p` (a failed
    trajectory dropped), besides the page refreshes.
    """
    rng = random.Random(f"webarena-{seed}")
    n_tasks = tasks if tasks is not None else max(2, round(60 * scale))
    pages = _Zipf(site_pages, page_zipf, rng)
    stored_pages: dict[tuple[int, int], bool] = {}
    ops: list[Op] = []
    started = itertools.count()

    def page_key(site: int, p: int) -> bytes:
        return b"web/site%d/page%02d" % (site, p)

    def start() -> dict[str, Any] | None:
        t = next(started)
        if t >= n_tasks:
            return None
        site = rng.randrange(sites)
        return {"t": t, "site": site, "left": rng.randint(*steps), "outs": [], "step": 0,
                "pages": pages.distinct(rng.randint(*pages_per_task))}

    def step(a: dict[str, Any]) -> bool:
        t, site = a["t"], a["site"]
        part = f"task{t:04d}"
        if a["step"] == 0:
            fetch = [p for p in a["pages"] if not stored_pages.get((site, p)) or rng.random() < refresh_p]
            if fetch:
                ops.append(Put(tuple(page_key(site, p) for p in fetch),
                               tuple(_log_uniform(rng, *out_bytes) for _ in fetch), part))
                for p in fetch:
                    stored_pages[(site, p)] = True
        outs: list[bytes] = a["outs"]
        keys = [page_key(site, p) for p in a["pages"]]
        if outs:
            keys += [outs[0]] + [o for o in outs[-window:] if o != outs[0]]
        if len(keys) >= 2:
            ops.append(Request(tuple(keys)))
        n = 2 if rng.random() < two_output_p else 1
        new = [b"web/t%04d/o%03d" % (t, len(outs) + i) for i in range(n)]
        outs.extend(new)
        ops.append(Put(tuple(new), tuple(_log_uniform(rng, *out_bytes) for _ in new), part))
        a["step"] += 1
        a["left"] -= 1
        if a["left"] == 0:
            if rng.random() < discard_p:
                ops.append(Delete(tuple(outs)))
            return False
        return True

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, tasks=n_tasks, sites=sites, steps=steps, concurrent=concurrent,
                  out_bytes=out_bytes, two_output_p=two_output_p, site_pages=site_pages,
                  pages_per_task=pages_per_task, page_zipf=page_zipf, window=window, refresh_p=refresh_p,
                  discard_p=discard_p)
    return Trace("webarena", ops, params)


# ------------------------------------------------------------------------------------------------- SWE


def swe(seed: int = 0, scale: float = 1.0, *, tasks: int | None = None, repos: int = 8, files: int = 48,
        chunks_per_file: tuple[int, int] = (1, 3), chunk_bytes: tuple[int, int] = (8 * KiB, 32 * KiB),
        concurrent: int = 4, steps: tuple[int, int] = (4, 10), file_zipf: float = 1.1,
        start_files: tuple[int, int] = (2, 4), explore_p: float = 0.6, max_files: int = 10,
        edit_p: float = 0.1) -> Trace:
    """Repository tasks (SWE-bench).

    `repos` repositories of `files` files, each file `chunks_per_file` chunk records of `chunk_bytes`
    (8-32 KiB). `tasks` tasks (default 60 x scale), each on a random repository, run `steps` steps;
    at most `concurrent` tasks run at once and their steps interleave. Partition = f"{repo}/{task}".

    A task starts with `start_files` files and, at each later step with probability `explore_p`,
    opens one more (up to `max_files`); files are drawn Zipf(`file_zipf`) by popularity within the
    repository, so core files recur across the repository's tasks. Each step reads (one request) every
    chunk of the task's open files: requests grow along a task and overlap between tasks of a repo.
    A file's chunks are written the first time any task opens it (stored as the agent reads it, into
    that task's partition), so a repository's files land in the store over time, among other
    repositories' writes.

    Churn: with probability `edit_p` a step edits one of its open files: all its chunks are rewritten
    (new sizes) into the task's partition.
    """
    rng = random.Random(f"swe-{seed}")
    n_tasks = tasks if tasks is not None else max(2, round(60 * scale))
    zipf = _Zipf(files, file_zipf, rng)
    n_chunks = [[rng.randint(*chunks_per_file) for _ in range(files)] for _ in range(repos)]
    stored: set[tuple[int, int]] = set()  # only tested for membership: iteration order never matters
    ops: list[Op] = []
    started = itertools.count()

    def chunk_keys(r: int, f: int) -> list[bytes]:
        return [b"swe/r%d/f%03d/c%d" % (r, f, j) for j in range(n_chunks[r][f])]

    def start() -> dict[str, Any] | None:
        t = next(started)
        if t >= n_tasks:
            return None
        return {"t": t, "r": rng.randrange(repos), "left": rng.randint(*steps), "step": 0,
                "files": zipf.distinct(rng.randint(*start_files))}

    def step(a: dict[str, Any]) -> bool:
        r, t = a["r"], a["t"]
        part = f"r{r}/t{t:04d}"
        fs: list[int] = a["files"]
        if a["step"] > 0 and rng.random() < explore_p and len(fs) < max_files:
            f = zipf()
            if f not in fs:
                fs.append(f)
        missing = [f for f in fs if (r, f) not in stored]
        if missing:
            keys = [k for f in missing for k in chunk_keys(r, f)]
            ops.append(Put(tuple(keys), tuple(_kib_rounded(rng, *chunk_bytes) for _ in keys), part))
            stored.update((r, f) for f in missing)
        req = [k for f in fs for k in chunk_keys(r, f)]
        if len(req) >= 2:
            ops.append(Request(tuple(req)))
        if rng.random() < edit_p:
            keys = chunk_keys(r, rng.choice(fs))
            ops.append(Put(tuple(keys), tuple(_kib_rounded(rng, *chunk_bytes) for _ in keys), part))
        a["step"] += 1
        a["left"] -= 1
        return a["left"] > 0

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, tasks=n_tasks, repos=repos, files=files, chunks_per_file=chunks_per_file,
                  chunk_bytes=chunk_bytes, concurrent=concurrent, steps=steps, file_zipf=file_zipf,
                  start_files=start_files, explore_p=explore_p, max_files=max_files, edit_p=edit_p)
    return Trace("swe", ops, params)


# --------------------------------------------------------------------------------------------- LMCache


def lmcache(seed: int = 0, scale: float = 1.0, *, chats: int | None = None, tenants: int = 2,
            turns: tuple[int, int] = (3, 8), concurrent: int = 8, kv_bytes: int = 256 * KiB,
            chunks_per_turn: tuple[int, int] = (1, 2), docs: int = 6, doc_chunks: tuple[int, int] = (2, 3),
            doc_p: float = 0.3, doc_zipf: float = 1.0, evict_p: float = 0.5) -> Trace:
    """KV-cache chunks of multi-turn chats (LMCache under vLLM).

    `chats` chats (default 12 x scale) of `tenants` tenants (models; each tenant is a namespace
    f"model-{i}"), `turns` turns each; at most `concurrent` chats are active at once and their turns
    interleave. Every KV record is one 256-token chunk of `kv_bytes` (256 KiB here; the real KV of
    256 tokens is larger, which only scales bytes). Partition = the chat id (the request lineage).

    A chat's prompt starts with its tenant's system-prompt chunk (shared by all chats of the tenant).
    Each turn, with probability `doc_p`, a RAG document (Zipf(`doc_zipf`) over the tenant's `docs`
    documents of `doc_chunks` chunks) is inserted into the prompt; document chunk keys are
    position-independent (CacheBlend-style), so chats reuse one document's KV at different positions.
    The turn's request is every stored chunk of its prompt (system prompt, earlier turns, documents):
    a turn's request contains the previous turn's. Then the missing document chunks (first use in the
    trace: written into this chat's partition) and the turn's new chunks (`chunks_per_turn`: the
    user's message and the reply, position-dependent keys) are put.

    Churn: when a chat ends, its own chunks are evicted (deleted) with probability `evict_p`; system
    prompts and documents stay.
    """
    rng = random.Random(f"lmcache-{seed}")
    n_chats = chats if chats is not None else max(2, round(12 * scale))
    zipf = _Zipf(docs, doc_zipf, rng)
    n_doc_chunks = [[rng.randint(*doc_chunks) for _ in range(docs)] for _ in range(tenants)]
    stored: set[tuple[str, bytes]] = set()  # (namespace, key); only tested for membership
    ops: list[Op] = []
    started = itertools.count()

    def start() -> dict[str, Any] | None:
        c = next(started)
        if c >= n_chats:
            return None
        tenant = rng.randrange(tenants)
        return {"c": c, "ns": f"model-{tenant}", "tenant": tenant, "left": rng.randint(*turns),
                "prefix": [b"sys/prompt0"], "own": [], "docs": []}

    def step(a: dict[str, Any]) -> bool:
        c, ns, tenant = a["c"], a["ns"], a["tenant"]
        part = f"chat{c:04d}"
        prompt: list[bytes] = list(a["prefix"])
        new_doc: list[bytes] = []
        if rng.random() < doc_p:
            d = zipf()
            if d not in a["docs"]:
                a["docs"].append(d)
                keys = [b"doc/%02d/c%d" % (d, j) for j in range(n_doc_chunks[tenant][d])]
                prompt += keys
                new_doc = [k for k in keys if (ns, k) not in stored]
        req = [k for k in prompt if (ns, k) in stored]
        if len(req) >= 2:
            ops.append(Request(tuple(req), ns))
        fresh = [k for k in prompt if (ns, k) not in stored and k not in new_doc]  # the system prompt, once
        if fresh or new_doc:
            ops.append(Put(tuple(fresh + new_doc), tuple(kv_bytes for _ in fresh + new_doc), part, ns))
            stored.update((ns, k) for k in fresh + new_doc)
        n = rng.randint(*chunks_per_turn)
        own = [b"chat%04d/p%03d" % (c, len(prompt) + i) for i in range(n)]
        ops.append(Put(tuple(own), tuple(kv_bytes for _ in own), part, ns))
        stored.update((ns, k) for k in own)
        a["own"].extend(own)
        a["prefix"] = prompt + own
        a["left"] -= 1
        if a["left"] == 0:
            if rng.random() < evict_p:
                ops.append(Delete(tuple(a["own"]), ns))
                stored.difference_update((ns, k) for k in a["own"])
            return False
        return True

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, chats=n_chats, tenants=tenants, turns=turns, concurrent=concurrent,
                  kv_bytes=kv_bytes, chunks_per_turn=chunks_per_turn, docs=docs, doc_chunks=doc_chunks,
                  doc_p=doc_p, doc_zipf=doc_zipf, evict_p=evict_p)
    return Trace("lmcache", ops, params)


# ------------------------------------------------------------------------------- new families (issue 16)


def shared(seed: int = 0, scale: float = 1.0, *, sessions: int | None = None, tenants: int = 16,
           steps: tuple[int, int] = (6, 12), concurrent: int = 12, docs: int = 40, doc_chunks: tuple[int, int] = (2, 4),
           doc_bytes: tuple[int, int] = (8 * KiB, 64 * KiB), doc_zipf: float = 1.1, docs_per_request: tuple[int, int] = (2, 3),
           own_bytes: tuple[int, int] = (4 * KiB, 32 * KiB), own_per_request: int = 4, revise_p: float = 0.03,
           delete_p: float = 0.3) -> Trace:
    """Heavy sharing between tenants: every request reads shared documents most tenants read too.

    `sessions` sessions (default 60 x scale) of `tenants` tenants, `steps` steps each, `concurrent` at
    once, interleaved. A corpus of `docs` documents of `doc_chunks` records of `doc_bytes` (log-uniform)
    is read by all: each step's request is `docs_per_request` documents drawn Zipf(`doc_zipf`) (all
    their records) plus the session's last `own_per_request` private records; a document is written
    by the first session that needs it, into that session's partition (a cache fills on first use).
    Then the step writes 1-2 private records of `own_bytes` into its partition (tenant/session). With
    probability `revise_p` a step first revises one record of a document (rewritten, same size, into
    the step's partition: whoever edits it). A finished session's private records are deleted with
    probability `delete_p`. The same document record is in many tenants' requests: one placement
    cannot sit next to all of them, which is what this family measures.
    """
    rng = random.Random(f"shared-{seed}")
    n_sessions = sessions if sessions is not None else max(2, round(60 * scale))
    zipf = _Zipf(docs, doc_zipf, rng)
    doc_sizes = [[_log_uniform(rng, *doc_bytes) for _ in range(rng.randint(*doc_chunks))] for _ in range(docs)]
    written: set[int] = set()
    ops: list[Op] = []
    started = itertools.count()

    def start() -> dict[str, Any] | None:
        i = next(started)
        if i >= n_sessions:
            return None
        return {"i": i, "tenant": rng.randrange(tenants), "left": rng.randint(*steps), "own": []}

    def step(a: dict[str, Any]) -> bool:
        part = f"t{a['tenant']:02d}/s{a['i']:04d}"
        if written and rng.random() < revise_p:
            d = sorted(written)[rng.randrange(len(written))]
            j = rng.randrange(len(doc_sizes[d]))
            ops.append(Put((b"doc/%02d/%d" % (d, j),), (doc_sizes[d][j],), part))
        chosen = [zipf() for _ in range(rng.randint(*docs_per_request))]
        fresh = [d for d in dict.fromkeys(chosen) if d not in written]
        if fresh:
            keys = [b"doc/%02d/%d" % (d, j) for d in fresh for j in range(len(doc_sizes[d]))]
            ops.append(Put(tuple(keys), tuple(doc_sizes[d][j] for d in fresh for j in range(len(doc_sizes[d]))), part))
            written.update(fresh)
        req = [b"doc/%02d/%d" % (d, j) for d in dict.fromkeys(chosen) for j in range(len(doc_sizes[d]))]
        req += a["own"][-own_per_request:]
        if len(req) >= 2:
            ops.append(Request(tuple(req)))
        own = [b"s%04d/r%02d" % (a["i"], len(a["own"]) + j) for j in range(rng.randint(1, 2))]
        ops.append(Put(tuple(own), tuple(_kib_rounded(rng, *own_bytes) for _ in own), part))
        a["own"].extend(own)
        a["left"] -= 1
        if a["left"] == 0:
            if rng.random() < delete_p:
                ops.append(Delete(tuple(a["own"])))
            return False
        return True

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, sessions=n_sessions, tenants=tenants, steps=steps, concurrent=concurrent,
                  docs=docs, doc_chunks=doc_chunks, doc_bytes=doc_bytes, doc_zipf=doc_zipf,
                  docs_per_request=docs_per_request, own_bytes=own_bytes, own_per_request=own_per_request,
                  revise_p=revise_p, delete_p=delete_p)
    return Trace("shared", ops, params)


def sessions(seed: int = 0, scale: float = 1.0, *, n_sessions: int | None = None, tenants: int = 50,
             tenant_zipf: float = 1.0, steps: tuple[int, int] = (3, 8), concurrent: int = 24,
             chunk_bytes: tuple[int, int] = (2 * KiB, 64 * KiB), kv_bytes: tuple[int, int] = (256 * KiB, 1024 * KiB),
             kv_p: float = 0.12, request_keys: tuple[int, int] = (4, 12), noise_p: float = 0.2,
             update_p: float = 0.15, delete_p: float = 0.08) -> Trace:
    """Many concurrent sessions with mixed chunk and KV requests and Zipf-skewed activity.

    `n_sessions` sessions (default 40 x scale), `concurrent` at once, interleaved; each belongs to one
    of `tenants` tenants drawn Zipf(`tenant_zipf`) (a few tenants are most of the traffic) and runs
    `steps` steps. A step writes 1-3 chunk records of `chunk_bytes` (log-uniform) and, with
    probability `kv_p`, one KV record of `kv_bytes` (64 KiB steps), all into the session's partition
    (`Store.session_partition` lets a real caller put both kinds there). Before writing, the step
    issues a topic request of `request_keys` records mixing the kinds: half from the session's own
    most recent records, the rest from the tenant's earlier sessions; with probability `noise_p` a
    noise request instead (records of the tenant drawn uniformly). With probability `update_p` the
    step rewrites one of the tenant's records (into this session's partition) and with `delete_p`
    deletes one.
    """
    rng = random.Random(f"sessions-{seed}")
    total = n_sessions if n_sessions is not None else max(2, round(40 * scale))
    zipf = _Zipf(tenants, tenant_zipf, rng)
    pools = [_Pool() for _ in range(tenants)]  # each tenant's live keys
    size: dict[bytes, int] = {}
    ops: list[Op] = []
    started = itertools.count()

    def start() -> dict[str, Any] | None:
        i = next(started)
        if i >= total:
            return None
        return {"i": i, "tenant": zipf(), "left": rng.randint(*steps), "own": []}

    def request(a: dict[str, Any], pool: _Pool) -> list[bytes]:
        want = rng.randint(*request_keys)
        if rng.random() < noise_p:
            return list(dict.fromkeys(pool.choice(rng) for _ in range(want))) if len(pool) else []
        own = [k for k in a["own"] if k in pool][-(want // 2):]
        rest = [pool.choice(rng) for _ in range(want - len(own))] if len(pool) else []
        return list(dict.fromkeys(own + rest))

    def step(a: dict[str, Any]) -> bool:
        pool = pools[a["tenant"]]
        part = f"t{a['tenant']:02d}/s{a['i']:04d}"
        req = request(a, pool)
        if len(req) >= 2:
            ops.append(Request(tuple(req)))
        if len(pool) and rng.random() < update_p:
            k = pool.choice(rng)
            ops.append(Put((k,), (size[k],), part))
        if len(pool) > 1 and rng.random() < delete_p:
            k = pool.choice(rng)
            ops.append(Delete((k,)))
            pool.remove(k)
        base = len(a["own"])
        keys = [b"s%04d/c%02d" % (a["i"], base + j) for j in range(rng.randint(1, 3))]
        sizes = [_log_uniform(rng, *chunk_bytes) for _ in keys]
        if rng.random() < kv_p:
            keys.append(b"s%04d/kv%02d" % (a["i"], base))
            sizes.append(rng.randint(kv_bytes[0] // (64 * KiB), kv_bytes[1] // (64 * KiB)) * 64 * KiB)
        ops.append(Put(tuple(keys), tuple(sizes), part))
        for k, n in zip(keys, sizes):
            size[k] = n
            pool.add(k)
        a["own"].extend(keys)
        a["left"] -= 1
        return a["left"] > 0

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, n_sessions=total, tenants=tenants, tenant_zipf=tenant_zipf, steps=steps,
                  concurrent=concurrent, chunk_bytes=chunk_bytes, kv_bytes=kv_bytes, kv_p=kv_p,
                  request_keys=request_keys, noise_p=noise_p, update_p=update_p, delete_p=delete_p)
    return Trace("sessions", ops, params)


def heldout(seed: int = 0, scale: float = 1.0, **overrides: Any) -> Trace:
    """A held-out check (issue 16), to which no constant is tuned: the independent workload
    the issue describes (200 tenants with Zipf-skewed activity, interleaved sessions, chunk records of
    2-64 KiB and KV records of 256 KiB-1 MiB, 15 % updates, 8 % deletes, topic requests of 4-12 records
    mixing both kinds, 20 % noise requests), built by the `sessions` generator with other parameters
    (more tenants, more skew, more KV, longer and more concurrent sessions) and its own seeds."""
    knobs: dict[str, Any] = dict(n_sessions=max(2, round(60 * scale)), tenants=200, tenant_zipf=1.2, concurrent=40,
                                 steps=(2, 10), kv_p=0.3, chunk_bytes=(2 * KiB, 64 * KiB),
                                 kv_bytes=(256 * KiB, 1024 * KiB), request_keys=(4, 12), noise_p=0.2, update_p=0.15,
                                 delete_p=0.08)
    knobs.update(overrides)
    t = sessions(1000 + seed, scale, **knobs)
    return Trace("heldout", t.ops, {**t.params, "seed": seed, "generator_seed": 1000 + seed})


def heldout_ns(seed: int = 0, scale: float = 1.0, **overrides: Any) -> Trace:
    """`heldout` as a caller using namespaces for tenants would write it through the public API: each
    tenant its own namespace f"t{i:03d}", partition = the session (issue 16: the outside party's
    workload has 200 tenants; with one namespace for all, placing by namespace is a plain log, with a
    namespace each it is placing by tenant). Same operations, sizes and seeds as `heldout`."""
    t = heldout(seed, scale, **overrides)
    owner: dict[bytes, str] = {}
    ops: list[Op] = []
    for o in t.ops:
        if isinstance(o, Put):
            tenant, session = o.partition.split("/", 1)
            for k in o.keys:
                owner.setdefault(k, tenant)
            ops.append(Put(o.keys, o.sizes, session, tenant))
        elif isinstance(o, Delete):
            ops.append(Delete(o.keys, owner[o.keys[0]]))
        else:
            ops.append(Request(o.keys, owner[o.keys[0]]))
    return Trace("heldout_ns", ops, {**t.params, "namespaces": "tenant"})


def agents(seed: int = 0, scale: float = 1.0, *, conversations: int | None = None, tenants: int = 200,
           tenant_zipf: float = 0.9, turns: tuple[int, int] = (3, 10), concurrent: int = 48,
           kv_bytes: tuple[int, int] = (64 * KiB, 256 * KiB), kv_p: float = 0.7, note_bytes: tuple[int, int] = (1 * KiB, 32 * KiB),
           note_p: float = 0.5, topics: int = 8, topic_zipf: float = 1.0, prefix_keys: int = 8,
           notes_per_request: tuple[int, int] = (2, 5), noise_p: float = 0.1, update_p: float = 0.1,
           delete_p: float = 0.05, evict_p: float = 0.7) -> Trace:
    """A second held-out workload (issue 16), written once and frozen: no constant of the engine or of
    compaction is chosen by its figures; it is replayed only when named (--traces ... agents).

    Agent conversations of `tenants` tenants (each its own namespace f"tenant{i:03d}", activity
    Zipf(`tenant_zipf`)); `conversations` of them (default 40 x scale), `turns` turns each, `concurrent`
    at once, interleaved; partition = the conversation. A turn first issues one request: the
    conversation's last `prefix_keys` KV records (its cached prefix) plus `notes_per_request` memory
    notes of the tenant on one topic (Zipf(`topic_zipf`) over `topics`), newest first, written by any
    of the tenant's conversations; with probability `noise_p` instead a request of 2-6 notes of the
    tenant drawn uniformly. Then the turn writes, with probability `kv_p`, one KV record of `kv_bytes`
    (64 KiB steps) and, with probability `note_p`, 1-3 notes of `note_bytes` (log-uniform) with topics;
    with probability `update_p` it rewrites one of the tenant's notes and with `delete_p` deletes one.
    When a conversation ends its KV records are deleted with probability `evict_p`.
    """
    rng = random.Random(f"agents-{seed}")
    total = conversations if conversations is not None else max(2, round(40 * scale))
    pick_tenant = _Zipf(tenants, tenant_zipf, rng)
    pick_topic = _Zipf(topics, topic_zipf, rng)
    notes: list[list[list[bytes]]] = [[[] for _ in range(topics)] for _ in range(tenants)]  # live, by topic
    pools = [_Pool() for _ in range(tenants)]
    size: dict[tuple[int, bytes], int] = {}
    made = [0] * tenants
    ops: list[Op] = []
    started = itertools.count()

    def start() -> dict[str, Any] | None:
        c = next(started)
        return None if c >= total else {"c": c, "t": pick_tenant(), "left": rng.randint(*turns), "kv": []}

    def drop_note(t: int, k: bytes, ns: str) -> None:
        ops.append(Delete((k,), ns))
        pools[t].remove(k)
        for lst in notes[t]:
            if k in lst:
                lst.remove(k)

    def step(a: dict[str, Any]) -> bool:
        t, ns, part = a["t"], f"tenant{a['t']:03d}", f"conv{a['c']:05d}"
        pool = pools[t]
        if rng.random() < noise_p and len(pool) >= 2:
            req = list(dict.fromkeys(pool.choice(rng) for _ in range(rng.randint(2, 6))))
        else:
            topic = notes[t][pick_topic()]
            req = a["kv"][-prefix_keys:] + topic[-rng.randint(*notes_per_request):][::-1]
        if len(req) >= 2:
            ops.append(Request(tuple(req), ns))
        keys: list[bytes] = []
        sizes: list[int] = []
        if rng.random() < kv_p:
            keys.append(b"conv%05d/kv%03d" % (a["c"], len(a["kv"])))
            sizes.append(rng.randint(kv_bytes[0] // (64 * KiB), kv_bytes[1] // (64 * KiB)) * 64 * KiB)
            a["kv"].append(keys[-1])
        if rng.random() < note_p:
            for _ in range(rng.randint(1, 3)):
                k = b"note/%06d" % made[t]
                made[t] += 1
                keys.append(k)
                sizes.append(_log_uniform(rng, *note_bytes))
                notes[t][pick_topic()].append(k)
                pool.add(k)
        if len(pool) and rng.random() < update_p:
            k = pool.choice(rng)
            if k not in keys:
                keys.append(k)
                sizes.append(size[(t, k)])
        if keys:
            ops.append(Put(tuple(keys), tuple(sizes), part, ns))
            size.update(((t, k), n) for k, n in zip(keys, sizes))
        if len(pool) > 2 and rng.random() < delete_p:
            drop_note(t, pool.choice(rng), ns)
        a["left"] -= 1
        if a["left"] > 0:
            return True
        if a["kv"] and rng.random() < evict_p:
            ops.append(Delete(tuple(a["kv"]), ns))
        return False

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, conversations=total, tenants=tenants, tenant_zipf=tenant_zipf, turns=turns,
                  concurrent=concurrent, kv_bytes=kv_bytes, kv_p=kv_p, note_bytes=note_bytes, note_p=note_p,
                  topics=topics, topic_zipf=topic_zipf, prefix_keys=prefix_keys, notes_per_request=notes_per_request,
                  noise_p=noise_p, update_p=update_p, delete_p=delete_p, evict_p=evict_p)
    return Trace("agents", ops, params)


def workspaces(seed: int = 0, scale: float = 1.0, *, sessions: int | None = None, workspaces: int = 120,
               workspace_zipf: float = 1.1, turns: tuple[int, int] = (2, 12), concurrent: int = 32,
               kv_bytes: tuple[int, int] = (128 * KiB, 768 * KiB), kv_p: float = 0.6,
               message_bytes: tuple[int, int] = (1 * KiB, 8 * KiB), docs: tuple[int, int] = (2, 30),
               doc_chunks: tuple[int, int] = (3, 20), chunk_bytes: tuple[int, int] = (4 * KiB, 48 * KiB),
               doc_zipf: float = 0.8, docs_per_request: tuple[int, int] = (1, 2), chunks_per_doc: tuple[int, int] = (2, 4),
               history_kv: int = 6, reingest_p: float = 0.04, noise_p: float = 0.15, evict_p: float = 0.5,
               delete_doc_p: float = 0.01) -> Trace:
    """A third held-out workload (issue 16), written and frozen before its first measurement: no constant
    of the engine or of compaction is chosen by its figures; replayed only when named.

    Retrieval-augmented chat over shared workspaces. `workspaces` workspaces (each its own namespace
    f"ws{i:03d}", activity Zipf(`workspace_zipf`)) each hold a corpus of `docs` documents of
    `doc_chunks` chunk records (`chunk_bytes`, log-uniform), ingested by the workspace's ingest
    partition when the workspace is first used. `sessions` user sessions (default 50 x scale),
    `concurrent` at once, interleaved, `turns` turns each; partition = the user's session. A turn reads
    (one request) the session's last `history_kv` KV records and last 2 messages plus
    `chunks_per_doc` chunks of each of `docs_per_request` documents drawn Zipf(`doc_zipf`) from the
    workspace's corpus; with probability `noise_p` instead 2-8 records of the workspace drawn
    uniformly. Then it writes one message (`message_bytes`) and, with probability `kv_p`, one KV record
    (`kv_bytes`, 64 KiB steps). With probability `reingest_p` a turn first re-ingests one document (all
    its chunks rewritten by the ingest partition) and with `delete_doc_p` deletes one. A finished
    session's KV records are deleted with probability `evict_p`.
    """
    rng = random.Random(f"workspaces-{seed}")
    total = sessions if sessions is not None else max(2, round(50 * scale))
    pick_ws = _Zipf(workspaces, workspace_zipf, rng)
    corpus: dict[int, list[list[bytes]]] = {}  # workspace -> live documents' chunk keys
    sizes: dict[tuple[int, bytes], int] = {}
    pools: dict[int, _Pool] = {}
    made_docs: dict[int, int] = {}
    ops: list[Op] = []
    started = itertools.count()

    def ingest(w: int, ns: str) -> None:
        d = made_docs.get(w, 0)
        made_docs[w] = d + 1
        keys = tuple(b"doc%04d/c%02d" % (d, j) for j in range(rng.randint(*doc_chunks)))
        lens = tuple(_log_uniform(rng, *chunk_bytes) for _ in keys)
        ops.append(Put(keys, lens, "ingest", ns))
        corpus[w].append(list(keys))
        for k, n in zip(keys, lens):
            sizes[(w, k)] = n
            pools[w].add(k)

    def start() -> dict[str, Any] | None:
        i = next(started)
        if i >= total:
            return None
        w = pick_ws()
        ns = f"ws{w:03d}"
        if w not in corpus:
            corpus[w], pools[w] = [], _Pool()
            for _ in range(rng.randint(*docs)):
                ingest(w, ns)
        return {"i": i, "w": w, "ns": ns, "left": rng.randint(*turns), "kv": [], "msg": []}

    def step(a: dict[str, Any]) -> bool:
        w, ns, part = a["w"], a["ns"], f"user{a['i']:04d}"
        pool, docs_now = pools[w], corpus[w]
        if docs_now and rng.random() < reingest_p:
            doc = docs_now[rng.randrange(len(docs_now))]
            ops.append(Put(tuple(doc), tuple(sizes[(w, k)] for k in doc), "ingest", ns))
        if len(docs_now) > 1 and rng.random() < delete_doc_p:
            doc = docs_now.pop(rng.randrange(len(docs_now)))
            ops.append(Delete(tuple(doc), ns))
            for k in doc:
                pool.remove(k)
        if rng.random() < noise_p and len(pool) >= 2:
            req = list(dict.fromkeys(pool.choice(rng) for _ in range(rng.randint(2, 8))))
        else:
            req = a["kv"][-history_kv:] + a["msg"][-2:]
            if docs_now:
                ranks = _Zipf(len(docs_now), doc_zipf, rng)
                for d in dict.fromkeys(ranks() for _ in range(rng.randint(*docs_per_request))):
                    doc = docs_now[d]
                    req += rng.sample(doc, min(len(doc), rng.randint(*chunks_per_doc)))
        if len(req) >= 2:
            ops.append(Request(tuple(dict.fromkeys(req)), ns))
        n = len(a["msg"])
        keys, lens = [b"%s/m%03d" % (part.encode(), n)], [_log_uniform(rng, *message_bytes)]
        a["msg"].append(keys[0])
        if rng.random() < kv_p:
            keys.append(b"%s/kv%03d" % (part.encode(), n))
            lens.append(rng.randint(kv_bytes[0] // (64 * KiB), kv_bytes[1] // (64 * KiB)) * 64 * KiB)
            a["kv"].append(keys[-1])
        ops.append(Put(tuple(keys), tuple(lens), part, ns))
        for k in keys:
            pool.add(k)
        a["left"] -= 1
        if a["left"] > 0:
            return True
        if a["kv"] and rng.random() < evict_p:
            ops.append(Delete(tuple(a["kv"]), ns))
            for k in a["kv"]:
                pool.remove(k)
        return False

    _interleave(rng, concurrent, start, step)
    params = dict(seed=seed, scale=scale, sessions=total, workspaces=workspaces, workspace_zipf=workspace_zipf,
                  turns=turns, concurrent=concurrent, kv_bytes=kv_bytes, kv_p=kv_p, message_bytes=message_bytes,
                  docs=docs, doc_chunks=doc_chunks, chunk_bytes=chunk_bytes, doc_zipf=doc_zipf,
                  docs_per_request=docs_per_request, chunks_per_doc=chunks_per_doc, history_kv=history_kv,
                  reingest_p=reingest_p, noise_p=noise_p, evict_p=evict_p, delete_doc_p=delete_doc_p)
    return Trace("workspaces", ops, params)


# ------------------------------------------------------------------------- randomized family (H65)


def random_shape(seed: int = 0, scale: float = 1.0, **overrides: Any) -> Trace:
    """A randomized family (issue 16: figures checked on workloads the project has not seen): each seed
    draws its own shape, then a trace of that shape. Written once, before any measurement of it; no
    constant of the engine or of compaction may be chosen by its figures. Replayed only when named.

    Drawn per seed (`params` holds every draw; `overrides` replaces one):
    - `block_size` 256 KiB..16 MiB (a power of two): the store's block size for this trace;
    - `tenants` 1..500 (log-uniform), activity Zipf(`tenant_zipf` 0..1.5); namespaces `ns_mode`: one for
      all, one per tenant, or tenants spread over 2..16 namespaces; writers name as partition the session
      or the tenant (`partition_by`);
    - `concurrent` sessions at once 1..2000 (log-uniform), 1..`max_steps` (2..40) steps per session; the
      byte budget keeps 3 sessions per slot over the trace by lowering the steps (to 4), then the concurrency
      (`max_steps_effective`, `concurrent_effective`);
    - record sizes: one log-uniform mode [lo, hi] within 1 KiB..2 MiB (and at most half a block), with
      probability 0.5 a second mode drawn the same way for a share `mode_b_p` of the records; 1..`max_put`
      records per put;
    - reads: with probability `read_p` a step first issues one request of 2..`max_request` keys: with
      `repeat_p` an earlier request of the tenant again (its live keys); else a share `own_p` of the
      session's newest records and the rest picks from the tenant's live records, uniform or skewed to the
      newest (`recent_skew`), plus with `doc_p` 1..3 chunks of a document shared by the namespace's
      tenants (`docs` documents of `doc_chunks` chunks, written when first read);
    - churn: `update_p` rewrites one of the tenant's records, `delete_p` deletes one, `evict_p` deletes a
      finished session's records.
    The trace stops starting sessions once `bytes_target` is put (16-48 MB, or 400 records' worth up to
    128 MB, x scale).
    """
    rng = random.Random(f"random-{seed}")
    d: dict[str, Any] = {}

    def draw(name: str, make: Callable[[], Any]) -> Any:
        d[name] = overrides[name] if name in overrides else make()
        return d[name]

    def log_int(lo: float, hi: float) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))

    bs = draw("block_size", lambda: 1 << rng.randint(18, 24))
    cap = min(2048 * KiB, bs // 2)

    def mode() -> tuple[int, int]:
        lo = min(cap, log_int(1 * KiB, 256 * KiB))
        hi = min(cap, max(lo, int(lo * math.exp(rng.uniform(0, math.log(32))))))
        return (lo // 64 * 64 or 64, hi // 64 * 64 or 64)

    mode_a = draw("mode_a", mode)
    mode_b = draw("mode_b", lambda: mode() if rng.random() < 0.5 else None)
    mode_b_p = draw("mode_b_p", lambda: rng.uniform(0.05, 0.5) if mode_b else 0.0)
    max_put = draw("max_put", lambda: rng.randint(1, 8))
    tenants = draw("tenants", lambda: log_int(1, 500))
    tenant_zipf = draw("tenant_zipf", lambda: rng.uniform(0.0, 1.5))
    ns_mode = draw("ns_mode", lambda: rng.choice(["one", "tenant", "groups"]))
    n_groups = draw("ns_groups", lambda: rng.randint(2, 16) if ns_mode == "groups" else 1)
    partition_by = draw("partition_by", lambda: rng.choice(["session", "session", "tenant"]))
    max_steps = draw("max_steps", lambda: rng.randint(2, 40))
    read_p = draw("read_p", lambda: rng.uniform(0.3, 1.0))
    max_request = draw("max_request", lambda: rng.randint(2, 32))
    repeat_p = draw("repeat_p", lambda: rng.uniform(0.0, 0.8))
    own_p = draw("own_p", lambda: rng.uniform(0.0, 1.0))
    recent_skew = draw("recent_skew", lambda: rng.choice([0.0, rng.uniform(0.5, 1.5)]))
    doc_p = draw("doc_p", lambda: rng.choice([0.0, rng.uniform(0.1, 0.6)]))
    docs = draw("docs", lambda: rng.randint(2, 60) if doc_p else 0)
    doc_chunks = draw("doc_chunks", lambda: rng.randint(2, 12))
    update_p = draw("update_p", lambda: rng.uniform(0.0, 0.3))
    delete_p = draw("delete_p", lambda: rng.uniform(0.0, 0.15))
    evict_p = draw("evict_p", lambda: rng.uniform(0.0, 0.8))
    concurrent = draw("concurrent", lambda: log_int(1, 2000))
    mean_rec = ((mode_a[0] + mode_a[1]) / 2 * (1 - mode_b_p) + (sum(mode_b) / 2 * mode_b_p if mode_b else 0))
    # 16-48 MB, or 400 records' worth where records are large (up to 128 MB)
    target = draw("bytes_target", lambda: int(max(rng.uniform(16e6, 48e6), min(128e6, 400 * mean_rec)) * scale))
    # at least 3 sessions per slot over the trace (sessions start and end while others run): the byte budget
    # lowers the steps per session first (to no fewer than 4), then the concurrency (large records, many writers)
    per_step = mean_rec * (max_put + 1) / 2
    steps_min = min(max_steps, 4)
    d["concurrent_effective"] = c_eff = max(1, min(concurrent, int(target / (3 * per_step * (steps_min + 1) / 2))))
    d["max_steps_effective"] = steps_eff = max(steps_min, min(max_steps, int(2 * target / (3 * c_eff * per_step)) - 1))

    def size() -> int:
        lo, hi = mode_b if mode_b and rng.random() < mode_b_p else mode_a
        return _log_uniform(rng, lo, hi) if hi > lo else lo

    zipf = _Zipf(tenants, tenant_zipf, rng)
    ns_of = [("bench" if ns_mode == "one" else f"t{t:03d}" if ns_mode == "tenant" else f"g{t % n_groups:02d}")
             for t in range(tenants)]
    pools = [_Pool() for _ in range(tenants)]  # each tenant's live records, in write order below
    order: list[list[bytes]] = [[] for _ in range(tenants)]  # each tenant's records, newest last (may hold dead)
    history: list[list[tuple[bytes, ...]]] = [[] for _ in range(tenants)]
    doc_keys: dict[tuple[str, int], list[bytes]] = {}
    doc_pick = _Zipf(max(1, docs), 1.0, rng)
    live: dict[tuple[str, bytes], int] = {}
    ops: list[Op] = []
    put = [0]
    started = itertools.count()

    def write(keys: list[bytes], sizes: list[int], part: str, ns: str) -> None:
        ops.append(Put(tuple(keys), tuple(sizes), part, ns))
        put[0] += sum(sizes)
        for k, n in zip(keys, sizes):
            live[(ns, k)] = n

    def start() -> dict[str, Any] | None:
        if put[0] >= target:
            return None
        i = next(started)
        return {"i": i, "t": zipf(), "left": rng.randint(1, steps_eff), "own": []}

    def pick(t: int) -> bytes | None:
        pool, seq = pools[t], order[t]
        if not len(pool):
            return None
        if recent_skew and seq:
            for _ in range(8):  # newest first, Zipf-like over the write order; dead picks retried
                k = seq[-1 - min(len(seq) - 1, int(rng.paretovariate(recent_skew)) - 1)]
                if k in pool:
                    return k
        return pool.choice(rng)

    def request(a: dict[str, Any], ns: str) -> list[bytes]:
        t = a["t"]
        want = rng.randint(2, max_request)
        if history[t] and rng.random() < repeat_p:
            old = history[t][rng.randrange(len(history[t]))]
            return [k for k in old if (ns, k) in live]
        own = [k for k in a["own"] if (ns, k) in live][-round(want * own_p):] if own_p * want >= 1 else []
        req = list(own)
        for _ in range(want - len(own)):
            k = pick(t)
            if k is not None:
                req.append(k)
        if docs and rng.random() < doc_p:
            dk = doc_keys.get((ns, doc_pick()))
            if dk:
                req += rng.sample(dk, min(len(dk), rng.randint(1, 3)))
        return list(dict.fromkeys(req))

    def step(a: dict[str, Any]) -> bool:
        t = a["t"]
        ns = ns_of[t]
        part = f"t{t:03d}/s{a['i']:05d}" if partition_by == "session" else f"t{t:03d}"
        if docs and rng.random() < doc_p:
            dn = doc_pick()
            if (ns, dn) not in doc_keys:  # a shared document, written when first needed
                keys = [b"doc%03d/c%02d" % (dn, j) for j in range(doc_chunks)]
                write(keys, [size() for _ in keys], part, ns)
                doc_keys[(ns, dn)] = keys
        if rng.random() < read_p:
            req = request(a, ns)
            if len(req) >= 2:
                ops.append(Request(tuple(req), ns))
                history[t].append(tuple(req))
                if len(history[t]) > 64:
                    history[t].pop(0)
        pool = pools[t]
        if len(pool) and rng.random() < update_p:
            k = pool.choice(rng)
            write([k], [live[(ns, k)]], part, ns)
        if len(pool) > 1 and rng.random() < delete_p:
            k = pool.choice(rng)
            ops.append(Delete((k,), ns))
            pool.remove(k)
            del live[(ns, k)]
        base = len(a["own"])
        keys = [b"s%05d/r%03d" % (a["i"], base + j) for j in range(rng.randint(1, max_put))]
        write(keys, [size() for _ in keys], part, ns)
        for k in keys:
            pool.add(k)
        order[t].extend(keys)
        a["own"].extend(keys)
        a["left"] -= 1
        if a["left"] > 0 and put[0] < 2 * target:
            return True
        gone = [k for k in a["own"] if k in pool]
        if gone and rng.random() < evict_p:
            ops.append(Delete(tuple(gone), ns))
            for k in gone:
                pool.remove(k)
                del live[(ns, k)]
        return False

    _interleave(rng, d["concurrent_effective"], start, step)
    return Trace("random", ops, {"seed": seed, "scale": scale, **d, "sessions": next(started)})


# the families the benchmark replays by default; the held-out `heldout`, `agents`, `workspaces` and `random`
# run when named
FAMILIES = ("locomo", "webarena", "swe", "lmcache", "shared", "sessions")

GENERATORS: dict[str, Callable[..., Trace]] = {
    "locomo": locomo,
    "webarena": webarena,
    "swe": swe,
    "lmcache": lmcache,
    "shared": shared,
    "sessions": sessions,
    "heldout": heldout,
    "heldout_ns": heldout_ns,
    "agents": agents,
    "workspaces": workspaces,
    "random": random_shape,
}


def check(trace: Trace) -> None:
    """Replay the trace against a dict: every requested key is live, no delete misses (a generator bug
    would otherwise show up as a benchmark figure)."""
    live: set[tuple[str, bytes]] = set()
    for i, o in enumerate(trace.ops):
        if isinstance(o, Put):
            if len(o.keys) != len(o.sizes) or any(n <= 0 for n in o.sizes):
                raise AssertionError(f"{trace.name} op {i}: bad put")
            live.update((o.ns, k) for k in o.keys)
        elif isinstance(o, Delete):
            for k in o.keys:
                if (o.ns, k) not in live:
                    raise AssertionError(f"{trace.name} op {i}: delete of a missing key {k!r}")
                live.discard((o.ns, k))
        else:
            missing = [k for k in o.keys if (o.ns, k) not in live]
            if missing or len(o.keys) < 2 or len(set(o.keys)) != len(o.keys):
                raise AssertionError(f"{trace.name} op {i}: request of missing/duplicate keys {missing[:3]!r}")


def generate(name: str, seed: int = 0, scale: float = 1.0, **overrides: Any) -> Trace:
    return GENERATORS[name](seed, scale, **overrides)


def describe(traces: Sequence[Trace]) -> str:
    lines = [f"{'trace':<10}{'ops':>8}{'puts':>7}{'MB put':>8}{'rewrites':>9}{'deletes':>8}{'requests':>9}"
             f"{'keys/req':>9}"]
    for t in traces:
        s = t.summary()
        lines.append(f"{t.name:<10}{s['ops']:>8}{s['puts']:>7}{s['bytes_put'] / 1e6:>8.1f}{s['rewrites']:>9}"
                     f"{s['deletes']:>8}{s['requests']:>9}{s['keys_per_request']:>9}")
    return "\n".join(lines)
