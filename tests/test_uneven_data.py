"""Ranks that call ``step()`` a different number of times (a data loader that shards unevenly without
``drop_last``) finish together in blocking mode too (issue 23, item 3): a rank that reaches ``finish()``
early joins its peers' rounds with no gradients until every rank is finishing, as DDP needs ``Join`` for.

Mode ``sync`` is held to DDP + AdamW under ``torch.distributed.algorithms.Join`` (dividing by the
ranks that still contribute, as acco averages over the micro-batches it was given); modes ``acco`` and
``dpu`` to the single-process reference of the rounds. The optimizer's collective timeout is short,
so that a rank left waiting fails the test quickly instead of hanging it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.distributed.algorithms import Join
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer
from reference import Contribution, blocking_plan, simulate

TIMEOUT = 90
ROUND_TIMEOUT_S = 20


def adamw(params):
    return torch.optim.AdamW(params, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)


def uneven_sync_against_join(rank, world_size, calls, dtype, overflow_at):
    """``overflow_at``: (rank, call) whose gradient gets an Inf under a GradScaler (None: no scaler)."""
    reference = workloads.make_model(dtype=dtype)
    ddp = DistributedDataParallel(reference)
    ref_opt = adamw(reference.parameters())
    model = workloads.make_model(dtype=dtype)
    opt = AccoOptimizer(adamw(model.parameters()), mode="sync", timeout=ROUND_TIMEOUT_S)
    scaled = overflow_at is not None
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)] if scaled else [None, None]

    def one_call(call, module, params, optimizer, scaler):
        x, y = workloads.batch(rank, call, dtype)
        loss = workloads.loss_fn(module, x, y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler and overflow_at == (rank, call):
            with torch.no_grad():
                next(params).grad[0, 0] = float("inf")
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()

    with Join([ddp], divide_by_initial_world_size=False):
        for call in range(calls[rank]):
            one_call(call, ddp, reference.parameters(), ref_opt, scalers[0])
    for call in range(calls[rank]):
        one_call(call, model, model.parameters(), opt, scalers[1])
    opt.finish()
    finished_rounds = opt.rounds_launched
    opt.finish()  # nothing new anywhere: changes nothing
    result = {
        "difference": max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters())),
        "updates": opt.num_updates,
        "rounds": (finished_rounds, opt.rounds_launched),
    }
    opt.close()
    return result


@pytest.mark.parametrize("calls", [[3, 5], [5, 3], [0, 2]], ids=["short-first", "short-second", "one-rank-has-none"])
def test_uneven_step_counts_in_sync_mode_match_ddp_under_join(run_distributed, calls):
    results = run_distributed(2, uneven_sync_against_join, calls, torch.float64, None, timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert result["difference"] <= 1e-12, f"rank {rank}: {result}"
        assert result["updates"] == max(calls)
        assert result["rounds"] == (max(calls), max(calls))


def test_uneven_step_counts_with_a_grad_scaler_overflow_during_the_others_finish(run_distributed):
    """Rank 1 overflows at a call made while rank 0 is already in finish(): rank 0 joins the overflow
    check, and both skip it, as DDP + GradScaler under Join does."""
    results = run_distributed(2, uneven_sync_against_join, [2, 5], torch.float32, (1, 3), timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert result["difference"] <= 1e-6, f"rank {rank}: {result}"
        assert result["updates"] == 4


def uneven_rounds(rank, world_size, mode, calls, join=False):
    """``join``: the script written for DDP, ``with Join([opt])``, then ``finish()``."""
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, timeout=ROUND_TIMEOUT_S)
    with Join([opt]) if join else contextlib.nullcontext():
        for call in range(calls[rank]):
            workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
            opt.step()
            opt.zero_grad()
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    summary = {"final": final, "updates": opt.num_updates, "rounds": opt.rounds_launched, "in_flight": opt.round_in_flight}
    opt.close()
    return summary


@pytest.mark.parametrize("calls", [[3, 5], [4, 1, 6]], ids=["world2", "world3"])
@pytest.mark.parametrize("mode", ["acco", "dpu"])
def test_uneven_step_counts_follow_the_reference(run_distributed, mode, calls):
    results = run_distributed(len(calls), uneven_rounds, mode, calls, timeout=TIMEOUT)
    plan = blocking_plan(mode, len(calls), max(calls))
    plan = [[c for c in round_ if c.call < calls[c.rank]] for round_ in plan]  # a rank past its data gives nothing
    reference = simulate(mode, plan, "mlp", "adamw")
    for rank, r in enumerate(results):
        assert not r["in_flight"] and r["rounds"] == len(plan)
        assert r["updates"] == reference.num_updates
        for got, want in zip(r["final"], reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"rank {rank}: {m}")


def test_the_reference_plan_is_what_the_rounds_ran():
    """The plan used above, spelled out for one case: acco, calls [3, 5]."""
    plan = [[c for c in round_ if c.call < [3, 5][c.rank]] for round_ in blocking_plan("acco", 2, 5)]
    assert plan[3] == [Contribution(1, 3, 1)] and plan[4] == [Contribution(1, 4, 2)] and plan[5] == []


@pytest.mark.parametrize("mode", ["sync", "acco"])
def test_torch_join_context_works_like_finish(run_distributed, mode):
    calls = [2, 5]
    results = run_distributed(2, uneven_rounds, mode, calls, True, timeout=TIMEOUT)
    plan = [[c for c in round_ if c.call < calls[c.rank]] for round_ in blocking_plan(mode, 2, max(calls))]
    reference = simulate(mode, plan, "mlp", "adamw")
    for rank, r in enumerate(results):
        assert r["rounds"] == len(plan) and r["updates"] == reference.num_updates
        for got, want in zip(r["final"], reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"rank {rank}: {m}")


def test_join_is_refused_in_non_blocking_mode():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), blocking=False)
    with pytest.raises(ValueError, match="finish\\(\\) already lets ranks"):
        opt.join_hook()
    opt.close()
