"""A gradient exists exactly when torch says so (issue 23, items 1 and 2).

A script that throws a gradient away (``model.zero_grad()`` or ``p.grad = None`` between two backwards,
the "skip this batch" pattern, a replaced ``p.grad``) must not see it applied; a zero gradient left by
``zero_grad(set_to_none=False)`` is still a gradient (AdamW decays and moves its moments). Mode ``sync`` is
held to DDP + the same torch optimizer doing the same thing on 2 gloo ranks; modes ``acco`` / ``dpu`` and
non-blocking mode to the single-process reference of the equations given only the gradients the script
kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer
from reference import blocking_plan, simulate
from test_nonblocking import check_against_reference

TIMEOUT = 90


def optimizer_for(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1.0)
    return torch.optim.AdamW(params, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)


def script(model, opt, rank, call, pattern):
    """One iteration of a user's loop doing ``pattern``; returns False where it skipped the batch."""
    loss = lambda seed=0: workloads.loss_fn(model, *workloads.batch(rank, call, seed=seed))  # noqa: E731
    params = list(model.parameters())
    if pattern == "model.zero_grad between backwards":
        loss(seed=1).backward()
        model.zero_grad()
        loss().backward()
    elif pattern == "p.grad = None between backwards":
        loss(seed=1).backward()
        params[0].grad = None
        params[3].grad = None
        loss().backward()
    elif pattern == "p.grad = None, no second backward":
        loss().backward()
        params[1].grad = None  # this parameter gets no gradient in this step: left alone
    elif pattern == "skip this batch":
        loss().backward()
        if call % 3 == 1:  # a loss spike: drop it and go on with the next batch
            model.zero_grad()
            return False
    elif pattern == "replaced p.grad":
        loss().backward()
        params[2].grad = torch.full_like(params[2], 0.5)
    elif pattern == "zero_grad(set_to_none=False) without backward":
        if call % 2 == 0:
            loss().backward()
    elif pattern == "model.zero_grad(set_to_none=False) then backward":
        loss(seed=1).backward()
        model.zero_grad(set_to_none=False)
        loss().backward()
    else:
        raise ValueError(pattern)
    opt.step()
    if pattern == "zero_grad(set_to_none=False) without backward":
        opt.zero_grad(set_to_none=False)
    else:
        opt.zero_grad(set_to_none=True)
    return True


PATTERNS = [
    "model.zero_grad between backwards",
    "p.grad = None between backwards",
    "p.grad = None, no second backward",
    "skip this batch",
    "replaced p.grad",
    "zero_grad(set_to_none=False) without backward",
    "model.zero_grad(set_to_none=False) then backward",
]


def against_ddp(rank, world_size, pattern, kind):
    reference = workloads.make_model()
    ddp = DistributedDataParallel(reference)
    ref_opt = optimizer_for(kind, reference.parameters())
    model = workloads.make_model()
    opt = AccoOptimizer(optimizer_for(kind, model.parameters()), mode="sync")
    start = [p.detach().clone() for p in model.parameters()]
    for call in range(6):
        script(ddp, ref_opt, rank, call, pattern)
        script(model, opt, rank, call, pattern)
    opt.finish()
    opt.close()
    difference = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))
    moved = [float((p - s).abs().max()) for p, s in zip(reference.parameters(), start)]
    return {"difference": difference, "moved": moved}


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_sync_matches_ddp_whatever_the_script_does_with_its_gradients(run_distributed, pattern, kind):
    for rank, result in enumerate(run_distributed(2, against_ddp, pattern, kind, timeout=TIMEOUT)):
        assert min(result["moved"]) > 0 or pattern == "p.grad = None, no second backward", result
        assert result["difference"] <= 1e-12, f"rank {rank}: {result}"


def kept_gradients_only(rank, world_size, mode, pattern):
    """Modes acco / dpu: the run must equal the reference given only the batches the script kept."""
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode)
    kept = []
    for call in range(7):
        if pattern == "skip this batch":
            if script(model, opt, rank, call, pattern):
                kept.append(call)
        else:
            script(model, opt, rank, call, "model.zero_grad between backwards")
            kept.append(call)
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    updates = opt.num_updates
    opt.close()
    return {"final": final, "kept": kept, "updates": updates}


@pytest.mark.parametrize("pattern", ["model.zero_grad between backwards", "skip this batch"])
@pytest.mark.parametrize("mode", ["acco", "dpu"])
def test_thrown_away_gradients_never_reach_a_round(run_distributed, mode, pattern):
    results = run_distributed(2, kept_gradients_only, mode, pattern, timeout=TIMEOUT)
    kept = results[0]["kept"]
    assert all(r["kept"] == kept for r in results)
    plan = blocking_plan(mode, 2, len(kept))
    for round_ in plan:  # call numbers of the kept batches: the reference recomputes their gradients
        for i, c in enumerate(round_):
            round_[i] = type(c)(c.rank, kept[c.call], c.at_round)
    reference = simulate(mode, plan, "mlp", "adamw")
    for rank, r in enumerate(results):
        assert r["updates"] == reference.num_updates
        for got, want in zip(r["final"], reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"rank {rank}: {m}")


