"""The pipeline's states and transitions (docs/design.md §4), and the defects that lived in the
seams before it was one object: each test here failed on the code before the split (7f2c67b)."""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn

import workloads
from acco import AccoOptimizer, OptimizerClosedError


def _backward(model, rank, call):
    workloads.loss_fn(model, *workloads.batch(rank, call)).backward()


# ---------------------------------------------------------------------- states
def walk_the_states(rank, world_size):
    """Rank 1 holds back its step() (store, not sleep) so that rank 0's round surely stays in flight."""
    store = dist.distributed_c10d._get_default_store()
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", blocking=False, timeout=60)
    seen = [opt.pipeline_state]
    _backward(model, rank, 0)
    if rank == 1:
        store.wait(["states-go"])
    opt.step()
    seen.append(opt.pipeline_state)  # in flight
    opt.zero_grad()
    if rank == 0:
        _backward(model, rank, 1)
        opt.step()  # rank 1 has not joined round 0 yet: the gradients are held
        seen.append(opt.pipeline_state)
        store.set("states-go", "1")
    opt.finish()
    seen.append(opt.pipeline_state)
    opt.close()
    seen.append(opt.pipeline_state)
    with pytest.raises(OptimizerClosedError, match="closed"):
        opt.step()
    return seen


def test_states_from_idle_to_closed(run_distributed):
    fast, slow = run_distributed(2, walk_the_states, timeout=120)
    assert fast == ["idle", "in flight", "holding", "idle", "closed"]
    assert slow == ["idle", "in flight", "idle", "closed"]


def fail_then_use(rank, world_size):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync", timeout=60)
    _backward(model, rank, 0)
    if rank == 1:
        next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    state = opt.pipeline_state
    for call in (opt.step, opt.finish, opt.state_dict, lambda: opt.zero_grad()):
        with pytest.raises(RuntimeError, match="failed earlier"):
            call()
    opt.close()
    return state, opt.pipeline_state


def test_a_failure_is_final_until_close(run_distributed):
    for states in run_distributed(2, fail_then_use, timeout=120):
        assert states == ("failed", "closed")


# ---------------------------------------------------------------------- finish() in non-blocking mode
def finish_with_nothing_new(rank, world_size):
    """Rank 1 steps once more; rank 0 has nothing new since its last finish(). Its finish() must
    still join the round rank 1 launched (before the split it returned at once and rank 1 hung
    until the collective timeout)."""
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", blocking=False, timeout=20)
    _backward(model, rank, 0)
    opt.step()
    opt.zero_grad()
    opt.finish()
    if rank == 1:
        _backward(model, rank, 1)
        opt.step()
        opt.zero_grad()
    opt.finish()
    params = [p.detach().clone() for p in model.parameters()]
    updates = opt.num_updates
    opt.close()
    return params, updates


def test_finish_joins_a_peer_whose_round_waits(run_distributed):
    (params0, updates0), (params1, updates1) = run_distributed(2, finish_with_nothing_new, timeout=120)
    assert updates0 == updates1 == 2  # rank 1's last gradients were committed, on both ranks
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


# ---------------------------------------------------------------------- use after close()
def use_after_close(rank, world_size, engine):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", engine=engine, timeout=60)
    _backward(model, rank, 0)
    opt.step()
    opt.close()
    opt.close()  # twice: nothing more happens
    refused = []
    for name, call in [
        ("step", opt.step), ("zero_grad", opt.zero_grad), ("finish", opt.finish), ("state_dict", opt.state_dict),
        ("consolidated_state_dict", opt.consolidated_state_dict), ("adopt_model_parameters", opt.adopt_model_parameters),
    ]:
        with pytest.raises(OptimizerClosedError, match=f"{name}\\(\\) on an AccoOptimizer that was closed"):
            call()
        refused.append(name)
    with pytest.raises(RuntimeError, match="process group was closed"):
        opt._comm.all_reduce_sum(torch.zeros(1))  # never the default group
    return refused


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_use_after_close_raises_and_runs_no_collective(run_distributed, engine):
    for refused in run_distributed(2, use_after_close, engine, timeout=120):
        assert len(refused) == 6


# ---------------------------------------------------------------------- dropping without close()
def drop_without_close(rank, world_size, engine):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", engine=engine, timeout=60)
    for call in range(3):
        _backward(model, rank, call)
        opt.step()  # a round is left in flight
        opt.zero_grad()
    comm, handover = opt._comm, opt._pipeline.handover
    del opt
    gc.collect()
    # The round in flight ended, the private group is destroyed and no hook holds on.
    return comm.group is None, handover.hooked


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_dropping_the_optimizer_releases_group_and_hooks(run_distributed, engine):
    for group_gone, hooked in run_distributed(2, drop_without_close, engine, timeout=120):
        assert group_gone and not hooked


