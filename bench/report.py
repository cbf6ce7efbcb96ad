"""The benchmark report: one command runs the suite and writes bench/results/ and bench/README.md.

    python -m bench.report [--quick | --full] [--only NAME ...] [--skip NAME ...] [--dir SCRATCH] [--no-run]
    scripts/bench.sh [the same arguments]       # from a fresh clone: makes .venv first; default --quick

Each bench of SUITE runs in turn as `python -m bench.NAME --quick|--full --json bench/results/FILE --dir
SCRATCH` (FILE: NAME_quick.json in quick mode, NAME.json in full mode), with progress on stderr. A bench
that fails fails the report (exit status 1 at the end) but the others still run. `gpu_path` needs CUDA:
where `torch.cuda.is_available()` is false it is not run, and the latest bench/results/gpu_path.json (made
on a GPU machine) is shown, labelled with the machine it ran on.

Then, from the JSON documents present (all of them, run now or before; `--no-run` does only this), every
bench module's `plots(doc, out_dir)` writes its PNGs into the results directory and its
`summary_markdown(doc)` gives its headline table, machine line and reproducing command; the part of
bench/README.md between the markers `<!-- report:begin -->` and `<!-- report:end -->` is rewritten with
them (the markers are added under a "## Latest results" heading if absent; nothing outside them changes),
and bench/results/report.json indexes what was shown: which JSON, its mode, wall times, the commit.

The contract of a bench module bench/NAME.py the report knows (SUITE):
    main(argv)                       takes bench.common.standard_args' flags (--quick, --full, --dir PATH,
                                     --json PATH), writes its JSON document to --json's path and prints
                                     its one-line JSON summary last
    plots(doc, out_dir) -> [paths]   PNG files written (matplotlib Agg), from the document alone
    summary_markdown(doc) -> str     a markdown table of the headline figures, then `machine_line(doc)`
                                     and `reproduce_line(doc)` (helpers below, importable by the modules)
A module or function that is not there yet is skipped with a message, not an error.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
README = os.path.join(REPO, "bench", "README.md")
DEFAULT_DIR = os.path.join(REPO, "bench", ".scratch")
BEGIN = "<!-- report:begin -->"
END = "<!-- report:end -->"
HEADING = "## Latest results"
ENV = {"DO_NOT_TRACK": "1", "VLLM_NO_USAGE_STATS": "1", "LMCACHE_TRACK_USAGE": "false", "PYTHONHASHSEED": "0"}


@dataclass(frozen=True)
class Bench:
    name: str
    estimate_s: tuple[float, float]  # (quick, full) wall seconds on the 2-core dev VM, until a report.json says
    needs_cuda: bool = False
    title: str = ""


SUITE: tuple[Bench, ...] = (
    Bench("throughput", (45, 300), title="put and get throughput vs raw-disk ceilings"),
    Bench("compaction", (75, 360), title="compaction policies on workload traces"),
    Bench("lmcache_peer", (75, 780), title="LMCache L2 adapter vs LMCache's fs adapter"),
    Bench("scaling", (300, 1200), title="scaling curves"),
    Bench("gpu_path", (120, 600), needs_cuda=True, title="GPU KV-cache path"),
    Bench("blend", (270, 1800), title="blended chunk KV: fidelity and TTFT"),
)
NAMES = [b.name for b in SUITE]


# ------------------------------------------------------------------------- helpers for the bench modules


def doc_mode(doc: dict[str, Any]) -> str:
    """"quick" or "full": the document's own config.mode / config.quick, else its command line."""
    cfg = doc.get("config") or {}
    if cfg.get("mode") in ("quick", "full"):
        return str(cfg["mode"])
    if isinstance(cfg.get("quick"), bool):
        return "quick" if cfg["quick"] else "full"
    return "quick" if "--quick" in str(doc.get("command", "")).split() else "full"


def png_path(doc: dict[str, Any], out_dir: str, plot: str) -> str:
    """out_dir/BENCH[_quick]_PLOT.png: quick and full plots of one bench do not overwrite each other."""
    bench = str(doc.get("benchmark", "bench"))
    return os.path.join(out_dir, f"{bench}{'_quick' if doc_mode(doc) == 'quick' else ''}_{plot}.png")