def held_then_dropped(rank, world_size, drop):
    """Non-blocking mode: rank 0 runs three calls per call of rank 1 (store, not sleep), so its calls
    between two signals find the round unfinished and hold their gradients. Before every real
    backward the script computes one it throws away (``drop``); the recorded feeds must explain the
    result with the kept gradients only."""
    store = dist.distributed_c10d._get_default_store()
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", blocking=False)
    records, held, holding_calls = [], [], 0
    lead, calls = 3, [12, 4][rank]
    for call in range(calls):
        if rank != 0:
            store.wait([f"held-drop-{drop}-{call}"])
        at_round = opt.rounds_installed - 1
        held.append([p.detach().clone() for p in model.parameters()])
        holding_calls += opt._pipeline.handover.holding
        workloads.loss_fn(model, *workloads.batch(rank, call, seed=5)).backward()  # thrown away below
        if drop == "model.zero_grad":
            model.zero_grad()
        elif drop == "opt.zero_grad":
            opt.zero_grad()
        else:
            for p in model.parameters():
                p.grad = None
        workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
        feeds = opt.rounds_launched
        opt.step()
        records.append((call, at_round, feeds, opt.rounds_launched > feeds))
        opt.zero_grad()
        if rank == 0 and call % lead == lead - 1:
            store.set(f"held-drop-{drop}-{call // lead}", "go")
    if rank == 0:
        for c in range(calls // lead, 4):
            store.set(f"held-drop-{drop}-{c}", "go")
    opt.finish()
    summary = dict(records=records, held=held, final=[p.detach().clone() for p in model.parameters()],
                   rounds=opt.rounds_launched, updates=opt.num_updates, in_flight=opt.round_in_flight, holding=holding_calls)
    opt.close()
    return summary


@pytest.mark.parametrize("drop", ["model.zero_grad", "opt.zero_grad", "p.grad = None"])
def test_gradients_dropped_while_non_blocking_mode_holds_are_not_applied(run_distributed, drop):
    results = run_distributed(2, held_then_dropped, drop, timeout=TIMEOUT)
    assert results[0]["holding"] > 0, "rank 0 never held: the test shows nothing"
    check_against_reference(results, "acco")


def test_a_second_order_backward_is_not_counted_twice():
    """``backward(create_graph=True)`` makes autograd replace ``p.grad`` by ``p.grad + new`` (a new
    tensor): it is the whole gradient, not an addition to the buffer. One worker, against AdamW."""
    model, reference = workloads.make_model(), workloads.make_model()
    opt = AccoOptimizer(optimizer_for("adamw", model.parameters()), mode="sync")
    ref_opt = optimizer_for("adamw", reference.parameters())
    for call in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            workloads.loss_fn(m, *workloads.batch(0, call, seed=1)).backward()
            workloads.loss_fn(m, *workloads.batch(0, call)).backward(create_graph=True)
            o.step()
            o.zero_grad(set_to_none=True)
    opt.close()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,empty_calls", [("dpu", 1), ("acco", 2)])
def test_exact_evaluation_after_calls_without_gradients(mode, empty_calls):
    """Every rank skips a batch with step() and no gradient: the round updates nothing and gathers nothing
    (the model already holds the committed parameters); committed_parameters() must still show them."""
    model = workloads.make_model()
    opt = AccoOptimizer(optimizer_for("sgd", model.parameters()), mode=mode)
    for call in range(2):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        opt.step()
        opt.zero_grad()
    for _ in range(empty_calls):
        opt.step()
        opt.zero_grad()
    with opt.committed_parameters():
        inside = [p.detach().clone() for p in model.parameters()]
    opt.finish()
    assert all(torch.equal(a, p) for a, p in zip(inside, model.parameters()))
    opt.close()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_a_gradient_written_by_hand_into_p_grad_counts(kind):
    """A script that accumulates gradients itself (``p.grad = g if p.grad is None else p.grad.add_(g)``)
    writes into the zero tensor acco leaves after zero_grad(); no hook sees it. One worker, against the
    torch optimizer; the second step also checks that zero_grad() then clears what the script wrote."""
    model, reference = workloads.make_model(), workloads.make_model()
    opt = AccoOptimizer(optimizer_for(kind, model.parameters()), mode="sync")
    ref_opt = optimizer_for(kind, reference.parameters())
    for call in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            for index, p in enumerate(m.parameters()):
                if call == 2 and index == 1:
                    continue  # no gradient for this one in the last step: left untouched
                g = torch.full_like(p, 0.1 * (call + 1) + 0.01 * index)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            o.step()
    opt.close()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
