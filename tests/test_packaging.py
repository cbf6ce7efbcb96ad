"""The distributions, built and installed the way a user gets them (issue 17).

One slow test builds the sdist and, from it, the wheel (`python -m build`) in a copy of the working tree,
turns the wheel into a manylinux one that carries its own libxxhash (`auditwheel repair`), installs the
sdist and the repaired wheel each into a fresh venv and drives each installed copy from the outside:
`blockstore --version`, a put and a get, `blockstore get`, `blockstore fsck`. The wheel's copy must load its
C core against the libxxhash inside the wheel (no system library), and, with the C core removed, fall back
to the Python backend with one warning unless BLOCKSTORE_BACKEND=native asks for the C core.

Nothing is installed into the repository's .venv: the build tools (requirements/dist.txt) go into a
throwaway venv. Packages come from pip's configured sources with requirements/pins.txt as constraints, and
pip's cache makes a second run fast; every pip here (build isolation's too) reads PIP_* settings from the
environment, so a machine without an index runs it with PIP_NO_INDEX=1 PIP_FIND_LINKS=<a wheel folder>.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import blockstore
from blockstore import backend

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "requirements" / "pins.txt"
SMOKE = textwrap.dedent("""
    import sys, warnings
    import blockstore
    warnings.simplefilter("always")
    with blockstore.open(sys.argv[1]) as s:
        s.put(b"key", b"value" * 1000)
        s.put(b"\\x00bin", b"x", ns="other")
        assert bytes(s.get(b"key")) == b"value" * 1000
    print("backend", s.backend.name, "module", blockstore.__file__)
