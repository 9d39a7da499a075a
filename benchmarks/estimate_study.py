"""Which estimate rules close acco's loss gap? A single-process simulation of the ACCO equations.

Issue 14 asks why acco's loss falls behind ZeRO-1's at the learning rates that suit AdamW. This
script does not run ``AccoOptimizer``: it applies the equations of docs/design.md ("What ACCO
computes") in one process, on the full model, so that estimate rules can be tried in a minute,
including rules that are *diagnostic oracles* a distributed optimizer could not run (they need a
second backward or random signs; they are labelled so). Each update t:

1. the first half of the batch (``--world`` ranks × ``batch/2`` sequences) is computed at the
   model's point for it, θ̃ₜ (``sync``: at θₜ);
2. the estimate round makes θ̃ₜ₊₁ from θₜ and that half's mean gradient by the rule under study,
   never committing optimizer state;
3. the second half is computed at θₜ and the commit makes θₜ₊₁ = AdamW(θₜ, mean of both halves).

Same model, data streams (rank r's windows of ``benchmarks.convergence``), schedule, AdamW
(β = 0.9, 0.95), weight decay and global-norm clipping as report 3. With ``--val-seed 0`` (the
validation windows of ``benchmarks.lr_sweep``) the ``acco`` rule lands where ``AccoOptimizer``
lands to float tolerance (tests/test_benchmarks_smoke.py); by default each seed has its own
windows. Every rule, ``sync`` included, steps its commit at the rate acco's commit gets (half an
update after zero1's), so that the rules differ only in where the first half is computed.

Rules:

* ``sync``: both halves at θₜ (the synchronous reference; it steps at acco's commit rates).
* ``acco``: θ̃ₜ₊₁ = AdamW(θₜ, ḡ₁) (the paper's estimate; ``AccoOptimizer``'s default).
* ``carry:<c>``: θ̃ₜ₊₁ = AdamW(θₜ, ḡ₁) + c·(θ̃ₜ − θₜ): the previous estimate's offset carried on.
* ``flip`` (oracle): acco, but the first half is computed at θₜ + s ⊙ (θ̃ₜ − θₜ) with fresh random
  signs s: an estimate error of the same size per element, in a random direction.
* ``oracle`` (oracle): acco, but the estimate round steps on ḡ₁ recomputed at θₜ on the same
  sequences (one more backward): the previous error no longer feeds into the next estimate.
* ``bound:<k>`` (oracle): the estimate steps on (ḡ₁ + G) / 2, G the mean gradient at θₜ of k more
  half batches from streams of their own (k more backward passes): the second half predicted by
  its expectation, so that the error keeps only what no estimate can know, the second half's own
  noise. It bounds what any rule that leaves the commit unchanged can gain.

Rules of issue 22 part 2, which change what the commit does with ḡ₁ or how far the estimate moves.
Each could run in ``AccoOptimizer`` with no extra collective round and at most one shard-sized
buffer (eₜ = θ̃ₜ − θₜ, the error of the estimate at which ḡ₁ was computed, is known on each shard at
the commit):

* ``weighted:<w>``: the commit steps on w·ḡ₁ + (1 − w)·ḡ₂ (acco: w = ½). ḡ₂ is exact at θₜ, ḡ₁
  carries H·eₜ; w < ½ weighs that bias down, but the commit's gradient noise grows by
  (w² + (1 − w)²)/½ (at w = ¼: 1.25×, an effective batch of 0.8×).
* ``damp:<α>``: θ̃ₜ₊₁ = θₜ + α·(AdamW(θₜ, ḡ₁) − θₜ): a damped estimate (α = 1: acco; α = 0: ḡ₁ at
  θₜ, a one-step delayed point).
* ``secant``: the commit steps on (ḡ₁ − κ·eₜ + ḡ₂)/2 with κ = max(0, eₜᵀ(ḡ₁ − ḡ₂)/|eₜ|²), the
  curvature along eₜ by a secant (the halves' fresh noise is independent of eₜ): it removes H·eₜ's
  component along eₜ. eₜᵀḡ₁, eₜᵀḡ₂ and |eₜ|² ride in the clipping norm's all-reduce (the corrected
  gradient's norm is a combination of them and the existing one).
* ``secant:both``: ``secant``, and the estimate round's ḡ₁ is corrected as well, by the last commit's κ
  (the estimate steps before this update's ḡ₂ exists): ḡ₁ − κₜ₋₁·eₜ. Both rounds then step on a first
  half moved back toward θₜ along eₜ, so the estimate no longer feeds its own error back into itself
  (``benchmarks/linear_stability.py``: that recursion is what halves acco's stable sharpness). Its cost
  in the optimizer: θ̃ₜ kept on each shard (one shard-sized buffer) and one carried scalar.
* ``secant:gate<b>``: ``secant:both`` with κ shrunk by its own signal-to-noise over updates:
  κ·m²/v, where m and v are running averages (factor b) of the raw κ and of κ². Where κ is a
  steady curvature (a high rate, e along the sharp directions) m² ≈ v and the rule is
  ``secant:both``; where κ is mostly the halves' noise (a low rate) m² ≪ v and it is acco. Two
  host scalars kept in the state, nothing communicated.
* ``secant:tensor``: the same with one κ per parameter tensor (three scalars per tensor in the
  all-reduce): it removes the block-diagonal part of H·eₜ along each tensor's eₜ, at least as much
  as one κ in expectation, with noisier κs. (Its κ median is the median over tensors; its "κ < 0"
  the mean fraction of tensors clamped.)
* ``secant:row``: one κ per row of each matrix (an output unit; a token's embedding), per tensor
  for vectors. A row seldom straddles two ranks' shards, so its κ is mostly local: only the
  corrected gradient's norm rides in the existing all-reduce. With κ unclamped, each κ swaps ḡ₁'s
  component along that row's eₜ for ḡ₂'s; the more κs, the more of H·eₜ removed and the more
  noise (all κs per coordinate would be ``weighted:0``).
* ``secant:ema<b>`` and ``secant:tensor-ema<b>``: κ = max(0, s₁/s₂) from running averages
  s₁ ← b·s₁ + (1 − b)·eₜᵀ(ḡ₁ − ḡ₂), s₂ ← b·s₂ + (1 − b)·|eₜ|² (per tensor for ``tensor-``): the
  same scalars, averaged over updates, for a less noisy κ (two scalars per κ kept in the state).
* ``shift:<s>``: the commit and the estimate both carry s·eₜ: θₜ₊₁ = AdamW(θₜ, ḡ) + s·eₜ and
  θ̃ₜ₊₁ = AdamW(θₜ, ḡ₁) + s·eₜ. At s = ½ the commit steps from the midpoint θₜ + eₜ/2, where the mean of
  the two halves' gradients is, to first order, the gradient (no H·eₜ bias), at the price of
  moving θ by eₜ/2.
* ``--beta1 β``, ``--beta2 β``: AdamW's β₁ and β₂ for every rule (the error's momentum part scales with
  1 − β₁); part of a run's key, and the report labels rules with them where they are not (0.9, 0.95).

``--curvature-every N`` measures, every N updates, the loss's curvature along the estimate's error
e = θ̃ₜ − θₜ against the same e with random signs (eᵀHe / eᵀe, by a difference of gradients on the
same sequences); the run itself is unchanged.

Usage::

    .venv/bin/python -m benchmarks.estimate_study --model small --lrs 1e-3 --seeds 1,2 \\
        --rules sync,acco,flip,oracle,carry:0.9 --curvature-every 25 --json benchmarks/results/estimate_study_small.json
    # issue 22 part 2 (benchmarks/results/commit_rules_findings.md), one line at a time:
    .venv/bin/python -m benchmarks.estimate_study --model small --lrs 1e-3 --seeds 1 \\
        --rules secant,weighted:0.25,damp:0.5,secant:tensor,shift:0.5,secant:tensor-ema0.9,secant:row \\
        --lock /tmp/acco-quiet.lock --json benchmarks/results/estimate_study_small.json
    .venv/bin/python -m benchmarks.estimate_study --model small --lrs 1e-3 --seeds 1 --beta1 0.95 \\
        --rules sync,acco --lock /tmp/acco-quiet.lock --json benchmarks/results/estimate_study_small.json
    .venv/bin/python -m benchmarks.estimate_study --model small --lrs 1e-3 --seeds 2 \\
        --rules secant:tensor,secant:row --lock /tmp/acco-quiet.lock --json benchmarks/results/estimate_study_small.json
    # next, not yet run:
    .venv/bin/python -m benchmarks.estimate_study --model small --lrs 1e-3 --seeds 3 \\
        --rules sync,acco,secant:row --lock /tmp/acco-quiet.lock --json benchmarks/results/estimate_study_small.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.convergence import cosine, lr_at
from benchmarks.gpt import Batches, build_model, load_corpus, model_config

Params = list[torch.Tensor]


def _flat(ts: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts]).double()


def _random_signs(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.where(torch.rand(like.shape, generator=generator) < 0.5, -1.0, 1.0)


class Simulation:
    """θ (committed) with its AdamW state, the model as the place where gradients are computed."""

    def __init__(self, args: argparse.Namespace, seed: int, corpus: Any) -> None:
        self.args, self.corpus, self.seed = args, corpus, seed
        self.config = model_config(args.model)
        self.model = build_model(self.config, seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.theta = [p.detach().clone() for p in self.params]
        groups = [
            {"params": [t for t, p in zip(self.theta, self.params) if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [t for t, p in zip(self.theta, self.params) if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(getattr(args, "beta1", 0.9), getattr(args, "beta2", 0.95)), foreach=True)
        half = args.batch_size // 2
        self.streams = [Batches(corpus.train, self.config.block_size, half, seed, r) for r in range(args.world)]
        # Extra sequences for the ``bound`` oracle, from streams that the training never draws from.
        self.extra = [Batches(corpus.train, self.config.block_size, half, seed + 7919, r) for r in range(args.world)]

    # -- gradients ------------------------------------------------------------------------------
    def next_half(self, extra: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [s.next() for s in (self.extra if extra else self.streams)]
        return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])

    def gradient(self, point: Params, batch: tuple[torch.Tensor, torch.Tensor]) -> Params:
        """Mean gradient over the half batch (equal ranks: the mean of the ranks' means)."""
        with torch.no_grad():
            for p, v in zip(self.params, point):
                p.copy_(v)
        for p in self.params:
            p.grad = None
        self.model(*batch).backward()
        return [p.grad.detach().clone() for p in self.params]

    # -- optimizer rounds ---------------------------------------------------------------------------
    def _step(self, grads: Params, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for t, g in zip(self.theta, grads):
            t.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(self.theta, self.args.max_grad_norm, foreach=True)
        self.optimizer.step()

    def tentative(self, grads: Params, lr: float) -> Params:
        """AdamW(θ, grads) without committing θ or the state (the estimate round)."""
        saved = [t.clone() for t in self.theta]
        state = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in self.optimizer.state.items()}
        self._step(grads, lr)
        result = [t.detach().clone() for t in self.theta]
        with torch.no_grad():
            for t, v in zip(self.theta, saved):
                t.copy_(v)
        self.optimizer.state.clear()
        self.optimizer.state.update(state)
        return result

    def commit(self, grads: Params, lr: float) -> None:
        self._step(grads, lr)

    # -- validation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, batches: int) -> float:
        for p, v in zip(self.params, self.theta):
            p.copy_(v)
        self.model.eval()
        losses = []
        for r in range(self.args.world):
            val_seed = self.seed if self.args.val_seed is None else self.args.val_seed
            stream = Batches(self.corpus.val, self.config.block_size, 16, val_seed + 500, r)
            losses.append(sum(self.model(*stream.next()).item() for _ in range(batches)) / batches)
        self.model.train()
        return statistics.fmean(losses)


def curvature_of_the_error(sim: Simulation, estimate: Params, batch: Any, signs: torch.Generator) -> dict[str, float]:
    """The loss's curvature along the estimate's error e = θ̃ₜ − θₜ, against a direction of the same
    size per element with random signs: eᵀHe / eᵀe by a finite difference of gradients on the same
    sequences (H·e ≈ g(θₜ + e) − g(θₜ); e is a fraction of one update). Three backward passes."""
    error = [e - th for e, th in zip(estimate, sim.theta)]
    flipped = [_random_signs(e, signs) * e for e in error]
    base = _flat(sim.gradient(sim.theta, batch))
    size = _flat(error).pow(2).sum()
    out = {}
    for name, direction in (("error", error), ("random_signs", flipped)):
        moved = _flat(sim.gradient([th + d for th, d in zip(sim.theta, direction)], batch))
        out[name] = ((moved - base) @ _flat(direction) / size).item()
    out["ratio"] = out["error"] / out["random_signs"] if out["random_signs"] > 0 else math.inf
    return out


def run(rule: str, args: argparse.Namespace, seed: int, corpus: Any) -> dict[str, Any]:
    sim = Simulation(args, seed, corpus)
    budget_calls = 2 * args.updates
    generator = torch.Generator().manual_seed(seed + 77)
    kind, _, value = rule.partition(":")
    carry = float(value) if kind in ("carry", "shift") else 0.0
    weight = float(value) if kind == "weighted" else 0.5  # the commit's weight on the first half
    damp = float(value) if kind == "damp" else 1.0
    kappas, kappa_shares, clamped = [], [], 0
    ema_beta = float(value.partition("ema")[2]) if kind == "secant" and "ema" in value else 0.0
    ema_sums: Optional[list[list[torch.Tensor]]] = None  # secant:…ema: running eᵀ(ḡ₁ − ḡ₂) and |e|² (per tensor)
    lagged_kappa = 0.0  # secant:both: the last commit's κ, for the next estimate (known before it steps)
    gate_beta = float(value[4:]) if kind == "secant" and value.startswith("gate") else None
    kappa_moments: Optional[tuple[float, float]] = None  # secant:gate: running mean of κ and of κ²
    gates: list[float] = []
    estimate = [t.clone() for t in sim.theta]  # θ̃₀ = θ₀
    signs = torch.Generator().manual_seed(seed + 78)  # the curvature probe's own, so as not to change a run
    curve, ratios, cosines, curvatures = [], [], [], []
    previous_error: Optional[torch.Tensor] = None
    start = time.perf_counter()
    for t in range(args.updates):
        lr_estimate = lr_at((2 * t) / budget_calls, args.lr, args.warmup_fraction)
        lr_commit = lr_at((2 * t + 1) / budget_calls, args.lr, args.warmup_fraction)
        first = sim.next_half()
        if kind == "sync":
            point = sim.theta
        elif kind == "flip":
            point = [th + _random_signs(th, generator) * (e - th) for th, e in zip(sim.theta, estimate)]
        else:
            point = estimate
        if kind != "sync" and args.curvature_every and t % args.curvature_every == 0 and t > 0:
            curvatures.append(curvature_of_the_error(sim, estimate, first, signs))
        g1 = sim.gradient(point, first)
        if kind != "sync":
            g_for_estimate = sim.gradient(sim.theta, first) if kind == "oracle" else g1
            if kind == "bound":
                draws = [sim.gradient(sim.theta, sim.next_half(extra=True)) for _ in range(int(value))]
                expected = [torch.stack(parts).mean(0) for parts in zip(*draws)]
                g_for_estimate = [(a + b) / 2 for a, b in zip(g1, expected)]
            offset = [e - th for e, th in zip(estimate, sim.theta)]  # θ̃ₜ − θₜ
            if (rule == "secant:both" or gate_beta is not None) and lagged_kappa > 0:  # the estimate's ḡ₁ corrected too, by the last κ
                g_for_estimate = [a - lagged_kappa * o for a, o in zip(g_for_estimate, offset)]
            new_estimate = sim.tentative(g_for_estimate, lr_estimate)
            if damp != 1.0:
                new_estimate = [th + damp * (n - th) for th, n in zip(sim.theta, new_estimate)]
            if carry:
                new_estimate = [n + carry * o for n, o in zip(new_estimate, offset)]
        g2 = sim.gradient(sim.theta, sim.next_half())
        before = _flat(sim.theta)
        if kind == "secant" and (value in ("", "both") or gate_beta is not None):
            # κ = eᵀ(ḡ₁ − ḡ₂) / |e|², the curvature along e (three scalars in the norm's all-reduce)
            flat_e, flat_g1 = _flat(offset), _flat(g1)
            size = flat_e.pow(2).sum()
            kappa = ((flat_e @ (flat_g1 - _flat(g2))) / size).item() if size > 0 else 0.0
            if size > 0:
                kappas.append(kappa)
                clamped += kappa < 0
                if gate_beta is not None:  # shrink κ by its signal-to-noise over updates (m² / v)
                    m, v = kappa_moments if kappa_moments is not None else (kappa, kappa * kappa)
                    m, v = gate_beta * m + (1 - gate_beta) * kappa, gate_beta * v + (1 - gate_beta) * kappa * kappa
                    kappa_moments = (m, v)
                    gates.append(min(1.0, m * m / v) if m > 0 and v > 0 else 0.0)
                    kappa *= gates[-1]
                kappa = max(kappa, 0.0)
                lagged_kappa = kappa
                kappa_shares.append(kappa * size.sqrt().item() / flat_g1.norm().item())
            g1 = [a - kappa * o for a, o in zip(g1, offset)]
        elif kind == "secant" and "ema" in value:  # secant:ema<b> / secant:tensor-ema<b>: κ from running sums
            per_tensor = value.startswith("tensor")
            nums = [(o.double() * (a - b).double()).sum() for o, a, b in zip(offset, g1, g2)]
            dens = [o.double().pow(2).sum() for o in offset]
            if not per_tensor:
                nums, dens = [sum(nums)], [sum(dens)]
            if sum(dens) > 0:
                if ema_sums is None:
                    ema_sums = [[n, d] for n, d in zip(nums, dens)]
                else:
                    for pair, n, d in zip(ema_sums, nums, dens):
                        pair[0] = ema_beta * pair[0] + (1 - ema_beta) * n
                        pair[1] = ema_beta * pair[1] + (1 - ema_beta) * d
                ks = [(n / d).item() if d > 0 else 0.0 for n, d in ema_sums]
                kappas.append(statistics.median(ks))
                clamped += sum(k < 0 for k in ks) / len(ks)
                ks = ks * len(offset) if not per_tensor else ks
                correction = [max(k, 0.0) * o for k, o in zip(ks, offset)]
                kappa_shares.append((_flat(correction).norm() / _flat(g1).norm()).item())
                g1 = [a - c for a, c in zip(g1, correction)]
        elif kind == "secant" and value == "row":  # one κ per row of each matrix, per tensor for vectors
            correction, ks = [], []
            for o, a, b in zip(offset, g1, g2):
                rows_e = o.double().reshape(o.shape[0], -1) if o.dim() >= 2 else o.double().reshape(1, -1)
                rows_d = (a - b).double().reshape(rows_e.shape)
                den = rows_e.pow(2).sum(1)
                k = torch.where(den > 0, (rows_e * rows_d).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
                ks.append(k)
                correction.append((k.clamp_min(0).unsqueeze(1) * rows_e).reshape(o.shape).to(o.dtype))
            if sum(o.double().pow(2).sum() for o in offset) > 0:
                ks = torch.cat(ks)
                kappas.append(ks.median().item())
                clamped += (ks < 0).double().mean().item()
                kappa_shares.append((_flat(correction).norm() / _flat(g1).norm()).item())
                g1 = [a - c for a, c in zip(g1, correction)]
        elif kind == "secant":  # secant:tensor: one κ per parameter tensor (three scalars per tensor)
            sizes = [o.double().pow(2).sum() for o in offset]
            if sum(sizes) > 0:
                ks = [((o.double() * (a - b).double()).sum() / n).item() if n > 0 else 0.0 for o, a, b, n in zip(offset, g1, g2, sizes)]
                kappas.append(statistics.median(ks))
                clamped += sum(k < 0 for k in ks) / len(ks)
                correction = [max(k, 0.0) * o for k, o in zip(ks, offset)]
                kappa_shares.append((_flat(correction).norm() / _flat(g1).norm()).item())
                g1 = [a - c for a, c in zip(g1, correction)]
        sim.commit([(a + b) / 2 if weight == 0.5 else weight * a + (1 - weight) * b for a, b in zip(g1, g2)], lr_commit)
        if kind == "shift":
            with torch.no_grad():
                for th, o in zip(sim.theta, offset):
                    th.add_(o, alpha=carry)
        if kind != "sync":
            error = _flat(new_estimate) - _flat(sim.theta)
            step = (_flat(sim.theta) - before).norm()
            if step > 0:
                ratios.append((error.norm() / step).item())
            if (c := cosine(error, previous_error)) is not None:
                cosines.append(c)
            previous_error, estimate = error, new_estimate
        if (t + 1) % args.eval_every == 0 or t + 1 == args.updates:
            last = t + 1 == args.updates
            curve.append({"updates": t + 1, "val_loss": sim.validation_loss(args.eval_batches * (4 if last else 1))})
            print(f"[{rule} lr {args.lr:g} seed {seed}] update {t + 1}: val {curve[-1]['val_loss']:.4f}", file=sys.stderr, flush=True)
    return {"rule": rule, "lr": args.lr, "seed": seed, "batch_size": args.batch_size, "final_val_loss": curve[-1]["val_loss"], "curve": curve,
            "estimate_error_median": statistics.median(ratios) if ratios else None,
            "error_cosine_median": statistics.median(cosines) if cosines else None,
            "curvature": curvatures,
            "curvature_ratio_median": statistics.median(c["ratio"] for c in curvatures) if curvatures else None,
            **({"kappa_median": statistics.median(kappas), "kappa_negative_fraction": clamped / len(kappas),
                "kappa_correction_share_median": statistics.median(kappa_shares),
                "kappa_series": [round(k, 5) for k in kappas]} if kappas else {}),
            **({"gate_median": statistics.median(gates), "gate_series": [round(g, 4) for g in gates]} if gates else {}),
            "wall_s": time.perf_counter() - start}


def betas(run: dict[str, Any]) -> tuple[float, float]:
    """A run's AdamW (β₁, β₂); runs before ``--beta1`` and ``--beta2`` existed have (0.9, 0.95)."""
    return run.get("beta1", 0.9), run.get("beta2", 0.95)


def label(run: dict[str, Any]) -> str:
    """A run's rule, with AdamW's β₁ and β₂ where they are not (0.9, 0.95)."""
    beta1, beta2 = betas(run)
    return run["rule"] + (f" β₁={beta1:g}" if beta1 != 0.9 else "") + (f" β₂={beta2:g}" if beta2 != 0.95 else "")


def per_seed(runs: list[dict[str, Any]]) -> list[str]:
    """Every rule's paired gap to sync (β = 0.9, 0.95) per seed, and, for other β, to sync at those β."""
    lines = ["| rule | peak lr | " + " | ".join(f"seed {s}" for s in sorted({r["seed"] for r in runs})) + " | mean |",
             "|---|---|" + "---|" * (len({r["seed"] for r in runs}) + 1)]
    seeds = sorted({r["seed"] for r in runs})
    for lr in sorted({r["lr"] for r in runs}):
        base = {(r["seed"], betas(r)): r["final_val_loss"] for r in runs if r["lr"] == lr and r["rule"] == "sync"}
        for name in dict.fromkeys(label(r) for r in runs if r["lr"] == lr):
            mine = {r["seed"]: r for r in runs if r["lr"] == lr and label(r) == name}
            cells, gaps = [], []
            for seed in seeds:
                r = mine.get(seed)
                if r is None:
                    cells.append("–")
                    continue
                own = base.get((seed, betas(r)))
                extra = f"{100 * (r['final_val_loss'] / own - 1):+.2f}% to its β's sync" if betas(r) != (0.9, 0.95) and own else ""
                if (seed, (0.9, 0.95)) not in base:
                    cells.append(f"{r['final_val_loss']:.4f}" + (f" ({extra})" if extra else ""))
                    continue
                gap = 100 * (r["final_val_loss"] / base[(seed, (0.9, 0.95))] - 1)
                gaps.append(gap)
                cells.append(f"{r['final_val_loss']:.4f} ({gap:+.2f}%" + (f"; {extra}" if extra else "") + ")")
            lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + f" | {statistics.fmean(gaps):+.2f}% |" if gaps else
                         f"| {name} | {lr:g} | " + " | ".join(cells) + " | – |")
    return lines


def report(runs: list[dict[str, Any]]) -> str:
    lrs = sorted({r["lr"] for r in runs})
    rules = list(dict.fromkeys(label(r) for r in runs))
    lines = ["| peak lr | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for lr in lrs:
        cells = []
        base = [r for r in runs if r["lr"] == lr and label(r) == "sync"]
        base_by_seed = {r["seed"]: r["final_val_loss"] for r in base}
        for rule in rules:
            mine = [r for r in runs if r["lr"] == lr and label(r) == rule]
            if not mine:
                cells.append("–")
                continue
            mean = statistics.fmean(r["final_val_loss"] for r in mine)
            gaps = [100 * (r["final_val_loss"] / base_by_seed[r["seed"]] - 1) for r in mine if r["seed"] in base_by_seed]
            gap = f" ({statistics.fmean(gaps):+.2f}%, {min(gaps):+.2f} to {max(gaps):+.2f})" if gaps and rule != "sync" else ""
            cells.append(f"{mean:.3f}{gap}")
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    lines += ["", "Final validation loss, mean over seeds (in brackets: the paired gap to sync, mean and min to max over seeds).",
              "", "| rule | peak lr | seeds | ‖θ̃ − θ‖ / ‖θ − θ_prev‖ | cos(eₜ, eₜ₋₁) | curvature along e / along e with random signs |",
              "|---|---|---|---|---|---|"]
    for lr in lrs:
        for rule in rules:
            mine = [r for r in runs if r["lr"] == lr and label(r) == rule and r.get("estimate_error_median") is not None]
            if not mine:
                continue
            curved = [r["curvature_ratio_median"] for r in mine if r.get("curvature_ratio_median") is not None]
            lines.append(f"| {rule} | {lr:g} | {len(mine)} | {statistics.median(r['estimate_error_median'] for r in mine):.3f} | "
                         f"{statistics.median(r['error_cosine_median'] for r in mine):+.3f} | "
                         + (f"{statistics.median(curved):.0f} ({len(curved)} of {len(mine)} runs)" if curved else "–") + " |")
    lines += ["", "Medians over each run's updates, then over seeds; the curvature ratio is measured every --curvature-every updates."]
    secant = [r for r in runs if "kappa_median" in r]
    if secant:
        lines += ["", "| rule | peak lr | seed | κ median | κ < 0 (clamped to 0) | \\|κe\\| / \\|ḡ₁\\| median |", "|---|---|---|---|---|---|"]
        lines += [f"| {label(r)} | {r['lr']:g} | {r['seed']} | {r['kappa_median']:.3g} | {100 * r['kappa_negative_fraction']:.0f}% | "
                  f"{r['kappa_correction_share_median']:.3f} |" for r in secant]
    lines += ["", "Per seed: final validation loss (paired gap to sync at AdamW's (0.9, 0.95) of the same seed; for other β, also to sync at those β).", "", *per_seed(runs)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--world", type=int, default=2, help="simulated ranks (their data streams)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per update (half per call)")
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--rules", default="sync,acco,flip,oracle")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW's β₁; part of a run's key in the runs file")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW's β₂; part of a run's key in the runs file")
    p.add_argument("--lock", default=None, help="wait before each run while this file exists (another job's throughput measurement)")
    p.add_argument("--warmup-fraction", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--curvature-every", type=int, default=0,
                   help="every N updates, measure the curvature along the estimate's error against random signs (3 backward passes)")
    p.add_argument("--val-seed", type=int, default=None,
                   help="seed of the fixed validation windows (default: the run's seed; benchmarks.lr_sweep uses 0)")
    p.add_argument("--report-only", action="store_true", help="write the report from <json stem>.runs.jsonl; train nothing")
    p.add_argument("--data", default=None)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--data-skip", type=int, default=0, help="start the corpus this many bytes in (another slice of it)")
    p.add_argument("--json", default="benchmarks/results/estimate_study.json")
    args = p.parse_args(argv)
    for rule in args.rules.split(","):
        kind, _, value = rule.partition(":")
        needs_value = {"sync": False, "acco": False, "flip": False, "oracle": False, "secant": None,
                       "carry": True, "shift": True, "weighted": True, "damp": True, "bound": True}
        if kind not in needs_value or needs_value[kind] not in (None, bool(value)) or (kind == "secant" and value not in ("", "tensor", "row", "both") and not re.fullmatch(r"(tensor-)?ema0?\.\d+|gate0?\.\d+", value)):
            p.error(f"unknown rule {rule!r}")
    corpus = load_corpus(args.data, args.max_bytes, args.data_skip)
    runs_path = Path(args.json).with_suffix(".runs.jsonl")
    runs = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.exists() else []
    for lr in [] if args.report_only else [float(x) for x in args.lrs.split(",")]:
        for seed in [int(x) for x in args.seeds.split(",")]:
            for rule in args.rules.split(","):
                if any(r["rule"] == rule and r["lr"] == lr and r["seed"] == seed and r["model"] == args.model
                       and r.get("batch_size", 16) == args.batch_size  # runs before issue 22: 16
                       and betas(r) == (args.beta1, args.beta2) and r.get("data_skip", 0) == args.data_skip for r in runs):
                    continue
                while args.lock and Path(args.lock).exists():
                    time.sleep(30)
                args.lr = lr
                out = run(rule, args, seed, corpus) | {"model": args.model, "updates": args.updates, "beta1": args.beta1,
                                                        "beta2": args.beta2, "data_skip": args.data_skip}
                runs.append(out)
                with runs_path.open("a") as f:
                    f.write(json.dumps(out) + "\n")
    mine = [r for r in runs if r["model"] == args.model and r.get("batch_size", 16) == args.batch_size
            and r.get("data_skip", 0) == args.data_skip]
    text = report(mine)
    Path(args.json).write_text(json.dumps({"argv": sys.argv, "runs": mine}, indent=1))
    Path(args.json).with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
