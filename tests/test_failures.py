"""Failures end in clear errors on every rank, never in a hang or a corrupted model: a peer that
stops calling step() or dies, a non-finite gradient, an exception inside the background round,
and interpreter exit with a round in flight. Hangs are caught by the pools' hard timeouts; no
test measures time."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import workloads
from acco import AccoOptimizer, CollectiveError, NonFiniteGradientError
from reference import blocking_plan, simulate

ROOT = Path(__file__).resolve().parents[1]


def _build(mode="acco", device="cpu", **kwargs):
    model = workloads.make_model().to(device)
    return model, AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, **kwargs)


def _backward(model, rank, call, poison=False):
    device = next(model.parameters()).device
    workloads.loss_fn(model, *(t.to(device) for t in workloads.batch(rank, call))).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("nan")


# ---------------------------------------------------------------------- non-finite gradients
# AdamW with weight decay (workloads' "adamw"): an update applied with a zero (or NaN-zeroed)
# gradient would still move every parameter (decay, decaying moments, bias correction), so the
# tests below tell "skipped" from "applied" by comparing values with tests/reference.py.


def _master_pieces(opt, rank):
    """This rank's master shard as (parameter index in group order, start, values) pieces."""
    master = opt._shard.master
    return [
        (s.param_index, s.param_start, master[s.shard_offset : s.shard_offset + s.length].detach().cpu().clone())
        for s in opt.layout.owned_slices(rank)
    ]


def assert_master_pieces_equal(pieces, params, **tolerance):
    """Compare ``_master_pieces`` with full parameters given in the model's order."""
    model = workloads.make_model()
    position = {id(p): i for i, p in enumerate(model.parameters())}
    in_group_order = [position[id(p)] for g in workloads.param_groups(model, "adamw") for p in g["params"]]
    assert pieces
    for index, start, values in pieces:
        want = params[in_group_order[index]].reshape(-1)[start : start + values.numel()]
        torch.testing.assert_close(values, want, msg=lambda m: f"master of parameter {index} from {start}: {m}", **tolerance)


def nonfinite_raise(rank, world_size, mode, bad_rank, bad_call, engine="auto"):
    model, opt = _build(mode, timeout=60, engine=engine)
    error = None
    for call in range(6):
        _backward(model, rank, call, poison=(rank == bad_rank and call == bad_call))
        try:
            opt.step()
        except NonFiniteGradientError as caught:
            error = (call, str(caught))
            break
        opt.zero_grad()
    master_finite = bool(torch.isfinite(opt._shard.master).all())
    params_finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    master = _master_pieces(opt, rank)
    with pytest.raises(RuntimeError, match="background round failed earlier"):
        opt.finish()  # no hang after an error, and the cause is chained
    opt.close()
    return error, master_finite, params_finite, opt.num_updates, master


@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_nonfinite_gradient_raises_on_every_rank_and_commits_nothing(run_distributed, mode):
    results = run_distributed(2, nonfinite_raise, mode, 1, 2)
    # Round 2 holds the NaN; rounds 0 and 1 ran: the master must be round 1's output, bit for bit
    # what the plain optimizer computes, not that plus an update with the NaN zeroed out.
    reference = simulate(mode, blocking_plan(mode, 2, 2, finish=False), "mlp", "adamw")
    for error, master_finite, params_finite, updates, master in results:
        assert error is not None
        call, message = error
        assert call == (2 if mode == "sync" else 3)  # the step() that launched the round, or the next one
        assert "NaN or Inf" in message and "update" in message and "nonfinite='skip'" in message
        assert master_finite and params_finite
        assert updates == reference.num_updates
        assert_master_pieces_equal(master, reference.outputs[1], rtol=1e-9, atol=1e-12)
    assert results[0][3] == results[1][3]


def close_right_after_a_bad_round(rank, world_size, engine):
    model, opt = _build("acco", timeout=60, engine=engine)
    for call in range(2):
        _backward(model, rank, call, poison=(call == 1))
        opt.step()  # acco returns before the bad round's outcome is read
        opt.zero_grad()
    raised = None
    try:
        opt.close()
    except NonFiniteGradientError as error:
        raised = str(error)
    return raised, not opt._pipeline.handover.hooked, getattr(opt._comm, "group", None) is None


@pytest.mark.parametrize("engine", ["thread", "stream"])
def test_close_reports_the_round_in_flight_and_still_cleans_up(run_distributed, engine):
    for raised, hooks_removed, group_freed in run_distributed(2, close_right_after_a_bad_round, engine):
        assert raised is not None and "NaN or Inf" in raised
        assert hooks_removed and group_freed


