"""Independent single-process reference of docs/design.md §1: N simulated workers, the plain inner
optimizer on full tensors, estimate rounds done on a deep copy of (model, optimizer).

It shares no code with the package: it recomputes every gradient at the parameters each worker
held, and applies the round equations directly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

import workloads


@dataclass(frozen=True)
class Contribution:
    """One step() call's micro-batch: whose, which call, and at which round's output it was computed
    (-1: the initial parameters)."""

    rank: int
    call: int
    at_round: int


def blocking_plan(mode: str, world_size: int, num_calls: int, finish: bool = True) -> list[list[Contribution]]:
    """The rounds of the blocking schedule of issue #2, written from its text."""
    lag = 1 if mode == "sync" else 2  # sync: params of the previous round; acco/dpu: two rounds ago
    rounds = [[Contribution(r, c, c - lag if c >= lag else -1) for r in range(world_size)] for c in range(num_calls)]
    if finish and mode == "acco" and num_calls % 2 == 1:
        rounds.append([])  # the commit that finish() runs for the last estimate
    return rounds


@dataclass
class ReferenceResult:
    final: list[torch.Tensor]  # committed parameters after the last round
    outputs: list[list[torch.Tensor]]  # parameters each round produced
    num_updates: int
    optimizer_state: dict = None  # the plain optimizer's state_dict() after the last round
    num_skipped_updates: int = 0  # commit rounds whose averaged gradient was not finite (poisoned)
    # Per commit round that averaged two halves (round index → (tr(Σ), |G|²)), from McCandlish et al.
    # 2018 App. A written for two independent averages ḡ₁ (n₁ micro-batches) and ḡ₂ (n₂), n = n₁ + n₂:
    # tr(Σ) = |ḡ₁ − ḡ₂|²·n₁n₂/n and |G|² = |ḡ|² − tr(Σ)/n, in float64.
    noise_scales: dict = None


