"""The linear model behind issue 14's explanation, held to closed forms derived by hand.

Heavy-ball momentum m' = βm + (1 − β)g, θ' = θ − m' on curvature κ is stable for
κ < 2(1 + β)/(1 − β). With the paper's estimate the estimate's error follows
e' = −κ(1 − β)/2 · e + noise, unstable from κ = 2/(1 − β).
"""

import math

import pytest

from benchmarks.estimate_stability import noise_loss, spectral_radius, stability_threshold


@pytest.mark.parametrize("beta", [0.8, 0.9, 0.95])
def test_synchronous_momentum_threshold_is_the_textbook_one(beta):
    assert stability_threshold("sync", beta) == pytest.approx(2 * (1 + beta) / (1 - beta), rel=1e-3)


@pytest.mark.parametrize("beta", [0.8, 0.9, 0.95])
def test_the_plain_estimate_halves_it(beta):
    assert stability_threshold("plain", beta) == pytest.approx(2 / (1 - beta), rel=1e-3)


def test_the_momentum_blend_is_less_stable_than_plain_and_carrying_the_offset_more():
    plain = stability_threshold("plain")
    assert stability_threshold("momentum") < plain
    assert plain < stability_threshold("carry:0.5") < stability_threshold("carry:0.9") + 1e-6


def test_at_low_curvature_every_rule_costs_almost_nothing_and_sync_is_the_floor():
    for rule in ("plain", "carry:0.5"):
        assert noise_loss(1.0, rule) == pytest.approx(noise_loss(1.0, "sync"), rel=0.05)
        assert noise_loss(10.0, rule) > noise_loss(10.0, "sync")
    assert math.isinf(noise_loss(25.0, "plain"))
    assert spectral_radius(25.0, "sync") < 1.0
