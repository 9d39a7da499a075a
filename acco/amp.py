"""``torch.amp.GradScaler`` with a sharded optimizer: the overflow decision must be the same on
every rank, as DDP's all-reduced gradients make it (docs/design.md §5).

torch hands the scaler to ``step()`` in one of two ways. The older ``grad_scaler=`` keyword passes
the scaler itself. The newer attribute contract (used when ``step()`` takes no ``grad_scaler``) sets
``optimizer.grad_scale`` and ``optimizer.found_inf`` (a sum of the scaler's per-device flags, a new
tensor) and then ``scaler.update()`` reads the scaler's own per-device flags: the ranks' common
verdict must be written into those, or a rank that saw no overflow would not back off. The scaler
is not handed over then, so it is found as the caller of ``step()`` (``GradScaler.step``'s frame).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import torch

logger = logging.getLogger("acco")

_warned_no_scaler = False


def unscale_and_check(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_scaler: Optional[Any]) -> tuple[list[torch.Tensor], float]:
    """Unscale this rank's gradients in place; return the tensors to overwrite with the ranks' common
    verdict (the scaler's ``found_inf`` per device, which ``update()`` reads) and whether this rank
    saw an overflow (> 0)."""
    if grad_scaler is not None:  # ``scaler.step(opt)`` hands itself over (``_step_supports_amp_scaling``)
        state = grad_scaler._per_optimizer_states[id(optimizer)]
        if state["stage"].name == "READY":
            grad_scaler.unscale_(optimizer)  # p.grad are views of our gradient buffer: unscaled in place
        found = list(state["found_inf_per_device"].values())
        return found, float(sum(float(t.item()) for t in found))
    # the attribute contract: ``grad_scale`` (None once unscaled) and ``found_inf``
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        inverse = 1.0 / float(scale)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(inverse)
    found = [optimizer.found_inf]
    scaler = calling_scaler(optimizer)
    if scaler is not None:
        found += list(scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values())
    else:
        _warn_no_scaler()
    return found, float(optimizer.found_inf)


def calling_scaler(optimizer: torch.optim.Optimizer, depth: int = 24) -> Optional[Any]:
    """The ``GradScaler`` whose ``step(optimizer)`` is running (``None`` if none is found). Only the
    frames of ``GradScaler.step`` (and its subclasses') are asked for their locals: reading
    ``f_locals`` leaves a snapshot of the locals on a frame before Python 3.13, which would keep a
    user's objects alive; that frame ends as soon as ``step()`` returns."""
    codes = _scaler_step_codes()
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return None
        if frame.f_code in codes:
            scaler = frame.f_locals.get("self")
            if isinstance(scaler, torch.amp.GradScaler) and frame.f_locals.get("optimizer") is optimizer:
                return scaler
        frame = frame.f_back
    return None


def _scaler_step_codes() -> set[Any]:
    codes, classes = set(), [torch.amp.GradScaler]
    while classes:
        cls = classes.pop()
        step = cls.__dict__.get("step")
        if step is not None and hasattr(step, "__code__"):
            codes.add(step.__code__)
        classes.extend(cls.__subclasses__())
    return codes


def _warn_no_scaler() -> None:
    global _warned_no_scaler
    if not _warned_no_scaler:
        _warned_no_scaler = True
        logger.warning(
            "acco: a GradScaler-style caller set found_inf on the optimizer but is not torch.amp.GradScaler.step: the "
            "ranks' common overflow verdict is written into optimizer.found_inf only, so its scaler may back off on "
            "some ranks and not on others"
        )


_bumps_per_unscale: dict[str, int] = {}


def explicit_unscale_writes(optimizer: torch.optim.Optimizer, grad_scaler: Optional[Any], device: torch.device) -> int:
    """How many times the script's own ``scaler.unscale_(opt)`` (the usual step before clipping) moved
    each gradient's autograd version counter: 0 where it was not called. Measured once per device
    type on a scratch tensor, since whether torch's unscale kernel counts as a write differs by device."""
    if grad_scaler is not None:
        state = grad_scaler._per_optimizer_states.get(id(optimizer), {})
        unscaled = getattr(state.get("stage"), "name", "READY") == "UNSCALED"
    else:
        unscaled = hasattr(optimizer, "found_inf") and getattr(optimizer, "grad_scale", 0) is None
    if not unscaled:
        return 0
    if device.type not in _bumps_per_unscale:
        probe = torch.ones(2, device=device)[:1]
        found, inverse = torch.zeros(1, device=device), torch.ones(1, device=device)
        before = probe._version
        torch._amp_foreach_non_finite_check_and_unscale_([probe], found, inverse)
        _bumps_per_unscale[device.type] = probe._version - before
    return _bumps_per_unscale[device.type]
