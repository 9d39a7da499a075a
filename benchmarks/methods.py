"""The methods compared, behind one small interface, so that every report drives them alike.

A training call is split in two: ``compute`` (forward and backward: the work a slow device is
slow at) and ``update`` (whatever the method does with the gradients). Every method gets the same
model (same seed), the same micro-batches and AdamW with the same hyper-parameters, in fp32.

* ``compute_only``: forward, backward and a fused AdamW step on a flat tensor of one shard's
  size (what a ZeRO-1 rank steps), no communication at all: the physical limit.
* ``ddp``: ``DistributedDataParallel`` + fused AdamW on the whole model.
* ``zero1``: ``DistributedDataParallel`` + ``ZeroRedundancyOptimizer`` (fused AdamW): the peer.
* ``dpu``, ``acco``, ``acco_nonblocking``, ``acco_sync``: ``AccoOptimizer`` in mode dpu, acco
  (blocking), acco with ``blocking=False``, and sync (acco's own ZeRO-1, for diagnosis).
* ``acco_momentum``: mode acco with ``estimate="momentum"`` (estimates step on (ḡ₁ + m̂) / 2).
* ``acco_secant``, ``acco_secant_muon``: mode acco with ``correction="secant"`` (issue 22: the commit and the
  next estimate step on ḡ₁ − κ·e), with AdamW, and with Muon + AdamW as ``acco_muon``;
  ``acco_secant_gated``, ``acco_secant_gated_muon``: the same with ``correction="secant-gated"``.
* ``sync_muon``, ``dpu_muon``, ``acco_muon``: per-group inner optimizers, Muon for the blocks' 2-D weight
  matrices and AdamW for the rest (embeddings, the head (tied or not), LayerNorm gains, biases), in mode sync (ZeRO-1
  with Muon + AdamW: the synchronous reference), dpu and acco. Muon's update is scaled to AdamW's RMS
  (``adjust_lr_fn="match_rms_adamw"``), so both share the peak rate, the weight decay and the schedule.

Both DDP methods use ``gradient_as_bucket_view=True`` (no second gradient copy), the memory-fair
configuration that the README's formula compares against.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from acco import AccoOptimizer

METHODS = ("compute_only", "ddp", "zero1", "dpu", "acco", "acco_nonblocking")
EXTRA_METHODS = ("acco_sync", "acco_momentum", "sync_muon", "dpu_muon", "acco_muon", "acco_secant", "acco_secant_muon",
                 "acco_secant_gated", "acco_secant_gated_muon")
_ACCO_MODES = {
    "dpu": ("dpu", True), "acco": ("acco", True), "acco_nonblocking": ("acco", False), "acco_sync": ("sync", True),
    "acco_momentum": ("acco", True), "sync_muon": ("sync", True), "dpu_muon": ("dpu", True), "acco_muon": ("acco", True),
    "acco_secant": ("acco", True), "acco_secant_muon": ("acco", True),
    "acco_secant_gated": ("acco", True), "acco_secant_gated_muon": ("acco", True),
}
_MUON_METHODS = ("sync_muon", "dpu_muon", "acco_muon", "acco_secant_muon", "acco_secant_gated_muon")
_ESTIMATES = {"acco_momentum": "momentum"}
_CORRECTIONS = {"acco_secant": "secant", "acco_secant_muon": "secant", "acco_secant_gated": "secant-gated",
                "acco_secant_gated_muon": "secant-gated"}


def check_methods(names: list[str]) -> list[str]:
    known = METHODS + EXTRA_METHODS
    for name in names:
        if name not in known:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(known)}")
    return names


def calls_per_update(name: str) -> int:
    """step() calls per committed update: 2 in mode acco (estimate half + commit half), else 1."""
    return 2 if name in ("acco", "acco_nonblocking", "acco_momentum", "acco_muon", "acco_secant", "acco_secant_muon", "acco_secant_gated",
                    "acco_secant_gated_muon") else 1


class Method:
    """One method on one rank. ``rounds`` counts the synchronised steps launched so far: every
    rank launches the same number, even when non-blocking ranks make different numbers of calls."""

    name: str
    model: nn.Module
    _optimizer: torch.optim.Optimizer
    _calls: int = 0

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.model(x, y)
        loss.backward()
        return loss.detach()

    def update(self) -> None:
        raise NotImplementedError

    @property
    def rounds(self) -> int:
        return self._calls

    @property
    def updates(self) -> int:
        """Committed optimizer updates so far."""
        return self.rounds

    def set_lr(self, lr: float) -> None:
        for group in self._lr_groups():
            group["lr"] = lr

    def _lr_groups(self) -> list[dict]:
        return self._optimizer.param_groups

    def finish(self) -> None:
        """Drain anything in flight (collective)."""

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """The model holding the last committed parameters, in eval mode."""
        self.model.eval()
        try:
            yield self.model
        finally:
            self.model.train()

    def accounted_bytes(self) -> dict[str, int]:
        """Bytes of the training state this method holds on this rank, by buffer."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _nbytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


