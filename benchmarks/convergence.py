"""Report 3: convergence at equal samples: validation loss against samples and wall-clock.

zero1, acco and dpu train the same model from the same initial weights with the same AdamW
hyper-parameters, the same number of committed updates and the same samples (sequences) per
update, so the same sample budget:

* zero1 and dpu: ``--batch-size`` B sequences per rank per call, one update per call;
* acco: B/2 per rank per call, two calls per update (estimate half + commit half; README, "Batch
  size and schedule length"), so twice the calls for the same updates and samples.

The learning rate follows the fraction of the sample budget seen (linear warm-up, cosine decay
to 10%), so every method sees the same rate at the same sample. Clipping at ``--max-grad-norm``
(global norm of the averaged gradient: AccoOptimizer's option; ``clip_grad_norm_`` after DDP's
all-reduce for zero1). Validation: fixed batches (the same for every method), of the committed
parameters (``committed_parameters()`` for acco), mean over ranks. Wall-clock counts training
only (evaluations excluded).

    python -m benchmarks.convergence --world 2 --bandwidth 1gbit --model tiny --updates 400

``--estimate-error`` (acco, blocking, rank 0 only) also records, per committed update t, how far
the estimate round's parameters θ̃ₜ lie from the committed θₜ, relative to the update itself:
‖θ̃ₜ − θₜ‖ / ‖θₜ − θₜ₋₁‖ (global L2 over all parameters; see ``EstimateErrorTrace``). It reads
the model's parameters between calls: no collective, no random numbers, outside the timed part.
``benchmarks.lr_sweep`` runs ``train()`` over a grid of peak learning rates and seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import launcher, ranks, report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups
from .methods import Method, build_method, calls_per_update, check_methods

DEFAULT_METHODS = "zero1,acco,dpu"


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one training run (shared with ``benchmarks.lr_sweep``), less the peak
    learning rate, the seeds and the launcher's options."""
    p.add_argument("--world", default="2")
    p.add_argument("--bandwidth", default="1gbit")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per update (acco: half per call)")
    p.add_argument("--updates", type=int, default=400, help="committed updates (the sample budget = updates x world x batch)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=50, help="updates between evaluations")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (of 16 windows) per rank per evaluation (x4 at the end)")
    p.add_argument("--val-seed", type=int, default=None,
                   help="seed of the fixed validation windows (default: the run's seed; fix it to compare seeds on the same windows)")
    p.add_argument("--data", default=None)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--data-skip", type=int, default=0, help="start the corpus this many bytes in (another slice of it)")


def add_estimate_error_arguments(p: argparse.ArgumentParser, default: bool) -> None:
    p.add_argument("--estimate-error", action=argparse.BooleanOptionalAction, default=default,
                   help="acco runs: record ||estimate - committed|| / ||committed update|| per update (rank 0; training unchanged)")
    p.add_argument("--estimate-error-every", type=int, default=1, help="record the estimate error every N updates (and the last)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--seeds", default="1337", help="comma-separated; several give medians and spreads")
    add_estimate_error_arguments(p, default=False)
    launcher.add_common_arguments(p, "benchmarks/results/convergence.json")
    return p


