"""CUDA parameters: the stream engine (side CUDA stream, events, decisions on the device) and the
thread engine on CUDA tensors (gloo). Skipped without a GPU; CI has none.

`benchmarks/gpu_check.sh` runs this file on a GPU machine, with the GPU benchmark.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import workloads
from acco import AccoOptimizer
from test_equivalence import MODES, assert_matches_reference, train_blocking
from test_failures import assert_skipped_like_reference, nonfinite_skip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------- equivalence with the reference
@pytest.mark.parametrize("engine", ["stream", "thread"])
@pytest.mark.parametrize("mode", MODES)
def test_single_worker_on_cuda_matches_reference(mode, engine):
    result = train_blocking(0, 1, mode, "adamw", 7, device="cuda", engine=engine)
    assert_matches_reference([result], mode, "adamw", 1, 7, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_clipping_on_cuda_matches_clip_grad_norm(mode):
    result = train_blocking(0, 1, mode, "adamw", 6, device="cuda", max_grad_norm=0.05)
    assert_matches_reference([result], mode, "adamw", 1, 6, rtol=1e-7, atol=1e-10, max_grad_norm=0.05)


@pytest.mark.parametrize("spec", ["nadam", "sgd", "adafactor"])
def test_other_optimizers_on_cuda_match_reference(spec):
    result = train_blocking(0, 1, "acco", spec, 6, device="cuda")
    # NAdam runs with capturable=True on CUDA (step counters on the device): torch then computes
    # its bias corrections in float32 (1 - 0.999**1 is 1.3e-5 off), where the reference uses float64.
    tolerance = dict(rtol=1e-4, atol=1e-6) if spec == "nadam" else dict(rtol=1e-7, atol=1e-10)
    assert_matches_reference([result], "acco", spec, 1, 6, **tolerance)


@pytest.mark.parametrize("mode", MODES)
def test_per_group_muon_and_adamw_on_cuda_match_reference(mode):
    """Two inner optimizers and two segments on the stream engine: Muon's state is selected on the
    device, AdamW (capturable or fused) alike. Muon orthogonalises in bf16: its usual tolerance."""
    result = train_blocking(0, 1, mode, "muon+adamw", 6, device="cuda")
    assert result[2][1] == "mixed"
    assert_matches_reference([result], mode, "muon+adamw", 1, 6, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- bf16, fused kernels
def test_bf16_cuda_parameters_train_with_fp32_master_and_fused_adamw():
    model = workloads.make_model(dtype=torch.bfloat16).cuda()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mode="acco", max_grad_norm=1.0)
    assert opt.engine == "stream"
    assert opt._shard.optimizer.param_groups[0]["fused"] is True
    losses = []
    for call in range(40):
        x, y = workloads.batch(0, call % 4, torch.bfloat16)
        loss = workloads.loss_fn(model, x.cuda(), y.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    opt.finish()
    losses = torch.stack(losses).float().cpu()
    assert opt._shard.master.dtype == torch.float32 and opt._shard.master.is_cuda
    assert losses[-4:].sum() < losses[:4].sum()
    assert opt.num_updates == 20
    opt.close()


def test_optimizers_without_fused_kernels_keep_step_counters_on_the_gpu():
    model = workloads.make_model().cuda()
    opt = AccoOptimizer(torch.optim.NAdam(model.parameters()))
    assert opt._shard.optimizer.param_groups[0]["capturable"] is True
    opt.close()


# ---------------------------------------------------------------------- no host synchronisation
def _big_model(dtype=torch.bfloat16):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).to(device="cuda", dtype=dtype)


def _forward_backward(model, x):
    model(x).float().square().mean().backward()


@pytest.mark.parametrize("mode,blocking", [("acco", True), ("dpu", True), ("sync", True), ("acco", False)])
def test_step_never_synchronises_the_host(mode, blocking):
    model = _big_model()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode=mode, blocking=blocking, max_grad_norm=1.0)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    calls = 0
    while calls < 4 or opt.rounds_launched < 2:  # the first commit creates the optimizer state (read on the host once)
        _forward_backward(model, x)
        opt.step()
        opt.zero_grad()
        calls += 1
        assert calls < 1000
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            _forward_backward(model, x)
            opt.step()
            opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.finish()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


@pytest.mark.parametrize("mode", ["acco", "dpu", "sync"])
def test_host_runs_ahead_of_a_busy_gpu(mode):
    """With the GPU held busy, step() returns before the GPU gets to it, twice in a row: it waits
    neither for its round nor for the previous one (a round's outcome is read two calls later)."""
    model = _big_model()
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode=mode)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):
        _forward_backward(model, x)
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time on the default stream
    for _ in range(2):
        _forward_backward(model, x)
        opt.step()
        opt.zero_grad()
        assert not stream.query(), "step() waited for the GPU"
    opt.finish()
    opt.close()


