"""The gradient noise scale AccoOptimizer reports (``last_round.noise_scale``, ``opt.noise_scale``), held to
the single-process reference (``tests/reference.py``: McCandlish et al.'s two-average estimates of every
commit's halves, written there in float64) at worlds 1–3 on both engines, with and without clipping;
the same runs hold every parameter to the reference, so measuring changes no training. Checkpoints
carry the moving average; updates whose halves are not comparable are left out."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import workloads
from acco import AccoOptimizer, CheckpointError
from reference import blocking_plan, simulate
from test_equivalence import assert_matches_reference

BETA = 0.95  # the documented average


def _record(opt, num_calls, loss_at, before_call=lambda call: None, after_backward=lambda call: None):
    """Call ``loss_at(call).backward()`` and ``step()`` ``num_calls`` times, then ``finish()``: every round record
    seen (index → noise scale) and the final average."""
    seen = {}
    for call in range(num_calls):
        before_call(call)
        loss_at(call).backward()
        after_backward(call)
        opt.step()
        opt.zero_grad()
        if opt.last_round is not None:
            seen[opt.last_round.index] = opt.last_round.noise_scale
    opt.finish()
    seen[opt.last_round.index] = opt.last_round.noise_scale
    return seen, opt.noise_scale


def _train_and_record(rank, world_size, mode, num_calls, engine, max_grad_norm, estimate="plain", poisoned=()):
    """Train as test_equivalence does; record every round record seen and the final average. ``poisoned``:
    (rank, call) pairs whose first parameter's gradient gets a NaN (as ``reference.simulate`` does)."""
    model = workloads.make_model("mlp", torch.float64)
    opt = AccoOptimizer(workloads.acco_params("adamw", model), mode=mode, engine=engine, max_grad_norm=max_grad_norm,
                        estimate=estimate, nonfinite="skip" if poisoned else "raise")

    def poison(call):
        if (rank, call) in poisoned:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = float("nan")

    held = []

    def keep_params(call):
        held.append([p.detach().clone() for p in model.parameters()])

    seen, average = _record(opt, num_calls, lambda call: workloads.loss_fn(model, *workloads.batch(rank, call)), keep_params, poison)
    final = [p.detach().clone() for p in model.parameters()]
    info = (opt.num_updates, opt.partition, opt.world_size, opt.rank)
    opt.close()
    return held, final, info, seen, average


def _average(values):
    """Bias-corrected exponential averages of tr(Σ) and |G|², and their ratio, written from the definition."""
    weights = [(1 - BETA) * BETA ** (len(values) - 1 - i) for i in range(len(values))]
    total = sum(weights)
    trace = sum(w * t for w, (t, _) in zip(weights, values)) / total
    square = sum(w * g for w, (_, g) in zip(weights, values)) / total
    return trace, square


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("engine,max_grad_norm", [("thread", None), ("stream", 0.5)])
def test_noise_scale_matches_the_reference_and_training_is_unchanged(run_distributed, world_size, engine, max_grad_norm):
    num_calls = 9  # odd: finish() runs a last commit with no second half, which measures nothing
    results = run_distributed(world_size, _train_and_record, "acco", num_calls, engine, max_grad_norm, timeout=120)
    assert_matches_reference([r[:3] for r in results], "acco", "adamw", world_size, num_calls, max_grad_norm=max_grad_norm)
    reference = simulate("acco", blocking_plan("acco", world_size, num_calls), "mlp", "adamw", max_grad_norm=max_grad_norm)
    expected = reference.noise_scales
    assert sorted(expected) == [1, 3, 5, 7]  # round 9, finish()'s commit, has one half only
    for rank, (*_, seen, average) in enumerate(results):
        measured = {k: v for k, v in seen.items() if v is not None}
        assert set(measured) <= set(expected), f"rank {rank}: rounds {sorted(measured)} measured, {sorted(expected)} expected"
        assert seen.get(num_calls) is None  # the one-half commit
        assert len(measured) >= 2, f"rank {rank} saw too few round records: {seen}"
        for k, value in measured.items():
            trace, square = expected[k]
            assert value.first_count == value.second_count == world_size
            assert value.trace_sigma == pytest.approx(trace, rel=1e-6)
            assert value.grad_square == pytest.approx(square, rel=1e-6, abs=1e-9 * abs(trace))
            assert value.b_simple == pytest.approx(trace / square, rel=1e-5) if square > 0 else math.isnan(value.b_simple)
        trace, square = _average([expected[k] for k in sorted(expected)])
        assert average.trace_sigma == pytest.approx(trace, rel=1e-6)
        assert average.grad_square == pytest.approx(square, rel=1e-6)
    assert len({repr(r[4]) for r in results}) == 1, "every rank reports the same average"


