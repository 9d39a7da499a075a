"""The agreement vector of a round, without process groups: the sum of every rank's encoding must
decode to what the ranks reported (checked against plain Python over the reports)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from acco.agreement import AgreementCodec, HyperparameterCodec, LocalReport, Problem


@st.composite
def reports(draw):
    world = draw(st.integers(1, 5))
    params = draw(st.integers(1, 6))
    hp = draw(st.integers(0, 4))
    out = []
    for _ in range(world):
        problem = draw(st.sampled_from(list(Problem)))
        out.append(
            LocalReport(
                count=draw(st.integers(0, 7)),
                finishing=draw(st.booleans()),
                has_gradient=tuple(draw(st.lists(st.booleans(), min_size=params, max_size=params))),
                written=draw(st.booleans()),
                problem=problem,
                problem_param=draw(st.integers(0, 50)) if problem else -1,
                hyperparameters=tuple(draw(st.lists(st.floats(-10, 10, allow_nan=False), min_size=hp, max_size=hp))),
            )
        )
    return world, params, hp, out


@settings(max_examples=200, deadline=None)
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
    differ = any(not math.isclose(r.hyperparameters[k], ranks[0].hyperparameters[k], rel_tol=1e-12, abs_tol=1e-12) for r in ranks for k in range(hp))
    if not differ:
        assert not agreed.hyperparameters_differ


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
