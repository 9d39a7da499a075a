"""Checkpoints: exact resume at the same world size, re-sharding through the portable form, and
clear errors for checkpoints that do not fit.

The uninterrupted run is the reference for exact resume (the same code, but no save/load in
between: any state the checkpoint forgot shows up as a bit difference). The portable form is held
against the plain single-process optimizer of ``reference.simulate``.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workloads
from acco import AccoOptimizer, CheckpointError
from reference import blocking_plan, simulate


def _build(spec, mode, partition="auto", seed=0, blocking=True, nonfinite="raise", engine="auto", estimate="plain"):
    model = workloads.make_model(workloads.model_kind_for(spec), seed=seed)
    opt = AccoOptimizer(
        workloads.acco_params(spec, model), mode=mode, partition=partition, blocking=blocking, nonfinite=nonfinite, engine=engine,
        estimate=estimate,
    )
    # The learning rate changes every call, so a resume that lost the schedule's state shows.
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda call: 1.0 / (1.0 + 0.1 * call))
    return model, opt, scheduler


def _call(model, opt, scheduler, rank, call):
    workloads.loss_fn(model, *workloads.batch(rank, call)).backward()
    opt.step()
    scheduler.step()
    opt.zero_grad()


def _roundtrip(obj):
    """Through bytes, as a file would be; weights_only proves the format holds plain types only."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def resume_run(rank, world_size, spec, mode, partition, num_calls, save_at, engine="auto", estimate="plain", order="model first"):
    """Params held after every call, uninterrupted and with a save/load (into fresh objects) at ``save_at``."""
    model, opt, scheduler = _build(spec, mode, partition, engine=engine, estimate=estimate)
    straight = []
    for call in range(num_calls):
        _call(model, opt, scheduler, rank, call)
        straight.append(_params(model))
    opt.finish()
    straight.append(_params(model))
    opt.close()

    model, opt, scheduler = _build(spec, mode, partition, engine=engine, estimate=estimate)
    resumed = []
    for call in range(save_at):
        _call(model, opt, scheduler, rank, call)
        resumed.append(_params(model))
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()})
    opt.close()
    model, opt, scheduler = _build(spec, mode, partition, seed=1, engine=engine, estimate=estimate)  # other weights: the load must fix them
    if order == "model first":  # as documented
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    else:  # the other order: the model's saved weights (an estimate, mid-update) land after the optimizer's state
        opt.load_state_dict(saved["opt"])
        model.load_state_dict(saved["model"])
    scheduler.load_state_dict(saved["sched"])
    for call in range(save_at, num_calls):
        _call(model, opt, scheduler, rank, call)
        resumed.append(_params(model))
    opt.finish()
    resumed.append(_params(model))
    counters = (opt.num_updates, opt.rounds_launched)
    opt.close()
    differing = [
        i for i, (a, b) in enumerate(zip(straight, resumed)) if not all(torch.equal(x, y) for x, y in zip(a, b))
    ]
    return differing, counters, len(straight)


CASES = [
    ("adamw", "acco", "flat"),
    ("adamw", "dpu", "flat"),
    ("adamw", "sync", "flat"),
    ("adamw", "acco", "param"),
    ("adamw", "dpu", "param"),
    ("adamw", "sync", "param"),
    ("nadam", "acco", "flat"),
    ("sgd", "dpu", "flat"),
    ("adafactor", "acco", "param"),
    ("muon", "acco", "param"),
    # per-group optimizers: matrices whole (param segment), biases flat (flat segment)
    ("muon+adamw", "acco", "auto"),
    ("muon+adamw", "dpu", "auto"),
    ("muon+adamw", "sync", "auto"),
    ("adafactor+adamw", "acco", "auto"),
]


@pytest.mark.parametrize("save_at", [4, 5])
@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_resume_in_either_order_is_bit_identical(run_distributed, mode, save_at):
    """Issue 23, item 5: ``opt.load_state_dict`` first, then ``model.load_state_dict`` (mid-update in mode acco:
    the model's saved weights are the estimate) resumes exactly as the documented order does."""
    for differing, _, count in run_distributed(2, resume_run, "adamw", mode, "flat", 9, save_at, order="optimizer first"):
        assert differing == [], f"params differ from the uninterrupted run after calls {differing} of {count}"