def nonfinite_skip(rank, world_size, mode, bad_call, calls, engine="auto", device="cpu"):
    model, opt = _build(mode, device=device, nonfinite="skip", engine=engine)
    held = []
    for call in range(calls):
        held.append([p.detach().cpu().clone() for p in model.parameters()])
        _backward(model, rank, call, poison=(rank == 0 and call == bad_call))
        opt.step()
        opt.zero_grad()
    opt.finish()
    params = [p.detach().cpu().clone() for p in model.parameters()]
    result = (opt.num_updates, opt.num_skipped_updates, params, bool(torch.isfinite(opt._shard.master).all()), held)
    opt.close()
    return result


def assert_skipped_like_reference(results, mode, bad_call, calls, rtol=1e-9, atol=1e-12):
    """Every parameter value held, and the final one, equal the reference's with the poisoned
    rounds skipped: a skipped update changes nothing, training goes on from the committed values."""
    reference = simulate(mode, blocking_plan(mode, len(results), calls), "mlp", "adamw", poisoned=[(0, bad_call)])
    expected_updates = calls // 2 if mode == "acco" else calls
    assert (reference.num_updates, reference.num_skipped_updates) == (expected_updates - 1, 1)
    lag = 1 if mode == "sync" else 2
    for rank, (updates, skipped, params, master_finite, held) in enumerate(results):
        assert (updates, skipped) == (reference.num_updates, reference.num_skipped_updates), rank
        assert master_finite
        for call in range(lag, calls):
            for got, want in zip(held[call], reference.outputs[call - lag]):
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} call {call}: {m}")
        for got, want in zip(params, reference.final):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} final: {m}")


@pytest.mark.parametrize("mode,bad_call", [("acco", 2), ("acco", 3), ("dpu", 2), ("sync", 2)])
def test_nonfinite_gradient_is_skipped_consistently(run_distributed, mode, bad_call):
    calls = 8
    results = run_distributed(2, nonfinite_skip, mode, bad_call, calls)
    assert_skipped_like_reference(results, mode, bad_call, calls)
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result[2], results[0][2]))  # every rank skipped alike


# ---------------------------------------------------------------------- a peer that stops or fails
def stalled_peer(rank, world_size, key):
    store = dist.distributed_c10d._get_default_store()
    model, opt = _build("acco", timeout=3)
    if rank == 1:  # constructs (collective), then never calls step()
        store.wait([key])
        opt.close()
        return None
    _backward(model, rank, 0)
    opt.step()  # launches round 0, which cannot complete without rank 1
    _backward(model, rank, 1)
    try:
        opt.step()
    except CollectiveError as error:
        message = str(error)
    else:
        message = None
    store.set(key, "rank 0 got its error")
    with pytest.raises(RuntimeError, match="background round failed earlier"):
        opt.finish()
    opt.close()
    return message


def test_peer_that_stops_calling_step_gives_an_error_naming_the_round(run_distributed):
    message, _ = run_distributed(2, stalled_peer, "stalled-peer", timeout=90)
    assert message is not None
    assert "all_reduce (counts) of estimate round 0" in message
    assert "rank 0 of 2" in message and "stopped calling step()" in message and "0:00:03" in message


def failing_round(rank, world_size):
    model, opt = _build("acco", timeout=3)

    def simulated_out_of_memory():
        raise MemoryError("simulated out of memory in the shard step")

    if rank == 1:
        opt._shard.step = simulated_out_of_memory  # fails in the background, in the first commit round
    caught = None
    for call in range(4):
        _backward(model, rank, call)
        try:
            opt.step()
        except (MemoryError, CollectiveError) as error:
            caught = (type(error).__name__, "".join(traceback.format_exception(error)))
            break
        opt.zero_grad()
    with pytest.raises(RuntimeError, match="background round failed earlier"):
        opt.step()
    with pytest.raises(RuntimeError, match="background round failed earlier"):
        opt.finish()
    opt.close()
    return caught


def test_exception_in_the_background_round_reaches_every_rank(run_distributed):
    first, second = run_distributed(2, failing_round, timeout=90)
    assert second[0] == "MemoryError"
    assert "simulated_out_of_memory" in second[1]  # the original traceback, from the worker thread
    assert first[0] == "CollectiveError"  # the peer waited in the all-gather until the timeout
    assert "all_gather (parameters) of commit round 1" in first[1]