def fmt(x: Any, digits: int = 2) -> str:
    """A number for a table cell; "–" for a missing figure (None, NaN)."""
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _date(iso: str | None) -> str:
    if not iso:
        return "date unknown"
    try:
        d = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if d.tzinfo is not None:
        d = d.astimezone(datetime.UTC)
    return d.strftime("%Y-%m-%d %H:%M UTC")


def _gpu_text(g: Any) -> str:
    if isinstance(g, str):
        return g
    if isinstance(g, dict):
        name = g.get("name") or g.get("model") or ""
        count = g.get("count")
        mem = g.get("memory_gib") or g.get("mem_gib")
        return " ".join(p for p in (f"{count} x" if count else "", str(name), f"({mem} GiB)" if mem else "") if p)
    if isinstance(g, list) and g:
        return ", ".join(_gpu_text(x) for x in g)
    return ""


def machine_line(doc: dict[str, Any]) -> str:
    """One line: CPUs and model, RAM, GPU (if the document names one), kernel, the scratch directory's
    filesystem and device, load at start, date of the run. From doc["machine"] (common.machine_info)."""
    m = doc.get("machine") or {}
    parts = []
    cpus = m.get("cpu_affinity") or m.get("cpu_count")
    if cpus:
        parts.append(f"{cpus} CPUs" + (f" ({m['cpu_model']})" if m.get("cpu_model") else ""))
    if m.get("mem_gib"):
        parts.append(f"{m['mem_gib']} GiB RAM")
    gpu = _gpu_text(m.get("gpu") or m.get("gpus") or m.get("gpu_name") or (doc.get("gpu") or {}).get("name"))
    if gpu:
        parts.append(f"GPU {gpu}")
    if m.get("kernel"):
        parts.append(f"kernel {m['kernel']}")
    df = m.get("df") or []
    fields = df[-1].split() if df and isinstance(df[-1], str) else []
    if len(fields) >= 2:
        parts.append(f"scratch on {fields[1]} ({fields[0]})")
    elif m.get("fs_type_stat"):
        parts.append(f"scratch on {m['fs_type_stat']}")
    if isinstance(m.get("loadavg_at_start"), (int, float)):
        parts.append(f"load {m['loadavg_at_start']:.2f} at start")
    wall = f", {doc['wall_s']:.0f} s" if isinstance(doc.get("wall_s"), (int, float)) else ""
    return f"Machine: {', '.join(parts) or 'not recorded'}; run {_date(m.get('date'))}{wall}."


# flags of the benches before bench.common.standard_args, which older results documents still record
LEGACY_FLAGS = {"--json-out": "--json", "--out": "--json", "--scratch": "--dir"}


def reproduce_command(doc: dict[str, Any]) -> str:
    """doc["command"] as someone would type it in the repository today: `python`, paths relative to it,
    legacy flag names replaced by the ones the benches take now."""
    try:
        argv = shlex.split(str(doc.get("command") or ""))
    except ValueError:
        return str(doc.get("command") or "")
    if not argv:
        return ""
    if os.path.basename(argv[0]).startswith("python"):
        argv[0] = "python"
    out = []
    for a in argv:
        head, eq, tail = a.partition("=")
        if a.startswith("-"):
            head = LEGACY_FLAGS.get(head, head)
            a = f"{head}={tail}" if eq else head
        val = tail if eq and a.startswith("-") else a
        if os.path.isabs(val) and (val == REPO or val.startswith(REPO + os.sep)):
            val = os.path.relpath(val, REPO)
            a = f"{head}={val}" if eq and a.startswith("-") else val
        out.append(a)
    return shlex.join(out)


def reproduce_line(doc: dict[str, Any]) -> str:
    return f"Reproduce: `{reproduce_command(doc)}`"


# ------------------------------------------------------------------------- running the suite


def _rel(path: str) -> str:
    p = os.path.abspath(path)
    return os.path.relpath(p, REPO) if p.startswith(REPO + os.sep) else p


def json_path(results_dir: str, name: str, mode: str) -> str:
    return os.path.join(results_dir, f"{name}_quick.json" if mode == "quick" else f"{name}.json")


