"""The block-attention fine-tune (jobs/models): its forward is the blender's ratio-0 blend, and the script
runs end to end on a tiny model."""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import blockstore
from blockstore.blend import Blender, ChunkKVStore, LlamaWeights, full_prefill

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # jobs/ is a folder of the repo, not installed
from jobs.models.block_attention import BlockSpec, block_forward, make_block_batch  # noqa: E402
from jobs.models.finetune_block_attention import load_base, main  # noqa: E402
from jobs.trained_model import DEFAULT_MODEL_DIR  # noqa: E402
from jobs.trained_model.llama import LlamaForCausalLM, LlamaShape, hf_config  # noqa: E402
from jobs.trained_model.manifest import verify_manifest  # noqa: E402

SMALL = BlockSpec(chunks=(2, 3), chunk_tokens=(5, 9), suffix_tokens=(3, 6))


def _tiny_model(folder: Path, vocab: int, std: float) -> LlamaForCausalLM:
    """A random 2-layer model saved as an HF folder (float32, so both loaders see the same numbers)."""
    from safetensors.torch import save_file

    shape = LlamaShape(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(shape)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config(shape, dtype="float32")))
    return model


def _tiny_base_and_corpus(tmp_path: Path, xz: bool = False) -> tuple[Path, Path]:
    """A tiny base with the committed tokenizer, and a corpus of random ids (train.u16, or its .xz)."""
    base = tmp_path / "base"
    _tiny_model(base, vocab=4096, std=0.02)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(DEFAULT_MODEL_DIR / name, base / name)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(3, 4096, 30000).astype("<u2").tobytes()
    if xz:
        (corpus / "train.u16.xz").write_bytes(lzma.compress(train))
    else:
        (corpus / "train.u16").write_bytes(train)
    (corpus / "heldout.u16").write_bytes(rng.integers(3, 4096, 8000).astype("<u2").tobytes())
    return base, corpus


@torch.no_grad()
def test_block_forward_is_the_blenders_ratio_0_blend(tmp_path: Path) -> None:
    """Every answer row's logits from block_forward equal the blender's at ratio 0 (chunk KV computed
    after <s>, re-rotated), and differ from the full prefill's: the fine-tune trains what is served."""
    model = _tiny_model(tmp_path / "m", vocab=97, std=0.15)
    w = LlamaWeights.from_pretrained(str(tmp_path / "m"))
    data = np.random.default_rng(1).integers(3, 97, size=5000).astype(np.int32)
    batch = make_block_batch(data, np.random.default_rng(2), 4, join=[7, 7], spec=SMALL)
    logits = block_forward(model, batch)
    with blockstore.open(str(tmp_path / "store")) as store:
        kv = ChunkKVStore(store, model_id=Blender.kv_model_id(w, (0,)))
        blender = Blender(w, kv, ratio=0.0, chunk_prefix=(0,), overlap=False)
        for b in range(4):
            seg = batch.segment[b]
            n = int((seg >= 0).sum())
            ids = batch.ids[b, :n]
            spans = [(int((seg == c).nonzero()[0]), int((seg == c).nonzero()[-1]) + 1)
                     for c in range(1, int(seg.max()) + 1)]
            for cut in (n, spans[-1][1] + 2):  # the whole prompt and one cut just after the last chunk
                blended = blender.blend(ids[:cut].tolist(), spans=spans).logits
                torch.testing.assert_close(logits[b, cut - 1], blended, rtol=1e-4, atol=1e-4)
            full = full_prefill(w, ids).logits
            torch.testing.assert_close(model(ids[None])[0, -1], full, rtol=1e-4, atol=1e-4)
            assert (full - logits[b, n - 1]).abs().max() > 1e-2  # reuse is not the full prefill here


