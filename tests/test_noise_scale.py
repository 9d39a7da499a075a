"""Tests of ``acco.noise_scale``: the gradient noise scale from an update's two halves (issue 22 §3).

What must hold: the estimates of tr(Σ) and |G|² are unbiased for any counts n₁, n₂ ≥ 1, equal or
not (a biased one would put B_simple off by a factor that depends on the split, which no user could
see). Two independent checks:

* exactly, with no statistical tolerance: micro-batch gradients drawn with replacement from a small
  finite population (whose mean G and covariance Σ are known exactly), and the expectation taken by
  enumerating every possible draw (hypothesis picks the population and the counts);
* by Monte Carlo with Gaussian per-sample gradients g = G + L·z of known Σ = L·Lᵀ, averaged into
  micro-batches and halves as acco does, on fixed seeds, to 6 standard errors of the mean (the seeds
  are fixed, so the test cannot flake; the bound is there so that a change of seed would not either).

Then the per-shard sum that the real round would all-reduce, the moving average, and the errors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import acco.noise_scale as ns
from acco.noise_scale import (
    NoiseScale,
    NoiseScaleEMA,
    b_simple,
    estimate_from_halves,
    estimate_from_sums,
    shard_difference_square,
)


def _population_moments(population: torch.Tensor) -> tuple[float, float]:
    """(tr Σ, |G|²) of a uniform draw from the rows of ``population`` (float64)."""
    mean = population.mean(0)
    return float((population - mean).square().sum(1).mean()), float(mean.square().sum())


# ---------------------------------------------------------------------------------------
# unbiasedness, exactly
# ---------------------------------------------------------------------------------------


@st.composite
def populations_and_counts(draw):
    n1, n2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    largest = max(s for s in (2, 3, 4) if s ** (n1 + n2) <= 729)  # keep the enumeration small
    size = draw(st.integers(2, largest))
    dim = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(-5, 5), min_size=size * dim, max_size=size * dim))
    offset = draw(st.integers(-3, 3))  # a mean far from zero must not matter
    population = torch.tensor(values, dtype=torch.float64).reshape(size, dim) + offset
    return population, n1, n2


@settings(max_examples=40, deadline=None)
@given(populations_and_counts())
def test_estimates_are_unbiased_exactly_over_every_possible_draw(case):
    """E[tr(Σ)^] = tr(Σ) and E[|G|²^] = |G|², the expectation over all size^(n₁+n₂) equally likely
    draws, for equal and unequal halves down to one micro-batch each."""
    population, n1, n2 = case
    trace, square = _population_moments(population)
    estimates = []
    for draw in itertools.product(range(len(population)), repeat=n1 + n2):
        g1 = population[list(draw[:n1])].mean(0)
        g2 = population[list(draw[n1:])].mean(0)
        estimates.append(estimate_from_halves(g1, g2, n1, n2))
    mean_trace = math.fsum(e.trace_sigma for e in estimates) / len(estimates)
    mean_square = math.fsum(e.grad_square for e in estimates) / len(estimates)
    scale = 1.0 + trace + square
    assert mean_trace == pytest.approx(trace, abs=1e-9 * scale)
    assert mean_square == pytest.approx(square, abs=1e-9 * scale)


# ---------------------------------------------------------------------------------------
# unbiasedness, by Monte Carlo on Gaussian per-sample gradients with a known covariance
# ---------------------------------------------------------------------------------------


def _gaussian_halves(seed: int, dim: int, n1: int, n2: int, per_micro: int, repeats: int):
    """``repeats`` independent updates: per-sample gradients G + L·z, averaged into micro-batches of
    ``per_micro`` samples, then into the two halves. Returns (G, Σ of one micro-batch, ḡ₁, ḡ₂)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.5
    L = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    L[:, : dim // 2] *= 3.0  # an anisotropic covariance
    sigma_sample = L @ L.T
    samples = torch.randn(repeats, n1 + n2, per_micro, dim, generator=gen, dtype=torch.float64) @ L.T + G
    micro = samples.mean(2)  # each micro-batch's gradient is its samples' mean, as a loss's mean is
    return G, sigma_sample / per_micro, micro[:, :n1].mean(1), micro[:, n1:].mean(1)


@pytest.mark.parametrize("n1,n2", [(1, 1), (4, 4), (1, 5), (6, 2), (3, 7)])
def test_estimates_are_unbiased_on_gaussian_gradients_with_known_covariance(n1, n2):
    repeats, dim, per_micro = 4000, 12, 3
    G, sigma, g1, g2 = _gaussian_halves(1000 * n1 + n2, dim, n1, n2, per_micro, repeats)
    out = [estimate_from_halves(a, b, n1, n2) for a, b in zip(g1, g2)]
    traces = torch.tensor([e.trace_sigma for e in out], dtype=torch.float64)
    squares = torch.tensor([e.grad_square for e in out], dtype=torch.float64)
    true_trace, true_square = float(torch.trace(sigma)), float(G.square().sum())
    for values, truth in ((traces, true_trace), (squares, true_square)):
        standard_error = float(values.std()) / math.sqrt(repeats)
        assert abs(float(values.mean()) - truth) < 6 * standard_error, (float(values.mean()), truth, standard_error)
    # The documented spread of one update's tr(Σ): variance 2·tr(Σ²) for Gaussian noise, whatever
    # the counts (the relative standard error of a sample variance over 4000 draws is ~2%).
    assert float(traces.var()) == pytest.approx(2 * float(torch.trace(sigma @ sigma)), rel=0.12)
    # In samples (a micro-batch of per_micro samples): tr(Σ_sample) = per_micro·tr(Σ_micro).
    scaled = out[0].per_sample(per_micro)
    assert scaled.trace_sigma == pytest.approx(per_micro * out[0].trace_sigma)
    assert scaled.grad_square == out[0].grad_square


def test_the_ratio_of_averages_finds_b_simple_where_single_updates_cannot():
    """Below the noise scale single updates' |G|² are often ≤ 0 (B_simple NaN), and the mean of
    the defined ratios is biased; the ratio of the moving averages lands on tr(Σ)/|G|²."""
    n1 = n2 = 2
    G, sigma, g1, g2 = _gaussian_halves(7, 16, n1, n2, 1, 4000)
    truth = float(torch.trace(sigma)) / float(G.square().sum())
    assert truth > 4 * (n1 + n2)  # the batch is well below the noise scale
    ema = NoiseScaleEMA(beta=0.999)
    singles = []
    for a, b in zip(g1, g2):
        estimate = estimate_from_halves(a, b, n1, n2)
        singles.append(estimate.b_simple)
        value = ema.update(estimate)
    assert value is not None and value.b_simple == pytest.approx(truth, rel=0.2)
    undefined = sum(math.isnan(x) for x in singles)
    assert undefined > len(singles) // 10
    defined = [x for x in singles if not math.isnan(x)]
    assert abs(sum(defined) / len(defined) - truth) > 0.2 * truth  # what the ratio of averages avoids


# ---------------------------------------------------------------------------------------
# the formulas' special cases
# ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_equal_halves_give_the_inner_product_and_half_the_difference(m, seed):
    """n₁ = n₂ = m: |G|²^ = ḡ₁·ḡ₂ and tr(Σ)^ = (m/2)·|ḡ₁ − ḡ₂|² (McCandlish's two-batch formula with
    B_small = m, B_big = 2m)."""
    gen = torch.Generator().manual_seed(seed)
    g1, g2 = torch.randn(2, 9, generator=gen, dtype=torch.float64)
    out = estimate_from_halves(g1, g2, m, m)
    assert out.grad_square == pytest.approx(float(g1 @ g2), abs=1e-12)
    assert out.trace_sigma == pytest.approx(m / 2 * float((g1 - g2).square().sum()), rel=1e-12)
    small = (float(g1.square().sum()) + float(g2.square().sum())) / 2
    big = float(((g1 + g2) / 2).square().sum())
    assert out.trace_sigma == pytest.approx((small - big) / (1 / m - 1 / (2 * m)), rel=1e-9, abs=1e-12)
    assert out.grad_square == pytest.approx((2 * m * big - m * small) / (2 * m - m), rel=1e-9, abs=1e-12)


def test_identical_halves_mean_no_noise():
    g = torch.tensor([3.0, 4.0])
    out = estimate_from_halves(g, g, 2, 5)
    assert out.trace_sigma == 0 and out.grad_square == pytest.approx(25.0) and out.b_simple == 0
    assert out.resolved and (out.first_count, out.second_count) == (2.0, 5.0)


def test_b_simple_is_nan_where_the_gradient_estimate_is_not_positive():
    opposite = estimate_from_halves(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), 1, 1)
    assert opposite.grad_square == pytest.approx(-1.0) and opposite.trace_sigma == pytest.approx(2.0)
    assert math.isnan(opposite.b_simple) and not opposite.resolved
    assert math.isnan(b_simple(1.0, 0.0)) and math.isnan(b_simple(math.inf, 1.0)) and math.isnan(b_simple(1.0, math.nan))
    assert b_simple(6.0, 2.0) == 3.0
    assert all(math.isnan(x) for x in (estimate_from_sums(math.inf, 1.0, 1, 1).trace_sigma, estimate_from_sums(1.0, math.inf, 1, 1).grad_square))
    nan = estimate_from_halves(torch.tensor([math.nan]), torch.tensor([0.0]), 1, 1)
    assert math.isnan(nan.trace_sigma) and math.isnan(nan.b_simple)


