"""MANIFEST.sha256: one ``<sha256>  <name>`` line per committed model file (``sha256sum -c`` reads it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

try:
    from blockstore.errors import BlockstoreError
except ImportError:  # the GPU machine that trains the model has torch but not the store's dependencies
    BlockstoreError = Exception  # type: ignore[misc,assignment]

MANIFEST = "MANIFEST.sha256"


class ModelFilesError(BlockstoreError):
    """A model folder whose files are missing or differ from its manifest."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(model_dir: Path) -> list[str]:
    """Hash every regular file in the folder except the manifest itself; returns the lines written."""
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    lines = [f"{file_sha256(model_dir / n)}  {n}" for n in names]
    (model_dir / MANIFEST).write_text("".join(line + "\n" for line in lines))
    return lines


def verify_manifest(model_dir: Path) -> int:
    """Re-hash the files the manifest lists; raise ModelFilesError naming each missing or changed one."""
    try:
        lines = (model_dir / MANIFEST).read_text().splitlines()
    except OSError as e:
        raise ModelFilesError(f"{model_dir}: no readable {MANIFEST}: {e}") from e
    bad: list[str] = []
    for line in lines:
        digest, _, name = line.partition("  ")
        path = model_dir / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif file_sha256(path) != digest:
            bad.append(f"{name}: sha256 differs from the manifest")
    if not lines:
        bad.append(f"{MANIFEST} lists no files")
    if bad:
        raise ModelFilesError(f"{model_dir}: " + "; ".join(bad))
    return len(lines)
