"""The torch.optim conventions users rely on: schedulers, manual lr, zero_grad variants,
closures, finish(), exact evaluation, bf16 parameters with an fp32 master, the single-worker
fallback, and the tentative (estimate) step leaving committed state untouched."""

from __future__ import annotations

import copy
import logging
import traceback
import warnings

import pytest
import torch
from torch import nn

import acco
import workloads
from acco import AccoOptimizer
from acco.layout import build_layout
from acco.shard import ShardOptimizer
from reference import blocking_plan, simulate
from test_equivalence import assert_matches_reference


def lam(k: int) -> float:
    return 1.0 / (1.0 + 0.5 * k)


def train_with_lr_changes(rank, world_size, mode, how):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode)
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam) if how == "scheduler" else None
    num_calls = 7
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "lr_scheduler.step() before optimizer.step()"
        for call in range(num_calls):
            if how == "manual":
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * lam(call)
            workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()
        if how == "manual":
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * lam(num_calls)
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return final


@pytest.mark.parametrize("how", ["scheduler", "manual"])
@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_each_round_uses_the_hyper_parameters_at_its_launch(run_distributed, mode, how):
    results = run_distributed(2, train_with_lr_changes, mode, how)
    reference = simulate(mode, blocking_plan(mode, 2, 7), "mlp", "adamw", lr_at_round=lam)
    for final in results:
        for got, want in zip(final, reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def train_zero_grad_variant(rank, world_size, mode, variant):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode)
    held = []
    for call in range(6):
        held.append([p.detach().clone() for p in model.parameters()])
        if variant == "closure":
            def closure():
                opt.zero_grad()
                loss = workloads.loss_fn(model, *workloads.batch(rank, call))
                loss.backward()
                return loss
            assert isinstance(opt.step(closure), torch.Tensor)
            continue
        workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
        opt.step()
        if variant == "opt-none":
            opt.zero_grad(set_to_none=True)
        elif variant == "opt-zero":
            opt.zero_grad(set_to_none=False)
        elif variant == "model-none":
            model.zero_grad(set_to_none=True)
        elif variant == "model-zero":
            model.zero_grad(set_to_none=False)
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    info = (opt.num_updates, opt.partition, opt.world_size, opt.rank)
    opt.close()
    return held, final, info


@pytest.mark.parametrize("variant", ["opt-none", "opt-zero", "model-none", "model-zero", "none", "closure"])
@pytest.mark.parametrize("mode", ["acco", "dpu"])
def test_every_way_of_zeroing_gradients(run_distributed, mode, variant):
    results = run_distributed(2, train_zero_grad_variant, mode, variant)
    assert_matches_reference(results, mode, "adamw", 2, 6)


def test_zero_grad_discards_a_backward_not_handed_to_step():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("sgd", model), mode="sync")
    before = [p.detach().clone() for p in model.parameters()]
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    opt.zero_grad()
    opt.step()  # no gradient: SGD with momentum on zero gradients does not move
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.close()


def test_single_process_fallback_matches_reference(caplog):
    """No process group: one worker, same equations (world size 1), logged."""
    import acco.validation as facade

    facade._logged_single_worker = False
    results = []
    with caplog.at_level(logging.INFO, logger="acco"):
        for mode in ["acco", "dpu", "sync"]:
            results.append(train_zero_grad_variant(0, 1, mode, "opt-none"))
    assert sum("single worker" in r.getMessage() for r in caplog.records) == 1
    for mode, result in zip(["acco", "dpu", "sync"], results):
        assert_matches_reference([result], mode, "adamw", 1, 6)


def build_under_torchrun_settings(rank, world_size, settings):
    """Builds an optimizer with torchrun's variables ``settings`` set; returns rank's acco warnings about restarts."""
    import os

    import acco.validation as facade

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    logging.getLogger("acco").addHandler(handler)
    facade._warned_shared_restart_store = False
    try:
        for _ in range(2):  # said once per process
            model = workloads.make_model()
            AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync").close()
    finally:
        logging.getLogger("acco").removeHandler(handler)
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return [message for message in seen if "max-restarts" in message]


@pytest.mark.parametrize("restarts, shared, warned", [("3", "True", True), ("3", "False", False), ("0", "True", False)])
def test_warns_when_torchrun_restarts_would_reuse_a_shared_store(run_distributed, restarts, shared, warned):
    """torchrun --max-restarts with the agent's store shared (static rendezvous, or c10d without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) re-forms no group after a restart (pytorch#135712): rank 0 says so,
    once, at the first start."""
    settings = {"TORCHELASTIC_MAX_RESTARTS": restarts, "TORCHELASTIC_USE_AGENT_STORE": shared}
    results = run_distributed(2, build_under_torchrun_settings, settings)
    assert [len(r) for r in results] == ([1, 0] if warned else [0, 0]), results
    if warned:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in results[0][0] and "--standalone" in results[0][0], results