@pytest.mark.parametrize("engine", ["thread", "stream"])
@pytest.mark.parametrize("estimate,poisoned", [("momentum", ()), ("plain", ((1, 2), (0, 5)))], ids=["momentum", "skipped"])
def test_momentum_estimates_and_skipped_updates_follow_the_reference(run_distributed, engine, estimate, poisoned):
    """The momentum estimate changes where ḡ₁ is computed, not what is measured; a NaN in an estimate's call
    (2) or a commit's (5) skips that update, which measures nothing."""
    num_calls = 8
    results = run_distributed(2, _train_and_record, "acco", num_calls, engine, None, estimate, poisoned, timeout=120)
    kind = "momentum" if estimate == "momentum" else "plain"
    reference = simulate("acco", blocking_plan("acco", 2, num_calls), "mlp", "adamw", estimate_kind=kind, poisoned=poisoned)
    assert_matches_reference([r[:3] for r in results], "acco", "adamw", 2, num_calls, estimate_kind=kind, poisoned=poisoned)
    expected = reference.noise_scales
    assert sorted(expected) == ([1, 3, 5, 7] if not poisoned else [1, 7])
    for *_, seen, average in results:
        for k, value in seen.items():
            assert (value is None) == (k not in expected), (k, value)
            if value is not None:
                assert value.trace_sigma == pytest.approx(expected[k][0], rel=1e-6)
        trace, square = _average([expected[k] for k in sorted(expected)])
        assert average.trace_sigma == pytest.approx(trace, rel=1e-6) and average.grad_square == pytest.approx(square, rel=1e-6)


@pytest.mark.parametrize("mode", ["dpu", "sync"])
def test_modes_without_halves_report_none(run_distributed, mode):
    for *_, seen, average in run_distributed(2, _train_and_record, mode, 6, "thread", None, timeout=120):
        assert average is None and all(v is None for v in seen.values())


def _masked(rank, world_size, engine, alternate):
    model = workloads.Branches()
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, engine=engine, batch_rule_applied=True)

    def loss_at(call):
        x, _ = workloads.batch(rank, call)
        return model(x[:, :4], use_branch=alternate and call % 2 == 1).pow(2).mean()

    with contextlib.closing(opt):
        return _record(opt, 8, loss_at)


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_halves_over_different_parameters_are_left_out(run_distributed, engine):
    """A parameter with a gradient in one half only would count its whole gradient as noise: such an
    update is not measured. One never used in either half does not matter."""
    for seen, average in run_distributed(2, _masked, engine, True, timeout=120):
        assert average is None and all(v is None for v in seen.values()), seen
    for seen, average in run_distributed(2, _masked, engine, False, timeout=120):
        assert average is not None and math.isfinite(average.trace_sigma) and average.trace_sigma > 0
        assert any(v is not None for v in seen.values())


