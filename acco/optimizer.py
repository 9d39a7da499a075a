"""``AccoOptimizer``: the public facade (docs/design.md §3). It checks each call against the
pipeline's state and delegates: argument checks to ``validation``, gradients to ``handover``,
rounds to ``pipeline`` (which drives ``round`` through an ``engine``), checkpoints to
``checkpoint``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import weakref
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from . import amp
from . import validation
from .buffers import FlatBuffers
from .checkpoint import ShardedStateView
from .checkpoint_io import CheckpointIO
from .comm import Communicator, LocalCommunicator, make_communicator
from .layout import Layout, build_layout
from .noise_scale import NoiseScale
from .pipeline import Pipeline
from .outcome import RoundResult
from .schedule import Mode
from .shard import ShardOptimizer
from .validation import ParamsT

logger = logging.getLogger("acco")


def _on_the_callers_streams(method: Callable[..., Any]) -> Callable[..., Any]:
    """On CUDA, a public call's work comes after the device's default stream as well as the caller's
    current one, and both see its results (``RoundEngine.calling``): a call made under a side stream
    does not race the default stream's gradients or the next forward."""

    @functools.wraps(method)
    def wrapper(self: "AccoOptimizer", *args: Any, **kwargs: Any) -> Any:
        with self._pipeline.calling():
            return method(self, *args, **kwargs)

    return wrapper