def test_dropping_the_optimizer_with_a_round_queued_frees_nothing_in_use():
    """Dropped without close() while a round is still queued on the side stream: the release
    waits for that stream before the buffers go back to the caching allocator, so a tensor that
    gets their memory is never written by the round (before, the all-gather could land in it)."""
    model = _big_model(torch.float32)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode="acco")
    assert opt.engine == "stream"
    x = torch.randn(2048, 1024, device="cuda")
    for _ in range(2):
        _forward_backward(model, x)
        opt.step()
        opt.zero_grad()
    _forward_backward(model, x)
    torch.cuda._sleep(2_000_000_000)  # the default stream stays busy; the next round waits for it
    opt.step()  # queued behind the sleep
    comm_bytes = opt.memory_bytes()["comm"]
    del opt
    gc.collect()
    probe = torch.full((comm_bytes // 4,), 7.0, device="cuda")  # the size of the freed communication buffer
    torch.cuda.synchronize()
    assert bool((probe == 7.0).all()), "a round wrote into memory freed by the dropped optimizer"


def test_round_overlaps_the_next_compute():
    """CUDA events on both streams: the side-stream round launched by one call runs while the
    default stream computes the next call's gradients. Orders of events, no time threshold:

    * each round is enqueued on a stream other than the default one;
    * it starts before the first of the next call's four forward/backward passes has ended (it
      waits for none of that compute), and that compute starts before the round ends (it waits
      for none of the round);
    * at least half of the round's GPU interval lies inside the compute's interval (the compute
      is four forward/backward passes of an 8-layer, 1024-wide model on 2048 rows, many times the
      round's one AdamW step and copies: a round serialised before or after the compute, or
      waiting part-way for it, has little or nothing inside).

    Times are read from one origin recorded before everything else, so every difference taken
    is between non-negative readings."""
    model = _big_model(torch.float32)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode="acco")
    assert opt.engine == "stream"
    x = torch.randn(2048, 1024, device="cuda")
    runner = opt._pipeline.runner
    plain = runner.run
    default_stream = torch.cuda.default_stream().cuda_stream
    rounds = {}  # round index -> (stream, start, end)

    def timed(call):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()  # on the stream the round is enqueued on, after its wait for the launch copy
        outcome = plain(call)
        end.record()
        rounds[call.launch.index] = (torch.cuda.current_stream().cuda_stream, start, end)
        return outcome

    runner.run = timed
    computes = []  # per call: (start, end of the first forward/backward, end of all four)
    for _ in range(6):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        for micro_batch in range(4):
            _forward_backward(model, x)
            if micro_batch == 0:
                events[1].record()
        events[2].record()
        computes.append(tuple(events))
        opt.step()
        opt.zero_grad()
    opt.finish()
    torch.cuda.synchronize()
    assert sorted(rounds)[:6] == list(range(6)), sorted(rounds)
    origin = computes[0][0]  # before any round: round 0 waits for call 0's compute
    report = []
    # Round 1 (the first commit) creates the optimizer state, read on the host once: from round 2 on.
    for index in (2, 3, 4):
        stream, *round_events = rounds[index]
        r0, r1 = (origin.elapsed_time(e) for e in round_events)
        c0, first_done, c1 = (origin.elapsed_time(e) for e in computes[index + 1])
        fraction = max(0.0, min(r1, c1) - max(r0, c0)) / max(r1 - r0, 1e-9)
        report.append({"round": index, "round_ms": (r0, r1), "compute_ms": (c0, first_done, c1), "fraction": round(fraction, 3)})
        assert stream != default_stream, f"round {index} was enqueued on the default stream"
        assert r0 < first_done, f"round {index} waited for the next call's compute: {report}"
        assert c0 < r1, f"the compute after round {index} waited for it: {report}"
        assert fraction >= 0.5, f"round {index}: only {fraction:.3f} of it beside the compute: {report}"
    print("rounds beside the next call's compute (ms from the first call's start):", report)
    opt.close()


def test_state_dict_on_cuda_resumes_bit_identically():
    def build(seed):
        model = workloads.make_model(seed=seed).cuda()
        return model, AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")

    def call(model, opt, c):
        x, y = workloads.batch(0, c)
        workloads.loss_fn(model, x.cuda(), y.cuda()).backward()
        opt.step()
        opt.zero_grad()

    model, opt = build(0)
    for c in range(9):
        call(model, opt, c)
    opt.finish()
    straight = [p.detach().cpu() for p in model.parameters()]
    opt.close()

    model, opt = build(0)
    for c in range(5):
        call(model, opt, c)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    opt.close()
    model, opt = build(1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for c in range(5, 9):
        call(model, opt, c)
    opt.finish()
    assert all(torch.equal(a, b.detach().cpu()) for a, b in zip(straight, model.parameters()))
    opt.close()


# ---------------------------------------------------------------------- several processes (last: slower to start)
@pytest.mark.parametrize("mode", MODES)
def test_single_worker_on_an_nccl_initialised_process_matches_reference(run_distributed, mode):
    # A group of one gets a local communicator: no NCCL collective runs here (see the next test).
    results = run_distributed(1, train_blocking, mode, "adamw", 6, device="cuda", backend="nccl", timeout=90)
    assert_matches_reference(results, mode, "adamw", 1, 6, rtol=1e-7, atol=1e-10)


def nccl_setup(rank, world_size):
    import torch.distributed as dist

    model = workloads.make_model().cuda()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model))
    seen = (dist.get_backend(), torch.cuda.current_device(), opt.engine, opt.world_size)
    opt.close()
    return seen


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL takes one rank per GPU")
@pytest.mark.parametrize("mode", MODES)
def test_two_nccl_ranks_match_reference(run_distributed, mode):
    # Each rank on its own GPU (tests/distributed.py sets rank % device_count): real NCCL
    # collectives on the stream engine, clipping included (its norm is one more all-reduce).
    assert run_distributed(2, nccl_setup, backend="nccl", timeout=90) == [("nccl", 0, "stream", 2), ("nccl", 1, "stream", 2)]
    results = run_distributed(2, train_blocking, mode, "adamw", 6, device="cuda", max_grad_norm=0.05, backend="nccl", timeout=90)
    assert_matches_reference(results, mode, "adamw", 2, 6, rtol=1e-7, atol=1e-10, max_grad_norm=0.05)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_share_one_gpu_through_gloo(run_distributed, mode):
    # NCCL refuses two ranks on one GPU; gloo takes CUDA tensors (through host memory), on the
    # thread engine with the stream engine's device-side round.
    results = run_distributed(2, train_blocking, mode, "adamw", 6, device="cuda", max_grad_norm=0.05, timeout=90)
    assert_matches_reference(results, mode, "adamw", 2, 6, rtol=1e-7, atol=1e-10, max_grad_norm=0.05)


