"""Where only the user's intent differs from DDP, AccoOptimizer warns once through the ``acco`` logger
(issue 23): a leftover local ``clip_grad_norm_`` (item 4), no ``finish()`` before the end (item 6). Each warning must fire where the trap is
and stay silent in the ordinary loops around it."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import acco.handover
import acco.pipeline
import workloads
from acco import AccoOptimizer


@pytest.fixture
def fresh_warnings(caplog):
    """Each warning is said once per process: forget that it was, before and after the test."""
    acco.handover._warned_changed_in_place = acco.pipeline._warned_uncommitted = False
    with caplog.at_level(logging.WARNING, logger="acco"):
        yield caplog
    acco.handover._warned_changed_in_place = acco.pipeline._warned_uncommitted = False


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
        if variant.startswith("model.zero_grad then backward"):
            model.zero_grad()
            workloads.loss_fn(model, x, y).backward()
        if variant == "model.zero_grad then backward, opt.zero_grad(False)":
            opt.zero_grad(set_to_none=False)  # the optimizer's own in-place zeroing of the script's own gradients
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


@pytest.mark.parametrize(
    "variant",
    ["plain", "accumulate", "model.zero_grad then backward", "model.zero_grad then backward, opt.zero_grad(False)",
     "scaler", "scaler + unscale"],
)
def test_ordinary_loops_do_not_warn(fresh_warnings, variant):
    loop(variant)
    assert clip_messages(fresh_warnings) == []


# ---------------------------------------------------------------------- no finish() before the end (item 6)


def finish_messages(caplog):
    return [r.getMessage() for r in caplog.records if "no round has committed" in r.getMessage()]


def stepped(mode, calls):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode)
    for call in range(calls):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("how", ["close()", "garbage collection"])
@pytest.mark.parametrize("mode,calls", [("acco", 3), ("acco", 4), ("dpu", 2)])
def test_releasing_uncommitted_gradients_warns_once_naming_finish(fresh_warnings, how, mode, calls):
    for _ in range(2):  # once per process
        model, opt = stepped(mode, calls)
        if how == "close()":
            opt.close()
        else:
            del opt
            gc.collect()
    messages = finish_messages(fresh_warnings)
    assert len(messages) == 1, messages
    assert "opt.finish()" in messages[0] and how.split()[0] in messages[0]


@pytest.mark.parametrize("mode,finish", [("sync", False), ("acco", True), ("dpu", True)])
def test_no_warning_when_everything_was_committed(fresh_warnings, mode, finish):
    model, opt = stepped(mode, 3)
    if finish:
        opt.finish()
    opt.close()
    del opt
    gc.collect()
    assert finish_messages(fresh_warnings) == []


def test_exiting_without_finish_warns_at_interpreter_exit(tmp_path):
    script = tmp_path / "no_finish.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(workloads.__file__.rsplit('/', 1)[0])!r})
        import workloads
        from acco import AccoOptimizer
        logging.basicConfig(level=logging.WARNING)
        model = workloads.make_model()
        opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
        for call in range(3):
            workloads.loss_fn(model, *workloads.batch(0, call)).backward()
            opt.step()
            opt.zero_grad()
        print("trained")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr
    assert "no round has committed" in done.stderr and "opt.finish()" in done.stderr, done.stderr


# ---------------------------------------------------------------------- item 4 on 2 gloo ranks, against DDP
def leftover_clip_against_ddp(rank, world_size):
    """DDP + AdamW + clip_grad_norm_ (global: DDP's gradients are averaged) against acco with the same
    leftover clip (local) and acco with max_grad_norm=: the first differs and warns on every rank, the
    second matches DDP and stays silent."""
    from torch.nn.parallel import DistributedDataParallel

    acco.handover._warned_changed_in_place = False
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("acco").addHandler(handler)
    try:
        reference = workloads.make_model()
        ddp = DistributedDataParallel(reference)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
        leftover, by_option = workloads.make_model(), workloads.make_model()
        opt_leftover = AccoOptimizer(torch.optim.AdamW(leftover.parameters(), lr=1e-2), mode="sync")
        opt_option = AccoOptimizer(torch.optim.AdamW(by_option.parameters(), lr=1e-2), mode="sync", max_grad_norm=0.05)
        for call in range(6):
            x, y = workloads.batch(rank, call)
            for model, opt, clip in ((ddp, ref_opt, True), (leftover, opt_leftover, True), (by_option, opt_option, False)):
                workloads.loss_fn(model, x, y).backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                opt.step()
                opt.zero_grad()
        opt_leftover.close()
        opt_option.close()
    finally:
        logging.getLogger("acco").removeHandler(handler)
    difference = lambda m: max(float((p - q).abs().max()) for p, q in zip(m.parameters(), reference.parameters()))  # noqa: E731
    warned = [r.getMessage() for r in records if "changed in place" in r.getMessage()]
    return {"leftover": difference(leftover), "option": difference(by_option), "warned": warned}


def test_a_leftover_local_clip_warns_on_every_rank_and_max_grad_norm_matches_ddp(run_distributed):
    for rank, result in enumerate(run_distributed(2, leftover_clip_against_ddp, timeout=90)):
        assert result["option"] <= 1e-12, result  # max_grad_norm= is DDP + clip_grad_norm_
        assert result["leftover"] > 1e-6, result  # the local clip is not: hence the warning
        assert len(result["warned"]) == 1 and "max_grad_norm=" in result["warned"][0], (rank, result)