def _resume(rank, world_size, save_at, form, edit):
    """The average after 11 calls, uninterrupted and through a save/load at ``save_at``."""

    def build():
        model = workloads.make_model("mlp", torch.float64)
        return model, AccoOptimizer(workloads.acco_params("adamw", model), engine="thread")

    def calls(model, opt, start, stop):
        for call in range(start, stop):
            x, y = workloads.batch(rank, call)
            workloads.loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    calls(model, opt, 0, 11)
    opt.finish()
    straight = opt.noise_scale
    opt.close()

    model, opt = build()
    calls(model, opt, 0, save_at)
    saved = workloads.checkpoint_of(opt, form)
    before = opt.noise_scale
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt.close()
    edit(saved)
    model, opt = build()
    model.load_state_dict(model_state)
    try:
        opt.load_state_dict(saved)
    except CheckpointError as error:
        refused = str(error)
        opt.close()
        return "refused", refused
    after_load = opt.noise_scale
    calls(model, opt, save_at, 11)
    opt.finish()
    resumed = opt.noise_scale
    opt.close()
    return straight, resumed, before, after_load


def _keep(saved):
    return None


def _drop(saved):
    del saved["acco"]["noise_scale"]


def _corrupt(saved):
    saved["acco"]["noise_scale"] = {**saved["acco"]["noise_scale"], "trace": float("nan")}


def _corrupt_record(saved):
    fields = {"trace_sigma": "1.0", "grad_square": 1.0, "b_simple": 1.0, "first_count": 2.0, "second_count": 2.0}
    saved["acco"]["last_round"]["noise_scale"] = fields  # a string where a number belongs


@pytest.mark.parametrize("save_at", [4, 5])
def test_checkpoints_carry_the_average(run_distributed, save_at):
    for straight, resumed, before, after_load in run_distributed(2, _resume, save_at, "per-rank", _keep, timeout=120):
        assert after_load == before and resumed == straight


def test_a_consolidated_checkpoint_carries_the_average(run_distributed):
    for _, resumed, before, after_load in run_distributed(2, _resume, 5, "consolidated", _keep, timeout=120):
        assert after_load == before is not None and resumed is not None


def test_a_checkpoint_without_it_starts_the_average_afresh_and_a_bad_one_is_refused(run_distributed):
    for straight, resumed, before, after_load in run_distributed(2, _resume, 4, "per-rank", _drop, timeout=120):
        assert before is not None and after_load is None and resumed is not None and resumed != straight
    for edit in (_corrupt, _corrupt_record):
        for verdict, message in run_distributed(2, _resume, 4, "per-rank", edit, timeout=120):
            assert verdict == "refused" and ("noise_scale" in message or "round record" in message), message


def _uneven(rank, world_size, calls, engine):
    model = workloads.make_model("mlp", torch.float64)
    opt = AccoOptimizer(workloads.acco_params("adamw", model), engine=engine, timeout=60)
    with contextlib.closing(opt):
        return _record(opt, calls[rank], lambda call: workloads.loss_fn(model, *workloads.batch(rank, call)))


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_halves_of_different_sizes_follow_the_reference(run_distributed, engine):
    """Ranks with fewer batches: round 0 averages 3 micro-batches, its commit 2 (n₁ ≠ n₂)."""
    calls = [4, 1, 6]
    plan = [[c for c in round_ if c.call < calls[c.rank]] for round_ in blocking_plan("acco", 3, max(calls))]
    expected = simulate("acco", plan, "mlp", "adamw").noise_scales
    assert sorted(expected) == [1, 3, 5]
    results = run_distributed(3, _uneven, calls, engine, timeout=120)
    assert any(1 in seen for seen, _ in results), "no rank read round 1's record"
    for seen, average in results:
        assert 1 not in seen or (seen[1].first_count, seen[1].second_count) == (3, 2)
        for k, value in seen.items():
            if value is not None:
                assert value.trace_sigma == pytest.approx(expected[k][0], rel=1e-6)
                assert value.grad_square == pytest.approx(expected[k][1], rel=1e-6, abs=1e-9 * expected[k][0])
        trace, square = _average([expected[k] for k in sorted(expected)])
        assert average.trace_sigma == pytest.approx(trace, rel=1e-6) and average.grad_square == pytest.approx(square, rel=1e-6)
