"""ACCO against its own ``sync`` mode in one process, under several learning-rate schedules.

No communication and no second rank: what is left is the algorithm itself (half of each update's
gradients computed at the estimate θ̃ₜ). Same model, data, batch per update and hyper-parameters
for both modes; acco takes half the batch per call and two calls per update.

    python -m benchmarks.schedules --updates 150 --json benchmarks/results/schedules.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from acco import AccoOptimizer

from . import report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups

SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda f: 1.0,
    "warmup 5% then constant": lambda f: min(1.0, (f + 1e-9) / 0.05),
    "cosine to 10%, no warm-up": lambda f: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * f)),
    "warmup 5% + cosine to 10%": lambda f: min(1.0, (f + 1e-9) / 0.05) if f < 0.05 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (f - 0.05) / 0.95)),
}


def train(args: argparse.Namespace, corpus, mode: str, schedule: Callable[[float], float]) -> float:
    """Final validation loss of one run (the committed parameters, after ``finish()``)."""
    config = model_config(args.model)
    per_call = 2 if mode == "acco" else 1
    model = build_model(config, args.seed)
    inner = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    opt = AccoOptimizer(inner, mode=mode, max_grad_norm=args.max_grad_norm, batch_rule_applied=True)
    batches = Batches(corpus.train, config.block_size, args.batch_size // per_call, args.seed, 0)
    calls = args.updates * per_call
    for call in range(calls):
        for group in opt.param_groups:
            group["lr"] = args.lr * schedule(call / calls)
        model(*batches.next()).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    val = Batches(corpus.val, config.block_size, 16, args.seed + 500, 0)
    with torch.no_grad():
        loss = sum(model(*val.next()).item() for _ in range(args.eval_batches)) / args.eval_batches
    opt.close()
    return loss


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--updates", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per update (acco: half per call)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data", type=str, default=None)
    parser.add_argument("--max-bytes", type=int, default=4_000_000)
    parser.add_argument("--json", type=Path, default=report.RESULTS / "schedules.json")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    corpus = load_corpus(args.data, args.max_bytes)
    results = []
    for name, schedule in SCHEDULES.items():
        losses = {mode: train(args, corpus, mode, schedule) for mode in ("sync", "acco")}
        gap = losses["acco"] / losses["sync"] - 1
        print(f"[schedules] {name}: sync {losses['sync']:.4f}, acco {losses['acco']:.4f} ({gap:+.2%})", file=sys.stderr, flush=True)
        results.append({"schedule": name, "sync_val_loss": losses["sync"], "acco_val_loss": losses["acco"], "acco_vs_sync": gap})
    parameters = count_parameters(build_model(model_config(args.model), 0))
    data = {"config": report.config("schedules", args, argv, parameters, world=1), "results": results}
    rows = [[r["schedule"], f"{r['sync_val_loss']:.4f}", f"{r['acco_val_loss']:.4f}", f"{r['acco_vs_sync']:+.2%}"] for r in results]
    text = (
        f"acco against sync in one process: model {args.model}, {args.updates} updates of {args.batch_size} sequences "
        f"(acco: {args.batch_size // 2} per call, 2 calls per update), peak lr {args.lr:g}, seed {args.seed}; final "
        "validation loss of the committed parameters.\n\n"
        + report.markdown_table(["schedule", "sync", "acco", "acco vs sync"], rows)
    )
    report.write(args.json, data, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
