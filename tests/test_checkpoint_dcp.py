"""Sharded checkpoints through ``torch.distributed.checkpoint`` (issue 26, parts 1 and 2).

Held against independent paths only: an uninterrupted run (exact resume at the same world size), the
consolidated checkpoint path (``consolidated_state_dict`` / ``load_state_dict``, for re-sharding: the
same values, then the same training), a plain reading of the files without acco, and the state taken
at the call of ``dcp.async_save`` while training went on. Bad input must fail on every rank and leave
the optimizer exactly as it was (still training as before).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

import workloads
from acco import AccoOptimizer, CheckpointError
from test_mixed_dtypes import MixedBlock

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.peak import AllocationPeak  # noqa: E402


def _model(hidden: int = workloads.HIDDEN, out: int = workloads.OUT, seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(workloads.IN, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, out, bias=bias)).double()


def _named_groups(model: nn.Module) -> list[dict]:
    """AdamW's two groups of ``workloads``, built from ``named_parameters()`` (torch keeps the names)."""
    named = list(model.named_parameters())
    weights = [(n, p) for n, p in named if p.dim() >= 2]
    biases = [(n, p) for n, p in named if p.dim() < 2]
    return [{"params": [p for _, p in weights], "param_names": [n for n, _ in weights], "weight_decay": 0.1},
            {"params": [p for _, p in biases], "param_names": [n for n, _ in biases], "weight_decay": 0.0, "lr": 3e-2}]


def _build(spec="adamw", mode="acco", partition="auto", seed=0, model=None, named=False, optimizer_class=None):
    if spec == "mixed":  # bf16 weights beside fp32 norms: two lanes, one fp32 master (tests/test_mixed_dtypes.py)
        model = MixedBlock(seed=seed)
        optimizer_class, spec = torch.optim.AdamW, "adamw"
    model = model if model is not None else workloads.make_model(workloads.model_kind_for(spec), seed=seed)
    if named:
        opt = AccoOptimizer(_named_groups(model), optimizer_class or torch.optim.AdamW, mode=mode, partition=partition,
                            lr=1e-2, betas=(0.9, 0.95))
    elif optimizer_class is not None:
        opt = AccoOptimizer(workloads.param_groups(model, "adamw"), optimizer_class, mode=mode, partition=partition, lr=1e-2)
    else:
        opt = AccoOptimizer(workloads.acco_params(spec, model), mode=mode, partition=partition)
    # The learning rate changes every call, so a resume that lost the schedule's state shows.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda call: 1.0 / (1.0 + 0.1 * call))
    return model, opt, scheduler


def _call(model, opt, scheduler, rank, call, drop_last_gradient=False):
    x, y = workloads.batch(rank, call)
    out = model(x)
    ((out - y[:, : out.shape[1]]) ** 2).mean().backward()
    if drop_last_gradient:  # a parameter that never gets a gradient has no optimizer state
        list(model.parameters())[-1].grad = None
    opt.step()
    scheduler.step()
    opt.zero_grad()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _save(path, model, opt, scheduler, **kwargs):
    dcp.save({"model": model.state_dict(), "optimizer": opt.sharded_state_dict(), "sched": scheduler.state_dict()},
             checkpoint_id=path, **kwargs)


def _load(path, model, opt, scheduler):
    state = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict(), "sched": scheduler.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_sharded_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["sched"])


def _differing(a, b):
    return [i for i, (x, y) in enumerate(zip(a, b)) if not all(torch.equal(p, q) for p, q in zip(x, y))]


# ---------------------------------------------------------------------- exact resume, same world size
def dcp_resume_run(rank, world_size, path, spec, mode, partition, num_calls, save_at, drop_last_gradient):
    """Params after every call: uninterrupted (finishing at ``save_at``, as a save does: it commits), and
    with a DCP save at ``save_at`` and a load into fresh objects built from other weights."""
    step = lambda m, o, s, c: _call(m, o, s, rank, c, drop_last_gradient)  # noqa: E731
    model, opt, scheduler = _build(spec, mode, partition)
    straight = []
    for call in range(num_calls):
        if call == save_at:
            opt.finish()
        step(model, opt, scheduler, call)
        straight.append(_params(model))
    opt.finish()
    straight.append(_params(model))
    opt.close()

    model, opt, scheduler = _build(spec, mode, partition)
    resumed = []
    for call in range(save_at):
        step(model, opt, scheduler, call)
        resumed.append(_params(model))
    _save(path, model, opt, scheduler)
    opt.close()
    model, opt, scheduler = _build(spec, mode, partition, seed=1)  # other weights: the load must replace them
    _load(path, model, opt, scheduler)
    for call in range(save_at, num_calls):
        step(model, opt, scheduler, call)
        resumed.append(_params(model))
    opt.finish()
    resumed.append(_params(model))
    opt.close()
    return _differing(straight, resumed)


