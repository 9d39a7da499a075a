"""CUDA parameters (skipped without a GPU; CI has none). The rounds run on the thread engine here;
the CUDA side-stream engine is a separate piece of work."""

from __future__ import annotations

import pytest
import torch

import workloads
from acco import AccoOptimizer
from test_equivalence import assert_matches_reference, train_blocking

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MODES = ["acco", "dpu", "sync"]


@pytest.mark.parametrize("mode", MODES)
def test_single_worker_on_cuda_matches_reference(mode):
    result = train_blocking(0, 1, mode, "adamw", 7, device="cuda")
    assert_matches_reference([result], mode, "adamw", 1, 7, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_nccl_world_of_one_matches_reference(run_distributed, mode):
    results = run_distributed(1, train_blocking, mode, "adamw", 6, device="cuda", backend="nccl")
    assert_matches_reference(results, mode, "adamw", 1, 6, rtol=1e-7, atol=1e-10)


def test_bf16_cuda_parameters_train():
    model = workloads.make_model(dtype=torch.bfloat16).cuda()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mode="acco")
    losses = []
    for call in range(40):
        x, y = workloads.batch(0, call % 4, torch.bfloat16)
        loss = workloads.loss_fn(model, x.cuda(), y.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    opt.finish()
    assert opt._shard.master.dtype == torch.float32 and opt._shard.master.is_cuda
    assert sum(losses[-4:]) < sum(losses[:4])
    opt.close()