def drop_without_close_or_collector(rank, world_size, engine):
    """The same, with the garbage collector off: nothing but reference counting may be needed (a
    reference cycle through the facade used to keep the worker and the group alive until a
    collection, which a long training run may not have for minutes)."""
    gc.disable()
    try:
        model = workloads.make_model()
        opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", engine=engine, timeout=60)
        for call in range(3):
            _backward(model, rank, call)
            opt.step()
            opt.zero_grad()
        opt.state_dict()  # its base state dict is the one bound method the facade hands out
        comm, handover, engine = opt._comm, opt._pipeline.handover, opt._pipeline.engine
        del opt
        worker = getattr(engine, "_thread", None)
        return comm.group is None, handover.hooked, worker is not None and worker.is_alive()
    finally:
        gc.enable()


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_dropping_the_optimizer_frees_its_group_without_the_garbage_collector(run_distributed, engine):
    for group_gone, hooked, worker_alive in run_distributed(2, drop_without_close_or_collector, engine, timeout=120):
        assert group_gone and not hooked and not worker_alive


def memory_bytes_while_scratch_grows(rank, world_size):
    """The worker adds a collective scratch buffer for a dtype it meets for the first time while the
    training thread asks for the sizes: simulated by a dict that changes size whenever it is
    iterated (what a concurrent insert does to an iteration)."""

    class Growing(dict):
        def values(self):
            view = super().values()

            def growing():
                for index, value in enumerate(view):
                    if index == 0:
                        self[object()] = torch.empty(0)  # the worker's insert, mid-iteration
                    yield value

            return growing()

    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", timeout=60)
    for call in range(2):
        _backward(model, rank, call)
        opt.step()
        opt.zero_grad()
    opt.finish()
    before = opt.memory_bytes()["comm_scratch"]
    opt._comm._scratch = Growing(opt._comm._scratch)
    try:
        after = opt.memory_bytes()["comm_scratch"]
    finally:
        opt._comm._scratch = dict(opt._comm._scratch)
        opt.close()
    return before, after


def test_memory_bytes_never_iterates_what_the_worker_changes(run_distributed):
    for before, after in run_distributed(2, memory_bytes_while_scratch_grows, timeout=120):
        assert before == after > 0


# ---------------------------------------------------------------------- memory_bytes() while a round runs
def test_memory_bytes_while_the_worker_creates_the_state():
    """Many parameters, so that the inner optimizer's first step inserts state entries one by one
    while this thread asks for the sizes (before the split: "dictionary changed size during
    iteration", now and then). The sizes reported are those of a finished step."""
    torch.manual_seed(0)
    model = nn.ModuleList(nn.Linear(4, 4) for _ in range(1500)).double()
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3, mode="dpu", blocking=False)
    # The first round's step waits for this thread's first reading (events, not sleeps), so at least
    # one reading surely falls inside a running round; later ones race with the state's creation.
    started, go, step = threading.Event(), threading.Event(), opt._shard.step

    def step_after_a_reading(*args, **kwargs):
        started.set()
        go.wait(timeout=60)
        return step(*args, **kwargs)

    opt._shard.step = step_after_a_reading
    readings, during_first_round = [], None
    x = torch.randn(2, 4, dtype=torch.float64)
    for call in range(4):
        sum(layer(x).square().sum() for layer in model).backward()
        opt.step()
        opt.zero_grad()
        if call == 0:
            assert started.wait(timeout=60)
            during_first_round = (opt.round_finished, opt.memory_bytes()["optimizer_state"])
            go.set()
        while not opt.round_finished:
            readings.append(opt.memory_bytes()["optimizer_state"])
    opt.finish()
    full = opt.memory_bytes()["optimizer_state"]
    opt.close()
    element = 8  # fp64 master: exp_avg and exp_avg_sq per element, and a step counter per view
    assert full >= 2 * element * sum(p.numel() for p in model.parameters())
    assert during_first_round == (False, 0), during_first_round  # read while the round ran: no state yet
    assert all(reading in (0, full) for reading in readings)


# ---------------------------------------------------------------------- state_dict() is a copy
def test_state_dict_is_not_changed_by_later_steps():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
    for call in range(4):
        _backward(model, 0, call)
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    frozen = copy.deepcopy(saved)
    for call in range(4, 8):
        _backward(model, 0, call)
        opt.step()
        opt.zero_grad()
    opt.close()
    inner, expected = saved["acco"]["inner_state"], frozen["acco"]["inner_state"]
    assert inner.keys() == expected.keys() and inner
    for index, state in inner.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected[index][key])), (index, key)
    assert torch.equal(saved["acco"]["master_shard"], frozen["acco"]["master_shard"])
