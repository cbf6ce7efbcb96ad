"""Build an AddressSanitizer + UBSan copy of the C core for fuzz runs, without touching the installed one.

    .venv/bin/python -m fuzz.build_sanitized          # -> fuzz/build/sanitized/blockstore/_native*.so

The copy goes to its own directory, so the editable install (blockstore/_native.abi3.so), which other
tests and processes on the machine use, is never replaced. `fuzz/run.py --sanitize` builds it if it is
missing or older than the C sources, and loads it in place of the normal extension (fuzz/harness.py);
the Python interpreter is not instrumented, so the runner preloads gcc's ASan runtime (LD_PRELOAD).

It reuses native/build_native.py unchanged: BLOCKSTORE_SANITIZE=1 there adds
`-fsanitize=address,undefined -fno-omit-frame-pointer`; CFLAGS here adds `-g` (symbolized reports)
and `-fno-sanitize-recover=undefined`, so undefined behaviour aborts the run (a crash the fuzzer
records) instead of printing a warning and going on.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "build", "sanitized")
EXTRA_CFLAGS = "-g -fno-sanitize-recover=undefined"


def built_path() -> str | None:
    """The sanitized extension, if it was built."""
    found = sorted(glob.glob(os.path.join(OUT, "blockstore", "_native*.so")))
    return found[0] if found else None


def is_stale() -> bool:
    so = built_path()
    if so is None:
        return True
    sources = glob.glob(os.path.join(ROOT, "native", "*.[ch]")) + [os.path.join(ROOT, "native", "build_native.py")]
    return max(os.path.getmtime(p) for p in sources) > os.path.getmtime(so)


def build(verbose: bool = False) -> str:
    """Compile the sanitized extension into fuzz/build/sanitized; returns the path of the .so."""
    os.environ["BLOCKSTORE_SANITIZE"] = "1"
    os.environ["CFLAGS"] = (os.environ.get("CFLAGS", "") + " " + EXTRA_CFLAGS).strip()
    spec = importlib.util.spec_from_file_location("_bs_build_native", os.path.join(ROOT, "native", "build_native.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    os.chdir(ROOT)  # build_native.py names its sources relative to the project root
    try:
        spec.loader.exec_module(mod)
        # cffi compiles from inside tmpdir: make the project-relative sources and includes absolute (cffi
        # has no public way to rewrite what set_source() recorded)
        name, source, ext, kwds = mod.ffibuilder._assigned_source  # noqa: SLF001
        kwds = dict(kwds)
        for key in ("sources", "include_dirs"):
            kwds[key] = [os.path.join(ROOT, p) for p in kwds.get(key, [])]
        mod.ffibuilder._assigned_source = (name, source, ext, kwds)  # noqa: SLF001
        os.makedirs(OUT, exist_ok=True)
        path = mod.ffibuilder.compile(tmpdir=OUT, verbose=verbose)
    finally:
        os.chdir(cwd)
    return os.path.abspath(str(path))


def main() -> int:
    path = build(verbose="-v" in sys.argv)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
