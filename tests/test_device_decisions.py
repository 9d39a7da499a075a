"""The stream engine's rounds decide on the device: ``step()`` must not read a value back from the
device (on a GPU each read waits for the GPU, and for every peer, since a round's values come out
of its collectives). On CPU ``engine="stream"`` runs the same round inline, so the reads can be
counted: every ``item()``, ``tolist()``, ``bool()``, ``float()``, ``int()`` of a tensor during
``step()``. The reads of a round's outcome two calls after its launch are not counted: on a GPU they
read a pinned host copy that the GPU filled long before.

Also here: the ranks refuse together what one rank saw (a parameter cast or written on some ranks
only), at the same call, with nothing adopted or updated by the refused round.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer, ParameterOwnershipError
from acco.outcome import RoundOutcome
from test_drop_in import TwoExperts, experts_for

TIMEOUT = 90
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (paused while a round's outcome is read)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and not self.paused:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def counting_outcome_reads_out(monkeypatch, counter: HostReads) -> None:
    plain = RoundOutcome.resolve

    def resolve(self):
        counter.paused += 1
        try:
            return plain(self)
        finally:
            counter.paused -= 1

    monkeypatch.setattr(RoundOutcome, "resolve", resolve)


def reads_per_call(model, opt, calls, batch_of, counter):
    """Host reads inside each ``step()`` (the backward is not counted)."""
    per_call = []
    for call in range(calls):
        x, y = batch_of(call)
        ((model(x) - y) ** 2).mean().backward()
        before = len(counter.reads)
        with counter:
            opt.step()
        per_call.append(len(counter.reads) - before)
        opt.zero_grad()
    return per_call


@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_step_reads_nothing_back_on_the_stream_engine(monkeypatch, mode, max_grad_norm):
    counter = HostReads()
    counting_outcome_reads_out(monkeypatch, counter)
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, engine="stream", max_grad_norm=max_grad_norm)
    per_call = reads_per_call(model, opt, 8, lambda c: workloads.batch(0, c, torch.float32), counter)
    first_commit = 1 if mode == "acco" else 0
    # The round that creates the optimizer state decides on the host once (README, "On GPUs").
    assert per_call[first_commit] == 1, per_call
    assert sum(per_call) == 1, (per_call, counter.reads)
    opt.finish()
    opt.close()


def experts_with_counted_reads(rank, world_size, mode, engine):
    """DDP + AdamW beside acco; returns the host reads per step() and the largest difference."""
    reference = TwoExperts()
    ddp = DistributedDataParallel(reference, find_unused_parameters=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    model = TwoExperts()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=0.02, betas=(0.9, 0.95), weight_decay=0.1), mode=mode, engine=engine)
    counter = HostReads()
    plain = RoundOutcome.resolve

    def resolve(self):
        counter.paused += 1
        try:
            return plain(self)
        finally:
            counter.paused -= 1

    RoundOutcome.resolve = resolve
    try:
        per_call = []
        for call in range(10):
            x, y = workloads.batch(rank, call)
            experts = experts_for(rank, call)
            if mode == "sync":
                ((ddp(x, experts) - y) ** 2).mean().backward()
                ref_opt.step()
                ref_opt.zero_grad(set_to_none=True)
            ((model(x, experts) - y) ** 2).mean().backward()
            before = len(counter.reads)
            with counter:
                opt.step()
            per_call.append(len(counter.reads) - before)
            opt.zero_grad(set_to_none=True)
        opt.finish()
    finally:
        RoundOutcome.resolve = plain
    params = [p.detach().clone() for p in model.parameters()]
    difference = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
    opt.close()
    return {"reads": per_call, "difference": difference if mode == "sync" else None, "params": params}


def test_a_rank_without_some_gradients_reads_nothing_back(run_distributed):
    """Rank 1 lacks expert 1's gradient in most calls: the round masks that parameter's update on the
    device (it used to read the ranks' gradient agreement on the host, every such round), and the
    result is still DDP + AdamW's (expert 1 untouched where no rank had a gradient for it).""" 
    results = run_distributed(2, experts_with_counted_reads, "sync", "stream", timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert result["difference"] <= 1e-12, (rank, result["difference"])
        # Only rounds that create optimizer state in this rank's shard decide on the host: the first,
        # and (on the rank whose shard holds expert 1) the first in which expert 1 had a gradient.
        assert result["reads"][0] == 1 and sum(result["reads"][2:]) == 0, (rank, result["reads"])


@pytest.mark.parametrize("mode", ["acco", "dpu"])
def test_the_masked_step_matches_the_thread_engine_in_every_mode(run_distributed, mode):
    """Estimates and commits with a parameter that some rounds leave untouched: the device mask
    (stream) and the host's hiding of gradients (thread) give the same parameters."""
    stream = run_distributed(2, experts_with_counted_reads, mode, "stream", timeout=TIMEOUT)
    thread = run_distributed(2, experts_with_counted_reads, mode, "thread", timeout=TIMEOUT)
    for s, t in zip(stream, thread):
        for a, b in zip(s["params"], t["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert sum(s["reads"][4:]) == 0, s["reads"]


# ---------------------------------------------------------------------- refused on every rank, at the same call
def refused_on_the_stream_engine(rank, world_size, mode, what):
    """Rank 1 casts its model (``cast``) or loads other weights (``write``) before call 2. Returns the
    error and the call that raised it on this rank, and whether the refused round changed the master."""
    model = workloads.make_model()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=0.02), mode=mode, engine="stream", timeout=60)
    dtype, untouched = torch.float64, None
    try:
        for call in range(8):
            if call == 2 and rank == 1:
                if what == "cast":
                    model.to(torch.float32)
                    dtype = torch.float32
                else:
                    model.load_state_dict(workloads.make_model(seed=3).state_dict())
            before = opt._shard.master.clone()
            workloads.loss_fn(model, *workloads.batch(rank, call, dtype)).backward()
            opt.step()
            if call == 2:  # on CPU the round ran inside step(): it was refused on the device
                untouched = torch.equal(before, opt._shard.master)
            opt.zero_grad()
    except ParameterOwnershipError as error:
        return {"error": str(error), "call": call, "untouched": untouched}
    finally:
        opt.close()
    return {"error": None}


@pytest.mark.parametrize("mode", ["sync", "acco"])
@pytest.mark.parametrize("what,fragment", [("cast", "trainable parameter 0 on rank 1 can no longer be trained"),
                                           ("write", "on rank(s) [1] but not on rank(s) [0]")])
def test_the_stream_engine_refuses_on_every_rank_at_the_same_call(run_distributed, mode, what, fragment):
    """A parameter cast on one rank used to raise on that rank alone (on a GPU: the others waited for
    the NCCL watchdog); weights written on one rank used to be adopted into that rank's master
    before the refused step. Now the ranks agree first: the same error, at the same call (two
    calls after the launch of the round that saw it), and the refused round changed nothing."""
    results = run_distributed(2, refused_on_the_stream_engine, mode, what, timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} went on training"
        assert fragment in result["error"] and "changed nothing" in result["error"], result
        assert result["untouched"], f"rank {rank}: the refused round changed the master"
    assert [r["call"] for r in results] == [4, 4]


# ---------------------------------------------------------------------- non-blocking: a peer's own collective, then .item()
def nonblocking_with_own_collectives(rank, world_size, engine):
    """Each call ends with the loop's own all-reduce of the loss on the default group and a
    ``.item()`` of it, while rounds run on the optimizer's private group and the slower rank 1 holds
    its gradients: no order between the two groups' collectives is needed, so nothing waits forever."""
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", blocking=False, engine=engine, timeout=60)
    logged = []
    for call in range(10):
        loss = workloads.loss_fn(model, *workloads.batch(rank, call))
        loss.backward()
        for _ in range(20 if rank == 1 else 0):  # a slower worker
            torch.linalg.matrix_exp(torch.randn(64, 64, dtype=torch.float64) / 64)
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        logged.append(reduced.item())
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return logged, final


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_nonblocking_rounds_never_wait_for_a_peers_own_collective(run_distributed, engine):
    (logged0, final0), (logged1, final1) = run_distributed(2, nonblocking_with_own_collectives, engine, timeout=TIMEOUT)
    assert logged0 == logged1
    for a, b in zip(final0, final1):
        assert torch.equal(a, b)
