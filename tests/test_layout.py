"""Tests of ``acco.layout``: which element of which parameter lives in which rank's shard.

The layout is the contract between the flat buffers, the reduce-scatter / all-gather and
the sharded inner optimizer; an element owned twice (or never) is a silent training bug.
The properties below are checked on random parameter lists (with empty and 1-element
tensors), random group indices and world sizes 1..9, for both partition kinds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acco.layout import (
    Layout,
    OwnedSlice,
    PartitionKind,
    build_flat_layout,
    build_layout,
    build_param_layout,
)


def holders(layout, param_index):
    """Ranks holding at least one element of a parameter."""
    return tuple(r for r in range(layout.world_size) if any(p.param_index == param_index for p in layout.owned_slices(r)))

BUILDERS = {"flat": build_flat_layout, "param": build_param_layout}
KINDS = sorted(BUILDERS)

# ---------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------

# Mostly small sizes, with plenty of the edge cases 0 and 1 and the odd large tensor.
numel_strategy = st.one_of(
    st.just(0),
    st.just(1),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=41, max_value=500),
)
world_strategy = st.integers(min_value=1, max_value=9)


@st.composite
def params_and_groups(draw, max_params: int = 12):
    """Parameter sizes and group indices, enumerated group by group (non-decreasing)."""
    numels = draw(st.lists(numel_strategy, min_size=1, max_size=max_params))
    first = draw(st.integers(min_value=0, max_value=2))
    steps = draw(st.lists(st.integers(min_value=0, max_value=1), min_size=len(numels), max_size=len(numels)))
    groups, group = [], first
    for i, step in enumerate(steps):
        if i:
            group += step
        groups.append(group)
    return numels, groups


def layout_cases():
    return st.tuples(params_and_groups(), world_strategy, st.sampled_from(KINDS))


def _build(kind: str, numels, groups, world):
    layout = BUILDERS[kind](numels, groups, world)
    assert layout.kind is PartitionKind(kind)
    return layout


def _ownership(layout: Layout) -> dict[tuple[int, int], list[int]]:
    """(param index, element index) -> ranks whose owned_slices contain that element."""
    owners: dict[tuple[int, int], list[int]] = {}
    for rank in range(layout.world_size):
        for piece in layout.owned_slices(rank):
            for j in range(piece.param_start, piece.param_start + piece.length):
                owners.setdefault((piece.param_index, j), []).append(rank)
    return owners


# ---------------------------------------------------------------------------------------
# properties shared by both partitions
# ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_every_element_owned_exactly_once_with_consistent_offsets(case):
    """Each real element must be reduced and stepped by one rank, at the buffer position
    that the parameter's offset says."""
    (numels, groups), world, kind = case
    layout = _build(kind, numels, groups, world)

    owners = _ownership(layout)
    expected = {(i, j) for i, n in enumerate(numels) for j in range(n)}
    assert set(owners) == expected
    assert all(len(ranks) == 1 for ranks in owners.values()), owners

    for rank in range(world):
        for piece in layout.owned_slices(rank):
            assert piece.length >= 1
            assert 0 <= piece.param_start and piece.param_start + piece.length <= numels[piece.param_index]
            assert 0 <= piece.shard_offset and piece.shard_offset + piece.length <= layout.shard_size
            global_position = rank * layout.shard_size + piece.shard_offset
            assert layout.param_offsets[piece.param_index] + piece.param_start == global_position


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_equal_shards_and_sizes(case):
    """reduce_scatter / all_gather need equal chunks covering every real element."""
    (numels, groups), world, kind = case
    layout = _build(kind, numels, groups, world)

    assert layout.world_size == world
    assert layout.shard_size >= 1
    assert layout.total_size == world * layout.shard_size
    assert layout.num_elements == sum(numels)
    assert layout.total_size >= layout.num_elements
    assert layout.padding == layout.total_size - layout.num_elements >= 0
    assert layout.param_numels == tuple(numels)
    assert layout.param_groups == tuple(groups)
    assert len(layout.param_offsets) == len(numels)
    for rank in range(world):
        lo, hi = layout.shard_range(rank)
        assert (lo, hi) == (rank * layout.shard_size, (rank + 1) * layout.shard_size)


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_params_do_not_overlap_and_lie_inside_buffer(case):
    """Each parameter is a view into the flat buffer: views must be disjoint and in bounds."""
    (numels, groups), world, kind = case
    layout = _build(kind, numels, groups, world)

    intervals = []
    for offset, n in zip(layout.param_offsets, numels):
        assert 0 <= offset and offset + n <= layout.total_size
        if n:
            intervals.append((offset, offset + n))
    intervals.sort()
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert end <= start