@pytest.mark.parametrize("spec,mode,partition", CASES)
def test_resume_is_bit_identical(run_distributed, spec, mode, partition):
    for differing, _, count in run_distributed(2, resume_run, spec, mode, partition, 9, 5):
        assert differing == [], f"params differ from the uninterrupted run after calls {differing} of {count}"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["acco", "dpu", "sync"]),
    world_size=st.sampled_from([1, 3]),
    num_calls=st.integers(1, 8),
    data=st.data(),
)
def test_resume_anywhere_in_the_schedule(run_distributed, mode, world_size, num_calls, data):
    save_at = data.draw(st.integers(0, num_calls), label="save_at")
    for differing, _, _ in run_distributed(world_size, resume_run, "adamw", mode, "auto", num_calls, save_at):
        assert differing == []


def nonblocking_resume(rank, world_size):
    model, opt, scheduler = _build("adamw", "acco", blocking=False)
    for call in range(5):
        _call(model, opt, scheduler, rank, call)
    saved = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})  # collective here: finishes first
    at_save = _params(model)
    opt.close()
    model, opt, scheduler = _build("adamw", "acco", blocking=False, seed=1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    restored = _params(model)
    for call in range(5, 9):
        _call(model, opt, scheduler, rank, call)
    opt.finish()
    final = _params(model)
    opt.close()
    return at_save, restored, final


def test_nonblocking_state_dict_finishes_first_and_resumes(run_distributed):
    results = run_distributed(2, nonblocking_resume)
    for at_save, restored, final in results:
        assert all(torch.equal(a, b) for a, b in zip(at_save, restored))
        assert all(torch.equal(a, b) for a, b in zip(final, results[0][2]))  # every rank agrees


# ---------------------------------------------------------------------- portable form, re-sharding
def consolidate_after(rank, world_size, spec, partition, num_calls, portable=None, to=0):
    """Train (or load a portable checkpoint), then consolidate on rank ``to``."""
    model, opt, scheduler = _build(spec, "acco", partition, seed=1 if portable else 0)
    if portable is not None:
        opt.load_state_dict(_roundtrip(portable))
    for call in range(num_calls):
        _call(model, opt, scheduler, rank, call)
    state = opt.consolidated_state_dict(to=to)
    params = _params(model)
    updates = opt.num_updates
    opt.close()
    return (None if state is None else _roundtrip(state)), params, updates


def _assert_state_equal(a, b, exact=True):
    """``a`` against ``b``, which must come from an independent source: never pass ``a``'s own parts in ``b``."""
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for index in a["state"]:
        assert sorted(a["state"][index]) == sorted(b["state"][index])
        for key, value in a["state"][index].items():
            if exact:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][index][key])), (index, key)
            else:
                torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(b["state"][index][key]), rtol=1e-9, atol=1e-12)


