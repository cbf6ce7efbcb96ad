"""What every fuzz target shares: loading the sanitized C core, Python coverage, and the entry point.

A target is a module `fuzz.targets.<name>` with a `test_one_input(data: bytes) -> None` that feeds
`data` to one parser and checks its contract: the parser returns a valid result or raises the error
class its code documents. Anything else (another exception type, a failed assertion, a crash, a
sanitizer report, a hang) escapes, and libFuzzer records the input as a finding.

Import this module before anything from `blockstore`, so that:

- `BLOCKSTORE_FUZZ_NATIVE=/path/_native*.so` (set by `fuzz/run.py --sanitize`) loads that build of the
  C core as `blockstore._native`, before `blockstore.native` imports the installed one;
- `instrumented(__name__)` wraps the target's imports in `atheris.instrument_imports()` when the
  module runs as a fuzzer (`python -m fuzz.targets.<name>`), so libFuzzer sees Python branch and
  comparison coverage of `blockstore.*`. Imported by pytest (corpus replay), nothing is instrumented.

Coverage of the C core itself is not available: gcc has no `-fsanitize=fuzzer` and its
`-fsanitize-coverage=trace-pc` callbacks are not libFuzzer's. The C parsers are reached through the
pure-Python twin (blockstore/purepy.py), which makes the same checks in the same order: its coverage
steers the fuzzer into the same branches, and the differential targets run both on every input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

NATIVE_ENV = "BLOCKSTORE_FUZZ_NATIVE"
BLIND_ENV = "BLOCKSTORE_FUZZ_BLIND"
INSTRUMENT = ["blockstore"]  # engine, compaction (blockstore.compaction) and connector (blockstore.connector)


def _load_native_override() -> None:
    path = os.environ.get(NATIVE_ENV)
    if not path or "blockstore._native" in sys.modules:
        return
    if "blockstore" in sys.modules:
        raise RuntimeError("fuzz.harness must be imported before blockstore for BLOCKSTORE_FUZZ_NATIVE to apply")
    spec = importlib.util.spec_from_file_location("blockstore._native", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{NATIVE_ENV}={path}: not a loadable extension")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # `from blockstore import _native` (blockstore/native.py) finds it here
    sys.modules["blockstore._native"] = mod


_load_native_override()


def native_path() -> str:
    """File of the C core this process uses (the sanitized copy under --sanitize)."""
    mod = sys.modules.get("blockstore._native")
    if mod is None:
        import blockstore._native as mod  # type: ignore[import-not-found,no-redef]
    return str(getattr(mod, "__file__", "?"))


def instrumented(module_name: str) -> contextlib.AbstractContextManager[object]:
    """Wrap a target's imports: instrumented for coverage when the target runs as the fuzzer."""
    if module_name != "__main__" or os.environ.get(BLIND_ENV):
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=INSTRUMENT)  # type: ignore[no-any-return]


def main(test_one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Run libFuzzer over `test_one_input` (`argv` as libFuzzer takes it: flags, corpus dirs or files);
    with BLOCKSTORE_FUZZ_BLIND=1, the blind mutation loop of fuzz/blind.py instead (sanitizer runs)."""
    argv = list(sys.argv if argv is None else argv)
    if os.environ.get(NATIVE_ENV):
        print(f"fuzz: C core {native_path()}", file=sys.stderr, flush=True)
    if os.environ.get(BLIND_ENV):
        from fuzz import blind

        sys.exit(blind.run(test_one_input, argv[1:]))
    import atheris

    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def split_control(data: bytes) -> tuple[int, bytes]:
    """Targets whose inputs need structure read one control byte first (flags documented per target)."""
    if not data:
        return 0, b""
    return data[0], data[1:]


def decode_both(native: object, python: object, method: str, raw: bytes, error: type[BaseException]) -> Any:
    """Differential decode: the C core's `method` and its Python twin's on the same bytes must agree,
    both raising `error` (of one class: None is returned) or both returning equal values (returned)."""
    got = []
    for backend, buf in ((native, raw), (python, memoryview(raw))):
        try:
            got.append(getattr(backend, method)(buf))
        except error as exc:
            got.append(exc)
    got_c, got_py = got
    if isinstance(got_c, BaseException) or isinstance(got_py, BaseException):
        assert type(got_c) is type(got_py), f"native {got_c!r} != python {got_py!r}"
        return None
    assert got_c == got_py, f"native {got_c} != python {got_py}"
    return got_c
