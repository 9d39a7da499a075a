"""Tests of ``acco.layout`` for per-group optimizers: a layout of a flat segment (element-wise
groups) and a param segment (whole-tensor groups), without process groups.

A rank's shard is its chunk of each segment; every collective runs segment by segment. The
properties below are checked on random parameter lists, random partition kinds per parameter and
world sizes 1..9; the expected positions are recomputed here from the definition, never read
from the layout's own answers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acco.layout import PartitionKind, build_flat_layout, build_layout, build_mixed_layout, build_param_layout

FLAT, PARAM = PartitionKind.FLAT, PartitionKind.PARAM
numel_strategy = st.one_of(st.just(0), st.just(1), st.integers(0, 40), st.integers(41, 500))


@st.composite
def mixed_cases(draw, max_params: int = 12):
    numels = draw(st.lists(numel_strategy, min_size=1, max_size=max_params))
    kinds = draw(st.lists(st.sampled_from([FLAT, PARAM]), min_size=len(numels), max_size=len(numels)))
    groups = sorted(draw(st.lists(st.integers(0, 3), min_size=len(numels), max_size=len(numels))))
    world = draw(st.integers(1, 9))
    return numels, kinds, groups, world


def _ceil_div(a, b):
    return -(-a // b)


@settings(max_examples=200, deadline=None)
@given(mixed_cases())
def test_every_element_owned_once_at_its_place_in_its_segment(case):
    numels, kinds, groups, world = case
    layout = build_mixed_layout(kinds, numels, groups, world)
    owners = {}
    for rank in range(world):
        pieces = layout.rank_pieces(rank)
        for piece in layout.owned_slices(rank):
            i = piece.param_index
            segment = layout.segments[layout.param_segments[i]]
            assert segment.kind is kinds[i] and layout.param_kind(i) is kinds[i]
            assert segment.shard_start <= piece.shard_offset and piece.shard_offset + piece.length <= segment.shard_start + segment.shard_size
            # the element's place in the flat buffer, from the segment's definition: chunk ``rank`` of the segment
            position = segment.start + rank * segment.shard_size + piece.shard_offset - segment.shard_start
            assert layout.param_offsets[i] + piece.param_start == position
            assert (segment.shard_start, position - (piece.shard_offset - segment.shard_start), segment.shard_size) in pieces
            for j in range(piece.param_start, piece.param_start + piece.length):
                assert (i, j) not in owners
                owners[(i, j)] = rank
    assert set(owners) == {(i, j) for i, n in enumerate(numels) for j in range(n)}
    for i, kind in enumerate(kinds):  # whole tensors stay whole
        if kind is PARAM and numels[i]:
            assert len({owners[(i, j)] for j in range(numels[i])}) == 1


@settings(max_examples=200, deadline=None)
@given(mixed_cases())
def test_segments_tile_the_buffer_and_the_shard(case):
    numels, kinds, groups, world = case
    layout = build_mixed_layout(kinds, numels, groups, world)
    cursor = shard_cursor = 0
    for segment in layout.segments:
        assert segment.start == cursor and segment.shard_start == shard_cursor and segment.world_size == world
        cursor += world * segment.shard_size
        shard_cursor += segment.shard_size
    assert cursor == layout.total_size == world * layout.shard_size
    assert shard_cursor == layout.shard_size
    for rank in range(world):
        offsets = [s for s, _, _ in layout.rank_pieces(rank)]
        assert offsets == sorted(offsets) and sum(n for *_, n in layout.rank_pieces(rank)) == layout.shard_size
    # parameters never overlap and lie in the buffer
    spans = sorted((o, o + n) for o, n in zip(layout.param_offsets, numels) if n)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 <= lo and hi <= layout.total_size for lo, hi in spans)


@settings(max_examples=200, deadline=None)
@given(mixed_cases())
def test_flat_segment_is_an_even_split_and_no_rank_holds_much_more_than_its_share(case):
    numels, kinds, groups, world = case
    layout = build_mixed_layout(kinds, numels, groups, world)
    flat_total = sum(n for n, k in zip(numels, kinds) if k is FLAT)
    whole = [n for n, k in zip(numels, kinds) if k is PARAM]
    if len(set(kinds)) == 2:
        assert layout.kind is PartitionKind.MIXED and len(layout.segments) == 2
        flat_segment, param_segment = layout.segments
        assert (flat_segment.kind, param_segment.kind) == (FLAT, PARAM)
        assert flat_segment.shard_size == max(1, _ceil_div(flat_total, world))
    loads = [sum(p.length for p in layout.owned_slices(rank)) for rank in range(world)]
    # greedy (largest first) whole tensors: at most the mean plus the largest one
    bound = _ceil_div(flat_total, world) + sum(whole) / world + max(whole, default=0)
    assert max(loads) <= bound
    for segment in layout.segments:  # every rank's chunk is padded to the largest: it too stays near the share
        if segment.kind is PARAM:
            assert segment.shard_size <= max(1, sum(whole) / world + max(whole, default=0))


@settings(max_examples=100, deadline=None)
@given(mixed_cases())
def test_one_kind_is_exactly_the_plain_layout(case):
    numels, kinds, groups, world = case
    for kind, builder in ((FLAT, build_flat_layout), (PARAM, build_param_layout)):
        plain = builder(numels, groups, world)
        assert build_mixed_layout([kind] * len(numels), numels, groups, world) == plain
        assert build_layout([kind.value] * len(numels), numels, groups, world) == plain
        assert len(plain.segments) == 1 and plain.shard_range(world - 1) == ((world - 1) * plain.shard_size, world * plain.shard_size)


@settings(max_examples=100, deadline=None)
@given(mixed_cases(), st.integers(0, 2**31 - 1))
def test_collectives_segment_by_segment_round_trip(case, seed):
    """Simulate the round's collectives as the round runs them (one per segment): reduce-scatter
    every rank's gradient buffer into shards, scatter the shards through ``owned_slices``, then
    all-gather the shards back: the summed tensors come out, and padding never lands in a tensor."""
    numels, kinds, groups, world = case
    layout = build_mixed_layout(kinds, numels, groups, world)
    gen = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(n, generator=gen, dtype=torch.float64) for n in numels] for _ in range(world)]
    buffers = []
    for rank_grads in grads:
        flat = torch.full((layout.total_size,), float("nan"), dtype=torch.float64)
        for t, offset in zip(rank_grads, layout.param_offsets):
            flat[offset : offset + t.numel()] = t
        buffers.append(flat)
    summed = [sum(g[i] for g in grads) for i in range(len(numels))]
    gathered = torch.full((layout.total_size,), float("inf"), dtype=torch.float64)
    for rank in range(world):
        shard = torch.empty(layout.shard_size, dtype=torch.float64)
        for segment in layout.segments:  # reduce-scatter of one segment: chunk ``rank`` of it, summed over ranks
            lo = segment.start + rank * segment.shard_size
            shard[segment.shard_start : segment.shard_start + segment.shard_size] = sum(b[lo : lo + segment.shard_size] for b in buffers)
        for piece in layout.owned_slices(rank):
            got = shard[piece.shard_offset : piece.shard_offset + piece.length]
            assert torch.equal(got, summed[piece.param_index][piece.param_start : piece.param_start + piece.length])
        for segment in layout.segments:  # all-gather of one segment: chunk ``rank`` comes from rank ``rank``
            lo = segment.start + rank * segment.shard_size
            gathered[lo : lo + segment.shard_size] = shard[segment.shard_start : segment.shard_start + segment.shard_size]
    for i, offset in enumerate(layout.param_offsets):
        assert torch.equal(gathered[offset : offset + numels[i]], summed[i])


def test_a_worked_example():
    # flat: 10 + 5 elements over 3 ranks (5 each); param: 30 and 18 whole, greedy: 30 → rank 0, 18 → rank 1
    layout = build_mixed_layout(["flat", "param", "flat", "param"], [10, 30, 5, 18], [0, 1, 2, 1], 3)
    assert layout.kind is PartitionKind.MIXED and layout.shard_size == 5 + 30
    assert layout.param_offsets == (0, 15, 10, 45)
    assert layout.rank_pieces(1) == ((0, 5, 5), (5, 45, 30))
    held = {i: {r for r in range(3) for p in layout.owned_slices(r) if p.param_index == i} for i in (0, 1, 3)}
    assert held == {0: {0, 1}, 1: {0}, 3: {1}}
    with pytest.raises(ValueError, match="rank_pieces"):
        layout.shard_range(0)


def test_bad_kinds_raise():
    with pytest.raises(ValueError):
        build_mixed_layout(["flat"], [1, 2], [0, 0], 2)
    with pytest.raises(ValueError):
        build_mixed_layout(["mixed", "flat"], [1, 2], [0, 0], 2)
    with pytest.raises(ValueError):
        build_layout("mixed", [1, 2], [0, 0], 2)
