"""The committed trained model (jobs/models/trained-llama) and the code that made it (jobs/trained_model).

Fast checks on CPU: the files are there, small and match their manifest; the config is a Llama config
transformers loads with every weight; the plain-torch training model computes what transformers computes
from the same weights; the tokenizer round-trips held-out text; the model predicts held-out text clearly
better than a unigram model fitted to that very text; a few training steps on CPU lower the loss and write
a folder transformers loads. The vLLM comparison (``check``) is a slow test.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # jobs/ is a folder of the repo, not installed

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from jobs.trained_model import (  # noqa: E402
    DEFAULT_MODEL_DIR,
    ModelFilesError,
    heldout_chunks,
    heldout_documents,
    load_tokenizer,
)
from jobs.trained_model.corpus import Document, _decode  # noqa: E402
from jobs.trained_model.llama import LlamaForCausalLM, LlamaShape  # noqa: E402
from jobs.trained_model.manifest import verify_manifest, write_manifest  # noqa: E402
from jobs.trained_model.train import COPIED_CORPUS_FILES, TrainSettings, lr_at, run_training  # noqa: E402

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "loss_curve.json", "loss_curve.png",
               "finetune_curve.json", "finetune_curve.png", "finetune2_curve.json", "finetune2_curve.png",
               "heldout.jsonl.gz", "corpus.json", "README.md", "MANIFEST.sha256")
MAX_WEIGHT_BYTES = 25_000_000


@pytest.fixture(scope="module")
def hf_model():
    return transformers.LlamaForCausalLM.from_pretrained(str(DEFAULT_MODEL_DIR), dtype=torch.float32).eval()


def test_files_present_and_small():
    for name in MODEL_FILES:
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES


def test_manifest_verifies_and_catches_a_changed_file(tmp_path):
    assert verify_manifest(DEFAULT_MODEL_DIR) == len(MODEL_FILES) - 1
    copy = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_size": 384', '"hidden_size": 385'))
    with pytest.raises(ModelFilesError, match="config.json"):
        verify_manifest(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match="tokenizer.json: missing"):
        verify_manifest(copy)
    write_manifest(copy)  # re-hashed, the folder verifies again
    assert verify_manifest(copy) == len(MODEL_FILES) - 2
    with pytest.raises(ModelFilesError, match="MANIFEST"):
        verify_manifest(tmp_path)


def test_config_is_the_llama_shape_blending_needs(hf_model):
    cfg = transformers.AutoConfig.from_pretrained(str(DEFAULT_MODEL_DIR))
    assert isinstance(cfg, transformers.LlamaConfig)
    assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64  # rotary dim = head dim
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.max_position_embeddings >= 2048
    assert cfg.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}  # no scaling
    assert cfg.vocab_size == load_tokenizer().get_vocab_size()
    stored = load_file(str(DEFAULT_MODEL_DIR / "model.safetensors"))
    assert set(stored) == set(hf_model.state_dict())  # every weight named as transformers names it
    assert all(t.dtype == torch.bfloat16 for t in stored.values())


def test_plain_torch_model_matches_transformers(hf_model):
    """The training code's model (RoPE layout, GQA, RMSNorm) is the one transformers runs."""
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    shape = LlamaShape(**{k: cfg[k] for k in LlamaShape.__dataclass_fields__})
    ours = LlamaForCausalLM(shape)
    ours.load_state_dict({k: v.float() for k, v in load_file(str(DEFAULT_MODEL_DIR / "model.safetensors")).items()})
    ids = torch.tensor([heldout_chunks(1, 200, seed=3)[0]])
    with torch.no_grad():
        diff = (ours.eval()(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-3


def test_tokenizer_round_trips_heldout_text():
    tok = load_tokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    docs = heldout_documents()
    assert len(docs) >= 50
    for _, text in docs[::10]:
        ids = tok.encode(text[:5000]).ids
        assert tok.decode(ids) == text[:5000]
        assert hf_tok(text[:5000], add_special_tokens=False)["input_ids"] == ids
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]


def test_heldout_chunks_are_heldout_text_deterministic_and_sized():
    chunks = heldout_chunks(30, 128, seed=5)
    assert chunks == heldout_chunks(30, 128, seed=5)
    assert chunks != heldout_chunks(30, 128, seed=6)
    assert len({tuple(c) for c in chunks}) == 30
    assert all(64 <= len(c) <= 128 for c in chunks)
    tok = load_tokenizer()
    texts = [t for _, t in heldout_documents()]
    corpus = json.loads((DEFAULT_MODEL_DIR / "corpus.json").read_text())
    heldout_labels = {d["label"] for d in corpus["documents"] if d["split"] == "heldout"}
    assert {label for label, _ in heldout_documents()} == heldout_labels
    for c in chunks[:10]:
        assert any(tok.decode(c) in t for t in texts)  # cut from a held-out document, as written
    with pytest.raises(ValueError):
        heldout_chunks(10**6, 128, seed=0)
    with pytest.raises(ValueError):
        heldout_chunks(3, 128, seed=0, sources=("nonsense",))
    code = [t for label, t in heldout_documents() if label.startswith("stdlib:")]
    prose = heldout_chunks(10, 128, seed=5, sources=("doc", "dist"))
    assert not any(tok.decode(c) in t for c in prose for t in code)
    assert all(any(tok.decode(c) in t for t in code) for c in heldout_chunks(5, 128, seed=5, sources=("stdlib",)))


def test_heldout_loss_far_below_a_unigram_model(hf_model):
    """Cross-entropy on ~500 held-out tokens vs a unigram model fitted to all held-out text (which has
    seen the very tokens it is scored on, so it is a generous baseline)."""
    tok = load_tokenizer()
    counts = Counter(i for _, text in heldout_documents() for i in tok.encode(text).ids)
    total, vocab = sum(counts.values()), tok.get_vocab_size()
    chunks = heldout_chunks(2, 256, seed=11)
    model_nll, unigram_nll, n = 0.0, 0.0, 0
    for ids in chunks:
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, :-1]
        model_nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        unigram_nll += -sum(math.log((counts[i] + 1) / (total + vocab)) for i in ids[1:])
        n += len(ids) - 1
    model_loss, unigram_loss = model_nll / n, unigram_nll / n
    assert model_loss < 0.6 * unigram_loss, (model_loss, unigram_loss)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    s = TrainSettings(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(i, 200, s) for i in range(200)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_corpus_split_and_decoding_rules():
    assert _decode(b"\x00\x01binary" * 100) is None
    assert _decode(b"short") is None
    assert _decode("\u00e9t\u00e9 ".encode("latin-1") * 100) is None  # not UTF-8
    text = _decode(b"a line of text\n" * 20000)
    assert text is not None and text.endswith("\n") and len(text) <= 128 * 1024
    labels = [f"doc:pkg{i}/README" for i in range(4000)]
    held = [label for label in labels if Document(label, "").heldout]
    assert held == [label for label in labels if Document(label, "x").heldout]  # by name, not content
    assert 0.015 < len(held) / len(labels) < 0.035


def test_a_few_cpu_training_steps_lower_the_loss_and_write_a_loadable_folder(tmp_path):
    """The training loop end to end, on a tiny corpus cut from held-out tokens and a small model."""
    import numpy as np

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in COPIED_CORPUS_FILES:
        shutil.copyfile(DEFAULT_MODEL_DIR / name, corpus / name)
    ids = np.asarray([i for c in heldout_chunks(12, 256, seed=2) for i in c], dtype="<u2")
    ids[: len(ids) // 2].tofile(corpus / "train.u16")
    ids[len(ids) // 2:].tofile(corpus / "heldout.u16")
    s = TrainSettings(seq_len=64, batch=4, lr=1e-2, warmup=2, eval_every=4, eval_windows=2, seed=0)
    small = LlamaShape(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)
    record = run_training(corpus, tmp_path / "out", 12, None, s, log=lambda _m: None, shape=small)
    assert record["train_loss"][-1] < record["train_loss"][0] - 0.5
    assert record["heldout_loss"][-1][1] < record["heldout_loss"][0][1]
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert (loaded.config.hidden_size, loaded.config.num_key_value_heads) == (128, 1)
    assert set(load_file(str(tmp_path / "out" / "model.safetensors"))) == set(loaded.state_dict())
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_vllm_and_transformers_agree_on_the_committed_model():
    pytest.importorskip("vllm")
    from jobs.trained_model.check import LOGPROB_TOLERANCE, check

    figures = check(DEFAULT_MODEL_DIR, log=lambda _m: None)
    assert figures["max_logprob_diff"] <= LOGPROB_TOLERANCE
    assert figures["greedy_agreement"] >= 0.75
