"""Overlap, proven without timing: a round cannot finish before every rank has launched it, so
holding one rank back (through the store, not a sleep) shows that ``step()`` returned while the
round was still in progress and that the next backward ran during it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import workloads
from acco import AccoOptimizer


def overlap_probe(rank, world_size, mode, blocking):
    store = dist.distributed_c10d._get_default_store()
    key = f"overlap-{mode}-{blocking}"
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, blocking=blocking)
    observed = {}
    if rank == 0:
        workloads.loss_fn(model, *workloads.batch(rank, 0)).backward()
        opt.step()  # launches round 0; rank 1 has not launched it yet, so it cannot finish
        observed["in_flight_after_step"] = opt.round_in_flight and not opt.round_finished
        workloads.loss_fn(model, *workloads.batch(rank, 1)).backward()  # compute during the round
        observed["in_flight_after_backward"] = not opt.round_finished
        observed["grad_written"] = all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        store.set(key, "backward done")
        opt.step()
    else:
        store.wait([key])
        workloads.loss_fn(model, *workloads.batch(rank, 0)).backward()
        opt.step()
        opt.zero_grad()
        workloads.loss_fn(model, *workloads.batch(rank, 1)).backward()
        opt.step()
    opt.finish()
    observed["rounds"] = opt.rounds_launched
    observed["params"] = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return observed


@pytest.mark.parametrize("mode,blocking", [("acco", True), ("dpu", True), ("acco", False)])
def test_step_returns_and_backward_runs_while_round_is_in_flight(run_distributed, mode, blocking):
    first, second = run_distributed(2, overlap_probe, mode, blocking)
    assert first["in_flight_after_step"]
    assert first["in_flight_after_backward"]
    assert first["grad_written"]
    assert first["rounds"] == second["rounds"]
    for a, b in zip(first["params"], second["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def sync_has_nothing_in_flight(rank, world_size):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync")
    workloads.loss_fn(model, *workloads.batch(rank, 0)).backward()
    opt.step()
    in_flight = opt.round_in_flight
    opt.close()
    return in_flight


def test_sync_mode_waits_for_its_round(run_distributed):
    assert run_distributed(2, sync_has_nothing_in_flight) == [False, False]