def _killed_peer_worker(rank, world_size, init_file, reports, never):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model, opt = _build("acco", timeout=20)
    for call in range(50):
        _backward(model, rank, call)
        try:
            opt.step()
        except CollectiveError as error:
            reports[rank].put(("error", rank, call, str(error)))
            return
        opt.zero_grad()
        if rank == 1 and call == 3:
            reports[rank].put(("pid", rank, call, os.getpid()))
            never.get()  # blocks until the test kills this process
    reports[rank].put(("finished", rank, None, None))


def test_killed_rank_makes_the_survivor_raise():
    ctx = mp.get_context("spawn")
    init_file = tempfile.mktemp(prefix="acco-killed-")
    # One queue per rank: a process killed right after a put may die holding a shared queue's lock.
    reports, never = [ctx.Queue(), ctx.Queue()], ctx.Queue()
    procs = [ctx.Process(target=_killed_peer_worker, args=(r, 2, init_file, reports, never), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        kind, rank, call, pid = reports[1].get(timeout=120)
        assert (kind, rank) == ("pid", 1), (kind, rank, call, pid)
        os.kill(pid, 9)
        kind, rank, call, message = reports[0].get(timeout=120)  # the survivor's error, not a hang
        assert (kind, rank) == ("error", 0), (kind, rank, message)
        assert "round" in message and ("all_reduce" in message or "all_gather" in message or "reduce_scatter" in message)
        procs[0].join(timeout=60)
        assert not procs[0].is_alive()
    except queue.Empty:
        pytest.fail("no report from the ranks: a hang")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)


# ---------------------------------------------------------------------- interpreter exit
# The script's last round is held at its start until the interpreter has begun to exit, so that
# it is really in flight then. atexit runs its handlers last registered first, and weakref's
# exit handler runs finalizers newest first: ``gate.set`` (an atexit handler registered after
# the optimizer, so before anything of the optimizer's) lets the round go on, then the optimizer's
# own exit handling (an atexit handler or a finalizer, both newer than ``report``'s) must let it
# end and stop the worker, then ``report`` (a finalizer older than the optimizer) prints, from the
# main thread, what the worker recorded and whether it is still alive. A worker stopped mid-round
# records nothing; one left running detached is still alive.
EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, json, sys, threading, weakref
    records, gate, workers = [], threading.Event(), set()

    def report():
        alive = [t.is_alive() for t in workers]
        print("rounds recorded:", json.dumps({"records": records, "workers_alive": alive}), flush=True)

    class Anchor:
        pass

    sys.path.insert(0, "tests")
    import torch
    import workloads
    from acco import AccoOptimizer

    mode, outcome, gated = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = workloads.make_model()
    anchor = Anchor()
    weakref.finalize(anchor, report)  # just before the optimizer: its exit handling comes first
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode=mode, nonfinite="raise")
    run = opt._pipeline.runner.run

    def recorded(call):  # runs in the worker thread
        assert threading.current_thread() is not threading.main_thread()
        workers.add(threading.current_thread())
        if call.launch.index == gated:
            gate.wait()
        try:
            result = run(call)
        except BaseException as error:
            records.append([call.launch.index, type(error).__name__, None])
            raise
        flat = call.output
        layout = opt.layout
        gathered = [flat[o : o + n].tolist() for o, n in zip(layout.param_offsets, layout.param_numels)]
        records.append([call.launch.index, "ok", gathered])
        return result

    opt._pipeline.runner.run = recorded
    for call in range(3):
        workloads.loss_fn(model, *workloads.batch(0, call)).backward()
        if outcome == "fail" and call == 1:
            next(model.parameters()).grad[0, 0] = float("inf")
        try:
            opt.step()
        except FloatingPointError:
            break
        opt.zero_grad()
    atexit.register(gate.set)
    print("leaving with a round in flight:", opt.round_in_flight, "finished:", opt.round_finished, flush=True)
    """
)


def _exit_records(stdout):
    import json

    lines = [line for line in stdout.splitlines() if line.startswith("rounds recorded: ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0][len("rounds recorded: ") :])


@pytest.mark.parametrize("mode,outcome", [("acco", "ok"), ("dpu", "fail")])
def test_interpreter_exit_with_a_round_in_flight_or_after_an_error(mode, outcome):
    gated = 2  # acco: the third call launches round 2 and returns; held until exit begins
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, mode, outcome, str(gated)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = _exit_records(done.stdout)
    records = recorded["records"]
    assert recorded["workers_alive"] == [False], recorded["workers_alive"]  # stopped, not left detached
    model = workloads.make_model()
    position = {id(p): i for i, p in enumerate(model.parameters())}
    in_group_order = [position[id(p)] for g in workloads.param_groups(model, "adamw") for p in g["params"]]
    if outcome == "ok":
        # Round 2 was still held when the loop ended, and completed during exit: its output is the
        # estimate the reference computes (to float tolerance), written after the exit began.
        assert "leaving with a round in flight: True finished: False" in done.stdout, done.stdout
        assert [(index, how) for index, how, _ in records] == [(0, "ok"), (1, "ok"), (2, "ok")], records
        reference = simulate(mode, blocking_plan(mode, 1, 3, finish=False), "mlp", "adamw")
        for index, _, gathered in records:
            for position_in_groups, values in enumerate(gathered):
                want = reference.outputs[index][in_group_order[position_in_groups]].reshape(-1)
                torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), want, rtol=1e-9, atol=1e-12)
    else:
        # The error (raised in the round or when its outcome is read) ended the round in flight:
        # no round runs after it, and exit does not hang.
        assert "leaving with a round in flight: False" in done.stdout, done.stdout
        assert [index for index, _, _ in records] == [0, 1], records


# ---------------------------------------------------------------------- which timeout applies
def timeouts(rank, world_size):
    import datetime

    seen = []
    for kwargs in ({}, {"timeout": 7}, {"process_group": dist.new_group(timeout=datetime.timedelta(seconds=42))}):
        model, opt = _build("acco", **kwargs)
        seen.append(opt.timeout.total_seconds())
        opt.close()
    return seen


def test_timeout_defaults_to_five_minutes_and_honours_the_process_groups_own(run_distributed):
    assert run_distributed(2, timeouts) == [[300.0, 7.0, 42.0]] * 2


def consolidate_on_one_rank_only(rank, world_size):
    model, opt = _build("acco", timeout=3)
    for call in range(2):
        _backward(model, rank, call)
        opt.step()
        opt.zero_grad()
    opt.finish()
    message = None
    if rank == 0:  # a common mistake: saving "on rank 0 only"
        try:
            opt.consolidated_state_dict()
        except CollectiveError as error:
            message = str(error)
    opt.close()
    return message


def test_consolidating_on_one_rank_only_names_the_mistake(run_distributed):
    message, _ = run_distributed(2, consolidate_on_one_rank_only, timeout=90)
    assert message is not None and "consolidated_state_dict() is collective: every rank" in message


@pytest.mark.parametrize("on_host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_norm_is_the_finiteness_check(on_host, dtype):
    """One pass gives both: NaN and Inf anywhere are flagged, and a finite gradient whose fp32 sum
    of squares overflows (the clip norm is then huge, but no element is NaN or Inf) is not: the
    verdict must equal an element-wise ``isfinite`` over the whole tensor."""
    from acco.round import nonfinite_and_square

    cases = {"normal": [], "nan": [(7, float("nan"))], "inf": [(3, float("inf"))], "-inf": [(0, -float("inf"))]}
    cases["huge but finite"] = [(1, 3e38), (2, -3e38), (9, 2e38)]
    for name, edits in cases.items():
        grad = torch.randn(3 * (1 << 20) + 5, dtype=dtype)
        for index, value in edits:
            grad[index] = value
        nonfinite, square = nonfinite_and_square(grad, on_host=on_host)
        expected_nonfinite = not bool(torch.isfinite(grad).all())
        assert (float(nonfinite) > 0) == expected_nonfinite, name
        if not expected_nonfinite:
            want = grad.double().square().sum().item()
            assert float(square) == pytest.approx(want, rel=1e-3), name  # fp32 sums of 3M terms


def test_a_failed_regather_after_loading_names_the_restored_round():
    """A per-rank checkpoint saved with a round in flight regathers that round's output at load; a collective
    failure there names the restored round and the collective, as a failure inside any round does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mode="acco", engine="thread", batch_rule_applied=True)
    for _ in range(3):
        model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
        opt.step()
        opt.zero_grad()
    saved, weights = opt.state_dict(), model.state_dict()
    assert saved["acco"]["in_flight"]["result"]["index"] == 2

    def peer_gone(*args):
        raise RuntimeError("peer gone")

    opt._comm.all_gather = peer_gone
    model.load_state_dict(weights)
    opt.load_state_dict(saved)
    with pytest.raises(CollectiveError, match=r"all_gather \(restored parameters\) of the restored estimate round 2 failed"):
        opt.step()
    opt.close()
