"""Memory a round allocates and frees again: the peak over a round must stay within what
``memory_bytes()`` reports (``round_transient``), so that a shard-sized temporary fails here
instead of on an 80 GB card. On CPU the allocator's events come from the profiler
(``benchmarks/peak.py``); ``engine="stream"`` runs each round inline with the device-side
decisions that a GPU runs. test_cuda.py measures the same with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import workloads
from acco import AccoOptimizer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.peak import AllocationPeak  # noqa: E402

# Small allocations a round makes besides its buffers: the agreement vector, outcome flags,
# 0-dim decisions and per-view selections (a few hundred bytes each).
SMALL = 16 * 1024


def wide_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 64)).to(dtype)  # 33,088 parameters


def _call(model, opt, call, measure):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(call))
    (model(x).square().mean()).backward()
    with AllocationPeak("cpu") as peak:
        opt.step()
        opt.zero_grad()
    measure.append((peak.peak_bytes, peak.end_bytes))


@pytest.mark.parametrize("mode,correction", [("acco", "none"), ("dpu", "none"), ("sync", "none"), ("acco", "secant")])
@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_a_round_allocates_no_more_than_memory_bytes_reports(monkeypatch, mode, correction, max_grad_norm):
    """The norm / finiteness pass of a device-decided round took a float64 copy of the whole shard
    (8 bytes per element: 7 GB per rank at 7B / 8 ranks); it now goes piece by piece. A small piece
    size makes a whole-shard copy stand out on a small model. So does ``correction="secant"``'s error e."""
    import acco.round
    import acco.secant

    monkeypatch.setattr(acco.round, "_NORM_CHUNK", 2048)
    monkeypatch.setattr(acco.secant, "_PIECE", 2048)
    model = wide_model()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode=mode, engine="stream", max_grad_norm=max_grad_norm,
                        correction=correction)
    warm, steady = [], []
    for call in range(4):  # state, estimate shadow and carry are created by these rounds
        _call(model, opt, call, warm)
    for call in range(4, 10):
        _call(model, opt, call, steady)
    sizes = opt.memory_bytes()
    shard_bytes = 4 * opt.layout.shard_size
    assert sizes["round_transient"] < shard_bytes / 2, sizes  # chunk-sized, not shard-sized (8 bytes per element)
    for peak, end in steady:
        assert end <= SMALL, steady  # no buffer is added in the steady state
        assert peak <= sizes["round_transient"] + SMALL, (peak, sizes["round_transient"], steady)
    assert sizes["peak"] == sizes["total"] + sizes["round_transient"]
    opt.close()


def test_the_float64_norm_is_taken_piece_by_piece(monkeypatch):
    import acco.round
    from acco.round import nonfinite_and_square, norm_transient_bytes

    monkeypatch.setattr(acco.round, "_NORM_CHUNK", 4096)
    grad = torch.randn(100_000)
    grad[77_777] = 3e38  # finite: its square overflows fp32, never float64
    with AllocationPeak("cpu") as peak:
        nonfinite, square = nonfinite_and_square(grad, on_host=False)
    assert peak.peak_bytes <= norm_transient_bytes(grad.numel(), on_host=False) < 8 * grad.numel() / 10
    assert float(nonfinite) == 0.0
    assert float(square) == pytest.approx(float(grad.double().square().sum()), rel=1e-12)
    grad[5] = float("nan")
    assert float(nonfinite_and_square(grad, on_host=False)[0]) == 1.0


@pytest.mark.parametrize("mode,engine,backup", [("sync", "thread", False), ("dpu", "thread", False), ("acco", "thread", True),
                                                ("sync", "stream", False), ("acco", "stream", True)])
def test_scratch_copies_exist_only_where_a_round_uses_them(mode, engine, backup):
    """The estimate's scratch copy of master and state ((1 + k)·S·m, in the README's table) is
    allocated by the first round that needs it: an estimate, or a device-decided skip of an optimizer
    without a fused kernel. Mode sync and dpu with fused AdamW never need it (it used to be allocated
    at construction in every mode, and reported as ``estimate_backup``)."""
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, engine=engine)
    for call in range(4):
        workloads.loss_fn(model, *workloads.batch(0, call, torch.float32)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    sizes, s = opt.memory_bytes(), opt.layout.shard_size
    if backup:
        assert sizes["estimate_backup"] == 4 * s + sizes["optimizer_state"], sizes
    elif engine == "thread":
        assert sizes["estimate_backup"] == 0, sizes
    else:  # the first commit, which creates the state, is decided with a snapshot of the master
        assert sizes["estimate_backup"] == 4 * s, sizes
    opt.close()
