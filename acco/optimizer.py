"""``AccoOptimizer``: the public facade. It validates, owns the pipeline's bookkeeping and
delegates: layout math to ``layout``, buffers to ``buffers``, the round to ``round`` and
``shard``, background execution to ``engine``, collectives to ``comm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import weakref
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .agreement import AgreementCodec, HyperparameterCodec, LocalReport, Problem, PROBLEM_ADVICE
from .buffers import FlatBuffers
from .comm import Communicator, LocalCommunicator, make_communicator
from .engine import RoundEngine, RoundHandle, choose_engine, make_engine
from .layout import Layout, build_layout
from .ownership import ParameterWatch
from .policy import check_supported, choose_partition
from .round import NONFINITE_POLICIES, CollectiveError, ParameterOwnershipError, RoundInputs, RoundResult, RoundRunner
from .schedule import Mode, RoundKind, Schedule, round_kind
from .shard import ShardOptimizer

logger = logging.getLogger("acco")

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]], torch.optim.Optimizer]

_logged_single_worker = False


class AccoOptimizer(torch.optim.Optimizer):
    """A ZeRO-1 sharded optimizer whose communication runs while the next gradients are computed.

    Two ways to build it (they are equivalent)::

        opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-4))
        opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=3e-4)

    Every rank of the data-parallel group must construct it with the same model and settings
    (checked once, collectively); do not wrap the model in DDP, the optimizer reduces gradients.
    Each ``step()`` hands the gradients accumulated since the previous call to a background
    round (reduce-scatter → step of this rank's shard → all-gather). See ``mode``:

    * ``"acco"``: rounds alternate estimate / commit; one committed update per two calls.
    * ``"dpu"``: every round commits, with gradients one round stale; one update per call.
    * ``"sync"``: plain ZeRO-1, launch and wait; one update per call.

    Args:
        params: parameters or param groups, or an already built ``torch.optim.Optimizer``.
        optimizer_class: the inner optimizer class (omit when ``params`` is an optimizer).
        mode: ``"acco"``, ``"dpu"`` or ``"sync"``.
        process_group: the data-parallel group (default: the whole world). A private group
            over the same ranks is created for the background collectives.
        partition: ``"flat"`` (even split, may cut tensors; element-wise optimizers),
            ``"param"`` (whole tensors per rank) or ``"auto"``.
        max_grad_norm: clip the averaged gradient to this global L2 norm (all shards together).
        blocking: ``False`` lets ``step()`` return at once while a round is in flight; its
            gradients then join the next round (ranks may feed different counts).
        comm_dtype: dtype of the gradient reduce-scatter (default: the parameters' dtype).
        timeout: how long a background collective waits for the other ranks before the round
            fails with an error naming it (default: the process group's own timeout if it was
            set explicitly, else 5 minutes).
        nonfinite: ``"raise"`` (default) fails the update whose averaged gradient holds NaN/Inf,
            on every rank, before anything changes; ``"skip"`` skips such updates on every rank
            (counted in ``num_skipped_updates``). Non-finite values never reach the master weights.
        estimate: ``"plain"`` (default): an estimate round steps on the first half's averaged
            gradient ḡ₁, as in the paper. ``"momentum"`` (mode ``acco``, optimizers with a first
            moment: Adam, AdamW, NAdam, RAdam, Adamax): it steps on (ḡ₁ + m̂) / 2, predicting the
            second half's gradient by the bias-corrected first moment. Commits are unchanged.
        engine: ``"auto"`` (default), ``"thread"`` or ``"stream"``. ``"stream"`` enqueues each round
            on a side CUDA stream and never waits for the GPU (the default for CUDA parameters,
            except on a gloo group, whose collectives need the worker thread); ``"thread"`` runs
            rounds on a worker thread (the default on CPU). On CPU, ``"stream"`` runs each round
            at once in the caller's thread, with the stream engine's device-side decisions.
        **defaults: hyper-parameters for ``optimizer_class`` (class form only).
    """

    def __init__(
        self,
        params: ParamsT,
        optimizer_class: Optional[type] = None,
        *,
        mode: str = "acco",
        process_group: Optional[dist.ProcessGroup] = None,
        partition: str = "auto",
        max_grad_norm: Optional[float] = None,
        blocking: bool = True,
        comm_dtype: Optional[torch.dtype] = None,
        timeout: Optional[Union[datetime.timedelta, float]] = None,
        nonfinite: str = "raise",
        engine: str = "auto",
        estimate: str = "plain",
        **defaults: Any,
    ) -> None:
        self._constructed = False
        try:
            timeout = _parse_timeout(timeout)
            if nonfinite not in NONFINITE_POLICIES:
                raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
            template = _template_optimizer(params, optimizer_class, defaults)
            optimizer_class = type(template)
            check_supported(optimizer_class)
            self._mode = _parse_mode(mode)
            if self._mode is Mode.SYNC and not blocking:
                raise ValueError("blocking=False has no meaning in mode='sync', which waits for every round")
            partition_kind = choose_partition(optimizer_class, partition)
            if max_grad_norm is not None and not (float(max_grad_norm) > 0):
                raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
            groups = template.param_groups
            trainable = [p for g in groups for p in g["params"] if p.requires_grad]
            group_of = [i for i, g in enumerate(groups) for p in g["params"] if p.requires_grad]
            everything = [p for g in groups for p in g["params"]]
            frozen = [p for p in everything if not p.requires_grad]
            _check_params(trainable)
            comm_dtype = _parse_comm_dtype(comm_dtype, trainable[0].dtype)
            signature = _signature(optimizer_class, self._mode, partition_kind, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of)
            signature["settings"]["nonfinite"] = nonfinite
            _check_estimate(estimate, self._mode, optimizer_class)
            signature["settings"]["estimate"] = estimate
            engine_kind = choose_engine(engine, trainable[0].device, _backend_of(process_group))
            signature["settings"]["engine"] = engine_kind
            local_error: Optional[Exception] = None
        except (TypeError, ValueError, NotImplementedError) as error:
            signature, local_error = None, error
            timeout = None

        comm = make_communicator(process_group, timeout)
        try:
            if isinstance(comm, LocalCommunicator):
                _log_single_worker_once()
            # Collective: a rank that rejected its own arguments tells the others, so every rank raises.
            _check_same_on_every_rank(comm, signature, local_error)
            layout = build_layout(partition_kind, [p.numel() for p in trainable], group_of, comm.world_size)
            super().__init__(groups, dict(template.defaults))
            self._buffers = FlatBuffers(trainable, layout, comm_dtype)
            comm.broadcast(self._buffers.param_flat, src_rank=0)  # same start everywhere, as DDP does
            self._shard = ShardOptimizer(
                optimizer_class,
                template.defaults,
                _hyperparameters(groups),
                layout,
                comm.rank,
                self._buffers.shard(comm.rank),
                [p.shape for p in trainable],
            )
        except BaseException:
            comm.close()
            raise
        self._comm: Communicator = comm
        self._layout: Layout = layout
        self._optimizer_class = optimizer_class
        self._max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self._hyperparameter_codec = HyperparameterCodec(groups)
        self._runner = RoundRunner(
            comm,
            self._shard,
            self._buffers.comm_grads,
            self._buffers.comm_params,
            self._max_grad_norm,
            nonfinite,
            model_params=self._buffers.param_flat,
            agreement=AgreementCodec(comm.world_size, len(trainable), self._hyperparameter_codec.size),
            hyperparameter_codec=self._hyperparameter_codec,
            shard_range=layout.shard_range(comm.rank),
            estimate=estimate,
            decide_on_host=not (engine_kind == "stream" or self._buffers.device.type == "cuda"),
        )
        positions = {id(p): i for i, p in enumerate(everything)}
        self._watch = ParameterWatch(
            self._buffers, frozen, [positions[id(p)] for p in trainable], [positions[id(p)] for p in frozen]
        )
        self._has_gradient = [False] * len(trainable)  # per trainable parameter, since the last launch
        self._written = False  # the model's parameters were written outside the optimizer since the last launch
        self._problem: tuple[Problem, int] = (Problem.NONE, -1)  # a change that cannot be adopted
        self.state = ShardedStateView()  # type: ignore[assignment]  # the state lives in the shard's inner optimizer
        self._engine_kind = engine_kind
        self._engine: RoundEngine = make_engine(engine_kind, self._buffers.device)
        # CUDA rounds (and the stream engine on CPU) keep their decisions on the device.
        self._device_decisions = engine_kind == "stream" or self._buffers.device.type == "cuda"
        # At interpreter exit (or when the optimizer is dropped), the round in flight ends before
        # the worker stops: it is never left running detached. Collectives time out, so this ends.
        self._finalizer = weakref.finalize(self, self._engine.shutdown)
        self._schedule = Schedule(self._mode, blocking)
        self._handle: Optional[RoundHandle] = None  # the round in flight
        self._unresolved: deque[tuple[int, RoundHandle]] = deque()  # installed rounds whose outcome the host has not read
        self._failure: Optional[BaseException] = None
        self._holding = False  # the gradient buffer holds handed-over gradients not yet launched
        self._drained = True  # finish() has nothing to do: no step() since construction or the last finish()
        self._grads_written = False
        self._gathers_into_model = False
        self._num_updates = 0
        self._num_skipped = 0
        self._last_round: Optional[RoundResult] = None
        self._handle_index = -1
        self._buffers.attach_grads()
        self._hooks = _watch_gradient_writes(trainable, self)
        self._constructed = True
        logger.debug(
            "acco: %s over %d rank(s), %s partition, shard of %d elements, %d inner tensors",
            self._mode.value, comm.world_size, partition_kind.value, layout.shard_size, self._shard.num_tensors,
        )

    # ------------------------------------------------------------------ public properties
    @property
    def mode(self) -> str:
        return self._mode.value

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def rank(self) -> int:
        """This process's rank inside the data-parallel group."""
        return self._comm.rank

    @property
    def blocking(self) -> bool:
        return self._schedule.blocking

    @property
    def partition(self) -> str:
        return self._layout.kind.value

    @property
    def layout(self) -> Layout:
        return self._layout

    @property
    def max_grad_norm(self) -> Optional[float]:
        return self._max_grad_norm

    @property
    def num_updates(self) -> int:
        """Committed optimizer updates so far (estimate rounds do not count). On the stream engine
        reading it waits for the rounds installed so far."""
        self._resolve()
        return self._num_updates

    @property
    def num_skipped_updates(self) -> int:
        """Updates skipped because their averaged gradient was not finite (``nonfinite='skip'``)."""
        self._resolve()
        return self._num_skipped

    @property
    def timeout(self) -> Optional[datetime.timedelta]:
        """How long a background collective waits for the other ranks."""
        return self._comm.timeout

    @property
    def estimate(self) -> str:
        """``"plain"`` or ``"momentum"``: what an estimate round steps on (see the constructor)."""
        return self._runner.estimate

    @property
    def engine(self) -> str:
        """``"stream"`` or ``"thread"``: how rounds run in the background (see the constructor)."""
        return self._engine_kind

    @property
    def rounds_launched(self) -> int:
        return self._schedule.rounds_launched

    @property
    def rounds_installed(self) -> int:
        """Rounds whose parameters the model has received (the model holds the last one's)."""
        return self._schedule.rounds_installed

    @property
    def pending_micro_batches(self) -> int:
        """step() calls on this rank whose gradients wait for the next round."""
        return self._schedule.pending_calls

    @property
    def round_in_flight(self) -> bool:
        return self._handle is not None

    @property
    def round_finished(self) -> bool:
        """True when no round is running in the background (never waits)."""
        return self._handle is None or self._handle.done()

    @property
    def last_round(self) -> Optional[RoundResult]:
        """What the last installed round did (counts, kind, gradient norm)."""
        self._resolve()
        return self._last_round

    # ------------------------------------------------------------------ torch.optim API
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False):
            raise NotImplementedError(
                "AccoOptimizer does not support add_param_group after construction: parameters are laid out "
                "in flat buffers and sharded across ranks once. Pass every group to the constructor."
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients computed since the last ``step()``; gradients already handed to
        ``step()`` stay with the optimizer whatever ``set_to_none`` is."""
        self._check_usable()
        buffers = self._buffers
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is None or buffers.is_attached(index):
                continue
            if set_to_none:
                param.grad = None
            else:
                grad.detach_().requires_grad_(False)
                grad.zero_()
        if not self._holding and self._grads_written:
            buffers.grad_flat.zero_()
            self._has_gradient = [False] * len(self._has_gradient)  # a discarded backward gave no gradient
        self._grads_written = False

    # GradScaler hands itself to step() (its ``grad_scaler`` contract), so that an overflow on any rank
    # skips the step on every rank and every rank's scaler backs off alike, as with DDP.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler: Optional[Any] = None) -> Any:
        """Hand this micro-batch's gradients to the pipeline.

        Blocking mode: wait for the round in flight, install its parameters, launch the next
        round. Non-blocking mode: the same if that round has finished, else keep the gradients
        for the next round and return at once. ``mode='sync'`` also waits for the new round.

        ``grad_scaler`` is passed by ``torch.amp.GradScaler.step`` (do not pass it yourself): the
        gradients are unscaled, the ranks agree whether any of them overflowed, and if so every
        rank skips this call (its gradients are dropped) and every rank's scaler backs off.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_usable()
        scaled = grad_scaler is not None or hasattr(self, "found_inf")
        if scaled and not self._schedule.blocking:
            raise ValueError(
                "AccoOptimizer(blocking=False) cannot be stepped through a GradScaler: its overflow decision must be "
                "taken by every rank at the same call. Use blocking=True with GradScaler (or bf16, which needs no scaler)"
            )
        if self._schedule.blocking:
            # The stream engine learns a round's outcome (and its errors) two calls after its
            # launch: the same call on every rank, and by then the GPU is long past that round.
            self._resolve(up_to=self._schedule.rounds_launched - 2)
        if self._schedule.rounds_launched == 0 and self._mode is Mode.ACCO:
            _refuse_plain_hf_trainer()
        self._look_at_model()
        if scaled and not self._agree_to_step(grad_scaler):
            return loss
        if self._problem[0] is Problem.NONE:
            for index in self._buffers.fold_foreign_grads():
                self._has_gradient[index] = True
        self._drained = False
        self._schedule.record_call()
        if not self._schedule.should_launch(self.round_finished):
            self._buffers.detach_grads()  # keeps them safe from any zero_grad variant
            self._holding = True
            return loss
        if self._handle is not None:
            self._install()
        self._launch(contributes=True, finishing=False)
        if self._schedule.waits_after_launch:
            self._install()
        return loss

    def adopt_model_parameters(self) -> None:
        """Collective: the model's current parameters become the committed parameters.

        For weights changed in a way the per-step check cannot see (a write through ``p.data``),
        or to say it explicitly after ``model.load_state_dict(...)``. Rank 0's parameters are
        broadcast, so every rank's model and fp32 master hold the same values afterwards. The
        round in flight finishes first; its parameters are not installed. Gradients already handed
        to ``step()`` stay and are applied by the next rounds, from the adopted parameters.
        """
        self._check_usable()
        if self._handle is not None:
            self._install(into_model=False)
        self._resolve()
        self._look_at_model()
        problem, index = self._problem
        verdict = None if problem is Problem.NONE else f"parameter {index}: {PROBLEM_ADVICE[problem]}"
        verdicts = self._collective("adopt_model_parameters", self._comm.all_gather_object, verdict)
        for rank, other in enumerate(verdicts):
            if other is not None:
                raise ParameterOwnershipError(f"acco: cannot adopt the model's parameters: on rank {rank}, {other}")
        buffers = self._buffers
        self._collective("adopt_model_parameters", self._comm.broadcast, buffers.param_flat, 0)
        start, end = self._layout.shard_range(self.rank)
        self._shard.master.copy_(buffers.param_flat[start:end])
        self._watch.settle()
        self._written = False

    def _look_at_model(self) -> None:
        """Notice model parameters that were moved, cast, written or unfrozen since the last look
        (O(number of parameters)). What cannot be adopted is reported at the next round, which
        then fails on every rank; on the CUDA stream engine it is raised here, on this rank."""
        if self._problem[0] is not Problem.NONE:
            return
        seen = self._watch.look()
        self._written = self._written or seen.written
        if seen.problem is not Problem.NONE:
            self._problem = (seen.problem, seen.problem_param)
            if self._device_decisions and self._buffers.device.type == "cuda":
                self._failure = ParameterOwnershipError(
                    f"acco: parameter {seen.problem_param} can no longer be trained by AccoOptimizer: {PROBLEM_ADVICE[seen.problem]}"
                )
                raise self._failure

    def _agree_to_step(self, grad_scaler: Optional[Any]) -> bool:
        """GradScaler: unscale, then agree across ranks whether any gradient overflowed. On overflow
        every rank drops this call's gradients and its scaler sees the overflow (so all back off)."""
        if grad_scaler is not None:
            state = grad_scaler._per_optimizer_states[id(self)]
            if state["stage"].name == "READY":
                grad_scaler.unscale_(self)  # p.grad are views of our gradient buffer: unscaled in place
            found = list(state["found_inf_per_device"].values())
            local = float(sum(float(t.item()) for t in found))
        else:  # the attribute contract of newer torch: ``grad_scale`` (None once unscaled) and ``found_inf``
            scale = getattr(self, "grad_scale", None)
            if scale is not None:
                inverse = 1.0 / float(scale)
                for param in self._buffers.params:
                    if param.grad is not None:
                        param.grad.mul_(inverse)
            found, local = [], float(self.found_inf)
        if self._handle is not None:
            self._install()  # nothing may run on our group meanwhile; the next launch would install it anyway
        flag = torch.tensor([local], dtype=torch.float64, device=self._comm_device())
        self._collective("step (GradScaler overflow check)", self._comm.all_reduce_sum, flag)
        overflow = float(flag.item()) > 0
        for tensor in found:
            tensor.fill_(1.0 if overflow else 0.0)
        if overflow:
            self.zero_grad(set_to_none=True)
            self._buffers.grad_flat.zero_()
            self._has_gradient = [False] * len(self._has_gradient)
            logger.info("acco: a gradient overflowed on some rank; every rank skips this step() call")
        return not overflow

    def _comm_device(self) -> torch.device:
        backend = getattr(self._comm, "backend", "none")
        return self._buffers.device if backend == "nccl" else torch.device("cpu")

    def finish(self) -> None:
        """Drain the pipeline: afterwards every rank's model holds the same committed parameters
        and nothing is in flight. Call it on every rank before evaluating or saving a final model.

        If the last round was an estimate, one commit round with its gradients runs first. In
        non-blocking mode, ranks first agree that all of them are finishing (a rank that gets
        here early keeps joining rounds with no gradients until the others arrive).
        """
        self._check_usable()
        if self._drained:  # nothing happened since the last finish(), on any rank
            return
        self._look_at_model()
        if self._handle is not None:
            self._install()
        if not self._schedule.blocking:
            while True:
                self._launch_and_install(contributes=True, finishing=True)
                if self._last_round.all_finishing:  # non-blocking mode reads each outcome at install
                    break
        if self._schedule.has_uncommitted_estimate:
            self._launch_and_install(contributes=False, finishing=True)
        if self._holding:
            self._buffers.attach_grads()
            self._holding = False
        self._resolve()
        self._drained = True

    @contextlib.contextmanager
    def committed_parameters(self) -> Iterator[None]:
        """Inside the block the model holds the last committed parameters, for exact evaluation.

        Blocking mode: waits for the round in flight; if it commits, its parameters are swapped
        into the model for the block and swapped back after, so training continues exactly as if
        nothing happened (no collective: every rank may evaluate on its own schedule). Non-blocking
        mode: ranks must agree first, so this calls ``finish()`` (collective).
        """
        self._check_usable()
        if not self._schedule.blocking:
            self.finish()
            yield
            return
        if self._handle is None:
            yield
            return
        result = self._peek()
        if result.kind is RoundKind.ESTIMATE:  # the model already holds the last commit's output
            yield
            return
        self._buffers.swap_params_with_comm()
        try:
            yield
        finally:
            self._buffers.swap_params_with_comm()

    def close(self) -> None:
        """Wait for the round in flight, stop the background worker and free the private group.
        Does not commit anything: call ``finish()`` first to keep the last gradients."""
        handle, self._handle = self._handle, None
        try:
            if handle is not None and self._failure is None:
                handle.result()  # its error, if any, is raised after the clean-up below
        finally:
            self._finalizer()
            if self._buffers.device.type == "cuda":  # installed rounds may still run on the side stream
                torch.cuda.synchronize(self._buffers.device)
            self._comm.close()
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this optimizer holds on this rank, by buffer (see the README's formula)."""
        shard = self._shard
        sizes = dict(self._buffers.nbytes())
        sizes["master_shard"] = _nbytes(shard.master)
        sizes["grad_shard"] = _nbytes(shard.grad)
        sizes["estimate_carry"] = self._runner.carried_bytes
        sizes["dtype_conversion"] = self._runner.conversion_bytes
        sizes["optimizer_state"] = shard.state_bytes()
        sizes["comm_scratch"] = self._comm.scratch_bytes
        sizes["estimate_backup"] = _nbytes(shard._master_backup) + sum(_nbytes(t) for t in shard._state_backup.values())
        sizes["total"] = sum(sizes.values())
        return sizes

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """This rank's state, in ``torch.optim`` format with our own under the key ``"acco"``.

        Holds everything needed to resume bit for bit in a run with the same world size: this
        rank's master shard and inner-optimizer state, the round in flight (its result, shard-sized),
        the estimate's carried gradients and the counters. Save it beside the model's
        ``state_dict()`` on every rank. Blocking mode: waits for the round in flight, no collective.
        Non-blocking mode: collective, it calls ``finish()`` first (the ranks must agree).
        To change the world size, save ``consolidated_state_dict()`` instead.
        """
        self._check_usable()
        if not self._schedule.blocking:
            self.finish()
        self._resolve()
        result = self._peek() if self._handle is not None else None
        saved = super().state_dict()  # the user's groups; our own ``state`` is empty
        carried, carried_count, carried_mask = self._runner.carry_state()
        in_flight = None
        if result is not None:
            start, end = self._layout.shard_range(self.rank)
            in_flight = {"result": _result_to_dict(result), "param_shard": self._buffers.comm_params[start:end].clone()}
        saved["acco"] = {
            "format": ckpt.PER_RANK,
            "version": ckpt.FORMAT_VERSION,
            "rank": self.rank,
            **self._fingerprint(),
            "master_shard": self._shard.master.clone(),
            "inner_state": self._shard.view_states(),
            "carried_gradients": None if carried is None else carried.clone(),
            "carried_count": carried_count,
            "carried_mask": carried_mask,
            "rounds_launched": self._schedule.rounds_launched,
            "rounds_installed": self._schedule.rounds_installed,
            "pending_calls": self._schedule.pending_calls,
            "num_updates": self._num_updates,
            "num_skipped_updates": self._num_skipped,
            "in_flight": in_flight,
            "last_round": None if self._last_round is None else _result_to_dict(self._last_round),
        }
        return saved

    def consolidated_state_dict(self, to: int = 0) -> Optional[dict[str, Any]]:
        """Collective. The committed state of every parameter, whole, on rank ``to`` (``None`` on the
        others): a world-size-independent checkpoint that ``load_state_dict`` takes at any world size.

        Calls ``finish()`` first, so gradients handed to ``step()`` but not committed yet are
        committed before saving. Its ``state`` and ``param_groups`` are those of a plain optimizer
        of the inner class over the same parameters (``torch.optim.AdamW.load_state_dict`` reads
        it); ``acco`` adds the fp32 master weights and counters. Ranks send their shards one at
        a time, so rank ``to`` holds at most the full state plus one shard.
        """
        self._check_usable()
        if not isinstance(to, int) or not 0 <= to < self.world_size:
            raise ValueError(f"to must be a rank in [0, {self.world_size}), got {to!r}")
        self.finish()
        shard = self._shard
        builder = ckpt.PortableStateBuilder(self._layout, [p.shape for p in self._buffers.params]) if self.rank == to else None
        for source in range(self.world_size):
            payload = (shard.spans, shard.view_states(), shard.master) if self.rank == source else None
            payload = self._collective("consolidated_state_dict", self._comm.broadcast_object, payload, source)
            if builder is not None:
                builder.add_rank(source, *payload)
            del payload
        if builder is None:
            return None
        index = self._torch_indices()
        saved = super().state_dict()
        saved["state"] = {index[t]: state for t, state in sorted(builder.state.items())}
        saved["acco"] = {
            "format": ckpt.PORTABLE,
            "version": ckpt.FORMAT_VERSION,
            **self._fingerprint(),
            "master": {index[t]: tensor for t, tensor in sorted(builder.master.items())},
            "elementwise_keys": sorted(builder.elementwise_keys),
            "num_updates": self._num_updates,
            "num_skipped_updates": self._num_skipped,
        }
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective. Load this rank's ``state_dict()`` (same world size: exact resume) or a
        ``consolidated_state_dict()`` (any world size: committed state; nothing in flight).

        Every rank validates its own dict first and they compare notes, so a bad or mismatched
        checkpoint raises ``CheckpointError`` on every rank before anything changes. A portable
        checkpoint also writes its committed parameters into the model; a per-rank one expects
        the model's own ``state_dict`` (saved at the same call) to be loaded as well.
        """
        self._check_usable()
        self._resolve()
        if self._handle is not None:  # nothing may run on our group meanwhile; replaced below on success
            self._peek()
        error: Optional[Exception] = None
        apply: Optional[Callable[[], None]] = None
        point = None
        try:
            form, meta = ckpt.check_header(state_dict, self._fingerprint(), self.rank)
            ckpt.check_param_groups(state_dict["param_groups"], self.param_groups)
            if form == ckpt.PER_RANK:
                apply = self._plan_per_rank_load(meta)
                point = (form, meta.get("rounds_launched"), meta.get("rounds_installed"), meta.get("num_updates"))
            else:
                apply = self._plan_portable_load(state_dict, meta)
                point = (form, meta.get("num_updates"))
        except ckpt.CheckpointError as caught:
            error = caught
        verdicts = self._collective(
            "load_state_dict", self._comm.all_gather_object, {"error": None if error is None else str(error), "point": point}
        )
        if error is not None:
            raise error
        for rank, verdict in enumerate(verdicts):
            if verdict["error"] is not None:
                raise ckpt.CheckpointError(f"rank {rank} cannot load its checkpoint: {verdict['error']}")
        for rank, verdict in enumerate(verdicts):
            if verdict["point"] != verdicts[0]["point"]:
                raise ckpt.CheckpointError(
                    f"the ranks' checkpoints were taken at different points: (form, rounds launched, rounds installed, "
                    f"updates) is {verdicts[0]['point']} on rank 0 but {verdict['point']} on rank {rank}"
                )
        self._handle = None  # the checkpoint replaces whatever this optimizer had in flight
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self._holding:  # gradients handed over before the load belong to the abandoned run
            self._buffers.grad_flat.zero_()
            self._buffers.attach_grads()
            self._holding = False
        apply()
        self._grads_written = True
        # The model's own state_dict, loaded with this one (before it, as documented), wrote its
        # parameters: that is the checkpoint's model, not a change to adopt.
        self._watch.settle()
        self._written = False
        self._problem = (Problem.NONE, -1)
        self._has_gradient = [False] * len(self._has_gradient)

    def _plan_per_rank_load(self, meta: dict[str, Any]) -> Callable[[], None]:
        """Validate a per-rank checkpoint fully; return the function that applies it."""
        shard = self._shard
        saved = ckpt.read_per_rank(meta, self._layout, shard.spans, shard.master.dtype, self._buffers.dtype)
        flight_result = None if saved.in_flight_result is None else _result_from_dict(saved.in_flight_result)
        last = None if saved.last_round is None else _result_from_dict(saved.last_round)
        counters = saved.counters

        def apply() -> None:
            shard.master.copy_(saved.master_shard)
            shard.load_view_states(saved.inner_state)
            self._runner.load_carry(saved.carried_gradients, counters["carried_count"], saved.carried_mask)
            schedule = self._schedule
            schedule.rounds_launched = counters["rounds_launched"]
            schedule.rounds_installed = counters["rounds_installed"]
            schedule.pending_calls = counters["pending_calls"]
            self._num_updates = counters["num_updates"]
            self._num_skipped = counters["num_skipped_updates"]
            self._last_round = last
            self._gathers_into_model = False
            if flight_result is not None:
                # Each rank saved only its own shard of the round's result: gather it again, in
                # the background like a round (every rank loads, so every rank joins).
                runner, result = self._runner, flight_result
                param_shard = saved.in_flight_shard.to(self._buffers.device, copy=True)
                self._handle = self._engine.submit(lambda: runner.regather(param_shard, result))
                self._handle_index = result.index
            self._drained = flight_result is None and schedule.pending_calls == 0 and not schedule.has_uncommitted_estimate

        return apply

    def _plan_portable_load(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> Callable[[], None]:
        """Validate a portable checkpoint and cut this rank's shard of it; return the function that applies it."""
        shard, buffers = self._shard, self._buffers
        saved = ckpt.read_portable(
            state_dict, meta, self._layout, self.rank, shard.spans, self._torch_indices(), [p.shape for p in buffers.params]
        )

        def apply() -> None:
            ckpt.master_shard_from_portable(self._layout, self.rank, saved.master, shard.master)
            shard.load_view_states(saved.inner_state)
            for t, view in enumerate(buffers.param_views):
                view.copy_(saved.master[t])  # the committed parameters, so the model matches the optimizer
            self._runner.load_carry(None, 0)
            self._schedule.rounds_launched = self._schedule.rounds_installed = self._schedule.pending_calls = 0
            self._num_updates = saved.counters["num_updates"]
            self._num_skipped = saved.counters["num_skipped_updates"]
            self._last_round = None
            self._drained = True

        return apply

    def _collective(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A collective issued from the training thread; a failure or timeout says that every rank must call ``what``."""
        try:
            return fn(*args)
        except RuntimeError as error:
            raise CollectiveError(
                f"acco: {what}() is collective: every rank of the group must call it (rank {self.rank} of "
                f"{self.world_size} waited{'' if self._comm.timeout is None else f' up to {self._comm.timeout}'}): {error}"
            ) from error

    def _fingerprint(self) -> dict[str, Any]:
        return ckpt.fingerprint(
            self._optimizer_class, self._layout, [p.shape for p in self._buffers.params], self._buffers.dtype, self._mode.value
        )

    def _torch_indices(self) -> list[int]:
        """The index ``torch.optim``'s state dicts give each trainable parameter (all params count)."""
        indices, position = [], 0
        for group in self.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    indices.append(position)
                position += 1
        return indices

    # ------------------------------------------------------------------ pipeline internals
    def _launch(self, *, contributes: bool, finishing: bool) -> None:
        launch = self._schedule.launch(contributes=contributes)
        hyperparameters = _hyperparameters(self.param_groups)
        problem, problem_param = self._problem
        report = LocalReport(
            count=launch.local_count,
            finishing=finishing,
            has_gradient=tuple(self._has_gradient) if contributes else (False,) * len(self._has_gradient),
            written=self._written,
            problem=problem,
            problem_param=problem_param,
            hyperparameters=self._hyperparameter_codec.encode(hyperparameters),
        )
        if contributes:
            self._has_gradient = [False] * len(self._has_gradient)
        self._written = False
        inputs = RoundInputs(report, hyperparameters, finishing)
        if launch.local_count > 0:
            self._buffers.stage_gradients()
            self._grads_written = False
        if self._holding:
            self._buffers.attach_grads()
            self._holding = False
        runner = self._runner
        # sync waits for the round, so nothing reads the model meanwhile: gather straight into it
        # and save a model-sized copy per step.
        self._gathers_into_model = self._schedule.waits_after_launch
        output = self._buffers.param_flat if self._gathers_into_model else None
        pending_commits = sum(1 for index, _ in self._unresolved if round_kind(self._mode, index) is RoundKind.COMMIT)
        update = self._num_updates + self._num_skipped + pending_commits + 1
        self._handle = self._engine.submit(lambda: runner.run(launch, inputs, output, update))
        self._handle_index = launch.index

    def _install(self, into_model: bool = True) -> None:
        """Swap the round in flight into the model (after it, in device order). Its outcome is read
        now on the thread engine and in non-blocking mode, else two calls later (see step()).

        Where the user wrote the model's parameters since the round was launched, the model keeps
        them (the next round adopts them): a round computed from the old ones must not overwrite them."""
        handle, self._handle = self._handle, None
        try:
            handle.wait()
        except BaseException as error:
            self._failure = error
            raise
        if into_model and not self._written and not self._gathers_into_model:
            self._buffers.install_params()
        self._schedule.installed()
        self._unresolved.append((self._handle_index, handle))
        if self._engine.resolves_on_wait or not self._schedule.blocking:
            self._resolve()

    def _resolve(self, up_to: Optional[int] = None) -> None:
        """Read the outcome of installed rounds (up to round index ``up_to``), waiting for them if
        needed, and count them. A round's error (e.g. a non-finite gradient) is raised here."""
        if self._failure is not None:  # counters stay as they were when the pipeline broke
            return
        while self._unresolved and (up_to is None or self._unresolved[0][0] <= up_to):
            _, handle = self._unresolved[0]
            try:
                result = handle.result()
            except BaseException as error:
                self._failure = error
                raise
            self._unresolved.popleft()
            if result.kind is RoundKind.COMMIT and result.updated:
                self._num_updates += 1
            if result.kind is RoundKind.COMMIT and result.skipped:
                self._num_skipped += 1
                logger.warning(
                    "acco: skipped update %d (round %d): non-finite averaged gradient", self._num_updates + self._num_skipped, result.index
                )
            self._last_round = result

    def _launch_and_install(self, *, contributes: bool, finishing: bool) -> None:
        self._launch(contributes=contributes, finishing=finishing)
        self._install()

    def _peek(self) -> RoundResult:
        """Wait for the round in flight without installing it (the next step() will)."""
        try:
            self._handle.wait()
            return self._handle.result()
        except BaseException as error:
            self._failure = error
            raise

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(
                "AccoOptimizer cannot continue: a background round failed earlier (see the chained exception)"
            ) from self._failure


# ---------------------------------------------------------------------- construction helpers
def _template_optimizer(params: ParamsT, optimizer_class: Optional[type], defaults: dict[str, Any]) -> torch.optim.Optimizer:
    """The user's optimizer (instance form), or one built from the class form. Building it lets
    the inner optimizer validate its own hyper-parameters before anything else changes."""
    if isinstance(params, AccoOptimizer):
        raise TypeError("cannot wrap an AccoOptimizer in another AccoOptimizer")
    if isinstance(params, torch.optim.Optimizer):
        if optimizer_class is not None or defaults:
            raise TypeError(
                "when wrapping an optimizer instance, pass neither optimizer_class nor hyper-parameters "
                f"(got optimizer_class={optimizer_class!r}, {sorted(defaults)})"
            )
        if any(len(s) for s in params.state.values()):
            raise ValueError(
                f"the {type(params).__name__} to wrap already has optimizer state; wrap a freshly built optimizer"
            )
        return params
    if optimizer_class is None:
        raise TypeError("optimizer_class is required unless params is a torch.optim.Optimizer instance")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if issubclass(optimizer_class, AccoOptimizer):
        raise TypeError("optimizer_class cannot be AccoOptimizer itself")
    if isinstance(params, torch.Tensor):
        params = [params]
    return optimizer_class(params, **defaults)


def _backend_of(process_group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """The backend our collectives will use; ``None`` when there is no one to talk to."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return None
    return str(dist.get_backend(process_group))


def _parse_timeout(timeout: Any) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        value = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        value = datetime.timedelta(seconds=float(timeout))
    else:
        raise TypeError(f"timeout must be a datetime.timedelta or a number of seconds, got {timeout!r}")
    if value is not None and value.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return value


def _result_to_dict(result: RoundResult) -> dict[str, Any]:
    """Plain types only, so that ``torch.load(weights_only=True)`` reads our checkpoints."""
    return {**dataclasses.asdict(result), "kind": result.kind.value}


def _result_from_dict(raw: Any) -> RoundResult:
    try:
        return RoundResult(**{**raw, "kind": RoundKind(raw["kind"])})
    except (TypeError, KeyError, ValueError) as error:
        raise ckpt.CheckpointError(f"corrupted checkpoint: a round record is unreadable ({error})") from error


ESTIMATES = ("plain", "momentum")
_FIRST_MOMENT_OPTIMIZERS = tuple(
    getattr(torch.optim, name) for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax") if hasattr(torch.optim, name)
)


def _check_estimate(estimate: Any, mode: Mode, optimizer_class: type) -> None:
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if estimate == "plain":
        return
    if mode is not Mode.ACCO:
        raise ValueError(f"estimate={estimate!r} shapes estimate rounds, which only mode='acco' has (mode is {mode.value!r})")
    if not issubclass(optimizer_class, _FIRST_MOMENT_OPTIMIZERS):
        raise ValueError(
            f"estimate='momentum' predicts the second half's gradient by the optimizer's first moment (exp_avg, betas); "
            f"{optimizer_class.__name__} has none. Use estimate='plain'"
        )


def _parse_mode(mode: Any) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be one of {[m.value for m in Mode]}, got {mode!r}") from None


def _parse_comm_dtype(comm_dtype: Optional[torch.dtype], param_dtype: torch.dtype) -> torch.dtype:
    if comm_dtype is None:
        return param_dtype
    if not isinstance(comm_dtype, torch.dtype) or not comm_dtype.is_floating_point:
        raise TypeError(f"comm_dtype must be a floating torch.dtype such as torch.bfloat16, got {comm_dtype!r}")
    return comm_dtype


def _check_params(trainable: list[torch.Tensor]) -> None:
    if not trainable:
        raise ValueError("AccoOptimizer got no trainable parameters (all have requires_grad=False)")
    devices = sorted({str(p.device) for p in trainable})
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, got {devices}")
    dtypes = sorted({str(p.dtype) for p in trainable})
    if len(dtypes) > 1:
        raise ValueError(
            f"all trainable parameters must share one dtype, got {dtypes}; cast the model (e.g. model.to(torch.bfloat16))"
        )
    if not trainable[0].dtype.is_floating_point:
        raise ValueError(f"trainable parameters must be floating point, got {trainable[0].dtype}")
    for index, p in enumerate(trainable):
        if p.layout != torch.strided:
            raise ValueError(f"parameter {index} has layout {p.layout}; only dense (strided) parameters are supported")


def _signature(optimizer_class, mode, partition, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of) -> dict[str, Any]:
    return {
        "params": [(tuple(p.shape), str(p.dtype), g) for p, g in zip(trainable, group_of)],
        "settings": {
            "optimizer_class": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "mode": mode.value,
            "partition": partition.value,
            "blocking": bool(blocking),
            "comm_dtype": str(comm_dtype),
            "max_grad_norm": max_grad_norm,
            "hyper-parameters": [{k: repr(v) for k, v in g.items() if k != "params"} for g in groups],
        },
    }


def _check_same_on_every_rank(comm: Communicator, signature: Optional[dict[str, Any]], local_error: Optional[Exception]) -> None:
    """Collective: every rank sees every rank's verdict and signature, so every rank raises alike.

    Parameters are compared before settings: a dtype difference also changes the default comm_dtype.
    """
    verdict = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    everyone = comm.all_gather_object({"error": verdict, "signature": signature})
    if local_error is not None:
        raise local_error
    for rank, other in enumerate(everyone):
        if other["error"] is not None:
            raise ValueError(f"rank {rank} rejected its AccoOptimizer arguments: {other['error']}")
    reference = everyone[0]["signature"]
    for rank, other in enumerate(everyone[1:], start=1):
        other = other["signature"]
        if other == reference:
            continue
        mine, theirs = reference["params"], other["params"]
        if len(mine) != len(theirs):
            raise ValueError(f"trainable parameters differ across ranks: rank 0 has {len(mine)}, rank {rank} has {len(theirs)}")
        for index, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                raise ValueError(
                    f"trainable parameter {index} differs across ranks: (shape, dtype, group) is {a} on rank 0 but {b} on rank {rank}"
                )
        for key, value in reference["settings"].items():
            if other["settings"][key] != value:
                raise ValueError(
                    f"AccoOptimizer settings differ across ranks: {key} is {value!r} on rank 0 but {other['settings'][key]!r} on rank {rank}"
                )


def _hyperparameters(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' settings as they are now (tensors copied, so later in-place edits do not leak in)."""
    return [
        {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        for g in groups
    ]


def _watch_gradient_writes(params: list[torch.Tensor], optimizer: AccoOptimizer) -> list[Any]:
    """After each parameter's gradient is accumulated: note that a backward wrote gradients (so
    ``zero_grad`` clears the buffer only then) and, while the buffer holds handed-over gradients
    (non-blocking mode), add the fresh gradient into it at once and release it."""
    ref = weakref.ref(optimizer)

    def watcher(index: int) -> Callable[[torch.Tensor], None]:
        def on_gradient(_: torch.Tensor) -> None:
            opt = ref()
            if opt is None:
                return
            opt._grads_written = True
            opt._has_gradient[index] = True
            if opt._holding:
                opt._buffers.fold_grad(index, release=True)

        return on_gradient

    return [p.register_post_accumulate_grad_hook(watcher(i)) for i, p in enumerate(params)]


def _refuse_plain_hf_trainer(depth: int = 12) -> None:
    """Mode ``acco`` under a plain ``transformers.Trainer`` trains, but wrongly for its user: Trainer counts
    ``step()`` calls as updates (two per update here), wraps the model in DDP and saves an uncommitted
    estimate at the end. Checked once, at the first ``step()`` (every rank runs the same Trainer)."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_class = getattr(trainer_module, "Trainer", None)
    if trainer_class is None:
        return
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_class) and not hasattr(owner, "acco_kwargs"):
            raise ValueError(
                "acco: AccoOptimizer(mode='acco') is being stepped by a plain transformers.Trainer, which would count "
                "each of its two step() calls per update as a training step, wrap the model in DDP and save an "
                "uncommitted estimate at the end. Use acco.integrations.hf.AccoTrainer instead of Trainer (one line), "
                "or mode='sync'"
            )
        frame = frame.f_back


def _log_single_worker_once() -> None:
    global _logged_single_worker
    if _logged_single_worker:
        return
    _logged_single_worker = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.warning(
            "acco: WORLD_SIZE=%s but torch.distributed is not initialised: this process trains alone. "
            "Call torch.distributed.init_process_group() before building AccoOptimizer.",
            os.environ["WORLD_SIZE"],
        )
    else:
        logger.info("acco: a single worker (no process group, or a group of one): nothing to communicate")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardedStateError(KeyError):
    """``opt.state[p]`` on an AccoOptimizer: the state is sharded across ranks."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class ShardedStateView(dict):
    """``AccoOptimizer.state``: always empty. Each rank's inner optimizer holds the state of its
    own shard (fp32, flat views); reading ``opt.state[p]`` raises a clear error instead of a bare
    ``KeyError``, and neither reading nor writing leaves entries that would reach ``state_dict()``."""

    _WHERE = (
        "AccoOptimizer shards the optimizer state across ranks (ZeRO-1): each rank's inner optimizer holds the state "
        "of its own slice of the parameters, so opt.state is empty. For the whole state of every parameter, keyed as "
        "torch.optim does, call opt.consolidated_state_dict() on every rank (collective; the result is on rank 0)"
    )

    def __missing__(self, key: Any) -> Any:
        raise ShardedStateError(self._WHERE)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ShardedStateError(self._WHERE)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        raise ShardedStateError(self._WHERE)
