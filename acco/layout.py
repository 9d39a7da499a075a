"""Where every parameter element lives: pure arithmetic, no torch, no process groups.

All trainable parameters are packed into one flat buffer of ``world_size * shard_size``
elements, made of one or two **segments**. A segment of ``world_size * s`` elements is split
into equal chunks of ``s``, rank ``r`` owning chunk ``r``: what ``reduce_scatter`` /
``all_gather`` on equal-sized chunks need. A rank's shard is its chunk of each segment, in
segment order (``shard_size`` is their sum).

* ``flat`` partition: parameters are packed back to back in group order; the segment is
  padded at the end; a shard may cut through a tensor (fine for element-wise optimizers).
* ``param`` partition: whole tensors are assigned to ranks, balanced by size; each rank's
  tensors are packed inside its own region and every region is padded to the largest one.
* ``mixed`` (param groups whose optimizers need different partitions): a flat segment with
  the element-wise groups' parameters, then a param segment with the whole-tensor groups'.
  Every rank holds an even share of the first and a balanced share of the second. A layout of
  one kind is one segment covering the whole buffer, so its rank ``r`` owns the contiguous
  range ``[r * shard_size, (r + 1) * shard_size)``.
* **lanes** (parameters of several dtypes: bf16 weights beside fp32 norms): the buffer is one run
  per lane, each laid out as above over its own parameters (one or two segments), lane after lane.
  A lane is stored as a tensor of its own dtype, so no segment crosses a lane; element offsets stay
  global (the lanes' runs, back to back), and a rank's shard is still its chunk of every segment.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence


class PartitionKind(str, enum.Enum):
    FLAT = "flat"
    PARAM = "param"
    MIXED = "mixed"  # a layout of a flat and a param segment (never a user's choice, never a segment's kind)


@dataclass(frozen=True)
class Segment:
    """A contiguous run of the flat buffer, split into ``world_size`` equal chunks, one per rank."""

    kind: PartitionKind
    start: int  # first element of the segment in the flat buffer
    shard_size: int  # elements of each rank's chunk
    shard_start: int  # where each rank's chunk begins inside the rank's shard
    world_size: int
    lane: int = 0  # the lane (one tensor per dtype) the segment lies in

    @property
    def size(self) -> int:
        return self.world_size * self.shard_size

    def rank_range(self, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s chunk, in flat-buffer elements."""
        _check_rank(rank, self.world_size)
        lo = self.start + rank * self.shard_size
        return lo, lo + self.shard_size


@dataclass(frozen=True)
class OwnedSlice:
    """A run of one parameter's elements that lies inside one rank's shard."""

    param_index: int
    param_start: int  # first element, counted inside the (flattened) parameter
    length: int
    shard_offset: int  # where that run starts inside the owning rank's shard


@dataclass(frozen=True)
class ViewSpan:
    """Where one inner-optimizer tensor lies in the rank's shard. Defined here, beside ``OwnedSlice``,
    because both the shard (which cuts its views) and the checkpoint maths (which re-shards them)
    need it, and this is the lowest layer they share."""

    shard_offset: int
    length: int


