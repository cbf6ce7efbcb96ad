"""The training corpus: text found offline on this machine, a held-out split, a BPE tokenizer, token ids.

Sources, each walked in sorted order so the same machine always yields the same corpus:

- the Python standard library's own sources (``sysconfig``'s stdlib folder, ``*.py``, tests and
  site-packages left out): code with docstrings and comments;
- ``/usr/share/doc``: the READMEs, changelogs and notes Debian packages ship (``.gz`` files read
  decompressed), prose;
- the ``METADATA`` of every installed Python distribution: each package's README, prose.

Each document is cut to ``MAX_DOC_BYTES`` (a few giant changelogs would otherwise dominate) and exact
duplicates (the many identical licence texts) are kept once. A document goes to the held-out split when
the hash of its label falls under ``HELDOUT_PER_MILLE``: a property of its name alone, so the split does
not move when other files come or go. The tokenizer is trained on the training split only.

The corpus folder holds ``train.u16`` and ``heldout.u16`` (little-endian uint16 token ids, each document
followed by ``</s>``), ``heldout.jsonl.gz`` (the held-out documents' text), the tokenizer files, and
``corpus.json``: every document's label, size, hash and split, and one hash over the whole list.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2, as jobs/tiny_model.py
EOS_ID = 1
TARGET_VOCAB = 4096
MAX_POSITIONS = 4096
MAX_DOC_BYTES = 128 * 1024
MIN_DOC_BYTES = 200
HELDOUT_PER_MILLE = 25
DOC_ROOT = Path("/usr/share/doc")
# Markup, data and images under /usr/share/doc: not prose a reader would write or ask about.
SKIPPED_SUFFIXES = {".html", ".htm", ".xml", ".svg", ".png", ".jpg", ".gif", ".css", ".js", ".json",
                    ".pdf", ".ps", ".log", ".dvi", ".bz2", ".xz", ".zip", ".tar", ".ico", ".pyc", ".so"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Document:
    label: str  # where it came from, e.g. "doc:apt/changelog.gz"
    text: str

    @property
    def heldout(self) -> bool:
        return int(hashlib.sha256(self.label.encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


def _decode(raw: bytes) -> str | None:
    """UTF-8 text cut at a line end under MAX_DOC_BYTES, or None for binary or tiny files."""
    if b"\x00" in raw[:4096]:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(raw) > MAX_DOC_BYTES:
        text = text.encode()[:MAX_DOC_BYTES].decode("utf-8", "ignore")
        text = text[: text.rfind("\n") + 1] or text
    printable = sum(c.isprintable() or c in "\n\t" for c in text[:4096])
    if len(text.encode()) < MIN_DOC_BYTES or printable < 0.97 * min(len(text), 4096):
        return None
    return text


def _candidates() -> Iterator[tuple[str, Path]]:
    """(label, path) of every source file, sorted within each source."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.rglob("*.py")):
        parts = p.relative_to(stdlib).parts
        if not ({"site-packages", "test", "tests", "idle_test"} & set(parts)):
            yield "stdlib:" + "/".join(parts), p
    for p in sorted(DOC_ROOT.rglob("*")):
        name = p.name[:-3] if p.name.endswith(".gz") else p.name
        if p.is_file() and not p.is_symlink() and Path(name).suffix.lower() not in SKIPPED_SUFFIXES:
            yield "doc:" + str(p.relative_to(DOC_ROOT)), p
    purelib = Path(sysconfig.get_paths()["purelib"])
    for p in sorted(purelib.glob("*.dist-info/METADATA")):
        yield "dist:" + p.parent.name, p


def documents() -> list[Document]:
    """Every usable source document, deduplicated by content, in a fixed order."""
    seen: set[str] = set()
    docs: list[Document] = []
    for label, path in _candidates():
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        text = _decode(raw)
        if text is None:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            docs.append(Document(label, text))
    return docs


def train_tokenizer(texts: list[str]):  # -> tokenizers.Tokenizer
    """Byte-level BPE, the conventions of jobs/tiny_model.py (no prefix space, <s> </s> <pad> = 0 1 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TARGET_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out: Path) -> None:
    """Write the tokenizer as a PreTrainedTokenizerFast folder that vLLM and transformers both load."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=MAX_POSITIONS)
    fast.save_pretrained(out)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name transformers 4.x loads too
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    if not (out / "special_tokens_map.json").exists():
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def _encode(tok, docs: list[Document]):  # -> numpy uint16 array
    import numpy as np

    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return np.asarray(ids, dtype="<u2")


def load_tokenizer_files(folder: Path):  # -> tokenizers.Tokenizer
    """The tokenizer a model or corpus folder ships, to encode a corpus with it instead of training one."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def build_corpus(out: Path, log=print, tokenizer_from: Path | None = None) -> dict:
    """Write the corpus folder (module docstring); return the summary also saved as corpus.json.

    With ``tokenizer_from`` (a model folder) the text is encoded with that folder's tokenizer, copied
    as is, instead of one trained here: the tokenizer trained on another machine's files differs, and
    continuing to train a model (``jobs.models.finetune_block_attention``) needs its own token ids.
    """
    out.mkdir(parents=True, exist_ok=True)
    docs = documents()
    train = [d for d in docs if not d.heldout]
    heldout = [d for d in docs if d.heldout]
    log(f"corpus: {len(docs)} documents, {len(train)} train, {len(heldout)} held out")
    if tokenizer_from is None:
        tok = train_tokenizer([d.text for d in train])
        save_tokenizer(tok, out)
    else:
        tok = load_tokenizer_files(tokenizer_from)
        for name in TOKENIZER_FILES:
            (out / name).write_bytes((tokenizer_from / name).read_bytes())
        log(f"corpus: encoding with {tokenizer_from}'s tokenizer")
    summary: dict = {"documents": [], "splits": {}}
    for name, split in (("train", train), ("heldout", heldout)):
        arr = _encode(tok, split)
        (out / f"{name}.u16").write_bytes(arr.tobytes())
        summary["splits"][name] = {"documents": len(split), "bytes": sum(len(d.text.encode()) for d in split),
                                   "tokens": int(arr.size)}
        log(f"corpus: {name}: {len(split)} documents, {arr.size} tokens")
    with gzip.GzipFile(out / "heldout.jsonl.gz", "wb", mtime=0) as f:
        for d in heldout:
            f.write((json.dumps({"label": d.label, "text": d.text}) + "\n").encode())
    for d in docs:
        summary["documents"].append({"label": d.label, "bytes": len(d.text.encode()),
                                     "sha256": hashlib.sha256(d.text.encode()).hexdigest(),
                                     "split": "heldout" if d.heldout else "train"})
    listing = "".join(f"{d['label']}\t{d['sha256']}\t{d['split']}\n" for d in summary["documents"])
    summary["corpus_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
    summary["vocab_size"] = tok.get_vocab_size()
    summary["max_doc_bytes"] = MAX_DOC_BYTES
    summary["heldout_per_mille"] = HELDOUT_PER_MILLE
    (out / "corpus.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log(f"corpus: sha256 {summary['corpus_sha256']}, vocab {summary['vocab_size']}")
    return summary
