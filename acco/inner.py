"""Several inner optimizers seen as one: per-group optimizers (e.g. Muon for the matrices, AdamW
for the rest) on one rank's shard.

``ShardOptimizer`` snapshots, restores, selects and checkpoints "the inner optimizer's state" by
walking ``param_groups`` and ``state``. ``InnerOptimizers`` gives it exactly those over every
class at once: the groups in the user's order (so the views are numbered as for one optimizer),
and one state dict that all the inner optimizers share (their views are distinct tensors, so
their keys never collide). A single class needs none of this and is used as it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch


class InnerOptimizers:
    """``optimizers[k]`` steps the user's groups ``members[k]`` (global group indices, in order)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], members: Sequence[Sequence[int]]) -> None:
        self.optimizers = list(optimizers)
        count = sum(len(m) for m in members)
        groups: list[Any] = [None] * count
        for optimizer, indices in zip(self.optimizers, members):
            for group, index in zip(optimizer.param_groups, indices):
                groups[index] = group
        self.param_groups: list[dict[str, Any]] = groups
        self.state: defaultdict = defaultdict(dict)
        for optimizer in self.optimizers:
            optimizer.state = self.state  # one dict for every class: snapshots and checkpoints see all of it

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Every inner optimizer skips an update itself when told ``found_inf`` (torch's fused kernels)."""
        return all(getattr(o, "_step_supports_amp_scaling", False) for o in self.optimizers)

    @property
    def found_inf(self) -> Any:
        return self.optimizers[0].found_inf

    @found_inf.setter
    def found_inf(self, value: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.found_inf = value

    @found_inf.deleter
    def found_inf(self) -> None:
        for optimizer in self.optimizers:
            del optimizer.found_inf

    @property
    def names(self) -> str:
        return "+".join(type(o).__name__ for o in self.optimizers)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s ``state_dict()["state"]`` numbering over every class: views numbered
        group by group in the user's order (live tensors, as torch's)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {"state": {i: self.state[p] for i, p in enumerate(params) if p in self.state}}