@dataclass(frozen=True)
class Layout:
    kind: PartitionKind
    world_size: int
    shard_size: int
    param_numels: tuple[int, ...]
    param_groups: tuple[int, ...]  # index of the param group of each parameter
    param_offsets: tuple[int, ...]  # start of each parameter in the flat buffer
    segments: tuple[Segment, ...] = ()  # () means one segment of ``kind`` over the whole buffer
    param_segments: tuple[int, ...] = ()  # the segment of each parameter (() means segment 0)

    def __post_init__(self) -> None:
        if not self.segments:
            object.__setattr__(self, "segments", (Segment(self.kind, 0, self.shard_size, 0, self.world_size),))
        if not self.param_segments:
            object.__setattr__(self, "param_segments", (0,) * len(self.param_numels))

    @property
    def total_size(self) -> int:
        return self.world_size * self.shard_size

    @property
    def lanes(self) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` of each lane's run of the buffer, in global elements (one lane: the whole buffer)."""
        runs: dict[int, tuple[int, int]] = {}
        for segment in self.segments:
            start, end = runs.get(segment.lane, (segment.start, segment.start))
            runs[segment.lane] = (min(start, segment.start), max(end, segment.start + segment.size))
        return tuple(runs[lane] for lane in sorted(runs))

    def param_kind(self, param_index: int) -> PartitionKind:
        """The partition of one parameter: ``flat`` (may be cut) or ``param`` (whole on one rank)."""
        return self.segments[self.param_segments[param_index]].kind

    @property
    def num_elements(self) -> int:
        """Real (unpadded) elements."""
        return sum(self.param_numels)

    @property
    def padding(self) -> int:
        return self.total_size - self.num_elements

    def shard_range(self, rank: int) -> tuple[int, int]:
        """Rank ``rank``'s shard as one range of the flat buffer (one segment only; else see ``rank_pieces``)."""
        _check_rank(rank, self.world_size)
        if len(self.segments) != 1:
            raise ValueError("a layout of several segments has no single shard range; use rank_pieces()")
        return rank * self.shard_size, (rank + 1) * self.shard_size

    def rank_pieces(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """``(shard_offset, buffer_offset, length)`` of rank ``rank``'s chunk of each segment, in shard order."""
        return tuple((seg.shard_start, seg.rank_range(rank)[0], seg.shard_size) for seg in self.segments)

    def owned_slices(self, rank: int) -> tuple[OwnedSlice, ...]:
        """Every run of parameter elements inside ``rank``'s shard, in shard order."""
        slices = []
        for number, segment in enumerate(self.segments):
            start, end = segment.rank_range(rank)
            for index, (offset, numel) in enumerate(zip(self.param_offsets, self.param_numels)):
                if self.param_segments[index] != number:
                    continue
                lo, hi = max(start, offset), min(end, offset + numel)
                if lo < hi:
                    slices.append(OwnedSlice(index, lo - offset, hi - lo, segment.shard_start + lo - start))
        return tuple(slices)


def row_major_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The run ``[start, stop)`` of a tensor's row-major (flattened) elements as boxes ``(offsets, sizes)``:
    rectangular blocks of the tensor, in element order, each of which is itself a contiguous run (so a
    box is a ``view`` of the run's piece, never a copy). A flat shard cuts a parameter at any element;
    ``torch.distributed.checkpoint`` describes what a rank holds of a tensor as such blocks. At most
    ``2 * ndim - 1`` boxes: a partial innermost row, partial blocks of each higher dimension up to a
    whole slab of the outermost, then the same down again. A 0-dim tensor is one box of no dimensions."""
    shape = tuple(int(d) for d in shape)
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = 1
    for size in shape[1:]:
        inner *= size
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    row, offset = divmod(start, inner)
    if offset:  # the end of row ``row``: a run inside one slice of the outer dimension
        end = min(stop, (row + 1) * inner)
        boxes += [((row, *o), (1, *s)) for o, s in row_major_boxes(shape[1:], offset, end - row * inner)]
        start = end
    if start < stop:
        row, whole = start // inner, (stop - start) // inner
        if whole:  # whole slices of the outer dimension: one box
            boxes.append(((row, *(0,) * (len(shape) - 1)), (whole, *shape[1:])))
            start += whole * inner
        if start < stop:  # the beginning of the last slice
            boxes += [((row + whole, *o), (1, *s)) for o, s in row_major_boxes(shape[1:], 0, stop - start)]
    return boxes


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


def build_layout(
    kind: PartitionKind | str | Sequence[PartitionKind | str],
    numels: Sequence[int],
    groups: Sequence[int],
    world_size: int,
    lanes: Optional[Sequence[int]] = None,
) -> Layout:
    """``kind``: one partition for every parameter, or one per parameter (see ``build_mixed_layout``).
    ``lanes``: the lane of each parameter (0, 1, ...: its dtype's); several lanes, see ``build_lane_layout``."""
    if lanes is not None and len(set(lanes)) > 1:
        return build_lane_layout(kind, numels, groups, world_size, lanes)
    if not isinstance(kind, (str, PartitionKind)):
        return build_mixed_layout(kind, numels, groups, world_size)
    kind = PartitionKind(kind)
    if kind is PartitionKind.FLAT:
        return build_flat_layout(numels, groups, world_size)
    if kind is PartitionKind.PARAM:
        return build_param_layout(numels, groups, world_size)
    raise ValueError("a mixed layout needs a partition per parameter")


def build_mixed_layout(
    kinds: Sequence[PartitionKind | str], numels: Sequence[int], groups: Sequence[int], world_size: int
) -> Layout:
    """A flat segment for the parameters of kind ``flat`` (even split), then a param segment for
    those of kind ``param`` (whole tensors, balanced by size), each built as its own layout.

    Both kinds have their own collectives (two reduce-scatters and two all-gathers instead of
    one); a rank owns its even share of the first and its balanced share of the second, so no
    rank holds more than ``total / world`` plus the largest whole tensor (plus rounding). All of
    one kind: exactly that kind's single-segment layout.
    """
    _check_inputs(numels, groups, world_size)
    kinds = [PartitionKind(k) for k in kinds]
    if len(kinds) != len(numels):
        raise ValueError(f"{len(numels)} parameter sizes but {len(kinds)} partition kinds")
    if any(k is PartitionKind.MIXED for k in kinds):
        raise ValueError("a parameter's partition is 'flat' or 'param'")
    if len(set(kinds)) == 1:
        return build_layout(kinds[0], numels, groups, world_size)
    offsets = [0] * len(numels)
    param_segments = [0] * len(numels)
    segments, buffer_start, shard_start = [], 0, 0
    for kind in (PartitionKind.FLAT, PartitionKind.PARAM):
        members = [i for i, k in enumerate(kinds) if k is kind]
        part = build_layout(kind, [numels[i] for i in members], [groups[i] for i in members], world_size)
        for local, index in enumerate(members):
            offsets[index] = buffer_start + part.param_offsets[local]
            param_segments[index] = len(segments)
        segments.append(Segment(kind, buffer_start, part.shard_size, shard_start, world_size))
        buffer_start += part.total_size
        shard_start += part.shard_size
    return Layout(
        PartitionKind.MIXED, world_size, shard_start, tuple(numels), tuple(groups), tuple(offsets), tuple(segments),
        tuple(param_segments),
    )


def build_lane_layout(
    kind: PartitionKind | str | Sequence[PartitionKind | str],
    numels: Sequence[int],
    groups: Sequence[int],
    world_size: int,
    lanes: Sequence[int],
) -> Layout:
    """One run of the buffer per lane (lanes numbered 0, 1, ... in order), each laid out over its own
    parameters as a layout of one dtype would be, then placed after the previous lane's run. Each of its
    segments keeps its own collectives, so a lane of bf16 weights and one of fp32 norms move in their
    own dtypes; the shard is the concatenation of the rank's chunk of every segment, lane after lane."""
    _check_inputs(numels, groups, world_size)
    if len(lanes) != len(numels):
        raise ValueError(f"{len(numels)} parameter sizes but {len(lanes)} lanes")
    count = max(lanes) + 1
    if sorted(set(lanes)) != list(range(count)):
        raise ValueError(f"lanes must be numbered 0..{count - 1}, got {sorted(set(lanes))}")
    kinds = [PartitionKind(kind)] * len(numels) if isinstance(kind, (str, PartitionKind)) else [PartitionKind(k) for k in kind]
    if len(kinds) != len(numels):
        raise ValueError(f"{len(numels)} parameter sizes but {len(kinds)} partition kinds")
    offsets = [0] * len(numels)
    param_segments = [0] * len(numels)
    segments: list[Segment] = []
    buffer_start = shard_start = 0
    for lane in range(count):
        members = [i for i, owner in enumerate(lanes) if owner == lane]
        part = build_layout([kinds[i] for i in members], [numels[i] for i in members], [groups[i] for i in members], world_size)
        for local, index in enumerate(members):
            offsets[index] = buffer_start + part.param_offsets[local]
            param_segments[index] = len(segments) + part.param_segments[local]
        for segment in part.segments:
            segments.append(Segment(segment.kind, buffer_start + segment.start, segment.shard_size,
                                    shard_start + segment.shard_start, world_size, lane))
        buffer_start += part.total_size
        shard_start += part.shard_size
    used = {segment.kind for segment in segments}
    overall = used.pop() if len(used) == 1 else PartitionKind.MIXED
    return Layout(overall, world_size, shard_start, tuple(numels), tuple(groups), tuple(offsets), tuple(segments), tuple(param_segments))
