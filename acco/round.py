"""One round, in its plain phases: agree on counts → reduce-scatter → average → clip →
step the shard (tentatively for an estimate) → all-gather the parameters.

Runs in the engine's background (a worker thread, or a side CUDA stream). It touches only the
communication buffer, the shard buffers and the inner optimizer; the training thread touches the
model and the gradient buffer.

Every round starts with one small all-reduce in which the ranks agree (``agreement``) on counts,
on which parameters received gradients, on whether the model's parameters were written outside
the optimizer, and on rank 0's hyper-parameters.

One implementation, two ways to decide (docs/design.md §3): every decision is computed as a value
first; the CPU worker thread reads it back and branches (free there), while the stream engine and
CUDA rounds keep it on the device (a skipped update is computed and then selected back), so that
enqueuing a round never waits for the GPU. Both return a ``RoundOutcome`` that the host resolves.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .agreement import PROBLEM_ADVICE, SPREAD_TOLERANCE, Agreed, AgreementCodec, HyperparameterCodec, LocalReport, Problem
from .comm import Communicator
from .errors import CollectiveError, NonFiniteGradientError, ParameterOwnershipError
from .schedule import Launch, RoundKind
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


@dataclass
class RoundOutcome:
    """What a round decided, as seven numbers: ``[global_count, finishing_ranks, total_count,
    nonfinite, norm**2, disagreement, any_gradient]``. Decided on the host they are plain numbers;
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
        self, global_count: Any, finishing: Any, total: Any, nonfinite: float = 0.0, square: float = 0.0, gathered: bool = True
    ) -> "RoundOutcome":
        self.gathered = gathered
        any_gradient = 1.0 if self.any_gradient else 0.0
        self.flags = (float(global_count), float(finishing), float(total), float(nonfinite), float(square), 0.0, any_gradient)
        return self

    def on_device(self, flags: torch.Tensor, agreement: Optional[torch.Tensor] = None, codec: Optional[AgreementCodec] = None) -> "RoundOutcome":
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
        global_count, finishing_ranks, total_count, nonfinite, square, disagreement, any_gradient = values
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
        return RoundResult(
            index=launch.index,
            kind=launch.kind,
            local_count=launch.local_count,
            global_count=int(global_count),
            total_count=int(total_count),
            all_finishing=int(finishing_ranks) == self.world_size,
            updated=has_gradients and finite,
            grad_norm=math.sqrt(square) if self.clipping and has_gradients and finite else None,
            skipped=has_gradients and not finite,
            gathered=self.gathered,
        )

    def _disagreement_error(self, bits: int) -> "ParameterOwnershipError":
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


def refusal(agreed: Agreed, world_size: int, update: int) -> Optional["ParameterOwnershipError"]:
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


