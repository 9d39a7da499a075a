"""What a round decided, and the record the user reads (``RoundResult``). No process groups here.

A round's decisions (counts, finiteness, the norm, whether the ranks agreed) are numbers. Decided on
the host they are plain numbers at once; decided on the device they stay in a tensor that is copied
to pinned host memory when the stream gets there, and are read only when the pipeline resolves the
round (docs/design.md §3). ``RoundOutcome.resolve()`` turns either into a ``RoundResult`` and raises
what the round must raise on every rank.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .agreement import PROBLEM_ADVICE, Agreed, AgreementCodec, Problem
from .errors import NonFiniteGradientError, ParameterOwnershipError
from .noise_scale import NoiseScale, estimate_from_sums
from .schedule import Launch, RoundKind

logger = logging.getLogger("acco")


@dataclass(frozen=True)
class RoundResult:
    index: int
    kind: RoundKind
    local_count: int  # step() calls this rank fed into the round
    global_count: int  # step() calls all ranks fed into the round
    total_count: int  # micro-batches averaged (an estimate's count is added to its commit)
    all_finishing: bool  # every rank launched this round from finish()
    updated: bool  # the optimizer stepped (a round with no gradients changes nothing)
    grad_norm: Optional[float]  # global norm of the averaged gradient, before clipping
    skipped: bool = False  # the averaged gradient was not finite and the update was skipped
    gathered: bool = True  # the round all-gathered parameters (an empty round skips it where the model holds them)
    # A commit that averaged two halves (the estimate's and its own): the gradient noise scale of this
    # update, in micro-batches (``acco.noise_scale``); None for other rounds and skipped updates.
    noise_scale: Optional[NoiseScale] = None


@dataclass(frozen=True)
class Halves:
    """A commit's two halves, for the gradient noise scale: |ḡ₁ − ḡ₂|² (this shard's part before the
    round's all-reduce, the global sum after), and the micro-batches each averaged (host numbers or
    device scalars; a first count of 0 means "not measurable")."""

    difference_square: Any
    first_count: Any
    second_count: Any

    def estimate(self, pooled_square: float) -> Optional[NoiseScale]:
        """The noise scale from the global sums (``pooled_square``: |ḡ|², the round's norm²), or None where
        a half averaged nothing or a sum is not a finite number."""
        values = [float(x) for x in (self.difference_square, pooled_square, self.first_count, self.second_count)]
        difference, pooled, first, second = values
        if not all(math.isfinite(v) for v in values) or first < 1 or second < 1 or difference < 0 or pooled < 0:
            return None
        return estimate_from_sums(difference, pooled, first, second)


def device_scalar(value: Any, like: torch.Tensor) -> torch.Tensor:
    """A float64 0-dim tensor on ``like``'s device, for a device-decided round. A number becomes one by a
    fill kernel: ``torch.tensor(x, device="cuda")`` would copy it from pageable host memory, which waits."""
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


@dataclass
class RoundOutcome:
    """What a round decided, as eleven numbers: ``[global_count, finishing_ranks, total_count,
    nonfinite, norm**2, disagreement, any_gradient, |ḡ₁ − ḡ₂|², n₁, n₂, clipped norm**2]`` (three of
    them a commit's two halves, ``Halves``, zeros otherwise; the last the norm² of the gradient that was
    clipped, which ``correction="secant"`` makes differ from the halves' pooled norm²). Decided on the host they are plain numbers;
    decided on the device they are a float64 tensor (a pinned host copy filled when the stream gets
    there), read only when ``resolve()`` is called, with a host copy of the summed agreement vector
    that names what a disagreement refused. ``resolve()`` raises what the round must raise on every
    rank."""

    launch: Launch
    world_size: int
    clipping: bool
    nonfinite: str
    update: int
    any_gradient: bool = True  # some parameter received a gradient on some rank (as known on the host)
    flags: Any = None
    on_the_device: bool = False
    agreement: Any = None  # the summed agreement vector (device decisions: a host copy, read at resolve)
    codec: Optional[AgreementCodec] = None
    gathered: bool = True

    def known(
        self, global_count: Any, finishing: Any, total: Any, nonfinite: float = 0.0, square: float = 0.0, gathered: bool = True,
        halves: Optional[Halves] = None, clip_square: Optional[float] = None,
    ) -> RoundOutcome:
        self.gathered = gathered
        any_gradient = 1.0 if self.any_gradient else 0.0
        pair = (0.0, 0.0, 0.0) if halves is None else (halves.difference_square, halves.first_count, halves.second_count)
        self.flags = (float(global_count), float(finishing), float(total), float(nonfinite), float(square), 0.0, any_gradient,
                      *(float(x) for x in pair), float(square if clip_square is None else clip_square))
        return self

    def on_device(self, flags: torch.Tensor, agreement: Optional[torch.Tensor] = None, codec: Optional[AgreementCodec] = None) -> RoundOutcome:
        self.flags = _host_copy_later(flags)
        self.agreement = None if agreement is None else _host_copy_later(agreement)
        self.codec = codec
        self.on_the_device = True
        return self

    def counts(self) -> tuple[bool, int]:
        """(every rank was finishing, micro-batches averaged), without raising what ``resolve`` would."""
        values = self.flags.tolist() if isinstance(self.flags, torch.Tensor) else self.flags
        return int(values[1]) == self.world_size, int(values[2])

    def resolve(self) -> RoundResult:
        values = self.flags.tolist() if isinstance(self.flags, torch.Tensor) else self.flags
        global_count, finishing_ranks, total_count, nonfinite, square, disagreement, any_gradient, *pair, clip_square = values
        has_gradients = total_count > 0 and self.any_gradient and any_gradient > 0
        finite = nonfinite == 0
        launch = self.launch
        if disagreement:
            raise self._disagreement_error(int(disagreement))
        if has_gradients and not finite and self.nonfinite == "raise":
            when = " (on the stream engine this is reported at the step() call after the next one)" if self.on_the_device else ""
            raise NonFiniteGradientError(
                f"acco: the averaged gradient of update {self.update} ({launch.kind.value} round {launch.index}) holds "
                f"NaN or Inf on some rank; that update was not applied: nothing was updated{when}. "
                "Pass nonfinite='skip' to skip such updates instead"
            )
        updated = has_gradients and finite
        noise_scale = Halves(*pair).estimate(square) if updated and launch.kind is RoundKind.COMMIT else None
        return RoundResult(
            index=launch.index,
            kind=launch.kind,
            local_count=launch.local_count,
            global_count=int(global_count),
            total_count=int(total_count),
            all_finishing=int(finishing_ranks) == self.world_size,
            updated=updated,
            grad_norm=math.sqrt(clip_square) if self.clipping and has_gradients and finite else None,
            skipped=has_gradients and not finite,
            gathered=self.gathered,
            noise_scale=noise_scale,
        )

    def _disagreement_error(self, bits: int) -> ParameterOwnershipError:
        """A device-decided round refused by the ranks together: the same error on every rank, named
        from the agreement vector as the thread engine names it."""
        launch = self.launch
        later = (
            f" (on the stream engine this is reported at the step() call after the next one; the {launch.kind.value} "
            f"round {launch.index} changed nothing)"
        )
        if self.agreement is not None and self.codec is not None:
            agreed = self.codec.decode(self.agreement.tolist())
            refused = refusal(agreed, self.world_size, self.update)
            if refused is not None:
                return ParameterOwnershipError(str(refused) + later)
        what = []
        if bits & 4:
            what.append("a model parameter was moved, cast or unfrozen on some rank")
        if bits & 1:
            what.append("the model's parameters were written outside the optimizer on some ranks but not on all")
        if bits & 2:
            what.append("the ranks' group settings (learning rate, ...) differed")
        return ParameterOwnershipError(
            f"acco: in {launch.kind.value} round {launch.index} (update {self.update}) " + " and ".join(what)
            + "; on the CUDA stream engine every rank acts on its own values, so they must agree: write the same "
            "weights and step the same schedule on every rank. Nothing was updated" + later
        )


def refusal(agreed: Agreed, world_size: int, update: int) -> Optional[ParameterOwnershipError]:
    """What no rank may adopt (a parameter moved, cast or unfrozen on some rank; weights written on
    some ranks only), as the error every rank raises; ``None`` if the ranks agree."""
    if agreed.problems:
        rank, problem, index = agreed.problems[0]
        what = "frozen parameter" if problem is Problem.UNFROZEN else "trainable parameter"
        return ParameterOwnershipError(
            f"acco: {what} {index} on rank {rank} can no longer be trained by AccoOptimizer: {PROBLEM_ADVICE[problem]} "
            f"(update {update}; reported by {len(agreed.problems)} rank(s)). Nothing was updated."
        )
    written = agreed.written_ranks
    if written and len(written) != world_size:
        others = sorted(set(range(world_size)) - set(written))
        return ParameterOwnershipError(
            f"acco: the model's parameters were written outside the optimizer (load_state_dict, nn.init, an in-place "
            f"edit) on rank(s) {list(written)} but not on rank(s) {others} (update {update}). Write the same "
            "weights on every rank, then call step() (or opt.adopt_model_parameters(), which takes rank 0's). "
            "Nothing was updated."
        )
    return None




_pinned_memory_works = True


def _host_copy_later(values: torch.Tensor) -> torch.Tensor:
    """A copy of device ``values`` in pinned host memory, filled when the stream gets there (no host
    wait now); host values are kept as they are (nothing changes them afterwards). Where pinned
    memory cannot be had, the values stay on the device and are read, with a synchronisation, when
    the round is resolved."""
    global _pinned_memory_works
    if not values.is_cuda:
        return values
    if _pinned_memory_works:
        try:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        except RuntimeError as error:
            _pinned_memory_works = False
            logger.warning("acco: no pinned host memory (%s); round outcomes are read with a device synchronisation", error)
        else:
            return host.copy_(values, non_blocking=True)
    return values
