"""Gradients between a backward and the round that takes them (docs/design.md §3).

Every trainable ``p.grad`` is a view of the flat gradient buffer, so autograd accumulates in place
and handing the gradients to a round is a swap of two buffers. A gradient exists exactly when torch
says so (README, "Works with"):

* ``p.grad is None`` means that the earlier gradient is gone (``model.zero_grad()``, ``p.grad = None``,
  the "skip this batch" pattern): whatever the buffer holds for that parameter is dropped;
* a ``p.grad`` that is not a view of the buffer (the next backward after ``p.grad = None``, or a
  tensor assigned by the script) *is* the gradient: it is copied over the buffer's slice, not added;
* a zero tensor is a gradient: a parameter whose ``p.grad`` exists is stepped (weight decay, moments)
  even if no backward reached it, and one without is left untouched, as torch's optimizers do.

``present`` records, per parameter, whether torch would hold a ``p.grad`` now. It is set by the
backward (a post-accumulate hook), cleared by ``zero_grad(set_to_none=True)`` and by a ``p.grad`` found
``None``, and kept across ``step()`` (torch leaves ``p.grad`` in place after a step).

In non-blocking mode a ``step()`` that finds its round still running *holds* its gradients in the
buffer (``held``) while every ``p.grad`` is detached; the backwards that follow accumulate into fresh
tensors of their own, which the script may still drop, and are added into the buffer at the next
``step()``. Only the training thread calls this class.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Optional

import torch

from .buffers import CommBuffer, FlatBuffers

logger = logging.getLogger("acco")

_warned_changed_in_place = False


class GradientHandover:
    def __init__(self, buffers: FlatBuffers) -> None:
        self.buffers = buffers
        count = len(buffers.params)
        self.present = [False] * count  # torch would hold p.grad for the parameter (kept across step(), as torch keeps it)
        self.held = [False] * count  # non-blocking: a held step() call had a gradient for the parameter
        self.holding = False  # the buffer holds handed-over gradients while p.grad are detached
        self.buffer_dirty = False  # a backward accumulated into the buffer since it was last zeroed
        # Autograd version counters after the last accumulation (or our own last write): every
        # attached p.grad shares its lane's counter (one tensor per dtype); a gradient of its own has its own.
        self._buffer_versions: list[int] = []
        self._own_versions: dict[int, tuple[int, int]] = {}  # index -> (id of p.grad, its version)
        buffers.attach_grads()
        self._remember_buffer_versions()
        self._hooks = _watch_gradient_writes(self)

    # ------------------------------------------------------------------ the script's calls
    def zero_grad(self, set_to_none: bool) -> None:
        """Clear gradients computed since the last ``step()``; handed-over (held) ones stay."""
        buffers = self.buffers
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is None:
                continue
            if set_to_none:
                self.present[index] = False
                if not buffers.is_attached(index):
                    param.grad = None
            elif not buffers.is_attached(index):
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()
                if index in self._own_versions:  # our write, not the script's
                    self._own_versions[index] = (id(grad), grad._version)
        if not self.holding and (self.buffer_dirty or any(self._lanes_written())):
            buffers.grad_flat.zero_()
            self.buffer_dirty = False
        self._remember_buffer_versions()

    def collect(self) -> None:
        """At ``step()``: make the buffer hold exactly the gradients torch would step on.

        A ``p.grad`` found ``None`` drops the buffer's values for that parameter; one of its own (not a
        view of the buffer) replaces them, or, while held gradients wait in the buffer, is added to
        them. Checks every gradient first, so that a bad one leaves the buffer untouched.

        A script may also write into an attached ``p.grad`` itself (``p.grad.add_(g)``: it holds a
        zero tensor after ``zero_grad()``, where torch's would be ``None``); no hook sees that, but the
        lane's version counter moves: then the attached slices without a gradient are read (model-sized
        work, only in that case) and a non-zero one counts as a gradient."""
        buffers = self.buffers
        written = self._lanes_written()
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is not None and (grad.is_sparse or grad.layout != torch.strided):
                raise RuntimeError(
                    f"parameter {index} (shape {tuple(param.shape)}) has a sparse gradient; AccoOptimizer needs "
                    "dense gradients (use nn.Embedding(sparse=False))"
                )
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is None:
                if not self.holding and (self.buffer_dirty or written[buffers.lane_of[index]]):
                    buffers.zero_grad_slice(index)  # a gradient the script dropped
                self.present[index] = False
            elif written[buffers.lane_of[index]] and not self.present[index] and buffers.is_attached(index):
                if bool(buffers.grad_views[index].any()):  # the script wrote a gradient into our zero view
                    self.present[index] = True
                    self.buffer_dirty = True
            elif not buffers.is_attached(index) and buffers.fits(index, grad):
                # A gradient the script owns (it dropped or replaced ours): it is the gradient now.
                buffers.take_grad(index, accumulate=self.holding)
                if self.holding:
                    param.grad = None
                else:
                    buffers.attach_grads([index])
                    self.buffer_dirty = True
                self.present[index] = True
                self._own_versions.pop(index, None)
        self._remember_buffer_versions()

    def changed_in_place(self, expected_bumps_per_tensor: int = 0) -> bool:
        """Whether a gradient was written in place after the backward that produced it (a local
        ``clip_grad_norm_``, a manual scale): autograd version counters, O(parameters).
        ``expected_bumps_per_tensor``: writes the caller knows of (a GradScaler's ``unscale_``)."""
        buffers = self.buffers
        attached = [0] * len(self._buffer_versions)  # every attached p.grad: a GradScaler unscales them all
        present = [0] * len(self._buffer_versions)
        for index, param in enumerate(buffers.params):
            grad = param.grad
            if grad is None:
                continue
            if buffers.is_attached(index):
                attached[buffers.lane_of[index]] += 1
                present[buffers.lane_of[index]] += self.present[index]
                continue
            if not self.present[index]:
                continue
            seen = self._own_versions.get(index)
            if seen is not None and seen[0] == id(grad) and grad._version != seen[1] + expected_bumps_per_tensor:
                return True
        return any(
            some and lane._version != version + expected_bumps_per_tensor * count
            for lane, version, count, some in zip(buffers.grad_flat, self._buffer_versions, attached, present)
        )

    def warn_if_changed_in_place(self, expected_bumps_per_tensor: int = 0) -> None:
        """Once per process: gradients modified between backward and ``step()`` are this rank's local
        ones, not the averaged gradient that DDP's script would modify."""
        global _warned_changed_in_place
        if _warned_changed_in_place or not self.changed_in_place(expected_bumps_per_tensor):
            return
        _warned_changed_in_place = True
        logger.warning(
            "acco: gradients were changed in place between backward() and step() (for example by "
            "torch.nn.utils.clip_grad_norm_). With AccoOptimizer they are this rank's local gradients, not the "
            "averaged ones that DDP would hand you, so clipping them is not global clipping: pass "
            "AccoOptimizer(..., max_grad_norm=...) instead, which clips the averaged gradient of all ranks"
        )

    # ------------------------------------------------------------------ the pipeline's calls
    def hold(self) -> None:
        """Non-blocking ``step()`` with a round still running: keep this call's gradients in the
        buffer, out of reach of any ``zero_grad`` variant; the next backwards get tensors of their own."""
        self.held = [h or p for h, p in zip(self.held, self.present)]
        self.present = [False] * len(self.present)
        self.buffers.detach_grads()
        self.holding = True

    def hand_over(self, contributes: bool, local_count: int) -> tuple[tuple[bool, ...], CommBuffer]:
        """At a launch: which parameters this rank's contributed calls had a gradient for (reported
        to the round), and the communication buffer the round reads, with the gradients staged in it
        (a rank that gives nothing hands over the buffer as it is: the round zeroes it)."""
        gives = local_count > 0
        has_gradient = tuple(h or p for h, p in zip(self.held, self.present)) if gives else (False,) * len(self.present)
        if contributes:
            self.held = [False] * len(self.held)
        comm = self.buffers.comm
        if gives:
            comm = self.buffers.stage_gradients()
            self.buffer_dirty = False
        self.release()
        self._remember_buffer_versions()
        return has_gradient, comm

    def release(self) -> None:
        """``p.grad`` back on the buffer (after the held gradients were staged or committed); a
        gradient the script computed since, and has not handed to ``step()``, stays its own."""
        if self.holding:
            self.buffers.attach_grads([i for i, p in enumerate(self.buffers.params) if p.grad is None])
            self.holding = False
            self._remember_buffer_versions()

    def drop(self) -> None:
        """Discard every gradient not yet launched (an overflow under GradScaler)."""
        self.zero_grad(set_to_none=True)
        self.buffers.grad_flat.zero_()
        self.buffer_dirty = False
        self.release()
        self.held = [False] * len(self.held)
        self._remember_buffer_versions()

    def after_load(self) -> None:
        """A checkpoint was loaded: gradients of the abandoned run, held or not, are gone."""
        if self.holding:
            self.buffers.grad_flat.zero_()
            self.release()
        self.buffer_dirty = True  # cleared at the next zero_grad / step
        self.held = [False] * len(self.held)
        self.present = [False] * len(self.present)
        self._remember_buffer_versions()

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def hooked(self) -> bool:
        return bool(self._hooks)

    # ------------------------------------------------------------------ internals
    def _lanes_written(self) -> list[bool]:
        """Per lane: written in place since the last accumulation or our own last write."""
        return [lane._version != version for lane, version in zip(self.buffers.grad_flat, self._buffer_versions)]

    def _remember_buffer_versions(self) -> None:
        self._buffer_versions = [lane._version for lane in self.buffers.grad_flat]

    def _accumulated(self, index: int, grad: Optional[torch.Tensor]) -> None:
        """The post-accumulate hook: the backward gave this parameter a gradient."""
        self.present[index] = True
        if grad is None:
            return
        if self.buffers.is_attached(index):
            self.buffer_dirty = True
            self._buffer_versions[self.buffers.lane_of[index]] = grad._version
        else:
            self._own_versions[index] = (id(grad), grad._version)


def _watch_gradient_writes(handover: GradientHandover) -> list[Any]:
    """After each parameter's gradient is accumulated: note that it exists, and the version its
    gradient has then (to tell later in-place writes)."""
    ref = weakref.ref(handover)

    def watcher(index: int) -> Callable[[Any], None]:
        def on_gradient(param: Any) -> None:
            owner = ref()
            if owner is not None:
                owner._accumulated(index, param.grad)

        return on_gradient

    return [p.register_post_accumulate_grad_hook(watcher(i)) for i, p in enumerate(handover.buffers.params)]
