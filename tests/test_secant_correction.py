"""``correction="secant"`` (issue 22) held to the single-process reference of its equations
(``tests/reference.py``, written from the definition: κ = max(0, eᵀ(ḡ₁ − ḡ₂)/|e|²) measured by each commit,
ḡ₁ − κ·e in the commit and, with the last commit's κ, in the next estimate) at worlds 1–3 on both
engines, with and without clipping; exact resume from per-rank checkpoints; clear errors. ``"secant-gated"``
(each κ shrunk by min(1, m²/v) of its running averages) is held to the same reference."""

from __future__ import annotations

import pytest
import torch

import workloads
from acco import AccoOptimizer, CheckpointError
from reference import blocking_plan, simulate
from test_equivalence import assert_matches_reference

NUM_CALLS = 13  # six whole updates and a last estimate, which finish() commits


def _train(rank, world_size, num_calls, engine="thread", max_grad_norm=None, spec="adamw", correction="secant", nonfinite="raise",
           poisoned=()):
    """Train as test_equivalence does (``num_calls``: one count, or one per rank for uneven data)."""
    model = workloads.make_model(workloads.model_kind_for(spec), torch.float64)
    opt = AccoOptimizer(workloads.acco_params(spec, model), engine=engine, max_grad_norm=max_grad_norm, correction=correction,
                        nonfinite=nonfinite, timeout=60)
    held = []
    for call in range(num_calls if isinstance(num_calls, int) else num_calls[rank]):
        held.append([p.detach().clone() for p in model.parameters()])
        workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
        if (rank, call) in poisoned:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = float("nan")
        opt.step()
        opt.zero_grad()
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    info = (opt.num_updates, opt.partition, opt.world_size, opt.rank, opt.correction)
    opt.close()
    return held, final, info