def engine_of_gloo_cuda(rank, world_size):
    model = workloads.make_model().cuda()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model))
    engine = opt.engine
    opt.close()
    return engine


def test_gloo_with_cuda_tensors_uses_the_thread_engine(run_distributed):
    assert run_distributed(2, engine_of_gloo_cuda) == ["thread", "thread"]


@pytest.mark.parametrize("mode,bad_call", [("acco", 2), ("acco", 3), ("sync", 2)])
def test_nonfinite_gradient_is_skipped_alike_on_cuda_ranks(run_distributed, mode, bad_call):
    results = run_distributed(2, nonfinite_skip, mode, bad_call, 8, device="cuda", timeout=90)
    assert_skipped_like_reference(results, mode, bad_call, 8, rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------- issue 24: memory, streams, host reads, ranks alike
def test_a_cuda_round_allocates_no_more_than_memory_bytes_reports():
    """The peak of the CUDA allocator over a round (``max_memory_allocated``) stays within what
    ``memory_bytes()`` reports as a round's transient: the norm's float64 piece (32 MiB), never a
    float64 copy of the shard (67 MB for this 8.4M-parameter model at world size 1)."""
    from test_memory_peak import AllocationPeak

    model = _big_model(torch.bfloat16)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode="acco", max_grad_norm=1.0)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    peaks = []
    for call in range(8):
        _forward_backward(model, x)
        with AllocationPeak("cuda") as peak:
            opt.step()
            opt.zero_grad()
        peaks.append((peak.peak_bytes, peak.end_bytes))
    sizes = opt.memory_bytes()
    slack = 1 << 20  # outcome flags, decisions and per-view selections; the allocator rounds each to 512 bytes
    assert sizes["round_transient"] < 8 * opt.layout.shard_size
    for peak_bytes, end_bytes in peaks[4:]:  # from the third update on, no buffer is added
        assert end_bytes <= slack, peaks
        assert peak_bytes <= sizes["round_transient"] + slack, (peaks, sizes["round_transient"])
    opt.finish()
    opt.close()


