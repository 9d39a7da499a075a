"""Hypothesis drives one optimizer through random sequences of calls, zero_grad variants (after the
step, or a backward thrown away before the real one), mid-training finish() and exact evaluations; the
reference must explain every parameter value the model held, what every evaluation saw and the final
result (single process, so that it runs fast)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workloads
from acco import AccoOptimizer
from reference import Contribution, simulate

ACTIONS = st.sampled_from(
    ["opt-none", "opt-zero", "model-none", "model-zero", "drop-model-zero", "drop-grad-none", "drop-opt-zero", "finish", "evaluate"]
)
DROPS = {  # a backward the script throws away before the real one, and how
    "drop-model-zero": lambda model, opt: model.zero_grad(),
    "drop-grad-none": lambda model, opt: [setattr(p, "grad", None) for p in model.parameters()],
    "drop-opt-zero": lambda model, opt: opt.zero_grad(),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode_and_blocking=st.sampled_from([("acco", True), ("acco", False), ("dpu", True), ("dpu", False), ("sync", True)]),
    actions=st.lists(ACTIONS, min_size=1, max_size=14),
)
def test_random_sequences_match_the_reference(mode_and_blocking, actions):
    check_random_sequence(mode_and_blocking, actions, "auto")


def check_random_sequence(mode_and_blocking, actions, engine):
    mode, blocking = mode_and_blocking
    model = workloads.make_model()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, blocking=blocking, engine=engine)
    records, held, seen, call = [], [], [], 0
    try:
        for action in actions:
            if action == "finish":
                opt.finish()
                assert not opt.round_in_flight and not opt.pending_micro_batches
                continue
            if action == "evaluate":
                with opt.committed_parameters():
                    inside = [p.detach().clone() for p in model.parameters()]
                seen.append((last_commit(mode, opt.rounds_launched), inside))
                continue
            at_round = opt.rounds_installed - 1
            held.append([p.detach().clone() for p in model.parameters()])
            if action in DROPS:
                workloads.loss_fn(model, *workloads.batch(0, call, seed=9)).backward()
                DROPS[action](model, opt)
            workloads.loss_fn(model, *workloads.batch(0, call)).backward()
            records.append((call, at_round, opt.rounds_launched))
            opt.step()
            {"opt-none": lambda: opt.zero_grad(True), "opt-zero": lambda: opt.zero_grad(False),
             "model-none": lambda: model.zero_grad(set_to_none=True),
             "model-zero": lambda: model.zero_grad(set_to_none=False)}.get(action, lambda: opt.zero_grad())()
            call += 1
        opt.finish()
        final = [p.detach().clone() for p in model.parameters()]
        plan = [[] for _ in range(opt.rounds_launched)]
        for c, at_round, feeds in records:
            plan[feeds].append(Contribution(0, c, at_round))
        reference = simulate(mode, plan, "mlp", "adamw")
        for (c, at_round, _), params in zip(records, held):
            expected = reference.outputs[at_round] if at_round >= 0 else reference_initial()
            for got, want in zip(params, expected):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"call {c}: {m}")
        for index, (commit, inside) in enumerate(seen):  # exact evaluation: the last committed parameters
            expected = reference.outputs[commit] if commit >= 0 else reference_initial()
            for got, want in zip(inside, expected):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"evaluation {index}: {m}")
        for got, want in zip(final, reference.final):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert opt.num_updates == reference.num_updates
    finally:
        opt.close()


def last_commit(mode: str, rounds_launched: int) -> int:
    """The last committed round among those launched (-1: none); committed_parameters() shows its output."""
    index = rounds_launched - 1
    if mode == "acco" and index >= 0 and index % 2 == 0:
        index -= 1
    return index


def reference_initial() -> list[torch.Tensor]:
    return [p.detach().clone() for p in workloads.make_model().parameters()]