@pytest.mark.parametrize(
    "spec,mode,partition,save_at,drop_last_gradient",
    [
        ("adamw", "acco", "flat", 5, True),  # mid-update; a parameter that never has state
        ("adamw", "sync", "flat", 0, False),  # before any step: no state anywhere yet
        ("nadam", "dpu", "flat", 3, False),  # views cut into CPU chunks; scalar state besides step
        ("adafactor", "acco", "param", 4, False),  # whole tensors; factored (not element-wise) state
        ("muon+adamw", "acco", "auto", 4, False),  # per-group optimizers: a param and a flat segment
        ("mixed", "acco", "flat", 5, False),  # bf16 parameters: the fp32 master comes back, not the bf16 model
    ],
)
def test_dcp_resume_at_the_same_world_size_is_bit_identical(run_distributed, tmp_path, spec, mode, partition, save_at, drop_last_gradient):
    for differing in run_distributed(2, dcp_resume_run, str(tmp_path / "ckpt"), spec, mode, partition, 8, save_at, drop_last_gradient):
        assert differing == [], f"params differ from the uninterrupted run after calls {differing}"


# ---------------------------------------------------------------------- re-sharding, against the consolidated path
def _consolidated(opt):
    """The consolidated checkpoint on every rank (one collective call per receiving rank)."""
    return [opt.consolidated_state_dict(to=to) for to in range(opt.world_size)][opt.rank]


def train_and_save(rank, world_size, path, spec, partition, num_calls, model_kwargs=None):
    """Train, then save both ways at the same point: the consolidated checkpoint and DCP. Also returns the
    scheduler's state and the model (the committed parameters, after the consolidation's finish())."""
    model, opt, scheduler = _build(spec, "acco", partition, model=_model(**model_kwargs) if model_kwargs else None)
    for call in range(num_calls):
        _call(model, opt, scheduler, rank, call)
    portable = opt.consolidated_state_dict()
    _save(path, model, opt, scheduler)
    opt.close()
    return portable, scheduler.state_dict(), _params(model)


def load_and_save(rank, world_size, path, out, spec, partition, model_kwargs=None):
    """Load a DCP checkpoint into fresh objects (other weights), consolidate it, save it again with DCP."""
    model, opt, scheduler = _build(spec, "acco", partition, seed=1, model=_model(seed=1, **model_kwargs) if model_kwargs else None)
    _load(path, model, opt, scheduler)
    params = _params(model)
    portable = opt.consolidated_state_dict()
    if out is not None:
        _save(out, model, opt, scheduler)
    opt.close()
    return portable, params


def train_on_both_ways(rank, world_size, path, portable, scheduler_state, spec, partition, num_calls):
    """The same calls after a DCP load and after loading the consolidated checkpoint: params after each."""
    runs = []
    for source in ("dcp", "consolidated"):
        model, opt, scheduler = _build(spec, "acco", partition, seed=1)
        if source == "dcp":
            _load(path, model, opt, scheduler)
        else:
            opt.load_state_dict(portable)
            scheduler.load_state_dict(scheduler_state)
        params = []
        for call in range(num_calls):
            _call(model, opt, scheduler, rank, call)
            params.append(_params(model))
        opt.finish()
        params.append(_params(model))
        runs.append((params, opt.num_updates, opt.noise_scale))
        opt.close()
    # The consolidated form carries the noise scale's average; the sharded form does not (its template's keys are
    # required keys), so after a DCP load it starts afresh: only the updates since count.
    assert runs[0][2] != runs[1][2] and runs[1][2] is not None
    return _differing(runs[0][0], runs[1][0]), runs[0][1], runs[1][1]


