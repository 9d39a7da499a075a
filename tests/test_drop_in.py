""""Drop-in": whatever an ordinary script does to its model and optimizer, AccoOptimizer behaves like
DistributedDataParallel + the same torch optimizer, or raises a clear error on every rank before
anything is updated.

Each case runs on real gloo ranks and compares mode ``sync`` (plain ZeRO-1, one update per call)
against DDP + torch's own optimizer doing the same thing to its model; ``acco`` mode is checked for
the same promises where it has no step-by-step DDP twin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer, ParameterOwnershipError

TIMEOUT = 90


def adamw(params, **overrides):
    kwargs = dict(lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    kwargs.update(overrides)
    return torch.optim.AdamW(params, **kwargs)


def pair(mode="sync", dtype=torch.float64, find_unused=False, acco_class=None, **acco_kwargs):
    """The same model twice: one in DDP with AdamW, one with AccoOptimizer(AdamW)."""
    reference = workloads.make_model(dtype=dtype)
    ddp = DistributedDataParallel(reference, find_unused_parameters=find_unused)
    model = workloads.make_model(dtype=dtype)
    opt = (acco_class or AccoOptimizer)(adamw(model.parameters()), mode=mode, **acco_kwargs)
    return reference, ddp, adamw(reference.parameters()), model, opt


def both_step(rank, call, ddp, ref_opt, model, opt, dtype=torch.float64):
    x, y = workloads.batch(rank, call, dtype)
    workloads.loss_fn(ddp, x, y).backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    workloads.loss_fn(model, x, y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def close_all(results, tolerance=1e-12):
    for rank, result in enumerate(results):
        assert result["difference"] <= tolerance, f"rank {rank}: {result}"


def train_until_refused(rank, model, opt, calls, before_call, dtype=torch.float64):
    """Train; ``before_call(call)`` changes the model. Returns the ParameterOwnershipError's text and the
    call that raised it, and whether the model kept the values it had when the error was raised."""
    seen = [p.detach().clone() for p in model.parameters()]
    try:
        for call in range(calls):
            before_call(call)
            seen = [p.detach().clone() for p in model.parameters()]
            x, y = workloads.batch(rank, call, dtype)
            workloads.loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
    except ParameterOwnershipError as error:
        unchanged = all(torch.equal(p, v) for p, v in zip(model.parameters(), seen))
        return {"error": str(error), "call": call, "unchanged": unchanged}
    finally:
        opt.close()
    return {"error": None}


def assert_refused_alike(results, fragment):
    for rank, result in enumerate(results):
        assert result["error"] is not None, f"rank {rank} went on training"
        assert fragment in result["error"], result
    assert len({r["call"] for r in results}) == 1, results  # the same call on every rank


# ---------------------------------------------------------------------- moved, cast, loaded


def train_after_copying_move(rank, world_size):
    reference, ddp, ref_opt, model, opt = pair()
    before = [p.data_ptr() for p in model.parameters()]
    model.to(torch.device("cpu", 0))  # what Trainer / accelerate do: a copy on the same device
    copied = any(p.data_ptr() != b for p, b in zip(model.parameters(), before))
    for call in range(5):
        both_step(rank, call, ddp, ref_opt, model, opt)
    opt.finish()
    trained = largest_difference(model, workloads.make_model())
    opt.close()
    return {"copied": copied, "difference": largest_difference(model, reference), "trained": trained}


def test_a_copying_move_after_construction_is_adopted(run_distributed):
    results = run_distributed(2, train_after_copying_move, timeout=TIMEOUT)
    assert all(r["copied"] for r in results), "the move did not copy: the test shows nothing"
    assert all(r["trained"] > 1e-3 for r in results), results
    close_all(results)


def train_after_cast(rank, world_size, mode):
    model = workloads.make_model()
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode)
    model.to(torch.float32)
    return train_until_refused(rank, model, opt, 4, lambda call: None, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["sync", "acco"])
def test_a_cast_after_construction_is_refused_on_every_rank(run_distributed, mode):
    results = run_distributed(2, train_after_cast, mode, timeout=TIMEOUT)
    assert_refused_alike(results, "cast to another dtype")
    assert all("build the optimizer" in r["error"] and r["unchanged"] for r in results), results


def train_with_load(rank, world_size, when, how, engine="auto"):
    """Weights written into the model after the optimizer was built (before training, or after
    `when` calls), on every rank: training continues from them, as with DDP + AdamW."""
    reference, ddp, ref_opt, model, opt = pair(engine=engine)
    loaded = workloads.make_model(seed=7).state_dict()

    def write(module):
        if how == "load_state_dict":
            module.load_state_dict(loaded)
        else:
            torch.manual_seed(11)
            for p in module.parameters():
                nn.init.normal_(p, std=0.3)

    for call in range(6):
        if call == when:
            write(reference)
            write(model)
        both_step(rank, call, ddp, ref_opt, model, opt)
    opt.finish()
    opt.close()
    return {"difference": largest_difference(model, reference)}


@pytest.mark.parametrize("when", [0, 3])
@pytest.mark.parametrize("how", ["load_state_dict", "nn.init"])
def test_weights_written_after_construction_are_trained_from(run_distributed, when, how):
    close_all(run_distributed(2, train_with_load, when, how, timeout=TIMEOUT))


def acco_load_at_update_boundary(rank, world_size):
    """Mode acco: weights loaded between updates are what the next update starts from, never
    overwritten by the round that was in flight."""
    model = workloads.make_model()
    opt = AccoOptimizer(adamw(model.parameters()), mode="acco")
    loaded = workloads.make_model(seed=7)
    for call in range(4):  # two committed updates; the second is in flight
        workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
        opt.step()
        opt.zero_grad()
    model.load_state_dict(loaded.state_dict())
    workloads.loss_fn(model, *workloads.batch(rank, 4)).backward()
    opt.step()  # launches the estimate of update 3 from the loaded weights
    kept = largest_difference(model, loaded)
    opt.zero_grad()
    workloads.loss_fn(model, *workloads.batch(rank, 5)).backward()
    opt.step()  # the model now holds the estimate computed from the loaded weights
    opt.finish()
    with opt.committed_parameters():
        moved_from_loaded = largest_difference(model, loaded)
    opt.close()
    return {"kept": kept, "moved": moved_from_loaded, "updates": opt.num_updates}


def test_acco_mode_trains_from_weights_loaded_between_updates(run_distributed):
    for result in run_distributed(2, acco_load_at_update_boundary, timeout=TIMEOUT):
        assert result["kept"] == 0.0, result
        assert 0 < result["moved"] < 0.1, result  # one AdamW update of lr 0.02 from the loaded weights
        assert result["updates"] == 3


def write_on_one_rank(rank, world_size, mode):
    model = workloads.make_model()
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode)

    def load_on_rank_1(call):
        if call == 2 and rank == 1:
            model.load_state_dict(workloads.make_model(seed=3).state_dict())

    return train_until_refused(rank, model, opt, 4, load_on_rank_1)


@pytest.mark.parametrize("mode", ["sync", "acco"])
def test_weights_written_on_one_rank_only_are_refused_on_every_rank(run_distributed, mode):
    assert_refused_alike(run_distributed(2, write_on_one_rank, mode, timeout=TIMEOUT), "on rank(s) [1] but not on rank(s) [0]")


def adopt_data_writes(rank, world_size):
    """Writes through ``p.data`` escape the per-step check; ``adopt_model_parameters()`` takes rank 0's."""
    reference, ddp, ref_opt, model, opt = pair()
    both_step(rank, 0, ddp, ref_opt, model, opt)
    torch.manual_seed(100 + rank)  # different values on each rank: rank 0's must win
    for p, q in zip(model.parameters(), reference.parameters()):
        p.data.copy_(torch.randn_like(p))
        q.data.copy_(p.data)
    opt.adopt_model_parameters()
    with torch.no_grad():
        for q in reference.parameters():
            torch.distributed.broadcast(q, src=0)
    same_as_rank0 = largest_difference(model, reference)
    for call in range(1, 4):
        both_step(rank, call, ddp, ref_opt, model, opt)
    opt.finish()
    opt.close()
    return {"adopted": same_as_rank0, "difference": largest_difference(model, reference)}


