"""The model-sized buffers: flat parameters, flat gradients (``p.grad`` aliases them) and the
one communication buffer. Only the training thread calls these methods.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import Layout


class FlatBuffers:
    """Re-points every trainable ``p.data`` and ``p.grad`` at views of two flat buffers.

    The user's ``Parameter`` objects are kept (hooks, modules and checkpoints hold them); only
    their storage moves. The flat gradient buffer is the accumulator: autograd adds each
    backward into it in place, so handing gradients to a round is a swap of two buffers (or, for
    a communication dtype of its own, one contiguous copy).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], layout: Layout, comm_dtype: torch.dtype) -> None:
        self.params = list(params)
        self.layout = layout
        dtype, device = self.params[0].dtype, self.params[0].device
        self.dtype, self.device = dtype, device
        total = layout.total_size
        self.param_flat = torch.zeros(total, dtype=dtype, device=device)
        self.grad_flat = torch.zeros(total, dtype=dtype, device=device)
        itemsize = max(_itemsize(dtype), _itemsize(comm_dtype))
        # One buffer for both directions: gradients go out in comm_dtype, parameters come back
        # in the parameter dtype; the two never overlap in time within a round.
        self.comm_bytes = torch.zeros(total * itemsize, dtype=torch.uint8, device=device)
        self.comm_grads = self.comm_bytes[: total * _itemsize(comm_dtype)].view(comm_dtype)
        self.comm_params = self.comm_bytes[: total * _itemsize(dtype)].view(dtype)
        # Gradients travel in the parameter dtype: then the accumulator and the communication
        # buffer trade places at each launch (a pointer swap, no model-sized copy).
        self.swaps = comm_dtype == dtype
        self._allocated = (self.param_flat, self.grad_flat, self.comm_bytes)
        self.param_views: list[torch.Tensor] = []
        for param, offset, numel in zip(self.params, layout.param_offsets, layout.param_numels):
            view = self.param_flat[offset : offset + numel].view(param.shape)
            view.copy_(param.detach())
            self.param_views.append(view)
        for param, view in zip(self.params, self.param_views):
            param.data = view
        self._point_grad_views()

    def _point_grad_views(self) -> None:
        self.grad_views = [
            self.grad_flat[offset : offset + numel].view(param.shape)
            for param, offset, numel in zip(self.params, self.layout.param_offsets, self.layout.param_numels)
        ]
        self._grad_ptrs = [g.data_ptr() for g in self.grad_views]

    def attach_grads(self, indices: Optional[Sequence[int]] = None) -> None:
        """Point ``p.grad`` at its slice of the gradient buffer (autograd then adds in place).

        Each ``p.grad`` is a view of its own, not ``grad_views[i]`` itself: a copying
        ``model.to(...)`` re-points ``p.grad.data``, which must not take our view along."""
        for index in range(len(self.params)) if indices is None else indices:
            grad = self.grad_views[index]
            self.params[index].grad = grad.view(grad.shape)

    def detach_grads(self) -> None:
        """Leave the held gradients in the buffer but out of reach of any ``zero_grad``: the next
        backward then writes fresh tensors, which ``take_grad`` adds in at the next ``step()``."""
        for param in self.params:
            param.grad = None

    def is_attached(self, index: int) -> bool:
        grad = self.params[index].grad
        return grad is not None and grad.layout == torch.strided and grad.data_ptr() == self._grad_ptrs[index]

    def fits(self, index: int, grad: torch.Tensor) -> bool:
        """Whether ``grad`` can go into the parameter's slice. One that does not (the parameter was
        moved or cast) is left where it is: the parameter watch reports that parameter."""
        view = self.grad_views[index]
        return grad.device == view.device and grad.dtype == view.dtype and grad.shape == view.shape

    def take_grad(self, index: int, accumulate: bool) -> None:
        """One parameter's own gradient tensor into its slice of the buffer: added to what the slice
        holds (``accumulate``: gradients already handed to ``step()`` wait there) or copied over it."""
        view = self.grad_views[index]
        if accumulate:
            view.add_(self.params[index].grad)
        else:
            view.copy_(self.params[index].grad)

    def zero_grad_slice(self, index: int) -> None:
        self.grad_views[index].zero_()

    def stage_gradients(self) -> None:
        """Hand the accumulated gradients to the round and empty the accumulator.

        Where the two buffers share a dtype they trade places: the accumulator becomes the
        round's communication buffer, and the old communication buffer (its parameters were
        installed before any launch) is zeroed and becomes the accumulator, with every ``p.grad``
        that was attached moved onto it. Otherwise the gradients are copied over (C ← G).
        Called only while no round runs."""
        if not self.swaps:
            self.comm_grads.copy_(self.grad_flat)
            self.grad_flat.zero_()
            return
        attached = [index for index in range(len(self.params)) if self.is_attached(index)]
        self.grad_flat, self.comm_grads = self.comm_grads, self.grad_flat
        self.comm_params = self.comm_grads
        self.grad_flat.zero_()
        self._point_grad_views()
        self.attach_grads(attached)

    def install_params(self) -> None:
        """Copy the round's all-gathered parameters into the model."""
        self.param_flat.copy_(self.comm_params)

    def swap_params_with_comm(self, chunk_elements: int = 1 << 20) -> None:
        """Exchange the model's parameters with the round's result, through a small bounce buffer
        (no model-sized allocation)."""
        total = self.param_flat.numel()
        bounce = torch.empty(min(total, chunk_elements), dtype=self.dtype, device=self.device)
        for start in range(0, total, bounce.numel()):
            end = min(start + bounce.numel(), total)
            piece = bounce[: end - start]
            piece.copy_(self.param_flat[start:end])
            self.param_flat[start:end].copy_(self.comm_params[start:end])
            self.comm_params[start:end].copy_(piece)

    def long_lived(self) -> list[torch.Tensor]:
        """Every model-sized buffer, whichever role it has now."""
        return list(self._allocated)

    def nbytes(self) -> dict[str, int]:
        return {
            "params": nbytes(self.param_flat),
            "grads": nbytes(self.grad_flat),
            "comm": nbytes(self.comm_bytes),
        }


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (for the memory accounting)."""
    return t.numel() * t.element_size()


_FINGERPRINT_CHUNK = 1 << 20


def model_fingerprint(flat: torch.Tensor, pieces: Sequence[tuple[int, int, int]]) -> list[float]:
    """Three float64 sums (plain, squared, position-weighted) of a rank's shard of the model's flat
    parameters (``pieces``: ``Layout.rank_pieces``), chunk by chunk, with no shard-sized temporary.
    It tells the model a checkpoint was saved with from any other (the estimate, the committed
    parameters, fresh weights) without storing it: the same values give the same sums on the same
    device, bit for bit, and different weights match only by accident of all three sums."""
    sums = torch.zeros(3, dtype=torch.float64, device=flat.device)
    total = max(sum(length for _, _, length in pieces), 1)
    for shard_offset, buffer_offset, length in pieces:
        for start in range(0, length, _FINGERPRINT_CHUNK):
            piece = flat[buffer_offset + start : buffer_offset + min(start + _FINGERPRINT_CHUNK, length)].to(torch.float64)
            position = shard_offset + start
            ramp = torch.arange(position, position + piece.numel(), dtype=torch.float64, device=flat.device).div_(total).add_(1.0)
            sums += torch.stack([piece.sum(), piece.square().sum(), (piece * ramp).sum()])
    return sums.tolist()
