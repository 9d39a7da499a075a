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


# Per-group optimizers: "A+B" puts the 2-D weight matrices on A and the biases on B.
PER_GROUP_SPECS = ("muon+adamw", "adafactor+adamw", "adamw+sgd")


def param_groups(model: nn.Module, spec: str) -> list[dict]:
    """Two groups with different hyper-parameters: weights and biases. Per-group specs: three
    groups, the matrices' optimizer between two groups of the other one (so that the classes
    interleave in the user's order), each group naming its class under ``"optimizer"``."""
    weights = [p for p in model.parameters() if p.dim() >= 2]
    biases = [p for p in model.parameters() if p.dim() < 2]
    if spec in PER_GROUP_SPECS:
        matrices, rest = spec.split("+")
        matrix_group = {"params": weights, "optimizer": _CLASSES[matrices], **_SETTINGS[matrices]}
        first, second = ({**_SETTINGS[rest], "params": biases[:1]}, {**_SETTINGS[rest], "params": biases[1:], "lr": 3e-2})
        first["weight_decay"] = 0.0
        groups = [{**first, "optimizer": _CLASSES[rest]}, matrix_group, {**second, "optimizer": _CLASSES[rest]}]
        return [g for g in groups if g["params"]]
    if spec in ("adamw", "adamw-unfused", "nadam", "rmsprop"):
        groups = [{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0, "lr": 3e-2}]
    elif spec == "sgd":
        groups = [{"params": weights}, {"params": biases, "lr": 0.02, "momentum": 0.5}]
    else:
        groups = [{"params": weights}, {"params": biases}]
    return [g for g in groups if g["params"]]


_CLASSES = {"muon": torch.optim.Muon, "adamw": torch.optim.AdamW, "adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD}
_SETTINGS = {
    "muon": {"lr": 2e-2},
    "adamw": {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1},
    "adafactor": {"lr": 1e-2},
    "sgd": {"lr": 0.05, "momentum": 0.9},
}


class PlainPerGroup(torch.optim.Optimizer):
    """The plain torch optimizers of a per-group spec, side by side: each class steps its own groups
    on full tensors (the reference's optimizer; shares no code with acco). ``param_groups`` are
    the inner optimizers' own dicts, in the given order, so schedulers reach them."""

    def __init__(self, groups: list[dict]) -> None:
        by_class: dict = {}
        for group in groups:
            by_class.setdefault(group["optimizer"], []).append({k: v for k, v in group.items() if k != "optimizer"})
        self.optimizers = [cls(own) for cls, own in by_class.items()]
        built = {cls: iter(o.param_groups) for cls, o in zip(by_class, self.optimizers)}
        ordered = []
        for group in groups:
            inner = next(built[group["optimizer"]])
            inner["optimizer"] = group["optimizer"]
            ordered.append(inner)
        super().__init__(ordered, {})

    def __getstate__(self):  # torch's keeps only defaults / state / param_groups: deepcopy needs the rest
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self):
        """torch's format over every group in order; each group's class by its dotted name."""
        index, state, groups = 0, {}, []
        for group in self.param_groups:
            owner = next(o for o in self.optimizers if any(g is group for g in o.param_groups))
            ids = []
            for p in group["params"]:
                if p in owner.state:
                    state[index] = owner.state[p]
                ids.append(index)
                index += 1
            cls = group["optimizer"]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "optimizer": f"{cls.__module__}.{cls.__qualname__}", "params": ids})
        return {"state": state, "param_groups": groups}


class Branches(nn.Module):
    """``branch`` is used only where ``forward`` is told to (e.g. on a commit's calls), ``unused`` never:
    parameters without a gradient in one half of an update, or in any."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.branch, self.unused = nn.Linear(4, 4).double(), nn.Linear(4, 4).double(), nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.branch(h) if use_branch else h


def acco_params(spec: str, model: nn.Module):
    """What AccoOptimizer is given for ``spec``: the plain optimizer (instance form), or the groups
    with their own optimizers (per-group specs)."""
    if spec in PER_GROUP_SPECS:
        return param_groups(model, spec)
    return make_optimizer(spec, model)


def make_optimizer(spec: str, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, spec)
    if spec in PER_GROUP_SPECS:
        return PlainPerGroup(groups)
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


def checkpoint_of(opt, form: str) -> dict:
    """``opt``'s checkpoint on every rank: its per-rank ``state_dict()``, or (``"consolidated"``, after
    ``finish()``) rank 0's consolidated state broadcast to every rank, which each then loads."""
    if form != "consolidated":
        return opt.state_dict()
    opt.finish()
    holder = [opt.consolidated_state_dict(to=0)]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