@pytest.mark.parametrize("mode", ["sync", "acco"])
def test_step_under_a_side_stream_waits_for_the_default_streams_gradients(mode):
    """Gradients written on the default stream (held back by a ~1 s sleep), step() called under a
    side stream: the round must wait for the default stream, not only for the caller's current one.
    Reference: torch's fused AdamW on the same gradients (the kernel acco runs on its fp32 master)."""
    model = _big_model(torch.float32)
    reference = copy.deepcopy(model)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode=mode)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, fused=True)
    known = [torch.full_like(p, 1e-3 * (i + 1)) for i, p in enumerate(model.parameters())]
    side = torch.cuda.Stream()
    calls = 2 if mode == "acco" else 1  # one committed update
    for _ in range(calls):
        _forward_backward(model, torch.randn(64, 1024, device="cuda"))  # gradients that must not be used
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # the default stream is busy for about a second
        for p, k in zip(model.parameters(), known):
            p.grad.copy_(k)  # queued behind the sleep, on the default stream
        with torch.cuda.stream(side):
            opt.step()
        opt.zero_grad()
    with torch.cuda.stream(side):
        opt.finish()
    torch.cuda.synchronize()
    for p, k in zip(reference.parameters(), known):
        p.grad = k.clone()
    ref_opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)
    opt.close()


@pytest.mark.parametrize("mode", MODES)
def test_training_entirely_under_a_side_stream_matches_reference(mode):
    with torch.cuda.stream(torch.cuda.Stream()):
        result = train_blocking(0, 1, mode, "adamw", 7, device="cuda")
    torch.cuda.synchronize()
    assert_matches_reference([result], mode, "adamw", 1, 7, rtol=1e-7, atol=1e-10)


def test_a_parameter_without_a_gradient_needs_no_host_synchronisation():
    """Some calls leave a layer without gradient: the round masks that parameter's update on the
    device (it used to read the agreement back on the host every such round)."""
    model = _big_model(torch.bfloat16)
    opt = AccoOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), mode="acco", max_grad_norm=1.0)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)

    def call(skip_last):
        layers = list(model)[:-1] if skip_last else list(model)
        h = x
        for layer in layers:
            h = layer(h)
        h.float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    for c in range(4):  # every parameter has had a gradient and has its state
        call(skip_last=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in range(6):
            call(skip_last=bool(c % 2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.finish()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


def consolidate_cuda_ranks(rank, world_size):
    """Two ranks on one GPU (gloo): the consolidated state comes back in host memory, and no tensor
    went through an object collective (it would be unpickled onto the sender's GPU index)."""
    from test_checkpoint import _all_tensors, _tensors_in

    model = workloads.make_model().cuda()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="acco")
    for call in range(4):
        x, y = workloads.batch(rank, call)
        workloads.loss_fn(model, x.cuda(), y.cuda()).backward()
        opt.step()
        opt.zero_grad()
    carried = []
    plain = opt._comm.broadcast_object

    def watched(obj, src):
        carried.append(_tensors_in(obj))
        return plain(obj, src)

    opt._comm.broadcast_object = watched
    saved = opt.consolidated_state_dict(to=1)
    per_rank = opt.state_dict()
    opt.close()
    devices = set() if saved is None else {t.device.type for t in _all_tensors(saved)}
    return sum(carried), devices, {t.device.type for t in _all_tensors(per_rank)}


def test_consolidated_state_of_cuda_ranks_is_in_host_memory(run_distributed):
    results = run_distributed(2, consolidate_cuda_ranks, timeout=90)
    for tensors, _, per_rank in results:
        assert tensors == 0 and per_rank == {"cpu"}
    assert results[1][1] == {"cpu"}


def cast_on_rank_1(rank, world_size):
    """NCCL, stream engine: a parameter cast on rank 1 is refused on both ranks at the same call."""
    from acco import ParameterOwnershipError

    model = workloads.make_model().cuda()
    opt = AccoOptimizer(workloads.make_optimizer("adamw", model), mode="sync", timeout=60)
    dtype = torch.float64
    try:
        for call in range(8):
            if call == 2 and rank == 1:
                model.to(torch.float32)
                dtype = torch.float32
            x, y = workloads.batch(rank, call, dtype)
            workloads.loss_fn(model, x.cuda(), y.cuda()).backward()
            opt.step()
            opt.zero_grad()
    except ParameterOwnershipError as error:
        return call, str(error)
    finally:
        opt.close()
    return None, None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL takes one rank per GPU")
def test_two_nccl_ranks_refuse_a_cast_on_one_rank_alike(run_distributed):
    results = run_distributed(2, cast_on_rank_1, backend="nccl", timeout=90)
    assert [call for call, _ in results] == [4, 4], results
    assert all("on rank 1" in message and "cast" in message for _, message in results), results


def cuda_tensor_lr(rank, world_size):
    model = workloads.make_model().cuda()
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda")  # on cuda:0 on rank 0, cuda:1 on rank 1
    opt = AccoOptimizer(model.parameters(), torch.optim.SGD, lr=lr, mode="sync")
    opt.close()
    return True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL takes one rank per GPU")
def test_cuda_tensor_learning_rates_on_two_gpus_are_the_same_setting(run_distributed):
    assert run_distributed(2, cuda_tensor_lr, backend="nccl", timeout=90) == [True, True]
