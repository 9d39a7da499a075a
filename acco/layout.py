"""Where every parameter element lives: pure arithmetic, no torch, no process groups.

All trainable parameters are packed into one flat buffer of ``world_size * shard_size``
elements. Rank ``r`` owns the contiguous range ``[r * shard_size, (r + 1) * shard_size)``,
which is what ``reduce_scatter`` / ``all_gather`` on equal-sized chunks need.

* ``flat`` partition: parameters are packed back to back in group order; the buffer is
  padded at the end; a shard may cut through a tensor (fine for element-wise optimizers).
* ``param`` partition: whole tensors are assigned to ranks, balanced by size; each rank's
  tensors are packed inside its own region and every region is padded to the largest one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence


class PartitionKind(str, enum.Enum):
    FLAT = "flat"
    PARAM = "param"


@dataclass(frozen=True)
class OwnedSlice:
    """A run of one parameter's elements that lies inside one rank's shard."""

    param_index: int
    param_start: int  # first element, counted inside the (flattened) parameter
    length: int
    shard_offset: int  # where that run starts inside the owning rank's shard


@dataclass(frozen=True)
class Layout:
    kind: PartitionKind
    world_size: int
    shard_size: int
    param_numels: tuple[int, ...]
    param_groups: tuple[int, ...]  # index of the param group of each parameter
    param_offsets: tuple[int, ...]  # start of each parameter in the flat buffer

    @property
    def total_size(self) -> int:
        return self.world_size * self.shard_size

    @property
    def num_elements(self) -> int:
        """Real (unpadded) elements."""
        return sum(self.param_numels)

    @property
    def padding(self) -> int:
        return self.total_size - self.num_elements

    def shard_range(self, rank: int) -> tuple[int, int]:
        _check_rank(rank, self.world_size)
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def owned_slices(self, rank: int) -> tuple[OwnedSlice, ...]:
        """Every run of parameter elements inside ``rank``'s shard, in buffer order."""
        start, end = self.shard_range(rank)
        slices = []
        for index, (offset, numel) in enumerate(zip(self.param_offsets, self.param_numels)):
            lo, hi = max(start, offset), min(end, offset + numel)
            if lo < hi:
                slices.append(OwnedSlice(index, lo - offset, hi - lo, lo - start))
        return tuple(slices)

    def owner_of(self, param_index: int) -> tuple[int, ...]:
        """Ranks holding at least one element of the parameter."""
        offset, numel = self.param_offsets[param_index], self.param_numels[param_index]
        if numel == 0:
            return ()
        first, last = offset // self.shard_size, (offset + numel - 1) // self.shard_size
        return tuple(range(first, last + 1))


@dataclass(frozen=True)
class GroupRun:
    """A contiguous run of one param group's elements inside a shard (flat partition)."""

    group: int
    shard_offset: int
    length: int


def merge_into_group_runs(slices: Sequence[OwnedSlice], param_groups: Sequence[int]) -> tuple[GroupRun, ...]:
    """Fuse adjacent slices of the same group, so a flat shard becomes one tensor per group.

    Fewer, larger tensors keep the inner optimizer's per-tensor Python overhead small.
    """
    runs: list[GroupRun] = []
    for piece in slices:
        group = param_groups[piece.param_index]
        if runs and runs[-1].group == group and runs[-1].shard_offset + runs[-1].length == piece.shard_offset:
            last = runs[-1]
            runs[-1] = GroupRun(group, last.shard_offset, last.length + piece.length)
        else:
            runs.append(GroupRun(group, piece.shard_offset, piece.length))
    return tuple(runs)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")


def _check_inputs(numels: Sequence[int], groups: Sequence[int], world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(numels) != len(groups):
        raise ValueError(f"{len(numels)} parameter sizes but {len(groups)} group indices")
    if not numels:
        raise ValueError("cannot lay out an empty parameter list")
    if any(n < 0 for n in numels):
        raise ValueError(f"parameter sizes must be >= 0, got {list(numels)}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def build_flat_layout(numels: Sequence[int], groups: Sequence[int], world_size: int) -> Layout:
    """Pack parameters back to back in the given order; pad the end to a multiple of the world size."""
    _check_inputs(numels, groups, world_size)
    offsets, cursor = [], 0
    for n in numels:
        offsets.append(cursor)
        cursor += n
    shard = max(1, _ceil_div(cursor, world_size))
    return Layout(PartitionKind.FLAT, world_size, shard, tuple(numels), tuple(groups), tuple(offsets))


def assign_params_to_ranks(numels: Sequence[int], world_size: int) -> tuple[int, ...]:
    """Greedy balance: largest tensor first to the least-loaded rank (ties to the lower rank).

    Deterministic, so that every rank computes the same assignment on its own.
    """
    loads = [0] * world_size
    owner = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[index] = rank
        loads[rank] += numels[index]
    return tuple(owner)


def build_param_layout(numels: Sequence[int], groups: Sequence[int], world_size: int) -> Layout:
    """Whole tensors per rank; each rank's region padded to the largest region."""
    _check_inputs(numels, groups, world_size)
    owner = assign_params_to_ranks(numels, world_size)
    loads = [0] * world_size
    local_offsets = [0] * len(numels)
    for index, n in enumerate(numels):  # original order inside each rank's region
        local_offsets[index] = loads[owner[index]]
        loads[owner[index]] += n
    shard = max(1, max(loads))
    offsets = tuple(owner[i] * shard + local_offsets[i] for i in range(len(numels)))
    return Layout(PartitionKind.PARAM, world_size, shard, tuple(numels), tuple(groups), offsets)


def build_layout(kind: PartitionKind | str, numels: Sequence[int], groups: Sequence[int], world_size: int) -> Layout:
    kind = PartitionKind(kind)
    if kind is PartitionKind.FLAT:
        return build_flat_layout(numels, groups, world_size)
    return build_param_layout(numels, groups, world_size)