def _assert_same_state(a, b):
    """Two consolidated checkpoints (``torch.optim``'s form plus the master weights): equal bit for bit."""
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for index, state in a["state"].items():
        assert sorted(state) == sorted(b["state"][index]), index
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)
    assert sorted(a["acco"]["master"]) == sorted(b["acco"]["master"])
    for index, master in a["acco"]["master"].items():
        assert torch.equal(master, b["acco"]["master"][index]), index
    assert a["acco"]["num_updates"] == b["acco"]["num_updates"]


def _same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("spec,partition", [("adamw", "flat"), ("adafactor", "param"), ("muon+adamw", "auto")])
def test_dcp_reshard_4_to_2_to_3_matches_the_consolidated_path(run_distributed, tmp_path, spec, partition):
    four, two = str(tmp_path / "four"), str(tmp_path / "two")
    portable, scheduler_state, committed = run_distributed(4, train_and_save, four, spec, partition, 6)[0]
    from_four = run_distributed(2, load_and_save, four, two, spec, partition)
    _assert_same_state(from_four[0][0], portable)
    assert all(_same_params(params, committed) for _, params in from_four)  # the load wrote them into every model
    from_two = run_distributed(3, load_and_save, two, None, spec, partition)
    _assert_same_state(from_two[0][0], portable)
    assert all(_same_params(params, committed) for _, params in from_two)
    # and training goes on from there exactly as from the consolidated checkpoint
    for differing, via_dcp, via_portable in run_distributed(3, train_on_both_ways, two, portable, scheduler_state, spec, partition, 4):
        assert differing == [] and via_dcp == via_portable == portable["acco"]["num_updates"] + 2


def test_a_world_size_that_divides_nothing_loads_exactly(run_distributed, tmp_path):
    """58 elements in parameters of 35, 7, 14 and 2: three ranks cut every one of them somewhere."""
    shape = {"hidden": 7, "out": 2}
    portable, _, committed = run_distributed(2, train_and_save, str(tmp_path / "two"), "adamw", "flat", 5, shape)[0]
    loaded = run_distributed(3, load_and_save, str(tmp_path / "two"), None, "adamw", "flat", shape)
    _assert_same_state(loaded[0][0], portable)
    assert all(_same_params(params, committed) for _, params in loaded)