class AccoOptimizer(torch.optim.Optimizer, Joinable):
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
        comm_dtype: dtype of the gradient reduce-scatter (default: each parameter's own dtype).
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
        correction: ``"none"`` (default, the paper's rounds) or ``"secant"`` (mode ``acco``,
            ``estimate="plain"``): the first half's gradient, computed at the estimate θ̃ₜ, carries the
            loss's curvature along the estimate's error eₜ = θ̃ₜ − θₜ. The commit measures it,
            κ = eₜᵀ(ḡ₁ − ḡ₂)/|eₜ|² (clamped at 0), and steps on ḡ₁ − κ·eₜ in place of ḡ₁; the next
            estimate corrects its ḡ₁ by the same κ. Costs one shard-sized buffer and three numbers in
            the existing norm all-reduce. Closes most of acco's loss gap to ZeRO-1 with AdamW at its
            best rate, and adds noise where acco has little gap (lower rates, Muon): README, report 6.
            ``"secant-gated"``: the same with each κ shrunk by its own signal-to-noise over updates,
            κ·min(1, m²/v) (m, v: running averages of κ and κ²), so that a κ that is mostly noise
            corrects little. ``acco.secant`` gives the equations.
        engine: ``"auto"`` (default), ``"thread"`` or ``"stream"``. ``"stream"`` enqueues each round
            on a side CUDA stream and never waits for the GPU (the default for CUDA parameters,
            except on a gloo group, whose collectives need the worker thread); ``"thread"`` runs
            rounds on a worker thread (the default on CPU). On CPU, ``"stream"`` runs each round
            at once in the caller's thread, with the stream engine's device-side decisions.
        batch_rule_applied: the loop already gives each call half an update's batch and counts its
            schedule in calls (mode ``acco``); else the first ``step()`` logs that rule once (a warning on
            the ``acco`` logger). Also an attribute, settable later.
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
        correction: str = "none",
        batch_rule_applied: bool = False,
        **defaults: Any,
    ) -> None:
        self._constructed = False
        self.batch_rule_applied = bool(batch_rule_applied)
        settings: Optional[validation.Settings] = None
        local_error: Optional[Exception] = None
        try:
            settings = validation.check_arguments(
                params, optimizer_class, defaults, mode=mode, process_group=process_group, partition=partition,
                max_grad_norm=max_grad_norm, blocking=blocking, comm_dtype=comm_dtype, timeout=timeout,
                nonfinite=nonfinite, engine=engine, estimate=estimate, correction=correction,
            )
        except (TypeError, ValueError, NotImplementedError) as error:
            local_error = error
        comm = make_communicator(process_group, None if settings is None else settings.timeout)
        try:
            if isinstance(comm, LocalCommunicator):
                validation.log_single_worker_once()
            else:
                validation.warn_if_restarts_share_a_store(dist.get_rank())
            # Collective: a rank that rejected its own arguments tells the others, so every rank raises.
            validation.check_same_on_every_rank(comm, None if settings is None else settings.signature, local_error)
            trainable, groups = settings.trainable, settings.groups
            layout = build_layout(
                settings.param_kinds, [p.numel() for p in trainable], settings.group_of, comm.world_size, lanes=settings.lanes
            )
            super().__init__(groups, settings.defaults)
            buffers = FlatBuffers(trainable, layout, settings.comm_dtype)
            for lane in buffers.param_flat:
                comm.broadcast(lane, src_rank=0)  # same start everywhere, as DDP does
            initial = torch.cat([buffers.param_flat[b : b + n].to(buffers.shard_dtype) for _, b, n in layout.rank_pieces(comm.rank)])
            shard = ShardOptimizer(
                settings.optimizer_class, settings.defaults, validation.group_settings(groups), layout, comm.rank,
                initial, [p.shape for p in trainable],
                group_classes=settings.group_classes, class_defaults=settings.class_defaults,
            )
        except BaseException:
            comm.close()
            raise
        Joinable.__init__(self)
        self._comm: Communicator = comm
        self._user_group = None if isinstance(comm, LocalCommunicator) else (process_group or dist.group.WORLD)
        self._layout: Layout = layout
        self._buffers = buffers
        self._shard = shard
        self._mode = settings.mode
        self._max_grad_norm = settings.max_grad_norm
        self._engine_kind = settings.engine
        self._pipeline = Pipeline.assemble(self, settings, comm, layout, buffers, shard, self.param_groups)
        self._checkpoints = CheckpointIO(
            pipeline=self._pipeline, shard=shard, buffers=buffers, layout=layout, comm=comm,
            optimizer_class=settings.group_classes, mode=settings.mode.value, param_groups=self.param_groups,
            base_state_dict=weakref.WeakMethod(super().state_dict),  # no reference cycle: dropping frees the group
        )
        self.state = ShardedStateView()  # type: ignore[assignment]  # the state lives in the shard's inner optimizer
        self._constructed = True
        logger.debug(
            "acco: %s over %d rank(s), %s partition, shard of %d elements, %d inner tensors",
            self._mode.value, comm.world_size, layout.kind.value, layout.shard_size, shard.num_tensors,
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
        return self._pipeline.blocking

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
        self._pipeline.resolve()
        return self._pipeline.num_updates

    @property
    def num_skipped_updates(self) -> int:
        """Updates skipped because their averaged gradient was not finite (``nonfinite='skip'``)."""
        self._pipeline.resolve()
        return self._pipeline.num_skipped

    @property
    def timeout(self) -> Optional[datetime.timedelta]:
        """How long a background collective waits for the other ranks."""
        return self._comm.timeout

    @property
    def estimate(self) -> str:
        """``"plain"`` or ``"momentum"``: what an estimate round steps on (see the constructor)."""
        return self._pipeline.estimate

    @property
    def correction(self) -> str:
        """``"none"``, ``"secant"`` or ``"secant-gated"``: what a commit does with the estimate's error (see the
        constructor)."""
        secant = self._pipeline.runner.secant
        return "none" if secant is None else "secant-gated" if secant.gated else "secant"

    @property
    def engine(self) -> str:
        """``"stream"`` or ``"thread"``: how rounds run in the background (see the constructor)."""
        return self._engine_kind

    @property
    def pipeline_state(self) -> str:
        """``"idle"``, ``"in flight"``, ``"holding"``, ``"failed"`` or ``"closed"`` (docs/design.md §4)."""
        return self._pipeline.state.value

    @property
    def rounds_launched(self) -> int:
        return self._pipeline.rounds_launched

    @property
    def rounds_installed(self) -> int:
        """Rounds whose parameters the model has received (the model holds the last one's)."""
        return self._pipeline.rounds_installed

    @property
    def pending_micro_batches(self) -> int:
        """step() calls on this rank whose gradients wait for the next round."""
        return self._pipeline.pending_calls

    @property
    def round_in_flight(self) -> bool:
        return self._pipeline.in_flight

    @property
    def round_finished(self) -> bool:
        """True when no round is running in the background (never waits)."""
        return self._pipeline.round_finished

    @property
    def last_round(self) -> Optional[RoundResult]:
        """What the last installed round did (counts, kind, gradient norm, and for a commit with two
        halves the update's own gradient noise scale, ``noise_scale``)."""
        self._pipeline.resolve()
        return self._pipeline.last_round

    @property
    def noise_scale(self) -> Optional[NoiseScale]:
        """The gradient noise scale (McCandlish et al. 2018), a moving average (β = 0.95) over the
        committed updates so far, or None before the first one measured.

        Why it is free: every update averages two halves of its batch (the estimate's gradients and
        the commit's own), and their difference measures the gradient noise; the one number each rank
        adds rides in the round's existing all-reduce (``acco.noise_scale`` gives the maths). The
        values are in micro-batches, a micro-batch being one ``step()`` call on one rank (all ranks
        count): ``noise_scale.b_simple`` is the batch size, in micro-batches, at which the gradient
        noise equals the signal, and ``noise_scale.per_sample(b)`` converts to samples for micro-batches
        of ``b`` samples. Updates whose two halves are not comparable (a half without micro-batches,
        parameters with a gradient in one half only) and skipped updates are left out. Modes ``dpu``
        and ``sync`` have no halves: None. The same on every rank; carried by per-rank and consolidated
        checkpoints, started afresh by a sharded (DCP) load."""
        self._pipeline.resolve()
        return self._pipeline.noise_scale_average.value

    # ------------------------------------------------------------------ torch.optim API
    # Accepted states: every public method below starts with ``check_usable``, which refuses a
    # closed or failed pipeline; ``close()`` and the properties work in every state.
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_constructed", False):
            raise NotImplementedError(
                "AccoOptimizer does not support add_param_group after construction: parameters are laid out "
                "in flat buffers and sharded across ranks once. Pass every group to the constructor."
            )
        super().add_param_group(param_group)

    @_on_the_callers_streams
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients computed since the last ``step()``; gradients already handed to
        ``step()`` stay with the optimizer whatever ``set_to_none`` is."""
        self._pipeline.check_usable("zero_grad")
        self._pipeline.zero_grad(set_to_none)

    _acco_facade = True  # validation.FACADE_MARKER: refused as an inner optimizer or as the optimizer to wrap

    # GradScaler hands itself to step() (its ``grad_scaler`` contract), so that an overflow on any rank
    # skips the step on every rank and every rank's scaler backs off alike, as with DDP.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    @_on_the_callers_streams
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
        pipeline = self._pipeline
        pipeline.check_usable("step")
        Join.notify_join_context(self)  # inside ``with Join([opt])``: tell the ranks that ran out of data
        scaled = grad_scaler is not None or hasattr(self, "found_inf")
        if scaled and not self.blocking:
            raise ValueError(
                "AccoOptimizer(blocking=False) cannot be stepped through a GradScaler: its overflow decision must be "
                "taken by every rank at the same call. Use blocking=True with GradScaler (or bf16, which needs no scaler)"
            )
        if pipeline.rounds_launched == 0 and self._mode is Mode.ACCO:
            validation.check_first_acco_step(self)
        pipeline.before_step(amp.explicit_unscale_writes(self, grad_scaler, self._buffers.device) if scaled else 0)
        if scaled and not self._agree_to_step(grad_scaler):
            return loss
        pipeline.step()
        return loss

    @_on_the_callers_streams
    def adopt_model_parameters(self) -> None:
        """Collective: the model's current parameters become the committed parameters.

        For weights changed in a way the per-step check cannot see (a write through ``p.data``),
        or to say it explicitly after ``model.load_state_dict(...)``. Rank 0's parameters are
        broadcast, so every rank's model and fp32 master hold the same values afterwards. The
        round in flight finishes first; its parameters are not installed. Gradients already handed
        to ``step()`` stay and are applied by the next rounds, from the adopted parameters.
        """
        self._pipeline.check_usable("adopt_model_parameters")
        self._pipeline.adopt_model_parameters()

    # ------------------------------------------------------------------ torch.distributed.algorithms.Join
    def join_hook(self, **kwargs: Any) -> JoinHook:
        """``with Join([opt]):`` a rank that runs out of data joins its peers' rounds until they are done,
        as ``finish()`` does anyway: Join is supported for scripts written for DDP, not needed."""
        if not self.blocking:
            raise ValueError(
                "AccoOptimizer(blocking=False) does not take part in torch.distributed.algorithms.Join: its finish() "
                "already lets ranks that stepped a different number of times finish together"
            )
        return _JoinPeerCalls(self)

    @property
    def join_device(self) -> torch.device:
        return self._buffers.device if self._comm.backend == "nccl" else torch.device("cpu")

    @property
    def join_process_group(self) -> Any:
        return self._user_group

    def _agree_to_step(self, grad_scaler: Optional[Any]) -> bool:
        """GradScaler: unscale, then agree across ranks whether any gradient overflowed. On overflow
        every rank drops this call's gradients and its scaler sees the overflow (so all back off)."""
        found, local = amp.unscale_and_check(self, self._buffers.params, grad_scaler)
        overflow = self._pipeline.agree_on_overflow(local)
        for tensor in found:
            tensor.fill_(1.0 if overflow else 0.0)
        return not overflow

    @_on_the_callers_streams
    def _abandon_update(self) -> None:
        """Collective, blocking mode ``acco``, after the second call of an update was skipped (an overflow
        under AccoTrainer's GradScaler): its estimate half is dropped too, so the whole update is skipped
        on every rank, as Trainer + AdamW skips its step; the model gets the committed parameters back."""
        self._pipeline.check_usable("step")
        self._pipeline.abandon_update()

    @_on_the_callers_streams
    def finish(self) -> None:
        """Drain the pipeline: afterwards every rank's model holds the same committed parameters
        and nothing is in flight. Call it on every rank before evaluating or saving a final model.

        If the last round was an estimate, one commit round with its gradients runs first. In
        non-blocking mode, ranks first agree that all of them are finishing (a rank that gets
        here early keeps joining rounds with no gradients until the others arrive); this holds
        even for a rank with nothing new since its last ``finish()``.
        """
        self._pipeline.check_usable("finish")
        self._pipeline.finish("finish")

    @contextlib.contextmanager
    def committed_parameters(self) -> Iterator[None]:
        """Inside the block the model holds the last committed parameters, for exact evaluation.

        Blocking mode: waits for the round in flight; if it commits, its parameters are swapped
        into the model for the block and swapped back after, so training continues exactly as if
        nothing happened (no collective: every rank may evaluate on its own schedule). Non-blocking
        mode: ranks must agree first, so this calls ``finish()`` (collective).
        """
        self._pipeline.check_usable("committed_parameters")
        with self._pipeline.committed_view():
            yield

    def close(self) -> None:
        """Wait for the round in flight, stop the background worker and free the private group.
        Does not commit anything: call ``finish()`` first to keep the last gradients. Any use
        afterwards raises ``OptimizerClosedError``; closing twice does nothing."""
        self._pipeline.close()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this optimizer holds on this rank, by buffer (see the README's formula). Never
        waits: while a round runs, the state sizes are those its last step published."""
        return self._pipeline.memory_bytes()

    # ------------------------------------------------------------------ checkpoints
    @_on_the_callers_streams
    def state_dict(self) -> dict[str, Any]:
        """This rank's state, in ``torch.optim`` format with our own under the key ``"acco"``.

        Holds everything needed to resume bit for bit in a run with the same world size: this
        rank's master shard and inner-optimizer state, the round in flight (its result, shard-sized),
        the estimate's carried gradients and the counters, all copied: later steps do not change a
        saved dict. Save it beside the model's ``state_dict()`` on every rank. Blocking mode:
        waits for the round in flight, no collective. Non-blocking mode: collective, it calls
        ``finish()`` first (the ranks must agree). To change the world size, save
        ``consolidated_state_dict()`` instead.
        """
        self._pipeline.check_usable("state_dict")
        if not self.blocking:
            self._pipeline.finish("state_dict")
        return self._checkpoints.per_rank()

    @_on_the_callers_streams
    def consolidated_state_dict(self, to: int = 0) -> Optional[dict[str, Any]]:
        """Collective. The committed state of every parameter, whole, on rank ``to`` (``None`` on the
        others): a world-size-independent checkpoint that ``load_state_dict`` takes at any world size.

        Calls ``finish()`` first, so gradients handed to ``step()`` but not committed yet are
        committed before saving. Its ``state`` and ``param_groups`` are those of a plain optimizer
        of the inner class over the same parameters (``torch.optim.AdamW.load_state_dict`` reads
        it); ``acco`` adds the fp32 master weights and counters. Ranks send their shards one at
        a time, so rank ``to`` holds at most the full state plus one shard.
        """
        self._pipeline.check_usable("consolidated_state_dict")
        if not isinstance(to, int) or not 0 <= to < self.world_size:
            raise ValueError(f"to must be a rank in [0, {self.world_size}), got {to!r}")
        self._pipeline.finish("consolidated_state_dict")
        return self._checkpoints.portable(to)

    @_on_the_callers_streams
    def sharded_state_dict(self) -> dict[str, Any]:
        """Collective. What goes under ``"optimizer"`` in the dict given to ``torch.distributed.checkpoint``'s
        ``save`` / ``async_save`` (every rank writes only its own shard, nothing is gathered) and ``load``
        (at any world size: each rank reads the parts of the saved shards that overlap its own)::

            dcp.save({"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}, checkpoint_id=path)
            # ... any world size, a fresh model and optimizer:
            state = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}
            dcp.load(state, checkpoint_id=path)
            model.load_state_dict(state["model"]); opt.load_sharded_state_dict(state["optimizer"])

        Calls ``finish()`` first, so gradients handed to ``step()`` but not committed yet are committed
        before saving (the form is the committed state, whatever the world size, as
        ``consolidated_state_dict()``'s). It is ``torch.optim``'s form keyed by parameter name (optimizer
        built from ``named_parameters()``) or index, each state tensor with its parameter's shape, plus the
        fp32 master weights under ``"acco"``. Its tensors are views of this rank's master and state, so a
        save copies nothing (``dcp.async_save`` takes its copy at the call); ``dcp.load`` never writes
        into them (it reads into fresh buffers, which ``load_sharded_state_dict`` installs).
        """
        self._pipeline.check_usable("sharded_state_dict")
        self._pipeline.finish("sharded_state_dict")
        return self._checkpoints.sharded()

    @_on_the_callers_streams
    def load_sharded_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective. Install a template from ``sharded_state_dict()`` that ``dcp.load`` filled (see
        there): the committed master weights and optimizer state, the committed parameters into the
        model, the counters; nothing in flight (the next round is an estimate, as after ``finish()``).

        Every rank checks its part (optimizer classes, parameter shapes and grouping, that ``dcp.load``
        filled it) and the ranks compare notes, so a checkpoint that does not fit raises
        ``CheckpointError`` on every rank before anything changes. (What ``dcp.load`` refuses itself, keys
        or shapes the checkpoint does not have, it refuses before anything reaches the optimizer.) The
        template is spent afterwards: its buffers are the optimizer's state.
        """
        self._pipeline.check_usable("load_sharded_state_dict")
        self._checkpoints.load_sharded(state_dict)

    @_on_the_callers_streams
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Collective. Load this rank's ``state_dict()`` (same world size: exact resume) or a
        ``consolidated_state_dict()`` (any world size: committed state; nothing in flight).

        Every rank validates its own dict first and they compare notes, so a bad or mismatched
        checkpoint raises ``CheckpointError`` on every rank before anything changes. A portable
        checkpoint also writes its committed parameters into the model; a per-rank one expects
        the model's own ``state_dict`` (saved at the same call) to be loaded as well.
        """
        self._pipeline.check_usable("load_state_dict")
        self._checkpoints.load(state_dict)


class _JoinPeerCalls(JoinHook):
    """Join's hook: each of a peer's ``step()`` calls is shadowed by a round with no gradients."""

    def __init__(self, optimizer: AccoOptimizer) -> None:
        self._optimizer = optimizer

    def main_hook(self) -> None:
        pipeline = self._optimizer._pipeline
        pipeline.check_usable("step (under Join)")
        with pipeline.calling():  # ordered against the default stream, as a step() is
            pipeline.join_peer_call()