def module_file(name: str) -> str | None:
    spec = importlib.util.find_spec(f"bench.{name}")
    return spec.origin if spec is not None and spec.origin else None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _hms(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _say(msg: str) -> None:
    print(f"[report] {msg}", file=sys.stderr, flush=True)


def bench_command(b: Bench, mode: str, out: str, scratch: str, extra: Sequence[str]) -> list[str]:
    # every bench takes bench.common.standard_args' flags (tests/test_bench_interface.py checks)
    cmd = [sys.executable, "-m", f"bench.{b.name}", f"--{mode}", "--json", _rel(out), "--dir", _rel(scratch)]
    return cmd + list(extra)


def run_suite(args: argparse.Namespace, previous: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Run the selected benches in turn; per bench: status, rc, wall_s, command, json."""
    state: dict[str, dict[str, Any]] = {}
    todo: list[Bench] = []
    for b in SUITE:
        if args.only and b.name not in args.only:
            state[b.name] = {"status": "not selected (--only)"}
        elif b.name in args.skip:
            state[b.name] = {"status": "skipped (--skip)"}
        elif module_file(b.name) is None:
            state[b.name] = {"status": f"not run: bench/{b.name}.py is not in this checkout"}
            _say(f"{b.name}: bench/{b.name}.py not found, skipped")
        elif b.needs_cuda and not cuda_available():
            state[b.name] = {"status": "not run: no CUDA on this machine"}
            _say(f"{b.name}: torch.cuda.is_available() is false here: not run (its latest JSON is shown if present)")
        else:
            todo.append(b)
    prev = previous.get("benches", {}) if previous.get("mode") == args.mode else {}

    def estimate(b: Bench) -> float:
        w = prev.get(b.name, {}).get("run_wall_s")
        return float(w) if isinstance(w, (int, float)) else b.estimate_s[0 if args.mode == "quick" else 1]

    t_all = time.perf_counter()
    _say(f"{args.mode} suite: {', '.join(b.name for b in todo) or 'nothing to run'} "
         f"(estimate {_hms(sum(estimate(b) for b in todo))})")
    for i, b in enumerate(todo):
        out = json_path(args.results_dir, b.name, args.mode)
        cmd = bench_command(b, args.mode, out, args.dir, shlex.split(args.bench_args.get(b.name, "")))
        left = sum(estimate(x) for x in todo[i:])
        _say(f"step {i + 1}/{len(todo)}: {b.name} ({args.mode}) at {_hms(time.perf_counter() - t_all)} elapsed; "
             f"this step ~{_hms(estimate(b))}, ~{_hms(left)} left: {shlex.join(cmd[1:])}")
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}).returncode
        wall = time.perf_counter() - t0
        ok = rc == 0 and os.path.exists(out) and os.path.getmtime(out) >= time.time() - wall - 5
        state[b.name] = {"status": "ran" if ok else f"failed (exit status {rc})", "rc": rc,
                         "run_wall_s": round(wall, 1), "command": reproduce_command({"command": shlex.join(cmd)}),
                         "json": _rel(out)}
        _say(f"{b.name}: {'done' if ok else f'FAILED (exit status {rc})'} in {_hms(wall)} "
             f"({_hms(time.perf_counter() - t_all)} elapsed)")
    return state


# ------------------------------------------------------------------------- rendering


def load_doc(results_dir: str, name: str, mode: str) -> tuple[str | None, dict[str, Any] | None]:
    """The bench's document of this mode, else of the other mode (labelled as such), else none."""
    for m in (mode, "full" if mode == "quick" else "quick"):
        path = json_path(results_dir, name, m)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return path, json.load(f)
    return None, None


def render_bench(b: Bench, doc: dict[str, Any], path: str, results_dir: str, readme_dir: str
                 ) -> tuple[str, list[str], str | None]:
    """(markdown body, PNGs written, error) from the module's plots and summary_markdown."""
    try:
        mod = importlib.import_module(f"bench.{b.name}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"bench.{b.name}", "bench"):
            return f"_`bench/{b.name}.py` is not in this checkout: results not rendered._", [], None
        traceback.print_exc()
        return f"_Could not import `bench.{b.name}`: {exc}._", [], f"import: {exc}"
    except Exception as exc:  # noqa: BLE001 - one bench's broken import must not stop the others
        traceback.print_exc()
        return f"_Could not import `bench.{b.name}`: {exc}._", [], f"import: {exc}"
    missing = [f for f in ("plots", "summary_markdown") if not callable(getattr(mod, f, None))]
    if missing:
        _say(f"{b.name}: bench/{b.name}.py has no {' or '.join(missing)}(): not rendered")
        return f"_`bench/{b.name}.py` has no `{'`/`'.join(missing)}` yet: results not rendered._", [], None
    error = None
    try:
        body = str(mod.summary_markdown(doc)).strip()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        body, error = f"_summary_markdown failed: {exc!r}_", f"summary_markdown: {exc!r}"
    try:
        files = [str(p) for p in mod.plots(doc, results_dir)]
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        files, error = [], (error or "") + f" plots: {exc!r}"
    images = []
    for p in files:
        alt = os.path.splitext(os.path.basename(p))[0].replace("_", " ")
        images.append(f"![{alt}]({os.path.relpath(p, readme_dir)})")
    if images:
        body += "\n\n" + "\n\n".join(images)
    return body, files, error


def render(args: argparse.Namespace, state: dict[str, dict[str, Any]], previous: dict[str, Any],
           command: str, started: datetime.datetime) -> tuple[str, dict[str, Any], bool]:
    """(markdown between the markers, report.json document, whether every rendering worked)."""
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    prev = previous.get("benches", {})
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    ok = True
    index: dict[str, Any] = {}
    rows = []
    sections = []
    for b in SUITE:
        st = dict(state.get(b.name) or {"status": "not run (--no-run)"})
        path, doc = load_doc(args.results_dir, b.name, args.mode)
        entry: dict[str, Any] = {"status": st["status"], "json": _rel(path) if path else None}
        for k in ("rc", "run_wall_s", "command"):
            if k in st:
                entry[k] = st[k]
        if st["status"] != "ran" and path and prev.get(b.name, {}).get("json") == _rel(path):
            # not run now: keep the wall time of the report run that made this JSON
            for k in ("run_wall_s", "command"):
                if k not in entry and k in prev[b.name]:
                    entry[k] = prev[b.name][k]
        sections.append(f"### {b.name}" + (f": {b.title}" if b.title else ""))
        if doc is None:
            sections.append(f"No results yet (this report: {st['status']}). Run `python -m bench.report --{args.mode} "
                            f"--only {b.name}`" + (" on a machine with CUDA" if b.needs_cuda else "") + ".")
            rows.append([b.name, "–", st["status"], "–", "–", "–"])
            index[b.name] = entry
            continue
        mode = doc_mode(doc)
        entry.update(mode=mode, date=(doc.get("machine") or {}).get("date"), bench_wall_s=doc.get("wall_s"))
        notes = []
        if st["status"].startswith("failed"):
            notes.append(f"**This report's run failed ({st['status']})**: shown below are the previous results.")
        elif st["status"] != "ran" and not args.no_run:  # (--no-run: the table says it for all)
            notes.append(f"Not run by this report ({st['status']}): results of an earlier run.")
        if mode != args.mode:
            notes.append(f"No {args.mode}-mode results: these are {mode} mode.")
        body, files, error = render_bench(b, doc, path or "", args.results_dir, readme_dir)
        if error:
            ok = False
            entry["render_error"] = error
        entry["plots"] = [_rel(p) for p in files]
        sections.append("\n\n".join([*(f"_{n}_" for n in notes), body]))
        wall = entry.get("run_wall_s")
        rows.append([b.name, mode, st["status"], _hms(wall) if isinstance(wall, (int, float)) else "–",
                     f"[{os.path.basename(path or '')}]({os.path.relpath(path or '', readme_dir)})",
                     _date(entry["date"])])
        index[b.name] = entry
    args_text = command.split(" -m bench.report", 1)[-1].strip()
    head = (f"Generated {started.strftime('%Y-%m-%d %H:%M UTC')} by `{command}` at commit "
            f"`{commit[:10] or 'unknown'}`{' (with uncommitted changes)' if dirty else ''}; from a fresh clone, "
            f"`bash scripts/bench.sh {args_text}` does the same. This section is rewritten by every report run "
            f"(edit outside the `report:` markers). Each bench's ratios are to ceilings measured in the same run "
            f"on the same machine; absolute figures from different machines are not comparable.")
    table = md_table(["bench", "mode", "this report", "run wall time", "results", "measured"], rows)
    markdown = "\n\n".join([head, table, *sections])
    report = {
        "generated": started.isoformat(timespec="seconds"),
        "command": command,
        "mode": args.mode,
        "no_run": args.no_run,
        "commit": commit,
        "uncommitted_changes": dirty,
        "results_dir": _rel(args.results_dir),
        "readme": _rel(args.readme),
        "benches": index,
    }
    return markdown, report, ok


def splice(text: str, body: str) -> str:
    """`text` with everything between the markers replaced by `body`; the markers (under HEADING) are
    inserted before the first second-level heading if absent. Text outside them is kept byte for byte."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        i, j = text.index(BEGIN), text.index(END) + len(END)
        return text[:i] + block + text[j:]
    section = f"{HEADING}\n\n{block}\n\n"
    at = text.find("\n## ")
    if at < 0:
        return text.rstrip("\n") + "\n\n" + section
    return text[: at + 1] + section + text[at + 1 :]


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="quick mode of every bench (the default)")
    mode.add_argument("--full", action="store_true", help="full mode of every bench")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=[], metavar="NAME",
                    help=f"run only these benches ({', '.join(NAMES)}); the README still shows every JSON present")
    ap.add_argument("--skip", nargs="+", choices=NAMES, default=[], metavar="NAME", help="do not run these benches")
    ap.add_argument("--dir", default=DEFAULT_DIR, help="scratch root for the benches (default bench/.scratch)")
    ap.add_argument("--no-run", action="store_true", help="only regenerate the plots and README from the JSONs present")
    ap.add_argument("--results-dir", default=RESULTS, help="where JSONs and PNGs go (default bench/results)")
    ap.add_argument("--readme", default=README, help="the README whose report section is rewritten (default "
                    "bench/README.md)")
    ap.add_argument("--bench-args", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one bench, e.g. --bench-args 'throughput=--records 16 --repeats 1'")
    args = ap.parse_args(argv)
    args.mode = "full" if args.full else "quick"
    extra: dict[str, str] = {}
    for item in args.bench_args:
        name, sep, rest = item.partition("=")
        if not sep or name not in NAMES:
            ap.error(f"--bench-args {item!r}: expected NAME=ARGS with NAME one of {', '.join(NAMES)}")
        extra[name] = (extra.get(name, "") + " " + rest).strip()
    args.bench_args = extra
    args.results_dir = os.path.abspath(args.results_dir)
    args.readme = os.path.abspath(args.readme)
    args.dir = os.path.abspath(args.dir)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    os.makedirs(args.results_dir, exist_ok=True)
    index_path = os.path.join(args.results_dir, "report.json")
    previous: dict[str, Any] = {}
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = {}
    raw = list(sys.argv[1:] if argv is None else argv)
    if not args.full and not args.quick:
        raw = ["--quick", *raw]
    command = reproduce_command({"command": shlex.join(["python", "-m", "bench.report", *raw])})
    state: dict[str, dict[str, Any]] = {}
    if not args.no_run:
        os.makedirs(args.dir, exist_ok=True)
        state = run_suite(args, previous)
    run_failed = [n for n, s in state.items() if s["status"].startswith("failed")]
    _say("rendering plots and README" + (f" (failed: {', '.join(run_failed)})" if run_failed else ""))
    markdown, report, render_ok = render(args, state, previous, command, started)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = open(args.readme, encoding="utf-8").read() if os.path.exists(args.readme) else "# bench/\n"
    write_atomic(args.readme, splice(text, markdown))
    write_atomic(index_path, json.dumps(report, indent=2) + "\n")
    walls = ", ".join(f"{n} {_hms(s['run_wall_s'])}" for n, s in state.items() if "run_wall_s" in s)
    _say(f"wrote {_rel(args.readme)} and {_rel(index_path)} in {_hms(report['wall_s'])}"
         + (f" (per bench: {walls})" if walls else ""))
    if run_failed or not render_ok:
        _say(f"FAILED: {', '.join(run_failed) or 'rendering'}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