def _as_flag(value: Any, like: torch.Tensor) -> torch.Tensor:
    """One entry of a device-decided outcome. A number becomes a device scalar by a fill kernel:
    ``torch.tensor(x, device="cuda")`` would copy it from pageable host memory, which waits."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64)
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


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


NONFINITE_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class RoundInputs:
    """What the facade hands a round at launch: this rank's report for the agreement (counts,
    gradients, ownership, encoded hyper-parameters) and its own group settings."""

    report: LocalReport
    hyperparameters: Sequence[dict[str, Any]]
    # The model holds the all-gathered master now (the last installed round committed): a round that
    # updates nothing need not gather it again.
    model_holds_master: bool = False


class RoundRunner:
    def __init__(
        self,
        comm: Communicator,
        shard: ShardOptimizer,
        comm_grads: Flat,
        comm_params: Flat,
        max_grad_norm: Optional[float],
        nonfinite: str = "raise",
        *,
        model_params: Optional[Flat] = None,
        agreement: Optional[AgreementCodec] = None,
        hyperparameter_codec: Optional[HyperparameterCodec] = None,
        shard_range: Optional[tuple[int, int]] = None,
        estimate: str = "plain",
        decide_on_host: bool = True,
        pieces: Optional[Sequence[tuple[int, int, int]]] = None,
    ) -> None:
        """``pieces``: ``(shard_offset, buffer_offset, length)`` of this rank's chunk of each segment of
        the layout (``Layout.rank_pieces``); default: one segment, this rank's ``shard_range``."""
        self.decide_on_host = decide_on_host  # read decisions back and branch (see run)
        self.nonfinite = nonfinite  # validated by the facade, collectively
        self.estimate = estimate  # "plain" (ḡ₁) or "momentum" (ḡ₁ blended with the first moment)
        self.comm = comm
        self.shard = shard
        self.comm_grads = comm_grads  # world * shard elements, comm dtype(s) (one tensor per lane: ``buffers.Lanes``)
        self.comm_params = comm_params  # world * shard elements, parameter dtype(s) (same memory)
        self.model_params = model_params  # the model's flat parameters: read (never written) to adopt them
        self.agreement = agreement
        self.hyperparameter_codec = hyperparameter_codec
        self.shard_range = shard_range
        if pieces is None:
            pieces = [] if shard_range is None else [(0, shard_range[0], shard_range[1] - shard_range[0])]
        self.pieces = list(pieces)
        # Each segment's collective: (shard offset, segment start in the buffer, elements per rank).
        self._segments = [(s, b - comm.rank * n, n) for s, b, n in self.pieces]
        self.max_grad_norm = max_grad_norm
        # Per segment, where its reduce-scatter lands (the gradient shard itself where the segment's
        # comm dtype is the master's, else a piece of a scratch buffer of that dtype), and the scratch
        # piece its all-gather sends from where the segment's parameter dtype is not the master's.
        comm_dtypes = [comm_grads[start : start + 1].dtype for _, start, _ in self._segments]
        param_dtypes = [comm_params[start : start + 1].dtype for _, start, _ in self._segments]
        self._grad_targets, self._grad_scratch = _segment_pieces(shard.grad, self._segments, comm_dtypes)
        self._param_pieces, self._param_scratch = _segment_pieces(shard.master, self._segments, param_dtypes)
        self._param_pieces = [None if piece.dtype == shard.master.dtype else piece for piece in self._param_pieces]
        self._carried: Optional[torch.Tensor] = None  # the last estimate's summed gradient shard
        self._carried_count = 0
        self._carried_mask: Optional[tuple[bool, ...]] = None  # which parameters had gradients in it (None: all)
        self._output = comm_params
        self._launch: Optional[Launch] = None
        self._update = 0

    def use_buffers(self, comm_grads: Flat, comm_params: Flat) -> None:
        """The communication buffer of the rounds launched from now on (the training thread swaps
        it with its gradient accumulator at each launch; called only while no round runs)."""
        self.comm_grads, self.comm_params = comm_grads, comm_params

    def run(self, launch: Launch, inputs: RoundInputs, output: Optional[torch.Tensor] = None, update: int = 0) -> "RoundOutcome":
        """Agree → reduce-scatter → average → clip → step → all-gather (docs/design.md §3, step 7).

        Every decision (is there a gradient, is it finite, how much to clip, did the ranks agree)
        is first a value the round computes. With ``decide_on_host`` (the thread engine on CPU)
        the host reads those values back and branches, skipping the work it does not need; without
        it (the stream engine, and any CUDA round) they stay on the device: the optimizer always
        steps and an update that must not happen is selected back, so enqueuing never waits for the
        GPU. Either way the returned ``RoundOutcome`` turns them into a ``RoundResult``.

        ``output``: where the all-gathered parameters go (default: the communication buffer); the
        model's own flat buffer when nothing reads the model during the round (mode ``sync``).
        ``update``: the number of the update this round computes (for error messages).
        """
        self._begin(launch, output, update)
        host = self.decide_on_host
        if not host:
            _keep_alive_on_current_stream(inputs.hyperparameters)
        vector = self._agree(inputs.report)
        disagreement: Any = 0.0
        if host:  # read the agreement back and act on it as agreed
            agreed = self.agreement.decode(vector.tolist())
            self._refuse_disagreement(agreed)
            written, has_gradient = bool(agreed.written_ranks), agreed.has_gradient
            hyperparameters = self._shared_hyperparameters(agreed, inputs)
            global_count, finishing = agreed.global_count, agreed.finishing_ranks
        else:  # each rank acts on its own report; the device checks that they all reported the same
            written, hyperparameters = inputs.report.written, inputs.hyperparameters
            has_gradient = None if all(inputs.report.has_gradient) else self._gradient_mask(vector, inputs.report.count)
            disagreement = self._disagreement_on_device(vector)
            global_count, finishing = vector[0], vector[1]
        grad = self._reduce_scatter(launch.local_count, global_count)
        if written:
            self._adopt_model_parameters(from_rank0=host, agreed=None if host else disagreement == 0)
        total, has_gradient = self._combine_with_estimate(launch, grad, global_count, has_gradient)
        # A mask on the device (some rank lacked some gradients): the step is selected per parameter.
        mask = has_gradient if isinstance(has_gradient, torch.Tensor) else None
        any_gradient = has_gradient is None or mask is not None or any(has_gradient)
        outcome = RoundOutcome(launch, self.comm.world_size, self.max_grad_norm is not None, self.nonfinite, update, any_gradient)
        if host and not (total > 0 and any_gradient):  # nothing to update: pass the parameters on
            if inputs.model_holds_master and not written:  # every rank's model holds them already
                return outcome.known(global_count, finishing, total, gathered=False)
            self._all_gather_params()
            return outcome.known(global_count, finishing, total)
        # No gradients anywhere (device decisions only): grad is zero, divide by 1, the update is masked out.
        grad.div_(total.clamp(min=1.0) if isinstance(total, torch.Tensor) else max(total, 1))
        self._shape_estimate(launch, has_gradient)
        stats = self._check_and_measure(grad)
        anywhere: Any = 1.0  # some parameter had a gradient on some rank
        if host:
            nonfinite, square = stats.tolist()
            if nonfinite > 0:
                if self.nonfinite == "skip":
                    self._all_gather_params()
                return outcome.known(global_count, finishing, total, nonfinite, square)  # "raise": raised on reading
            keep: Any = None
            if self.max_grad_norm is not None:
                coefficient = min(self.max_grad_norm / (math.sqrt(square) + _CLIP_EPS), 1.0)  # as clip_grad_norm_
                if coefficient < 1.0:
                    grad.mul_(coefficient)
        else:
            keep = (stats[0] == 0) & (disagreement == 0) & (total > 0)
            if mask is not None:
                anywhere = mask.any()
                keep = keep & anywhere
            elif not any_gradient:
                keep = torch.zeros_like(keep)
            if self.max_grad_norm is not None:
                grad.mul_((self.max_grad_norm / (stats[1].sqrt() + _CLIP_EPS)).clamp(max=1.0))  # as clip_grad_norm_
        self.shard.apply_hyperparameters(hyperparameters)
        with self.shard.only_params_with_gradients(None if mask is not None else has_gradient):
            decided = {} if keep is None else {"keep": keep, "param_mask": mask}
            if launch.kind is RoundKind.ESTIMATE:
                self.shard.tentative_step(self._all_gather_params, **decided)
            else:
                self.shard.step(**decided)
                self._all_gather_params()
        self.shard.publish_sizes()
        if host:
            return outcome.known(global_count, finishing, total, 0.0, square)
        flags = [_as_flag(x, stats) for x in (global_count, finishing, total)] + [stats[0], stats[1]]
        flags += [_as_flag(disagreement, stats), _as_flag(anywhere, stats)]
        return outcome.on_device(torch.stack(flags), vector, self.agreement)

    # ------------------------------------------------------------------ the phases
    def _begin(self, launch: Launch, output: Optional[torch.Tensor], update: int) -> None:
        self._output = self.comm_params if output is None else output
        self._launch, self._update = launch, update

    def _agree(self, report: LocalReport) -> torch.Tensor:
        """The round's first collective: every rank's report, summed (see ``agreement``)."""
        values = torch.tensor(self.agreement.encode(report, self.comm.rank), dtype=torch.float64)
        device = self.shard.master.device
        if device.type != "cpu":  # through pinned memory: no host wait
            values = values.pin_memory().to(device, non_blocking=True)
        self._collective("all_reduce (counts)", self.comm.all_reduce_sum, values)
        return values

    def _refuse_disagreement(self, agreed: Agreed) -> None:
        """Every rank raises the same error, before anything changes, for what cannot be adopted."""
        refused = refusal(agreed, self.comm.world_size, self._update)
        if refused is not None:
            raise refused

    def _shared_hyperparameters(self, agreed: Agreed, inputs: RoundInputs) -> Sequence[dict[str, Any]]:
        """Rank 0's group settings at its launch of this round, on every rank."""
        if agreed.hyperparameters_differ:
            logger.debug("acco: ranks' group settings differ in round %d; rank 0's are used", self._launch.index)
        return self.hyperparameter_codec.decode(agreed.hyperparameters, inputs.hyperparameters)

    def _gradient_mask(self, vector: torch.Tensor, local_count: int) -> Any:
        """Which parameters had a gradient on some rank, as a boolean tensor (no host read). A rank that
        contributes nothing to the round (it is finishing, or shadowing a peer's call under Join) reads
        them on the host instead: it waits for the round's outcome anyway, and a mask known on the host
        hides the gradients of the others, where a device mask would snapshot the whole state to undo a
        masked step (memory the modes sync and dpu otherwise never need). The collectives stay the same."""
        if local_count == 0:
            agreed = self.agreement.decode(vector.tolist())
            return agreed.has_gradient
        return vector[self.agreement.gradient_slots()] > 0

    def _disagreement_on_device(self, vector: torch.Tensor) -> torch.Tensor:
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

    def _adopt_model_parameters(self, from_rank0: bool, agreed: Optional[torch.Tensor] = None) -> None:
        """The model's current parameters become the master shard. With ``from_rank0`` rank 0's
        model is broadcast first (through the communication buffer, free after the reduce-scatter),
        so every rank adopts identical values; else each rank takes its own shard of its model,
        and only where ``agreed`` (a device flag: every rank wrote, none has a problem), so that a
        refused round leaves the master as it was."""
        source = self.model_params
        if from_rank0 and self.comm.world_size > 1:
            if self.comm.rank == 0:
                self.comm_params.copy_(self.model_params)
            for lane in _lanes(self.comm_params):
                self._collective("broadcast (adopted parameters)", self.comm.broadcast, lane, 0)
            source = self.comm_params
        if agreed is None:
            self.take_master_from(source)
            return
        for shard_offset, buffer_offset, length in self.pieces:
            master = self.shard.master[shard_offset : shard_offset + length]
            torch.where(agreed, source[buffer_offset : buffer_offset + length], master, out=master)

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

    def _shape_estimate(self, launch: Launch, has_gradient: Mask) -> None:
        """An estimate round steps on ḡ₁, or (``estimate='momentum'``) on ḡ₁ blended with the first
        moment. Its carried gradients (for the commit) were taken before: the commit is unchanged."""
        if launch.kind is RoundKind.ESTIMATE and self.estimate == "momentum":
            self.shard.blend_with_momentum(has_gradient)

    def _combine_with_estimate(
        self, launch: Launch, grad: torch.Tensor, global_count: Any, has_gradient: Mask
    ) -> tuple[Any, Mask]:
        """A commit adds the estimate's reduced gradients (and counts); an estimate keeps its own."""
        total = global_count
        if launch.adds_estimate_gradients:
            grad.add_(self._carried)
            total = total + self._carried_count
            has_gradient = _either(has_gradient, self._carried_mask)
        if launch.kind is RoundKind.ESTIMATE:
            count = global_count.clone() if isinstance(global_count, torch.Tensor) else global_count
            self._carry(grad, count, has_gradient)
        else:
            self._carried_count = 0
            self._carried_mask = None
        return total, has_gradient

    def _collective(self, name: str, fn, *args) -> None:
        """Run one collective; a failure or timeout names the round and the collective."""
        try:
            fn(*args)
        except Exception as error:  # noqa: BLE001 - re-raised with context
            launch = self._launch
            where = f"{launch.kind.value} round {launch.index}" if launch is not None else "a round"
            timeout = getattr(self.comm, "timeout", None)
            raise CollectiveError(
                f"acco: {name} of {where} (update {self._update}) failed on rank {self.comm.rank} of "
                f"{self.comm.world_size}: {error}. A peer rank may have died or stopped calling step()/finish()"
                + (f" (collective timeout {timeout})" if timeout is not None else "")
            ) from error

    def _reduce_scatter(self, local_count: int, global_count: Any = None) -> torch.Tensor:
        """Sum of all ranks' gradients, this rank's shard, in the master dtype. ``global_count``
        known on the host (an int) and zero: every rank agrees that there is nothing to reduce."""
        grad = self.shard.grad
        if isinstance(global_count, int) and global_count == 0:
            grad.zero_()
            return grad
        if local_count == 0:  # this rank only joins (e.g. it is finishing)
            self.comm_grads.zero_()
        self._collective("reduce_scatter (gradients)", self._reduce_scatter_segments, self._grad_targets, self.comm_grads)
        for target, (shard_offset, _, n) in zip(self._grad_targets, self._segments):
            if target.dtype != grad.dtype:  # a scratch piece of the segment's comm dtype
                grad[shard_offset : shard_offset + n].copy_(target)
        return grad

    def _carry(self, grad: torch.Tensor, count: Any, has_gradient: Mask = None) -> None:
        if self._carried is None:
            self._carried = torch.empty_like(grad)
        self._carried.copy_(grad)
        self._carried_count = count
        self._carried_mask = has_gradient

    def _check_and_measure(self, grad: torch.Tensor) -> torch.Tensor:
        """``[non-finite flag, norm**2]`` of the averaged gradient, all shards together, in one small
        all-reduce: every rank gets the same values (the norm is the finiteness check, so it is
        always computed)."""
        nonfinite, square = nonfinite_and_square(grad, on_host=self.decide_on_host)
        if isinstance(square, torch.Tensor):
            stats = torch.stack([nonfinite, square])
        else:
            stats = torch.tensor([nonfinite, square], dtype=torch.float64)
        self._collective("all_reduce (finite check / norm)", self.comm.all_reduce_sum, stats)
        return stats

    def _all_gather_params(self, source: Optional[torch.Tensor] = None) -> None:
        """Every rank's shard of ``source`` (default: the master) into the output buffer."""
        source = self.shard.master if source is None else source
        self._collective("all_gather (parameters)", self._all_gather_segments, self._output, source)

    def regather(self, param_shard: torch.Tensor, result: RoundResult) -> RoundResult:
        """Rebuild a checkpointed round's output from every rank's saved shard of it."""
        self._output, self._launch = self.comm_params, None
        if param_shard.is_cuda:  # copied on the caller's stream, read on the round's
            param_shard.record_stream(torch.cuda.current_stream(param_shard.device))
        self._collective("all_gather (restored parameters)", self._all_gather_segments, self.comm_params, param_shard)
        return result

    def carry_state(self) -> tuple[Optional[torch.Tensor], int, Optional[list[bool]]]:
        """The last estimate's reduced gradient shard, its count and which parameters had
        gradients in it (for checkpoints; the count may live on the device, so this waits for the
        round that set it)."""
        count = int(self._carried_count)
        if count == 0 or self._carried is None:
            return None, count, None
        mask = self._carried_mask
        if isinstance(mask, torch.Tensor):
            mask = mask.tolist()
        return self._carried, count, None if mask is None or all(mask) else [bool(m) for m in mask]

    def load_carry(self, carried: Optional[torch.Tensor], count: int, has_gradient: Optional[Sequence[bool]] = None) -> None:
        if carried is None or count == 0:
            self._carried_count = 0
            self._carried_mask = None
            return
        mask = None if has_gradient is None else tuple(bool(g) for g in has_gradient)
        self._carry(carried.to(dtype=self.shard.grad.dtype, device=self.shard.grad.device), count, mask)

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
        return transient

    @property
    def carried_bytes(self) -> int:
        return 0 if self._carried is None else self._carried.numel() * self._carried.element_size()

    @property
    def conversion_bytes(self) -> int:
        """Shard-sized (at most) buffers for a comm or parameter dtype other than the master's."""
        return sum(t.numel() * t.element_size() for t in (*self._grad_scratch, *self._param_scratch))


Flat = Any  # a model-layout flat buffer: ``buffers.Lanes`` (one tensor per dtype lane), or one tensor
Mask = Any  # which parameters had a gradient: None (all), a tuple of bools (host) or a boolean tensor (device)


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