def _plain_param_groups(spec, num_calls):
    """The param groups a plain torch optimizer holds after the same schedule: ``_build``'s LambdaLR
    stepped once per call (lr and initial_lr), every other setting from the optimizer itself."""
    model = workloads.make_model(workloads.model_kind_for(spec))
    plain = workloads.make_optimizer(spec, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(plain, lambda call: 1.0 / (1.0 + 0.1 * call))
    for _ in range(num_calls):
        plain.step()  # no gradients: changes nothing, but keeps the scheduler's order check quiet
        scheduler.step()
    assert not plain.state
    return plain.state_dict()["param_groups"]


@pytest.mark.parametrize(
    "spec,partition", [("adamw", "flat"), ("nadam", "flat"), ("adafactor", "param"), ("adamw", "param"), ("adafactor+adamw", "auto")]
)
def test_portable_state_matches_the_plain_optimizer(run_distributed, spec, partition):
    num_calls = 6
    results = run_distributed(3, consolidate_after, spec, partition, num_calls, to=1)
    assert results[0][0] is None and results[2][0] is None
    state = results[1][0]
    reference = simulate(
        "acco", blocking_plan("acco", 3, num_calls), workloads.model_kind_for(spec), spec,
        lr_at_round=lambda k: 1.0 / (1.0 + 0.1 * k),  # the LambdaLR of _build: round k is launched at call k
    )
    _assert_state_equal(state, {"state": reference.optimizer_state["state"], "param_groups": _plain_param_groups(spec, num_calls)}, exact=False)
    model = workloads.make_model(workloads.model_kind_for(spec))
    position = {id(p): i for i, p in enumerate(model.parameters())}
    in_group_order = [position[id(p)] for g in workloads.param_groups(model, spec) for p in g["params"]]
    for index, master in state["acco"]["master"].items():
        torch.testing.assert_close(master, reference.final[in_group_order[index]], rtol=1e-9, atol=1e-12)
    assert state["acco"]["num_updates"] == reference.num_updates


@pytest.mark.parametrize("spec,partition", [("adamw", "flat"), ("adafactor", "param"), ("muon+adamw", "auto")])
def test_reshard_4_to_2_to_3_keeps_committed_state_exactly(run_distributed, spec, partition):
    from_four = run_distributed(4, consolidate_after, spec, partition, 6)
    portable, params, updates = from_four[0]
    from_two = run_distributed(2, consolidate_after, spec, partition, 0, portable)
    again, params_two, updates_two = from_two[0]
    _assert_state_equal(portable, again)
    assert again["acco"]["master"].keys() == portable["acco"]["master"].keys()
    assert all(torch.equal(again["acco"]["master"][i], portable["acco"]["master"][i]) for i in portable["acco"]["master"])
    assert updates_two == updates
    for _, rank_params, _ in from_two:  # the load put the committed parameters into every model
        assert all(torch.equal(a, b) for a, b in zip(rank_params, params))
    from_three = run_distributed(3, consolidate_after, spec, partition, 0, again)
    _assert_state_equal(portable, from_three[0][0])
    # and training goes on from there on the new world size
    trained = run_distributed(3, consolidate_after, spec, partition, 4, again)
    assert trained[0][2] == updates + 2
    assert all(torch.isfinite(p).all() for p in trained[0][1])


def load_into_plain(rank, world_size):
    state, params, _ = consolidate_after(rank, world_size, "adamw", "flat", 4)
    if state is None:
        return None
    model = workloads.make_model()
    plain = workloads.make_optimizer("adamw", model)
    plain.load_state_dict(state)
    return sorted(plain.state_dict()["state"]) == sorted(state["state"])


def test_portable_form_loads_into_a_plain_torch_optimizer(run_distributed):
    assert run_distributed(2, load_into_plain) == [True, None]


# ---------------------------------------------------------------------- checkpoints that do not fit
def save_per_rank(rank, world_size, spec="adamw", mode="acco", calls=3):
    model, opt, scheduler = _build(spec, mode)
    for call in range(calls):
        _call(model, opt, scheduler, rank, call)
    state = _roundtrip(opt.state_dict())
    opt.close()
    return state


def load_expecting_error(rank, world_size, states, spec="adamw", mode="acco", calls_before=0):
    """Load ``states[rank]``; returns the error message. Also checks that nothing changed."""
    model, opt, scheduler = _build(spec, mode)
    for call in range(calls_before):
        _call(model, opt, scheduler, rank, call)
    if opt.round_in_flight:
        opt._pipeline.peek()  # the round in flight may still be stepping the master: compare after it
    before_rounds = opt.rounds_launched
    before_master = opt._shard.master.clone()
    try:
        opt.load_state_dict(states[rank])
    except CheckpointError as error:
        message = str(error)
    else:
        message = None
    unchanged = torch.equal(opt._shard.master, before_master) and opt.rounds_launched == before_rounds
    for call in range(calls_before, calls_before + 2):  # still usable afterwards
        _call(model, opt, scheduler, rank, call)
    opt.finish()
    opt.close()
    return message, unchanged


def _expect(results, pattern):
    import re

    for rank, (message, unchanged) in enumerate(results):
        assert message is not None, f"rank {rank} raised nothing"
        assert re.search(pattern, message), f"rank {rank}: {message}"
        assert unchanged


def test_per_rank_checkpoint_refuses_another_world_size(run_distributed):
    states = run_distributed(2, save_per_rank)
    _expect(run_distributed(3, load_expecting_error, states + states[:1]), "saved by 2 ranks, this run has 3.*consolidated_state_dict")


def test_each_rank_loads_its_own_checkpoint(run_distributed):
    states = run_distributed(2, save_per_rank)
    _expect(run_distributed(2, load_expecting_error, states[::-1]), r"rank \d.s per-rank checkpoint, loaded on rank \d: each rank loads its own")


def test_other_optimizer_class_is_refused(run_distributed):
    states = run_distributed(2, save_per_rank, "sgd")
    _expect(run_distributed(2, load_expecting_error, states), "optimizer_class differs.*SGD.*AdamW")


def test_other_model_is_refused(run_distributed):
    states = run_distributed(2, save_per_rank, "adamw")
    for state in states:
        state["acco"]["param_shapes"][0] = [7, 5]
    _expect(run_distributed(2, load_expecting_error, states), r"parameter 0 has shape \(7, 5\), this model \(6, 5\)")


def test_other_mode_is_refused(run_distributed):
    states = run_distributed(2, save_per_rank, "adamw", "dpu")
    _expect(run_distributed(2, load_expecting_error, states), "mode differs")


def test_checkpoints_from_different_points_are_refused(run_distributed):
    early = run_distributed(2, save_per_rank, "adamw", "acco", 2)
    late = run_distributed(2, save_per_rank, "adamw", "acco", 5)
    _expect(run_distributed(2, load_expecting_error, [early[0], late[1]], calls_before=3), "different points")


@pytest.mark.parametrize(
    "corrupt,pattern",
    [
        (lambda s: s["acco"].__setitem__("master_shard", s["acco"]["master_shard"][:-1]), "master_shard has .* elements"),
        (lambda s: s["acco"].__setitem__("master_shard", s["acco"]["master_shard"] * float("nan")), "non-finite"),
        (lambda s: s.pop("acco"), "key 'acco' is missing"),
        (lambda s: s["acco"].__setitem__("version", 99), "version 99"),
        (lambda s: s["acco"].__setitem__("rounds_installed", -1), "rounds_installed"),
        (lambda s: s["acco"]["inner_state"][0].__setitem__("exp_avg", torch.zeros(3, dtype=torch.float64)), "exp_avg"),
        (lambda s: s["param_groups"].pop(), "1 param groups"),
    ],
)
def test_corrupted_checkpoint_fails_on_every_rank_and_changes_nothing(run_distributed, corrupt, pattern):
    states = run_distributed(2, save_per_rank)
    corrupt(states[1])  # only rank 1's file is damaged: rank 0 must raise too
    results = run_distributed(2, load_expecting_error, states, calls_before=2)
    _expect(results[1:], pattern)
    _expect(results[:1], "rank 1 cannot load")


def test_portable_checkpoint_for_another_model_is_refused(run_distributed):
    portable = run_distributed(2, consolidate_after, "adamw", "flat", 2)[0][0]
    portable["acco"]["master"][0] = portable["acco"]["master"][0][:2]
    _expect(run_distributed(2, load_expecting_error, [portable, portable]), r"master\[0\] has 10 elements, expected 30")


def other_weights_after_load(rank, world_size):
    """Optimizer state loaded, then *other* weights into the model (not the checkpoint's): they are
    adopted and trained from, as DDP + AdamW does with the same two loads (mode sync)."""
    from torch.nn.parallel import DistributedDataParallel

    model, opt, _ = _build("adamw", "sync", "flat")
    reference = workloads.make_model()
    ddp = DistributedDataParallel(reference)
    ref_opt = torch.optim.AdamW(workloads.param_groups(reference, "adamw"), lr=1e-2, betas=(0.9, 0.95))
    for call in range(3):
        for m, o in ((model, opt), (ddp, ref_opt)):
            workloads.loss_fn(m, *workloads.batch(rank, call)).backward()
            o.step()
            o.zero_grad()
    saved, ref_saved = _roundtrip(opt.state_dict()), _roundtrip(ref_opt.state_dict())
    opt.close()
    model, opt, _ = _build("adamw", "sync", "flat")
    other = workloads.make_model(seed=5).state_dict()
    opt.load_state_dict(saved)
    model.load_state_dict(other)
    ref_opt.load_state_dict(ref_saved)
    reference.load_state_dict(other)
    for call in range(3, 6):
        for m, o in ((model, opt), (ddp, ref_opt)):
            workloads.loss_fn(m, *workloads.batch(rank, call)).backward()
            o.step()
            o.zero_grad()
    opt.close()
    return max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters()))


