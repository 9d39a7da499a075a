"""fp16 under ``AccoTrainer``: Trainer's ``GradScaler`` around ``AccoOptimizer``, one Trainer step = one update.

Trainer + AdamW with fp16 scales the loss, unscales the update's gradients once, skips the whole update when
any of them overflowed (DDP: on any rank), does not step the learning-rate scheduler then, and moves the
scale once per update (``scaler.update()``). ``ScaledAccoOptimizer`` keeps all of that with ACCO: in mode
``acco`` the update's first call (the estimate, made in the middle of the update) is unscaled and checked
with the update's scale, and an overflow in either half skips the whole update on every rank:

* in the first half: the estimate round is not launched, and the update's second call is skipped as well;
* in the second half: the estimate round was launched, so it is abandoned (``AccoOptimizer._abandon_update``:
  a commit of nothing gives the model the committed parameters back).

Either way the next Trainer step starts a fresh update (estimate, then commit), as after ``finish()``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch.amp.grad_scaler import OptState  # torch >= 2.3; acco needs >= 2.11

from ..optimizer import AccoOptimizer

__all__ = ["ScaledAccoOptimizer"]


class ScaledAccoOptimizer(AcceleratedOptimizer):
    """What Trainer steps when its accelerator has a ``GradScaler`` (fp16): ``AcceleratedOptimizer``'s
    contract (``step_was_skipped`` tells Trainer not to step the scheduler) without its state-dict round
    trip (``device_placement=False``), over an ``AccoOptimizer`` in blocking mode."""

    def __init__(self, optimizer: AccoOptimizer, scaler: Any) -> None:
        super().__init__(optimizer, device_placement=False, scaler=scaler)
        self._first_half_overflowed = False

    def estimate_step(self) -> None:
        """Mode ``acco``: the update's first ``step()`` call, through the scaler (unscale with the update's
        scale, the ranks agree on overflow). The scale and growth tracker are put back afterwards: they move
        once per update, at the update's second call, as Trainer's do."""
        opt, scaler = self.optimizer, self.scaler
        saved = scaler.state_dict()
        launched = opt.rounds_launched
        scaler.step(opt)
        scaler.update()  # also clears the scaler's record of this call, so the second half is unscaled afresh
        scaler.load_state_dict(saved)
        self._first_half_overflowed = opt.rounds_launched == launched

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        """The update's (last) ``step()`` call: ``scaler.step`` + ``scaler.update()``, once per Trainer step."""
        if closure is not None:
            raise ValueError("AccoTrainer's fp16 optimizer step takes no closure (GradScaler does not support one)")
        if not self.gradient_state.sync_gradients:
            return
        opt, scaler = self.optimizer, self.scaler
        launched = opt.rounds_launched
        if self._first_half_overflowed:
            _record_overflow(scaler, opt)  # every rank found it at the estimate call: this call is skipped too
        scaler.step(opt)
        skipped = opt.rounds_launched == launched
        if skipped and not self._first_half_overflowed:
            opt._abandon_update()  # mode acco: the launched estimate half goes too (no-op in modes sync / dpu)
        scaler.update()
        self._first_half_overflowed = False
        self._is_overflow = skipped


def _record_overflow(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Tell the scaler that ``optimizer``'s gradients overflowed (what ``unscale_`` records when it finds an
    inf): ``AccoOptimizer.step`` then skips the call on every rank and ``update()`` backs off."""
    device = optimizer.param_groups[0]["params"][0].device
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {device: torch.ones(1, dtype=torch.float32, device=device)}
    state["stage"] = OptState.UNSCALED