def test_adopt_model_parameters_takes_rank_0s_weights(run_distributed):
    results = run_distributed(2, adopt_data_writes, timeout=TIMEOUT)
    assert all(r["adopted"] == 0.0 for r in results), results
    close_all(results)


# ---------------------------------------------------------------------- gradients and requires_grad


class TwoExperts(nn.Module):
    """A router-free mixture: even calls use expert 0 on every rank, odd calls use expert 1 on
    rank 0 only, and every fourth call uses neither on any rank."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(workloads.IN, workloads.HIDDEN)
        self.experts = nn.ModuleList(nn.Linear(workloads.HIDDEN, workloads.OUT) for _ in range(2))
        self.head = nn.Linear(workloads.HIDDEN, workloads.OUT)
        self.to(dtype)

    def forward(self, x, experts):
        h = torch.tanh(self.inner(x))
        out = self.head(h)
        for e in experts:
            out = out + self.experts[e](h)
        return out


def experts_for(rank, call):
    if call % 4 == 3:
        return []
    if call % 2 == 0:
        return [0]
    return [1] if rank == 0 else []


def train_experts(rank, world_size, mode, engine="auto"):
    reference = TwoExperts()
    ddp = DistributedDataParallel(reference, find_unused_parameters=True)
    ref_opt = adamw(reference.parameters())
    model = TwoExperts()
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode, engine=engine)
    for call in range(8):
        x, y = workloads.batch(rank, call)
        experts = experts_for(rank, call)
        ((ddp(x, experts) - y) ** 2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ((model(x, experts) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.finish()
    opt.close()
    return {"difference": largest_difference(model, reference)}


def test_parameters_without_gradient_on_any_rank_are_left_untouched_as_ddp_does(run_distributed):
    close_all(run_distributed(2, train_experts, "sync", timeout=TIMEOUT))


def test_the_stream_engines_decisions_keep_these_promises(run_distributed):
    """engine='stream' runs the device-decision round (on CPU: inline, agreement read on the host)."""
    close_all(run_distributed(2, train_experts, "sync", "stream", timeout=TIMEOUT))
    close_all(run_distributed(2, train_with_load, 3, "load_state_dict", "stream", timeout=TIMEOUT))


def step_without_backward(mode):
    model = workloads.make_model()
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(4):
        opt.step()
    opt.finish()
    unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    updates = opt.num_updates
    opt.close()
    return unchanged, updates


@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_step_without_backward_changes_nothing(mode):
    unchanged, updates = step_without_backward(mode)
    assert unchanged
    assert updates == 0


def freeze_midway(rank, world_size):
    reference, ddp, ref_opt, model, opt = pair(find_unused=True)
    for call in range(6):
        if call == 2:
            reference[0].requires_grad_(False)
            model[0].requires_grad_(False)
        both_step(rank, call, ddp, ref_opt, model, opt)
    opt.finish()
    opt.close()
    return {"difference": largest_difference(model, reference)}


def test_freezing_after_construction_behaves_as_ddp(run_distributed):
    close_all(run_distributed(2, freeze_midway, timeout=TIMEOUT))


def unfreeze_midway(rank, world_size, mode):
    model = workloads.make_model()
    model[0].requires_grad_(False)
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode)
    return train_until_refused(rank, model, opt, 5, lambda call: model[0].requires_grad_(True) if call == 2 else None)


@pytest.mark.parametrize("mode", ["sync", "acco"])
def test_unfreezing_a_parameter_left_out_at_construction_is_refused_on_every_rank(run_distributed, mode):
    results = run_distributed(2, unfreeze_midway, mode, timeout=TIMEOUT)
    assert_refused_alike(results, "requires_grad=False when AccoOptimizer was built")


# ---------------------------------------------------------------------- GradScaler


class AttributeContractAcco(AccoOptimizer):
    """``step()`` without ``grad_scaler``: torch's GradScaler then uses its newer contract (it sets
    ``grad_scale`` and ``found_inf`` on the optimizer and does not pass itself)."""

    def step(self, closure=None):
        return super().step(closure)


def train_with_scaler(rank, world_size, mode, overflow_calls, contract="keyword"):
    dtype = torch.float32
    acco_class = AttributeContractAcco if contract == "attributes" else None
    reference, ddp, ref_opt, model, opt = pair(mode=mode, dtype=dtype, acco_class=acco_class)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    scales = []
    for call in range(8):
        x, y = workloads.batch(rank, call, dtype)
        blow_up = (rank == 1 and call in overflow_calls)
        for net, optimizer, grad_scaler in ((ddp, ref_opt, ref_scaler), (model, opt, scaler)):
            loss = workloads.loss_fn(net, x, y)
            if blow_up:
                loss = loss * float("inf")
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer) if call % 2 else None  # both ways: unscaled by the user, or by step()
            grad_scaler.step(optimizer)
            grad_scaler.update()
            optimizer.zero_grad(set_to_none=True)
        scales.append((ref_scaler.get_scale(), scaler.get_scale()))
    opt.finish()
    result = {"difference": largest_difference(model, reference), "scales": scales, "updates": opt.num_updates}
    opt.close()
    return result


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("contract", ["keyword", "attributes"])
def test_grad_scaler_overflow_on_one_rank_matches_ddp(run_distributed, contract):
    """Both of torch's contracts: with the attribute one the scaler does not pass itself, yet its
    update() must see the ranks' common verdict (rank 0, which saw no overflow, backs off too)."""
    results = run_distributed(2, train_with_scaler, "sync", (2, 5), contract, timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert all(ref == ours for ref, ours in result["scales"]), (rank, result["scales"])
        assert result["scales"][2][1] < result["scales"][1][1]  # it did back off
        assert result["updates"] == 6  # two of eight steps skipped
    close_all(results, tolerance=1e-6)


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.parametrize("contract", ["keyword", "attributes"])
def test_grad_scaler_overflow_on_one_rank_keeps_acco_ranks_aligned(run_distributed, contract):
    results = run_distributed(2, train_with_scaler, "acco", (2,), contract, timeout=TIMEOUT)
    assert results[0]["scales"] == results[1]["scales"]
    assert results[0]["updates"] == results[1]["updates"] == 4  # 7 calls handed over, the last commit by finish()


# ---------------------------------------------------------------------- hyper-parameters


def rank_local_learning_rate(rank, world_size, blocking):
    """Rank 1 turns its learning rate off (a rank-local plateau scheduler would): every shard
    must still step with rank 0's, so every parameter element moves."""
    model = nn.Linear(32, 1, bias=False).double()
    opt = AccoOptimizer(adamw(model.parameters(), weight_decay=0.0), mode="acco", blocking=blocking)
    before = model.weight.detach().clone()
    torch.manual_seed(rank)
    for call in range(6):
        if rank == 1:
            opt.param_groups[0]["lr"] = 0.0
        x = torch.randn(8, 32, dtype=torch.float64)
        (model(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    still = int((model.weight.detach() == before).sum())
    opt.close()
    return still


@pytest.mark.parametrize("blocking", [True, False])
def test_every_shard_uses_rank_0s_hyperparameters(run_distributed, blocking):
    assert run_distributed(2, rank_local_learning_rate, blocking, timeout=TIMEOUT) == [0, 0]


# ---------------------------------------------------------------------- opt.state


def test_reading_opt_state_says_where_the_state_lives():
    model = workloads.make_model()
    opt = AccoOptimizer(adamw(model.parameters()))
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    opt.step()
    opt.finish()
    p = next(model.parameters())
    with pytest.raises(KeyError, match="consolidated_state_dict"):
        opt.state[p]["exp_avg"]
    with pytest.raises(KeyError, match="shards the optimizer state"):
        opt.state[p] = {}
    assert opt.state.get(p) is None and p not in opt.state and len(opt.state) == 0
    assert opt.state_dict()["state"] == {}
    full = opt.consolidated_state_dict()
    assert set(full["state"]) == set(range(len(list(model.parameters()))))
    opt.close()


# ---------------------------------------------------------------------- the common loop


class TiedLM(nn.Module):
    """Embedding and output head share one weight, as in GPT-2 and Llama with tied embeddings."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.to(dtype)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def common_loop(rank, world_size, feature):
    dtype = torch.float32 if feature == "bf16-autocast" else torch.float64
    models = [TiedLM(dtype), TiedLM(dtype)]
    if feature == "frozen-at-construction":  # LoRA-style: only some parameters train
        for m in models:
            m.embed.requires_grad_(False)
    reference = DistributedDataParallel(models[0])
    ref_opt = torch.optim.AdamW([p for p in models[0].parameters() if p.requires_grad], lr=0.02, weight_decay=0.1)
    opt = AccoOptimizer(torch.optim.AdamW(models[1].parameters(), lr=0.02, weight_decay=0.1), mode="sync")
    nets = [reference, models[1]]
    if feature == "torch.compile":
        nets = [torch.compile(net, backend="aot_eager") for net in nets]
    optimizers = [ref_opt, opt]
    schedulers = [None, None]
    if feature == "OneCycleLR":
        schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=6) for o in optimizers]
    if feature == "LambdaLR":
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 3)) for o in optimizers]
    micro_batches = 2 if feature == "gradient-accumulation" else 1
    g = torch.Generator().manual_seed(rank)
    for call in range(6):
        batches = [torch.randint(0, 16, (4, 5), generator=g) for _ in range(micro_batches)]
        for net, optimizer, scheduler in zip(nets, optimizers, schedulers):
            for tokens in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=feature == "bf16-autocast"):
                    logits = net(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.float().reshape(-1, 16), tokens[:, 1:].reshape(-1))
                (loss / micro_batches).backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    opt.finish()
    opt.close()
    return {"difference": largest_difference(models[1], models[0]), "trained": largest_difference(models[1], TiedLM(dtype))}


@pytest.mark.parametrize(
    "feature", ["tied-weights", "gradient-accumulation", "frozen-at-construction", "OneCycleLR", "LambdaLR", "bf16-autocast", "torch.compile"]
)
def test_the_common_loop_matches_ddp(run_distributed, feature):
    results = run_distributed(2, common_loop, feature, timeout=TIMEOUT)
    assert all(r["trained"] > 1e-3 for r in results), results
    close_all(results, tolerance=1e-5 if feature == "bf16-autocast" else 1e-12)