def test_other_weights_loaded_after_the_optimizer_are_trained_from(run_distributed):
    assert all(d <= 1e-12 for d in run_distributed(2, other_weights_after_load)), "acco did not train from the loaded weights"


# ---------------------------------------------------------------------- no tensor through an object collective
def _tensors_in(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors_in(v) for v in obj)
    return 0


def consolidate_watching_object_collectives(rank, world_size, spec, partition):
    """Object collectives pickle: a CUDA tensor in one is unpickled onto the sender's GPU index on every
    receiver. Count the tensors that ``consolidated_state_dict`` hands to them (none may be), and where
    the result's tensors live (host memory)."""
    model, opt, scheduler = _build(spec, "acco", partition)
    for call in range(5):
        _call(model, opt, scheduler, rank, call)
    carried = []
    for name in ("broadcast_object", "all_gather_object"):
        plain = getattr(opt._comm, name)

        def watched(obj, *args, _plain=plain):
            carried.append(_tensors_in(obj))
            return _plain(obj, *args)

        setattr(opt._comm, name, watched)
    saved = opt.consolidated_state_dict(to=world_size - 1)
    devices = set()
    if saved is not None:
        devices = {t.device.type for t in _all_tensors(saved)}
    opt.close()
    return sum(carried), len(carried), devices, None if saved is None else _roundtrip(saved)