class ComputeOnly(Method):
    def __init__(self, model: nn.Module, groups: list[dict], lr: float, max_grad_norm: Optional[float], world: int) -> None:
        self.name, self.model = "compute_only", model
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self._shard = nn.Parameter(torch.zeros(math.ceil(numel / world)))
        self._shard.grad = torch.zeros_like(self._shard)
        self._optimizer = torch.optim.AdamW([self._shard], lr=lr, fused=True)
        self._calls = 0

    def update(self) -> None:
        self._optimizer.step()
        self.model.zero_grad(set_to_none=True)
        self._calls += 1

    @property
    def rounds(self) -> int:
        return self._calls

    def _lr_groups(self) -> list[dict]:
        return self._optimizer.param_groups

    def accounted_bytes(self) -> dict[str, int]:
        return {"params": _nbytes(self.model.parameters()), "optimizer_state": _state_bytes(self._optimizer)}


class DDPMethod(Method):
    """DDP (+ ZeroRedundancyOptimizer for zero1). Clipping, if asked, is ``clip_grad_norm_`` on the
    DDP-averaged full gradient: the same global norm that AccoOptimizer clips to."""

    def __init__(self, name: str, model: nn.Module, groups: list[dict], lr: float, max_grad_norm: Optional[float]) -> None:
        self.name, self.model = name, model
        self._ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
        self._max_grad_norm = max_grad_norm
        if name == "zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self._optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), fused=True)
        else:
            self._optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
        self._calls = 0

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._ddp(x, y)  # DDP all-reduces the gradient buckets during this backward
        loss.backward()
        return loss.detach()

    def update(self) -> None:
        if self._max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._max_grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._calls += 1

    def accounted_bytes(self) -> dict[str, int]:
        params = list(self.model.parameters())
        inner = self._optimizer.optim if self.name == "zero1" else self._optimizer
        return {
            "params": _nbytes(params),
            # with gradient_as_bucket_view the gradients are views into DDP's buckets: counted once
            "grads": _nbytes(params),
            "optimizer_state": _state_bytes(inner),
        }

    def close(self) -> None:
        del self._ddp


class AccoMethod(Method):
    def __init__(self, name: str, model: nn.Module, groups: list[dict], lr: float, max_grad_norm: Optional[float]) -> None:
        self.name, self.model = name, model
        mode, blocking = _ACCO_MODES[name]
        if name in _MUON_METHODS:
            inner: Any = muon_groups(model, groups, lr)
            self.optimizer = self._optimizer = AccoOptimizer(
                inner, torch.optim.AdamW, lr=lr, betas=(0.9, 0.95), mode=mode, blocking=blocking, max_grad_norm=max_grad_norm,
                correction=_CORRECTIONS.get(name, "none"), batch_rule_applied=True,  # the benchmarks give each call its share of an update's batch
            )
            return
        inner = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))  # fused on the shard, chosen by acco
        self.optimizer = self._optimizer = AccoOptimizer(
            inner, mode=mode, blocking=blocking, max_grad_norm=max_grad_norm, estimate=_ESTIMATES.get(name, "plain"),
            correction=_CORRECTIONS.get(name, "none"), batch_rule_applied=True,  # the benchmarks give each call its share of an update's batch
        )

    def update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def rounds(self) -> int:
        return self.optimizer.rounds_launched

    @property
    def updates(self) -> int:
        return self.optimizer.num_updates

    def finish(self) -> None:
        self.optimizer.finish()

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        self.model.eval()
        try:
            with self.optimizer.committed_parameters():
                yield self.model
        finally:
            self.model.train()

    def accounted_bytes(self) -> dict[str, int]:
        sizes = self.optimizer.memory_bytes()
        for key in ("total", "round_transient", "peak"):  # held buffers only
            sizes.pop(key, None)
        return sizes

    def round_transient_bytes(self) -> int:
        """What a round allocates and frees again (``memory_bytes()["round_transient"]``)."""
        return self.optimizer.memory_bytes()["round_transient"]

    def close(self) -> None:
        self.optimizer.close()


def muon_groups(model: nn.Module, groups: list[dict], lr: float) -> list[dict]:
    """``groups`` with the blocks' 2-D weight matrices taken out into a Muon group (the decay of the
    group they came from); embeddings, the head (tied or not), gains and biases stay on AdamW (the default)."""
    hidden = {id(p) for block in model.blocks for p in block.parameters() if p.dim() == 2}
    matrices = [p for g in groups for p in g["params"] if id(p) in hidden]
    decay = next(g["weight_decay"] for g in groups if any(id(p) in hidden for p in g["params"]))
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
    muon = {"params": matrices, "optimizer": torch.optim.Muon, "lr": lr, "weight_decay": decay, "adjust_lr_fn": "match_rms_adamw"}
    return [muon] + [g for g in rest if g["params"]]


def build_method(
    name: str, model: nn.Module, groups: list[dict], lr: float, max_grad_norm: Optional[float] = None
) -> Method:
    """``groups``: param groups of ``model`` (each with its weight decay)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if name == "compute_only":
        return ComputeOnly(model, groups, lr, max_grad_norm, world)
    if name in ("ddp", "zero1"):
        if not dist.is_initialized():
            raise ValueError(f"method {name} needs an initialised process group")
        return DDPMethod(name, model, groups, lr, max_grad_norm)
    if name in _ACCO_MODES:
        return AccoMethod(name, model, groups, lr, max_grad_norm)
    raise ValueError(f"unknown method {name!r}")
