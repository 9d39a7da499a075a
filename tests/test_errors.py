"""Bad input gets a clear error, raised before any state changes, and on every rank.

"Before any state changes" means: the model's parameters are still the same ``Parameter``
objects, on their original storage (``data_ptr``), with their original values; their ``.grad``
is untouched and no hooks were left behind. Distributed cases run on 2 real gloo ranks; every
rank returns what it caught, so that a rank that did not raise (or hung) fails the test.

Also the documented behaviours around unusual parameters: frozen parameters are left alone,
and a trainable parameter that gets no gradient on any rank is left untouched (no weight decay, no
moment update), as torch's optimizers skip ``p.grad is None``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import workloads
from acco import AccoOptimizer

# ---------------------------------------------------------------------- helpers


def _dense(t):
    t = t.detach()
    return t.to_dense() if t.layout != torch.strided else t.clone()


def snapshot(params):
    """Everything a failed construction / step must leave as it was, per parameter."""
    params = list(params)
    return [
        {
            "param": p,
            "ptr": None if p.is_meta else p.data_ptr(),
            "value": None if p.is_meta else p.detach().clone(),
            "grad": p.grad,
            "grad_value": None if p.grad is None else _dense(p.grad),
            "hooks": len(getattr(p, "_post_accumulate_grad_hooks", None) or ()),
        }
        for p in params
    ]


def state_problems(params, snap) -> list[str]:
    """What changed since ``snapshot`` (an empty list when nothing did)."""
    params = list(params)
    problems = []
    if len(params) != len(snap):
        return [f"the model now has {len(params)} parameters instead of {len(snap)}"]
    for index, (p, s) in enumerate(zip(params, snap)):
        if p is not s["param"]:
            problems.append(f"parameter {index} is a different object")
            continue
        if not p.is_meta:
            if p.data_ptr() != s["ptr"]:
                problems.append(f"parameter {index} moved to another storage")
            if not torch.equal(p.detach(), s["value"]):
                problems.append(f"parameter {index} changed value")
        if p.grad is not s["grad"]:
            problems.append(f"parameter {index} has a different .grad object ({s['grad'] is None=} before)")
        elif p.grad is not None and not torch.equal(_dense(p.grad), s["grad_value"]):
            problems.append(f"parameter {index}'s gradient changed value")
        hooks = len(getattr(p, "_post_accumulate_grad_hooks", None) or ())
        if hooks != s["hooks"]:
            problems.append(f"parameter {index} has {hooks} post-accumulate hooks instead of {s['hooks']}")
    return problems


def assert_raises_cleanly(error_type, fragments, build, model):
    """``build()`` raises ``error_type`` whose message contains every fragment; the model is untouched."""
    params = list(model.parameters())
    snap = snapshot(params)
    with pytest.raises(error_type) as info:
        result = build()
        if isinstance(result, AccoOptimizer):  # pragma: no cover - only when the test fails
            result.close()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the error message {message!r}"
    assert state_problems(model.parameters(), snap) == []
    return message


def catch(fn):
    """(exception type name, message) of what ``fn()`` raised; None when it did not raise."""
    try:
        result = fn()
    except Exception as error:  # noqa: BLE001 - reported to the test
        return type(error).__name__, str(error)
    if isinstance(result, AccoOptimizer):
        result.close()
    return None


def mlp(dtype=torch.float64, seed=0):
    return workloads.make_model("mlp", dtype, seed)


def train(model, opt, num_calls, *, rank=0, zero_grad="optimizer"):
    for call in range(num_calls):
        x, y = workloads.batch(rank, call)
        workloads.loss_fn(model, x, y).backward()
        opt.step()
        if zero_grad == "optimizer":
            opt.zero_grad()
        else:
            model.zero_grad()
    opt.finish()


# ---------------------------------------------------------------------- differences across ranks


def _model_for_rank(rank: int, case: str) -> nn.Module:
    if rank == 0:
        return mlp()
    if case == "count":  # one extra Linear on rank 1
        model = mlp()
        model.append(nn.Linear(workloads.OUT, workloads.OUT).double())
        return model
    if case == "shape":  # a wider hidden layer on rank 1
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(workloads.IN, workloads.HIDDEN + 1), nn.Tanh(), nn.Linear(workloads.HIDDEN + 1, workloads.OUT)
        ).double()
    if case in ("dtype", "dtype_same_comm_dtype"):
        return mlp(torch.float32)
    return mlp()


_SETTINGS_0 = {"mode": "acco", "max_grad_norm": None, "partition": "auto", "blocking": True}
_SETTINGS_1 = {
    "mode": {"mode": "dpu"},
    "max_grad_norm": {"max_grad_norm": 1.0},
    "partition": {"partition": "param"},
    "blocking": {"blocking": False},
    "nonfinite": {"nonfinite": "skip"},
}


def construct_mismatched(rank, world_size, case):
    model = _model_for_rank(rank, case)
    settings = dict(_SETTINGS_0)
    if rank == 1:
        settings.update(_SETTINGS_1.get(case, {}))
    if case == "dtype_same_comm_dtype":
        settings["comm_dtype"] = torch.float32  # the same setting everywhere: only the parameters differ
    optimizer_class = torch.optim.AdamW if (case == "optimizer_class" and rank == 1) else torch.optim.SGD
    lr = 0.1
    if case == "tensor_lr":  # a tensor learning rate: compared by value (a repr rounds it, and names its device)
        lr = torch.tensor(0.1 if rank == 0 else 0.1000001, dtype=torch.float64)
    snap = snapshot(model.parameters())
    error = catch(lambda: AccoOptimizer(model.parameters(), optimizer_class, lr=lr, **settings))
    problems = state_problems(model.parameters(), snap)

    # The failed construction left the process group usable: a correct one still works here.
    good = mlp()
    opt = AccoOptimizer(good.parameters(), torch.optim.SGD, lr=0.1, mode="sync")
    train(good, opt, 2, rank=rank)
    final = [p.detach().clone() for p in good.parameters()]
    opt.close()
    return error, problems, final


MISMATCHES = {
    # case: fragments every rank's message must contain
    "count": ["rank 0 has 4", "rank 1 has 6"],
    "shape": ["parameter 0", "(6, 5)", "(7, 5)"],
    "dtype": ["float64", "float32"],
    "dtype_same_comm_dtype": ["parameter 0", "float64", "float32"],
    "mode": ["mode", "'acco'", "'dpu'"],
    "max_grad_norm": ["max_grad_norm", "None", "1.0"],
    "partition": ["partition", "'flat'", "'param'"],
    "blocking": ["blocking", "True", "False"],
    "optimizer_class": ["optimizer_class", "SGD", "AdamW"],
    "nonfinite": ["nonfinite", "'raise'", "'skip'"],
    "tensor_lr": ["hyper-parameters", "'0.1'", "'0.1000001'"],
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_differences_across_ranks_raise_on_every_rank(run_distributed, case):
    results = run_distributed(2, construct_mismatched, case, timeout=60)
    for rank, (error, problems, _) in enumerate(results):
        assert error is not None, f"rank {rank} did not raise"
        kind, message = error
        assert kind == "ValueError", f"rank {rank}: {kind}: {message}"
        for fragment in MISMATCHES[case]:
            assert fragment in message, f"rank {rank}: {fragment!r} not in {message!r}"
        assert problems == [], f"rank {rank}: {problems}"
    assert results[0][1] == results[1][1]  # the same error everywhere
    assert results[0][0] == results[1][0]
    for got, want in zip(results[1][2], results[0][2]):  # the later, correct optimizer trained in sync
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def construct_with_tensor_lr(rank, world_size):
    model = mlp()
    opt = AccoOptimizer(model.parameters(), torch.optim.SGD, lr=torch.tensor(0.1, dtype=torch.float64), mode="sync")
    train(model, opt, 2, rank=rank)
    opt.close()
    return True


def test_equal_tensor_hyperparameters_are_accepted(run_distributed):
    from acco.validation import comparable

    assert run_distributed(2, construct_with_tensor_lr, timeout=60) == [True, True]
    shown = repr(comparable(torch.tensor([1e-3, 2e-3])))
    assert "device" not in shown and "cpu" not in shown and "0.001" in shown
    assert comparable(torch.tensor(1e-3)) != comparable(torch.tensor(1.00001e-3))


def test_dtype_difference_across_ranks_is_reported_as_a_parameter_difference(run_distributed):
    results = run_distributed(2, construct_mismatched, "dtype", timeout=60)
    for rank, (error, _, _) in enumerate(results):
        assert error is not None and error[0] == "ValueError", (rank, error)
        assert "comm_dtype" not in error[1] and "parameter" in error[1], (rank, error[1])


# ---------------------------------------------------------------------- parameters


def test_mixed_devices():
    model = mlp(torch.float32)
    model.register_parameter("on_meta", nn.Parameter(torch.empty(3, device="meta")))
    assert_raises_cleanly(
        ValueError, ["one device", "meta: 0", "cpu: 1, 2, 3, 4"], lambda: AccoOptimizer(model.parameters(), torch.optim.SGD, lr=0.1), model
    )


def test_a_non_floating_dtype_among_floating_ones_is_named():
    """Mixed floating dtypes are supported (tests/test_mixed_dtypes.py); a complex parameter is not."""
    model = mlp(torch.float32)
    model[2].double()
    model.register_parameter("twisted", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    for build in (
        lambda: AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=0.1),
        lambda: AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1)),
    ):
        assert_raises_cleanly(ValueError, ["floating point", "parameters 0 are", "complex64"], build, model)


def test_sparse_gradient_raises_at_step_and_changes_nothing():
    torch.manual_seed(0)
    embedding = nn.Embedding(10, 4, sparse=True).double()
    head = nn.Linear(4, 1).double()
    model = nn.Sequential(embedding, head)
    opt = AccoOptimizer(model.parameters(), torch.optim.SGD, lr=0.1, mode="sync")
    tokens = torch.tensor([1, 2, 2, 7])

    # While p.grad is the optimizer's dense buffer, autograd adds the sparse gradient into it.
    model(tokens).sum().backward()
    opt.step()
    opt.zero_grad()

    # After model.zero_grad() (set_to_none), backward writes a fresh sparse gradient.
    model.zero_grad()
    model(tokens).sum().backward()
    assert embedding.weight.grad.is_sparse
    snap = snapshot(model.parameters())
    counters = (opt.rounds_launched, opt.rounds_installed, opt.num_updates, opt.pending_micro_batches)
    with pytest.raises(RuntimeError, match="sparse") as info:
        opt.step()
    assert "parameter 0" in str(info.value) and "(10, 4)" in str(info.value)
    assert state_problems(model.parameters(), snap) == []
    assert (opt.rounds_launched, opt.rounds_installed, opt.num_updates, opt.pending_micro_batches) == counters

    # Nothing was half-done: with the gradient made dense, the same step gives plain SGD.
    embedding.weight.grad = embedding.weight.grad.to_dense()
    expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
    opt.step()
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15)
    opt.close()


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(lambda model: [], id="empty-list"),
        pytest.param(lambda model: iter([]), id="empty-iterator"),
        pytest.param(lambda model: nn.Tanh().parameters(), id="module-without-parameters"),
        pytest.param(lambda model: [{"params": []}], id="empty-group"),
    ],
)
def test_empty_parameter_list_class_form(params):
    model = mlp()
    message = assert_raises_cleanly(ValueError, [], lambda: AccoOptimizer(params(model), torch.optim.SGD, lr=0.1), model)
    assert re.search("empty parameter list|no trainable parameters", message), message


def test_empty_parameter_list_instance_form():
    inner = torch.optim.SGD([{"params": []}], lr=0.1)  # torch accepts an empty group
    with pytest.raises(ValueError, match="no trainable parameters"):
        AccoOptimizer(inner)


def test_all_parameters_frozen():
    model = mlp()
    model.requires_grad_(False)
    for build in (
        lambda: AccoOptimizer(model.parameters(), torch.optim.SGD, lr=0.1),
        lambda: AccoOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)),
    ):
        assert_raises_cleanly(ValueError, ["no trainable parameters", "requires_grad=False"], build, model)


# ---------------------------------------------------------------------- the inner optimizer


class NotAnOptimizer:
    def __init__(self, params, **kwargs):
        self.param_groups = [{"params": list(params)}]


@pytest.mark.parametrize(
    "optimizer_class, fragment",
    [
        (nn.Linear, "Linear"),
        ("adamw", "'adamw'"),
        (NotAnOptimizer, "NotAnOptimizer"),
        (nn.Linear(2, 2), "Linear(in_features=2"),  # an instance of something else
        (3, "3"),
    ],
    ids=["nn.Linear", "string", "lookalike-class", "module-instance", "int"],
)
def test_optimizer_class_that_is_not_an_optimizer(optimizer_class, fragment):
    model = mlp()
    assert_raises_cleanly(
        TypeError,
        ["optimizer_class", fragment],
        lambda: AccoOptimizer(model.parameters(), optimizer_class, lr=0.1),
        model,
    )


def test_optimizer_instance_passed_as_optimizer_class():
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    assert_raises_cleanly(
        TypeError, ["optimizer_class", "SGD"], lambda: AccoOptimizer(model.parameters(), inner), model
    )


def test_missing_optimizer_class():
    model = mlp()
    assert_raises_cleanly(TypeError, ["optimizer_class is required"], lambda: AccoOptimizer(model.parameters()), model)
    assert_raises_cleanly(
        TypeError, ["optimizer_class is required"], lambda: AccoOptimizer(model.parameters(), lr=0.1), model
    )


def test_instance_form_with_extra_arguments():
    model = mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert_raises_cleanly(TypeError, ["hyper-parameters", "'lr'"], lambda: AccoOptimizer(inner, lr=0.2), model)
    assert_raises_cleanly(
        TypeError, ["optimizer_class", "AdamW"], lambda: AccoOptimizer(inner, torch.optim.AdamW), model
    )
    # The rejected calls did not spoil the instance: it still wraps.
    opt = AccoOptimizer(inner, mode="sync")
    opt.close()


def test_wrapping_an_optimizer_that_has_state():
    model = mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = workloads.batch(0, 0)
    workloads.loss_fn(model, x, y).backward()
    inner.step()
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in inner.state.items()}
    assert_raises_cleanly(ValueError, ["AdamW", "already has optimizer state"], lambda: AccoOptimizer(inner), model)
    assert {id(p): set(s) for p, s in inner.state.items()} == {k: set(v) for k, v in state_before.items()}
    for p, s in inner.state.items():
        for key, value in s.items():
            assert torch.equal(value, state_before[id(p)][key])


def test_wrapping_an_acco_optimizer():
    model = mlp()
    acco = AccoOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    try:
        assert_raises_cleanly(TypeError, ["AccoOptimizer"], lambda: AccoOptimizer(acco), model)
        assert_raises_cleanly(
            TypeError, ["AccoOptimizer"], lambda: AccoOptimizer(model.parameters(), AccoOptimizer, lr=0.1), model
        )
    finally:
        acco.close()


class MyLBFGS(torch.optim.LBFGS):
    pass


@pytest.mark.parametrize("optimizer_class", [torch.optim.LBFGS, torch.optim.SparseAdam, MyLBFGS])
@pytest.mark.parametrize("form", ["class", "instance"])
def test_unsupported_optimizers(optimizer_class, form):
    model = mlp()
    if form == "class":
        build = lambda: AccoOptimizer(model.parameters(), optimizer_class, lr=0.1)  # noqa: E731
    else:
        inner = optimizer_class(model.parameters(), lr=0.1)
        build = lambda: AccoOptimizer(inner)  # noqa: E731
    assert_raises_cleanly(TypeError, [f"cannot wrap {optimizer_class.__name__}"], build, model)


def test_bad_hyperparameter_is_rejected_by_torch_first():
    model = mlp()
    assert_raises_cleanly(
        ValueError, ["-1"], lambda: AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=-1), model
    )
    assert_raises_cleanly(
        ValueError, ["1.5"], lambda: AccoOptimizer(model.parameters(), torch.optim.AdamW, betas=(1.5, 0.9)), model
    )


# ---------------------------------------------------------------------- settings


def _build(model, optimizer_class=torch.optim.SGD, **kwargs):
    return lambda: AccoOptimizer(model.parameters(), optimizer_class, lr=0.01, **kwargs)


@pytest.mark.parametrize("mode", ["bogus", "ACCO", "", None, 1])
def test_unknown_mode(mode):
    model = mlp()
    assert_raises_cleanly(ValueError, ["mode", "'acco'", "'dpu'", "'sync'", repr(mode)], _build(model, mode=mode), model)


@pytest.mark.parametrize("partition", ["bogus", "FLAT", None])
def test_unknown_partition(partition):
    model = mlp()
    assert_raises_cleanly(
        ValueError, ["partition", "'auto'", "'flat'", "'param'", repr(partition)], _build(model, partition=partition), model
    )


@pytest.mark.parametrize("optimizer_class", [torch.optim.Muon, torch.optim.Adafactor], ids=lambda c: c.__name__)
def test_flat_partition_refused_for_whole_tensor_optimizers(optimizer_class):
    model = workloads.make_model("mlp_nobias")  # Muon takes 2-D parameters only
    assert_raises_cleanly(
        ValueError, ["partition='flat'", optimizer_class.__name__, "'param'"], _build(model, optimizer_class, partition="flat"), model
    )
    opt = AccoOptimizer(model.parameters(), optimizer_class, lr=0.01, partition="param")  # the fix works
    assert opt.partition == "param"
    opt.close()


def test_sync_mode_cannot_be_non_blocking():
    model = mlp()
    assert_raises_cleanly(ValueError, ["blocking=False", "sync"], _build(model, mode="sync", blocking=False), model)


@pytest.mark.parametrize("max_grad_norm", [0, 0.0, -1.0, float("nan"), float("-inf")])
def test_max_grad_norm_must_be_positive(max_grad_norm):
    model = mlp()
    assert_raises_cleanly(
        ValueError, ["max_grad_norm", repr(max_grad_norm)], _build(model, max_grad_norm=max_grad_norm), model
    )


@pytest.mark.parametrize("comm_dtype", [torch.int32, torch.bool, torch.complex64, "bf16", "bfloat16"])
def test_comm_dtype_must_be_a_floating_dtype(comm_dtype):
    model = mlp()
    assert_raises_cleanly(TypeError, ["comm_dtype", repr(comm_dtype)], _build(model, comm_dtype=comm_dtype), model)


@pytest.mark.parametrize("nonfinite", ["ignore", None, True])
def test_nonfinite_policy_must_be_known(nonfinite):
    model = mlp()
    assert_raises_cleanly(ValueError, ["nonfinite", repr(nonfinite)], _build(model, nonfinite=nonfinite), model)


@pytest.mark.parametrize("timeout,error", [(0, ValueError), (-3.0, ValueError), ("5m", TypeError), (True, TypeError)])
def test_timeout_must_be_a_positive_duration(timeout, error):
    model = mlp()
    assert_raises_cleanly(error, ["timeout", repr(timeout)], _build(model, timeout=timeout), model)


def test_add_param_group_after_construction():
    model = mlp()
    extra = nn.Linear(2, 2).double()
    opt = AccoOptimizer([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], torch.optim.SGD, lr=0.1)
    try:
        groups_before = [({k: v for k, v in g.items() if k != "params"}, list(g["params"])) for g in opt.param_groups]
        extra_snap = snapshot(extra.parameters())
        with pytest.raises(NotImplementedError, match="add_param_group"):
            opt.add_param_group({"params": list(extra.parameters()), "lr": 0.3})
        groups_after = [({k: v for k, v in g.items() if k != "params"}, list(g["params"])) for g in opt.param_groups]
        assert len(groups_after) == len(groups_before) == 2
        for (hp_a, params_a), (hp_b, params_b) in zip(groups_after, groups_before):
            assert hp_a == hp_b
            assert len(params_a) == len(params_b) and all(a is b for a, b in zip(params_a, params_b))
        assert state_problems(extra.parameters(), extra_snap) == []
        # ...and training goes on as before
        train(model, opt, 2)
    finally:
        opt.close()


# ---------------------------------------------------------------------- documented behaviours


@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_frozen_parameters_are_left_alone(mode):
    model = mlp()
    model[0].requires_grad_(False)
    frozen = list(model[0].parameters())
    snap = snapshot(frozen)
    trainable = list(model[2].parameters())
    trainable_before = [p.detach().clone() for p in trainable]
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=0.05, mode=mode)
    try:
        assert opt.layout.num_elements == sum(p.numel() for p in trainable) == workloads.HIDDEN * workloads.OUT + workloads.OUT
        train(model, opt, 5)
        opt.zero_grad()
        assert state_problems(frozen, snap) == []
        assert all(p.grad is None for p in frozen)
        assert all(not torch.equal(p.detach(), b) for p, b in zip(trainable, trainable_before))
    finally:
        opt.close()


class WithUnusedLayer(nn.Module):
    """A model whose ``unused`` Linear (registered between the used ones) never gets a gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(workloads.IN, workloads.HIDDEN)
        self.unused = nn.Linear(4, 3)
        self.last = nn.Linear(workloads.HIDDEN, workloads.OUT)
        self.double()

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)))


