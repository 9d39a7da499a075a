"""Issue 15: where the CPU time of one call, and of the round it launches, goes.

On CPU/gloo a round's worker thread competes with the next forward/backward for the same cores,
so what a round costs in CPU (not in wire time) decides how much of it overlaps for free. This
profile runs world 2 on loopback (no bandwidth limit: the wire costs next to nothing, so what is
left is CPU) and measures, per call on every rank:

* on the **training thread**: forward+backward, ``step()`` and inside it the hand-over copy
  (``FlatBuffers.stage_gradients``, within ``GradientHandover.hand_over``), the install
  (``FlatBuffers.install_params``) and the wait for the round in flight; ``zero_grad()``;
* on the **worker thread** (``RoundRunner.run``, one round): ``_agree``, ``_reduce_scatter``, the
  average (``grad.div_``), ``check_and_measure``, the shard step (``ShardOptimizer.step``, or
  ``tentative_step`` without its nested all-gather), ``all_gather_master`` and the rest;
* for the **whole process** (every thread, user + system): what is left after the two threads
  above is gloo's own threads and the kernel's socket copies ("gloo + kernel").

CPU time per thread is ``time.thread_time_ns()``, wall time ``time.perf_counter_ns()``; each
phase is timed exclusively (a nested phase is subtracted from the one around it), so the rows
add up. Nothing in ``acco/`` is changed: the methods are wrapped, at class level, in the rank
processes before the optimizer is built; a method that does not exist (the library changes) is
simply not timed and its time shows up in the phase around it.

    python -m benchmarks.cpu_budget --label before            # world 2, loopback, small, acco
    python -m benchmarks.cpu_budget --modes acco,dpu,sync --calls 20 --label after
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from . import cluster, launcher, ranks, report
from .gpt import MODELS, Batches, build_model, count_parameters, load_corpus, model_config, param_groups
from .methods import Method, build_method

MODES = {"acco": "acco", "dpu": "dpu", "sync": "acco_sync", "secant": "acco_secant"}  # --modes name -> benchmarks.methods name
MS = 1e-6  # ns -> ms


@dataclass(frozen=True)
class Target:
    """One method to time: ``module.cls.attr`` is timed as phase ``key``. ``opens`` starts a new
    record (one per round) on the thread that calls it."""

    key: str
    module: str
    cls: str
    attr: str
    opens: Optional[str] = None


TARGETS = (
    Target("step", "acco.optimizer", "AccoOptimizer", "step"),
    Target("zero_grad", "acco.optimizer", "AccoOptimizer", "zero_grad"),
    Target("hand_over", "acco.handover", "GradientHandover", "hand_over"),
    Target("stage_gradients", "acco.buffers", "FlatBuffers", "stage_gradients"),
    Target("install_params", "acco.buffers", "FlatBuffers", "install_params"),
    Target("wait", "acco.engine", "_FutureHandle", "wait"),  # private: the wait for the round, if it exists
    Target("run", "acco.round", "RoundRunner", "run", opens="round"),
    Target("agree", "acco.round", "RoundRunner", "_agree"),
    Target("reduce_scatter", "acco.round", "RoundRunner", "_reduce_scatter"),
    Target("check_and_measure", "acco.round", "RoundRunner", "check_and_measure"),
    Target("noise_scale", "acco.round", "EstimateCarry", "_halves"),  # a commit's |ḡ₁ − ḡ₂|² (issue 22)
    # correction="secant" (issue 22): the estimate's and the commit's corrections, the dots, θ̃'s copy
    Target("secant", "acco.secant", "SecantCorrection", "correct_estimate"),
    Target("secant", "acco.secant", "SecantCorrection", "dots"),
    Target("secant", "acco.secant", "SecantCorrection", "correct_commit"),
    Target("secant", "acco.secant", "SecantCorrection", "advance"),
    Target("all_gather", "acco.round", "RoundRunner", "all_gather_master"),
    Target("shard_step", "acco.shard", "ShardOptimizer", "step"),
    Target("tentative_step", "acco.shard", "ShardOptimizer", "tentative_step"),
)

# Table rows: (phase key, label). A key's *exclusive* time: what it spent itself, nested phases
# subtracted; so the rows of one thread add up to its total (``call`` or ``run``, inclusive).
TRAINING_ROWS = (
    ("forward_backward", "forward + backward"),
    ("stage_gradients", "step(): hand-over copy, `FlatBuffers.stage_gradients` (comm ← grad, grad ← 0)"),
    ("hand_over", "step(): rest of `GradientHandover.hand_over`"),
    ("install_params", "step(): install, `FlatBuffers.install_params` (param ← comm)"),
    ("wait", "step(): waiting for the round in flight"),
    ("step", "step(): everything else (checks, watch, launch, report)"),
    ("zero_grad", "zero_grad()"),
    ("call", "rest of the call (next batch, loop, torch's step hook)"),
)
WORKER_ROWS = (
    ("agree", "`_agree` (counts all-reduce)"),
    ("reduce_scatter", "`_reduce_scatter`"),
    ("average", "average, `grad.div_`"),
    ("noise_scale", "`EstimateCarry._halves` (a commit's \\|ḡ₁ − ḡ₂\\|², the noise scale)"),
    ("secant", "`SecantCorrection` (`correction=\"secant\"`: e's dots, the corrections, θ̃'s copy)"),
    ("check_and_measure", "`check_and_measure` (finite check, norm, all-reduce)"),
    ("shard_step", "`ShardOptimizer.step` (commit)"),
    ("tentative_step", "`ShardOptimizer.tentative_step` without its all-gather (estimate)"),
    ("all_gather", "`all_gather_master`"),
    ("run", "rest of the round (decode, carry, hyper-parameters, ...)"),
)
PHASES = tuple(key for key, _ in TRAINING_ROWS + WORKER_ROWS)

# Model-sized buffers each phase writes per execution, counted from the code (not measured: update
# it when the code changes). The hand-over copies comm ← grad and zeroes grad, or, where the two
# buffers trade places (``FlatBuffers.swaps``, since commit e996dde), only zeroes the new
# accumulator; the install copies param ← comm; gloo's chunked reduce-scatter packs the whole
# gradient buffer into send pieces and receives as much into receive pieces (the sum writes one
# shard only); the all-gather writes the whole output, its other ranks' part from the socket.
MODEL_SIZED_WRITES: dict[str, Callable[[Any], int]] = {
    "stage_gradients": lambda buffers: 1 if getattr(buffers, "swaps", False) is True else 2,
    "install_params": lambda _: 1,
    # the chunked all-to-all (before f2d21de) packs send pieces and receives as much; the pairwise
    # sends go from the buffer as it is and only the received pieces and the summed shard are written
    "reduce_scatter": lambda runner: 1 if getattr(getattr(runner, "comm", None), "_reduce_scatter_via", None) == "pairwise" else 2,
    "all_gather": lambda _: 1,
}
WRITES_NOTE = ("hand-over 2 (comm ← grad, grad ← 0), or 1 where FlatBuffers.swaps (grad ← 0 after the swap); install 1; "
               "gloo's reduce-scatter 2 as a chunked all-to-all (send and receive pieces), 1 by pairwise sends (received pieces and the summed shard); all-gather 1")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--bandwidth", default="none", help="per-rank link rate under --network netns (none = no limit)")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--batch-size", type=int, default=12, help="sequences per rank per call")
    p.add_argument("--modes", default="acco", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=4, help="calls before the timed ones (even: acco's pairs stay aligned)")
    p.add_argument("--calls", type=int, default=20, help="timed calls per mode")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--data", default=None, help="a text file instead of the stdlib corpus")
    p.add_argument("--label", default="current", help="report name: benchmarks/results/cpu_budget_<label>.{json,md}")
    launcher.add_common_arguments(p, "")
    p.set_defaults(network="loopback", timeout=300.0, json=None)
    return p


def check_modes(text: str) -> list[str]:
    modes = launcher.parse_list(text, str)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return modes


# ----------------------------------------------------------------------------- timing
@dataclass
class Record:
    """The phases of one call (training thread) or one round (worker thread): per phase the
    exclusive and inclusive CPU and wall nanoseconds, and how many times it ran."""

    kind: str
    index: Optional[int] = None
    round_kind: Optional[str] = None
    exclusive: dict[str, list[int]] = field(default_factory=dict)  # key -> [cpu, wall]
    inclusive: dict[str, list[int]] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def add_writes(self, count: int) -> None:
        self.extra["model_sized_writes"] = self.extra.get("model_sized_writes", 0) + count

    def add(self, key: str, cpu: int, wall: int, child_cpu: int, child_wall: int) -> None:
        for table, c, w in ((self.inclusive, cpu, wall), (self.exclusive, cpu - child_cpu, wall - child_wall)):
            entry = table.setdefault(key, [0, 0])
            entry[0] += c
            entry[1] += w
        self.count[key] = self.count.get(key, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "index": self.index, "round_kind": self.round_kind,
                "exclusive_cpu_wall_ms": _in_ms(self.exclusive), "inclusive_cpu_wall_ms": _in_ms(self.inclusive), **self.extra}


def _in_ms(table: dict[str, list[int]]) -> dict[str, list[float]]:
    return {key: [round(cpu * MS, 4), round(wall * MS, 4)] for key, (cpu, wall) in table.items()}


@dataclass
class _Frame:
    key: str
    cpu0: int
    wall0: int
    child_cpu: int = 0
    child_wall: int = 0


class PhaseClock:
    """Exclusive per-thread CPU and wall time of nested phases. Each thread has its own stack of
    open phases and its own current record; a finished record goes to ``records``."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.records: list[Record] = []  # appended from both threads (list.append is atomic)

    def _stack(self) -> list[_Frame]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextlib.contextmanager
    def record(self, kind: str, index: Optional[int] = None, round_kind: Optional[str] = None) -> Iterator[Record]:
        """Phases timed inside go to a new record (a call, a round), kept when the block ends."""
        outer = getattr(self._local, "record", None)
        current = self._local.record = Record(kind, index, round_kind)
        try:
            yield current
        finally:
            self._local.record = outer
            self.records.append(current)

    @contextlib.contextmanager
    def phase(self, key: str) -> Iterator[None]:
        stack = self._stack()
        frame = _Frame(key, time.thread_time_ns(), time.perf_counter_ns())
        stack.append(frame)
        try:
            yield
        finally:
            cpu, wall = time.thread_time_ns() - frame.cpu0, time.perf_counter_ns() - frame.wall0
            stack.pop()
            current = getattr(self._local, "record", None)
            if current is not None:
                current.add(key, cpu, wall, frame.child_cpu, frame.child_wall)
            if stack:
                stack[-1].child_cpu += cpu
                stack[-1].child_wall += wall

    def timed(self, target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as ``target.key`` (and, for ``run``, in a record of its own)."""
        if target.opens is None:
            writes = MODEL_SIZED_WRITES.get(target.key)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if writes is not None and args:
                    self.note_writes(writes(args[0]))  # before the call: a swap changes what it reads
                with self.phase(target.key):
                    return fn(*args, **kwargs)
            return wrapper

        @functools.wraps(fn)
        def opening(*args: Any, **kwargs: Any) -> Any:
            call = args[1] if len(args) > 1 else kwargs.get("call", kwargs.get("launch"))
            launch = getattr(call, "launch", call)  # run(call) since issue 25; run(launch, ...) before it
            kind = getattr(getattr(launch, "kind", None), "value", None)
            with self.record(target.opens, getattr(launch, "index", None), kind), self.phase(target.key):
                return fn(*args, **kwargs)
        return opening

    def note_writes(self, count: int) -> None:
        current = getattr(self._local, "record", None)
        if current is not None:
            current.add_writes(count)

    def taken(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]


@contextlib.contextmanager
def wrapped(clock: PhaseClock) -> Iterator[list[str]]:
    """Install the class-level wrappers (restored on exit); yields the targets that were missing."""
    missing, restore = [], []
    for target in TARGETS:
        try:
            cls = getattr(importlib.import_module(target.module), target.cls)
        except (ImportError, AttributeError):
            cls = None
        fn = getattr(cls, target.attr, None) if cls is not None else None
        if not callable(fn):
            missing.append(f"{target.module}.{target.cls}.{target.attr}")
            continue
        restore.append((cls, target.attr, cls.__dict__.get(target.attr)))
        setattr(cls, target.attr, clock.timed(target, fn))
    missing += _wrap_division(clock, restore)
    try:
        yield missing
    finally:
        for cls, attr, original in reversed(restore):
            if original is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, original)


def _wrap_division(clock: PhaseClock, restore: list) -> list[str]:
    """The average is ``grad.div_(...)`` on the shard's gradient tensor inside ``run``: a method of
    a tensor, not of acco. Each new ``ShardOptimizer`` gets an instance-level ``div_`` on its
    ``grad``; where that cannot be done the average stays in "rest of the round"."""
    try:
        cls = importlib.import_module("acco.shard").ShardOptimizer
    except (ImportError, AttributeError):
        return ["acco.shard.ShardOptimizer.grad.div_"]
    init = cls.__init__
    average = Target("average", "torch", "Tensor", "div_")

    @functools.wraps(init)
    def init_and_wrap(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        grad = getattr(self, "grad", None)
        with contextlib.suppress(AttributeError, TypeError, RuntimeError):
            if isinstance(grad, torch.Tensor):
                grad.div_ = clock.timed(average, grad.div_)

    restore.append((cls, "__init__", cls.__dict__.get("__init__")))
    cls.__init__ = init_and_wrap
    return []


def _worker_cpu_ns() -> Callable[[], Optional[int]]:
    """The round worker's CPU clock, readable from the training thread (None where the thread or
    ``pthread_getcpuclockid`` is missing: the rounds' own records are summed instead)."""
    threads = [t for t in threading.enumerate() if t.name.startswith("acco-round") and t.is_alive()]
    getter = getattr(time, "pthread_getcpuclockid", None)
    if len(threads) != 1 or getter is None or threads[0].ident is None:
        return lambda: None
    try:
        clock_id = getter(threads[0].ident)
        time.clock_gettime_ns(clock_id)
    except OSError:
        return lambda: None
    return lambda: time.clock_gettime_ns(clock_id)


@dataclass
class Snapshot:
    """The whole window's clocks: wall, process CPU (every thread), training thread, worker."""

    wall: int
    process: int
    training: int
    worker: Optional[int]
    user_s: float
    system_s: float

    @classmethod
    def take(cls, worker: Callable[[], Optional[int]]) -> "Snapshot":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(time.perf_counter_ns(), time.process_time_ns(), time.thread_time_ns(), worker(),
                   usage.ru_utime, usage.ru_stime)


# ----------------------------------------------------------------------------- rank side
def one_call(method: Method, batches: Batches, clock: PhaseClock) -> None:
    """One training call, timed: the next batch, forward+backward, step() and zero_grad()."""
    process0 = time.process_time_ns()
    with clock.record("call") as record, clock.phase("call"):
        x, y = batches.next()
        with clock.phase("forward_backward"):
            method.compute(x, y)
        method.update()
    record.extra["process_cpu_ms"] = (time.process_time_ns() - process0) * MS


def profile_mode(mode: str, args: argparse.Namespace, corpus: Any, rank: int) -> dict[str, Any]:
    """Warm up, then time ``--calls`` calls; returns this rank's records and window totals."""
    clock = PhaseClock()
    config = model_config(args.model)
    with wrapped(clock) as missing:
        model = build_model(config, args.seed)
        method = build_method(MODES[mode], model, param_groups(model, 0.1), args.lr)
        batches = Batches(corpus.train, config.block_size, args.batch_size, args.seed + 7919, rank)
        worker = _worker_cpu_ns()
        for _ in range(args.warmup):
            one_call(method, batches, clock)
        ranks.barrier()  # default group; acco's rounds run on their own
        clock.records.clear()
        first_round, start = method.rounds, Snapshot.take(worker)
        for _ in range(args.calls):
            one_call(method, batches, clock)
        end, last_round = Snapshot.take(worker), method.rounds
        method.finish()  # the last round's record completes
        method.close()
    rounds = [r for r in clock.taken("round") if r.index is None or first_round <= r.index < last_round]
    return {"mode": mode, "missing": missing, "calls": clock.taken("call"), "rounds": rounds, "start": start, "end": end}


def _median_phase(records: list[Record], key: str, table: str) -> tuple[Optional[float], Optional[float], int]:
    """Median (cpu, wall) ms of ``key`` over the records where it ran, scaled by the share of
    records where it ran: the average cost per record of a phase that runs every other round
    (acco's tentative step), and the plain median of one that runs in every record."""
    values = [getattr(r, table)[key] for r in records if key in getattr(r, table)]
    if not values:
        return None, None, 0
    share = len(values) / len(records)
    return (statistics.median(v[0] for v in values) * MS * share,
            statistics.median(v[1] for v in values) * MS * share, len(values))


def _is_worker(key: str) -> bool:
    return key in dict(WORKER_ROWS)


def summarise_rank(profiled: dict[str, Any], parameters: int) -> dict[str, Optional[float]]:
    """This rank's numbers as one flat dict of floats (None: not measured), the same keys on every rank."""
    calls, rounds = profiled["calls"], profiled["rounds"]
    n = max(1, len(calls))
    out: dict[str, Optional[float]] = {"calls": float(len(calls)), "rounds": float(len(rounds))}
    for key in PHASES:
        records = rounds if _is_worker(key) else calls
        for table in ("exclusive", "inclusive"):
            cpu, wall, runs = _median_phase(records, key, table)
            out[f"{key}.{table}.cpu_ms"], out[f"{key}.{table}.wall_ms"] = cpu, wall
        out[f"{key}.runs"] = float(runs)
    out.update(_window_totals(profiled, n))
    out["round_cpu_ms"] = _round_cpu(out)
    writes = sum(r.extra.get("model_sized_writes", 0) for r in calls + rounds) / n
    out["model_sized_writes"], out["model_sized_bytes"] = writes, writes * parameters * 4
    return out


def _window_totals(profiled: dict[str, Any], calls: int) -> dict[str, Optional[float]]:
    """Per call, over the whole timed window: wall, process CPU (every thread), the training and
    worker threads' CPU, and the rest (gloo's threads and the kernel's socket copies)."""
    start, end, rounds = profiled["start"], profiled["end"], profiled["rounds"]
    if start.worker is not None and end.worker is not None:
        worker = end.worker - start.worker
    else:  # no clock of the worker thread: the rounds' own totals
        worker = sum(r.inclusive.get("run", [0, 0])[0] for r in rounds)
    process, training = end.process - start.process, end.training - start.training
    per_call = [r.extra["process_cpu_ms"] for r in profiled["calls"]]
    return {
        "wall_ms": (end.wall - start.wall) * MS / calls,
        "process_cpu_ms": process * MS / calls,
        "process_cpu_ms_median": statistics.median(per_call) if per_call else None,
        "training_cpu_ms": training * MS / calls,
        "worker_cpu_ms": worker * MS / calls,
        "gloo_kernel_cpu_ms": (process - training - worker) * MS / calls,
        "user_cpu_ms": (end.user_s - start.user_s) * 1e3 / calls,
        "system_cpu_ms": (end.system_s - start.system_s) * 1e3 / calls,
        "rounds_per_call": len(rounds) / calls,
    }


def _round_cpu(out: dict[str, Optional[float]]) -> float:
    """What the optimizer costs per call beyond forward+backward, on every thread: step() and
    zero_grad() on the training thread, the round(s) on the worker, gloo + kernel."""
    parts = [out["step.inclusive.cpu_ms"], out["zero_grad.inclusive.cpu_ms"], out["gloo_kernel_cpu_ms"]]
    run = (out["run.inclusive.cpu_ms"] or 0.0) * (out["rounds_per_call"] or 0.0)
    return sum(p or 0.0 for p in parts) + run


def every_rank(mine: dict[str, Optional[float]]) -> list[dict[str, Optional[float]]]:
    """Every rank's summary, on every rank (the same keys everywhere; None travels as NaN)."""
    keys = list(mine)
    rows = ranks.gather_rows([float("nan") if mine[k] is None else mine[k] for k in keys])
    return [{k: (None if math.isnan(v) else v) for k, v in zip(keys, row)} for row in rows]


def rank_main(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    """Profile each mode in turn; rank 0 returns every rank's summaries and its own raw records."""
    rank, world = ranks.rank_and_world()
    load = os.getloadavg()  # others' work on the same cores shows in the wall times (less in the CPU times)
    corpus = load_corpus(args.data, 1_000_000)
    parameters = count_parameters(build_model(model_config(args.model), args.seed))
    modes, raw = [], {}
    for mode in check_modes(args.modes):
        profiled = profile_mode(mode, args, corpus, rank)
        per_rank = every_rank(summarise_rank(profiled, parameters))
        modes.append({"mode": mode, "method": MODES[mode], "missing": profiled["missing"], "per_rank": per_rank})
        raw[mode] = {"calls": [r.as_json() for r in profiled["calls"]], "rounds": [r.as_json() for r in profiled["rounds"]]}
        if rank == 0:
            r0 = per_rank[0]
            print(f"[cpu_budget world {world}] {mode:>5}: {r0['wall_ms']:.0f} ms/call; CPU ms per call: process "
                  f"{r0['process_cpu_ms']:.0f}, training {r0['training_cpu_ms']:.0f}, worker {r0['worker_cpu_ms']:.1f}, "
                  f"gloo+kernel {r0['gloo_kernel_cpu_ms']:.1f}", file=sys.stderr, flush=True)
    if rank != 0:
        return None
    return {"parameters": parameters, "modes": modes, "raw_rank0": raw, "load_average": [*load, *os.getloadavg()]}


# ----------------------------------------------------------------------------- report
def result_of(mode: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """One mode's result: per phase rank 0's medians, its share of the round's CPU and the mean
    over ranks; the totals per call for rank 0 and averaged over ranks."""
    r0, per_rank = mode["per_rank"][0], mode["per_rank"]
    phases = {}
    for key in PHASES:
        cpu = r0[f"{key}.exclusive.cpu_ms"]
        phases[key] = {
            "thread": "worker" if _is_worker(key) else "training",
            "cpu_ms": cpu, "wall_ms": r0[f"{key}.exclusive.wall_ms"],
            "share_of_round_cpu": None if key in ("forward_backward", "call") else _ratio(cpu, r0["round_cpu_ms"]),
            "cpu_ms_mean_of_ranks": _mean([r[f"{key}.exclusive.cpu_ms"] for r in per_rank]),
            "inclusive_cpu_ms": r0[f"{key}.inclusive.cpu_ms"], "inclusive_wall_ms": r0[f"{key}.inclusive.wall_ms"],
            "inclusive_cpu_ms_mean_of_ranks": _mean([r[f"{key}.inclusive.cpu_ms"] for r in per_rank]),
            "runs": int(r0[f"{key}.runs"]),
        }
    keys = ("wall_ms", "process_cpu_ms", "process_cpu_ms_median", "training_cpu_ms", "worker_cpu_ms", "gloo_kernel_cpu_ms",
            "user_cpu_ms", "system_cpu_ms", "round_cpu_ms", "rounds_per_call", "model_sized_writes", "model_sized_bytes")
    return {
        **setting, "mode": mode["mode"], "method": mode["method"], "calls": int(r0["calls"]), "rounds": int(r0["rounds"]),
        "not_timed": mode["missing"], "phases": phases, "totals": {k: r0[k] for k in keys},
        "totals_mean_of_ranks": {k: _mean([r[k] for r in per_rank]) for k in keys}, "per_rank": per_rank,
    }


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def json_path(args: argparse.Namespace) -> Path:
    return args.json if args.json is not None else Path("benchmarks/results") / f"cpu_budget_{args.label}.json"


def acco_tree_clean() -> Optional[bool]:
    """Whether ``acco/`` had no uncommitted change when measured (so that ``git_commit`` says
    which code ran); None outside a git checkout."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "acco"], cwd=report.ROOT, capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return None if status.returncode else not status.stdout.strip()


def make_report(args: argparse.Namespace, argv: list[str], partials: list[dict[str, Any]]) -> None:
    args.json = json_path(args)
    results, runs = [], []
    for part in partials:
        setting = report.where(part)
        results += [result_of(mode, setting) for mode in part["modes"]]
        runs += [{**setting, "mode": mode, **raw} for mode, raw in part["raw_rank0"].items()]
    config = report.config(
        "cpu_budget", args, argv, partials[0]["parameters"] if partials else None,
        timing="per-thread CPU: time.thread_time_ns; wall: time.perf_counter_ns; process: time.process_time_ns (user + "
               "system, every thread); phases exclusive (nested phases subtracted); rank 0's raw records in runs",
        model_sized_writes=WRITES_NOTE, acco_tree_clean=acco_tree_clean(),
        load_average=partials[0]["load_average"] if partials else None,  # 1, 5, 15 min, at the start then at the end
    )
    data = {"config": config, "results": results, "runs": runs}
    report.write(args.json, data, markdown(data))


def markdown(data: dict[str, Any]) -> str:
    c = data["config"]
    network = data["results"][0]["network"] if data["results"] else c["network"]
    lines = [
        f"CPU budget per call: model {c['model']} ({c['parameters'] / 1e6:.1f}M parameters), {c['batch_size']} × "
        f"{c['model_config']['block_size']} bytes per rank per call, fp32, AdamW, world {c['world']} on {network}, "
        f"{c['calls']} timed calls after {c['warmup']} warm-up calls; machine load {_load(c)}. "
        "Rank 0's medians over the timed calls (worker rows: over the rounds; a phase that runs in only some rounds "
        "counts as its median × the share of rounds it runs in). Phases are exclusive: the rows of a thread add up to "
        "its bold total. *The round's CPU* = step() + zero_grad() + the worker's round + gloo and kernel: what the "
        "optimizer costs per call beyond forward+backward, on every thread.", "",
    ]
    for result in data["results"]:
        lines += _mode_tables(result)
    return "\n".join(lines)


def _phase_row(label: str, result: dict[str, Any], key: str, inclusive: bool = False) -> list[Any]:
    p = result["phases"][key]
    prefix = "inclusive_" if inclusive else ""
    cpu = p[f"{prefix}cpu_ms"]
    share = p["share_of_round_cpu"] if not inclusive or key == "call" else _ratio(cpu, result["totals"]["round_cpu_ms"])
    total = result["rounds"] if p["thread"] == "worker" else result["calls"]
    runs = f"{p['runs']}/{total}"
    return [label, _ms(cpu), _ms(p[f"{prefix}wall_ms"]), _share(share), _ms(p[f"{prefix}cpu_ms_mean_of_ranks"]), runs]


def _mode_tables(result: dict[str, Any]) -> list[str]:
    t, m = result["totals"], result["totals_mean_of_ranks"]
    rows = [_phase_row("**training thread, per call**", result, "call", inclusive=True)]
    rows += [_phase_row(label, result, key) for key, label in TRAINING_ROWS]
    rows.append(_phase_row("*step() in all*", result, "step", inclusive=True))
    rows.append(_phase_row("**worker thread, per round** (`RoundRunner.run`)", result, "run", inclusive=True))
    rows += [_phase_row(label, result, key) for key, label in WORKER_ROWS]
    rows.append(["**gloo + kernel** (process − training − worker threads), per call", _ms(t["gloo_kernel_cpu_ms"]), None,
                 _share(_ratio(t["gloo_kernel_cpu_ms"], t["round_cpu_ms"])), _ms(m["gloo_kernel_cpu_ms"]), "window"])
    rows.append(["**the round's CPU**, per call", _ms(t["round_cpu_ms"]), None, "100%", _ms(m["round_cpu_ms"]), ""])
    per_round = _ratio(t["worker_cpu_ms"], t["rounds_per_call"])
    totals = [
        ["wall per call", _ms(t["wall_ms"]), _ms(m["wall_ms"])],
        ["process CPU per call (every thread, user + system)", _ms(t["process_cpu_ms"]), _ms(m["process_cpu_ms"])],
        ["… of which system (kernel) time", _ms(t["system_cpu_ms"]), _ms(m["system_cpu_ms"])],
        ["training-thread CPU per call", _ms(t["training_cpu_ms"]), _ms(m["training_cpu_ms"])],
        ["worker CPU per round", _ms(per_round), _ms(_ratio(m["worker_cpu_ms"], m["rounds_per_call"]))],
        ["gloo + kernel CPU per call", _ms(t["gloo_kernel_cpu_ms"]), _ms(m["gloo_kernel_cpu_ms"])],
        ["the round's CPU per call", _ms(t["round_cpu_ms"]), _ms(m["round_cpu_ms"])],
        ["model-sized buffers written per call", f"{t['model_sized_writes']:.1f} ({t['model_sized_bytes'] / 1e6:.0f} MB)", None],
    ]
    lines = [f"### mode {result['mode']} ({result['calls']} calls, {result['rounds']} rounds)", ""]
    if result["not_timed"]:
        lines += [f"Not timed (missing in this version of acco): {', '.join(result['not_timed'])}.", ""]
    headers = ["phase", "CPU ms", "wall ms", "share of the round's CPU", "CPU ms, mean of ranks", "runs"]
    lines += [report.markdown_table(headers, rows), ""]
    return lines + [report.markdown_table(["totals, whole window / calls", "rank 0", "mean of ranks"], totals), ""]


def _load(c: dict[str, Any]) -> str:
    load = c.get("load_average")
    return f"{load[0]:.1f} at the start, {load[3]:.1f} at the end (1-min averages)" if load else "unknown"


def _ms(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{value:.2f}"


def _share(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:.0f}%"


def settings_of(args: argparse.Namespace) -> list[launcher.Setting]:
    check_modes(args.modes)
    return [launcher.Setting(args.world, cluster.parse_bandwidth(args.bandwidth))]


def main(argv: Optional[list[str]] = None) -> int:
    return launcher.main("benchmarks.cpu_budget", parser(), argv, settings_of, rank_main, make_report)


if __name__ == "__main__":
    raise SystemExit(main())
