"""What other code takes from the trained model's folder: its tokenizer and chunks of held-out text.

Held-out documents were never trained on (``corpus.py`` splits by a hash of each document's name), so
chunks cut from them are text the model has to read rather than recall: the material the blending
benchmark builds its prompts from.
"""

from __future__ import annotations

import functools
import gzip
import json
import random
import re
from pathlib import Path

from jobs.trained_model.manifest import ModelFilesError

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "trained-llama"
_PARAGRAPH_END = re.compile(r"(?<=\n)\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")
SOURCES = ("doc", "dist", "stdlib")  # the label prefixes corpus.py gives documents


def load_tokenizer(model_dir: str | Path = DEFAULT_MODEL_DIR):  # -> tokenizers.Tokenizer
    """The model's byte-level BPE tokenizer (``tokenizers.Tokenizer``; <s> </s> <pad> are ids 0 1 2)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ModelFilesError(f"{model_dir}: no tokenizer.json (is this a trained model folder?)")
    return Tokenizer.from_file(str(path))


def heldout_documents(model_dir: str | Path = DEFAULT_MODEL_DIR) -> list[tuple[str, str]]:
    """(label, text) of every held-out document, in the corpus's order."""
    path = Path(model_dir) / "heldout.jsonl.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [(d["label"], d["text"]) for d in map(json.loads, f)]
    except OSError as e:
        raise ModelFilesError(f"{model_dir}: cannot read heldout.jsonl.gz: {e}") from e


def _split(text: str, pattern: re.Pattern) -> list[str]:
    """Cut text after each match of pattern; the pieces joined give the text back."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.end() > start:
            pieces.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return [p for p in pieces if p]


@functools.lru_cache(maxsize=4)
def _segments(model_dir: str) -> list[list[tuple[str, int]]]:
    """Per document: (piece, token count) for each paragraph, long paragraphs cut into sentences."""
    tok = load_tokenizer(model_dir)
    docs: list[list[tuple[str, int]]] = []
    for _, text in heldout_documents(model_dir):
        pieces: list[str] = []
        for para in _split(text, _PARAGRAPH_END):
            pieces.extend(_split(para, _SENTENCE_END) if len(para) > 400 else [para])
        counts = [len(e.ids) for e in tok.encode_batch(pieces)]
        docs.append(list(zip(pieces, counts)))
    return docs


def _chunk_text(segs: list[tuple[str, int]], start: int, budget: int) -> str:
    text, used = [], 0
    for piece, count in segs[start:]:
        if used + count > budget:
            break
        text.append(piece)
        used += count
    return "".join(text)


def heldout_chunks(n: int, tokens_per_chunk: int, seed: int, model_dir: str | Path = DEFAULT_MODEL_DIR,
                   sources: tuple[str, ...] = SOURCES) -> list[list[int]]:
    """``n`` distinct token-id chunks of held-out text, each between half of ``tokens_per_chunk`` and
    ``tokens_per_chunk`` tokens, starting at a paragraph or sentence start and ending at one where the
    text allows (a single sentence longer than the budget is cut at a token). Same arguments, same chunks.
    ``sources`` picks documents by origin: ``"doc"`` (/usr/share/doc), ``"dist"`` (package READMEs) are
    mostly prose, ``"stdlib"`` is Python code.
    """
    if n < 0 or tokens_per_chunk < 8 or not set(sources) <= set(SOURCES) or not sources:
        raise ValueError(f"heldout_chunks: need n >= 0, tokens_per_chunk >= 8 and sources from {SOURCES}, "
                         f"got {n}, {tokens_per_chunk}, {sources}")
    tok = load_tokenizer(model_dir)
    docs = _segments(str(model_dir))
    wanted = [label.split(":", 1)[0] in sources for label, _ in heldout_documents(model_dir)]
    starts = [(d, i) for d, segs in enumerate(docs) if wanted[d]
              for i, (piece, _) in enumerate(segs) if piece.strip()]
    rng = random.Random(seed)
    rng.shuffle(starts)
    chunks: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for d, i in starts:
        if len(chunks) == n:
            break
        text = _chunk_text(docs[d], i, tokens_per_chunk).strip()
        if not text:  # the first sentence alone is over budget: cut it at a token
            text = "".join(p for p, _ in docs[d][i:i + 8]).strip()
        ids = tok.encode(text).ids[:tokens_per_chunk]
        if len(ids) >= tokens_per_chunk // 2 and tuple(ids) not in seen:
            seen.add(tuple(ids))
            chunks.append(ids)
    if len(chunks) < n:
        raise ValueError(f"heldout_chunks: only {len(chunks)} distinct chunks of {tokens_per_chunk} tokens exist")
    return chunks
