"""Parameters of several dtypes (issue 23, item 10): bf16 weights beside fp32 norms, as transformers'
``_keep_in_fp32_modules``, fp32 LayerNorms or MoE routers leave them. Each dtype gets a lane of its own
(flat buffer, reduce-scatter and all-gather in that dtype), with an fp32 master for all.

The reference is DDP on the same mixed model (its buckets per dtype average the gradients) + AdamW on
fp32 master copies of every parameter, written back in each parameter's dtype after each step: what a
mixed-precision trainer with master weights does, sharing no code with acco.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer
from reference import blocking_plan

TIMEOUT = 90


class MixedBlock(nn.Module):
    """A bf16 MLP whose LayerNorm (and a router-like gate) stay fp32."""

    def __init__(self, low=torch.bfloat16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(workloads.IN)  # fp32
        self.up = nn.Linear(workloads.IN, workloads.HIDDEN).to(low)
        self.gate = nn.Linear(workloads.HIDDEN, 1)  # fp32
        self.down = nn.Linear(workloads.HIDDEN, workloads.OUT).to(low)
        self.low = low

    def forward(self, x):
        h = self.norm(x.float())
        h = torch.tanh(self.up(h.to(self.low)))
        g = torch.sigmoid(self.gate(h.float()))
        return self.down((h.float() * g).to(self.low)).float()


def adamw(params):
    return torch.optim.AdamW(params, lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)


class MasterAdamW:
    """AdamW on fp32 copies of the model's parameters (fp64 where any parameter is fp64, as acco's master);
    each step writes them back in the parameter's dtype."""

    def __init__(self, model):
        self.params = list(model.parameters())
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.master = [p.detach().to(dtype).clone().requires_grad_(True) for p in self.params]
        self.inner = adamw(self.master)

    def step(self):
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        self.inner.step()
        with torch.no_grad():
            for m, p in zip(self.master, self.params):
                p.copy_(m)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def batch(rank, call):
    x, y = workloads.batch(rank, call, torch.float32)
    return x, y


