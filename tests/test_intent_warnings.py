"""Where only the user's intent differs from DDP, AccoOptimizer warns once through the ``acco`` logger
(issue 23): a leftover local ``clip_grad_norm_`` (item 4). Each warning must fire where the trap is
and stay silent in the ordinary loops around it."""

from __future__ import annotations

import logging

import pytest
import torch

import acco.handover
import workloads
from acco import AccoOptimizer


@pytest.fixture
def fresh_warnings(caplog):
    acco.handover._warned_changed_in_place = False
    with caplog.at_level(logging.WARNING, logger="acco"):
        yield caplog
    acco.handover._warned_changed_in_place = False


def clip_messages(caplog):
    return [r.getMessage() for r in caplog.records if "changed in place" in r.getMessage()]


def loop(variant, calls=4):
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mode="sync")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if "scaler" in variant else None
    for call in range(calls):
        x, y = workloads.batch(0, call, torch.float32)
        loss = workloads.loss_fn(model, x, y)
        (scaler.scale(loss) if scaler else loss).backward()
        if variant == "accumulate":
            workloads.loss_fn(model, *workloads.batch(0, call + 100, torch.float32)).backward()
        if variant == "model.zero_grad then backward":
            model.zero_grad()
            workloads.loss_fn(model, x, y).backward()
        if "unscale" in variant:
            scaler.unscale_(opt)
        if "clip" in variant:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        if variant == "scale by hand":
            for p in model.parameters():
                p.grad.mul_(0.5)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    opt.close()


@pytest.mark.parametrize("variant", ["clip", "scale by hand", "scaler + unscale + clip", "model.zero_grad then backward + clip"])
def test_gradients_changed_after_backward_warn_once_naming_max_grad_norm(fresh_warnings, variant):
    loop(variant)
    messages = clip_messages(fresh_warnings)
    assert len(messages) == 1, messages
    assert "max_grad_norm=" in messages[0] and "clip_grad_norm_" in messages[0]


@pytest.mark.parametrize("variant", ["plain", "accumulate", "model.zero_grad then backward", "scaler", "scaler + unscale"])
def test_ordinary_loops_do_not_warn(fresh_warnings, variant):
    loop(variant)
    assert clip_messages(fresh_warnings) == []
