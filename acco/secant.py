"""``correction="secant"`` (issue 22): a commit that tolerates the estimate's error.

The first half of update t is computed at θ̃ₜ, not θₜ: its mean gradient ḡ₁ carries H·eₜ with
eₜ = θ̃ₜ − θₜ, and that error lies along the loss's sharpest directions (docs/design.md §1). Each
shard knows eₜ exactly at the commit, and κ = eₜᵀ(ḡ₁ − ḡ₂)/|eₜ|² measures the curvature along it by
a secant (the halves' fresh noise is independent of eₜ, so it cancels in expectation). The commit
steps on ḡ₁ − κ·eₜ in place of ḡ₁ (κ clamped at 0), and the next estimate, which steps before its
own second half exists, corrects its ḡ₁ by the last commit's κ. That breaks the recursion through
which the estimate feeds its own error back into itself (``benchmarks/linear_stability.py``).

Cost: one shard-sized buffer (θ̃ on this shard), three numbers in the commit's existing norm
all-reduce (eᵀS₁, eᵀS₂, |e|²) and one carried scalar. The corrected gradient's norm, for clipping,
follows from those numbers and the existing norm: no second all-reduce.

``correction="secant-gated"`` shrinks each κ by its own signal-to-noise over updates, κ·min(1, m²/v),
with m and v running averages (factor ``GATE_BETA``) of the measured κ and of κ² (nothing more is
communicated). Where κ is a steady curvature the gate is near 1; where it is mostly the halves' noise
(a low learning rate) it shrinks the correction toward the paper's rounds.

Numbers are host floats where the round decides on the host, 0-dim device tensors where it decides
on the device (no read back).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .outcome import device_scalar

logger = logging.getLogger(__name__)

CORRECTIONS = ("none", "secant", "secant-gated")
GATE_BETA = 0.9  # the running averages of κ and κ² behind the gate (about ten updates)

# Elements per piece of the error eₜ = θ̃ₜ − θₜ, which is never materialised whole.
_PIECE = 1 << 22


def _pieces(numel: int) -> range:
    return range(0, numel, _PIECE)


def error_piece_bytes(numel: int, element_size: int) -> int:
    """The most the correction allocates at once within a round: one piece of e (and a few scalars)."""
    return min(numel, _PIECE) * element_size + 64


def error_dots(point: torch.Tensor, master: torch.Tensor, first_sum: torch.Tensor, second_sum: torch.Tensor) -> torch.Tensor:
    """This shard's ``[eᵀS₁, eᵀS₂, |e|²]`` (float64, on the shards' device), e = point − master,
    S₁ and S₂ the halves' reduced gradient sums; one piece of e at a time."""
    out = torch.zeros(3, dtype=torch.float64, device=master.device)
    for start in _pieces(master.numel()):
        end = start + _PIECE
        error = point[start:end] - master[start:end]
        out[0] += torch.dot(error, first_sum[start:end]).to(torch.float64)
        out[1] += torch.dot(error, second_sum[start:end]).to(torch.float64)
        out[2] += torch.dot(error, error).to(torch.float64)
        del error  # one piece alive at a time
    return out


def subtract_error(grad: torch.Tensor, point: torch.Tensor, master: torch.Tensor, coefficient: Any) -> None:
    """``grad -= coefficient · (point − master)`` piece by piece (``coefficient``: a number or a 0-dim
    tensor on the shards' device)."""
    for start in _pieces(master.numel()):
        end = start + _PIECE
        error = point[start:end] - master[start:end]
        if isinstance(coefficient, torch.Tensor):
            grad[start:end].addcmul_(error, coefficient.to(error.dtype), value=-1.0)
        else:
            grad[start:end].add_(error, alpha=-coefficient)
        del error  # one piece alive at a time


