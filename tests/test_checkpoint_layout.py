"""The re-sharding maths of ``acco.checkpoint``, without process groups: cutting whole-parameter
state into any world size's shard views and assembling it back gives the state back exactly."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acco.checkpoint import PortableStateBuilder, master_shard_from_portable, shard_state_from_portable
from acco.layout import ViewSpan, build_layout

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=6)


def _spans(layout, rank, chunk):
    """The inner optimizer's tensors, as ShardOptimizer cuts them: each owned run of a parameter
    (never crossing a parameter's boundary), cut into chunks, numbered group by group."""
    if layout.kind.value == "param":
        return [ViewSpan(p.shard_offset, p.length) for p in layout.owned_slices(rank)]
    spans = []
    for piece in layout.owned_slices(rank):
        for start in range(piece.shard_offset, piece.shard_offset + piece.length, chunk):
            spans.append((layout.param_groups[piece.param_index], ViewSpan(start, min(chunk, piece.shard_offset + piece.length - start))))
    return [span for _, span in sorted(spans, key=lambda g_s: (g_s[0], g_s[1].shard_offset))]


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, world=st.integers(1, 5), kind=st.sampled_from(["flat", "param"]), chunk=st.integers(1, 7), seed=st.integers(0, 99))
def test_cut_and_assemble_round_trip(shapes, world, kind, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [torch.Size(s) for s in shapes]
    groups = [i % 2 for i in range(len(shapes))]
    layout = build_layout(kind, [s.numel() for s in shapes], groups, world)
    state = {
        i: {"step": torch.tensor(float(seed)), "exp_avg": torch.randn(s, generator=gen), "exp_avg_sq": torch.rand(s, generator=gen)}
        for i, s in enumerate(shapes)
    }
    master = {i: torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    builder = PortableStateBuilder(layout, shapes)
    for rank in range(world):
        spans = _spans(layout, rank, chunk)
        views = shard_state_from_portable(layout, rank, spans, state, {"exp_avg", "exp_avg_sq"})
        shard = torch.empty(layout.shard_size)
        master_shard_from_portable(layout, rank, master, shard)
        for view, span in zip(range(len(spans)), spans):  # element-wise state lies where the view lies
            if kind == "flat" and view in views:
                assert views[view]["exp_avg"].shape == (span.length,)
        builder.add_rank(rank, spans, views, shard)
    non_empty = {i for i, s in enumerate(shapes) if s.numel() > 0}
    assert set(builder.state) == non_empty
    for i in non_empty:
        assert torch.equal(builder.master[i], master[i])
        for key, value in state[i].items():
            assert torch.equal(builder.state[i][key], value), (i, key)
