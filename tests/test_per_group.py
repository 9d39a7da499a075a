"""Per-group inner optimizers (issue 16): each param group may name its own optimizer class.

Mode ``sync`` against DDP + torch's own ``Muon`` (matrices) and ``AdamW`` (the rest), the errors for
what cannot work (raised before anything changes, on every rank), the rules for ``optimizer_class``
beside per-group ``"optimizer"`` keys, and the memory accounting of a layout of two segments. The
equivalence with the single-process reference is in ``test_equivalence.py``; checkpoints in
``test_checkpoint.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import workloads
from acco import AccoOptimizer
from test_errors import assert_raises_cleanly

Muon, AdamW = torch.optim.Muon, torch.optim.AdamW


def split(model):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return matrices, rest


def hybrid_groups(model, **rest_settings):
    matrices, rest = split(model)
    return [
        {"params": matrices, "optimizer": Muon, "lr": 0.02},
        {"params": rest, "optimizer": AdamW, "lr": 1e-2, "weight_decay": 0.1, **rest_settings},
    ]


# ---------------------------------------------------------------------- against DDP + torch's Muon and AdamW
def train_against_ddp(rank, world_size, num_calls, max_grad_norm):
    peer_model = workloads.make_model()
    ddp = DistributedDataParallel(peer_model)
    matrices, rest = split(peer_model)
    peers = [Muon(matrices, lr=0.02), AdamW(rest, lr=1e-2, weight_decay=0.1)]  # torch's own, on full tensors

    model = workloads.make_model()
    opt = AccoOptimizer(hybrid_groups(model), mode="sync", max_grad_norm=max_grad_norm)
    for call in range(num_calls):
        x, y = workloads.batch(rank, call)
        workloads.loss_fn(ddp, x, y).backward()  # DDP averages the gradients
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_grad_norm)
        for peer in peers:
            peer.step()
            peer.zero_grad()
        workloads.loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    result = (
        [p.detach().clone() for p in model.parameters()], [p.detach().clone() for p in peer_model.parameters()],
        opt.num_updates, opt.partition,
    )
    opt.close()
    return result


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_sync_matches_ddp_with_torch_muon_and_adamw(run_distributed, world_size, max_grad_norm):
    num_calls = 6
    initial = list(workloads.make_model().parameters())
    for rank, (ours, peer, updates, partition) in enumerate(run_distributed(world_size, train_against_ddp, num_calls, max_grad_norm)):
        assert updates == num_calls and partition == "mixed"
        for a, b in zip(ours, peer):  # Muon orthogonalises in bf16: the plain Muon test's tolerance
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank}: {m}")
        assert all(not torch.equal(a, b) for a, b in zip(ours, initial))  # every parameter trained


# ---------------------------------------------------------------------- optimizer_class beside per-group keys
def test_a_group_key_overrides_optimizer_class_which_is_the_default():
    model = workloads.make_model()
    matrices, rest = split(model)
    opt = AccoOptimizer([{"params": matrices, "optimizer": Muon}, {"params": rest}], AdamW, lr=5e-3, betas=(0.8, 0.9))
    muon_group, adamw_group = opt.param_groups
    assert muon_group["optimizer"] is Muon and "optimizer" not in adamw_group  # the user's groups, as given
    assert muon_group["lr"] == Muon(matrices).defaults["lr"] and "betas" not in muon_group  # **defaults are AdamW's
    assert adamw_group["lr"] == 5e-3 and adamw_group["betas"] == (0.8, 0.9)
    assert opt.partition == "mixed" and opt.layout.segments[0].kind.value == "flat"
    opt.close()


def test_groups_of_one_class_named_per_group_are_the_plain_form():
    model = workloads.make_model()
    matrices, rest = split(model)
    opt = AccoOptimizer([{"params": matrices, "optimizer": AdamW}, {"params": rest, "optimizer": AdamW, "lr": 0.1}])
    assert opt.partition == "flat" and len(opt.layout.segments) == 1
    assert isinstance(opt._shard.optimizer, AdamW)  # one inner optimizer, as in the plain form
    opt.close()


# ---------------------------------------------------------------------- clear errors, before anything changes
def test_muon_given_a_non_matrix_parameter():
    model = workloads.make_model()
    groups = [{"params": list(model.parameters())[:2], "optimizer": Muon}, {"params": list(model.parameters())[2:], "optimizer": AdamW}]
    assert_raises_cleanly(
        ValueError, ["param group 0 uses Muon", "2-D matrices only", "parameter 1", "shape (6,)", "torch.optim.AdamW"],
        lambda: AccoOptimizer(groups), model,
    )


def test_muon_given_a_non_matrix_parameter_in_the_class_form():
    model = workloads.make_model()
    assert_raises_cleanly(ValueError, ["uses Muon", "2-D matrices only", "shape (6,)"], lambda: AccoOptimizer(model.parameters(), Muon), model)


@pytest.mark.parametrize("second", [AdamW, Muon], ids=lambda c: c.__name__)
def test_a_parameter_in_two_groups(second):
    model = workloads.make_model()
    matrices, rest = split(model)
    groups = [{"params": matrices + rest, "optimizer": AdamW}, {"params": matrices[:1], "optimizer": second}]
    assert_raises_cleanly(ValueError, ["shape (6, 5)", "param groups 0 and 1", "one group"], lambda: AccoOptimizer(groups), model)


@pytest.mark.parametrize("whole", [Muon, torch.optim.Adafactor], ids=lambda c: c.__name__)
def test_a_whole_tensor_optimizer_forced_flat(whole):
    model = workloads.make_model()
    matrices, rest = split(model)
    groups = [{"params": rest, "optimizer": AdamW}, {"params": matrices, "optimizer": whole}]
    assert_raises_cleanly(
        ValueError, ["partition='flat'", f"param group 1 uses {whole.__name__}", "needs whole tensors", "'auto'"],
        lambda: AccoOptimizer(groups, partition="flat"), model,
    )


def test_a_group_without_optimizer_and_no_default():
    model = workloads.make_model()
    matrices, rest = split(model)
    assert_raises_cleanly(
        TypeError, ["param group 1 names no optimizer", "optimizer_class"],
        lambda: AccoOptimizer([{"params": matrices, "optimizer": Muon}, {"params": rest}]), model,
    )
    assert_raises_cleanly(
        TypeError, ["['lr']", "no optimizer_class"],
        lambda: AccoOptimizer([{"params": matrices, "optimizer": Muon}, {"params": rest, "optimizer": AdamW}], lr=0.1), model,
    )


@pytest.mark.parametrize("bad,error,fragment", [
    ("not a class", TypeError, "param group 1's 'optimizer' must be a torch.optim.Optimizer subclass"),
    (torch.optim.LBFGS, TypeError, "cannot wrap LBFGS"),
    (AccoOptimizer, TypeError, "cannot be AccoOptimizer"),
])
def test_a_group_optimizer_that_cannot_be_wrapped(bad, error, fragment):
    model = workloads.make_model()
    matrices, rest = split(model)
    groups = [{"params": matrices, "optimizer": Muon}, {"params": rest, "optimizer": bad}]
    assert_raises_cleanly(error, [fragment], lambda: AccoOptimizer(groups), model)


def test_an_instance_whose_groups_name_optimizers():
    model = workloads.make_model()
    matrices, rest = split(model)
    instance = AdamW([{"params": rest}, {"params": matrices, "optimizer": Muon}])
    assert_raises_cleanly(TypeError, ["pass the param groups to AccoOptimizer itself"], lambda: AccoOptimizer(instance), model)


def test_momentum_estimate_needs_a_first_moment_in_every_group():
    model = workloads.make_model()
    assert_raises_cleanly(
        ValueError, ["estimate='momentum'", "Muon has none"], lambda: AccoOptimizer(hybrid_groups(model), estimate="momentum"), model,
    )
    matrices, rest = split(model)
    opt = AccoOptimizer([{"params": matrices, "optimizer": torch.optim.Adam}, {"params": rest, "optimizer": AdamW}], estimate="momentum")
    opt.close()


def test_mixed_is_not_a_partition_to_ask_for():
    model = workloads.make_model()
    assert_raises_cleanly(ValueError, ["partition must be 'auto', 'flat' or 'param'", "'mixed'"],
                          lambda: AccoOptimizer(hybrid_groups(model), partition="mixed"), model)


def construct_with_rank_1_differing(rank, world_size, what):
    model = workloads.make_model()
    groups = hybrid_groups(model)
    if rank == 1 and what == "non-2-D":
        groups[0]["params"] = list(model.parameters())[:2]
        groups[1]["params"] = list(model.parameters())[2:]
    if rank == 1 and what == "class":
        groups[1]["optimizer"] = torch.optim.Adam
    before = [p.detach().clone() for p in model.parameters()]
    try:
        AccoOptimizer(groups).close()
    except (ValueError, TypeError) as error:
        return type(error).__name__, str(error), all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return None


@pytest.mark.parametrize("what", ["non-2-D", "class"])
def test_an_error_on_one_rank_is_raised_on_every_rank(run_distributed, what):
    results = run_distributed(2, construct_with_rank_1_differing, what, timeout=60)
    for rank, outcome in enumerate(results):
        assert outcome is not None, f"rank {rank} did not raise"
        name, message, unchanged = outcome
        assert name == "ValueError" and unchanged, (rank, outcome)
    if what == "non-2-D":
        assert "rank 1 rejected" in results[0][1] and "2-D matrices only" in results[0][1]
    else:
        assert "optimizer_class" in results[0][1] and "Adam" in results[0][1]


# ---------------------------------------------------------------------- memory of two segments
def test_memory_accounting_covers_both_segments():
    """The README's formula with S = S_flat + S_param and the state as k_flat·S_flat + k_param·S_param
    (AdamW: exp_avg, exp_avg_sq; Muon: momentum_buffer)."""
    model = workloads.make_model(dtype=torch.float32)
    opt = AccoOptimizer(hybrid_groups(model), mode="acco")
    for call in range(4):
        workloads.loss_fn(model, *workloads.batch(0, call, torch.float32)).backward()
        opt.step()
        opt.zero_grad()
    opt.finish()
    sizes = opt.memory_bytes()
    flat, whole = opt.layout.segments
    n, s = opt.layout.total_size, opt.layout.shard_size
    assert s == flat.shard_size + whole.shard_size and n == 1 * s  # one rank
    assert flat.shard_size == 9 and whole.shard_size == 48  # biases 6 + 3; matrices 30 + 18
    assert sizes["params"] == sizes["grads"] == sizes["comm"] == 4 * n
    assert sizes["master_shard"] == sizes["grad_shard"] == sizes["estimate_carry"] == 4 * s
    state_bound = 4 * (2 * flat.shard_size + 1 * whole.shard_size)
    assert state_bound - 4 * 8 <= sizes["optimizer_state"] <= state_bound + 64  # (+ AdamW's step scalars)
    assert sizes["estimate_backup"] == 4 * s + sizes["optimizer_state"]
    held = {k: v for k, v in sizes.items() if k not in ("total", "round_transient", "peak")}
    assert sizes["total"] == sum(held.values()) and sizes["peak"] == sizes["total"] + sizes["round_transient"]
    opt.close()


# ---------------------------------------------------------------------- checkpoints of another per-group choice
@pytest.mark.parametrize("form", ["per-rank", "portable"])
def test_a_checkpoint_of_other_group_optimizers_is_refused(form):
    from acco import CheckpointError

    model = workloads.make_model()
    opt = AccoOptimizer(hybrid_groups(model), mode="sync")
    workloads.loss_fn(model, *workloads.batch(0, 0)).backward()
    opt.step()
    saved = opt.state_dict() if form == "per-rank" else opt.consolidated_state_dict()
    assert saved["param_groups"][0]["optimizer"].endswith(".Muon")  # by name: torch.load(weights_only=True) reads it
    opt.close()
    other_model = workloads.make_model()
    matrices, rest = split(other_model)
    other = AccoOptimizer([{"params": matrices, "optimizer": torch.optim.Adafactor}, {"params": rest, "optimizer": AdamW}], mode="sync")
    with pytest.raises(CheckpointError, match="optimizer_class differs.*Muon.*Adafactor"):
        other.load_state_dict(saved)
    other.close()
