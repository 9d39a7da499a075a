"""Gradients between a backward and the round that takes them (docs/design.md §3).

Every trainable ``p.grad`` is a view of the flat gradient buffer, so autograd accumulates in place
and handing the gradients to a round is a swap of two buffers. Scripts break that in ordinary
ways (``model.zero_grad()`` sets ``p.grad = None``; the next backward allocates a fresh tensor),
and in non-blocking mode the buffer must keep gradients already handed to ``step()`` while the
next backward runs. This class keeps both straight. Only the training thread calls it.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from .buffers import FlatBuffers


class GradientHandover:
    def __init__(self, buffers: FlatBuffers) -> None:
        self.buffers = buffers
        self.has_gradient = [False] * len(buffers.params)  # per trainable parameter, since the last launch
        self.grads_written = False  # a backward wrote gradients since the last launch or zero_grad
        self.holding = False  # the buffer holds handed-over gradients while p.grad are detached
        buffers.attach_grads()
        self._hooks = _watch_gradient_writes(self)

    def zero_grad(self, set_to_none: bool) -> None:
        """Clear gradients computed since the last ``step()``; handed-over ones stay."""
        buffers = self.buffers
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is None or buffers.is_attached(index):
                continue
            if set_to_none:
                param.grad = None
            else:
                grad.detach_().requires_grad_(False)
                grad.zero_()
        if not self.holding and self.grads_written:
            buffers.grad_flat.zero_()
            self.forget()  # a discarded backward gave no gradient
        self.grads_written = False

    def fold_foreign(self) -> None:
        """Add gradients that are not views of the buffer (after ``model.zero_grad()``) into it."""
        for index in self.buffers.fold_foreign_grads():
            self.has_gradient[index] = True

    def hold(self) -> None:
        """Non-blocking ``step()`` with a round still running: keep this call's gradients in the
        buffer, out of reach of any ``zero_grad`` variant; the hook folds the next backward in."""
        self.buffers.detach_grads()
        self.holding = True

    def hand_over(self, contributes: bool, local_count: int) -> tuple[bool, ...]:
        """At a launch: which parameters got gradients (reported to the round), and the gradients
        themselves copied to the communication buffer when this rank contributes any."""
        has_gradient = tuple(self.has_gradient) if contributes else (False,) * len(self.has_gradient)
        if contributes:
            self.forget()
        if local_count > 0:
            self.buffers.stage_gradients()
            self.grads_written = False
        self.release()
        return has_gradient

    def release(self) -> None:
        """``p.grad`` back on the buffer (after the held gradients were staged or committed)."""
        if self.holding:
            self.buffers.attach_grads()
            self.holding = False

    def drop(self) -> None:
        """Discard every gradient not yet launched (an overflow under GradScaler, a checkpoint load)."""
        self.zero_grad(set_to_none=True)
        self.buffers.grad_flat.zero_()
        self.release()
        self.forget()

    def after_load(self) -> None:
        """A checkpoint was loaded: held gradients belong to the abandoned run; gradients in the
        buffer are cleared at the next ``zero_grad``."""
        if self.holding:
            self.buffers.grad_flat.zero_()
            self.release()
        self.grads_written = True
        self.forget()

    def forget(self) -> None:
        self.has_gradient = [False] * len(self.has_gradient)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def hooked(self) -> bool:
        return bool(self._hooks)


def _watch_gradient_writes(handover: GradientHandover) -> list[Any]:
    """After each parameter's gradient is accumulated: note that a backward wrote gradients (so
    ``zero_grad`` clears the buffer only then) and, while the buffer holds handed-over gradients,
    add the fresh gradient into it at once and release it (one parameter's gradient at most
    beyond the buffer during a backward)."""
    ref = weakref.ref(handover)

    def watcher(index: int) -> Callable[[Any], None]:
        def on_gradient(_: Any) -> None:
            owner = ref()
            if owner is None:
                return
            owner.grads_written = True
            owner.has_gradient[index] = True
            if owner.holding:
                owner.buffers.fold_grad(index, release=True)

        return on_gradient

    return [p.register_post_accumulate_grad_hook(watcher(i)) for i, p in enumerate(handover.buffers.params)]