def evaluate_mid_training(rank, world_size, stop_after):
    """Exact evaluation inside committed_parameters(), then training continues unperturbed."""
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
    seen = {}
    for call in range(7):
        workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
        opt.step()
        opt.zero_grad()
        if call == stop_after:
            with opt.committed_parameters():
                seen["inside"] = [p.detach().clone() for p in model.parameters()]
            seen["after"] = [p.detach().clone() for p in model.parameters()]
    opt.finish()
    seen["final"] = [p.detach().clone() for p in model.parameters()]
    opt.close()
    return seen


@pytest.mark.parametrize("stop_after", [2, 3])
def test_committed_parameters_is_exact_and_does_not_perturb(run_distributed, stop_after):
    reference = simulate("acco", blocking_plan("acco", 2, 7), "mlp", "adamw")
    # After call c, round c is in flight; the last commit is round c (odd c) or c - 1 (even c).
    last_commit = stop_after if stop_after % 2 else stop_after - 1
    for seen in run_distributed(2, evaluate_mid_training, stop_after):
        for got, want in zip(seen["inside"], reference.outputs[last_commit]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        for got, want in zip(seen["after"], reference.outputs[stop_after - 1]):  # what it held before
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        for got, want in zip(seen["final"], reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def train_bf16_constant_gradient(rank, world_size, mode):
    """A constant gradient makes the fp32 master trajectory exactly computable; each update is far
    below bf16 resolution, so a bf16-only optimizer would never move the parameters."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.ones(37, dtype=torch.bfloat16))
    direction = torch.linspace(-1, 1, 37, dtype=torch.bfloat16)
    opt = AccoOptimizer([param], torch.optim.SGD, lr=1e-4, mode=mode)
    for _ in range(40):
        (param * direction).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    out = (param.detach().clone(), opt.num_updates, opt._shard.master.dtype, opt.memory_bytes())
    opt.close()
    return out


@pytest.mark.parametrize("mode", ["acco", "sync"])
def test_bf16_parameters_keep_an_fp32_master(run_distributed, mode):
    for value, updates, master_dtype, memory in run_distributed(2, train_bf16_constant_gradient, mode):
        assert master_dtype == torch.float32
        assert value.dtype == torch.bfloat16
        master = torch.ones(37, dtype=torch.float32)
        step = 1e-4 * torch.linspace(-1, 1, 37, dtype=torch.bfloat16).float()
        for _ in range(updates):
            master = master - step
        torch.testing.assert_close(value, master.to(torch.bfloat16), rtol=0, atol=0)
        assert not torch.equal(value, torch.ones(37, dtype=torch.bfloat16))


def train_bf16_comm(rank, world_size):
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco", comm_dtype=torch.bfloat16)
    for call in range(6):
        workloads.loss_fn(model, *workloads.batch(rank, call, torch.float32)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    out = [p.detach().clone() for p in model.parameters()], opt.memory_bytes()
    opt.close()
    return out


def test_bf16_communication_stays_close_to_fp32(run_distributed):
    reference = simulate("acco", blocking_plan("acco", 2, 6), "mlp", "adamw", dtype=torch.float32)
    for final, memory in run_distributed(2, train_bf16_comm):
        for got, want in zip(final, reference.final):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
        assert memory["comm"] == memory["params"]  # one buffer, sized for the wider dtype
        assert memory["dtype_conversion"] == memory["master_shard"] // 2  # the bf16 gradient shard


@pytest.mark.parametrize("spec", ["adamw", "sgd", "adafactor", "muon"])
@pytest.mark.parametrize("partition", ["flat", "param"])
def test_tentative_step_restores_committed_state_bit_for_bit(spec, partition):
    if partition == "flat" and spec in ("adafactor", "muon"):
        pytest.skip("whole-tensor optimizer")
    model = workloads.make_model(workloads.model_kind_for(spec), torch.float32)
    template = workloads.make_optimizer(spec, model)
    params = [p for g in template.param_groups for p in g["params"]]
    groups = [i for i, g in enumerate(template.param_groups) for _ in g["params"]]
    layout = build_layout(partition, [p.numel() for p in params], groups, 1)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat = torch.cat([flat, flat.new_zeros(layout.total_size - flat.numel())])
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in template.param_groups]
    shard = ShardOptimizer(type(template), template.defaults, hyper, layout, 0, flat, [p.shape for p in params])
    torch.manual_seed(1)
    for _ in range(3):  # build up real state first
        shard.grad.copy_(torch.randn_like(shard.grad))
        shard.step()
    shard.grad.copy_(torch.randn_like(shard.grad))
    before_master = shard.master.clone()
    before_state = copy.deepcopy(shard.optimizer.state_dict())
    seen = {}
    shard.tentative_step(lambda result: seen.setdefault("tentative", result.clone()))
    assert not torch.equal(seen["tentative"], before_master)
    assert torch.equal(shard.master, before_master)
    after_state = shard.optimizer.state_dict()
    assert before_state["state"].keys() == after_state["state"].keys()
    for key, entry in before_state["state"].items():
        assert entry.keys() == after_state["state"][key].keys()
        for name, value in entry.items():
            other = after_state["state"][key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (key, name)
            else:
                assert value == other, (key, name)
    shard.step()  # the real step from the restored state must land where the tentative one did
    torch.testing.assert_close(shard.master, seen["tentative"], rtol=0, atol=0)


def test_first_estimate_leaves_no_state():
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
    initial = opt._shard.master.clone()
    workloads.loss_fn(model, *workloads.batch(0, 0, torch.float32)).backward()
    opt.step()
    opt._pipeline.peek()  # the estimate round has run
    assert len(opt._shard.optimizer.state) == 0
    assert torch.equal(opt._shard.master, initial)
    assert opt.num_updates == 0
    opt.finish()
    assert opt.num_updates == 1 and len(opt._shard.optimizer.state) > 0
    opt.close()


def test_memory_accounting_follows_the_formula():
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
    for call in range(4):
        workloads.loss_fn(model, *workloads.batch(0, call, torch.float32)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    sizes = opt.memory_bytes()
    n, s = opt.layout.total_size, opt.layout.shard_size
    assert sizes["params"] == sizes["grads"] == sizes["comm"] == 4 * n
    assert sizes["master_shard"] == sizes["grad_shard"] == sizes["estimate_carry"] == 4 * s
    assert sizes["optimizer_state"] <= 2 * 4 * s + 64  # exp_avg, exp_avg_sq (+ step scalars)
    assert sizes["dtype_conversion"] == 0
    opt.close()


class ExplodingSGD(torch.optim.SGD):
    """An optimizer whose second update fails, as an out-of-memory error inside a round would."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise MemoryError("boom in round")
        return super().step(closure)


def test_an_error_inside_a_background_round_reaches_the_training_thread():
    model = workloads.make_model()
    opt = AccoOptimizer(model.parameters(), ExplodingSGD, lr=0.1, mode="dpu")
    assert opt.partition == "param"  # unknown optimizer class: whole tensors
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    opt.step()  # round 0 runs fine
    workloads.loss_fn(model, *workloads.batch(0, 1)).backward()
    opt.step()  # installs round 0, launches round 1, which raises in the worker thread
    with pytest.raises(MemoryError, match="boom in round") as caught:
        opt.step()
    # the original traceback, down to the line that raised in the worker thread
    assert 'raise MemoryError("boom in round")' in "".join(traceback.format_exception(caught.value))
    with pytest.raises(acco.PipelineFailedError, match="failed earlier") as again:
        opt.finish()
    assert isinstance(again.value.__cause__, MemoryError)
    opt.close()


def train_with_own_collectives(rank, world_size, mode):
    """The training loop all-reduces its loss on the default group while rounds run on the
    optimizer's private group (docs/design.md §5): no deadlock, no mixed-up data."""
    import torch.distributed as dist

    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode)
    held, logged = [], []
    for call in range(6):
        held.append([p.detach().clone() for p in model.parameters()])
        loss = workloads.loss_fn(model, *workloads.batch(rank, call))
        loss.backward()
        opt.step()
        opt.zero_grad()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)  # the user's own collective, while the round is in flight
        logged.append(reduced.item())
    opt.finish()
    final = [p.detach().clone() for p in model.parameters()]
    info = (opt.num_updates, opt.partition, opt.world_size, opt.rank)
    opt.close()
    return held, final, info, logged


@pytest.mark.parametrize("mode", ["acco", "dpu"])
def test_training_loop_collectives_do_not_interfere(run_distributed, mode):
    results = run_distributed(3, train_with_own_collectives, mode)
    assert_matches_reference([r[:3] for r in results], mode, "adamw", 3, 6)
    assert all(r[3] == results[0][3] for r in results)  # every rank logged the same global losses


def test_every_public_error_is_exported_from_the_package():
    """One home for errors (acco/errors.py), each exported from ``acco``; a failed pipeline has its own
    class (a ``RuntimeError``, as before)."""
    import inspect

    import acco.errors

    classes = {name for name, obj in inspect.getmembers(acco.errors, inspect.isclass) if issubclass(obj, Exception)}
    assert classes <= set(acco.__all__), classes - set(acco.__all__)
    assert {"ShardedStateError", "PipelineFailedError"} <= classes
    assert issubclass(acco.PipelineFailedError, RuntimeError)