def test_sums_and_halves_agree_and_fractional_counts_are_allowed():
    g1, g2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 2.5, 0.0])
    pooled = (2.5 * g1 + 1.5 * g2) / 4
    a = estimate_from_halves(g1, g2, 2.5, 1.5)
    b = estimate_from_sums(float((g1 - g2).square().sum()), float(pooled.square().sum()), 2.5, 1.5)
    assert a.trace_sigma == pytest.approx(b.trace_sigma) and a.grad_square == pytest.approx(b.grad_square)


# ---------------------------------------------------------------------------------------
# what each rank computes on its shard
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 5), st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]), st.booleans())
def test_shard_sums_add_up_to_the_whole_difference(n1, n2, cuts, seed, dtype, tensor_counts):
    """Σ over shards of ``shard_difference_square`` on the two halves' reduced *sums* = |ḡ₁ − ḡ₂|²,
    for any split into shards (empty ones included), fp32 or fp64 shards, counts on the host or as
    device-style 0-dim tensors; pieces smaller than a shard exercise the piecewise sum."""
    gen = torch.Generator().manual_seed(seed)
    numel = 40
    g1, g2 = torch.randn(2, numel, generator=gen, dtype=torch.float64)
    s1, s2 = (g1 * n1).to(dtype), (g2 * n2).to(dtype)
    bounds = [0, *sorted(cuts), numel]
    c1, c2 = (torch.tensor(float(n1)), torch.tensor(float(n2))) if tensor_counts else (n1, n2)
    saved, ns._PIECE = ns._PIECE, 7
    try:
        parts = [shard_difference_square(s1[a:b], s2[a:b], c1, c2) for a, b in zip(bounds, bounds[1:])]
    finally:
        ns._PIECE = saved
    assert all(p.dtype == torch.float64 and p.dim() == 0 for p in parts)
    whole = (s1.double() / n1 - s2.double() / n2).square().sum()
    # the difference is taken in the shards' dtype, its squares summed in float64
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6 if dtype == torch.float32 else 1e-12)
    assert float(whole) == pytest.approx(float((g1 - g2).square().sum()), rel=1e-5 if dtype == torch.float32 else 1e-12)