def commit_kappa(dots: Any, first_count: Any, second_count: Any, largest: float = math.inf) -> tuple[Any, Any, Any]:
    """``(κ, measured, raw)`` from the summed ``[eᵀS₁, eᵀS₂, |e|²]`` and the halves' global counts:
    raw = eᵀ(S₁/n₁ − S₂/n₂)/|e|² and κ = max(0, raw), measured where both halves averaged a micro-batch,
    e ≠ 0, raw² is finite and |raw| ≤ ``largest`` (the master dtype's largest number); else both 0 and nothing
    is corrected: a κ that large, from a denormal |e|² against finite dots, would make the corrected gradient
    non-finite after its finiteness check."""
    first_dot, second_dot, size = dots
    if isinstance(size, torch.Tensor):
        first_count, second_count = (device_scalar(c, size) for c in (first_count, second_count))
        measured = (first_count > 0) & (second_count > 0) & (size > 0)
        raw = (first_dot / first_count.clamp(min=1.0) - second_dot / second_count.clamp(min=1.0)) / torch.where(measured, size, 1.0)
        measured = measured & torch.isfinite(raw * raw) & (raw.abs() <= largest)
        raw = torch.where(measured, raw, 0.0)
        return raw.clamp(min=0.0), measured, raw
    if not (first_count > 0 and second_count > 0 and size > 0):
        return 0.0, False, 0.0
    raw = (first_dot / first_count - second_dot / second_count) / size
    if not math.isfinite(raw * raw) or abs(raw) > largest:
        return 0.0, False, 0.0
    return max(0.0, raw), True, raw


def gated_kappa(raw: Any, moments: tuple[Any, Any, Any], beta: float = GATE_BETA) -> tuple[Any, tuple[Any, Any, Any]]:
    """``correction="secant-gated"``: ``(max(0, raw)·min(1, m²/v), (m, v, seen))`` with m and v the running
    averages of the measured κ and κ², this one included (the first measured κ starts them). The gate is 0
    while m ≤ 0: a curvature that is not steadily positive is not corrected. A κ whose square is not finite
    (|κ| above ~1e154, no curvature) corrects nothing and leaves the averages as they were."""
    m, v, seen = moments
    if isinstance(raw, torch.Tensor):
        seen_t = device_scalar(seen, raw) > 0 if not isinstance(seen, torch.Tensor) else seen
        old_mean, old_square = device_scalar(m, raw), device_scalar(v, raw)
        mean = torch.where(seen_t, beta * old_mean + (1 - beta) * raw, raw)
        square = torch.where(seen_t, beta * old_square + (1 - beta) * raw * raw, raw * raw)
        finite = torch.isfinite(mean) & torch.isfinite(square)
        positive = finite & (mean > 0) & (square > 0)
        gate = torch.where(positive, (mean * mean / torch.where(positive, square, 1.0)).clamp(max=1.0), 0.0)
        kappa = torch.where(positive, raw.clamp(min=0.0) * gate, 0.0)
        return kappa, (torch.where(finite, mean, old_mean), torch.where(finite, square, old_square), finite | seen_t)
    mean, square = (beta * m + (1 - beta) * raw, beta * v + (1 - beta) * raw * raw) if seen else (raw, raw * raw)
    if not (math.isfinite(mean) and math.isfinite(square)):
        return 0.0, (m, v, seen)
    factor = min(1.0, mean * mean / square) if mean > 0 and square > 0 else 0.0
    return max(0.0, raw) * factor, (mean, square, True)


def corrected_square(square: Any, dots: Any, shift: Any, total: Any) -> Any:
    """|ḡ − shift·e|² from |ḡ|², the summed dots and ``shift`` = (n₁/n)·κ, with ḡ = (S₁ + S₂)/n:
    |ḡ|² − 2·shift·eᵀḡ + shift²·|e|² (clamped at 0 against rounding)."""
    first_dot, second_dot, size = dots
    mean_dot = (first_dot + second_dot) / total
    value = square - 2.0 * shift * mean_dot + shift * shift * size
    return value.clamp(min=0.0) if isinstance(value, torch.Tensor) else max(0.0, value)