def simulate(
    mode: str,
    rounds: Sequence[Sequence[Contribution]],
    model_kind: str,
    optimizer_spec: str,
    dtype: torch.dtype = torch.float64,
    max_grad_norm: Optional[float] = None,
    lr_at_round: Optional[Callable[[int], float]] = None,
    estimate_kind: str = "plain",
    poisoned: Sequence[tuple[int, int]] = (),
    correction: str = "none",
) -> ReferenceResult:
    """``poisoned``: (rank, call) pairs whose gradient gets a NaN in element [0, 0] of the first
    parameter. A round whose averaged gradient is not finite is skipped, as ``nonfinite='skip'``
    promises: it changes nothing (its output is the committed parameters), and an estimate's
    poisoned sum is still carried into its commit, which is skipped too.

    ``correction="secant"``, written from its definition (issue 22): e = (the parameters the first half
    was computed at) − θ, the committed parameters. A commit with two halves and e ≠ 0 measures
    κ = max(0, eᵀ(ḡ₁ − ḡ₂)/|e|²) and steps on (n₁·(ḡ₁ − κe) + n₂·ḡ₂)/n; an estimate steps on ḡ₁ − κ·e with
    the last kept commit's κ (0 before any; ``finish()`` starts afresh, but the plans here end with it).
    ``correction="secant-gated"``: each measured κ is first shrunk by min(1, m²/v), m and v the running
    averages (factor 0.9) of the measured, unclamped κ and of κ², this one included (the first starts them
    at κ and κ²), and by 0 where m ≤ 0."""
    model = workloads.make_model(model_kind, dtype)
    optimizer = workloads.make_optimizer(optimizer_spec, model)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    initial = [p.detach().clone() for p in model.parameters()]
    probe = workloads.make_model(model_kind, dtype)
    outputs: list[list[torch.Tensor]] = []
    carried: Optional[tuple[list[torch.Tensor], int]] = None
    carried_error: Optional[list[torch.Tensor]] = None  # e of the carried first half
    kappa = 0.0
    moments: Optional[tuple[float, float]] = None  # secant-gated: running mean of κ and of κ² (kept updates)
    new_moments: Optional[tuple[float, float]] = None
    updates = skipped = 0
    noise_scales, skipped_rounds = {}, set()
    for k, contributions in enumerate(rounds):
        estimate = mode == "acco" and k % 2 == 0
        grad_sum = [torch.zeros_like(p) for p in model.parameters()]
        for c in contributions:
            at = initial if c.at_round < 0 else outputs[c.at_round]
            grads = _gradient(probe, at, c.rank, c.call, dtype)
            if (c.rank, c.call) in poisoned:
                grads[0][0, 0] = float("nan")
            for total, g in zip(grad_sum, grads):
                total += g
        count = len(contributions)
        point = None if not contributions else (initial if contributions[0].at_round < 0 else outputs[contributions[0].at_round])
        error = None if point is None else [a - p.detach() for a, p in zip(point, model.parameters())]
        correction_shift, new_kappa = None, None
        if correction in ("secant", "secant-gated") and not estimate and carried is not None and carried[1] > 0 and count > 0 and carried_error is not None:
            n1, n2 = carried[1], count
            flat_error = torch.cat([x.reshape(-1) for x in carried_error]).double()
            size = float(flat_error.square().sum())
            if size > 0:
                first = torch.cat([g.reshape(-1) for g in carried[0]]).double() / n1
                second = torch.cat([g.reshape(-1) for g in grad_sum]).double() / n2
                raw = float(flat_error @ (first - second)) / size
                new_kappa = max(0.0, raw)
                if correction == "secant-gated":
                    m, v = (raw, raw * raw) if moments is None else (0.9 * moments[0] + 0.1 * raw, 0.9 * moments[1] + 0.1 * raw * raw)
                    new_moments = (m, v)
                    new_kappa *= min(1.0, m * m / v) if m > 0 and v > 0 else 0.0
                correction_shift = [new_kappa * n1 * x for x in carried_error]  # taken off the summed gradients
        if not estimate and carried is not None:
            n1, n2 = carried[1], count
            if n1 > 0 and n2 > 0:
                first = torch.cat([g.reshape(-1) for g in carried[0]]).double() / n1
                second = torch.cat([g.reshape(-1) for g in grad_sum]).double() / n2
                trace = float((first - second).square().sum()) * n1 * n2 / (n1 + n2)
                pooled = float(((n1 * first + n2 * second) / (n1 + n2)).square().sum())
                noise_scales[k] = (trace, pooled - trace / (n1 + n2))
            grad_sum = [a + b for a, b in zip(grad_sum, carried[0])]
            count += carried[1]
            carried = None
        if estimate:
            carried = ([g.clone() for g in grad_sum], count)
            carried_error = error
            if correction in ("secant", "secant-gated") and error is not None and kappa != 0.0:
                grad_sum = [g - kappa * count * x for g, x in zip(grad_sum, error)]
        elif correction_shift is not None:
            grad_sum = [g - x for g, x in zip(grad_sum, correction_shift)]
        if count == 0 or not all(bool(torch.isfinite(g).all()) for g in grad_sum):
            skipped += count > 0 and not estimate
            skipped_rounds.add(k)
            outputs.append([p.detach().clone() for p in model.parameters()])
            continue
        target_model, target_opt = fork(model, optimizer) if estimate else (model, optimizer)
        if lr_at_round is not None:
            for g, base in zip(target_opt.param_groups, base_lrs):
                g["lr"] = base * lr_at_round(k)
        for p, g in zip(target_model.parameters(), grad_sum):
            p.grad = g / count
        if estimate_round_blends(mode, k, estimate_kind):
            _blend_with_first_moment(target_model, target_opt)
        if max_grad_norm is not None:
            nn.utils.clip_grad_norm_(list(target_model.parameters()), max_grad_norm)
        target_opt.step()
        outputs.append([p.detach().clone() for p in target_model.parameters()])
        if not estimate:
            updates += 1
            if new_kappa is not None:
                kappa = new_kappa
                moments = new_moments if new_moments is not None else moments
        new_moments = None
    final = [p.detach().clone() for p in model.parameters()]
    for k in [k for k in noise_scales if k in skipped_rounds]:
        del noise_scales[k]  # a skipped update measures nothing
    return ReferenceResult(final, outputs, updates, optimizer.state_dict(), skipped, noise_scales)


def estimate_round_blends(mode: str, round_index: int, estimate: str) -> bool:
    return mode == "acco" and round_index % 2 == 0 and estimate == "momentum"


def _blend_with_first_moment(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """estimate='momentum', written from its definition: the estimate steps on (ḡ₁ + m̂) / 2, m̂ = exp_avg / (1 − β₁^step)."""
    for group in optimizer.param_groups:
        beta1 = group["betas"][0]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            p.grad = 0.5 * p.grad + 0.5 * state["exp_avg"] / (1.0 - beta1 ** float(state["step"]))


def fork(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
    """An independent copy of (model, optimizer), deep-copied together so that the copy's optimizer
    holds the copy's parameters. Not through ``load_state_dict``: it casts floating-point state to
    the parameters' dtype (NAdam's float32 ``mu_product`` became float64), so the estimate would not
    be the step the optimizer itself takes."""
    return copy.deepcopy((model, optimizer))


def _gradient(probe: nn.Module, params: Sequence[torch.Tensor], rank: int, call: int, dtype) -> list[torch.Tensor]:
    with torch.no_grad():
        for p, value in zip(probe.parameters(), params):
            p.copy_(value)
    probe.zero_grad(set_to_none=True)
    x, y = workloads.batch(rank, call, dtype)
    workloads.loss_fn(probe, x, y).backward()
    return [p.grad.detach().clone() for p in probe.parameters()]