""")


def run(*cmd: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
        ok: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    if ok:
        assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def copy_tree(dst: Path) -> Path:
    """The working tree as git sees it (tracked and new files, nothing ignored: no .venv, no built .so)."""
    names = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout
    for name in filter(None, names.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


def venv(path: Path, *requirements: str | Path) -> Path:
    run(sys.executable, "-m", "venv", path)
    if requirements:
        run(path / "bin" / "python", "-m", "pip", "install", "-q", "-c", PINS, *requirements)
    return path / "bin"


def clean_env(venv_bin: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell would have: no BLOCKSTORE_* settings, the venv first on PATH, and
    no PYTHONPATH pointing back into this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLOCKSTORE_", "PYTHON"))}
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def smoke(venv_bin: Path, work: Path) -> str:
    """Drive an installed copy as a user would; return where blockstore was imported from."""
    env = clean_env(venv_bin)
    work.mkdir()
    r = run(venv_bin / "blockstore", "--version", env=env, cwd=work)
    assert r.stdout.strip() == f"blockstore {blockstore.__version__}"
    store = work / "store"
    r = run(venv_bin / "python", "-c", SMOKE, store, env=env, cwd=work)
    assert "backend native" in r.stdout, r.stdout + r.stderr
    assert "Warning" not in r.stderr, r.stderr
    assert run(venv_bin / "blockstore", "get", store, "key", env=env, cwd=work).stdout == "value" * 1000
    assert run(venv_bin / "blockstore", "scan", store, env=env, cwd=work).stdout.splitlines() == [
        "ns=default  key=key  size=5000  block=0000000000000001  offset=4096",
        "ns=other  key=\\x00bin  size=1  block=0000000000000002  offset=4096"]
    assert run(venv_bin / "blockstore", "fsck", store, env=env, cwd=work).stdout.strip() == "OK"
    metrics = run(venv_bin / "blockstore", "metrics", store, env=env, cwd=work).stdout
    assert "blockstore_records" in metrics, metrics  # prometheus-client came with the install
    module = r.stdout.split("module ", 1)[1].strip()
    assert str(ROOT) not in module, f"imported the checkout, not the installed copy: {module}"
    return module


@pytest.mark.slow
def test_sdist_and_wheel_install_and_run(tmp_path: Path) -> None:
    src = copy_tree(tmp_path / "src")
    tools = venv(tmp_path / "tools", "-r", ROOT / "requirements" / "dist.txt")
    dist = tmp_path / "dist"
    # no flags: the sdist first, then the wheel built from the unpacked sdist (so the sdist must build)
    run(tools / "python", "-m", "build", "--outdir", dist, src, env=clean_env(tools))
    [sdist] = dist.glob("blockstore-*.tar.gz")
    [raw_wheel] = dist.glob("blockstore-*.whl")
    listing = run("tar", "tzf", sdist).stdout.split()
    assert any(n.endswith("/native/build_native.py") for n in listing)
    assert any(n.endswith("/native/blockstore.h") for n in listing)
    assert not any("/tests/" in n for n in listing), "the sdist ships tests/ without the bench/ they import"

    with zipfile.ZipFile(raw_wheel) as zf:
        meta = zf.read(f"blockstore-{blockstore.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Operating System :: POSIX :: Linux" in meta
    for extra in ("test", "numpy", "torch", "lmcache", "vllm", "dev"):
        assert f"Provides-Extra: {extra}\n" in meta, extra
    assert "abi3" in raw_wheel.name  # one wheel for CPython 3.11 and later

    wheels = tmp_path / "wheelhouse"
    run(tools / "auditwheel", "repair", "-w", wheels, raw_wheel, env=clean_env(tools))
    [wheel] = wheels.glob("blockstore-*manylinux*.whl")

    wheel_bin = venv(tmp_path / "wheel-venv", wheel)
    module = Path(smoke(wheel_bin, tmp_path / "w"))
    [native] = module.parent.glob("_native*.so")
    # the C core links the libxxhash inside the wheel (blockstore.libs/), not a system copy
    links = [ln for ln in run("ldd", native).stdout.splitlines() if "xxhash" in ln]
    assert links and all("blockstore.libs/" in ln for ln in links), links

    # without its C core the installed package still works, on the Python backend, and says so once
    native.unlink()
    # (run from the work folder: `python -c` from the checkout's root would import the checkout's blockstore)
    work = tmp_path / "w"
    r = run(wheel_bin / "python", "-c", SMOKE, work / "store2", env=clean_env(wheel_bin), cwd=work)
    assert "backend python" in r.stdout
    assert r.stderr.count("RuntimeWarning") == 1 and "BLOCKSTORE_BACKEND=native" in r.stderr, r.stderr
    r = run(wheel_bin / "python", "-c", SMOKE, work / "store3", env=clean_env(wheel_bin, BLOCKSTORE_BACKEND="native"),
            cwd=work, ok=False)
    assert r.returncode != 0 and "blockstore.errors.BlockstoreError: the C core" in r.stderr, r.stderr

    sdist_bin = venv(tmp_path / "sdist-venv", sdist)
    smoke(sdist_bin, tmp_path / "s")


def test_backend_falls_back_to_python_with_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process twin of the installed check above: a C core that fails to load (simulated here; the slow
    test deletes the real one) means the Python backend and one RuntimeWarning, however many stores open;
    asking for `native` by name or by BLOCKSTORE_BACKEND makes it an error."""
    def broken() -> backend.Backend:
        raise ImportError("libxxhash.so.0: cannot open shared object file")

    monkeypatch.setattr(backend, "_load_native", broken)
    monkeypatch.setattr(backend, "_native_failure", None)
    monkeypatch.delenv("BLOCKSTORE_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="libxxhash.so.0") as caught:
        for i in range(3):
            with blockstore.open(tmp_path / f"s{i}") as s:
                assert s.backend.name == "python"
                s.put(b"k", b"v")
                assert s.get(b"k") == b"v"
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    with pytest.raises(blockstore.BlockstoreError, match="BLOCKSTORE_BACKEND=python"):
        blockstore.open(tmp_path / "explicit", backend="native")
    monkeypatch.setenv("BLOCKSTORE_BACKEND", "native")
    with pytest.raises(blockstore.BlockstoreError, match="did not load"):
        blockstore.open(tmp_path / "by-env")
    assert not (tmp_path / "explicit").exists() and not (tmp_path / "by-env").exists()
    monkeypatch.setenv("BLOCKSTORE_BACKEND", "rust")
    with pytest.raises(blockstore.InvalidArgument, match="unknown backend 'rust'"):
        blockstore.open(tmp_path / "bad")


PACKAGES = "install libxxhash-dev (Debian, Ubuntu) or xxhash-devel (Fedora, RHEL), or xxhash (Homebrew, conda-forge)"
# A linker without libxxhash (a machine with the header but not the library): a unit-test stand-in for one.
NO_LIBRARY_CC = """#!/bin/sh
for a in "$@"; do [ "$a" = "-lxxhash" ] && { echo "ld: cannot find -lxxhash" >&2; exit 1; }; done
exec gcc "$@"
"""


@pytest.mark.parametrize(("missing", "line"), [("header", f"xxhash.h not found: {PACKAGES}"),
                                               ("library", f"the xxHash library (libxxhash) not found: {PACKAGES}")])
def test_missing_xxhash_is_named_in_one_line(missing: str, line: str, tmp_path: Path) -> None:
    """Building the C core without xxHash stops with one line that names the package to install, not with
    the compiler's or linker's own error. For the header, a compiler that searches no system folder
    (-nostdinc) stands in for a machine without libxxhash-dev; for the library, a wrapper whose linker
    finds no -lxxhash. The check runs before anything is compiled."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "native", tmp_path / "native")
    cc = tmp_path / "cc-without-libxxhash"
    cc.write_text(NO_LIBRARY_CC)
    cc.chmod(0o755)
    env = {**os.environ, "CC": "gcc -nostdinc" if missing == "header" else str(cc)}
    r = run(sys.executable, "setup.py", "-q", "build_ext", "--inplace", env=env, cwd=tmp_path, ok=False)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"blockstore build: {line}", r.stderr
    assert "No such file" not in r.stderr and "error:" not in r.stderr and "cannot find" not in r.stderr
    assert not list(tmp_path.rglob("*.so"))
