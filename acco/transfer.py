"""One rank's tensors to another rank's host memory, through the private group, in bounded pieces.

Object collectives pickle what they carry. A CUDA tensor pickled on rank 1 is unpickled onto
``cuda:1`` on every receiver (another rank's GPU, or one that does not exist there), and the whole
payload crosses as one blob (on NCCL staged through the GPU: a state-sized transient on every rank).
So no tensor goes through an object collective: a payload travels as a *skeleton* (its structure,
each tensor replaced by a ``TensorSlot``: host objects only), then each tensor's elements go by
broadcasts of at most ``PIECE_ELEMENTS`` through a staging buffer on the group's device. The rank
that keeps the payload assembles every tensor in host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .comm import Communicator

PIECE_ELEMENTS = 1 << 22  # per broadcast: 16 MiB of fp32 in the staging buffer


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor was in a payload: its position among the payload's tensors, dtype and shape."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def split(payload: Any, tensors: Optional[list[torch.Tensor]] = None) -> tuple[Any, list[torch.Tensor]]:
    """The payload with every tensor (in dicts, lists and tuples) replaced by a ``TensorSlot``, and
    the tensors in slot order."""
    tensors = [] if tensors is None else tensors
    if isinstance(payload, torch.Tensor):
        tensors.append(payload.detach())
        return TensorSlot(len(tensors) - 1, payload.dtype, tuple(payload.shape)), tensors
    if isinstance(payload, dict):
        return {key: split(value, tensors)[0] for key, value in payload.items()}, tensors
    if isinstance(payload, (list, tuple)):
        items = [split(value, tensors)[0] for value in payload]
        return (items if isinstance(payload, list) else tuple(items)), tensors
    return payload, tensors


def join(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """The inverse of ``split``."""
    if isinstance(skeleton, TensorSlot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {key: join(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        items = [join(value, tensors) for value in skeleton]
        return items if isinstance(skeleton, list) else tuple(items)
    return skeleton


def slots_of(skeleton: Any) -> list[TensorSlot]:
    if isinstance(skeleton, TensorSlot):
        return [skeleton]
    values = skeleton.values() if isinstance(skeleton, dict) else skeleton if isinstance(skeleton, (list, tuple)) else ()
    return sorted((slot for value in values for slot in slots_of(value)), key=lambda slot: slot.index)


def send_to(comm: Communicator, payload: Any, src: int, dst: int, device: torch.device) -> Optional[Any]:
    """Collective (every rank calls it alike): ``src``'s payload arrives on rank ``dst`` with every
    tensor in host memory; other ranks return ``None`` (they only relay the broadcasts). ``device``:
    where the group's collectives take tensors (the GPU for NCCL, else the host)."""
    rank = comm.rank
    skeleton, tensors = split(payload) if rank == src else (None, [])
    skeleton = comm.broadcast_object(skeleton, src)
    received = []
    for slot in slots_of(skeleton):
        numel = math.prod(slot.shape)
        out = torch.empty(numel, dtype=slot.dtype) if rank == dst else None
        source = tensors[slot.index].reshape(-1) if rank == src else None
        staging = None
        for start in range(0, numel, PIECE_ELEMENTS):
            length = min(PIECE_ELEMENTS, numel - start)
            if rank == src and source.device == device and source.is_contiguous():
                piece = source[start : start + length]  # sent as it is
            elif rank == dst and device.type == "cpu":
                piece = out[start : start + length]  # received in place
            else:
                if staging is None:
                    staging = torch.empty(min(numel, PIECE_ELEMENTS), dtype=slot.dtype, device=device)
                piece = staging[:length]
                if rank == src:
                    piece.copy_(source[start : start + length])
            comm.broadcast(piece, src)
            if rank == dst and piece.data_ptr() != out[start:].data_ptr():
                out[start : start + length].copy_(piece)
        received.append(None if out is None else out.view(slot.shape))
    return join(skeleton, received) if rank == dst else None
