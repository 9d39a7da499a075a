"""The gradient noise scale from the two halves of an ACCO update (issue 22, part 3).

Every ACCO update averages two halves of its batch: ḡ₁ over n₁ micro-batches (the estimate
round's gradients) and ḡ₂ over n₂ (the commit's own), and the commit steps on their pooled mean
ḡ = (n₁ḡ₁ + n₂ḡ₂)/n, n = n₁ + n₂ (docs/design.md §1). Two independent averages of the same
gradient distribution are exactly what McCandlish et al. 2018 ("An Empirical Model of Large-Batch
Training", Appendix A) need to estimate the true gradient's squared norm |G|² and the trace of the
per-micro-batch gradient covariance tr(Σ), and from them the critical batch size's proxy
B_simple = tr(Σ)/|G|². ACCO gets them for the price of one scalar per update: the round already
all-reduces |ḡ|² (the clipping norm), so only |ḡ₁ − ḡ₂|² has to ride along.

The maths (micro-batch gradients i.i.d. with mean G and covariance Σ; both halves are averages)::

    E ḡᵢ = G,   Cov ḡᵢ = Σ/nᵢ,   ḡ₁ and ḡ₂ independent
    D = |ḡ₁ − ḡ₂|²        E D = tr(Σ)·(1/n₁ + 1/n₂) = tr(Σ)·n/(n₁n₂)
    P = |ḡ|²              E P = |G|² + tr(Σ)/n                     (the paper's E|G_B|² = |G|² + tr(Σ)/B)

    tr(Σ)^ = D·n₁n₂/n                  unbiased
    |G|²^  = P − tr(Σ)^/n              unbiased (for n₁ = n₂ it is exactly ḡ₁·ḡ₂)
    B_simple = tr(Σ)^ / |G|²^          in micro-batches (the unit the counts count)

Why these and not the paper's two-batch formula applied to one half: with n₁ = n₂ they are the
same numbers (B_small = n/2, |G_small|² the mean of |ḡ₁|² and |ḡ₂|²). For n₁ ≠ n₂ (ACCO's counts
differ in non-blocking mode or with uneven data) the difference form uses both halves
symmetrically, its noise does not depend on G (D has no G·ξ term, so no GᵀΣG in its variance),
and it does not subtract two large nearly equal norms (|ḡ₁|² − |ḡ|²), which loses the noise to
rounding when |G|² ≫ tr(Σ)/n. For a Gaussian noise its variance is 2·tr(Σ²) whatever the counts:
one update's tr(Σ) has a relative standard deviation √(2/r), r = tr(Σ)²/tr(Σ²) the noise's
effective rank (measured 14–32% on the benchmark models, so r ≈ 20–100: gradient noise is far
from isotropic). The |G|² estimate is the noisy one: about 2·√tr(Σ²)/n in absolute terms when the
batch is below the noise scale (measured 46–58% of |G|²), so a single update's value may be ≤ 0. Hence the exponential moving average below, kept of |G|² and tr(Σ) separately: the
paper notes that the ratio of the averages is a better estimator than an average of ratios (an
average of unbiased numerators and denominators stays unbiased; a ratio of noisy numbers does not).

What B_simple is not: the paper's B_noise = tr(HΣ)/(GᵀHG) weighs the noise by the Hessian H,
which two gradient averages cannot see. B_simple is what the paper measured in practice (equal to
B_noise when H ∝ I) and what issue 22 calls the gradient noise scale.

Units. The counts are ACCO's (micro-batches: ``step()`` calls summed over ranks), so tr(Σ) is the
covariance of one micro-batch's gradient and B_simple is in micro-batches. A micro-batch of b
sequences (each a mean over its tokens) has a covariance tr(Σ_sequence)/b, so B_simple in
sequences is b times larger: ``NoiseScale.per_sample(b)``.

ACCO's caveat. The first half is computed at the estimate θ̃ₜ, the second at θₜ, so ḡ₁ − ḡ₂ also
holds the difference of the true gradients, d = G(θ̃ₜ) − G(θₜ) ≈ H·(θ̃ₜ − θₜ), and tr(Σ)^ is biased
up by n₁n₂/n·|d|² (and |G|²^ by (2n₁/n)·G·d + n₁(n₁ − n₂)/n²·|d|²). Measured in the simulator
(``benchmarks/noise_scale_check.py``, ``benchmarks/results/noise_scale_summary.md``): a median +0–2% on
tr(Σ) and +3–7% on |G|² at zero1's best rates; averaged over 40 updates B_simple lands within 20% of a
direct many-batch estimate at 6 of 8 windows (median 11%).

Nothing here touches a process group: ``shard_difference_square`` is what each rank computes on its
shard (a sum that adds over shards), ``estimate_from_sums`` turns the all-reduced sums into the
estimates, and ``estimate_from_halves`` does both in one process (the simulator, the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch

Number = Union[int, float]
Count = Union[int, float, torch.Tensor]

# The per-shard sum is taken piece by piece: one piece of the difference, in the shards' dtype, is
# the only temporary. 2**22 elements, as the round's norm (``acco.round._NORM_CHUNK``), whose own
# float64 piece (8 bytes an element) is at least as large, so the round's transient does not grow.
_PIECE = 1 << 22


@dataclass(frozen=True)
class NoiseScale:
    """One update's (or a moving average's) estimates; counts in micro-batches.

    ``trace_sigma``: tr(Σ), the covariance of one micro-batch's gradient; unbiased.
    ``grad_square``: |G|², the true gradient's squared norm; unbiased, so it may be ≤ 0 when the
    batch is well below the noise scale (the noise then hides the signal in this estimate).
    ``b_simple``: tr(Σ)/|G|² in micro-batches; NaN where ``grad_square`` ≤ 0 or either estimate is
    not finite (see ``b_simple``).
    ``first_count``, ``second_count``: n₁ and n₂ (for an average: the last update's).
    """

    trace_sigma: float
    grad_square: float
    b_simple: float
    first_count: float
    second_count: float

    @property
    def resolved(self) -> bool:
        """Whether B_simple is a number: |G|² was estimated above zero."""
        return not math.isnan(self.b_simple)

    def per_sample(self, samples_per_count: float) -> "NoiseScale":
        """The same estimates with a sample as the unit, a micro-batch being ``samples_per_count``
        samples (sequences, or tokens): tr(Σ) and B_simple scale by it, |G|² does not."""
        if not (samples_per_count > 0 and math.isfinite(samples_per_count)):
            raise ValueError(f"samples_per_count must be a positive finite number, got {samples_per_count!r}")
        k = float(samples_per_count)
        return NoiseScale(self.trace_sigma * k, self.grad_square, self.b_simple * k, self.first_count, self.second_count)


def b_simple(trace_sigma: float, grad_square: float) -> float:
    """tr(Σ)/|G|², or NaN where |G|² ≤ 0 or either input is not finite.

    Why NaN and not ±inf or a clipped |G|²: an estimate of |G|² ≤ 0 says that the noise hid the
    signal in this sample, not that B_simple is infinite or negative; a NaN cannot be mistaken for
    a batch size, is skipped by plots and means, and works unchanged if the value is ever computed
    on a device tensor. Clipping |G|² to a small positive number would bias any average of it:
    average ``grad_square`` and ``trace_sigma`` instead (``NoiseScaleEMA``) and take the ratio of
    the averages."""
    if not (math.isfinite(trace_sigma) and math.isfinite(grad_square)) or grad_square <= 0:
        return math.nan
    return trace_sigma / grad_square


def _check_count(name: str, value: Number) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of micro-batches (int or float), got {type(value).__name__}")
    if not math.isfinite(value) or value < 1:
        raise ValueError(
            f"{name} must be a finite count >= 1 (the half averaged that many micro-batches), got {value!r}: "
            "with no micro-batch in a half there is no second average to compare with"
        )
    return float(value)


def estimate_from_sums(difference_square: float, pooled_square: float, first_count: Number, second_count: Number) -> NoiseScale:
    """The unbiased estimates from the two global sums the round all-reduces.

    ``difference_square``: D = |ḡ₁ − ḡ₂|², the sum over shards of ``shard_difference_square``.
    ``pooled_square``: P = |ḡ|², ḡ = (n₁ḡ₁ + n₂ḡ₂)/(n₁ + n₂), the commit's averaged gradient before
    clipping (the round's existing norm²).
    ``first_count``, ``second_count``: n₁, n₂ ≥ 1, the micro-batches each half averaged.

    tr(Σ) = D·n₁n₂/n and |G|² = P − tr(Σ)/n (module docstring). Raises ``ValueError`` for a count
    below 1 and for a negative or NaN sum of squares (a caller's bug: sums of squares are ≥ 0);
    an infinite sum gives NaN estimates, as a non-finite gradient carries no information."""
    n1 = _check_count("first_count", first_count)
    n2 = _check_count("second_count", second_count)
    for name, value in (("difference_square", difference_square), ("pooled_square", pooled_square)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"{name} is a sum of squares and must be >= 0, got {value!r}")
    if math.isinf(difference_square) or math.isinf(pooled_square):
        return NoiseScale(math.nan, math.nan, math.nan, n1, n2)
    n = n1 + n2
    trace_sigma = float(difference_square) * (n1 * n2 / n)
    grad_square = float(pooled_square) - trace_sigma / n
    return NoiseScale(trace_sigma, grad_square, b_simple(trace_sigma, grad_square), n1, n2)


def _scale(count: Count) -> Union[float, torch.Tensor]:
    """1/count, with a count of zero giving 0 rather than inf (a half with nothing in it contributes
    nothing; ``estimate_from_sums`` refuses such counts on the host)."""
    if isinstance(count, torch.Tensor):
        return 1.0 / count.to(torch.float64).clamp(min=1.0)
    return 1.0 / max(float(count), 1.0)


def shard_difference_square(
    first_sum: torch.Tensor, second_sum: torch.Tensor, first_count: Count, second_count: Count, piece_elements: int = _PIECE
) -> torch.Tensor:
    """Σ (s₁/n₁ − s₂/n₂)² over this shard, as a float64 0-dim tensor on the shards' device.

    ``first_sum`` and ``second_sum`` are a rank's shard of the two halves' reduced gradient *sums*
    (what the round holds: the estimate's carried shard, and the commit's reduce-scattered shard
    before the carry is added); neither is written. The counts are the global ones: ints/floats on
    the host, or 0-dim tensors on the device (the stream engine never reads them back, and neither
    does this). Summed over shards (the round's existing all-reduce) it is D = |ḡ₁ − ḡ₂|².

    How: per piece, s₁ − (n₁/n₂)·s₂ in one kernel in the shards' dtype (at least fp32), its norm in
    that dtype, then the squares of the pieces' norms summed in float64 and scaled by 1/n₁². The
    only temporary is one piece of ``piece_elements`` (``difference_transient_bytes``); the round passes its
    own norm's piece size, so that this transient never exceeds the norm's. Not a float64 sum as the round's
    device-side norm is: that one must decide finiteness exactly, this one is a statistic whose
    inputs carry no more than their own precision, and on CPU the float64 copy costs several times
    the fp32 pass (an overflow gives inf, which ``estimate_from_sums`` turns into NaN estimates)."""
    if first_sum.shape != second_sum.shape:
        raise ValueError(f"the two halves' shards differ in shape: {tuple(first_sum.shape)} vs {tuple(second_sum.shape)}")
    dtype = torch.promote_types(torch.promote_types(first_sum.dtype, second_sum.dtype), torch.float32)
    a, b = first_sum.reshape(-1), second_sum.reshape(-1)
    s1, s2 = _scale(first_count), _scale(second_count)
    ratio = s2 / s1  # n₁/n₂ (the counts clamped to ≥ 1)
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.to(device=a.device, dtype=dtype)
    norms = []
    if piece_elements < 1:
        raise ValueError(f"piece_elements must be >= 1, got {piece_elements}")
    for start in range(0, a.numel(), piece_elements):
        x, y = a[start : start + piece_elements].to(dtype), b[start : start + piece_elements].to(dtype)
        piece = torch.addcmul(x, y, ratio, value=-1.0) if isinstance(ratio, torch.Tensor) else torch.sub(x, y, alpha=ratio)
        norms.append(torch.linalg.vector_norm(piece))
        del piece
    if not norms:
        return torch.zeros((), dtype=torch.float64, device=a.device)
    square = (norms[0] if len(norms) == 1 else torch.stack(norms)).to(torch.float64).square().sum()
    return square * (s1.to(device=a.device) if isinstance(s1, torch.Tensor) else s1) ** 2


def difference_transient_bytes(numel: int, dtype: torch.dtype = torch.float32) -> int:
    """The most ``shard_difference_square`` allocates at once on shards of ``numel`` elements of
    ``dtype``: one piece of the difference and a few scalars per piece. For fp32 or fp64 shards it
    never exceeds the round's own norm transient (``acco.round.norm_transient_bytes``)."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    size = torch.promote_types(dtype, torch.float32).itemsize
    pieces = -(-numel // _PIECE)
    return size * min(numel, _PIECE) + 16 * (pieces + 1)


def estimate_from_halves(first_mean: torch.Tensor, second_mean: torch.Tensor, first_count: Number, second_count: Number) -> NoiseScale:
    """One process holding both halves' averaged gradients (flattened or not, any float dtype):
    D and P in float64, then ``estimate_from_sums``. What the simulator and the tests use; a rank
    of the real optimizer holds only shards and uses ``shard_difference_square`` instead."""
    n1 = _check_count("first_count", first_count)
    n2 = _check_count("second_count", second_count)
    if first_mean.shape != second_mean.shape:
        raise ValueError(f"the two halves' gradients differ in shape: {tuple(first_mean.shape)} vs {tuple(second_mean.shape)}")
    g1, g2 = first_mean.reshape(-1).to(torch.float64), second_mean.reshape(-1).to(torch.float64)
    difference = float((g1 - g2).square().sum())
    pooled = float(((n1 * g1 + n2 * g2) / (n1 + n2)).square().sum())
    if math.isnan(difference) or math.isnan(pooled):
        return NoiseScale(math.nan, math.nan, math.nan, n1, n2)
    return estimate_from_sums(difference, pooled, n1, n2)


class NoiseScaleEMA:
    """Exponential moving averages of tr(Σ) and |G|², kept separately, and B_simple as their ratio.

    Why separately: each update's tr(Σ) and |G|² are unbiased, and so is any average of them, while
    B_simple of one update is a ratio of noisy numbers (biased, and undefined when |G|² ≤ 0). The
    paper found the ratio of averages the better estimator; it keeps every update's information,
    including the negative |G|² values that an average of ratios would have to drop (which would
    bias it). The averages are bias-corrected as Adam's moments are (they start from zero), so the
    first updates read as plain means; the correction cancels in the ratio.

    ``beta``: the averages' decay per update (0.95 ~ the last 20 updates). ``update(None)`` (a
    skipped update, or a round without two halves) leaves the averages as they are. Estimates whose
    values are not finite are skipped too: one NaN would poison the averages for good.
    """

    def __init__(self, beta: float = 0.95) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 <= beta < 1.0):
            raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._trace = 0.0
        self._square = 0.0
        self._weight = 0.0  # 1 − βᵏ after k estimates: the bias correction
        self._counts = (math.nan, math.nan)  # the last estimate's n₁, n₂

    def update(self, estimate: Optional[NoiseScale]) -> Optional[NoiseScale]:
        """Add one update's estimate; returns the averaged estimate (None before any)."""
        if estimate is not None and math.isfinite(estimate.trace_sigma) and math.isfinite(estimate.grad_square):
            b = self.beta
            self._trace = b * self._trace + (1 - b) * estimate.trace_sigma
            self._square = b * self._square + (1 - b) * estimate.grad_square
            self._weight = b * self._weight + (1 - b)
            self._counts = (estimate.first_count, estimate.second_count)
        return self.value

    @property
    def value(self) -> Optional[NoiseScale]:
        """The bias-corrected averages and their ratio, or None before the first finite estimate."""
        if self._weight == 0:
            return None
        trace, square = self._trace / self._weight, self._square / self._weight
        return NoiseScale(trace, square, b_simple(trace, square), *self._counts)

    def state_dict(self) -> dict[str, float]:
        """What a checkpoint needs to resume the averages exactly (plain floats)."""
        return {"beta": self.beta, "trace": self._trace, "square": self._square, "weight": self._weight,
                "first_count": self._counts[0], "second_count": self._counts[1]}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Resume from ``state_dict()``'s output; the averages continue bit for bit. A state no average
        can reach is refused (``ValueError``), before anything changes: one NaN would stay in the
        averages for good."""
        if not isinstance(state, Mapping):
            raise TypeError(f"the state must be a mapping, got {type(state).__name__}")
        values = {}
        for key in ("beta", "trace", "square", "weight", "first_count", "second_count"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{key} must be a number, got {type(value).__name__}")
            values[key] = float(value)
        beta, trace, square, weight = values["beta"], values["trace"], values["square"], values["weight"]
        counts = (values["first_count"], values["second_count"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (0.0 <= weight <= 1.0 and math.isfinite(trace) and trace >= 0 and math.isfinite(square)):
            raise ValueError(f"not a state of the averages: trace {trace!r} (finite, >= 0), square {square!r} (finite), weight {weight!r} (in [0, 1])")
        if weight == 0 and (trace != 0 or square != 0):
            raise ValueError("not a state of the averages: no estimate averaged (weight 0) but non-zero sums")
        if weight > 0 and not all(c >= 1 for c in counts):
            raise ValueError(f"the last estimate's counts must be >= 1, got {counts}")
        self.beta, self._trace, self._square, self._weight, self._counts = beta, trace, square, weight, counts
