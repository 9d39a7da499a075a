"""``correction="secant"`` (issue 22) held to the single-process reference of its equations
(``tests/reference.py``, written from the definition: κ = max(0, eᵀ(ḡ₁ − ḡ₂)/|e|²) measured by each commit,
ḡ₁ − κ·e in the commit and, with the last commit's κ, in the next estimate) at worlds 1–3 on both
engines, with and without clipping; exact resume from per-rank checkpoints; clear errors."""

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
    model = workloads.make_model(workloads.model_kind_for(spec), torch.float64)
    opt = AccoOptimizer(workloads.acco_params(spec, model), engine=engine, max_grad_norm=max_grad_norm, correction=correction,
                        nonfinite=nonfinite)
    held = []
    for call in range(num_calls):
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


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("engine,max_grad_norm", [("thread", None), ("stream", 0.05), ("thread", 0.05)])
def test_secant_matches_the_reference(run_distributed, world_size, engine, max_grad_norm):
    results = run_distributed(world_size, _train, NUM_CALLS, engine, max_grad_norm, timeout=120)
    assert all(info[4] == "secant" for _, _, info in results)
    assert_matches_reference(results, "acco", "adamw", world_size, NUM_CALLS, max_grad_norm=max_grad_norm, correction="secant")
