"""A/B: the same benchmarks on two commits, back to back on this machine, with this interpreter.

    python -m bench.ab OLD NEW                      # throughput and compaction, --quick, 2 rounds
    python -m bench.ab OLD NEW --rounds 3 --benches throughput compaction --out bench/results/ab.md

For each commit, a detached worktree /tmp/ab-<sha12> (`git worktree add --detach`) and that commit's engine
built and installed, not editable, into /tmp/ab-<sha12>-site by this interpreter's pip
(`pip install --no-build-isolation --no-deps --no-index --target`): the C core compiled from that commit's
native/, the packages laid out as that commit's pyproject says (before issue 14, compaction/ and connector/
were mapped into blockstore by package-dir, which neither PYTHONPATH nor `build_ext --inplace` reproduces).
Each run is

    cd /tmp/ab-<sha12> && PYTHONPATH=/tmp/ab-<sha12>-site:/tmp/ab-<sha12> python -P -m bench.NAME --quick ...

so it measures that commit's engine with that commit's bench code, and the same interpreter and
dependencies on both sides. `-P` keeps the current directory off sys.path (the worktree's own blockstore/
has no compiled core), and a sitecustomize.py in the site folder drops the editable finder of the
main checkout's install, so nothing can resolve to the working tree. Before measuring, each side opens and
writes a store with the native backend and lists every blockstore module loaded: any from outside its site
folder, or no native module, stops the A/B.

Order: every round runs each bench on OLD then on NEW (A B A B ...). Headline figures are taken from each
run's results JSON; the report gives per commit the median over rounds and the min-max, and the ratio
NEW/OLD of the medians. Figures that do not depend on time (compaction's blocks/request and amplification)
must be equal in every run; the report says whether they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.common import REPO, machine_info, run_quiet, write_json

WORK = "/tmp"
SITECUSTOMIZE = '''\
"""bench.ab: drop the editable finder of the main checkout's install, so only PYTHONPATH can name blockstore."""
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(type(f), "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
'''
WHERE = """
import json, os, sys, tempfile
import blockstore, blockstore.compaction
with tempfile.TemporaryDirectory() as d:  # a store opened and written: the native core is loaded
    s = blockstore.open(os.path.join(d, "s"), backend="native")
    s.put_many([(b"k", b"v")])
    s.close()
print(json.dumps({n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                  if n == "blockstore" or n.startswith("blockstore.")}))
"""


# ---------------------------------------------------------------------------- one side


@dataclass
class Side:
    label: str  # OLD / NEW
    rev: str  # as given
    sha: str
    subject: str
    tree: str  # worktree
    site: str  # installed engine

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
        env["PYTHONPATH"] = f"{self.site}:{self.tree}"
        return env

    def shell_prefix(self) -> str:
        return f"cd {self.tree} && PYTHONPATH={self.site}:{self.tree} {sys.executable} -P"


def git(*args: str, cwd: str = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def prepare(label: str, rev: str, log: Callable[[str], None]) -> Side:
    """The worktree and the installed engine of one commit (both reused when already there and right)."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    tree, site = os.path.join(WORK, f"ab-{sha[:12]}"), os.path.join(WORK, f"ab-{sha[:12]}-site")
    if os.path.isdir(tree) and git("rev-parse", "HEAD", cwd=tree) != sha:
        raise SystemExit(f"{tree} exists at another commit; remove it (git worktree remove --force {tree})")
    if not os.path.isdir(tree):
        log(f"{label}: git worktree add --detach {tree} {sha[:12]}")
        git("worktree", "add", "--detach", tree, sha)
    stamp = os.path.join(site, ".ab-commit")
    if not (os.path.exists(stamp) and open(stamp).read() == sha):
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index",
               "--target", site, tree]
        log(f"{label}: {shlex.join(cmd)}")
        subprocess.run(cmd, check=True, cwd=tree)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        with open(stamp, "w") as f:
            f.write(sha)
    side = Side(label, rev, sha, git("log", "-1", "--format=%s", sha)[:100], tree, site)
    where = json.loads(subprocess.run([sys.executable, "-P", "-c", WHERE], env=side.env, cwd=tree, check=True,
                                      capture_output=True, text=True).stdout)
    inside = os.path.realpath(site) + os.sep
    bad = {k: v for k, v in where.items() if v is not None and not os.path.realpath(v).startswith(inside)}
    native = [v for v in where.values() if v and v.endswith(".so")]
    if bad or not native:
        raise SystemExit(f"{label} ({sha[:12]}): modules from outside {site}: {bad}; native modules: {native}")
    log(f"{label}: {sha[:12]}: {len(where)} blockstore modules, all from {site}; native "
        f"{', '.join(os.path.relpath(v, site) for v in native)}")
    return side


# ---------------------------------------------------------------------------- benches and their headlines


def throughput_headline(doc: dict[str, Any]) -> dict[str, float]:
    """The ratios the bench prints (each the median over its repeats), then its diagnostics and speedups."""
    out = {f"ratio {k}": v["median"] for k, v in doc["ratios"].items()}
    out.update({f"diagnostic {k}": v["median"] for k, v in doc.get("diagnostics", {}).items()})
    out.update({f"speedup {k}": v["median"] for k, v in doc.get("speedups", {}).items()})
    return out


def compaction_headline(doc: dict[str, Any]) -> dict[str, float]:
    """The target lines the bench prints (per trace: full vs append-only blocks/request and p95 cold latency;
    locomo's amplification), the foreground p99 it prints, the cold p95 of each trace (geometric mean over
    its policies: one cell's p95 is too noisy to read alone) and the replay time of all cells."""
    out: dict[str, float] = {}
    for tr, t in doc["targets"].items():
        out[f"{tr} blocks/request full/append-only"] = t["blocks_ratio"]
        out[f"{tr} p95 cold full/append-only"] = t["cold_p95_ratio"]
        for k in ("space_amp", "write_amp"):
            if k in t:
                out[f"{tr} full {k}"] = t[k]
    for tr, cells in doc["results"].items():
        p95 = [c["cold_ms"]["p95"] for c in cells.values() if c["cold_ms"].get("p95")]
        if p95:
            out[f"{tr} p95 cold ms, geomean of {len(p95)} policies"] = math.exp(statistics.fmean(map(math.log, p95)))
    for tr, fg in doc.get("foreground_latency", {}).items():
        for pol, r in fg.items():
            d = r if pol == "idle" else r.get("during", {})
            if d.get("p99_ms") is not None:
                out[f"{tr} foreground p99 ms, {pol}"] = d["p99_ms"]
    out["replay s, all cells"] = sum(c["replay_s"] for cells in doc["results"].values() for c in cells.values())
    return out


def compaction_exact(doc: dict[str, Any]) -> dict[str, Any]:
    """What no clock should move: blocks/request, space and write amplification of every (trace, policy),
    to the 3 decimals the bench prints (the directory's SST bytes move space_amp in the 6th)."""
    keys = ("blocks_per_request", "blocks_per_request_p95", "blocks_floor", "requests_measured", "space_amp",
            "write_amp")
    return {f"{tr}/{pol}.{k}": round(c[k], 3) if isinstance(c.get(k), float) else c.get(k)
            for tr, cells in doc["results"].items() for pol, c in cells.items() for k in keys}


@dataclass(frozen=True)
class Bench:
    name: str
    legacy_out_flag: str  # its results flag in commits from before bench.common.standard_args
    headline: Callable[[dict[str, Any]], dict[str, float]]
    exact: Callable[[dict[str, Any]], dict[str, Any]] | None = None


BENCHES = {
    "throughput": Bench("throughput", "--json-out", throughput_headline),
    "compaction": Bench("compaction", "--out", compaction_headline, compaction_exact),
}


def out_flag(side: Side, bench: Bench) -> str:
    """--json, the one results flag of every bench (bench.common.standard_args), unless the commit measured
    predates it: an A/B run may reach back to commits whose benches still had their own flag."""
    with open(os.path.join(side.tree, "bench", f"{bench.name}.py"), encoding="utf-8") as f:
        return "--json" if "standard_args(" in f.read() else bench.legacy_out_flag


def run_one(side: Side, bench: Bench, rnd: int, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    out_dir = os.path.join(args.results, side.label.lower())
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{bench.name}-r{rnd}.json")
    bench_args = ["--quick", "--dir", args.dir, out_flag(side, bench), out, *shlex.split(args.bench_args.get(bench.name, ""))]
    cmd = [sys.executable, "-P", "-m", f"bench.{bench.name}", *bench_args]
    load = os.getloadavg()
    t0 = time.perf_counter()
    with open(out[: -len(".json")] + ".log", "w") as logf:
        p = subprocess.run(cmd, cwd=side.tree, env=side.env, stdout=logf, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{side.label} {bench.name} round {rnd} failed ({p.returncode}); see {logf.name}")
    with open(out) as f:
        doc = json.load(f)
    if doc.get("engine", {}).get("commit") != side.sha:
        raise SystemExit(f"{out}: measured {doc.get('engine', {}).get('commit')}, expected {side.sha}")
    log(f"round {rnd} {side.label} {bench.name}: {wall:.0f} s, load {load[0]:.2f}")
    return {"side": side.label, "bench": bench.name, "round": rnd, "wall_s": round(wall, 1),
            "loadavg_1m_at_start": round(load[0], 2), "json": out, "command": f"{side.shell_prefix()} "
            f"-m bench.{bench.name} {shlex.join(bench_args)}", "headline": bench.headline(doc),
            "exact": bench.exact(doc) if bench.exact else None,
            "cpu_s_not_this_process": doc.get("machine", {}).get("cpu_s_not_this_process")}


# ---------------------------------------------------------------------------- report


def rng(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f} – {max(values):.3f})"


def exact_lines(sides: list[Side], rs: list[dict[str, Any]]) -> list[str]:
    """Figures that should not depend on time: the same in every run, or not (and then: within a commit too,
    or only between the commits, which would be a change of behaviour)."""
    runs = {s.label: [r["exact"] for r in rs if r["side"] == s.label and r["exact"] is not None] for s in sides}
    if not runs["OLD"] or not runs["NEW"]:
        return []
    names = list(runs["OLD"][0])
    same, noisy, changed = [], [], []
    for k in names:
        vals = {label: [e.get(k) for e in es] for label, es in runs.items()}
        if len({repr(v) for vs in vals.values() for v in vs}) == 1:
            same.append(k)
        elif all(len({repr(v) for v in vs}) == 1 for vs in vals.values()):
            changed.append(f"`{k}` OLD {vals['OLD'][0]} NEW {vals['NEW'][0]}")
        else:
            noisy.append(f"`{k}` OLD {sorted(set(vals['OLD']))} NEW {sorted(set(vals['NEW']))}")
    out = [f"Time-independent figures (blocks/request mean and p95, floor, requests, space and write amplification "
           f"of every trace/policy cell, 3 decimals): {len(same)} of {len(names)} identical in every run, OLD and "
           f"NEW; {len(changed)} constant within each commit but different between them"
           + (": " + "; ".join(changed) if changed else "")
           + f"; {len(noisy)} vary between runs of the same commit too" + (": " + "; ".join(noisy) if noisy else "")
           + "."]
    return out


def markdown(sides: list[Side], runs: list[dict[str, Any]], argv: list[str], started: str, finished: str,
             machine: dict[str, Any], note: str = "") -> str:
    old, new = sides
    lines = [f"# A/B: {old.sha[:7]} (OLD) vs {new.sha[:7]} (NEW)", "",
             f"- OLD `{old.sha[:12]}` ({old.rev}): {old.subject}",
             f"- NEW `{new.sha[:12]}` ({new.rev}): {new.subject}",
             f"- machine: {machine.get('cpu_affinity')} of {machine.get('cpu_count')} CPUs ({machine.get('cpu_model')}), "
             f"{machine.get('mem_gib')} GiB, {machine.get('fs_type_stat')} scratch `{machine.get('scratch_dir')}`, "
             f"Python {machine.get('python')}; shared with other sessions, so figures are noisy",
             f"- runs {started} – {finished} UTC; order per round: each bench on OLD, then on NEW", "",
             *([note, ""] if note else []),
             "Each cell: median over rounds (min – max over rounds); each run's figure is what the bench itself "
             "prints (for throughput, the median over its repeats). NEW/OLD: ratio of the medians. "
             "'overlap': the two min–max ranges overlap (within the noise these runs show).", ""]
    for bench in dict.fromkeys(r["bench"] for r in runs):
        rs = [r for r in runs if r["bench"] == bench]
        n = {s.label: sum(r["side"] == s.label for r in rs) for s in sides}
        lines += [f"## {bench} --quick ({n['OLD']} runs OLD, {n['NEW']} runs NEW)", "",
                  "| figure | OLD | NEW | NEW/OLD | overlap |", "|---|---|---|---|---|"]
        names = list(dict.fromkeys(k for r in rs for k in r["headline"]))
        overlaps = 0
        for name in names:
            vals = {s.label: [r["headline"][name] for r in rs if r["side"] == s.label and name in r["headline"]]
                    for s in sides}
            if not vals["OLD"] or not vals["NEW"]:
                continue
            o, w = vals["OLD"], vals["NEW"]
            ov = max(min(o), min(w)) <= min(max(o), max(w))
            overlaps += ov
            ratio = statistics.median(w) / statistics.median(o) if statistics.median(o) else float("nan")
            lines.append(f"| {name} | {rng(o)} | {rng(w)} | {ratio:.3f} | {'yes' if ov else '**no**'} |")
        lines += ["", f"{overlaps} of {len(names)} figures overlap."]
        walls = {s.label: [r["wall_s"] for r in rs if r["side"] == s.label] for s in sides}
        loads = {s.label: [r["loadavg_1m_at_start"] for r in rs if r["side"] == s.label] for s in sides}
        lines.append(f"Wall s per run: OLD {rng(walls['OLD'])}, NEW {rng(walls['NEW'])}; load average at start: "
                     f"OLD {rng(loads['OLD'])}, NEW {rng(loads['NEW'])}.")
        lines += exact_lines(sides, rs)
        lines.append("")
    lines += ["## Commands", "", "```", f"{sys.executable} -m bench.ab {shlex.join(argv)}", "```", "",
              "which ran, in this order:", "", "```"]
    lines += [r["command"] for r in runs]
    lines += ["```", "",
              "Worktrees: `git worktree add --detach /tmp/ab-<sha12> <sha>`; engine: "
              f"`{sys.executable} -m pip install --no-build-isolation --no-deps --no-index --target "
              "/tmp/ab-<sha12>-site /tmp/ab-<sha12>` (plus a sitecustomize.py there that drops the editable "
              "finder of the main checkout). Per-run JSON and logs: the `json` paths in the companion "
              ".json file (not kept in the repository).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", nargs="?", help="commit A (OLD)")
    ap.add_argument("new", nargs="?", help="commit B (NEW)")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2)")
    ap.add_argument("--benches", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    ap.add_argument("--bench-arg", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments of one bench, e.g. compaction='--traces locomo'")
    ap.add_argument("--dir", default=os.path.join(WORK, "ab-scratch"), help="scratch root of every run (one disk)")
    ap.add_argument("--results", default=os.path.join(WORK, "ab-results"), help="per-run JSON and logs")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "ab.md"), help="markdown report")
    ap.add_argument("--remove-worktrees", action="store_true", help="git worktree remove both at the end")
    ap.add_argument("--stop-by", metavar="HH:MM",
                    help="UTC: after 2 rounds, start no round that the rounds so far say would end later")
    ap.add_argument("--note", default="", help="a paragraph for the report's head (how the commits were chosen)")
    ap.add_argument("--from-json", metavar="PATH", help="no runs: render the report again from a companion .json")
    args = ap.parse_args(argv)
    args.bench_args = dict(a.split("=", 1) for a in args.bench_arg)
    if args.rounds < 1:
        ap.error("--rounds must be positive")
    if not args.from_json and not (args.old and args.new):
        ap.error("OLD and NEW commits are required (unless --from-json)")
    return args


def side_of(d: dict[str, Any]) -> Side:
    sha = d["sha"]
    return Side(d["label"], d["rev"], sha, d["subject"], os.path.join(WORK, f"ab-{sha[:12]}"),
                os.path.join(WORK, f"ab-{sha[:12]}-site"))


def past_stop_by(stop_by: str | None, rounds_done: int, t_start: float) -> bool:
    if stop_by is None or rounds_done < 2:
        return False
    now = datetime.datetime.now(datetime.UTC)
    hh, mm = (int(x) for x in stop_by.split(":"))
    deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    per_round = (time.perf_counter() - t_start) / rounds_done
    return now + datetime.timedelta(seconds=per_round) > deadline


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{datetime.datetime.now(datetime.UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    if args.from_json:
        with open(args.from_json) as f:
            prev = json.load(f)
        sides = [side_of(d) for d in prev["sides"]]
        runs = prev["runs"]
        for r in runs:  # the figures again from each run's own results, as this version reads them
            with open(r["json"]) as f:
                doc = json.load(f)
            bench = BENCHES[r["bench"]]
            r["headline"], r["exact"] = bench.headline(doc), bench.exact(doc) if bench.exact else None
        machine, started, finished = prev["machine"], prev["started"], prev["finished"]
        argv = shlex.split(prev["command"])[3:]
    else:
        sides = [prepare("OLD", args.old, log), prepare("NEW", args.new, log)]
        os.makedirs(args.dir, exist_ok=True)
        machine = machine_info(args.dir)
        started = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}"
        runs = []
        t_start = time.perf_counter()
        for rnd in range(1, args.rounds + 1):
            if past_stop_by(args.stop_by, rnd - 1, t_start):
                log(f"stopping after {rnd - 1} rounds: another would end after {args.stop_by} UTC")
                break
            for name in args.benches:
                for side in sides:
                    runs.append(run_one(side, BENCHES[name], rnd, args, log))
        finished = f"{datetime.datetime.now(datetime.UTC):%H:%M}"
    text = markdown(sides, runs, argv, started, finished, machine, args.note)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    write_json(os.path.splitext(args.out)[0] + ".json",
               {"benchmark": "ab", "command": shlex.join([sys.executable, "-m", "bench.ab", *argv]),
                "sides": [{"label": s.label, "rev": s.rev, "sha": s.sha, "subject": s.subject} for s in sides],
                "machine": machine, "started": started, "finished": finished,
                "main_checkout_head": run_quiet(["git", "rev-parse", "HEAD"]), "runs": runs})
    print(text)
    if args.remove_worktrees:
        for s in sides:
            git("worktree", "remove", "--force", s.tree)

if __name__ == "__main__":
    main()