class SecantCorrection:
    """The correction's state on one rank: θ̃ on this shard (``point``: where the first half in flight was
    computed, when it was computed at an estimate's output at all) and the last kept commit's κ.

    Round by round: an estimate whose calls computed their gradients at an estimate's output (the pipeline
    says so, alike on every rank: ``RoundInputs.gradients_at_committed``) corrects its ḡ₁ by κ·e and leaves θ̃
    alone (its commit still needs it); a commit measures κ on e, corrects, and then takes the estimate's
    output as the next θ̃ (the model holds it while the commit is in flight). Where the first half was
    computed at the committed parameters (after ``finish()``, a load, adopted or written weights, a skipped
    call) e = 0 and nothing is corrected."""

    def __init__(self, master: torch.Tensor, gated: bool = False) -> None:
        self.master = master
        self.gated = gated  # correction="secant-gated": κ shrunk by its signal-to-noise (``gated_kappa``)
        self.moments: tuple[Any, Any, Any] = (0.0, 0.0, False)  # the gate's running m, v and whether started
        self._measured_moments: Optional[tuple[Any, Any, Any]] = None  # the last commit's, until kept
        self.point: Optional[torch.Tensor] = None  # θ̃ on this shard (allocated by the first commit)
        self.carried_valid = False  # the carried estimate's first half was computed at ``point``
        self.kappa: Any = 0.0
        self.next_point: Optional[torch.Tensor] = None  # the last estimate's output on this shard (None: the master)

    def reset(self) -> None:
        """The model holds the committed parameters (after ``finish()``, adopted weights, a load): the
        correction starts afresh, κ = 0 included, so that a checkpoint taken after ``finish()``
        (consolidated, sharded) needs none of this state to resume exactly."""
        self.carried_valid = False
        self.next_point = None
        self.kappa = 0.0
        self.moments, self._measured_moments = (0.0, 0.0, False), None

    # ------------------------------------------------------------------ rounds
    def correct_estimate(self, grad: torch.Tensor, at_committed: bool, written: bool) -> None:
        """Estimate round, after averaging and before the norm: ḡ₁ − κ·e with the last commit's κ."""
        self.carried_valid = not at_committed and not written and self.point is not None
        if not self.carried_valid or self.point is None:
            return
        if isinstance(self.kappa, torch.Tensor) or self.kappa != 0.0:
            subtract_error(grad, self.point, self.master, self.kappa)

    def estimate_output(self, output: Optional[torch.Tensor]) -> None:
        """Where the estimate's output lives on this shard until its commit (the shadow's buffer), or
        None where the estimate gathered the master (it updated nothing)."""
        self.next_point = output

    def dots(self, first_sum: Optional[torch.Tensor], second_sum: torch.Tensor, at_committed: bool, written: bool) -> torch.Tensor:
        """Commit round, before the halves are added: this shard's ``[eᵀS₁, eᵀS₂, |e|²]``, zeros where there
        is no error to measure (the first half at the committed parameters, the commit's own half not at
        them, or weights adopted by this round, which also become the next θ̃)."""
        if written:
            self.next_point = None  # the model holds the adopted weights: the master before this commit's step
        if written or not at_committed:
            self.carried_valid = False
        if not self.carried_valid or self.point is None or first_sum is None:
            return torch.zeros(3, dtype=torch.float64, device=self.master.device)
        return error_dots(self.point, self.master, first_sum, second_sum)

    def correct_commit(self, grad: torch.Tensor, summed_dots: Any, square: Any, first_count: Any, second_count: Any, total: Any) -> tuple[Any, Any, Any]:
        """Commit round, after the norm all-reduce: ḡ − (n₁/n)·κ·e on this shard. Returns ``(the corrected
        gradient's norm², κ, measured)`` from the summed numbers alone (alike on every rank, whatever this
        shard holds); the caller keeps κ where the update is kept."""
        kappa, measured, raw = commit_kappa(summed_dots, first_count, second_count, torch.finfo(self.master.dtype).max)
        self._measured_moments = None
        if self.gated and (isinstance(measured, torch.Tensor) or measured):
            kappa, self._measured_moments = gated_kappa(raw, self.moments)
            if isinstance(measured, torch.Tensor):
                kappa = torch.where(measured, kappa, 0.0)
        point = self.point if self.carried_valid else None  # None: this shard's e is 0
        if isinstance(kappa, torch.Tensor):
            total_t = device_scalar(total, kappa).clamp(min=1.0)
            shift = kappa * device_scalar(first_count, kappa) / total_t
            if point is not None:
                subtract_error(grad, point, self.master, shift)
            return torch.where(measured, corrected_square(square, summed_dots, shift, total_t), square), kappa, measured
        if not measured:
            return square, 0.0, False
        shift = kappa * first_count / total
        if point is not None:
            subtract_error(grad, point, self.master, shift)
        return corrected_square(square, summed_dots, shift, total), kappa, True

    def keep_kappa(self, kappa: Any, kept: Any) -> None:
        """The carried κ (and the gate's averages) after a commit: its own where it measured one and its
        update was kept."""
        measured, self._measured_moments = self._measured_moments, None
        if isinstance(kept, torch.Tensor) or isinstance(self.kappa, torch.Tensor) or isinstance(kappa, torch.Tensor):
            like = self.master
            kept = kept.to(like.device) if isinstance(kept, torch.Tensor) else device_scalar(float(bool(kept)), like) > 0
            self.kappa = torch.where(kept, device_scalar(kappa, like), device_scalar(self.kappa, like))
            if measured is not None:
                m, v, seen = self.moments
                seen, started = ((x if isinstance(x, torch.Tensor) else device_scalar(float(x), like) > 0) for x in (seen, measured[2]))
                self.moments = (torch.where(kept, device_scalar(measured[0], like), device_scalar(m, like)),
                                torch.where(kept, device_scalar(measured[1], like), device_scalar(v, like)),
                                torch.where(kept, started, seen))
        elif kept:
            self.kappa = float(kappa)
            if measured is not None:
                self.moments = measured

    def advance(self, after_estimate: bool) -> None:
        """Commit round, before the step changes the master: the estimate's output becomes θ̃, where the
        next first half is being computed (the master itself where that estimate updated nothing, or where
        there was no estimate)."""
        if self.point is None:
            self.point = torch.empty_like(self.master)
        source = self.next_point if after_estimate and self.next_point is not None else self.master
        self.point.copy_(source)
        if source.is_cuda and source is not self.master:
            # A loaded estimate's shard was allocated on the caller's stream and is dropped below: its memory
            # must not be reused before this copy has run on the round's stream.
            source.record_stream(torch.cuda.current_stream(source.device))
        self.carried_valid, self.next_point = False, None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """For a per-rank checkpoint (waits for the round that set κ, on the device)."""
        state: dict[str, Any] = {"point": self.point, "carried_valid": self.carried_valid, "kappa": float(self.kappa)}
        if self.gated:
            state["kappa_moments"] = [float(self.moments[0]), float(self.moments[1]), bool(self.moments[2])]
        return state

    def load(self, saved: Optional[dict[str, Any]], in_flight_estimate: Optional[torch.Tensor]) -> None:
        """A per-rank checkpoint's state (None: start afresh, as at the committed parameters);
        ``in_flight_estimate``: this rank's shard of an estimate round's output restored in flight, which
        the model holds while its commit runs."""
        self.reset()
        self.next_point = None if in_flight_estimate is None else in_flight_estimate.to(self.master.dtype, copy=True)
        if saved is None:
            return
        self.kappa = float(saved["kappa"])
        moments = saved.get("kappa_moments")
        if self.gated != (moments is not None):
            logger.warning(
                "acco: this per-rank checkpoint was saved with correction=%r and is loaded with correction=%r: %s",
                "secant-gated" if moments is not None else "secant", "secant-gated" if self.gated else "secant",
                "the gate starts afresh" if self.gated else "its gate's averages are dropped")
        if self.gated and moments is not None:
            m, v, seen = moments
            self.moments = (float(m), float(v), bool(seen))
        if saved["point"] is not None:
            if self.point is None:
                self.point = torch.empty_like(self.master)
            self.point.copy_(saved["point"])
            self.carried_valid = bool(saved["carried_valid"])

    @property
    def nbytes(self) -> int:
        return 0 if self.point is None else self.point.numel() * self.point.element_size()
