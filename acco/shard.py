"""The inner optimizer on this rank's master shard, with a tentative (estimate) step.

The master shard is one flat tensor (fp32, or fp64 for fp64 models). The inner optimizer sees
views of it, never crossing a parameter's boundary: the run of each parameter this rank owns
(flat partition; cut into cache-sized pieces on CPU where no fused kernel runs), or one shaped
view per owned parameter (param partition). Keeping parameters apart lets a round skip exactly
the parameters that received no gradient, as torch skips ``p.grad is None``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .buffers import nbytes
from .inner import InnerOptimizers
from .layout import Layout, PartitionKind, ViewSpan

try:  # a private torch helper (present in 2.11-2.13): which devices have fused optimizer kernels
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:
    _get_fused_kernels_supported_devices = None  # type: ignore[assignment]

logger = logging.getLogger("acco")


def master_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


# Element-wise updates on CPU run as a sequence of full passes over each tensor; passes over
# cache-sized pieces of the flat shard are about twice as fast as over one huge tensor.
CPU_CHUNK_ELEMENTS = 1 << 18


# Optimizers whose fused kernels run on CUDA in every torch we support (others may be CPU-only).
_FUSED_ON_CUDA = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def fast_implementation(optimizer_class: type, defaults: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``fused=True`` where torch has a fused kernel and the user left the choice to torch; on CUDA
    otherwise ``capturable=True`` where it exists, which keeps step counters on the device (torch
    then picks its ``foreach`` kernels by itself).

    The fused kernels compute the same update (several times faster on CPU); passing ``fused=False``
    or ``foreach=...`` explicitly keeps the user's choice. Counters on the device let a skipped
    update be undone on the device, without the host waiting for the GPU.
    """
    accepted = inspect.signature(optimizer_class.__init__).parameters
    if defaults.get("differentiable"):
        return {}
    user_chose = defaults.get("fused") is not None or defaults.get("foreach") is not None
    if "fused" in accepted and not user_chose and dtype in (torch.float32, torch.float64):
        if device.type == "cuda":
            if issubclass(optimizer_class, _FUSED_ON_CUDA):
                return {"fused": True}
        elif _fused_supported_on(device):
            return {"fused": True}
    if device.type == "cuda" and "capturable" in accepted and not defaults.get("fused") and not defaults.get("capturable"):
        return {"capturable": True}
    return {}


