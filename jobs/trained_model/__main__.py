"""Command line: ``python -m jobs.trained_model {corpus,train,check,verify} ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.trained_model.heldout import DEFAULT_MODEL_DIR

DESCRIPTION = """\
Build, train, check and verify the small trained Llama model used to measure blending fidelity.

  corpus OUT            collect offline text (Python stdlib sources, /usr/share/doc, installed packages'
                        METADATA), split off held-out documents, train a byte-level BPE tokenizer,
                        write token ids (train.u16, heldout.u16) and the file list with its hash
  train CORPUS OUT      train the model in plain torch (GPU if present) and write an HF Llama folder:
                        config.json, model.safetensors (bf16), tokenizer, loss_curve.json/.png;
                        then MANIFEST.sha256
  check DIR             load DIR in vLLM (CPU) and transformers, greedy-generate from a held-out prompt,
                        and require their first-token log-probabilities to agree
  verify DIR            re-hash DIR's files against its MANIFEST.sha256 (--rewrite: write a new one)
"""


def _parser() -> argparse.ArgumentParser:
    from jobs.trained_model.train import TrainSettings

    d = TrainSettings()
    ap = argparse.ArgumentParser(prog="python -m jobs.trained_model", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="build the tokenizer and token ids from offline text")
    c.add_argument("out", type=Path)
    c.add_argument("--tokenizer", type=Path, metavar="MODEL_DIR",
                   help="encode with this model folder's tokenizer instead of training a new one (needed to "
                   "fine-tune that model: a tokenizer trained on another machine's files differs)")
    t = sub.add_parser("train", help="train the model (see the module docstring of jobs/trained_model/train.py)")
    t.add_argument("corpus", type=Path, help="a folder written by the corpus command")
    t.add_argument("out", type=Path, help="the model folder to write")
    how_long = t.add_mutually_exclusive_group(required=True)
    how_long.add_argument("--steps", type=int, help="number of optimizer steps")
    how_long.add_argument("--time-budget", type=float, help="seconds of training; sets --steps by calibration")
    t.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per training window ({d.seq_len})")
    t.add_argument("--batch", type=int, default=d.batch, help=f"windows per step ({d.batch})")
    t.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate ({d.lr})")
    t.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps ({d.warmup})")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between held-out losses ({d.eval_every})")
    t.add_argument("--eval-windows", type=int, default=d.eval_windows, help=f"held-out windows ({d.eval_windows})")
    t.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights and data order ({d.seed})")
    k = sub.add_parser("check", help="vLLM and transformers load DIR and agree")
    k.add_argument("dir", type=Path, nargs="?", default=DEFAULT_MODEL_DIR)
    v = sub.add_parser("verify", help="files match MANIFEST.sha256")
    v.add_argument("dir", type=Path, nargs="?", default=DEFAULT_MODEL_DIR)
    v.add_argument("--rewrite", action="store_true", help="re-hash every file into a new manifest instead "
                   "(after an intended change, e.g. to README.md)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.command == "corpus":
        from jobs.trained_model.corpus import build_corpus

        build_corpus(args.out, log=log, tokenizer_from=args.tokenizer)
    elif args.command == "train":
        from jobs.trained_model.manifest import write_manifest
        from jobs.trained_model.train import TrainSettings, run_training

        s = TrainSettings(seq_len=args.seq_len, batch=args.batch, lr=args.lr, warmup=args.warmup,
                          eval_every=args.eval_every, eval_windows=args.eval_windows, seed=args.seed)
        record = run_training(args.corpus, args.out, args.steps, args.time_budget, s, log=log)
        write_manifest(args.out)
        log(f"train: done, final train loss {record['train_loss'][-1]:.3f}, "
            f"held-out {record['heldout_loss'][-1][1]:.3f}, wall {record['run']['wall_s']} s")
    elif args.command == "check":
        from jobs.trained_model.check import check

        check(args.dir, log=log)
    elif args.rewrite:
        from jobs.trained_model.manifest import write_manifest

        log(f"verify: {len(write_manifest(args.dir))} files hashed into {args.dir / 'MANIFEST.sha256'}")
    else:
        from jobs.trained_model.manifest import verify_manifest

        log(f"verify: {verify_manifest(args.dir)} files match {args.dir / 'MANIFEST.sha256'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
