"""The model-sized buffers: flat parameters, flat gradients (``p.grad`` aliases them) and the
one communication buffer. Only the training thread calls these methods.

Each is kept as one tensor per **lane** (``Layout.lanes``): the parameters of one dtype. A model of one
dtype has one lane, and each buffer is then that one tensor. Offsets are global (the lanes' runs back
to back), so the round addresses any segment with ``buffer[start:end]`` whatever lane it lies in.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .layout import Layout


class Lanes:
    """One model-sized buffer as one tensor per lane, addressed by global element offsets. A slice
    never crosses a lane (no segment does), so it is a view of one lane's tensor."""

    def __init__(self, tensors: Sequence[torch.Tensor], starts: Sequence[int]) -> None:
        self.tensors, self.starts = list(tensors), list(starts)

    def __getitem__(self, key: slice) -> torch.Tensor:
        start = 0 if key.start is None else key.start
        lane = max(bisect.bisect_right(self.starts, start) - 1, 0)
        tensor, base = self.tensors[lane], self.starts[lane]
        stop = base + tensor.numel() if key.stop is None else key.stop
        if stop - base > tensor.numel() or key.step not in (None, 1):
            raise IndexError(f"[{start}:{stop}] crosses a lane of the flat buffer (lanes start at {self.starts})")
        return tensor[start - base : stop - base]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def nbytes(self) -> int:
        return sum(nbytes(t) for t in self.tensors)

    def copy_(self, other: "Lanes") -> "Lanes":
        for mine, theirs in zip(self.tensors, other.tensors):
            mine.copy_(theirs)
        return self

    def zero_(self) -> "Lanes":
        for tensor in self.tensors:
            tensor.zero_()
        return self


@dataclass(frozen=True)
class CommBuffer:
    """The memory one round communicates through, in its two roles: gradients go out in the comm
    dtypes (``grads``), parameters come back in the parameter dtypes (``params``), one lane each;
    the two never overlap in time within a round. A round reads the one it was launched with."""

    grads: Lanes
    params: Lanes