@torch.no_grad()
def test_a_chunk_sees_only_itself_and_the_answer_sees_everything(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "m", vocab=97, std=0.15)
    data = np.random.default_rng(1).integers(3, 97, size=5000).astype(np.int32)
    batch = make_block_batch(data, np.random.default_rng(5), 1, join=[7, 7], spec=SMALL)
    seg = batch.segment[0]
    before = block_forward(model, batch)[0]
    first = seg == 1
    batch.ids[0, first] = (batch.ids[0, first] + 1) % 97  # change the first chunk's tokens only
    after = block_forward(model, batch)[0]
    assert torch.equal(before[seg >= 2], after[seg >= 2])  # the other chunks' rows do not read it
    assert not torch.allclose(before[batch.answer[0]], after[batch.answer[0]])


def test_finetune_runs_and_writes_a_model_folder(tmp_path: Path) -> None:
    """A few steps on a tiny base with the committed tokenizer: a loadable folder, its loss curve and
    the held-out figures before and after, weights moved, MANIFEST valid."""
    base, corpus = _tiny_base_and_corpus(tmp_path, xz=True)
    out = tmp_path / "out"
    assert main([str(corpus), str(out), "--base", str(base), "--steps", "3", "--seq-len", "64",
                 "--causal-batch", "2", "--block-batch", "2", "--eval-every", "2", "--eval-windows", "2", "--eval-seq-len", "64",
                 "--eval-blocks", "16", "--warmup", "1", "--lr", "1e-3"]) == 0
    record = json.loads((out / "loss_curve.json").read_text())
    assert [e["step"] for e in record["evaluations"]] == [0, 2, 3]
    assert all(len(v) == 3 for v in record["train_loss"].values())
    assert all(np.isfinite(e["heldout_loss"]) and 0 <= e["heldout_answer_top1"] <= 1 for e in record["evaluations"])
    assert verify_manifest(out) >= 6
    tuned, start = load_base(out, torch.device("cpu")), load_base(base, torch.device("cpu"))
    assert not torch.equal(tuned.lm_head.weight, start.lm_head.weight)
    assert LlamaWeights.from_pretrained(str(out)).config.num_hidden_layers == 2


def test_block_batches_are_refused_on_a_too_short_stream() -> None:
    with pytest.raises(ValueError, match="too short"):
        make_block_batch(np.zeros(50, np.int32), np.random.default_rng(0), 1, join=[7])


SHORT_RUN = ["--steps", "1", "--seq-len", "64", "--causal-batch", "1", "--block-batch", "2", "--eval-windows", "1",
             "--eval-seq-len", "64", "--eval-blocks", "16", "--warmup", "1"]


def test_a_corpus_encoded_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    """Token ids of another tokenizer would train the model on noise: the run stops before any step and
    says how to rebuild the corpus."""
    base, corpus = _tiny_base_and_corpus(tmp_path)
    (corpus / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    with pytest.raises(SystemExit, match="another tokenizer.*--tokenizer"):
        main([str(corpus), str(tmp_path / "out"), "--base", str(base), *SHORT_RUN])
    assert not (tmp_path / "out").exists()
    shutil.copyfile(base / "tokenizer.json", corpus / "tokenizer.json")  # the same tokenizer: accepted
    assert main([str(corpus), str(tmp_path / "out"), "--base", str(base), *SHORT_RUN]) == 0


def test_full_grad_trains_the_full_attention_side_too(tmp_path: Path) -> None:
    """With --full-grad the consistency term's gradient reaches the model through the full prefill as
    well: the same seed and batch give other weights than without it."""
    base, corpus = _tiny_base_and_corpus(tmp_path)
    for name, extra in (("one", []), ("both", ["--full-grad", "0.5"])):
        assert main([str(corpus), str(tmp_path / name), "--base", str(base), *SHORT_RUN, "--lr", "1e-2", *extra]) == 0
    one, both = (load_base(tmp_path / n, torch.device("cpu")) for n in ("one", "both"))
    assert json.loads((tmp_path / "both" / "loss_curve.json").read_text())["run"]["settings"]["full_grad"] == 0.5
    assert not torch.equal(one.lm_head.weight, both.lm_head.weight)
