"""``torch.amp.GradScaler`` with a sharded optimizer: the overflow decision must be the same on
every rank, as DDP's all-reduced gradients make it (docs/design.md §5)."""

from __future__ import annotations

from typing import Any, Optional

import torch


def unscale_and_check(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grad_scaler: Optional[Any]) -> tuple[list[torch.Tensor], float]:
    """Unscale this rank's gradients in place; return the scaler's ``found_inf`` tensors (to be
    overwritten with the ranks' common verdict) and whether this rank saw an overflow (> 0)."""
    if grad_scaler is not None:  # ``scaler.step(opt)`` hands itself over (``_step_supports_amp_scaling``)
        state = grad_scaler._per_optimizer_states[id(optimizer)]
        if state["stage"].name == "READY":
            grad_scaler.unscale_(optimizer)  # p.grad are views of our gradient buffer: unscaled in place
        found = list(state["found_inf_per_device"].values())
        return found, float(sum(float(t.item()) for t in found))
    # the attribute contract of newer torch: ``grad_scale`` (None once unscaled) and ``found_inf``
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        inverse = 1.0 / float(scale)
        for param in params:
            if param.grad is not None:
                param.grad.mul_(inverse)
    return [], float(optimizer.found_inf)


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
