"""mode='sync' is plain ZeRO-1: it must match DistributedDataParallel + torch's
ZeroRedundancyOptimizer on the same model and data, to float tolerance."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer


def train_pair(rank, world_size, spec, num_calls, max_grad_norm):
    peer_model = workloads.make_model()
    ddp = DistributedDataParallel(peer_model)
    template = workloads.make_optimizer(spec, peer_model)
    groups = template.param_groups
    accepted = set(inspect.signature(type(template).__init__).parameters) - {"self", "params"}
    peer = ZeroRedundancyOptimizer(
        groups[0]["params"], optimizer_class=type(template), **{k: v for k, v in groups[0].items() if k in accepted}
    )
    for group in groups[1:]:
        peer.add_param_group(dict(group))

    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer(spec, model), mode="sync", max_grad_norm=max_grad_norm)
    for call in range(num_calls):
        x, y = workloads.batch(rank, call)
        workloads.loss_fn(ddp, x, y).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_grad_norm)  # DDP grads are already averaged
        peer.step()
        peer.zero_grad()
        workloads.loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    result = [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in peer_model.parameters()], opt.num_updates
    opt.close()
    return result


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("spec,max_grad_norm", [("adamw", None), ("sgd", None), ("adamw", 0.05)])
def test_sync_matches_ddp_plus_zero_redundancy_optimizer(run_distributed, world_size, spec, max_grad_norm):
    num_calls = 6
    for rank, (ours, peer, updates) in enumerate(run_distributed(world_size, train_pair, spec, num_calls, max_grad_norm)):
        assert updates == num_calls
        for a, b in zip(ours, peer):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"rank {rank}: {m}")
        # and it actually trained
        assert any(not torch.equal(a, b) for a, b in zip(ours, workloads.make_model().parameters()))
