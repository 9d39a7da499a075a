"""The distributed optimizer against the single-process reference of docs/design.md §1.

Every parameter value the model holds during training (estimates included) and the final
committed parameters must match the reference, for each mode, world size and optimizer.
"""

from __future__ import annotations

import pytest
import torch

import workloads
from acco import AccoOptimizer
from reference import blocking_plan, simulate

MODES = ["acco", "dpu", "sync"]


def train_blocking(
    rank, world_size, mode, spec, num_calls, partition="auto", form="instance", max_grad_norm=None, dtype=torch.float64, device="cpu",
    chunk_elements=None, comm_chunk_elements=None, engine="auto", estimate="plain",
):
    import acco.comm
    import acco.shard

    default_chunk, default_comm_chunk = acco.shard.CPU_CHUNK_ELEMENTS, acco.comm.GLOO_CHUNK_ELEMENTS
    if chunk_elements is not None:  # tiny chunks, so that the test model's shards are really cut
        acco.shard.CPU_CHUNK_ELEMENTS = chunk_elements
    if comm_chunk_elements is not None:  # collectives in several pieces, last one shorter
        acco.comm.GLOO_CHUNK_ELEMENTS = comm_chunk_elements
    try:
        return _train_blocking(rank, world_size, mode, spec, num_calls, partition, form, max_grad_norm, dtype, device, engine, estimate)
    finally:
        acco.shard.CPU_CHUNK_ELEMENTS, acco.comm.GLOO_CHUNK_ELEMENTS = default_chunk, default_comm_chunk


def _train_blocking(rank, world_size, mode, spec, num_calls, partition, form, max_grad_norm, dtype, device, engine, estimate="plain"):
    model = workloads.make_model(workloads.model_kind_for(spec), dtype).to(device)
    if form == "instance":
        opt = AccoOptimizer(
            workloads.acco_params(spec, model), mode=mode, partition=partition, max_grad_norm=max_grad_norm, engine=engine,
            estimate=estimate,
        )
    else:  # the class form, with the same groups and defaults
        template = workloads.make_optimizer(spec, model)
        groups = [{k: v for k, v in g.items()} for g in template.param_groups]
        defaults = {k: v for k, v in template.defaults.items() if k in ("lr", "betas", "momentum", "weight_decay")}
        opt = AccoOptimizer(
            groups, type(template), mode=mode, partition=partition, max_grad_norm=max_grad_norm, engine=engine, **defaults
        )
    held = []
    for call in range(num_calls):
        held.append([p.detach().cpu().clone() for p in model.parameters()])
        x, y = workloads.batch(rank, call, dtype)
        workloads.loss_fn(model, x.to(device), y.to(device)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    final = [p.detach().cpu().clone() for p in model.parameters()]
    info = (opt.num_updates, opt.partition, opt.world_size, opt.rank, opt._shard.num_tensors)
    opt.close()
    return held, final, info


def assert_matches_reference(results, mode, spec, world_size, num_calls, rtol=1e-9, atol=1e-12, **kwargs):
    reference = simulate(mode, blocking_plan(mode, world_size, num_calls), workloads.model_kind_for(spec), spec, **kwargs)
    lag = 1 if mode == "sync" else 2
    for rank, (held, final, (num_updates, _, ws, r, *_)) in enumerate(results):
        assert (ws, r) == (world_size, rank)
        for call, params in enumerate(held):
            expected = reference.outputs[call - lag] if call >= lag else None
            if expected is None:
                continue
            for got, want in zip(params, expected):
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} call {call}: {m}")
        for got, want in zip(final, reference.final):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {rank} final: {m}")
        assert num_updates == reference.num_updates


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_adamw_matches_reference(run_distributed, mode, world_size):
    num_calls = 7
    results = run_distributed(world_size, train_blocking, mode, "adamw", num_calls)
    assert_matches_reference(results, mode, "adamw", world_size, num_calls)


@pytest.mark.parametrize("num_calls", [5, 6])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("spec", ["sgd", "adafactor"])
def test_other_optimizers_match_reference(run_distributed, spec, mode, num_calls):
    results = run_distributed(3, train_blocking, mode, spec, num_calls)
    assert results[0][2][1] == ("param" if spec == "adafactor" else "flat")
    assert_matches_reference(results, mode, spec, 3, num_calls)