def _fused_supported_on(device: torch.device) -> bool:
    if _get_fused_kernels_supported_devices is None:  # without the private helper, stay with torch's default
        return False
    return device.type in _get_fused_kernels_supported_devices()


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
        optimizer_class: Optional[type],
        defaults: dict[str, Any],
        group_hyperparameters: Sequence[dict[str, Any]],
        layout: Layout,
        rank: int,
        initial_shard: torch.Tensor,
        param_shapes: Sequence[torch.Size],
        *,
        group_classes: Optional[Sequence[type]] = None,
        class_defaults: Optional[dict[type, dict[str, Any]]] = None,
    ) -> None:
        """``group_classes`` / ``class_defaults``: per-group optimizers (one inner optimizer per
        class, over the views of its groups); without them every group uses ``optimizer_class``."""
        dtype = master_dtype_for(initial_shard.dtype)
        self.master = initial_shard.detach().to(dtype=dtype, copy=True)
        self.grad = torch.zeros_like(self.master)
        if group_classes is None:
            group_classes = [optimizer_class] * len(group_hyperparameters)
            class_defaults = {optimizer_class: defaults}
        classes = list(dict.fromkeys(group_classes))
        overrides = {cls: fast_implementation(cls, class_defaults[cls], self.master.device, dtype) for cls in classes}
        self._group_overrides = [overrides[cls] for cls in group_classes]
        views: list[list[torch.Tensor]] = [[] for _ in group_hyperparameters]
        spans: list[list[ViewSpan]] = [[] for _ in group_hyperparameters]
        owners: list[list[int]] = [[] for _ in group_hyperparameters]
        cpu = self.master.device.type == "cpu"
        for piece in layout.owned_slices(rank):
            group = layout.param_groups[piece.param_index]
            flat = layout.param_kind(piece.param_index) is PartitionKind.FLAT
            chunk = CPU_CHUNK_ELEMENTS if flat and cpu and not self._group_overrides[group] else None
            step = chunk or piece.length
            for start in range(piece.shard_offset, piece.shard_offset + piece.length, step):
                length = min(step, piece.shard_offset + piece.length - start)
                views[group].append(self._view(start, length, None if flat else param_shapes[piece.param_index]))
                spans[group].append(ViewSpan(start, length))
                owners[group].append(piece.param_index)
        # The inner optimizer numbers its tensors group by group: so do the spans.
        self.spans: list[ViewSpan] = [span for group in spans for span in group]
        # Which trainable parameter each view belongs to (the inner optimizer's numbering).
        self.view_params: list[int] = [index for group in owners for index in group]
        self._group_classes = list(group_classes)
        self._class_kwargs = {cls: {**constructor_kwargs(cls, class_defaults[cls]), **overrides[cls]} for cls in classes}
        groups = [{**hp, **o, "params": v} for hp, o, v in zip(group_hyperparameters, self._group_overrides, views)]
        self.optimizer = self._build_inner(groups)
        self._view_owner = {id(view): owner for view, owner in zip(self._params(), self.view_params)}
        # Scratch of the estimate's shadow step and of a device-decided skip: master and state copies,
        # allocated at their first use (a mode or engine that never needs them never pays for them).
        self._master_backup: Optional[torch.Tensor] = None
        self._state_backup: dict[tuple[int, str], torch.Tensor] = {}
        self._owners: Optional[torch.Tensor] = None  # view_params on the master's device (per-view masks)
        self._shadow: Optional[torch.optim.Optimizer] = None
        self._logged_host_decision = False
        self._prototypes: dict[tuple[int, Optional[tuple[int, ...]]], dict[str, Any]] = {}  # state_prototype's cache

    def _build_inner(self, groups: Sequence[dict[str, Any]]) -> Any:
        """The inner optimizer over ``groups`` (one per user group, in order): one torch optimizer per
        class, seen as one (``InnerOptimizers``) when the groups name several."""
        optimizers, members = [], []
        for cls, kwargs in self._class_kwargs.items():
            indices = [i for i, c in enumerate(self._group_classes) if c is cls]
            optimizers.append(cls([groups[i] for i in indices], **kwargs))
            members.append(indices)
        return optimizers[0] if len(optimizers) == 1 else InnerOptimizers(optimizers, members)

    def _backup(self) -> torch.Tensor:
        """The master's scratch copy, allocated at its first use (in the round that needs it)."""
        if self._master_backup is None:
            self._master_backup = torch.empty_like(self.master)
        return self._master_backup

    def largest_view_bytes(self) -> int:
        """Bytes of the largest tensor the inner optimizer steps (in the master dtype)."""
        return max((span.length for span in self.spans), default=0) * self.master.element_size()

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
        for group, hp, overrides in zip(self.optimizer.param_groups, hyperparameters, self._group_overrides):
            group.update(hp)
            group.update(overrides)

    @contextlib.contextmanager
    def only_params_with_gradients(self, has_gradient: Optional[Sequence[bool]]) -> Iterator[None]:
        """Inside the block, views of parameters that received no gradient on any rank have no
        ``.grad``: the inner optimizer skips them as torch skips ``p.grad is None`` (no weight
        decay, no moment or step-counter change). ``None``: every parameter has a gradient."""
        if has_gradient is None:
            yield
            return
        params = self._params()
        hidden = [(view, view.grad) for view, owner in zip(params, self.view_params) if not has_gradient[owner]]
        for view, _ in hidden:
            view.grad = None
        try:
            yield
        finally:
            for view, grad in hidden:
                view.grad = grad

    def blend_with_momentum(self, has_gradient: Optional[Sequence[bool]] = None) -> None:
        """Estimate round with ``estimate='momentum'``: the second half of the update's gradients
        is not known yet, so predict it by the bias-corrected first moment m̂ and step with
        (ḡ₁ + m̂) / 2, the expected mean of the whole update, instead of the noisier ḡ₁ alone.
        Views without a first moment yet (the first update) keep ḡ₁. Shard-sized, no host sync."""
        for group in self.optimizer.param_groups:
            beta1 = group["betas"][0]
            for view in group["params"]:
                owner = self._view_owner[id(view)]
                state = self.optimizer.state.get(view)
                if view.grad is None or not state or "exp_avg" not in state:
                    continue
                if isinstance(has_gradient, (tuple, list)) and not has_gradient[owner]:
                    continue  # (a mask on the device: every view blends; those without a gradient are selected back)
                step = state["step"]
                if isinstance(step, torch.Tensor):  # counted in float32 by the fused kernels: exact integers
                    correction = 1.0 - torch.pow(beta1, step.to(state["exp_avg"].dtype))
                else:
                    correction = 1.0 - beta1**step
                view.grad.mul_(0.5).add_(state["exp_avg"] / correction, alpha=0.5)

    def step(self, keep: Optional[torch.Tensor] = None, param_mask: Optional[torch.Tensor] = None) -> None:
        """Commit one update. ``keep``: a boolean device scalar; where it is False the update is
        undone on the device (master and state back to their previous values), so that the host
        need not know the decision. ``param_mask`` (a boolean device tensor, one entry per trainable
        parameter): the update is kept only for the parameters it marks, as torch skips
        ``p.grad is None`` (no weight decay, no moment or step-counter change for the others)."""
        if keep is None:
            self.optimizer.step()
            return
        if param_mask is None and self._skips_on_device():
            # torch's fused kernels (Adam, AdamW, SGD) skip an update themselves, step counter
            # included, when ``found_inf`` is 1 (GradScaler's protocol): no snapshot needed.
            self.optimizer.found_inf = (~keep).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        saved = self._snapshot()
        self.optimizer.step()
        self._select(keep, saved, param_mask)

    def _skips_on_device(self) -> bool:
        """The inner optimizer honours ``found_inf`` and its state exists (a skipped first step of
        fused SGD would leave its new momentum buffers uninitialised)."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False)) and len(self.optimizer.state) == self.num_tensors

    def tentative_step(
        self, use_result: Callable[[torch.Tensor], None], keep: Optional[torch.Tensor] = None, param_mask: Optional[torch.Tensor] = None
    ) -> None:
        """Step a shadow of the inner optimizer from copies of the master shard and of the state,
        and hand its result to ``use_result``: the committed master and state are never touched.

        The shadow is the same optimizer class over views of a shard-sized scratch buffer whose
        gradients are the real ones; copying master and state in costs k + 1 shard-sized copies,
        half of a snapshot followed by a restore, and the copy runs the very kernel the commit runs
        (bit for bit the same update). With ``keep`` False (a device scalar), ``use_result`` gets
        the master's values instead; with ``param_mask``, so do the parameters it does not mark.
        """
        shadow = self._shadow_optimizer()
        backup = self._backup()
        backup.copy_(self.master)
        for group, copy_group in zip(self.optimizer.param_groups, shadow.param_groups):
            copy_group.update({k: v for k, v in group.items() if k != "params"})
            for view, shadow_view in zip(group["params"], copy_group["params"]):
                shadow_view.grad = view.grad
        shadow.state.clear()
        shadow_params = [p for group in shadow.param_groups for p in group["params"]]
        for i, (view, shadow_view) in enumerate(zip(self._params(), shadow_params)):
            state = self.optimizer.state.get(view)
            if state:
                shadow.state[shadow_view] = {key: self._scratch_copy(i, key, value) for key, value in state.items()}
        shadow.step()
        if keep is not None:
            view_keeps = self._view_keeps(keep, param_mask)
            if view_keeps is None:
                torch.where(keep, backup, self.master, out=backup)
            else:
                for i, span in enumerate(self.spans):
                    piece = slice(span.shard_offset, span.shard_offset + span.length)
                    torch.where(view_keeps[i], backup[piece], self.master[piece], out=backup[piece])
        use_result(backup)

    @property
    def estimate_result(self) -> torch.Tensor:
        """The last ``tentative_step``'s result (the master's scratch copy): valid until the next
        tentative step or device-decided skip, which reuse that buffer."""
        return self._backup()

    def _shadow_optimizer(self) -> torch.optim.Optimizer:
        """Built at the first estimate (modes without estimates never pay for it)."""
        if self._shadow is None:
            groups = []
            for group in self.optimizer.param_groups:
                views = []
                for view in group["params"]:
                    offset = view.data_ptr() - self.master.data_ptr()
                    start = offset // self.master.element_size()
                    views.append(self._backup()[start : start + view.numel()].view(view.shape))
                groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": views})
            self._shadow = self._build_inner(groups)
        return self._shadow

    def _scratch_copy(self, index: int, key: str, value: Any) -> Any:
        """A copy of one state entry in a buffer kept between rounds (the snapshot's own)."""
        if not isinstance(value, torch.Tensor):
            return copy.deepcopy(value)
        buffer = self._state_backup.get((index, key))
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype or buffer.device != value.device:
            buffer = self._state_backup[(index, key)] = torch.empty_like(value)
        return buffer.copy_(value)

    def _view_keeps(self, keep: torch.Tensor, param_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per inner view: ``keep``, and did its parameter have a gradient (``None`` without a mask)."""
        if param_mask is None:
            return None
        if self._owners is None or self._owners.device != param_mask.device:
            owners = torch.tensor(self.view_params, dtype=torch.long)
            if param_mask.is_cuda:  # through pinned memory: the host does not wait
                owners = owners.pin_memory().to(param_mask.device, non_blocking=True)
            self._owners = owners
        return keep & param_mask[self._owners]

    def _select(self, keep: torch.Tensor, saved: dict[int, dict[str, Any]], param_mask: Optional[torch.Tensor] = None) -> None:
        """After a step: keep its result where ``keep`` is True (and, with ``param_mask``, for the
        parameters it marks), else the values of ``saved``.

        Selected on the device when every state entry existed before the step and lives beside
        the master shard; otherwise (the first step creates the state; some optimizers keep a
        step counter on the host) the host reads the decision once, which waits for the device.
        """
        view_keeps = self._view_keeps(keep, param_mask)
        if not self._selectable_on_device(keep, saved):
            if saved and not self._logged_host_decision and keep.device.type != "cpu":
                self._logged_host_decision = True
                logger.info(
                    "acco: %s keeps state that the device cannot select (e.g. a step counter on the host): each "
                    "commit round waits for the device to decide whether to keep its update",
                    getattr(self.optimizer, "names", type(self.optimizer).__name__),
                )
            if view_keeps is None:
                if not bool(keep):
                    self._restore(saved)
            else:
                self._restore(saved, [i for i, kept in enumerate(view_keeps.tolist()) if not kept])
            return
        params, backup = self._params(), self._backup()
        if view_keeps is None:
            torch.where(keep, self.master, backup, out=self.master)
        else:
            for i, span in enumerate(self.spans):
                piece = slice(span.shard_offset, span.shard_offset + span.length)
                torch.where(view_keeps[i], self.master[piece], backup[piece], out=self.master[piece])
        for i, before in saved.items():
            state = self.optimizer.state[params[i]]
            kept = keep if view_keeps is None else view_keeps[i]
            for key, value in before.items():
                if isinstance(value, torch.Tensor):
                    torch.where(kept, state[key], value, out=state[key])

    def _selectable_on_device(self, keep: torch.Tensor, saved: dict[int, dict[str, Any]]) -> bool:
        params = self._params()
        if len(saved) != len(self.optimizer.state):
            return False
        for i, before in saved.items():
            state = self.optimizer.state.get(params[i])
            if state is None or state.keys() != before.keys():
                return False
            for key, value in before.items():
                current = state[key]
                if isinstance(value, torch.Tensor):
                    if not isinstance(current, torch.Tensor) or current.device != keep.device or current.shape != value.shape or current.dtype != value.dtype:
                        return False
                elif current != value:  # a host value the step changed
                    return False
        return True

    def _snapshot(self) -> dict[int, dict[str, Any]]:
        self._backup().copy_(self.master)
        index = {id(p): i for i, p in enumerate(self._params())}
        return {
            index[id(param)]: {key: self._scratch_copy(index[id(param)], key, value) for key, value in state.items()}
            for param, state in self.optimizer.state.items()
        }

    def _restore(self, saved: dict[int, dict[str, Any]], views: Optional[Sequence[int]] = None) -> None:
        """Master and state back to the snapshot: all of them, or only those of ``views``."""
        params = self._params()
        if views is None:
            self.master.copy_(self._master_backup)
            views = range(len(params))
        else:
            for i in views:
                piece = slice(self.spans[i].shard_offset, self.spans[i].shard_offset + self.spans[i].length)
                self.master[piece].copy_(self._master_backup[piece])
        for i in views:
            param = params[i]
            if i not in saved:
                _retire(*self.optimizer.state.pop(param, {}).values())
                continue
            state = self.optimizer.state[param]
            for key in [k for k in state if k not in saved[i]]:
                _retire(state.pop(key))
            for key, value in saved[i].items():
                current = state.get(key)
                if isinstance(value, torch.Tensor):
                    if isinstance(current, torch.Tensor) and current.shape == value.shape and current.dtype == value.dtype:
                        current.copy_(value)
                    else:
                        _retire(current)
                        state[key] = value.clone()
                else:
                    state[key] = value

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def view_states(self) -> dict[int, dict[str, Any]]:
        """The inner optimizer's state, keyed by view index (torch's own numbering; live tensors)."""
        return self.optimizer.state_dict()["state"]

    def load_view_states(self, view_states: dict[int, dict[str, Any]], copy_tensors: bool = True) -> None:
        """Replace the inner optimizer's state with copies of ``view_states``, dtypes kept as saved
        (``Optimizer.load_state_dict`` would cast, e.g., NAdam's fp32 ``mu_product`` to fp64: not
        bit-exact). Hyper-parameters stay: each round sets them. ``copy_tensors=False`` takes the
        tensors themselves (already on the view's device: a sharded load's fresh buffers, which nothing
        else keeps), so that a load holds one copy of the state, not two."""
        params = self._params()
        self.optimizer.state.clear()
        for index, state in view_states.items():
            device = params[index].device
            self.optimizer.state[params[index]] = {
                key: (value.detach().to(device=device, copy=copy_tensors) if isinstance(value, torch.Tensor) else copy.deepcopy(value))
                for key, value in state.items()
            }

    def view_groups(self) -> list[int]:
        """The user's param group of each view (the inner optimizer numbers its views group by group)."""
        return [number for number, group in enumerate(self.optimizer.param_groups) for _ in group["params"]]

    def state_prototype(self, view: int, shape: Optional[torch.Size] = None) -> dict[str, Any]:
        """The state a first step would give view ``view``, in zeros: the keys, dtypes and devices, with
        element-wise tensors of the view's size (flat views) and every other shape as the class makes
        it (``shape``: the parameter's, for a whole-tensor view). A sharded checkpoint saves state for
        every parameter, so that a template taken before any step has the keys a checkpoint holds.

        Learned from a throwaway optimizer of the view's class and group settings, stepped once on a
        stand-in of zeros: two elements for a flat view (its element-wise state comes back with two
        elements, its scalars with none); for a whole-tensor view one of the parameter's shape, on the
        meta device where the class steps there (Muon's iterations then cost nothing), else real."""
        group_number = self.view_groups()[view]
        group = self.optimizer.param_groups[group_number]
        cls = self._group_classes[group_number]
        params = self._params()
        flat = shape is None
        key = (group_number, None if flat else tuple(shape))
        structure = self._prototypes.get(key)
        if structure is None:
            structure = self._prototypes[key] = self._step_a_stand_in(cls, group, (2,) if flat else tuple(shape), flat)
        device = params[view].device
        state: dict[str, Any] = {}
        for name, (kind, value_shape, dtype, value_device) in structure.items():
            if kind == "value":
                state[name] = copy.deepcopy(value_shape)
                continue
            size = (params[view].numel(),) if kind == "elementwise" else value_shape
            state[name] = torch.zeros(size, dtype=dtype, device=device if value_device is None else value_device)
        return state

    def _step_a_stand_in(self, cls: type, group: dict[str, Any], shape: tuple[int, ...], flat: bool) -> dict[str, Any]:
        """``{key: (kind, shape or value, dtype, device or None for the view's own)}`` of one step's state."""
        settings = {k: v for k, v in group.items() if k != "params"}
        attempts = [self.master.device] if flat else [torch.device("meta"), self.master.device]
        for attempt, device in enumerate(attempts):
            stand_in = torch.zeros(shape, dtype=self.master.dtype, device=device)
            stand_in.grad = torch.zeros_like(stand_in)
            try:
                throwaway = cls([{**settings, "params": [stand_in]}], **self._class_kwargs[cls])
                throwaway.step()
            except Exception:  # noqa: BLE001 - the meta device is only a shortcut: step a real stand-in instead
                if attempt + 1 == len(attempts):
                    raise
                continue
            structure: dict[str, Any] = {}
            for name, value in throwaway.state[stand_in].items():
                if not isinstance(value, torch.Tensor):
                    structure[name] = ("value", value, None, None)
                    continue
                own_device = value.device == stand_in.device
                if tuple(value.shape) == shape and value.dim() > 0:
                    structure[name] = ("elementwise" if flat else "shaped", tuple(value.shape), value.dtype, None if own_device else value.device)
                else:
                    structure[name] = ("other", tuple(value.shape), value.dtype, None if own_device else value.device)
            return structure
        raise AssertionError("unreachable")

    def state_bytes(self) -> int:
        return sum(
            v.numel() * v.element_size() for s in self.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )

    def backup_bytes(self) -> int:
        """The scratch copies of master and state (the estimate's shadow step, a device-decided skip),
        once a round has needed them."""
        backup = self._master_backup
        return (0 if backup is None else nbytes(backup)) + sum(nbytes(t) for t in list(self._state_backup.values()))

    def publish_sizes(self) -> None:
        """Called by the thread that steps, after each step: the sizes ``published_sizes`` returns
        to other threads, which must never iterate the state while a round changes it."""
        self._published_sizes = (self.state_bytes(), self.backup_bytes())

    def published_sizes(self) -> tuple[int, int]:
        """``(state_bytes, backup_bytes)`` as of the last finished step (safe from any thread)."""
        return getattr(self, "_published_sizes", (0, 0))


def _retire(*values: Any) -> None:
    """Drop CUDA state tensors that kernels queued on the current (side) stream may still read:
    one allocated on another stream (e.g. by a checkpoint load) would otherwise go back to that
    stream's pool at once and could be reused there too early."""
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_cuda:
            value.record_stream(torch.cuda.current_stream(value.device))
