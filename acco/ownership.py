"""Does the model still train the tensors the optimizer owns? Checked at every ``step()`` in time
proportional to the number of parameters, never to their size.

AccoOptimizer re-points every trainable ``p.data`` at a view of its flat parameter buffer. An
ordinary script can break that link without noticing:

* a copying ``model.to(...)`` (Hugging Face ``Trainer`` and ``accelerate`` move the model after the
  user built the optimizer) gives ``p`` new storage: same device, dtype and shape is adopted here
  (the values are copied into the buffer and ``p.data`` re-pointed); another device, dtype or
  shape cannot be adopted and is reported as a ``Problem``;
* ``model.load_state_dict(...)``, ``nn.init.*_`` or any in-place write through ``p`` bumps the
  parameter's version counter (the buffer's own writes do not touch it): the round then adopts
  the written values as the committed parameters;
* a parameter left out at construction (``requires_grad=False``) that becomes trainable has no
  place in the buffers: reported as a ``Problem``.

Writes through ``p.data`` bypass version counters (as they bypass autograd): after such a write,
call ``AccoOptimizer.adopt_model_parameters()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .agreement import Problem
from .buffers import FlatBuffers


@dataclass(frozen=True)
class Observation:
    written: bool  # some parameter was written (or moved and adopted) since the last look
    problem: Problem = Problem.NONE
    problem_param: int = -1  # the parameter's index in the optimizer's param_groups order


class ParameterWatch:
    def __init__(self, buffers: FlatBuffers, frozen: Sequence[torch.Tensor], trainable_indices: Sequence[int], frozen_indices: Sequence[int]) -> None:
        self._buffers = buffers
        self._frozen = list(frozen)
        self._trainable_indices = list(trainable_indices)
        self._frozen_indices = list(frozen_indices)
        self._versions: list[int] = []
        self.written = False  # the parameters were written outside the optimizer since the last launch
        self.problem: tuple[Problem, int] = (Problem.NONE, -1)  # a change that cannot be adopted, and where
        self.remember_versions()

    def observe(self) -> Observation:
        """``look()``, remembered until the next launch: a write, or the first problem seen (which
        stays until the round that reports it fails)."""
        if self.problem[0] is not Problem.NONE:
            return Observation(self.written, *self.problem)
        seen = self.look()
        self.written = self.written or seen.written
        if seen.problem is not Problem.NONE:
            self.problem = (seen.problem, seen.problem_param)
        return seen

    def reset(self) -> None:
        """The model's parameters are the optimizer's again (after adopting them, or a checkpoint)."""
        self.remember_versions()
        self.written = False
        self.problem = (Problem.NONE, -1)

    def remember_versions(self) -> None:
        """What the parameters hold now is known to the optimizer."""
        self._versions = [p._version for p in self._buffers.params]

    def look(self) -> Observation:
        """Adopt parameters that were copied on their own device and dtype; report the rest."""
        buffers, written = self._buffers, False
        for index, (param, view) in enumerate(zip(buffers.params, buffers.param_views)):
            if param.data_ptr() != view.data_ptr() or param.dtype != view.dtype or param.shape != view.shape:
                problem = _problem_with(param, view)
                if problem is not Problem.NONE:
                    return Observation(written, problem, self._trainable_indices[index])
                view.copy_(param.detach())  # a copy on the same device and dtype: take its values back in
                param.data = view
                written = True
            elif param._version != self._versions[index]:
                written = True
        for position, param in enumerate(self._frozen):
            if param.requires_grad:
                return Observation(written, Problem.UNFROZEN, self._frozen_indices[position])
        if written:
            self.remember_versions()
        return Observation(written)


def _problem_with(param: torch.Tensor, view: torch.Tensor) -> Problem:
    if param.device != view.device:
        return Problem.MOVED
    if param.dtype != view.dtype:
        return Problem.CAST
    if param.shape != view.shape:
        return Problem.RESHAPED
    return Problem.NONE