def test_the_shard_sum_writes_neither_input_and_bounds_its_temporaries():
    s1, s2 = torch.randn(100), torch.randn(100)
    before = (s1.clone(), s2.clone())
    shard_difference_square(s1, s2, torch.tensor(3.0), 5)
    assert torch.equal(s1, before[0]) and torch.equal(s2, before[1])
    assert ns.difference_transient_bytes(0) == 16
    assert ns.difference_transient_bytes(100) == 100 * 4 + 32
    assert ns.difference_transient_bytes(10 * ns._PIECE, torch.float64) == ns._PIECE * 8 + 16 * 11
    from acco.round import norm_transient_bytes

    for numel in (0, 1, 1000, 3 * ns._PIECE + 5):
        for dtype in (torch.float32, torch.float64):
            assert ns.difference_transient_bytes(numel, dtype) <= norm_transient_bytes(numel, on_host=False)
    with pytest.raises(ValueError, match="numel"):
        ns.difference_transient_bytes(-1)


def test_a_shard_of_an_empty_half_contributes_its_other_half_only():
    """A count of 0 (a round that had nothing in one half) is treated as 1 on the device, never as a
    division by zero; the host then refuses the counts (``estimate_from_sums``)."""
    s = torch.tensor([2.0, 2.0])
    assert float(shard_difference_square(s, torch.zeros(2), 2, 0)) == pytest.approx(2.0)
    assert float(shard_difference_square(s, torch.zeros(2), torch.tensor(2.0), torch.tensor(0.0))) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------
# the moving average
# ---------------------------------------------------------------------------------------


def _estimate(trace: float, square: float) -> NoiseScale:
    return NoiseScale(trace, square, b_simple(trace, square), 2.0, 2.0)