def mixed_against_ddp(rank, world_size, low, comm_dtype, engine="auto"):
    reference = MixedBlock(low)
    ddp = DistributedDataParallel(reference)
    ref_opt = MasterAdamW(reference)
    model = MixedBlock(low)
    opt = AccoOptimizer(adamw(model.parameters()), mode="sync", comm_dtype=comm_dtype, engine=engine)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    for call in range(5):
        x, y = batch(rank, call)
        ((ddp(x) - y) ** 2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    kept = all(p.dtype == q.dtype for p, q in zip(model.parameters(), reference.parameters()))
    differences = {name: float((p.float() - q.float()).abs().max()) for (name, p), q in zip(model.named_parameters(), reference.parameters())}
    master = [m.detach().clone() for m in ref_opt.master]
    memory = opt.memory_bytes()
    opt.close()
    return {"differences": differences, "kept": kept, "dtypes": dtypes, "memory": memory,
            "moved": max(float((m - p.to(m.dtype)).abs().max()) for m, p in zip(master, MixedBlock(low).parameters()))}


@pytest.mark.parametrize(
    "low,engine", [(torch.bfloat16, "auto"), (torch.float16, "auto"), (torch.float64, "auto"), (torch.bfloat16, "stream")],
    ids=["bf16", "fp16", "fp64", "bf16-stream-engine"],
)
def test_mixed_dtypes_train_like_ddp_with_an_fp32_master(run_distributed, low, engine):
    for rank, result in enumerate(run_distributed(2, mixed_against_ddp, low, None, engine, timeout=TIMEOUT)):
        assert result["kept"] and len(result["dtypes"]) == 2, result
        assert result["moved"] > 1e-2, result
        # The same master values on both sides, rounded into each parameter's dtype alike (measured: the
        # low-precision weights equal, the fp32 ones within 1e-7; DDP pre-divides by the world size, 2 here).
        for name, difference in result["differences"].items():
            assert difference <= 1e-6, (rank, name, result["differences"])


def test_the_memory_of_each_lane_is_counted_in_its_own_dtype():
    model = MixedBlock(torch.bfloat16)
    opt = AccoOptimizer(adamw(model.parameters()), mode="acco")
    sizes = opt.memory_bytes()
    low = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    high = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    assert sizes["params"] == sizes["grads"] == 2 * low + 4 * high  # one world: no padding
    assert sizes["comm"] == 2 * low + 4 * high  # each lane's gradients travel in its own dtype
    assert sizes["master_shard"] == 4 * (low + high)
    opt.close()


def train_and_resume(rank, world_size, mode, save_at, calls=7):
    """Uninterrupted, then saved at ``save_at`` (per-rank) and resumed into fresh objects: bit for bit."""
    def run(stop=None, state=None):
        model = MixedBlock(torch.bfloat16, seed=0 if state is None else 3)
        opt = AccoOptimizer(adamw(model.parameters()), mode=mode)
        first = 0
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            first = save_at
        for call in range(first, calls if stop is None else stop):
            x, y = batch(rank, call)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        if stop is not None:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
            opt.close()
            return saved
        opt.finish()
        final = [p.detach().clone() for p in model.parameters()]
        portable = opt.consolidated_state_dict(to=0)
        opt.close()
        return final, portable

    straight, portable = run()
    resumed, _ = run(state=run(stop=save_at))
    same = all(torch.equal(a, b) for a, b in zip(straight, resumed))
    return same, portable, straight


@pytest.mark.parametrize("mode,save_at", [("acco", 3), ("dpu", 4), ("sync", 2)])
def test_mixed_dtypes_resume_bit_for_bit_and_reshard(run_distributed, mode, save_at):
    results = run_distributed(2, train_and_resume, mode, save_at, timeout=TIMEOUT)
    assert all(same for same, _, _ in results)
    portable, straight = results[0][1], results[0][2]
    # The portable state at world 2 loads into one process (world 1) and gives the same committed model.
    model = MixedBlock(torch.bfloat16, seed=9)
    opt = AccoOptimizer(adamw(model.parameters()), mode=mode)
    opt.load_state_dict(portable)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), straight))
    assert all(p.dtype == q.dtype for p, q in zip(model.parameters(), straight))
    opt.close()


def test_a_comm_dtype_of_its_own_applies_to_every_lane(run_distributed):
    """comm_dtype=bf16 on a bf16 + fp32 model: the fp32 lane's gradients travel in bf16 too (so the fp32
    parameters differ from the reference by a bf16 rounding of their gradient, no more)."""
    for result in run_distributed(2, mixed_against_ddp, torch.bfloat16, torch.bfloat16, timeout=TIMEOUT):
        assert result["memory"]["comm"] == result["memory"]["params"]  # each lane's buffer holds its own parameters on the way back
        assert all(difference < 5e-2 for difference in result["differences"].values()), result["differences"]


def test_parameters_on_several_devices_are_named():
    model = MixedBlock(torch.bfloat16)
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match=r"one device .* cpu: 0, 1, 2, 3, 4, 5, 6, 7; meta: 8"):
        AccoOptimizer(adamw([*model.parameters(), meta]))


def test_complex_parameters_are_named():
    model = MixedBlock(torch.bfloat16)
    twisted = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"floating point: trainable parameters 8 are \['torch.complex64'\]"):
        AccoOptimizer(adamw([*model.parameters(), twisted]))


def test_bf16_and_fp16_lanes_keep_their_values_exactly():
    """Neither 2-byte dtype holds the other's values: the master starts from each lane's values exactly
    (through fp32, their type promotion), so a step that changes nothing changes no bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4).to(torch.float16))
    before = [p.detach().clone() for p in model.parameters()]
    opt = AccoOptimizer(model.parameters(), torch.optim.SGD, lr=0.0, mode="sync")
    x = torch.randn(2, 4)
    model[1](model[0](x.to(torch.bfloat16)).to(torch.float16)).float().sum().backward()
    opt.step()
    opt.close()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