def test_the_correction_changes_training_in_the_reference():
    """The runs below could not tell the correction from its absence if it changed nothing here."""
    plain = simulate("acco", blocking_plan("acco", 2, NUM_CALLS), "mlp", "adamw")
    secant = simulate("acco", blocking_plan("acco", 2, NUM_CALLS), "mlp", "adamw", correction="secant")
    gap = max(float((a - b).abs().max()) for a, b in zip(plain.final, secant.final))
    assert gap > 1e-4
    gated = simulate("acco", blocking_plan("acco", 2, NUM_CALLS), "mlp", "adamw", correction="secant-gated")
    assert max(float((a - b).abs().max()) for a, b in zip(gated.final, secant.final)) > 1e-5  # the gate shrank some κ
    assert max(float((a - b).abs().max()) for a, b in zip(gated.final, plain.final)) > 1e-5  # and corrected with it


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("engine,max_grad_norm", [("thread", None), ("stream", 0.05), ("thread", 0.05)])
def test_secant_matches_the_reference(run_distributed, world_size, engine, max_grad_norm):
    results = run_distributed(world_size, _train, NUM_CALLS, engine, max_grad_norm, timeout=120)
    assert all(info[4] == "secant" for _, _, info in results)
    assert_matches_reference(results, "acco", "adamw", world_size, NUM_CALLS, max_grad_norm=max_grad_norm, correction="secant")


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("engine,max_grad_norm", [("thread", None), ("stream", 0.05)])
def test_gated_secant_matches_the_reference(run_distributed, world_size, engine, max_grad_norm):
    results = run_distributed(world_size, _train, NUM_CALLS, engine, max_grad_norm, "adamw", "secant-gated", timeout=120)
    assert all(info[4] == "secant-gated" for _, _, info in results)
    assert_matches_reference(results, "acco", "adamw", world_size, NUM_CALLS, max_grad_norm=max_grad_norm, correction="secant-gated")


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_halves_of_different_sizes_and_skipped_updates_follow_the_reference(run_distributed, engine):
    """Ranks with fewer batches (n₁ ≠ n₂: round 0 averages 3 micro-batches, its commit 2), and a NaN in an
    estimate's call (6) and in a commit's (9): skipped updates measure no κ and keep the last one."""
    calls = [8, 1, 10]
    plan = [[c for c in round_ if c.call < calls[c.rank]] for round_ in blocking_plan("acco", 3, max(calls))]
    reference = simulate("acco", plan, "mlp", "adamw", correction="secant")
    results = run_distributed(3, _train, calls, engine, timeout=120)
    for _, final, _ in results:
        for got, want in zip(final, reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    poisoned = ((1, 6), (0, 9))  # (1, 2) would leave κ at 0 throughout here: no test of the skip
    results = run_distributed(2, _train, NUM_CALLS, engine, None, "adamw", "secant", "skip", poisoned, timeout=120)
    assert_matches_reference(results, "acco", "adamw", 2, NUM_CALLS, correction="secant", poisoned=poisoned)
    assert results[0][2][0] == simulate("acco", blocking_plan("acco", 2, NUM_CALLS), "mlp", "adamw", poisoned=poisoned).num_updates
    results = run_distributed(2, _train, NUM_CALLS, engine, None, "adamw", "secant-gated", "skip", poisoned, timeout=120)
    assert_matches_reference(results, "acco", "adamw", 2, NUM_CALLS, correction="secant-gated", poisoned=poisoned)


def test_muon_whole_tensors_follow_the_reference(run_distributed):
    """Whole-tensor partition (Muon on the matrices): the correction is the same per shard. Muon orthogonalises
    in bf16 internally, hence test_equivalence's looser tolerance."""
    results = run_distributed(2, _train, 8, "thread", None, "muon", timeout=120)
    assert results[0][2][1] == "param"
    assert_matches_reference(results, "acco", "muon", 2, 8, rtol=1e-4, atol=1e-6, correction="secant")


def _resume(rank, world_size, save_at, form, edit, engine="thread", total=11, correction="secant"):
    """Final parameters after ``total`` calls, uninterrupted and through a save/load after ``save_at`` calls
    (a consolidated checkpoint is taken after ``finish()``, so the uninterrupted run finishes there too)."""

    def build():
        model = workloads.make_model("mlp", torch.float64)
        return model, AccoOptimizer(workloads.acco_params("adamw", model), engine=engine, correction=correction, max_grad_norm=0.05)

    def calls(model, opt, start, stop):
        for call in range(start, stop):
            workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
            opt.step()
            opt.zero_grad()

    model, opt = build()
    calls(model, opt, 0, save_at)
    if form == "consolidated":
        opt.finish()
    calls(model, opt, save_at, total)
    opt.finish()
    straight = [p.detach().clone() for p in model.parameters()]
    opt.close()

    model, opt = build()
    calls(model, opt, 0, save_at)
    saved = workloads.checkpoint_of(opt, form)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt.close()
    edit(saved)
    model, opt = build()
    model.load_state_dict(model_state)
    try:
        opt.load_state_dict(saved)
    except CheckpointError as error:
        opt.close()
        return "refused", str(error)
    calls(model, opt, save_at, total)
    opt.finish()
    resumed = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return straight, resumed


def _keep(saved):
    return None


def _drop(saved):
    del saved["acco"]["secant"]


def _negative_kappa(saved):
    saved["acco"]["secant"]["kappa"] = -1.0


def _drop_moments(saved):
    del saved["acco"]["secant"]["kappa_moments"]


def _bad_moments(saved):
    saved["acco"]["secant"]["kappa_moments"] = [0.5, -1.0, True]


def _short_point(saved):
    saved["acco"]["secant"]["point"] = saved["acco"]["secant"]["point"][:-1]


@pytest.mark.parametrize("save_at,engine", [(4, "thread"), (5, "thread"), (5, "stream")])
def test_per_rank_checkpoints_resume_exactly(run_distributed, save_at, engine):
    """Saved with a commit (4 calls) or an estimate (5) in flight: θ̃, the carried flag and κ come back, bit for bit."""
    for straight, resumed in run_distributed(2, _resume, save_at, "per-rank", _keep, engine, timeout=120):
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize("save_at,engine", [(5, "thread"), (4, "stream")])
def test_gated_per_rank_checkpoints_resume_exactly(run_distributed, save_at, engine):
    """The gate's running averages come back too; without them the run differs (they matter)."""
    for straight, resumed in run_distributed(2, _resume, save_at, "per-rank", _keep, engine, 11, "secant-gated", timeout=120):
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    for straight, resumed in run_distributed(2, _resume, save_at, "per-rank", _drop_moments, engine, 11, "secant-gated", timeout=120):
        assert not all(torch.equal(a, b) for a, b in zip(straight, resumed))
    for verdict, message in run_distributed(2, _resume, save_at, "per-rank", _bad_moments, engine, 11, "secant-gated", timeout=120):
        assert verdict == "refused" and "kappa_moments" in message, message


def test_a_consolidated_checkpoint_needs_no_correction_state(run_distributed):
    """After ``finish()`` the next first half is computed at the committed parameters (no error to correct)."""
    for straight, resumed in run_distributed(2, _resume, 6, "consolidated", _keep, timeout=120):
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_a_checkpoint_without_the_state_starts_afresh_and_a_bad_one_is_refused(run_distributed):
    for straight, resumed in run_distributed(2, _resume, 5, "per-rank", _drop, timeout=120):
        assert all(torch.isfinite(p).all() for p in resumed)
        assert not all(torch.equal(a, b) for a, b in zip(straight, resumed))  # the state mattered
    for edit in (_negative_kappa, _short_point):
        for verdict, message in run_distributed(2, _resume, 5, "per-rank", edit, timeout=120):
            assert verdict == "refused" and "acco.secant" in message, message


def _construct(rank, world_size, kwargs, rank1_correction=None):
    model = workloads.make_model("mlp", torch.float64)
    if rank == 1 and rank1_correction is not None:
        kwargs = {**kwargs, "correction": rank1_correction}
    try:
        AccoOptimizer(workloads.acco_params("adamw", model), **kwargs).close()
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("kwargs,rank1,expected", [
    ({"correction": "secnat"}, None, "correction must be one of"),
    ({"correction": "secant", "mode": "dpu"}, None, "only mode='acco'"),
    ({"correction": "secant", "mode": "sync"}, None, "only mode='acco'"),
    ({"correction": "secant", "estimate": "momentum"}, None, "needs estimate='plain'"),
    ({"correction": "secant"}, "none", "correction"),
    ({"correction": "none"}, "bogus", "correction must be one of"),
    ({"correction": "secant-gated", "mode": "dpu"}, None, "only mode='acco'"),
    ({"correction": "secant-gated"}, "secant", "correction"),
], ids=["unknown", "dpu", "sync", "momentum", "differs-between-ranks", "one-rank-invalid", "gated-dpu", "gated-differs"])
def test_invalid_settings_are_refused_on_every_rank(run_distributed, kwargs, rank1, expected):
    for message in run_distributed(2, _construct, kwargs, rank1, timeout=60):
        assert message is not None and expected in message, message


def _probe(monkeypatch, scenario):
    """One rank, rounds inline (engine "stream" on CPU runs each round at its launch): every time the
    correction uses θ̃ (an estimate's correction, a commit's measurement), θ̃ must be the parameters the model
    held when that first half's backward ran. Returns the uses: (round kind, that equality)."""
    import acco.secant as secant

    model = workloads.make_model("mlp", torch.float64)

    def build(model):
        return AccoOptimizer(workloads.acco_params("adamw", model), engine="stream", correction="secant", batch_rule_applied=True)

    opt = build(model)
    held, uses, now = {}, [], {"call": None, "estimate_call": None}
    correct_estimate, dots = secant.SecantCorrection.correct_estimate, secant.SecantCorrection.dots

    def same(point, call):
        return torch.equal(point.sort().values, held[call].sort().values)  # one rank: the shard is the whole model

    def probed_estimate(self, grad, at_committed, written):
        correct_estimate(self, grad, at_committed, written)
        now["estimate_call"] = now["call"]
        if self.carried_valid and now["call"] is not None:  # (finish()'s rounds average no call)
            uses.append(("estimate", same(self.point, now["call"])))

    def probed_dots(self, first_sum, second_sum, at_committed, written):
        out = dots(self, first_sum, second_sum, at_committed, written)
        if self.carried_valid and self.point is not None and now["call"] is not None:
            uses.append(("commit", same(self.point, now["estimate_call"])))
        return out

    monkeypatch.setattr(secant.SecantCorrection, "correct_estimate", probed_estimate)
    monkeypatch.setattr(secant.SecantCorrection, "dots", probed_dots)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if scenario.startswith("overflow") else None
    for call in range(14):
        if scenario == "written" and call == 7:  # before a commit call: that round adopts them
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3)
        if scenario == "adopted" and call == 6:
            with torch.no_grad():
                for p in model.parameters():
                    p.data.add_(0.3)
            opt.adopt_model_parameters()
        if scenario == "reloaded" and call == 7:  # an estimate in flight, saved without the correction's state
            saved, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            del saved["acco"]["secant"]
            opt.close()
            model = workloads.make_model("mlp", torch.float64)
            opt = build(model)
            model.load_state_dict(weights)
            opt.load_state_dict(saved)
        held[call] = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        now["call"] = call
        loss = workloads.loss_fn(model, *workloads.batch(0, call))
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if call == {"overflow-estimate": 6, "overflow-commit": 7}[scenario]:
                with torch.no_grad():
                    next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        now["call"] = None
        opt.zero_grad()
    opt.finish()
    opt.close()
    return uses