def lr_at(fraction: float, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak, over the fraction of samples seen."""
    if fraction < warmup:
        return peak * (fraction + 1e-9) / warmup
    progress = min(1.0, (fraction - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(method: Method, val: torch.Tensor, block: int, batch: int, batches: int, seed: int, rank: int) -> float:
    """Mean over ranks of the loss on fixed validation windows (the same ones at every evaluation)."""
    stream = Batches(val, block, batch, seed + 500, rank)
    with method.evaluation() as model:
        local = sum(model(*stream.next()).item() for _ in range(batches)) / batches
    total = torch.tensor([local], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total)  # default group; acco's rounds use a private one
        total /= dist.get_world_size()
    return total.item()


class EstimateErrorTrace:
    """Rank 0, blocking mode ``acco``: per committed update t, ‖θ̃ₜ − θₜ‖ / ‖θₜ − θₜ₋₁‖.

    θ̃ₜ are the estimate round's parameters, θₜ the committed ones, θ₀ the initial weights; global
    L2 norms over all parameters, in float64. How the model's contents follow the rounds (README,
    "Modes"; ``acco/schedule.py``): call c (counting from 0) installs round c − 1 and launches
    round c; round 2k is the estimate θ̃ₖ₊₁ and round 2k + 1 the commit θₖ₊₁. So right after call
    2k + 1 the model holds θ̃ₖ₊₁, right after call 2k + 2 it holds θₖ₊₁, and after ``finish()`` the
    last commit. ``observe()`` does not rely on that arithmetic alone: it reads which round was
    installed (``rounds_installed``, ``last_round.index`` and ``.kind``) and fails loudly if they
    disagree with it. It only reads (one flat copy of the parameters per call): no collective, no
    random numbers, nothing written into the optimizer or the model.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Any, every: int = 1) -> None:
        if optimizer.mode != "acco" or not optimizer.blocking:
            raise ValueError("the estimate-error trace needs AccoOptimizer(mode='acco', blocking=True)")
        self.model, self.optimizer, self.every = model, optimizer, max(1, int(every))
        self.installed = optimizer.rounds_installed
        self.committed = self._parameters()  # θ₀
        self.estimate: Optional[torch.Tensor] = None
        self.previous_error: Optional[torch.Tensor] = None  # θ̃ₜ₋₁ − θₜ₋₁, for the errors' correlation
        self.lr_of_round: dict[int, float] = {}
        self.rows: list[dict[str, Any]] = []

    def _parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]).double()

    def launched(self, lr: float) -> None:
        """Note the peak-scheduled rate of the round the last call launched (rounds step with the
        values at their launch)."""
        self.lr_of_round[self.optimizer.rounds_launched - 1] = lr

    def observe(self, last: bool = False) -> None:
        """After a step() call or finish(): look at the round installed by it, if any."""
        opt = self.optimizer
        installed = opt.rounds_installed
        if installed == self.installed:
            return
        if installed != self.installed + 1:
            raise RuntimeError(f"estimate-error trace: {installed - self.installed} rounds installed by one call (expected one)")
        self.installed = installed
        result = opt.last_round
        index, kind = result.index, getattr(result.kind, "value", result.kind)
        expected = "estimate" if index % 2 == 0 else "commit"
        if index != installed - 1 or kind != expected:
            raise RuntimeError(f"estimate-error trace: installed round {index} is a {kind}; expected round {installed - 1}, a {expected}")
        if kind == "estimate":
            self.estimate = self._parameters()
            return
        committed = self._parameters()
        update = (index + 1) // 2
        if update != opt.num_updates or self.estimate is None:
            raise RuntimeError(f"estimate-error trace: commit round {index} is update {update}, optimizer says {opt.num_updates}")
        error_vector = self.estimate - committed
        if update % self.every == 0 or last:
            error = error_vector.norm().item()
            step = (committed - self.committed).norm().item()
            self.rows.append({
                "update": update,
                "lr": self.lr_of_round.get(index),  # the commit round's rate
                "lr_estimate": self.lr_of_round.get(index - 1),
                "ratio": error / step if step > 0 else math.inf,
                "error_norm": error,
                "step_norm": step,
                "grad_norm": result.grad_norm,  # the commit's averaged gradient, before clipping
                # cos(θ̃ₜ − θₜ, θ̃ₜ₋₁ − θₜ₋₁): near 0 if each estimate's error is fresh noise; negative if an
                # error feeds back, through the half batch computed at θ̃ₜ, into the next one (docs/design.md)
                "error_cosine": cosine(error_vector, self.previous_error),
            })
        self.previous_error = error_vector
        self.committed, self.estimate = committed, None
        for old in [i for i in self.lr_of_round if i <= index]:
            del self.lr_of_round[old]


def cosine(a: torch.Tensor, b: Optional[torch.Tensor]) -> Optional[float]:
    """cos(a, b); None without b or for a zero vector."""
    if b is None:
        return None
    denominator = (a.norm() * b.norm()).item()
    return (a @ b).item() / denominator if denominator > 0 else None