def _all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _all_tensors(value)


@pytest.mark.parametrize("spec,partition", [("adamw", "flat"), ("muon+adamw", "auto")])
def test_consolidation_sends_no_tensor_through_an_object_collective(run_distributed, spec, partition):
    """(Its values are held to the plain optimizer by test_portable_state_matches_the_plain_optimizer.)"""
    results = run_distributed(3, consolidate_watching_object_collectives, spec, partition)
    for rank, (tensors, calls, devices, _) in enumerate(results):
        assert calls > 0 and tensors == 0, (rank, tensors, calls)
    assert results[2][2] == {"cpu"} and results[2][3]["acco"]["master"]


def send_pieces(rank, world_size, piece_elements):
    import acco.transfer as transfer
    from acco.comm import make_communicator

    transfer.PIECE_ELEMENTS = piece_elements
    comm = make_communicator(None)
    try:
        payload = None
        if rank == 1:
            torch.manual_seed(5)
            payload = {"big": torch.randn(11, 3), "scalar": torch.tensor(7.0), "empty": torch.zeros(0),
                       "nested": [torch.arange(5, dtype=torch.int64), "text", 3], "ints": (torch.ones(2, dtype=torch.bfloat16),)}
        return transfer.send_to(comm, payload, 1, 2, comm.device)
    finally:
        comm.close()


def test_send_to_moves_a_payload_in_pieces_to_one_rank(run_distributed):
    results = run_distributed(3, send_pieces, 4)
    assert results[0] is None and results[1] is None
    torch.manual_seed(5)
    big = torch.randn(11, 3)
    got = results[2]
    assert torch.equal(got["big"], big) and got["scalar"].shape == () and float(got["scalar"]) == 7.0
    assert got["empty"].numel() == 0 and got["nested"][1:] == ["text", 3]
    assert torch.equal(got["nested"][0], torch.arange(5)) and got["ints"][0].dtype == torch.bfloat16


def test_the_model_fingerprint_is_exact_and_order_free():
    """Integer sums: the same for any piece size (reduction order) and any device; one bit changes them."""
    import acco.buffers as buffers
    from acco.buffers import Lanes, model_fingerprint

    torch.manual_seed(0)
    lanes = Lanes([torch.randn(3000), torch.randn(1000, dtype=torch.float64).to(torch.bfloat16)], [0, 3000])
    whole = model_fingerprint(lanes)
    old = buffers._FINGERPRINT_CHUNK
    try:
        buffers._FINGERPRINT_CHUNK = 7
        assert model_fingerprint(lanes) == whole
    finally:
        buffers._FINGERPRINT_CHUNK = old
    lanes.tensors[1][5] = torch.nextafter(lanes.tensors[1][5], torch.tensor(1e9, dtype=torch.bfloat16))
    assert model_fingerprint(lanes) != whole
    assert all(isinstance(v, int) for v in whole)