@pytest.mark.parametrize("scenario", ["plain", "overflow-estimate", "overflow-commit", "written", "adopted", "reloaded"])
def test_the_error_is_measured_from_where_the_first_half_was_computed(monkeypatch, scenario):
    """Skipped calls (a GradScaler overflow installs the round in flight), weights written or adopted, a load
    without the correction's state: the model then holds other parameters than the last estimate's output,
    and a correction against that output would subtract κ times an error that does not exist."""
    uses = _probe(monkeypatch, scenario)
    assert sum(kind == "estimate" for kind, _ in uses) >= 3 and sum(kind == "commit" for kind, _ in uses) >= 3, uses
    assert all(ok for _, ok in uses), uses


def _masked(rank, world_size, engine, correction):
    model = workloads.Branches()
    unused = [p.detach().clone() for p in model.unused.parameters()]
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2, engine=engine, max_grad_norm=0.5, correction=correction,
                        batch_rule_applied=True, timeout=60)
    for call in range(12):
        x, _ = workloads.batch(rank, call)
        model(x[:, :4], use_branch=call % 2 == 1).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    opt.close()
    return [p.detach().clone() for p in model.parameters()], unused, [p.detach().clone() for p in model.unused.parameters()]


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_parameters_without_gradients_are_left_alone(run_distributed, engine):
    """A parameter no rank gave a gradient is not updated (torch skips ``p.grad is None``) although the correction
    writes into its gradient slot; halves over different parameters are not corrected: the run is the plain one."""
    for (final, before, after), (plain, _, _) in zip(run_distributed(2, _masked, engine, "secant", timeout=120),
                                                    run_distributed(2, _masked, engine, "none", timeout=120)):
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.isfinite(p).all() for p in final)
        assert all(torch.equal(a, b) for a, b in zip(final, plain))