def train_with_unused_layer(rank, world_size, mode, zero_grad, num_calls):
    model = WithUnusedLayer()
    unused_before = [p.detach().clone() for p in model.unused.parameters()]
    used_before = [p.detach().clone() for n, p in model.named_parameters() if not n.startswith("unused")]
    # AdamW with weight decay: a zero gradient would still move the parameter (decay), a skipped one not
    opt = AccoOptimizer(model.parameters(), torch.optim.AdamW, lr=0.1, weight_decay=0.1, mode=mode)
    try:
        assert opt.layout.num_elements == sum(p.numel() for p in model.parameters())
        train(model, opt, num_calls, rank=rank, zero_grad=zero_grad)
        num_updates = opt.num_updates
    finally:
        opt.close()
    unused_same = [torch.equal(p.detach(), b) for p, b in zip(model.unused.parameters(), unused_before)]
    used_changed = [
        not torch.equal(p.detach(), b)
        for (n, p), b in zip([(n, p) for n, p in model.named_parameters() if not n.startswith("unused")], used_before)
    ]
    return unused_same, used_changed, num_updates


@pytest.mark.parametrize("zero_grad", ["optimizer", "model"])
@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_parameter_without_gradient_is_left_untouched(mode, zero_grad):
    unused_same, used_changed, num_updates = train_with_unused_layer(0, 1, mode, zero_grad, 5)
    assert num_updates >= 3
    assert all(unused_same), unused_same
    assert all(used_changed), used_changed


