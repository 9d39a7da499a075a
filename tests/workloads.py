"""Small deterministic models, optimizers and data shared by the distributed tests and the reference."""

from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, OUT, BATCH = 5, 6, 3, 8  # 57 parameters: not divisible by 2 or 4


def make_model(kind: str = "mlp", dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bias = kind != "mlp_nobias"
    model = nn.Sequential(nn.Linear(IN, HIDDEN, bias=bias), nn.Tanh(), nn.Linear(HIDDEN, OUT, bias=bias))
    return model.to(dtype)


def param_groups(model: nn.Module, spec: str) -> list[dict]:
    """Two groups with different hyper-parameters: weights and biases."""
    weights = [p for p in model.parameters() if p.dim() >= 2]
    biases = [p for p in model.parameters() if p.dim() < 2]
    if spec in ("adamw", "adamw-unfused", "nadam", "rmsprop"):
        groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0, "lr": 3e-2}]
    elif spec == "sgd":
        groups = [{"params": weights}, {"params": biases, "lr": 0.02, "momentum": 0.5}]
    else:
        groups = [{"params": weights}, {"params": biases}]
    return [g for g in groups if g["params"]]


def make_optimizer(spec: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, spec)
    if spec == "adamw":
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))
    if spec == "adamw-unfused":  # the user's explicit choice of the for-loop implementation
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=False)
    if spec == "nadam":  # no fused kernel: runs on cache-sized chunks of the flat shard
        return torch.optim.NAdam(groups, lr=1e-2)
    if spec == "rmsprop":
        return torch.optim.RMSprop(groups, lr=1e-2, momentum=0.5)
    if spec == "sgd":
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    if spec == "adafactor":
        return torch.optim.Adafactor(groups, lr=1e-2)
    if spec == "muon":
        return torch.optim.Muon(groups, lr=2e-2)
    raise ValueError(spec)


def model_kind_for(spec: str) -> str:
    return "mlp_nobias" if spec == "muon" else "mlp"


def batch(rank: int, call: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * seed + 1009 * rank + call)
    x = torch.randn(BATCH, IN, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()