# ---------------------------------------------------------------------- readable without acco
def read_without_acco(rank, world_size, path):
    """Save a named AdamW with DCP, then read the files back into plain tensors of each parameter's shape."""
    model, opt, scheduler = _build(named=True)
    for call in range(5):
        _call(model, opt, scheduler, rank, call)
    portable = _consolidated(opt)  # the independent reference
    _save(path, model, opt, scheduler)
    opt.close()
    names = [n for n, _ in model.named_parameters()]
    plain = {"optimizer": {
        "state": {n: {"step": torch.zeros(()), "exp_avg": torch.empty_like(p), "exp_avg_sq": torch.empty_like(p)}
                  for n, p in model.named_parameters()},
        "acco": {"master": {n: torch.empty(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}},
    }}
    dcp.load(plain, checkpoint_id=path)
    keys = sorted(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    order = [n for g in _named_groups(model) for n in g["param_names"]]  # torch.optim's indices follow the groups
    same = all(
        torch.equal(plain["optimizer"]["state"][n][k], portable["state"][order.index(n)][k]) for n in names for k in ("step", "exp_avg", "exp_avg_sq")
    ) and all(torch.equal(plain["optimizer"]["acco"]["master"][n], portable["acco"]["master"][order.index(n)]) for n in names)
    return same, keys


def test_the_checkpoint_reads_without_acco_keyed_by_parameter_name(run_distributed, tmp_path):
    for same, keys in run_distributed(2, read_without_acco, str(tmp_path / "ckpt")):
        assert same
        assert "optimizer.state.0.weight.exp_avg" in keys and "optimizer.acco.master.2.bias" in keys
        assert "optimizer.param_groups.0.lr" in keys and "model.0.weight" in keys


# ---------------------------------------------------------------------- async_save: the copy is taken at the call
class _HeldWriter(FileSystemWriter):
    """Writes only once released: the files are written after training went on, whatever the timing."""

    def __init__(self, path, release):
        super().__init__(path)
        self.release = release

    def write_data(self, plan, planner):
        assert self.release.wait(60), "never released"
        return super().write_data(plan, planner)


def async_save_then_train(rank, world_size, path, stager):
    """``stager``: "default", what ``dcp.async_save(state, checkpoint_id=path)`` copies with (torch's
    ``DefaultStager``), or "writer", a ``FileSystemWriter``'s own (``BlockingAsyncStager``)."""
    model, opt, scheduler = _build()
    for call in range(5):
        _call(model, opt, scheduler, rank, call)
    state = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}
    at_the_call = _consolidated(opt)
    release = threading.Event()
    staging = DefaultStager(StagingOptions(False, False, False, False)) if stager == "default" else None
    future = dcp.async_save(state, storage_writer=_HeldWriter(path, release), **({"async_stager": staging} if staging else {}))
    del state
    for call in range(5, 9):  # training goes on: master and state change in place
        _call(model, opt, scheduler, rank, call)
    later = _consolidated(opt)
    release.set()
    future.result(timeout=60)
    if staging is not None:
        staging.close()
    opt.close()
    model, opt, scheduler = _build(seed=1)
    template = {"model": model.state_dict(), "optimizer": opt.sharded_state_dict()}
    dcp.load(template, checkpoint_id=path)
    opt.load_sharded_state_dict(template["optimizer"])
    loaded = _consolidated(opt)
    opt.close()
    moved = not torch.equal(later["acco"]["master"][0], at_the_call["acco"]["master"][0])
    return at_the_call, loaded, moved


@pytest.mark.parametrize("stager", ["default", "writer"])
def test_async_save_writes_the_state_at_the_call_while_training_goes_on(run_distributed, tmp_path, stager):
    for at_the_call, loaded, moved in run_distributed(2, async_save_then_train, str(tmp_path / "ckpt"), stager):
        assert moved  # training did change the state before the files were written
        _assert_same_state(loaded, at_the_call)


# ---------------------------------------------------------------------- memory: at most one shard's copy
def save_peaks(rank, world_size, path):
    """The CPU allocator's peak (profiler events) over a sync save and over an async save's call, against
    one shard of optimizer state, (1 + k)·S·m: master and AdamW's two moments, fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.Tanh(), nn.Linear(1024, 256))  # 525k parameters
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), batch_rule_applied=True)
    for call in range(4):
        model(torch.randn(16, 256, generator=torch.Generator().manual_seed(call))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = {"optimizer": opt.sharded_state_dict()}
    with AllocationPeak("cpu") as sync:
        dcp.save(state, checkpoint_id=os.path.join(path, "sync"))
    with AllocationPeak("cpu") as call:
        future = dcp.async_save(state, checkpoint_id=os.path.join(path, "async"))
    future.result(timeout=60)
    one_shard = 3 * opt.layout.shard_size * 4
    opt.close()
    return sync.peak_bytes, call.peak_bytes, one_shard


def test_a_save_holds_no_copy_and_async_save_one_shard(run_distributed, tmp_path):
    """DCP's file writer copies any tensor whose storage is larger than itself and keeps what it wrote until the
    file is closed (torch 2.13): a save of views of the master and state would hold a shard's copy. The blocks
    ``RunsTensor`` hands it own exactly their bytes. ``async_save`` copies once, at the call."""
    for sync, async_call, one_shard in run_distributed(2, save_peaks, str(tmp_path)):
        assert sync < one_shard / 8, (sync, one_shard)  # bookkeeping only (the step counters, DCP's own)
        assert one_shard <= async_call <= one_shard + 16 * 1024, (async_call, one_shard)


# ---------------------------------------------------------------------- bad input: every rank refuses, nothing changes
def _snapshot(opt, model):
    return opt._shard.master.clone(), {v: {k: t.clone() for k, t in s.items()} for v, s in opt._shard.view_states().items()}, _params(model)


def _same(a, b):
    master_a, state_a, params_a = a
    master_b, state_b, params_b = b
    return (torch.equal(master_a, master_b) and sorted(state_a) == sorted(state_b)
            and all(torch.equal(state_a[v][k], state_b[v][k]) for v in state_a for k in state_a[v])
            and all(torch.equal(x, y) for x, y in zip(params_a, params_b)))


def save_for_refusal(rank, world_size, path, case):
    """The checkpoint a case tries to load: from another model, another optimizer class, or a good one."""
    if case == "another model":
        model, opt, scheduler = _build(model=_model(hidden=7))
    elif case == "another class, same keys":
        model, opt, scheduler = _build(optimizer_class=torch.optim.Adam)
    elif case == "another class":
        model, opt, scheduler = _build("sgd")
    else:
        model, opt, scheduler = _build()
    for call in range(3):
        _call(model, opt, scheduler, rank, call)
    state = {"optimizer": opt.sharded_state_dict()}
    dcp.save(state, checkpoint_id=path)
    per_rank = opt.state_dict()
    opt.close()
    return per_rank


def _attempt(case, opt, path, per_rank, rank):
    """The bad call of each case."""
    if case == "per-rank dict":
        opt.load_sharded_state_dict(per_rank[rank])
    elif case == "sharded dict into load_state_dict":
        opt.load_state_dict(opt.sharded_state_dict())
    else:
        template = {"optimizer": opt.sharded_state_dict()}
        if case != "not loaded":
            dcp.load(template, checkpoint_id=path)
        opt.load_sharded_state_dict(template["optimizer"])


def load_refused(rank, world_size, path, case, per_rank):
    """A trained optimizer tries the bad load (its live state is what a careless load would overwrite):
    returns the error on this rank, whether anything changed, and whether its training afterwards is
    that of a twin that never tried."""
    runs = []
    for tries in (True, False):
        model, opt, scheduler = _build()
        for call in range(4):
            _call(model, opt, scheduler, rank, call)
        opt.finish()
        template = None
        if case == "used twice":  # a good load first (the twin makes it too), then the same template again
            template = {"optimizer": opt.sharded_state_dict()}
            dcp.load(template, checkpoint_id=path)
            opt.load_sharded_state_dict(template["optimizer"])
        before = _snapshot(opt, model)
        error = None
        if tries:
            try:
                if template is not None:
                    opt.load_sharded_state_dict(template["optimizer"])
                else:
                    _attempt(case, opt, path, per_rank, rank)
            except (CheckpointError, CheckpointException) as caught:
                error = (type(caught).__name__, str(caught))
        unchanged = _same(before, _snapshot(opt, model))
        for call in range(4, 7):
            _call(model, opt, scheduler, rank, call)
        opt.finish()
        runs.append((error, unchanged, _params(model)))
        opt.close()
    (error, unchanged, tried), (_, _, untouched) = runs
    return error, unchanged, _same_params(tried, untouched)


REFUSALS = [
    # (case, the error every rank raises, its message)
    ("another model", "CheckpointException", r"Size mismatch .* optimizer\.state\.0\.exp_avg"),  # DCP refuses the shapes itself
    ("another class", "CheckpointException", r"Missing key in checkpoint state_dict: optimizer\.state\.0\."),
    ("another class, same keys", "CheckpointError", r"optimizer_class differs.*Adam'.*AdamW"),  # DCP cannot tell Adam's keys from AdamW's
    ("missing shard file", "CheckpointException", r"No such file|FileNotFoundError"),
    ("not loaded", "CheckpointError", r"not filled by torch\.distributed\.checkpoint\.load"),
    ("used twice", "CheckpointError", r"loaded into an optimizer already"),
    ("per-rank dict", "CheckpointError", r"'acco-per-rank' state dict: load it with load_state_dict\(\)"),
    ("sharded dict into load_state_dict", "CheckpointError", r"'acco-sharded' state dict: load it with load_sharded_state_dict\(\)"),
]


@pytest.mark.parametrize("case,kind,pattern", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_bad_input_is_refused_on_every_rank_and_changes_nothing(run_distributed, tmp_path, case, kind, pattern):
    path = str(tmp_path / "ckpt")
    per_rank = run_distributed(2, save_for_refusal, path, case)
    if case == "missing shard file":
        os.remove(os.path.join(path, "__1_0.distcp"))
    for rank, (error, unchanged, trains_as_before) in enumerate(run_distributed(2, load_refused, path, case, per_rank)):
        assert error is not None, f"rank {rank} raised nothing"
        assert error[0] == kind and re.search(pattern, error[1], re.S), f"rank {rank}: {error}"
        assert unchanged, f"rank {rank}: the failed load changed the optimizer or the model"
        assert trains_as_before, f"rank {rank}: training after the failed load differs from a run that never tried"