@pytest.mark.parametrize("mode", ["acco", "sync"])
def test_parameter_without_gradient_is_left_untouched_on_two_ranks(run_distributed, mode):
    results = run_distributed(2, train_with_unused_layer, mode, "model", 5, timeout=60)
    for rank, (unused_same, used_changed, num_updates) in enumerate(results):
        assert num_updates >= 3, rank
        assert all(unused_same), (rank, unused_same)
        assert all(used_changed), (rank, used_changed)


def construct_with_one_rank_rejecting(rank, world_size, what):
    model = workloads.make_model()
    kwargs = {}
    if rank == 1 and what == "mode":
        kwargs["mode"] = "bogus"
    if rank == 1 and what == "dtype":  # a dtype it cannot train (mixed floating dtypes are fine)
        model = nn.Sequential(nn.Linear(3, 3).double())
        model.register_parameter("twisted", nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    lr = 0.2 if (rank == 1 and what == "lr") else 0.1
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    try:
        AccoOptimizer(model.parameters(), torch.optim.SGD, lr=lr, **kwargs)
    except (ValueError, TypeError) as error:
        unchanged = all(p.data_ptr() == ptr and torch.equal(p, v) for p, (ptr, v) in zip(model.parameters(), before))
        return type(error).__name__, str(error), unchanged
    return None


@pytest.mark.parametrize("what", ["mode", "dtype", "lr"])
def test_an_error_on_one_rank_is_raised_on_every_rank(run_distributed, what):
    """A local check failing on rank 1 alone must not leave rank 0 waiting in a collective."""
    results = run_distributed(2, construct_with_one_rank_rejecting, what, timeout=60)
    for rank, outcome in enumerate(results):
        assert outcome is not None, f"rank {rank} did not raise"
        name, message, unchanged = outcome
        assert name == "ValueError" and unchanged, (rank, outcome)
        if what == "lr":
            assert "hyper-parameters" in message
        elif rank == 0:
            assert "rank 1 rejected" in message
