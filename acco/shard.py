"""The inner optimizer on this rank's master shard, with a tentative (estimate) step.

The master shard is one flat tensor (fp32, or fp64 for fp64 models). The inner optimizer sees
views of it: one flat run per param group for the flat partition (few big tensors keep the
per-tensor overhead small), or one shaped view per owned parameter for the param partition.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Sequence

import torch

from .checkpoint import ViewSpan
from .layout import Layout, PartitionKind, merge_into_group_runs


def master_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


# Element-wise updates on CPU run as a sequence of full passes over each tensor; passes over
# cache-sized pieces of the flat shard are about twice as fast as over one huge tensor.
CPU_CHUNK_ELEMENTS = 1 << 18


def fast_implementation(optimizer_class: type, defaults: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``fused=True`` where torch has a fused kernel and the user left the choice to torch.

    The fused kernels compute the same update (several times faster on CPU); passing ``fused=False``
    or ``foreach=...`` explicitly keeps the user's choice.
    """
    if "fused" not in inspect.signature(optimizer_class.__init__).parameters:
        return {}
    if defaults.get("fused") is not None or defaults.get("foreach") is not None or defaults.get("differentiable"):
        return {}
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # private helper; without it, stay with torch's default
        supported = False
    return {"fused": True} if supported and dtype in (torch.float32, torch.float64) else {}


def constructor_kwargs(optimizer_class: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """Keep only the defaults the class's constructor accepts (AdamW.defaults has extra keys)."""
    signature = inspect.signature(optimizer_class.__init__)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return dict(defaults)
    accepted = set(signature.parameters) - {"self", "params"}
    return {k: v for k, v in defaults.items() if k in accepted}


class ShardOptimizer:
    """Owns the master shard, its gradient and the inner optimizer. Used by one thread at a time."""

    def __init__(
        self,
        optimizer_class: type,
        defaults: dict[str, Any],
        group_hyperparameters: Sequence[dict[str, Any]],
        layout: Layout,
        rank: int,
        initial_shard: torch.Tensor,
        param_shapes: Sequence[torch.Size],
    ) -> None:
        dtype = master_dtype_for(initial_shard.dtype)
        self.master = initial_shard.detach().to(dtype=dtype, copy=True)
        self.grad = torch.zeros_like(self.master)
        self._overrides = fast_implementation(optimizer_class, defaults, self.master.device, dtype)
        views: list[list[torch.Tensor]] = [[] for _ in group_hyperparameters]
        spans: list[list[ViewSpan]] = [[] for _ in group_hyperparameters]
        slices = layout.owned_slices(rank)
        if layout.kind is PartitionKind.FLAT:
            chunk = CPU_CHUNK_ELEMENTS if self.master.device.type == "cpu" and not self._overrides else None
            for run in merge_into_group_runs(slices, layout.param_groups):
                for start in range(run.shard_offset, run.shard_offset + run.length, chunk or run.length):
                    length = min(chunk or run.length, run.shard_offset + run.length - start)
                    views[run.group].append(self._view(start, length, None))
                    spans[run.group].append(ViewSpan(start, length))
        else:
            for piece in slices:
                shape = param_shapes[piece.param_index]
                views[layout.param_groups[piece.param_index]].append(self._view(piece.shard_offset, piece.length, shape))
                spans[layout.param_groups[piece.param_index]].append(ViewSpan(piece.shard_offset, piece.length))
        # The inner optimizer numbers its tensors group by group: so do the spans.
        self.spans: list[ViewSpan] = [span for group in spans for span in group]
        groups = [{**hp, **self._overrides, "params": v} for hp, v in zip(group_hyperparameters, views)]
        kwargs = {**constructor_kwargs(optimizer_class, defaults), **self._overrides}
        self.optimizer = optimizer_class(groups, **kwargs)
        self._master_backup = torch.empty_like(self.master)
        self._state_backup: dict[tuple[int, str], torch.Tensor] = {}

    def _view(self, offset: int, length: int, shape) -> torch.Tensor:
        master = self.master[offset : offset + length]
        grad = self.grad[offset : offset + length]
        if shape is not None:
            master, grad = master.view(shape), grad.view(shape)
        master.grad = grad
        return master

    @property
    def num_tensors(self) -> int:
        return sum(len(g["params"]) for g in self.optimizer.param_groups)

    def apply_hyperparameters(self, hyperparameters: Sequence[dict[str, Any]]) -> None:
        """Copy the user's group settings (lr, weight decay, ...) as they were at launch."""
        for group, hp in zip(self.optimizer.param_groups, hyperparameters):
            group.update(hp)
            group.update(self._overrides)

    def step(self) -> None:
        self.optimizer.step()

    def tentative_step(self, use_result: Callable[[], None]) -> None:
        """Step, let ``use_result`` read the tentative master shard, then restore everything.

        Every state tensor (AdamW's ``step`` included) and the master shard come back bit for bit.
        """
        saved = self._snapshot()
        try:
            self.optimizer.step()
            use_result()
        finally:
            self._restore(saved)

    def _snapshot(self) -> dict[int, dict[str, Any]]:
        self._master_backup.copy_(self.master)
        index = {id(p): i for i, p in enumerate(self._params())}
        saved: dict[int, dict[str, Any]] = {}
        for param, state in self.optimizer.state.items():
            i = index[id(param)]
            entry: dict[str, Any] = {}
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    buffer = self._state_backup.get((i, key))
                    if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                        buffer = self._state_backup[(i, key)] = torch.empty_like(value)
                    buffer.copy_(value)
                    entry[key] = buffer
                else:
                    entry[key] = copy.deepcopy(value)
            saved[i] = entry
        return saved

    def _restore(self, saved: dict[int, dict[str, Any]]) -> None:
        self.master.copy_(self._master_backup)
        params = self._params()
        for i, param in enumerate(params):
            if i not in saved:
                self.optimizer.state.pop(param, None)
                continue
            state = self.optimizer.state[param]
            for key in [k for k in state if k not in saved[i]]:
                del state[key]
            for key, value in saved[i].items():
                current = state.get(key)
                if isinstance(value, torch.Tensor):
                    if isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype:
                        current.copy_(value)
                    else:
                        state[key] = value.clone()
                else:
                    state[key] = value

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def view_states(self) -> dict[int, dict[str, Any]]:
        """The inner optimizer's state, keyed by view index (torch's own numbering; live tensors)."""
        return self.optimizer.state_dict()["state"]

    def load_view_states(self, view_states: dict[int, dict[str, Any]]) -> None:
        """Replace the inner optimizer's state with copies of ``view_states``, dtypes kept as saved
        (``Optimizer.load_state_dict`` would cast, e.g., NAdam's fp32 ``mu_product`` to fp64: not
        bit-exact). Hyper-parameters stay: each round sets them."""
        params = self._params()
        self.optimizer.state.clear()
        for index, state in view_states.items():
            device = params[index].device
            self.optimizer.state[params[index]] = {
                key: value.detach().to(device=device, copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
                for key, value in state.items()
            }

    def state_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
