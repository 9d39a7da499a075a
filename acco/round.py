"""One round, in its plain phases: agree on counts → reduce-scatter → average → clip →
step the shard (tentatively for an estimate) → all-gather the parameters.

A round is a function of explicit inputs: ``RoundRunner.run(call)`` reads the ``RoundCall`` named at
its launch (the communication buffer it reduces, where the gathered parameters go, the launch, this
rank's report) and returns a ``RoundOutcome``. Between rounds the runner keeps only the estimate's
carried gradients (``EstimateCarry``); everything else it holds is fixed at construction.

Runs in the engine's background (a worker thread, or a side CUDA stream). It touches only the
communication buffer, the shard buffers and the inner optimizer; the training thread touches the
model and the gradient buffer.

Every round starts with one small all-reduce in which the ranks agree (``agreement``) on counts,
on which parameters received gradients, on whether the model's parameters were written outside
the optimizer, and on rank 0's hyper-parameters.

Two ways to decide (docs/design.md §3), two strategies: ``HostDecisions`` (the CPU worker thread)
reads every decision back and branches, skipping work it does not need; ``DeviceDecisions`` (the
stream engine, and any CUDA round) keeps them on the device (a skipped update is computed and then
selected back), so that enqueuing a round never waits for the GPU. Both return a ``RoundOutcome``
that the host resolves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from .agreement import SPREAD_TOLERANCE, AgreementCodec, HyperparameterCodec, LocalReport
from .buffers import CommBuffer
from .comm import Communicator
from .errors import CollectiveError
from .noise_scale import shard_difference_square
from .outcome import Halves, RoundOutcome, RoundResult, device_scalar, refusal
from .schedule import Launch, RoundKind
from .secant import SecantCorrection, error_piece_bytes
from .shard import ShardOptimizer

logger = logging.getLogger("acco")

_CLIP_EPS = 1e-6  # the same epsilon as torch.nn.utils.clip_grad_norm_
# Elements per piece of the exact finiteness count: its boolean temporaries stay small.
_CHECK_CHUNK = 1 << 20
# Elements per piece of the float64 norm: the float64 copy of one piece (32 MiB) is its only
# temporary, never a shard-sized one (7 GB per rank for a 7B model on 8 ranks).
_NORM_CHUNK = 1 << 22


def _count_nonfinite(tensor: torch.Tensor) -> torch.Tensor:
    """How many pieces of ``tensor`` hold a NaN or Inf, as a tensor; piece by piece, so that no
    shard-sized boolean temporaries are allocated. Several times slower than a norm: only run when
    the norm says something is wrong."""
    count = torch.zeros((), dtype=torch.float64, device=tensor.device)
    for start in range(0, tensor.numel(), _CHECK_CHUNK):
        count += ~torch.isfinite(tensor[start : start + _CHECK_CHUNK]).all()
    return count


def square_norm_float64(tensor: torch.Tensor) -> torch.Tensor:
    """``Σ x²`` of a flat tensor, summed in float64 piece by piece (a float64 0-dim tensor).

    Exact enough and overflow-free for any finite fp32 tensor: each square is at most 1.2e77 and
    there are far fewer than 1e200 of them, so the sum is finite exactly when every element is
    (a NaN or Inf anywhere makes it NaN or Inf). The float64 copy of one piece of ``_NORM_CHUNK``
    elements is the only temporary."""
    pieces = [
        torch.linalg.vector_norm(tensor[start : start + _NORM_CHUNK], dtype=torch.float64)
        for start in range(0, tensor.numel(), _NORM_CHUNK)
    ]
    if not pieces:
        return torch.zeros((), dtype=torch.float64, device=tensor.device)
    if len(pieces) == 1:
        return pieces[0].square()
    return torch.stack(pieces).square().sum()


def norm_transient_bytes(numel: int, on_host: bool) -> int:
    """The most ``nonfinite_and_square`` allocates at once on a tensor of ``numel`` elements: one
    piece in float64 (on the host, only for a non-finite gradient, or one piece's booleans), and a
    float64 scalar per piece."""
    pieces = -(-numel // _NORM_CHUNK)
    largest = 8 * min(numel, _NORM_CHUNK)
    if on_host:
        largest = max(largest, min(numel, _CHECK_CHUNK))
    return largest + 16 * (pieces + 1)


def nonfinite_and_square(grad: torch.Tensor, on_host: bool) -> tuple[Any, Any]:
    """``(non-finite flag, norm**2)`` of ``grad`` in one pass: a NaN or Inf anywhere makes the norm
    NaN or Inf, so the norm doubles as the finiteness check (a separate ``isfinite`` pass costs
    several norms on CPU).

    ``on_host``: the norm is summed in the gradient's dtype, as before, and read back; only where
    it is not finite does the exact element check run (an fp32 sum of squares also overflows for
    finite gradients of norm > 1.8e19, which must not count as non-finite). On the device (no read
    back) the sum is taken in float64 piece by piece (``square_norm_float64``), which cannot
    overflow for any finite fp32 gradient, so the flag is exact without a branch (for an fp64
    master it would take a norm above 1e154)."""
    if on_host:
        norm = torch.linalg.vector_norm(grad).item()
        if math.isfinite(norm):
            return 0.0, norm**2
        nonfinite = float(_count_nonfinite(grad))
        return nonfinite, square_norm_float64(grad).item()
    square = square_norm_float64(grad)
    return (~torch.isfinite(square)).to(torch.float64), square



def to_device(values: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host values on ``device`` without the host waiting (through pinned memory on CUDA)."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _keep_alive_on_current_stream(hyperparameters: Sequence[dict[str, Any]]) -> None:
    """Tensor hyper-parameters (e.g. a CUDA ``lr``) were copied on the caller's stream and are read
    on the round's: tell the caching allocator, so that their memory is not reused too early."""
    for group in hyperparameters:
        for value in group.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(torch.cuda.current_stream(value.device))


NONFINITE_POLICIES = ("raise", "skip")

Flat = Any  # a model-layout flat buffer: ``buffers.Lanes`` (one tensor per dtype lane), or one tensor
Mask = Any  # which parameters had a gradient: None (all), a tuple of bools (host) or a boolean tensor (device)


@dataclass(frozen=True)
class RoundInputs:
    """What the facade hands a round at launch: this rank's report for the agreement (counts,
    gradients, ownership, encoded hyper-parameters) and its own group settings."""

    report: LocalReport
    hyperparameters: Sequence[dict[str, Any]]
    # The model holds the all-gathered master now (the last installed round committed): a round that
    # updates nothing need not gather it again.
    model_holds_master: bool = False
    # The calls of this round computed their gradients on the committed master (not on an estimate's output):
    # the same on every rank (installs, loads, adoptions and finish() happen on every rank alike).
    gradients_at_committed: bool = True


@dataclass(frozen=True)
class RoundCall:
    """Everything one round reads, named at its launch: nothing about a round lives on the runner."""

    launch: Launch
    inputs: RoundInputs
    comm: CommBuffer  # the gradients to reduce (``comm.grads``); the same memory takes parameters back
    output: Flat  # where the all-gathered parameters go: ``comm.params``, or the model itself (mode sync)
    update: int = 0  # the number of the update this round computes (for error messages)

    def describe(self) -> str:
        return f"{self.launch.kind.value} round {self.launch.index} (update {self.update})"


@dataclass(frozen=True)
class Decided:
    """What the agreement decided, as the rest of the round needs it (host numbers or device tensors)."""

    written: Any  # some rank's model was written outside the optimizer: adopt it
    has_gradient: Mask
    hyperparameters: Sequence[dict[str, Any]]
    global_count: Any
    finishing: Any
    disagreement: Any = 0.0  # device decisions: non-zero where the ranks' reports cannot all be adopted
    vector: Any = None  # device decisions: the summed agreement vector (names a disagreement's error)


class EstimateCarry:
    """The last estimate's reduced gradient shard, its count and its gradient mask: the one thing a
    round leaves for the next (its commit adds them, so the commit communicates only ḡ₂)."""

    def __init__(self) -> None:
        self.gradients: Optional[torch.Tensor] = None
        self.count: Any = 0  # a host int, or a device scalar (device decisions)
        self.mask: Mask = None  # which parameters had gradients in it (None: all)

    def combine(self, launch: Launch, grad: torch.Tensor, global_count: Any, has_gradient: Mask) -> tuple[Any, Mask, Optional[Halves]]:
        """A commit adds the estimate's reduced gradients (and counts); an estimate keeps its own.
        Returns the micro-batches averaged, the parameters with a gradient, all halves together, and,
        for a commit with two halves, this shard's part of |ḡ₁ − ḡ₂|² with the halves' counts
        (``Halves``: the gradient noise scale, ``acco.noise_scale``), measured before they are added."""
        total = global_count
        halves = None
        if launch.adds_estimate_gradients:
            halves = self._halves(grad, global_count, has_gradient)
            grad.add_(self.gradients)
            total = total + self.count
            has_gradient = _either(has_gradient, self.mask)
        if launch.kind is RoundKind.ESTIMATE:
            count = global_count.clone() if isinstance(global_count, torch.Tensor) else global_count
            self.keep(grad, count, has_gradient)
        else:
            self.count, self.mask = 0, None
        return total, has_gradient, halves

    def _halves(self, second_sum: torch.Tensor, second_count: Any, second_mask: Mask) -> Optional[Halves]:
        """This shard's |S₁/n₁ − S₂/n₂|² and the counts, where both halves are measurable: each averaged
        at least one micro-batch, over the same parameters (a parameter with a gradient in one half
        only would count its whole gradient as noise). On the host an unmeasurable pair is ``None``;
        on the device its first count is set to 0, which the outcome reads as "not measured" (every
        rank computes its shard's part either way: the masks and counts are global values, however
        each rank holds them, so the ranks agree)."""
        first_count = self.count
        same = _same_mask(self.mask, second_mask)
        on_host = not any(isinstance(x, torch.Tensor) for x in (first_count, second_count, same))
        if on_host and not (first_count > 0 and second_count > 0 and same):
            return None
        difference = shard_difference_square(self.gradients, second_sum, first_count, second_count, piece_elements=_NORM_CHUNK)
        if not on_host:
            first_count = device_scalar(first_count, difference)  # a fill kernel, never a copy from pageable memory
            first_count = torch.where(same, first_count, 0.0) if isinstance(same, torch.Tensor) else first_count * float(same)
        return Halves(difference, first_count, second_count)

    def keep(self, grad: torch.Tensor, count: Any, mask: Mask = None) -> None:
        if self.gradients is None:
            self.gradients = torch.empty_like(grad)
        self.gradients.copy_(grad)
        self.count, self.mask = count, mask

    def state(self) -> tuple[Optional[torch.Tensor], int, Optional[list[bool]]]:
        """``(gradients, count, mask)`` for a checkpoint (the count may live on the device, so this
        waits for the round that set it)."""
        count = int(self.count)
        if count == 0 or self.gradients is None:
            return None, count, None
        mask = self.mask
        if isinstance(mask, torch.Tensor):
            mask = mask.tolist()
        return self.gradients, count, None if mask is None or all(mask) else [bool(m) for m in mask]

    def load(self, gradients: Optional[torch.Tensor], count: int, mask: Optional[Sequence[bool]], like: torch.Tensor) -> None:
        """A checkpoint's carry (or none), in ``like``'s dtype and device."""
        if gradients is None or count == 0:
            self.count, self.mask = 0, None
            return
        self.keep(gradients.to(dtype=like.dtype, device=like.device), count, None if mask is None else tuple(bool(g) for g in mask))

    @property
    def nbytes(self) -> int:
        return 0 if self.gradients is None else self.gradients.numel() * self.gradients.element_size()


class Decisions(Protocol):
    """How a round decides: ``HostDecisions`` or ``DeviceDecisions`` (the same collectives per strategy;
    every rank of a group uses the same one)."""

    on_host: bool

    def read_agreement(self, runner: "RoundRunner", call: RoundCall, vector: torch.Tensor) -> Decided: ...

    def adopt_written(self, runner: "RoundRunner", call: RoundCall, decided: Decided) -> None: ...

    def update(
        self, runner: "RoundRunner", call: RoundCall, grad: torch.Tensor, decided: Decided, total: Any, has_gradient: Mask,
        halves: Optional[Halves] = None, dots: Any = None,
    ) -> RoundOutcome: ...


class HostDecisions:
    """The CPU worker thread: every decision is read back and branched on (free there), so a round
    skips the work it does not need (no all-gather where nothing changed, no step for a non-finite
    gradient). A refusal (a parameter some rank cannot train, weights written on some ranks only) is
    raised inside the round, from the agreed values; a non-finite gradient when the outcome is read."""

    on_host = True

    def read_agreement(self, runner: "RoundRunner", call: RoundCall, vector: torch.Tensor) -> Decided:
        agreed = runner.agreement.decode(vector.tolist())
        refused = refusal(agreed, runner.comm.world_size, call.update)
        if refused is not None:  # every rank raises the same error, before anything changes
            raise refused
        hyperparameters = call.inputs.hyperparameters
        if agreed.hyperparameters_differ:
            logger.debug("acco: ranks' group settings differ in round %d; rank 0's are used", call.launch.index)
        hyperparameters = runner.hyperparameter_codec.decode(agreed.hyperparameters, hyperparameters)
        return Decided(bool(agreed.written_ranks), agreed.has_gradient, hyperparameters, agreed.global_count, agreed.finishing_ranks)

    def adopt_written(self, runner: "RoundRunner", call: RoundCall, decided: Decided) -> None:
        runner.adopt_model_parameters(call, from_rank0=True)

    def update(
        self, runner: "RoundRunner", call: RoundCall, grad: torch.Tensor, decided: Decided, total: Any, has_gradient: Mask,
        halves: Optional[Halves] = None, dots: Any = None,
    ) -> RoundOutcome:
        global_count, finishing = decided.global_count, decided.finishing
        any_gradient = has_gradient is None or any(has_gradient)
        outcome = runner.new_outcome(call, any_gradient)
        secant = runner.secant
        estimate = call.launch.kind is RoundKind.ESTIMATE
        if not (total > 0 and any_gradient):  # nothing to update: pass the parameters on
            runner.secant_passes_on(call)
            if call.inputs.model_holds_master and not decided.written:  # every rank's model holds them already
                return outcome.known(global_count, finishing, total, gathered=False)
            runner.all_gather_master(call)
            return outcome.known(global_count, finishing, total)
        grad.div_(max(total, 1))
        runner.shape_estimate(call.launch, has_gradient)
        if secant is not None and estimate:
            secant.correct_estimate(grad, call.inputs.gradients_at_committed, bool(decided.written))
        nonfinite, square, difference, *summed = runner.check_and_measure(call, grad, on_host=True, halves=halves, dots=dots).tolist()
        measured = None if halves is None else Halves(difference, halves.first_count, halves.second_count)
        if nonfinite > 0:
            runner.secant_passes_on(call)
            if runner.nonfinite == "skip":
                runner.all_gather_master(call)
            return outcome.known(global_count, finishing, total, nonfinite, square, halves=measured)  # "raise": raised on reading
        clip_square = square
        if secant is not None and not estimate:
            if halves is not None and summed:
                clip_square, kappa, kept = secant.correct_commit(grad, summed, square, halves.first_count, halves.second_count, total)
                secant.keep_kappa(kappa, kept)
            secant.advance(call.launch.adds_estimate_gradients)
        if runner.max_grad_norm is not None:
            coefficient = min(runner.max_grad_norm / (math.sqrt(clip_square) + _CLIP_EPS), 1.0)  # as clip_grad_norm_
            if coefficient < 1.0:
                grad.mul_(coefficient)
        runner.step_shard(call, decided.hyperparameters, has_gradient)
        if secant is not None and estimate:
            secant.estimate_output(runner.shard.estimate_result)
        return outcome.known(global_count, finishing, total, 0.0, square, halves=measured, clip_square=clip_square)


class DeviceDecisions:
    """The stream engine and CUDA rounds: every rank acts on its own report and the decisions stay on
    the device, so enqueuing never waits for the GPU. The collectives are the same whatever is
    decided (the agreement, reduce-scatter, norm and all-gather always run); an update that must not
    happen is computed and selected back, and a disagreement is raised when the round is resolved.

    One value is read back: where this rank contributes nothing to the round (it is finishing, or
    shadowing a peer's call under Join), which parameters had a gradient on some rank. It waits for
    the outcome anyway, and a mask known on the host hides the others' missing gradients where a
    device mask would snapshot the whole state to undo a masked step."""

    on_host = False

    def read_agreement(self, runner: "RoundRunner", call: RoundCall, vector: torch.Tensor) -> Decided:
        report = call.inputs.report
        if all(report.has_gradient):
            has_gradient: Mask = None  # this rank has every gradient: so has the union
        elif report.count == 0:
            has_gradient = runner.agreement.decode(vector.tolist()).has_gradient
        else:
            has_gradient = vector[runner.agreement.gradient_slots()] > 0
        return Decided(
            report.written, has_gradient, call.inputs.hyperparameters, vector[0], vector[1], runner.disagreement(vector), vector
        )

    def adopt_written(self, runner: "RoundRunner", call: RoundCall, decided: Decided) -> None:
        runner.adopt_model_parameters(call, from_rank0=False, where=decided.disagreement == 0)

    def update(
        self, runner: "RoundRunner", call: RoundCall, grad: torch.Tensor, decided: Decided, total: Any, has_gradient: Mask,
        halves: Optional[Halves] = None, dots: Any = None,
    ) -> RoundOutcome:
        # A mask on the device (some rank lacked some gradients): the step is selected per parameter.
        mask = has_gradient if isinstance(has_gradient, torch.Tensor) else None
        any_gradient = has_gradient is None or mask is not None or any(has_gradient)
        outcome = runner.new_outcome(call, any_gradient)
        secant = runner.secant
        estimate = call.launch.kind is RoundKind.ESTIMATE
        # No gradients anywhere: grad is zero, divide by 1, the update is masked out.
        grad.div_(total.clamp(min=1.0) if isinstance(total, torch.Tensor) else max(total, 1))
        runner.shape_estimate(call.launch, has_gradient)
        if secant is not None and estimate:
            secant.correct_estimate(grad, call.inputs.gradients_at_committed, bool(decided.written))
        stats = runner.check_and_measure(call, grad, on_host=False, halves=halves, dots=dots)
        disagreement = decided.disagreement
        keep = (stats[0] == 0) & (disagreement == 0) & (total > 0)
        anywhere: Any = 1.0  # some parameter had a gradient on some rank
        if mask is not None:
            anywhere = mask.any()
            keep = keep & anywhere
        elif not any_gradient:
            keep = torch.zeros_like(keep)
        clip_square = stats[1]
        if secant is not None and not estimate:
            if halves is not None and dots is not None:
                clip_square, kappa, measured = secant.correct_commit(grad, stats[3:6], stats[1], halves.first_count, halves.second_count, total)
                secant.keep_kappa(kappa, measured & keep)
            secant.advance(call.launch.adds_estimate_gradients)  # before the step, which may reuse the estimate's buffer
        if runner.max_grad_norm is not None:
            grad.mul_((runner.max_grad_norm / (clip_square.sqrt() + _CLIP_EPS)).clamp(max=1.0))  # as clip_grad_norm_
        runner.step_shard(call, decided.hyperparameters, None if mask is not None else has_gradient, keep=keep, param_mask=mask)
        if secant is not None and estimate:
            secant.estimate_output(runner.shard.estimate_result)  # the master itself where not kept
        flags = [device_scalar(x, stats) for x in (decided.global_count, decided.finishing, total)] + [stats[0], stats[1]]
        flags += [device_scalar(disagreement, stats), device_scalar(anywhere, stats), stats[2]]
        flags += [device_scalar(x, stats) for x in ((0.0, 0.0) if halves is None else (halves.first_count, halves.second_count))]
        flags += [clip_square]
        return outcome.on_device(torch.stack(flags), decided.vector, runner.agreement)


class RoundRunner:
    """The round's fixed parts (process group, shard, codecs, this rank's pieces of the layout and
    their dtype scratch) and the estimate carry; ``run`` is the round itself."""

    def __init__(
        self,
        comm: Communicator,
        shard: ShardOptimizer,
        max_grad_norm: Optional[float],
        nonfinite: str = "raise",
        *,
        pieces: Sequence[tuple[int, int, int]],
        segment_dtypes: Sequence[tuple[torch.dtype, torch.dtype]],
        model_params: Flat,
        agreement: AgreementCodec,
        hyperparameter_codec: HyperparameterCodec,
        estimate: str = "plain",
        decide_on_host: bool = True,
        correction: str = "none",
    ) -> None:
        """``pieces``: ``(shard_offset, buffer_offset, length)`` of this rank's chunk of each segment of
        the layout (``Layout.rank_pieces``); ``segment_dtypes``: each segment's (gradient communication
        dtype, parameter dtype); ``model_params``: the model's flat parameters, read (never written) to
        adopt them."""
        self.decisions: Decisions = HostDecisions() if decide_on_host else DeviceDecisions()
        self.nonfinite = nonfinite  # validated by the facade, collectively
        self.estimate = estimate  # "plain" (ḡ₁) or "momentum" (ḡ₁ blended with the first moment)
        self.comm = comm
        self.shard = shard
        self.model_params = model_params
        self.agreement = agreement
        self.hyperparameter_codec = hyperparameter_codec
        self.pieces = list(pieces)
        # Each segment's collective: (shard offset, segment start in the buffer, elements per rank).
        self._segments = [(s, b - comm.rank * n, n) for s, b, n in self.pieces]
        self.max_grad_norm = max_grad_norm
        # Per segment, where its reduce-scatter lands (the gradient shard itself where the segment's
        # comm dtype is the master's, else a piece of a scratch buffer of that dtype), and the scratch
        # piece its all-gather sends from where the segment's parameter dtype is not the master's.
        comm_dtypes = [c for c, _ in segment_dtypes]
        param_dtypes = [p for _, p in segment_dtypes]
        self._grad_targets, self._grad_scratch = _segment_pieces(shard.grad, self._segments, comm_dtypes)
        self._param_pieces, self._param_scratch = _segment_pieces(shard.master, self._segments, param_dtypes)
        self._param_pieces = [None if piece.dtype == shard.master.dtype else piece for piece in self._param_pieces]
        self.carry = EstimateCarry()
        # correction="secant": θ̃ on this shard and the last commit's κ (``secant``); None otherwise.
        self.secant: Optional[SecantCorrection] = (
            SecantCorrection(shard.master, gated=correction == "secant-gated") if correction != "none" else None)

    @property
    def decide_on_host(self) -> bool:
        return self.decisions.on_host

    def run(self, call: RoundCall) -> RoundOutcome:
        """Agree → reduce-scatter → (adopt written weights) → add the estimate's gradients → average →
        check and clip → step → all-gather (docs/design.md §3, step 6); the decisions are the strategy's."""
        decisions = self.decisions
        if not decisions.on_host:
            _keep_alive_on_current_stream(call.inputs.hyperparameters)
        vector = self._agree(call)
        decided = decisions.read_agreement(self, call, vector)
        grad = self._reduce_scatter(call, decided.global_count)
        if decided.written:
            decisions.adopt_written(self, call, decided)
        dots = None
        if self.secant is not None and call.launch.adds_estimate_gradients:  # the halves apart, before they are added
            dots = self.secant.dots(self.carry.gradients, grad, call.inputs.gradients_at_committed, bool(decided.written))
        total, has_gradient, halves = self.carry.combine(call.launch, grad, decided.global_count, decided.has_gradient)
        return decisions.update(self, call, grad, decided, total, has_gradient, halves, dots)

    def secant_passes_on(self, call: RoundCall) -> None:
        """A round that updates nothing (host decisions): an estimate's output is the master; a commit
        moves θ̃ on as any commit does."""
        if self.secant is None:
            return
        if call.launch.kind is RoundKind.ESTIMATE:
            self.secant.estimate_output(None)
        else:
            self.secant.advance(call.launch.adds_estimate_gradients)

    # ------------------------------------------------------------------ the phases
    def new_outcome(self, call: RoundCall, any_gradient: bool) -> RoundOutcome:
        return RoundOutcome(call.launch, self.comm.world_size, self.max_grad_norm is not None, self.nonfinite, call.update, any_gradient)

    def _agree(self, call: RoundCall) -> torch.Tensor:
        """The round's first collective: every rank's report, summed (see ``agreement``)."""
        values = torch.tensor(self.agreement.encode(call.inputs.report, self.comm.rank), dtype=torch.float64)
        device = self.shard.master.device
        if device.type != "cpu":  # through pinned memory: no host wait
            values = values.pin_memory().to(device, non_blocking=True)
        self._collective(call.describe(), "all_reduce (counts)", self.comm.all_reduce_sum, values)
        return values

    def disagreement(self, vector: torch.Tensor) -> torch.Tensor:
        """Non-zero where ranks reported differently what each acted on alone: written parameters
        (some ranks but not all: 1), group settings (some rank's were not rank 0's: 2), or a
        parameter some rank can no longer train (moved, cast, unfrozen: 4)."""
        codec, world = self.agreement, self.comm.world_size
        written = vector[codec.written_slots()].sum()
        partial = ((written > 0) & (written < world)).to(torch.float64)
        rank0, everyone, squares = codec.hyperparameter_range()
        mine, total, square = vector[rank0], vector[everyone], vector[squares]
        expected = mine * world
        shifted = (total - expected).abs() > 1e-9 * expected.abs().clamp(min=1.0)
        spread = square - 2.0 * mine * total + world * mine * mine  # Σ(xᵣ − x₀)²: the differences cannot cancel
        spread_out = spread > SPREAD_TOLERANCE * square.abs()  # relative: small rates are compared as closely
        differ = (shifted | spread_out).any().to(torch.float64)
        problem = (vector[codec.problem_slots()].sum() > 0).to(torch.float64)
        return partial + 2 * differ + 4 * problem

    def adopt_model_parameters(self, call: RoundCall, from_rank0: bool, where: Optional[torch.Tensor] = None) -> None:
        """The model's current parameters become the master shard. With ``from_rank0`` rank 0's
        model is broadcast first (through the communication buffer, free after the reduce-scatter),
        so every rank adopts identical values; else each rank takes its own shard of its model,
        and only ``where`` a device flag says so (every rank wrote, none has a problem), so that a
        refused round leaves the master as it was."""
        source = self.model_params
        if from_rank0 and self.comm.world_size > 1:
            if self.comm.rank == 0:
                call.comm.params.copy_(self.model_params)
            for lane in _lanes(call.comm.params):
                self._collective(call.describe(), "broadcast (adopted parameters)", self.comm.broadcast, lane, 0)
            source = call.comm.params
        if where is None:
            self.take_master_from(source)
            return
        for shard_offset, buffer_offset, length in self.pieces:
            master = self.shard.master[shard_offset : shard_offset + length]
            torch.where(where, source[buffer_offset : buffer_offset + length], master, out=master)

    def take_master_from(self, flat: Flat) -> None:
        """This rank's shard of a model-layout flat buffer becomes the master (its chunk of each segment)."""
        for shard_offset, buffer_offset, length in self.pieces:
            self.shard.master[shard_offset : shard_offset + length].copy_(flat[buffer_offset : buffer_offset + length])

    def shard_of(self, flat: Flat, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A copy of this rank's shard of a model-layout flat buffer (in ``dtype``: pieces of several lanes
        are brought to one dtype that holds them all)."""
        return torch.cat([flat[b : b + n] if dtype is None else flat[b : b + n].to(dtype) for _, b, n in self.pieces])

    def _reduce_scatter_segments(self, targets: Sequence[torch.Tensor], flat: Flat) -> None:
        """One reduce-scatter per segment of the layout (one in all for a layout of one kind and dtype)."""
        world = self.comm.world_size
        for target, (_, start, n) in zip(targets, self._segments):
            self.comm.reduce_scatter_sum(target, flat[start : start + world * n])

    def _all_gather_segments(self, flat: Flat, shard: torch.Tensor) -> None:
        """One all-gather per segment of the layout, each in its lane's dtype (the shard's pieces are
        converted through the segment's scratch piece where their dtype differs)."""
        world = self.comm.world_size
        for scratch, (shard_offset, start, n) in zip(self._param_pieces, self._segments):
            out = flat[start : start + world * n]
            piece = shard[shard_offset : shard_offset + n]
            if piece.dtype != out.dtype:
                piece = (scratch if scratch is not None else torch.empty(n, dtype=out.dtype, device=out.device)).copy_(piece)
            self.comm.all_gather(out, piece)

    def shape_estimate(self, launch: Launch, has_gradient: Mask) -> None:
        """An estimate round steps on ḡ₁, or (``estimate='momentum'``) on ḡ₁ blended with the first
        moment. Its carried gradients (for the commit) were taken before: the commit is unchanged."""
        if launch.kind is RoundKind.ESTIMATE and self.estimate == "momentum":
            self.shard.blend_with_momentum(has_gradient)

    def _collective(self, where: str, name: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one collective; a failure or timeout names the round (``where``) and the collective."""
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            timeout = getattr(self.comm, "timeout", None)
            raise CollectiveError(
                f"acco: {name} of {where} failed on rank {self.comm.rank} of "
                f"{self.comm.world_size}: {error}. A peer rank may have died or stopped calling step()/finish()"
                + (f" (collective timeout {timeout})" if timeout is not None else "")
            ) from error

    def _reduce_scatter(self, call: RoundCall, global_count: Any) -> torch.Tensor:
        """Sum of all ranks' gradients, this rank's shard, in the master dtype. ``global_count``
        known on the host (an int) and zero: every rank agrees that there is nothing to reduce."""
        grad = self.shard.grad
        if isinstance(global_count, int) and global_count == 0:
            grad.zero_()
            return grad
        if call.launch.local_count == 0:  # this rank only joins (e.g. it is finishing)
            call.comm.grads.zero_()
        self._collective(call.describe(), "reduce_scatter (gradients)", self._reduce_scatter_segments, self._grad_targets, call.comm.grads)
        for target, (shard_offset, _, n) in zip(self._grad_targets, self._segments):
            if target.dtype != grad.dtype:  # a scratch piece of the segment's comm dtype
                grad[shard_offset : shard_offset + n].copy_(target)
        return grad

    def check_and_measure(
        self, call: RoundCall, grad: torch.Tensor, on_host: bool, halves: Optional[Halves] = None, dots: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``[non-finite flag, norm**2, |ḡ₁ − ḡ₂|²]`` of the averaged gradient, all shards together, in one
        small all-reduce: every rank gets the same values (the norm is the finiteness check, so it is
        always computed). The third entry is the sum of the shards' ``halves`` (0 without two halves):
        with the norm, what the gradient noise scale needs, for no extra collective. ``dots``
        (``correction="secant"``, a commit): the shard's ``[eᵀS₁, eᵀS₂, |e|²]``, summed as three more entries."""
        nonfinite, square = nonfinite_and_square(grad, on_host=on_host)
        difference: Any = 0.0 if halves is None else halves.difference_square
        if isinstance(square, torch.Tensor):
            stats = torch.stack([nonfinite, square, device_scalar(difference, square)])
        else:
            stats = torch.tensor([nonfinite, square, float(difference)], dtype=torch.float64)
        if dots is not None:
            stats = torch.cat([stats, dots.to(device=stats.device, dtype=torch.float64)])
        self._collective(call.describe(), "all_reduce (finite check / norm)", self.comm.all_reduce_sum, stats)
        return stats

    def all_gather_master(self, call: RoundCall, source: Optional[torch.Tensor] = None) -> None:
        """Every rank's shard of ``source`` (default: the master) into the call's output."""
        source = self.shard.master if source is None else source
        self._collective(call.describe(), "all_gather (parameters)", self._all_gather_segments, call.output, source)

    def step_shard(self, call: RoundCall, hyperparameters: Sequence[dict[str, Any]], has_gradient: Mask, **decided: Any) -> None:
        """Step the inner optimizer with rank 0's settings, only over parameters with a gradient: an
        estimate steps a shadow and gathers its result, a commit steps the master and gathers it.
        ``decided``: the device decision (``keep``, ``param_mask``) that selects the update back."""
        self.shard.apply_hyperparameters(hyperparameters)
        with self.shard.only_params_with_gradients(has_gradient):
            if call.launch.kind is RoundKind.ESTIMATE:
                self.shard.tentative_step(lambda result: self.all_gather_master(call, result), **decided)
            else:
                self.shard.step(**decided)
                self.all_gather_master(call)
        self.shard.publish_sizes()

    def regather(self, comm: CommBuffer, param_shard: torch.Tensor, result: Optional[RoundResult]) -> Optional[RoundResult]:
        """Rebuild a checkpointed round's output in ``comm`` from every rank's saved shard of it (or, after a
        sharded load, the committed parameters from every rank's master shard; no round then: ``result`` None)."""
        if param_shard.is_cuda:  # copied on the caller's stream, read on the round's
            param_shard.record_stream(torch.cuda.current_stream(param_shard.device))
        where = "a sharded load's committed parameters" if result is None else f"the restored {result.kind.value} round {result.index}"
        self._collective(where, "all_gather (restored parameters)", self._all_gather_segments, comm.params, param_shard)
        return result

    def long_lived_tensors(self) -> list[torch.Tensor]:
        """Buffers every round uses (for the engine's ``keep_alive``)."""
        return [self.shard.master, self.shard.grad, *self._grad_scratch, *self._param_scratch]

    @property
    def transient_bytes(self) -> int:
        """The most a round allocates and frees again by itself, on top of the buffers it keeps: the
        float64 piece of the gradient norm (device decisions; on the host only for a non-finite
        gradient) and, with ``estimate='momentum'``, one view's blended moment. The inner optimizer's
        own temporaries are torch's (none for the fused kernels)."""
        size = self.shard.master.numel()
        transient = norm_transient_bytes(size, self.decide_on_host)
        if self.estimate == "momentum":
            transient += self.shard.largest_view_bytes()
        if self.secant is not None:
            transient += error_piece_bytes(size, self.shard.master.element_size())
        return transient

    @property
    def conversion_bytes(self) -> int:
        """Shard-sized (at most) buffers for a comm or parameter dtype other than the master's."""
        return sum(t.numel() * t.element_size() for t in (*self._grad_scratch, *self._param_scratch))


def _either(a: Mask, b: Mask) -> Mask:
    """Element-wise OR of two gradient masks (None: every parameter)."""
    if a is None or b is None:
        return None
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        device = (a if isinstance(a, torch.Tensor) else b).device
        a, b = (m if isinstance(m, torch.Tensor) else to_device(m, device, torch.bool) for m in (a, b))
        return a | b
    merged = tuple(x or y for x, y in zip(a, b))
    return None if all(merged) else merged


def _same_mask(a: Mask, b: Mask) -> Any:
    """Whether two gradient masks name the same parameters: a bool, or a device boolean where either is
    a device mask (None: every parameter)."""
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return (a is None or all(a)) if b is None else (all(b) if a is None else tuple(a) == tuple(b))
    device = (a if isinstance(a, torch.Tensor) else b).device
    a, b = (torch.ones((), dtype=torch.bool, device=device) if m is None else m for m in (a, b))
    a, b = (m if isinstance(m, torch.Tensor) else to_device(m, device, torch.bool) for m in (a, b))
    return (a == b).all()


def _lanes(flat: Flat) -> list[torch.Tensor]:
    """The tensors of a flat buffer: its lanes, or the tensor itself."""
    return list(flat.tensors) if hasattr(flat, "tensors") else [flat]


def _segment_pieces(
    shard: torch.Tensor, segments: Sequence[tuple[int, int, int]], dtypes: Sequence[torch.dtype]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per segment, a tensor of its dtype for this rank's chunk: a view of ``shard`` where the dtype is
    the shard's, else a piece of one scratch buffer per dtype (segments of one dtype lie back to back
    in it, so a model of one dtype gets one shard-sized scratch, as before lanes). Returns the pieces
    and the scratch buffers."""
    need = {}
    for (_, _, n), dtype in zip(segments, dtypes):
        if dtype != shard.dtype:
            need[dtype] = need.get(dtype, 0) + n
    scratch = {dtype: torch.empty(size, dtype=dtype, device=shard.device) for dtype, size in need.items()}
    used = dict.fromkeys(scratch, 0)
    pieces = []
    for (shard_offset, _, n), dtype in zip(segments, dtypes):
        if dtype == shard.dtype:
            pieces.append(shard[shard_offset : shard_offset + n])
        else:
            pieces.append(scratch[dtype][used[dtype] : used[dtype] + n])
            used[dtype] += n
    return pieces, list(scratch.values())
