"""``acco.layout`` with lanes (parameters of several dtypes, issue 23 item 10), without process groups.

Each lane is a run of the buffer stored as one tensor of its dtype, laid out over its own parameters as a
layout of one dtype would be. Checked on random parameter lists, lanes, partition kinds and world sizes,
with the expected positions recomputed from the definition."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from acco.layout import PartitionKind, build_layout

FLAT, PARAM = PartitionKind.FLAT, PartitionKind.PARAM


@st.composite
def lane_cases(draw):
    numels = draw(st.lists(st.one_of(st.just(0), st.integers(1, 40), st.integers(41, 300)), min_size=2, max_size=12))
    count = draw(st.integers(2, 3))
    lanes = draw(st.lists(st.integers(0, count - 1), min_size=len(numels), max_size=len(numels)))
    used = sorted(set(lanes))
    lanes = [used.index(lane) for lane in lanes]  # numbered 0.. in order of value, as the optimizer numbers dtypes
    kinds = draw(st.lists(st.sampled_from([FLAT, PARAM]), min_size=len(numels), max_size=len(numels)))
    groups = sorted(draw(st.lists(st.integers(0, 2), min_size=len(numels), max_size=len(numels))))
    return numels, lanes, kinds, groups, draw(st.integers(1, 6))


@settings(max_examples=200, deadline=None)
@given(lane_cases())
def test_each_lane_is_laid_out_alone_and_no_segment_crosses_a_lane(case):
    numels, lanes, kinds, groups, world = case
    layout = build_layout(kinds, numels, groups, world, lanes=lanes)
    runs = layout.lanes
    assert len(runs) == len(set(lanes))
    assert runs[0][0] == 0 and runs[-1][1] == layout.total_size
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # back to back, in lane order
    for lane, (start, end) in enumerate(runs):
        members = [i for i, owner in enumerate(lanes) if owner == lane]
        alone = build_layout([kinds[i] for i in members], [numels[i] for i in members], [groups[i] for i in members], world)
        assert end - start == alone.total_size
        for local, index in enumerate(members):  # the lane's own layout, shifted to its run
            assert layout.param_offsets[index] == start + alone.param_offsets[local]
            assert layout.param_kind(index) is alone.param_kind(local)
    for segment in layout.segments:
        start, end = runs[segment.lane]
        assert start <= segment.start and segment.start + segment.size <= end
    for index, lane in enumerate(lanes):
        assert layout.segments[layout.param_segments[index]].lane == lane
    owners = {}
    for rank in range(world):
        for piece in layout.owned_slices(rank):
            for j in range(piece.param_start, piece.param_start + piece.length):
                assert (piece.param_index, j) not in owners
                owners[(piece.param_index, j)] = rank
        assert sum(length for _, _, length in layout.rank_pieces(rank)) == layout.shard_size
    assert set(owners) == {(i, j) for i, n in enumerate(numels) for j in range(n)}


def test_one_lane_is_the_plain_layout():
    plain = build_layout("flat", [5, 3, 7], [0, 0, 1], 2)
    assert build_layout("flat", [5, 3, 7], [0, 0, 1], 2, lanes=[0, 0, 0]) == plain
    assert plain.lanes == ((0, plain.total_size),)
