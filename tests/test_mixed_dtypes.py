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
    """AdamW on fp32 copies of the model's parameters; each step writes them back in the parameter's dtype."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.inner = adamw(self.master)

    def step(self):
        for m, p in zip(self.master, self.params):
            m.grad = None if p.grad is None else p.grad.float()
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


def mixed_against_ddp(rank, world_size, low, comm_dtype):
    reference = MixedBlock(low)
    ddp = DistributedDataParallel(reference)
    ref_opt = MasterAdamW(reference)
    model = MixedBlock(low)
    opt = AccoOptimizer(adamw(model.parameters()), mode="sync", comm_dtype=comm_dtype)
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
            "moved": max(float((m - p.float()).abs().max()) for m, p in zip(master, MixedBlock(low).parameters()))}


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"])
def test_mixed_dtypes_train_like_ddp_with_an_fp32_master(run_distributed, low):
    for rank, result in enumerate(run_distributed(2, mixed_against_ddp, low, None, timeout=TIMEOUT)):
        assert result["kept"] and len(result["dtypes"]) == 2, result
        assert result["moved"] > 1e-2, result
        # Same master values on both sides, rounded into each parameter's dtype alike: equal up to one
        # rounding of a low-precision gradient sum (DDP pre-divides by the world size, a power of two here).
        for name, difference in result["differences"].items():
            tolerance = 1e-6 if name.startswith(("norm", "gate")) or low == torch.float64 else 2e-2
            assert difference <= tolerance, (rank, name, result["differences"])
