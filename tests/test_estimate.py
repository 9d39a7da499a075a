"""``estimate='momentum'``: estimate rounds step on (ḡ₁ + m̂) / 2 instead of ḡ₁. Held to the
single-process reference of that equation (``tests/reference.py``) at worlds 1–3, resumed bit for bit,
and refused where it has no meaning."""

from __future__ import annotations

import pytest
import torch

import workloads
from acco import AccoOptimizer
from test_checkpoint import resume_run
from test_equivalence import assert_matches_reference, train_blocking


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("spec,partition", [("adamw", "flat"), ("adamw-unfused", "param"), ("nadam", "flat")])
def test_momentum_estimate_matches_its_reference(run_distributed, world_size, spec, partition):
    num_calls = 7
    results = run_distributed(world_size, train_blocking, "acco", spec, num_calls, partition, estimate="momentum", max_grad_norm=0.5, timeout=120)
    assert_matches_reference(results, "acco", spec, world_size, num_calls, estimate_kind="momentum", max_grad_norm=0.5)


def test_momentum_estimate_changes_the_estimates_and_only_through_them(run_distributed):
    """The option changes estimates only: the model holds θ̃₁ (round 0: no first moment yet, so the
    same) before call 2 and θ₁ before call 3 in both runs; before call 4 it holds round 2's
    estimate θ̃₂, the first one blended with a first moment, which must differ."""
    plain = run_distributed(2, train_blocking, "acco", "adamw", 7, timeout=120)
    blended = run_distributed(2, train_blocking, "acco", "adamw", 7, estimate="momentum", timeout=120)
    held_plain, held_blended = plain[0][0], blended[0][0]
    for call in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(held_plain[call], held_blended[call])), call
    assert not all(torch.equal(a, b) for a, b in zip(held_plain[4], held_blended[4]))


def test_momentum_estimate_resumes_bit_for_bit(run_distributed):
    for differing, _, count in run_distributed(2, resume_run, "adamw", "acco", "flat", 9, 5, estimate="momentum", timeout=120):
        assert differing == [], f"params differ from the uninterrupted run after calls {differing} of {count}"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"estimate": "bogus"}, "estimate must be one of"),
        ({"estimate": "momentum", "mode": "sync"}, "only mode='acco'"),
        ({"estimate": "momentum", "optimizer": "sgd"}, "has none"),
    ],
)
def test_momentum_estimate_is_refused_where_it_has_no_meaning(kwargs, fragment):
    model = workloads.make_model()
    spec = kwargs.pop("optimizer", "adamw")
    with pytest.raises(ValueError, match=fragment):
        AccoOptimizer(workloads.make_optimizer(spec, model), **kwargs)