def train(name: str, args: argparse.Namespace, seed: int, corpus: Any, label: str) -> dict[str, Any]:
    """One training run; every rank returns the same curve."""
    rank, world = ranks.rank_and_world()
    config = model_config(args.model)
    per_call = calls_per_update(name)
    if args.batch_size % per_call:
        raise ValueError(f"--batch-size {args.batch_size} must be even: acco takes half of it per call")
    micro = args.batch_size // per_call
    calls = args.updates * per_call
    samples_per_call = micro * world
    budget = calls * samples_per_call
    model = build_model(config, seed)
    method = build_method(name, model, param_groups(model, args.weight_decay), args.lr, max_grad_norm=args.max_grad_norm)
    train_batches = Batches(corpus.train, config.block_size, micro, seed, rank)

    val_seed = seed if getattr(args, "val_seed", None) is None else args.val_seed
    trace = None
    if getattr(args, "estimate_error", False) and name in ("acco", "acco_momentum", "acco_muon") and rank == 0:
        trace = EstimateErrorTrace(model, method.optimizer, getattr(args, "estimate_error_every", 1))

    def evaluate(factor: int = 1) -> float:
        return validation_loss(method, corpus.val, config.block_size, 16, args.eval_batches * factor, val_seed, rank)

    curve = [{"samples": 0, "updates": 0, "wall_s": 0.0, "val_loss": evaluate()}]
    train_losses: list[float] = []
    wall = 0.0
    for call in range(1, calls + 1):
        start = time.perf_counter()
        lr = lr_at((call - 1) * samples_per_call / budget, args.lr, args.warmup_fraction)
        method.set_lr(lr)
        x, y = train_batches.next()
        train_losses.append(method.compute(x, y).item())
        method.update()
        last = call == calls
        if trace is not None:  # read-only, outside the timed part (finish() below is timed as before)
            pause = time.perf_counter()
            trace.launched(lr)
            trace.observe()
            start += time.perf_counter() - pause
        if last:
            method.finish()  # commit the last gradients: the model holds the final committed update
        wall += time.perf_counter() - start
        if last and trace is not None:
            trace.observe(last=True)
        if call % (args.eval_every * per_call) == 0 or last:
            val = evaluate(4 if last else 1)
            curve.append({"samples": call * samples_per_call, "updates": method.updates, "wall_s": wall, "val_loss": val,
                          "train_loss": statistics.fmean(train_losses)})
            train_losses = []
            if rank == 0:
                print(f"[{label}] {name:>5}: update {method.updates:4d}, {call * samples_per_call:6d} samples, "
                      f"{wall:6.1f} s, val loss {val:.4f}", file=sys.stderr, flush=True)
    updates = method.updates
    method.close()
    out = {"method": name, "seed": seed, "micro_batch": micro, "calls": calls, "updates": updates,
           "samples": budget, "tokens_per_update": args.batch_size * world * config.block_size,
           "train_wall_s": wall, "final_val_loss": curve[-1]["val_loss"], "curve": curve}
    if trace is not None:
        out["estimate_error"] = trace.rows
    return out


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    rank, world = ranks.rank_and_world()
    setting = launcher.rank_setting()
    corpus = load_corpus(args.data, args.max_bytes, args.data_skip)
    methods = check_methods(args.methods.split(","))
    runs = []
    for seed in launcher.parse_list(args.seeds, int):
        for name in methods:
            runs.append(train(name, args, seed, corpus, f"convergence world {world} {setting['bandwidth']} seed {seed}"))
    if rank != 0:
        return None
    return {"parameters": count_parameters(build_model(model_config(args.model), 0)), "runs": runs}


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    final = {m: statistics.median(r["final_val_loss"] for r in runs if r["method"] == m) for m in methods}
    speed = {m: statistics.median(r["samples"] / r["train_wall_s"] for r in runs if r["method"] == m) for m in methods}
    results = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        losses = [r["final_val_loss"] for r in mine]
        results.append({
            "method": m,
            "final_val_loss": final[m],
            "final_val_loss_spread": [min(losses), max(losses)],
            "final_val_loss_vs_zero1": final[m] / final["zero1"] - 1.0 if "zero1" in final else None,
            "samples": mine[0]["samples"], "updates": mine[0]["updates"], "calls": mine[0]["calls"],
            "micro_batch": mine[0]["micro_batch"], "tokens_per_update": mine[0]["tokens_per_update"],
            "train_wall_s": statistics.median(r["train_wall_s"] for r in mine),
            "samples_per_s": speed[m],
            "step_time_s": statistics.median(r["train_wall_s"] / r["calls"] for r in mine),
            "overlap_efficiency": None,  # no compute_only run here: see the throughput report
            "speedup_vs_zero1": speed[m] / speed["zero1"] if "zero1" in speed else None,
            "peak_rss_bytes": None,  # not measured here: see the memory report
        })
    return results


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    results, runs = [], []
    for part in partials:
        setting = report.where(part)
        results += [{**setting, **row} for row in summarise(part["runs"])]
        runs += [{**setting, **run} for run in part["runs"]]
    config = report.config(
        "convergence", args, argv, partials[0]["parameters"] if partials else None,
        equal_budget="every method: the same updates and the same sequences per update (acco: half per call, two calls per update)",
    )
    data = {"config": config, "results": results, "runs": runs}
    report.write(args.json, data, markdown(data), plot, make_plot=not args.no_plot)


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    lines = [
        f"Convergence at equal samples: model {c['model']} ({c['parameters'] / 1e6:.2f}M parameters), {c['updates']} updates of "
        f"{c['batch_size']} sequences × {c['model_config']['block_size']} bytes per rank (acco: {c['batch_size'] // 2} per call, "
        f"2 calls per update), AdamW lr {c['lr']:g} (warm-up {c['warmup_fraction']:g}, cosine to 10%), weight decay "
        f"{c['weight_decay']:g}, clip {c['max_grad_norm']:g}, seeds {c['seeds']}. Final validation loss on "
        f"{4 * c['eval_batches']} × 16 windows per rank; wall-clock = training only.", "",
    ]
    rows = []
    for r in data["results"]:
        lo, hi = r["final_val_loss_spread"]
        vs = None if r["final_val_loss_vs_zero1"] is None else f"{100 * r['final_val_loss_vs_zero1']:+.2f}%"
        rows.append([r["world"], r["bandwidth"], r["method"], r["updates"], r["samples"], f"{r['final_val_loss']:.4f}",
                     f"{lo:.4f}–{hi:.4f}", vs, f"{r['train_wall_s']:.1f}", f"{r['speedup_vs_zero1']:.2f}" if r["speedup_vs_zero1"] else None])
    lines.append(report.markdown_table(
        ["world", "bandwidth", "method", "updates", "samples", "final val loss", "spread", "vs zero1", "train s", "speed vs zero1"], rows))
    return "\n".join(lines)


def plot(plt: Any, data: dict[str, Any]) -> None:
    """Validation loss against samples (left) and wall-clock (right), one line per method and seed."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in data["runs"]))
    for run in data["runs"]:
        color = f"C{methods.index(run['method'])}"
        label = run["method"] if run["seed"] == data["runs"][0]["seed"] else None
        xs = [p["samples"] for p in run["curve"]]
        ws = [p["wall_s"] for p in run["curve"]]
        ys = [p["val_loss"] for p in run["curve"]]
        left.plot(xs, ys, marker=".", color=color, label=label)
        right.plot(ws, ys, marker=".", color=color, label=label)
    left.set_xlabel("samples (sequences, all ranks)")
    right.set_xlabel("training wall-clock (s)")
    for ax in (left, right):
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Convergence, model {data['config']['model']}, world {data['runs'][0]['world']}, {data['runs'][0]['bandwidth']}")


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    return launcher.parse_settings(args.world, args.bandwidth)


def main(argv: Optional[list[str]] = None) -> int:
    return launcher.main("benchmarks.convergence", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
