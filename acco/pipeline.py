"""The round pipeline: one object with an explicit state (docs/design.md §4).

States and what moves between them::

    IDLE ──launch──▶ IN_FLIGHT ──hold──▶ HOLDING ──hold──▶ HOLDING
      ▲                  │                  │
      └─────install──────┴──────install─────┘        (any) ──an error──▶ FAILED
                                                     (any) ──close()───▶ CLOSED

* ``IDLE``: no round in flight; the model holds the last installed round's parameters.
* ``IN_FLIGHT``: a round runs in the background (reads the communication buffer and the shard).
* ``HOLDING``: a round is in flight and, in non-blocking mode, ``step()`` calls since its launch are
  held in the gradient buffer (``p.grad`` detached; see ``handover``). After its install the held
  gradients stay detached until the next launch takes them.
* ``FAILED``: a round, or a check the ranks made together, failed. Every later call raises, with
  the cause chained; only ``close()`` works. Counters stay as they were when the pipeline broke.
* ``CLOSED``: the worker, the private group and the hooks are gone; every later call raises
  ``OptimizerClosedError`` without touching any process group.

The facade checks the state first in every public method (``check_usable``); transitions check
that they are legal, so that a misuse inside the package fails loudly instead of hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from .agreement import PROBLEM_ADVICE, AgreementCodec, HyperparameterCodec, LocalReport, Problem
from .buffers import CommBuffer, FlatBuffers, model_fingerprint, nbytes
from .comm import Communicator, training_collective
from .engine import RoundEngine, RoundHandle, make_engine
from .errors import CollectiveError, OptimizerClosedError, ParameterOwnershipError, PipelineFailedError
from .handover import GradientHandover
from .noise_scale import NoiseScaleEMA
from .outcome import RoundResult
from .ownership import ParameterWatch
from .round import RoundCall, RoundInputs, RoundRunner
from .schedule import Mode, RoundKind, Schedule, round_kind
from .validation import group_settings

logger = logging.getLogger("acco")


class PipelineState(str, enum.Enum):
    IDLE = "idle"
    IN_FLIGHT = "in flight"
    HOLDING = "holding"
    FAILED = "failed"
    CLOSED = "closed"


_WORKING = (PipelineState.IDLE, PipelineState.IN_FLIGHT, PipelineState.HOLDING)
_RUNNING = (PipelineState.IN_FLIGHT, PipelineState.HOLDING)


_warned_uncommitted = False


class Resources:
    """What an optimizer must give back exactly once, whether ``close()`` is called or the
    optimizer is dropped (``weakref.finalize``, also at interpreter exit): the round in flight ends
    first (collectives time out, so this ends), then the side stream is drained, so that no buffer
    is freed while queued work still uses it, then the private group and the hooks go.

    Gradients handed to ``step()`` that no round committed are lost then, and the model may hold an
    estimate: said once per process, naming ``finish()``."""

    def __init__(self, engine: RoundEngine, comm: Communicator, handover: GradientHandover, device: torch.device, schedule: Schedule) -> None:
        self.engine, self.comm, self.handover, self.device, self.schedule = engine, comm, handover, device, schedule
        self.failed = False  # the user has seen an error already: no warning on top of it
        self.closing = "garbage collection or interpreter exit"

    def warn_if_uncommitted(self) -> None:
        global _warned_uncommitted
        schedule = self.schedule
        uncommitted = schedule.in_flight or schedule.pending_calls > 0 or schedule.has_uncommitted_estimate
        if _warned_uncommitted or self.failed or not uncommitted:
            return
        _warned_uncommitted = True
        logger.warning(
            "acco: an AccoOptimizer was released (%s) with gradients handed to step() that no round has committed: "
            "they are lost, and the model may hold estimate parameters instead of the last committed ones. Call "
            "opt.finish() on every rank after the last step() (before the final evaluation or save)", self.closing,
        )

    def release(self) -> None:
        self.warn_if_uncommitted()
        try:
            self.engine.shutdown()
            if self.device.type == "cuda" and torch.cuda.is_initialized():
                torch.cuda.synchronize(self.device)
        finally:
            self.comm.close()
            self.handover.remove_hooks()


@dataclass(frozen=True)
class _InFlight:
    """The round in flight: its handle, its index, the buffer it communicates through, and whether it
    gathers straight into the model (mode sync: nothing reads the model while the round runs)."""

    handle: RoundHandle
    index: int
    comm: CommBuffer
    into_model: bool = False


@dataclass(frozen=True)
class PipelineSnapshot:
    """What the pipeline holds beyond the shard's committed state, for a checkpoint: the counters, the
    round in flight (its result and this rank's shard of its output) and the estimate's carry.
    ``snapshot()`` gives references (the caller copies what it keeps); ``restore()`` takes one back."""

    rounds_launched: int = 0
    rounds_installed: int = 0
    pending_calls: int = 0
    num_updates: int = 0
    num_skipped: int = 0
    last_round: Optional[RoundResult] = None
    in_flight: Optional[tuple[RoundResult, torch.Tensor]] = None  # (its result, this rank's shard of its output)
    carried: Optional[torch.Tensor] = None  # the last estimate's reduced gradient shard
    carried_count: int = 0
    carried_mask: Optional[list[bool]] = None  # which parameters had gradients in it (None: all)
    model_fingerprint: Optional[list[int]] = None  # of the whole model this state goes with
    # The model receives the restored master (every rank's shard, gathered at once): a sharded load,
    # whose ranks each hold only their own shard of the committed parameters.
    model_from_master: bool = False
    noise_scale: Optional[dict[str, float]] = None  # the noise scale's moving average (``NoiseScaleEMA.state_dict``)
    secant: Optional[dict[str, Any]] = None  # correction="secant": θ̃ on this shard and κ (``SecantCorrection.state``)


class Pipeline:
    """The facade's one collaborator: each public method of ``AccoOptimizer`` calls one or two of the
    public methods below (the step, finish, the committed view, adoption, close, ...) and reads the
    counters; ``CheckpointIO`` uses ``wait_for_rounds`` / ``snapshot`` / ``restore``. The runner, the
    handover, the watch, the schedule and the engine are nobody else's business."""

    def __init__(
        self,
        owner: Any,
        *,
        mode: Mode,
        blocking: bool,
        engine: RoundEngine,
        runner: RoundRunner,
        comm: Communicator,
        buffers: FlatBuffers,
        handover: GradientHandover,
        watch: ParameterWatch,
        param_groups: Sequence[dict[str, Any]],
        hyperparameter_codec: HyperparameterCodec,
    ) -> None:
        self.schedule = Schedule(mode, blocking)
        self.mode = mode
        self.engine, self.runner, self.comm = engine, runner, comm
        self.buffers, self.handover, self.watch = buffers, handover, watch
        self._groups = param_groups  # the facade's own list: settings are read at each launch
        self._codec = hyperparameter_codec
        engine.keep_alive([*buffers.long_lived(), *runner.long_lived_tensors()])
        self._resources = Resources(engine, comm, handover, buffers.device, self.schedule)
        self._finalizer = weakref.finalize(owner, self._resources.release)
        self.state = PipelineState.IDLE
        self._flight: Optional[_InFlight] = None  # the round in flight
        self._unresolved: deque[tuple[int, RoundHandle]] = deque()  # installed rounds not yet read
        self._failure: Optional[BaseException] = None
        self._model_holds_master = True  # the model holds the all-gathered master (after a commit, or at the start)
        # Whether the next launch's gradients are computed on the committed master (correction="secant" corrects
        # those computed on an estimate's output): what the model held at the last launch, or since a change.
        self._next_at_committed = True
        self._scaled = False  # this rank has stepped through a GradScaler: its calls start with an overflow check
        self._loaded_model: Optional[list[int]] = None  # fingerprint of the model a checkpoint just loaded expects
        self.num_updates = 0
        self.num_skipped = 0
        self.last_round: Optional[RoundResult] = None
        self._round_before_last: Optional[RoundResult] = None  # what last_round was before the last one read
        self.noise_scale_average = NoiseScaleEMA()  # of every commit's noise scale, as rounds are read

    @classmethod
    def assemble(cls, owner: Any, settings: Any, comm: Communicator, layout: Any, buffers: FlatBuffers, shard: Any,
                 param_groups: Sequence[dict[str, Any]]) -> "Pipeline":
        """The round machinery for one optimizer: the round (``RoundRunner``), the watch over the
        model's parameters, the gradient handover and the engine, from checked ``settings``."""
        trainable, codec = settings.trainable, HyperparameterCodec(settings.groups)
        # CUDA rounds (and the stream engine on CPU) keep their decisions on the device.
        device_decisions = settings.engine == "stream" or buffers.device.type == "cuda"
        runner = RoundRunner(
            comm, shard, settings.max_grad_norm, settings.nonfinite,
            pieces=layout.rank_pieces(comm.rank),
            segment_dtypes=[(buffers.comm_dtypes[segment.lane], buffers.lane_dtypes[segment.lane]) for segment in layout.segments],
            model_params=buffers.param_flat,
            agreement=AgreementCodec(comm.world_size, len(trainable), codec.size),
            hyperparameter_codec=codec,
            estimate=settings.estimate,
            decide_on_host=not device_decisions,
            correction=settings.correction,
        )
        positions = {id(p): i for i, p in enumerate(settings.all_params)}
        frozen = settings.frozen
        watch = ParameterWatch(buffers, frozen, [positions[id(p)] for p in trainable], [positions[id(p)] for p in frozen])
        return cls(
            owner, mode=settings.mode, blocking=settings.blocking, engine=make_engine(settings.engine, buffers.device),
            runner=runner, comm=comm, buffers=buffers, handover=GradientHandover(buffers), watch=watch,
            param_groups=param_groups, hyperparameter_codec=codec,
        )

    # ------------------------------------------------------------------ state
    def check_usable(self, what: str) -> None:
        """Every public method starts here: a closed or failed pipeline accepts nothing."""
        if self.state is PipelineState.CLOSED:
            raise OptimizerClosedError(
                f"acco: {what}() on an AccoOptimizer that was closed: its worker and process group are gone. "
                "Build a new AccoOptimizer (and load a checkpoint) to continue training"
            )
        if self.state is PipelineState.FAILED:
            raise PipelineFailedError(
                "AccoOptimizer cannot continue: a background round failed earlier (see the chained exception)"
            ) from self._failure

    def fail(self, error: BaseException) -> BaseException:
        """Any state but closed → FAILED (a closed pipeline stays closed; the cause is kept either way)."""
        self._failure = self._failure or error
        self._resources.failed = True
        if self.state is not PipelineState.CLOSED:
            self.state = PipelineState.FAILED
        return error

    def _expect(self, action: str, *states: PipelineState) -> None:
        if self.state not in states:
            raise RuntimeError(f"acco internal error: {action} in state {self.state.value!r}")

    def calling(self) -> Any:
        """Around each public call: its device work is ordered after, and seen by, the default stream."""
        return self.engine.calling()

    @property
    def blocking(self) -> bool:
        return self.schedule.blocking

    @property
    def rounds_launched(self) -> int:
        return self.schedule.rounds_launched

    @property
    def rounds_installed(self) -> int:
        return self.schedule.rounds_installed

    @property
    def pending_calls(self) -> int:
        return self.schedule.pending_calls

    @property
    def estimate(self) -> str:
        return self.runner.estimate

    @property
    def in_flight(self) -> bool:
        return self._flight is not None

    @property
    def round_finished(self) -> bool:
        return self._flight is None or self._flight.handle.done()

    @property
    def failed(self) -> bool:
        return self.state is PipelineState.FAILED

    # ------------------------------------------------------------------ a step() call
    def zero_grad(self, set_to_none: bool) -> None:
        self.handover.zero_grad(set_to_none)

    def before_step(self, unscale_writes: int = 0) -> None:
        """The checks of a ``step()`` before its gradients are read: the outcomes now due (and their
        errors), the model's parameters (written, moved, cast?), and gradients edited in place since the
        backward (``unscale_writes``: the version bumps a GradScaler's explicit ``unscale_`` made)."""
        self.read_due_outcomes()
        self.look_at_model()
        self.handover.warn_if_changed_in_place(unscale_writes)

    def step(self) -> None:
        """This call's gradients into the buffer (unless a parameter can no longer be trained: the next
        round reports it), then either hold them (non-blocking, round still running) or install the
        round in flight and launch the next."""
        if self.watch.problem[0] is Problem.NONE:
            self.handover.collect()
        self._loaded_model = None
        self.schedule.record_call()
        if not self.schedule.should_launch(self.round_finished):
            self.handover.hold()
            self.state = PipelineState.HOLDING
            return
        self._install_and_launch()

    def _install_and_launch(self) -> None:
        """The round in flight into the model, the next one launched (and in mode sync waited for)."""
        if self._flight is not None:
            self.install()
        self.launch(contributes=True, finishing=False)
        if self.schedule.waits_after_launch:
            self.install()

    def join_peer_call(self) -> None:
        """Under ``Join``, on a rank that ran out of data: the collectives of one of a peer's ``step()``
        calls (its overflow check under a GradScaler, then its round), with no gradients of its own, and
        the outcomes it reads back at that call."""
        self.read_due_outcomes()
        if self._scaled:
            overflow, _ = self._overflow_check(0.0, finishing=False)
            if overflow:
                return
        self._install_and_launch()

    # ------------------------------------------------------------------ transitions
    def launch(self, *, contributes: bool, finishing: bool) -> None:
        """IDLE → IN_FLIGHT: hand the gradients over and submit the next round."""
        self._expect("launch", PipelineState.IDLE)
        launch = self.schedule.launch(contributes=contributes)
        hyperparameters = group_settings(self._groups)
        problem, problem_param = self.watch.problem
        has_gradient, comm = self.handover.hand_over(contributes, launch.local_count)
        report = LocalReport(
            count=launch.local_count,
            finishing=finishing,
            has_gradient=has_gradient,
            written=self.watch.written,
            problem=problem,
            problem_param=problem_param,
            hyperparameters=self._codec.encode(hyperparameters),
        )
        self.watch.written = False
        inputs = RoundInputs(report, hyperparameters, model_holds_master=self._model_holds_master,
                             gradients_at_committed=self._next_at_committed)
        # sync waits for the round, so nothing reads the model meanwhile: gather straight into it
        # and save a model-sized copy per step.
        into_model = self.schedule.waits_after_launch
        pending_commits = sum(1 for index, _ in self._unresolved if round_kind(self.mode, index) is RoundKind.COMMIT)
        update = self.num_updates + self.num_skipped + pending_commits + 1
        call = RoundCall(launch, inputs, comm, self.buffers.param_flat if into_model else comm.params, update)
        run = self.runner.run
        self._flight = _InFlight(self.engine.submit(lambda: run(call)), launch.index, comm, into_model)
        self.state = PipelineState.IN_FLIGHT
        # The next launch's gradients are computed on what the model holds now (its install comes after them).
        self._next_at_committed = self._model_holds_master

    def install(self, into_model: bool = True) -> None:
        """IN_FLIGHT / HOLDING → IDLE: the round's parameters go into the model (after it, in device
        order). Its outcome is read now on the thread engine and in non-blocking mode, else two
        calls later (see ``read_due_outcomes``).

        Where the user wrote the model's parameters since the round was launched, the model keeps
        them (the next round adopts them): a round computed from the old ones must not overwrite them."""
        self._expect("install", *_RUNNING)
        flight, self._flight = self._flight, None
        try:
            flight.handle.wait()
            # On the thread engine the outcome is known by now; a stream-engine round always gathers.
            gathered = flight.handle.result().gathered if self.engine.resolves_on_wait else True
        except BaseException as error:
            raise self.fail(error)
        if not into_model or self.watch.written:
            self._model_holds_master = False  # the model keeps what the user wrote (or is adopted next)
        elif gathered:
            if not flight.into_model:
                self.buffers.install_params(flight.comm.params)
            self._model_holds_master = round_kind(self.mode, flight.index) is RoundKind.COMMIT
        self.schedule.installed()
        self._unresolved.append((flight.index, flight.handle))
        self.state = PipelineState.IDLE
        if self.engine.resolves_on_wait or not self.schedule.blocking:
            self.resolve()

    def resolve(self, up_to: Optional[int] = None) -> None:
        """Read the outcome of installed rounds (up to round index ``up_to``), waiting for them if
        needed, and count them. A round's error (e.g. a non-finite gradient) is raised here."""
        if self._failure is not None:  # counters stay as they were when the pipeline broke (closed or not)
            return
        while self._unresolved and (up_to is None or self._unresolved[0][0] <= up_to):
            _, handle = self._unresolved[0]
            try:
                result = handle.result()
            except BaseException as error:
                raise self.fail(error)
            self._unresolved.popleft()
            if result.kind is RoundKind.COMMIT and result.updated:
                self.num_updates += 1
            if result.kind is RoundKind.COMMIT and result.skipped:
                self.num_skipped += 1
                logger.warning(
                    "acco: skipped update %d (round %d): non-finite averaged gradient", self.num_updates + self.num_skipped, result.index
                )
            if result.noise_scale is not None:
                self.noise_scale_average.update(result.noise_scale)
            self._round_before_last, self.last_round = self.last_round, result

    def read_due_outcomes(self) -> None:
        """Blocking mode, at each step(): read the outcomes whose time has come. The stream engine
        learns a round's outcome (and its errors) two calls after its launch: the same call on every
        rank, and by then the GPU is long past it."""
        if self.schedule.blocking:
            self.resolve(up_to=self.schedule.rounds_launched - 2)

    def peek(self) -> RoundResult:
        """Wait for the round in flight without installing it (the next step() will)."""
        self._expect("peek", *_RUNNING)
        try:
            self._flight.handle.wait()
            return self._flight.handle.result()
        except BaseException as error:
            raise self.fail(error)

    def install_in_flight(self) -> None:
        """Nothing may run on the private group during a training-thread collective: install the
        round in flight (its parameters go into the model as the next launch would have put them)."""
        if self._flight is not None:
            self.install()

    def agree_on_overflow(self, local: float) -> bool:
        """GradScaler (blocking mode): every rank learns whether any rank overflowed, at this call.
        On overflow this call's gradients are dropped everywhere."""
        self._scaled = True
        overflow, _ = self._overflow_check(local, finishing=False)
        if overflow:
            self.handover.drop()
            self._next_at_committed = self._model_holds_master  # the check installed the round in flight
            logger.info("acco: a gradient overflowed on some rank; every rank skips this step() call")
        return overflow

    def _overflow_check(self, local: float, finishing: bool) -> tuple[bool, bool]:
        """A training-thread collective, issued after the round in flight is installed so that nothing
        else uses the group meanwhile: (did any rank overflow, is every rank finishing). A rank in
        ``finish()`` joins its peers' checks with no overflow of its own."""
        self.install_in_flight()
        device = self.buffers.device if self.comm.backend == "nccl" else torch.device("cpu")
        flags = torch.tensor([local, 1.0 if finishing else 0.0], dtype=torch.float64, device=device)
        training_collective(self.comm, "step (GradScaler overflow check)", self.comm.all_reduce_sum, flags)
        overflow, finishing_ranks = flags.tolist()
        return overflow > 0, int(round(finishing_ranks)) == self.comm.world_size

    def abandon_update(self) -> None:
        """Blocking mode: forget the update whose estimate round was launched (its carried gradients and
        every call since). A commit round with nothing to commit, on every rank, gives the model the
        committed parameters back; the next call starts a new update, as after ``finish()``."""
        self._expect("abandon_update", *_WORKING)
        if not (self.schedule.blocking and self.schedule.has_uncommitted_estimate):
            return
        self.install_in_flight()
        self.handover.drop()
        self.runner.carry.load(None, 0, None, like=self.runner.shard.grad)
        self.launch(contributes=False, finishing=False)
        self.install()
        self._model_holds_committed()

    def look_at_model(self) -> None:
        """Notice model parameters that were moved, cast, written or unfrozen since the last look
        (O(number of parameters)). What cannot be adopted is reported in the next round's
        agreement, so that every rank raises the same error at the same call (never this rank
        alone, which would leave the others waiting in a collective)."""
        seen = self.watch.observe()
        if self._loaded_model is not None and self.watch.written and seen.problem is Problem.NONE:
            self._accept_loaded_model()

    def _accept_loaded_model(self) -> None:
        """The model against the checkpoint's fingerprint (model-sized work, only for a write seen right
        after a load). Every rank fingerprints the whole model, so replicas decide alike; a rank whose
        model differs is refused by the next round, as for any write made on some ranks only."""
        if model_fingerprint(self.buffers.param_flat) == self._loaded_model:
            self.watch.written = False
            logger.debug("acco: the model written after load_state_dict() is the checkpoint's own: nothing to adopt")

    def adopt_model_parameters(self) -> None:
        """IDLE / IN_FLIGHT / HOLDING → IDLE: the model's parameters (rank 0's) become the master.
        The round in flight finishes first and is not installed; held gradients stay."""
        self._expect("adopt", *_WORKING)
        if self._flight is not None:
            self.install(into_model=False)
        self.resolve()
        self.look_at_model()
        problem, index = self.watch.problem
        verdict = None if problem is Problem.NONE else f"parameter {index}: {PROBLEM_ADVICE[problem]}"
        verdicts = training_collective(self.comm, "adopt_model_parameters", self.comm.all_gather_object, verdict)
        for rank, other in enumerate(verdicts):
            if other is not None:
                raise ParameterOwnershipError(f"acco: cannot adopt the model's parameters: on rank {rank}, {other}")
        for lane in self.buffers.param_flat:
            training_collective(self.comm, "adopt_model_parameters", self.comm.broadcast, lane, 0)
        self.runner.take_master_from(self.buffers.param_flat)
        self._model_holds_master = True
        self._model_holds_committed()
        self.watch.reset()

    def finish(self, what: str = "finish") -> None:
        """IDLE / IN_FLIGHT / HOLDING → IDLE with nothing in flight and every gradient committed, on
        behalf of the public method ``what`` (named if a peer never joins).

        Ranks may call ``step()`` a different number of times (non-blocking mode; uneven data in
        either mode), so a rank never knows alone that the others are done: it joins rounds (count 0
        when it has nothing) until every rank is finishing, as DDP's ``Join`` does. Where this rank
        steps through a GradScaler, each of its peers' calls starts with an overflow check, which it
        joins too. On the thread engine a round with nothing to update and nothing to gather costs one small
        all-reduce; on the stream engine it runs its collectives (docs/design.md §4)."""
        self._expect("finish", *_WORKING)
        self.look_at_model()
        try:
            self._finish()
        except CollectiveError as error:
            raise CollectiveError(
                f"acco: {what}() is collective: every rank of the group must call it (it drains the pipeline together "
                f"with every rank, joining their step() calls until all of them are finishing): {error}"
            ) from error

    def _finish(self) -> None:
        self.install_in_flight()
        while True:
            if self._scaled:
                overflow, everyone_finishing = self._overflow_check(0.0, finishing=True)
                if overflow:
                    continue  # a peer's call was skipped: no round follows it
                if everyone_finishing:
                    break
            self.launch(contributes=True, finishing=True)
            self.install()
            # Rounds' errors surface at the call where the peers still stepping meet them too (two calls
            # after the launch on the stream engine: ``read_due_outcomes``); this round's counts are read without raising.
            self.read_due_outcomes()
            all_finishing, total = self._last_installed_counts()
            if all_finishing:
                self.resolve()  # every rank is in finish() now: read the rest alike
                if total == 0:
                    self._forget_empty_round()
                break
        if self.schedule.has_uncommitted_estimate:
            self.launch(contributes=False, finishing=True)
            self.install()
        self.handover.release()
        self.resolve()
        self._model_holds_committed()

    def _model_holds_committed(self) -> None:
        """Nothing in flight and the model holds the committed parameters: the next first half is
        computed there, not at an estimate (``correction="secant"`` then has no error to correct)."""
        self._next_at_committed = True
        if self.runner.secant is not None:
            self.runner.secant.reset()

    def _last_installed_counts(self) -> tuple[bool, int]:
        if self._unresolved:
            return self._unresolved[-1][1].counts()
        return self.last_round.all_finishing, self.last_round.total_count

    def _forget_empty_round(self) -> None:
        """The round that only told the ranks that all of them are finishing changed nothing anywhere:
        its index is given back, so that the counters, the round kinds and ``last_round`` read as if
        it had never run (every rank decides this from the same outcome)."""
        schedule = self.schedule
        schedule.rounds_launched -= 1
        schedule.rounds_installed -= 1
        self.last_round = self._round_before_last

    def close(self) -> None:
        """Any state → CLOSED. The round in flight ends first; its error, if any, is raised after
        the clean-up. Closing twice does nothing."""
        if self.state is PipelineState.CLOSED:
            return
        self._resources.closing = "close()"
        flight, self._flight = self._flight, None
        try:
            if flight is not None and self.state is not PipelineState.FAILED:
                try:
                    flight.handle.result()
                except BaseException as error:
                    raise self.fail(error)
        finally:
            self._finalizer()
            self.state = PipelineState.CLOSED

    @contextlib.contextmanager
    def committed_view(self) -> Iterator[None]:
        """The last committed parameters in the model for the block. Blocking mode: the round in flight
        is waited for (not installed); if it commits, its output is swapped in and back (no collective).
        Non-blocking mode: the ranks must agree first, so this is ``finish()`` (collective)."""
        if not self.blocking:
            with self.calling():
                self.finish("committed_parameters")
            yield
            return
        with self.calling(), contextlib.ExitStack() as stack:  # swapped back, then seen by the default stream
            with self.calling():  # swapped in, and seen by the default stream during the block
                stack.enter_context(self._committed_in_model())
            yield

    @contextlib.contextmanager
    def _committed_in_model(self) -> Iterator[None]:
        """A commit that updated nothing and gathered nothing left the model as it is: it holds that output."""
        self._expect("committed_in_model", *_WORKING)
        if not self.in_flight:
            yield  # the model already holds the last commit's output
            return
        result = self.peek()
        if result.kind is RoundKind.ESTIMATE or not result.gathered:
            yield
            return
        gathered = self._flight.comm.params
        self.buffers.swap_params_with(gathered)
        try:
            yield
        finally:
            self.buffers.swap_params_with(gathered)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held on this rank, by buffer. Never waits and never iterates state a running round changes."""
        shard, runner = self.runner.shard, self.runner
        sizes = dict(self.buffers.nbytes())
        sizes["master_shard"] = nbytes(shard.master)
        sizes["grad_shard"] = nbytes(shard.grad)
        sizes["estimate_carry"] = runner.carry.nbytes
        if runner.secant is not None:
            sizes["secant_point"] = runner.secant.nbytes  # correction="secant": θ̃ on this shard
        sizes["dtype_conversion"] = runner.conversion_bytes
        running = self.state in _RUNNING and not self.round_finished
        state, backup = shard.published_sizes() if running else (shard.state_bytes(), shard.backup_bytes())
        sizes["optimizer_state"] = state
        sizes["comm_scratch"] = self.comm.scratch_bytes
        sizes["estimate_backup"] = backup
        sizes["total"] = sum(sizes.values())
        sizes["round_transient"] = runner.transient_bytes  # allocated and freed within a round
        sizes["peak"] = sizes["total"] + sizes["round_transient"]
        return sizes

    # ------------------------------------------------------------------ checkpoints
    def wait_for_rounds(self) -> Optional[RoundResult]:
        """Read every installed round and wait for the one in flight (not installed): nothing runs on
        the private group afterwards. Returns the in-flight round's result, if any."""
        self._expect("wait_for_rounds", *_WORKING)
        self.resolve()
        return self.peek() if self.in_flight else None

    def snapshot(self) -> PipelineSnapshot:
        """What a per-rank checkpoint saves of the pipeline (references: the caller copies them).
        Waits for the round in flight; a round that gathered nothing left its output in the model
        (which held it already): that is its output."""
        result = self.wait_for_rounds()
        in_flight = None
        if result is not None:
            source = self._flight.comm.params if result.gathered else self.buffers.param_flat
            shard = self.runner.shard_of(source, self.buffers.shard_dtype)
            in_flight = (dataclasses.replace(result, gathered=True), shard)
        carried, carried_count, carried_mask = self.runner.carry.state()
        schedule = self.schedule
        return PipelineSnapshot(
            rounds_launched=schedule.rounds_launched,
            rounds_installed=schedule.rounds_installed,
            pending_calls=schedule.pending_calls,
            num_updates=self.num_updates,
            num_skipped=self.num_skipped,
            last_round=self.last_round,
            in_flight=in_flight,
            carried=carried,
            carried_count=carried_count,
            carried_mask=carried_mask,
            model_fingerprint=model_fingerprint(self.buffers.param_flat),
            noise_scale=self.noise_scale_average.state_dict(),
            secant=None if self.runner.secant is None else {**self.runner.secant.state(), "at_committed": self._next_at_committed},
        )

    def restore(self, snapshot: PipelineSnapshot) -> None:
        """A checkpoint's pipeline state, after the shard's own (master, inner state) and the model
        were written. Whatever was in flight here is abandoned (``wait_for_rounds`` ended it before the
        ranks compared notes), and so are gradients held or accumulated for the abandoned run.

        Until the next ``step()``, a write of the model that puts back the model the checkpoint was saved
        with (``model.load_state_dict`` after the optimizer's, the other order) is that model, not new
        weights to adopt; either order then resumes alike."""
        self._expect("restore", *_WORKING)
        self.handover.after_load()
        self.runner.carry.load(snapshot.carried, snapshot.carried_count, snapshot.carried_mask, like=self.runner.shard.grad)
        schedule = self.schedule
        schedule.rounds_launched, schedule.rounds_installed = snapshot.rounds_launched, snapshot.rounds_installed
        schedule.pending_calls = snapshot.pending_calls
        self.num_updates, self.num_skipped, self.last_round = snapshot.num_updates, snapshot.num_skipped, snapshot.last_round
        self.noise_scale_average = NoiseScaleEMA()
        if snapshot.noise_scale is not None:
            self.noise_scale_average.load_state_dict(snapshot.noise_scale)
        self._flight, self.state = None, PipelineState.IDLE
        self._model_holds_master = False  # the model holds what the user loaded into it
        if snapshot.in_flight is not None:
            # Each rank saved only its own shard of the round's result: gather it again, in the
            # background like a round (every rank loads, so every rank joins).
            result, param_shard = snapshot.in_flight
            comm, runner = self.buffers.comm, self.runner
            self._flight = _InFlight(self.engine.submit(lambda: runner.regather(comm, param_shard, result)), result.index, comm)
            self.state = PipelineState.IN_FLIGHT
        self._next_at_committed = True
        if self.runner.secant is not None:
            flight = snapshot.in_flight
            in_flight_estimate = flight[1] if flight is not None and flight[0].kind is RoundKind.ESTIMATE else None
            self.runner.secant.load(snapshot.secant, in_flight_estimate)
            if snapshot.secant is not None:  # else: as at the committed parameters, no correction until known
                self._next_at_committed = bool(snapshot.secant["at_committed"])
        self._loaded_model = snapshot.model_fingerprint
        if snapshot.model_from_master:
            self._gather_master_into_model()
        # The model's own state_dict, loaded with this one (before it, as documented), wrote its
        # parameters: that is the checkpoint's model, not a change to adopt.
        self.watch.reset()

    def _gather_master_into_model(self) -> None:
        """Every rank's master shard, all-gathered into the model (in its dtypes), as a commit round ends;
        on the engine, so that nothing else runs on the private group meanwhile, and waited for."""
        comm, runner = self.buffers.comm, self.runner
        handle = self.engine.submit(lambda: runner.regather(comm, runner.shard.master, None))
        try:
            handle.wait()
        except BaseException as error:
            raise self.fail(error)
        self.buffers.install_params(comm.params)
        self._model_holds_master = True
        self._loaded_model = model_fingerprint(self.buffers.param_flat)