@settings(max_examples=150, deadline=None)
@given(layout_cases())
def test_owned_slices_are_in_buffer_order(case):
    """Slices of a shard are listed in buffer order and never overlap inside the shard."""
    (numels, groups), world, kind = case
    layout = _build(kind, numels, groups, world)
    for rank in range(world):
        pieces = layout.owned_slices(rank)
        for a, b in zip(pieces, pieces[1:]):
            assert a.shard_offset + a.length <= b.shard_offset


@settings(max_examples=100, deadline=None)
@given(layout_cases(), st.integers(min_value=0, max_value=2**31 - 1))
def test_views_round_trip_through_shards(case, seed):
    """Pack tensors into the flat buffer, cut it into shards, scatter each shard back
    through owned_slices: the original tensors come out, and padding is never read."""
    (numels, groups), world, kind = case
    layout = _build(kind, numels, groups, world)
    gen = torch.Generator().manual_seed(seed)
    originals = [torch.randn(n, generator=gen) for n in numels]
    # A few tensors get a 2-D shape, to make sure flattening is what the offsets count.
    originals = [t.view(1, -1) if i % 3 == 1 else t for i, t in enumerate(originals)]

    flat = torch.full((layout.total_size,), float("nan"))
    for t, offset in zip(originals, layout.param_offsets):
        flat[offset : offset + t.numel()] = t.reshape(-1)
    shards = flat.view(world, layout.shard_size)

    rebuilt = [torch.full_like(t, float("inf")) for t in originals]
    for rank in range(world):
        shard = shards[rank]
        for piece in layout.owned_slices(rank):
            target = rebuilt[piece.param_index].view(-1)
            chunk = shard[piece.shard_offset : piece.shard_offset + piece.length]
            assert not torch.isnan(chunk).any()  # a slice must never cover padding
            target[piece.param_start : piece.param_start + piece.length] = chunk
    for got, want in zip(rebuilt, originals):
        assert got.shape == want.shape
        assert torch.equal(got, want)


@settings(max_examples=100, deadline=None)
@given(layout_cases())
def test_build_layout_dispatches_on_string_and_enum(case):
    (numels, groups), world, kind = case
    expected = BUILDERS[kind](numels, groups, world)
    assert build_layout(kind, numels, groups, world) == expected
    assert build_layout(PartitionKind(kind), numels, groups, world) == expected