def test_moving_average_is_bias_corrected_and_a_ratio_of_averages():
    ema = NoiseScaleEMA(beta=0.5)
    assert ema.value is None and ema.update(None) is None
    first = ema.update(_estimate(10.0, 2.0))
    assert first is not None and (first.trace_sigma, first.grad_square, first.b_simple) == pytest.approx((10.0, 2.0, 5.0))
    second = ema.update(_estimate(20.0, -1.0))  # a negative |G|² is averaged, not dropped
    # weights: 0.25 and 0.5 over a total of 0.75
    assert second is not None
    assert second.trace_sigma == pytest.approx((0.25 * 10 + 0.5 * 20) / 0.75)
    assert second.grad_square == pytest.approx((0.25 * 2 - 0.5 * 1) / 0.75)
    assert math.isnan(second.b_simple)  # the average |G|² is 0: unresolved
    third = ema.update(_estimate(12.0, 4.0))
    assert third is not None and third.b_simple == pytest.approx(third.trace_sigma / third.grad_square)


def test_moving_average_skips_missing_and_non_finite_estimates():
    ema = NoiseScaleEMA(beta=0.9)
    ema.update(_estimate(8.0, 2.0))
    before = ema.value
    assert ema.update(None) == before
    assert ema.update(NoiseScale(math.nan, math.nan, math.nan, 1.0, 1.0)) == before
    assert ema.update(_estimate(math.inf, 1.0)) == before


def test_a_constant_estimate_is_its_own_average():
    ema = NoiseScaleEMA(beta=0.95)
    for _ in range(50):
        value = ema.update(_estimate(6.0, 3.0))
    assert value is not None and value.b_simple == pytest.approx(2.0) and value.trace_sigma == pytest.approx(6.0)


def test_moving_average_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    stream = [_estimate(float(a), float(b)) for a, b in torch.rand(20, 2, generator=gen, dtype=torch.float64)]
    whole = NoiseScaleEMA(beta=0.8)
    for e in stream:
        whole.update(e)
    first, second = NoiseScaleEMA(beta=0.8), NoiseScaleEMA()
    for e in stream[:9]:
        first.update(e)
    second.load_state_dict(first.state_dict())
    for e in stream[9:]:
        second.update(e)
    assert second.value == whole.value and second.beta == 0.8
    fresh = NoiseScaleEMA()
    fresh.load_state_dict(NoiseScaleEMA(beta=0.3).state_dict())
    assert fresh.value is None and fresh.beta == 0.3


@pytest.mark.parametrize(
    "change",
    [{"trace": math.nan}, {"trace": -1.0}, {"square": math.inf}, {"weight": -3.0}, {"weight": 1.5}, {"beta": 1.0},
     {"trace": "0.5"}, {"weight": True}, {"first_count": 0.0}, {"first_count": math.nan}],
)
def test_a_state_no_average_can_reach_is_refused_and_changes_nothing(change):
    trained = NoiseScaleEMA()
    trained.update(_estimate(2.0, 1.0))
    target = NoiseScaleEMA()
    target.update(_estimate(5.0, 3.0))
    before = target.state_dict()
    with pytest.raises((ValueError, TypeError)):
        target.load_state_dict({**trained.state_dict(), **change})
    assert target.state_dict() == before
    empty = NoiseScaleEMA().state_dict()
    with pytest.raises(ValueError):
        NoiseScaleEMA().load_state_dict({**empty, "trace": 1.0})  # no estimate yet, yet a sum


# ---------------------------------------------------------------------------------------
# invalid input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 0.5, -1, math.nan, math.inf])
def test_counts_below_one_are_refused(count):
    g = torch.zeros(3)
    with pytest.raises(ValueError, match="first_count must be a finite count >= 1"):
        estimate_from_halves(g, g, count, 2)
    with pytest.raises(ValueError, match="second_count must be a finite count >= 1"):
        estimate_from_sums(1.0, 1.0, 2, count)


@pytest.mark.parametrize("count", [True, "2", None, torch.tensor(2.0)])
def test_counts_must_be_numbers(count):
    with pytest.raises(TypeError, match="first_count must be a number of micro-batches"):
        estimate_from_sums(1.0, 1.0, count, 2)


def test_other_invalid_input_is_refused():
    with pytest.raises(ValueError, match="difference_square is a sum of squares"):
        estimate_from_sums(-1.0, 1.0, 1, 1)
    with pytest.raises(ValueError, match="pooled_square is a sum of squares"):
        estimate_from_sums(1.0, math.nan, 1, 1)
    with pytest.raises(TypeError, match="pooled_square must be a float"):
        estimate_from_sums(1.0, torch.tensor(1.0), 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in shape"):
        estimate_from_halves(torch.zeros(3), torch.zeros(4), 1, 1)
    with pytest.raises(ValueError, match="differ in shape"):
        shard_difference_square(torch.zeros(3), torch.zeros(4), 1, 1)
    for beta in (1.0, -0.1, math.nan, True):
        with pytest.raises(ValueError, match="beta must be"):
            NoiseScaleEMA(beta)
    for k in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="samples_per_count"):
            _estimate(1.0, 1.0).per_sample(k)
