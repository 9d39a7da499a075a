"""The agreement vector of a round, without process groups: the sum of every rank's encoding must
decode to what the ranks reported (checked against plain Python over the reports)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acco.agreement import AgreementCodec, HyperparameterCodec, LocalReport, Problem


@st.composite
def reports(draw):
    """Every rank's report; each rank's hyper-parameters are rank 0's, or differ from them by a visible
    amount (sometimes two ranks in opposite directions, so that the sums cancel)."""
    world = draw(st.integers(1, 5))
    params = draw(st.integers(1, 6))
    hp = draw(st.integers(0, 4))
    base = tuple(draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=hp, max_size=hp)))
    shifts = [0.0] * world
    if world >= 3 and hp and draw(st.booleans()):  # two ranks off in opposite directions: the sum alone cancels
        shift = draw(st.floats(1e-4, 5))
        shifts[1], shifts[2] = shift, -shift
    for rank in range(1, world):
        if shifts[rank] == 0.0 and hp and draw(st.booleans()):
            shifts[rank] = draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(1e-6, 5))
    which = draw(st.integers(0, max(hp - 1, 0)))
    out = []
    for rank in range(world):
        problem = draw(st.sampled_from(list(Problem)))
        values = tuple(v + shifts[rank] if k == which else v for k, v in enumerate(base))
        out.append(
            LocalReport(
                count=draw(st.integers(0, 7)),
                finishing=draw(st.booleans()),
                has_gradient=tuple(draw(st.lists(st.booleans(), min_size=params, max_size=params))),
                written=draw(st.booleans()),
                problem=problem,
                problem_param=draw(st.integers(0, 50)) if problem else -1,
                hyperparameters=values,
            )
        )
    return world, params, hp, out


@settings(max_examples=300, deadline=None)
@given(reports())
def test_the_summed_vector_decodes_to_what_the_ranks_reported(case):
    world, params, hp, ranks = case
    codec = AgreementCodec(world, params, hp)
    summed = [sum(column) for column in zip(*(codec.encode(report, rank) for rank, report in enumerate(ranks)))]
    agreed = codec.decode(summed)
    assert agreed.global_count == sum(r.count for r in ranks)
    assert agreed.finishing_ranks == sum(r.finishing for r in ranks)
    anywhere = tuple(any(r.has_gradient[i] for r in ranks) for i in range(params))
    assert agreed.has_gradient == (None if all(anywhere) else anywhere)
    assert agreed.written_ranks == tuple(i for i, r in enumerate(ranks) if r.written)
    assert agreed.problems == tuple((i, r.problem, r.problem_param) for i, r in enumerate(ranks) if r.problem)
    assert agreed.hyperparameters == tuple(ranks[0].hyperparameters)
    differ = any(r.hyperparameters != ranks[0].hyperparameters for r in ranks)
    assert agreed.hyperparameters_differ == differ  # both ways: a difference is seen, and equal values are not one


@pytest.mark.parametrize("lr,relative", [(3e-4, 3e-2), (3e-5, 1e-2), (1e-6, 1e-4), (3.0, 1e-4)])
def test_two_ranks_off_in_opposite_directions_are_seen(lr, relative):
    """The case a sum cannot see: rank 1 at lr(1 + d), rank 2 at lr(1 - d), also for small rates."""
    codec = AgreementCodec(3, 1, 1)
    reports = [LocalReport(1, False, (True,), False, hyperparameters=(x,)) for x in (lr, lr * (1 + relative), lr * (1 - relative))]
    summed = [sum(column) for column in zip(*(codec.encode(r, rank) for rank, r in enumerate(reports)))]
    assert codec.decode(summed).hyperparameters_differ
    same = [LocalReport(1, False, (True,), False, hyperparameters=(lr,)) for _ in range(3)]
    summed = [sum(column) for column in zip(*(codec.encode(r, rank) for rank, r in enumerate(same)))]
    assert not codec.decode(summed).hyperparameters_differ


def test_hyperparameters_round_trip_with_their_types():
    built = [{"params": [], "lr": 0.1, "betas": (0.9, 0.95), "amsgrad": False, "foreach": None, "step": 3}, {"params": [], "lr": 0.2}]
    codec = HyperparameterCodec(built)
    later = [{"params": [], "lr": 0.05, "betas": (0.8, 0.9), "amsgrad": True, "foreach": None, "step": 4}, {"params": [], "lr": 0.3}]
    decoded = codec.decode(codec.encode(later), built)
    assert decoded == [{k: v for k, v in g.items()} for g in later]
    assert type(decoded[0]["amsgrad"]) is bool and type(decoded[0]["step"]) is int and type(decoded[0]["betas"]) is tuple


def test_settings_that_left_the_schema_stay_local():
    built = [{"params": [], "lr": 0.1, "betas": (0.9, 0.95)}]
    codec = HyperparameterCodec(built)
    local = [{"params": [], "lr": "not a number", "betas": (0.9, 0.95, 0.99)}]
    values = codec.encode(local)
    assert all(math.isnan(v) for v in values)
    assert codec.decode(values, local) == local