# ---------------------------------------------------------------------------------------
# partition-specific properties
# ---------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(params_and_groups(), world_strategy)
def test_flat_partition_is_packed_and_minimally_padded(numels_groups, world):
    """Flat: params back to back in order, padding only to round up to the world size."""
    numels, groups = numels_groups
    layout = build_flat_layout(numels, groups, world)
    cursor = 0
    for offset, n in zip(layout.param_offsets, numels):
        assert offset == cursor
        cursor += n
    if layout.num_elements >= 1:
        assert layout.padding < world
        assert layout.shard_size == -(-layout.num_elements // world)
    else:
        assert layout.shard_size == 1


@settings(max_examples=150, deadline=None)
@given(params_and_groups(), world_strategy)
def test_param_partition_never_splits_a_tensor_and_is_balanced(numels_groups, world):
    """Param: each non-empty tensor is whole on one rank; greedy balance is within one
    largest tensor of the ideal average."""
    numels, groups = numels_groups
    layout = build_param_layout(numels, groups, world)

    loads = [0] * world
    for i, n in enumerate(numels):
        owners = holders(layout, i)
        if n == 0:
            assert owners == ()
            continue
        assert len(owners) == 1
        (rank,) = owners
        holding = [r for r in range(world) if any(p.param_index == i for p in layout.owned_slices(r))]
        assert holding == [rank]
        (piece,) = [p for p in layout.owned_slices(rank) if p.param_index == i]
        assert (piece.param_start, piece.length) == (0, n)
        loads[rank] += n

    assert sum(loads) == sum(numels)
    assert max(loads) <= sum(numels) / world + max(numels)
    assert layout.shard_size == max(1, max(loads))


# ---------------------------------------------------------------------------------------
# hand-computed examples
# ---------------------------------------------------------------------------------------


def test_flat_example_two_ranks():
    layout = build_flat_layout([5, 3, 4], [0, 0, 1], 2)
    assert layout.kind is PartitionKind.FLAT
    assert layout.shard_size == 6
    assert layout.total_size == 12
    assert layout.padding == 0
    assert layout.param_offsets == (0, 5, 8)
    assert layout.owned_slices(0) == (OwnedSlice(0, 0, 5, 0), OwnedSlice(1, 0, 1, 5))
    assert layout.owned_slices(1) == (OwnedSlice(1, 1, 2, 0), OwnedSlice(2, 0, 4, 2))
    assert [holders(layout, i) for i in range(3)] == [(0,), (0, 1), (1,)]


def test_flat_example_padding():
    layout = build_flat_layout([5, 3, 4], [0, 0, 0], 5)
    assert layout.shard_size == 3  # ceil(12 / 5)
    assert layout.total_size == 15
    assert layout.padding == 3
    assert layout.owned_slices(4) == ()  # the last rank holds only padding
    assert layout.owned_slices(3) == (OwnedSlice(2, 1, 3, 0),)


def test_param_example_two_ranks():
    # Largest first: 5 -> rank 0, 4 -> rank 1, 3 -> rank 1 (load 4 < 5).
    layout = build_param_layout([5, 3, 4], [0, 0, 1], 2)
    assert layout.kind is PartitionKind.PARAM
    assert [holders(layout, i) for i in range(3)] == [(0,), (1,), (1,)]
    assert layout.shard_size == 7  # loads 5 and 7
    assert layout.total_size == 14
    assert layout.padding == 2
    # inside rank 1's region, params keep their original order: 3 (idx 1) then 4 (idx 2).
    assert layout.param_offsets == (0, 7, 10)
    assert layout.owned_slices(0) == (OwnedSlice(0, 0, 5, 0),)
    assert layout.owned_slices(1) == (OwnedSlice(1, 0, 3, 0), OwnedSlice(2, 0, 4, 3))


def test_all_empty_params_still_get_one_element_shards():
    for build in (build_flat_layout, build_param_layout):
        layout = build([0, 0], [0, 1], 3)
        assert layout.shard_size == 1
        assert layout.total_size == 3
        assert layout.num_elements == 0
        assert all(layout.owned_slices(r) == () for r in range(3))
        assert holders(layout, 0) == holders(layout, 1) == ()


def test_single_rank_owns_everything():
    for build in (build_flat_layout, build_param_layout):
        layout = build([2, 0, 3], [0, 0, 1], 1)
        assert layout.shard_size == 5
        assert layout.padding == 0
        assert layout.owned_slices(0) == (OwnedSlice(0, 0, 2, 0), OwnedSlice(2, 0, 3, 2))


# ---------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "numels, groups, world",
    [
        ([1, 2], [0, 0], 0),  # world size 0
        ([1, 2], [0, 0], -1),
        ([], [], 2),  # nothing to lay out
        ([1, 2], [0], 2),  # mismatched lengths
        ([1], [0, 0], 2),
        ([1, -1], [0, 0], 2),  # negative size
    ],
)
def test_bad_inputs_raise(kind, numels, groups, world):
    with pytest.raises(ValueError):
        BUILDERS[kind](numels, groups, world)
    with pytest.raises(ValueError):
        build_layout(kind, numels, groups, world)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [-1, 3, 10])
def test_bad_rank_raises(kind, rank):
    layout = BUILDERS[kind]([5, 3, 4], [0, 0, 1], 3)
    with pytest.raises(ValueError):
        layout.shard_range(rank)
    with pytest.raises(ValueError):
        layout.owned_slices(rank)


def test_unknown_partition_kind_raises():
    with pytest.raises(ValueError):
        build_layout("diagonal", [1], [0], 1)


def test_partition_kind_string_values():
    assert PartitionKind.FLAT == "flat" and PartitionKind("flat") is PartitionKind.FLAT
    assert PartitionKind.PARAM == "param" and PartitionKind("param") is PartitionKind.PARAM
