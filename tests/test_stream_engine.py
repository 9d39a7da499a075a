"""The stream engine's logic, on CPU: every decision of a round (counts, averaging, clipping, the
finiteness check, skipping an update) stays on the device as tensors, and the host reads each
round's outcome two step() calls after its launch. On CPU the engine runs each round at once in
the caller's thread; test_cuda.py adds the side stream and the events on a GPU.

Compared with the same single-process reference as the thread engine (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch

import workloads
from acco import AccoOptimizer, NonFiniteGradientError
from acco.layout import build_layout
from acco.shard import ShardOptimizer
from test_checkpoint import resume_run
from test_equivalence import MODES, assert_matches_reference, train_blocking
from reference import blocking_plan, simulate
from test_failures import assert_master_pieces_equal, assert_skipped_like_reference, nonfinite_raise, nonfinite_skip
from test_nonblocking import check_against_reference, train_uneven
from test_random_sequences import ACTIONS, check_random_sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

STREAM = "stream"


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_adamw_matches_reference(run_distributed, mode, world_size):
    results = run_distributed(world_size, train_blocking, mode, "adamw", 7, engine=STREAM)
    assert_matches_reference(results, mode, "adamw", world_size, 7)


@pytest.mark.parametrize("mode", MODES)
def test_clipping_on_the_device_matches_clip_grad_norm(run_distributed, mode):
    results = run_distributed(3, train_blocking, mode, "adamw", 6, max_grad_norm=0.05, engine=STREAM)
    assert_matches_reference(results, mode, "adamw", 3, 6, max_grad_norm=0.05)


@pytest.mark.parametrize("spec", ["sgd", "adafactor", "nadam", "rmsprop", "adamw-unfused", "adafactor+adamw", "adamw+sgd"])
def test_other_optimizers_match_reference(run_distributed, spec):
    results = run_distributed(2, train_blocking, "acco", spec, 6, engine=STREAM, chunk_elements=5)
    assert_matches_reference(results, "acco", spec, 2, 6)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_gradient_raises_two_calls_later_on_every_rank(run_distributed, mode):
    results = run_distributed(2, nonfinite_raise, mode, 1, 2, engine=STREAM)
    # Rounds 2 and 3 were enqueued before round 2's outcome reached the host: round 2 was masked
    # out on the device (and acco's commit round 3, which carries its sum), a good round 3 of
    # dpu/sync was applied. The master is exactly that: the reference with round 2 skipped.
    reference = simulate(mode, blocking_plan(mode, 2, 4, finish=False), "mlp", "adamw", poisoned=[(1, 2)])
    for error, master_finite, params_finite, _, master in results:
        assert error is not None
        call, message = error
        assert call == 4  # round 2 is read back at the step() that launches round 4, on every rank
        assert "NaN or Inf" in message and "not applied" in message
        assert master_finite and params_finite  # the update was masked out on the device
        assert_master_pieces_equal(master, reference.outputs[3], rtol=1e-9, atol=1e-12)
    assert results[0][3] == results[1][3]


@pytest.mark.parametrize("mode,bad_call", [("acco", 2), ("acco", 3), ("dpu", 2), ("sync", 2)])
def test_nonfinite_gradient_is_skipped_on_the_device(run_distributed, mode, bad_call):
    calls = 8
    thread = run_distributed(2, nonfinite_skip, mode, bad_call, calls)
    stream = run_distributed(2, nonfinite_skip, mode, bad_call, calls, engine=STREAM)
    assert_skipped_like_reference(stream, mode, bad_call, calls)
    for (updates, skipped, params, master_finite, _), (t_updates, t_skipped, t_params, _, _) in zip(stream, thread):
        assert (updates, skipped) == (t_updates, t_skipped)
        assert master_finite
        for got, want in zip(params, t_params):  # the same training, up to float rounding
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "spec,mode,partition",
    [("adamw", "acco", "flat"), ("adamw", "dpu", "param"), ("adamw", "sync", "flat"), ("nadam", "acco", "flat"), ("muon+adamw", "acco", "auto")],
)
def test_resume_is_bit_identical(run_distributed, spec, mode, partition):
    for differing, _, count in run_distributed(2, resume_run, spec, mode, partition, 9, 5, engine=STREAM):
        assert differing == [], f"params differ from the uninterrupted run after calls {differing} of {count}"


def test_non_blocking_finish_agreement(run_distributed):
    # On CPU the stream engine's rounds are finished when step() returns, so ranks never
    # accumulate; finish() must still agree and drain, and the average stays exact.
    results = run_distributed(2, train_uneven, "acco", [7, 5], 0, 0, engine=STREAM)
    check_against_reference(results, "acco")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode_and_blocking=st.sampled_from([("acco", True), ("acco", False), ("dpu", True), ("sync", True)]),
    actions=st.lists(ACTIONS, min_size=1, max_size=14),
)
def test_random_sequences_match_the_reference(mode_and_blocking, actions):
    check_random_sequence(mode_and_blocking, actions, STREAM)


def test_outcomes_are_read_two_calls_after_launch():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="dpu", engine=STREAM)
    assert opt.engine == "stream"
    for call in range(5):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        opt.step()
        opt.zero_grad()
        # installed rounds 0..call-1; those launched two calls ago or earlier are read
        assert [index for index, _ in opt._pipeline._unresolved] == list(range(max(0, call - 1), call))
    assert opt.num_updates == 4  # reading it reads every installed round
    assert not opt._pipeline._unresolved
    opt.finish()
    assert opt.num_updates == 5
    opt.close()


def test_engine_choice():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model))
    assert opt.engine == "thread"  # CPU default
    opt.close()
    with pytest.raises(ValueError, match="engine must be one of"):
        AccoOptimizer(workloads.make_optimizer("adamw", model), engine="cuda")


# ---------------------------------------------------------------------- the masked step, alone
def _shard(spec, seed=0):
    model = workloads.make_model(workloads.model_kind_for(spec), seed=seed)
    template = workloads.make_optimizer(spec, model)
    params = [p for g in template.param_groups for p in g["params"]]
    group_of = [i for i, g in enumerate(template.param_groups) for _ in g["params"]]
    kind = "param" if spec in ("adafactor", "muon") else "flat"
    layout = build_layout(kind, [p.numel() for p in params], group_of, 1)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in template.param_groups]
    return ShardOptimizer(type(template), template.defaults, hyper, layout, 0, flat, [p.shape for p in params])


def _state(shard):
    return [shard.master.clone()] + [
        v.clone() if isinstance(v, torch.Tensor) else v for s in shard.view_states().values() for v in s.values()
    ]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


@pytest.mark.parametrize("spec", ["adamw", "adamw-unfused", "nadam", "sgd", "adafactor", "rmsprop"])
def test_masked_step_keeps_or_undoes_the_update_exactly(spec):
    masked, plain = _shard(spec), _shard(spec)
    torch.manual_seed(1)
    for i in range(4):
        grad = torch.randn_like(masked.grad)
        masked.grad.copy_(grad)
        plain.grad.copy_(grad)
        before = _state(masked)
        if i == 2:  # undone: master and every state entry come back bit for bit
            # fused kernels skip by themselves (found_inf); the others select saved values back
            assert masked._skips_on_device() == (spec in ("adamw", "sgd"))
            assert masked._selectable_on_device(torch.tensor(False), masked._snapshot())
            masked.step(keep=torch.tensor(False))
            _same(_state(masked), before)
            continue
        masked.step(keep=torch.tensor(True))  # the first step creates the state: decided on the host
        plain.step()
        _same(_state(masked), _state(plain))


def test_first_step_undone_leaves_no_state():
    shard = _shard("adamw")
    shard.grad.normal_()
    master = shard.master.clone()
    shard.step(keep=torch.tensor(False))
    assert torch.equal(shard.master, master) and not shard.optimizer.state


def test_skipped_update_is_not_applied_on_the_device():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync", engine=STREAM, nonfinite="skip")
    for call in range(3):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        if call == 1:
            next(model.parameters()).grad.fill_(float("inf"))
        opt.step()
        opt.zero_grad()
    opt.finish()
    assert (opt.num_updates, opt.num_skipped_updates) == (2, 1)
    assert opt.last_round.updated and not opt.last_round.skipped
    # not applied at all (an AdamW step on a zeroed gradient would still move every parameter)
    reference = simulate("sync", blocking_plan("sync", 1, 3), "mlp", "adamw", poisoned=[(0, 1)])
    for got, want in zip(model.parameters(), reference.final):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)
    opt.close()


def test_error_is_raised_again_by_later_calls():
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync", engine=STREAM)
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    next(model.parameters()).grad.fill_(float("nan"))
    opt.step()
    with pytest.raises(NonFiniteGradientError):
        opt.finish()
    with pytest.raises(RuntimeError, match="failed earlier"):
        opt.step()
    opt.close()


@pytest.mark.parametrize("spec,state_backup", [("adamw", False), ("nadam", True)])
def test_masked_commits_back_up_state_only_without_a_fused_kernel(spec, state_backup):
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer(spec, model), mode="sync", engine=STREAM)
    for call in range(3):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    master_backup = opt.memory_bytes()["master_shard"]
    assert (opt.memory_bytes()["estimate_backup"] > master_backup) == state_backup
    opt.close()


def test_last_round_after_finish_is_the_same_on_both_engines():
    """finish() reads every outcome before it gives back its empty round: last_round is the last real one."""
    seen = {}
    for engine in ("thread", "stream"):
        model = workloads.make_model()
        opt = AccoOptimizer(workloads.make_optimizer("sgd", model), mode="dpu", engine=engine, max_grad_norm=1e9)
        for call in range(4):
            workloads.loss_fn(model, *workloads.batch(0, call)).backward()
            opt.step()
            opt.zero_grad()
        opt.finish()
        seen[engine] = (opt.last_round.index, opt.last_round.grad_norm, opt.rounds_launched)
        opt.close()
    assert seen["thread"] == seen["stream"] and seen["thread"][0] == 3, seen


def test_a_checkpoint_of_a_round_that_gathered_nothing_resumes_on_either_engine():
    """Saved (thread engine) while a round that updated and gathered nothing is in flight, loaded on the stream
    engine: the model keeps the committed parameters (the checkpoint holds them, not the gradient buffer)."""
    import copy

    def build(engine):
        model = workloads.make_model()
        return model, AccoOptimizer(workloads.make_optimizer("sgd", model), mode="dpu", engine=engine)

    model, opt = build("thread")
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    opt.step()
    opt.zero_grad()
    opt.step()  # every rank skipped this batch: no gradient anywhere
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    opt.finish()
    committed = [p.detach().clone() for p in model.parameters()]
    opt.close()
    for engine in ("thread", "stream"):
        model, opt = build(engine)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        workloads.loss_fn(model, *workloads.batch(0, 1)).backward()
        opt.step()  # installs the regathered round: the model must hold what it held when saved
        assert all(torch.equal(a, p) for a, p in zip(committed, model.parameters())), engine
        opt.close()