@pytest.mark.parametrize("mode", MODES)
def test_muon_whole_tensor_matches_reference(run_distributed, mode):
    # Muon orthogonalises in bf16 internally: last-bit differences of the averaged gradient may
    # flip a bf16 rounding, hence the looser tolerance.
    results = run_distributed(2, train_blocking, mode, "muon", 6)
    assert results[0][2][1] == "param"
    assert_matches_reference(results, mode, "muon", 2, 6, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("world_size", [2, 4])
def test_forced_param_partition_of_adamw(run_distributed, world_size):
    results = run_distributed(world_size, train_blocking, "acco", "adamw", 6, partition="param")
    assert results[0][2][1] == "param"
    assert_matches_reference(results, "acco", "adamw", world_size, 6)


@pytest.mark.parametrize("mode", MODES)
def test_class_form_equals_instance_form(run_distributed, mode):
    results = run_distributed(2, train_blocking, mode, "adamw", 5, form="class")
    assert_matches_reference(results, mode, "adamw", 2, 5)


@pytest.mark.parametrize("mode", MODES)
def test_clipping_matches_clip_grad_norm(run_distributed, mode):
    # A small threshold, so that every round clips.
    results = run_distributed(3, train_blocking, mode, "adamw", 6, max_grad_norm=0.05)
    assert_matches_reference(results, mode, "adamw", 3, 6, max_grad_norm=0.05)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("spec", ["adamw-unfused", "nadam", "rmsprop"])
def test_unfused_optimizers_on_chunked_flat_shards(run_distributed, spec, world_size):
    # 7 calls: finish() commits the last estimate, whose state (NAdam's mu_product) must be the
    # optimizer's own, untouched by the estimate rounds. Same operations in the same order as the
    # reference: only fp64 last-bit differences are allowed (a float32 mu_product cast to float64 fails).
    results = run_distributed(world_size, train_blocking, "acco", spec, 7, chunk_elements=5)
    assert results[0][2][1] == "flat"
    assert results[0][2][4] > 2  # the shard really was cut into several tensors
    assert_matches_reference(results, "acco", spec, world_size, 7, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("mode,spec", [("acco", "adamw"), ("sync", "adafactor")])
def test_collectives_in_several_pieces(run_distributed, mode, spec, world_size):
    """gloo's reduce-scatter (pairwise sends + local sum, the next piece in flight while one is summed)
    goes chunk by chunk; pieces of 3 to 6 elements per rank cut the test model's shards (15 to 29
    elements) into several, the last one short, so both scratch halves are used in turn."""
    results = run_distributed(world_size, train_blocking, mode, spec, 5, comm_chunk_elements=12)
    assert_matches_reference(results, mode, spec, world_size, 5)


# ---------------------------------------------------------------------- per-group optimizers
# The reference steps torch's own optimizers, each on the full tensors of its groups
# (``workloads.PlainPerGroup``); acco lays the matrices' whole tensors and the biases' flat
# elements out in two segments and shards both.


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_muon_matrices_and_adamw_rest_match_reference(run_distributed, mode, world_size):
    # Muon's Newton–Schulz runs in bf16: the same loose tolerance as the plain Muon test.
    results = run_distributed(world_size, train_blocking, mode, "muon+adamw", 7)
    assert results[0][2][1] == "mixed"
    assert_matches_reference(results, mode, "muon+adamw", world_size, 7, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_per_group_whole_tensor_and_flat_optimizers_match_reference_exactly(run_distributed, mode, world_size):
    """Adafactor on the matrices (param segment), AdamW on the biases (flat segment): all fp64, so
    the two segments' collectives and the two inner optimizers must match to float tolerance."""
    results = run_distributed(world_size, train_blocking, mode, "adafactor+adamw", 7)
    assert results[0][2][1] == "mixed"
    assert_matches_reference(results, mode, "adafactor+adamw", world_size, 7)


@pytest.mark.parametrize("mode", MODES)
def test_two_element_wise_classes_share_one_flat_segment(run_distributed, mode):
    results = run_distributed(3, train_blocking, mode, "adamw+sgd", 6, chunk_elements=5)
    assert results[0][2][1] == "flat"
    assert_matches_reference(results, mode, "adamw+sgd", 3, 6)