class FlatBuffers:
    """Re-points every trainable ``p.data`` and ``p.grad`` at views of two flat buffers.

    The user's ``Parameter`` objects are kept (hooks, modules and checkpoints hold them); only
    their storage moves. The flat gradient buffer is the accumulator: autograd adds each
    backward into it in place, so handing gradients to a round is a swap of two buffers (or, for
    a communication dtype of its own, one contiguous copy), lane by lane.

    ``comm_dtype``: the dtype gradients travel in, for every lane; ``None``: each lane's own.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], layout: Layout, comm_dtype: Optional[torch.dtype]) -> None:
        self.params = list(params)
        self.layout = layout
        self.device = self.params[0].device
        runs = layout.lanes
        lane_of = [layout.segments[layout.param_segments[i]].lane for i in range(len(self.params))]
        self.lane_dtypes = [next(p.dtype for p, lane in zip(self.params, lane_of) if lane == number) for number in range(len(runs))]
        self.comm_dtypes = [comm_dtype or dtype for dtype in self.lane_dtypes]
        starts = [start for start, _ in runs]
        sizes = [end - start for start, end in runs]
        device = self.device
        self.param_flat = Lanes([torch.zeros(n, dtype=d, device=device) for n, d in zip(sizes, self.lane_dtypes)], starts)
        self.grad_flat = Lanes([torch.zeros(n, dtype=d, device=device) for n, d in zip(sizes, self.lane_dtypes)], starts)
        # One buffer for both directions: gradients go out in the comm dtype, parameters come back
        # in the parameter dtype; the two never overlap in time within a round.
        self.comm_bytes = [
            torch.zeros(n * max(_itemsize(d), _itemsize(c)), dtype=torch.uint8, device=device)
            for n, d, c in zip(sizes, self.lane_dtypes, self.comm_dtypes)
        ]
        self.comm_grads = Lanes([b[: n * _itemsize(c)].view(c) for b, n, c in zip(self.comm_bytes, sizes, self.comm_dtypes)], starts)
        self.comm_params = Lanes([b[: n * _itemsize(d)].view(d) for b, n, d in zip(self.comm_bytes, sizes, self.lane_dtypes)], starts)
        # A lane whose gradients travel in its own dtype trades places with the communication buffer at
        # each launch (a pointer swap, no model-sized copy).
        self.swaps = [c == d for c, d in zip(self.comm_dtypes, self.lane_dtypes)]
        self._allocated = (*self.param_flat, *self.grad_flat, *self.comm_bytes)
        self.lane_of = lane_of
        self.param_views: list[torch.Tensor] = []
        for param, offset, numel in zip(self.params, layout.param_offsets, layout.param_numels):
            view = self.param_flat[offset : offset + numel].view(param.shape)
            view.copy_(param.detach())
            self.param_views.append(view)
        for param, view in zip(self.params, self.param_views):
            param.data = view
        self._point_grad_views()

    @property
    def shard_dtype(self) -> torch.dtype:
        """A dtype that holds every lane's values exactly: the parameters' own, or the type promotion of
        the lanes' dtypes (bf16 with fp16 gives fp32: neither holds the other's values)."""
        return functools.reduce(torch.promote_types, self.lane_dtypes)

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

    @property
    def comm(self) -> CommBuffer:
        """The communication buffer of the round launched last (or of the next launch, if it gives nothing)."""
        return CommBuffer(self.comm_grads, self.comm_params)

    def stage_gradients(self) -> CommBuffer:
        """Hand the accumulated gradients to the round and empty the accumulator, lane by lane; return
        the buffer the round reads.

        Where a lane's gradients travel in its own dtype the two buffers trade places: the accumulator
        becomes the round's communication buffer, and the old communication buffer (its parameters were
        installed before any launch) is zeroed and becomes the accumulator, with every ``p.grad`` that
        was attached moved onto it. Otherwise the gradients are copied over (C ← G).
        Called only while no round runs (the last one was installed): the ``CommBuffer`` object handed to an
        earlier round is not mutated, but on a swapping lane its memory becomes the accumulator and is zeroed here."""
        attached = [index for index in range(len(self.params)) if self.is_attached(index)]
        comm_grads, comm_params = list(self.comm_grads.tensors), list(self.comm_params.tensors)
        for lane, swaps in enumerate(self.swaps):
            if not swaps:
                comm_grads[lane].copy_(self.grad_flat.tensors[lane])
                self.grad_flat.tensors[lane].zero_()
                continue
            grads, comm = self.grad_flat.tensors[lane], comm_grads[lane]
            self.grad_flat.tensors[lane], comm_grads[lane], comm_params[lane] = comm, grads, grads
            comm.zero_()
        self.comm_grads = Lanes(comm_grads, self.comm_grads.starts)
        self.comm_params = Lanes(comm_params, self.comm_params.starts)
        if any(self.swaps):
            self._point_grad_views()
            self.attach_grads(attached)
        return self.comm

    def install_params(self, gathered: Lanes) -> None:
        """Copy a round's all-gathered parameters into the model."""
        self.param_flat.copy_(gathered)

    def swap_params_with(self, gathered: Lanes, chunk_elements: int = 1 << 20) -> None:
        """Exchange the model's parameters with a round's result, through a small bounce buffer
        (no model-sized allocation)."""
        for params, comm in zip(self.param_flat, gathered):
            total = params.numel()
            bounce = torch.empty(min(total, chunk_elements), dtype=params.dtype, device=params.device)
            for start in range(0, total, max(bounce.numel(), 1)):
                end = min(start + bounce.numel(), total)
                piece = bounce[: end - start]
                piece.copy_(params[start:end])
                params[start:end].copy_(comm[start:end])
                comm[start:end].copy_(piece)

    def long_lived(self) -> list[torch.Tensor]:
        """Every model-sized buffer, whichever role it has now."""
        return list(self._allocated)

    def nbytes(self) -> dict[str, int]:
        return {
            "params": self.param_flat.nbytes(),
            "grads": self.grad_flat.nbytes(),
            "comm": sum(nbytes(b) for b in self.comm_bytes),
        }


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (for the memory accounting)."""
    return t.numel() * t.element_size()


_FINGERPRINT_CHUNK = 1 << 20  # 16-bit words per piece: every partial sum stays far below 2**63


def model_fingerprint(flat: Lanes) -> list[int]:
    """Three integer sums over the bit patterns of the whole model (every lane, as 16-bit words: plain,
    and weighted by two digits of the word's position), piece by piece. Integer sums are exact in any
    order, so the fingerprint is the same on any device and on every rank (the model is replicated);
    it tells the model a checkpoint was saved with from any other (the estimate, the committed
    parameters, fresh weights), which could only match all three sums by accident."""
    sums = [0, 0, 0]
    position = 0
    for lane in flat:
        words = lane.detach().reshape(-1).view(torch.int16)
        for start in range(0, words.numel(), _FINGERPRINT_CHUNK):
            piece = words[start : start + _FINGERPRINT_CHUNK].to(torch.int64) & 0xFFFF
            at = torch.arange(position, position + piece.numel(), dtype=torch.int64, device=piece.device)
            low, high = (at & 1023) + 1, ((at >> 10) & 1023) + 1
            found = torch.stack([piece.sum(), (piece * low).sum(), (piece * high).sum()]).tolist()
            sums = [a + b for a, b in zip(sums, found)]
            position += piece.numel()
    return sums
