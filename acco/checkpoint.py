"""Checkpoint formats and the pure re-sharding maths between them. No process groups here.

Two forms, both in ``torch.optim``'s format (``state`` + ``param_groups``) with our own data
under the extra key ``"acco"``:

* **per-rank** (``AccoOptimizer.state_dict()``): this rank's shard of the committed state plus
  everything the pipeline holds (the round in flight, the estimate's carried gradients, the
  counters). Loading it into the same world size resumes bit for bit. ``state`` is empty: the
  shard's state is keyed by the inner optimizer's shard views, under ``acco.inner_state``.
* **portable** (``AccoOptimizer.consolidated_state_dict()``): the committed state of every
  parameter, whole, keyed like a plain optimizer's ``state_dict()`` (so
  ``torch.optim.AdamW.load_state_dict`` accepts it too), plus the fp32 master weights. Loads
  into any world size.

A shard view is one tensor the inner optimizer steps: a contiguous span of the rank's flat
shard (flat partition; state tensors are 1-D, element-wise, or 0-dim scalars such as ``step``)
or one whole parameter (param partition; state passes through unchanged). With per-group
optimizers both kinds of view live in one shard (``Layout.param_kind`` tells them apart), and
``optimizer_class`` records one class per param group; the groups' ``"optimizer"`` keys are
saved as class names, so that ``torch.load(weights_only=True)`` reads the file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .errors import CheckpointError, ShardedStateError
from .layout import Layout, PartitionKind, ViewSpan
from .noise_scale import NoiseScale, NoiseScaleEMA
from .outcome import RoundResult
from .schedule import RoundKind

FORMAT_VERSION = 1
PER_RANK = "acco-per-rank"
PORTABLE = "acco-portable"
SHARDED = "acco-sharded"  # sharded_state_dict(), for torch.distributed.checkpoint (sharded_checkpoint.py)
_LOADED_BY = {PER_RANK: "load_state_dict()", PORTABLE: "load_state_dict()", SHARDED: "load_sharded_state_dict() after dcp.load"}


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_names(classes: Any) -> Any:
    """One class: its name. One class per param group: the name, if they are all the same, else a list of names."""
    if isinstance(classes, type):
        return class_name(classes)
    names = [class_name(c) for c in classes]
    return names[0] if len(set(names)) == 1 else names


OPTIMIZER_KEY = "optimizer"  # a param group's own inner optimizer class (saved as its name)


def saved_param_groups(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``param_groups`` of a state dict with each ``"optimizer"`` class replaced by its name."""
    return [{**g, OPTIMIZER_KEY: class_name(g[OPTIMIZER_KEY])} if isinstance(g.get(OPTIMIZER_KEY), type) else dict(g) for g in groups]


def view_pieces(layout: Layout, rank: int, span: ViewSpan) -> list[tuple[int, int, int, int]]:
    """The parameter pieces inside one view: (param_index, param_start, view_start, length)."""
    pieces = []
    lo, hi = span.shard_offset, span.shard_offset + span.length
    for piece in layout.owned_slices(rank):
        a, b = max(lo, piece.shard_offset), min(hi, piece.shard_offset + piece.length)
        if a < b:
            pieces.append((piece.param_index, piece.param_start + a - piece.shard_offset, a - lo, b - a))
    return pieces


class PortableStateBuilder:
    """Assembles whole-parameter state from one rank's shard at a time, so the gathering rank
    never holds more than the full state plus one rank's shard."""

    def __init__(self, layout: Layout, param_shapes: Sequence[torch.Size]) -> None:
        self.layout = layout
        self.param_shapes = list(param_shapes)
        self.state: dict[int, dict[str, Any]] = {}
        self.master: dict[int, torch.Tensor] = {}
        self.elementwise_keys: set[str] = set()

    def add_rank(
        self, rank: int, spans: Sequence[ViewSpan], view_states: Mapping[int, Mapping[str, Any]], master_shard: torch.Tensor
    ) -> None:
        for piece in self.layout.owned_slices(rank):
            whole = self.master.get(piece.param_index)
            if whole is None:
                whole = self.master[piece.param_index] = torch.empty(
                    self.param_shapes[piece.param_index], dtype=master_shard.dtype
                )
            whole.view(-1)[piece.param_start : piece.param_start + piece.length].copy_(
                master_shard[piece.shard_offset : piece.shard_offset + piece.length]
            )
        for view_index, span in enumerate(spans):
            state = view_states.get(view_index)
            if not state:
                continue
            for param_index, param_start, view_start, length in view_pieces(self.layout, rank, span):
                target = self.state.setdefault(param_index, {})
                for key, value in state.items():
                    if self.layout.param_kind(param_index) is PartitionKind.PARAM:
                        target[key] = _detached_copy(value)
                    elif isinstance(value, torch.Tensor) and value.dim() == 1:
                        if value.numel() != span.length:
                            raise CheckpointError(
                                f"state {key!r} of shard view {view_index} has {value.numel()} elements, the view "
                                f"{span.length}: neither element-wise nor a scalar, so it cannot be re-sharded"
                            )
                        self.elementwise_keys.add(key)
                        whole = target.get(key)
                        if whole is None:
                            whole = target[key] = torch.empty(self.param_shapes[param_index], dtype=value.dtype)
                        whole.view(-1)[param_start : param_start + length].copy_(value[view_start : view_start + length])
                    elif key not in target:
                        target[key] = _detached_copy(value)


def shard_state_from_portable(
    layout: Layout,
    rank: int,
    spans: Sequence[ViewSpan],
    param_state: Mapping[int, Mapping[str, Any]],
    elementwise_keys: set[str],
) -> dict[int, dict[str, Any]]:
    """This rank's inner-optimizer state (keyed by view) cut from whole-parameter state."""
    view_states: dict[int, dict[str, Any]] = {}
    for view_index, span in enumerate(spans):
        pieces = view_pieces(layout, rank, span)
        if not pieces or not all(param_state.get(p[0]) for p in pieces):
            continue  # not stepped yet (torch creates state lazily, at the first step)
        if layout.param_kind(pieces[0][0]) is PartitionKind.PARAM:
            (param_index, *_), = pieces
            view_states[view_index] = {k: _detached_copy(v) for k, v in param_state[param_index].items()}
            continue
        state: dict[str, Any] = {}
        for key, value in param_state[pieces[0][0]].items():
            if key in elementwise_keys:
                out = torch.empty(span.length, dtype=value.dtype)
                for param_index, param_start, view_start, length in pieces:
                    source = param_state[param_index][key].reshape(-1)
                    out[view_start : view_start + length].copy_(source[param_start : param_start + length])
                state[key] = out
            else:
                state[key] = _detached_copy(value)
        view_states[view_index] = state
    return view_states


def master_shard_from_portable(layout: Layout, rank: int, master: Mapping[int, torch.Tensor], out: torch.Tensor) -> None:
    out.zero_()  # padding stays zero
    for piece in layout.owned_slices(rank):
        source = master[piece.param_index].reshape(-1)
        out[piece.shard_offset : piece.shard_offset + piece.length].copy_(source[piece.param_start : piece.param_start + piece.length])


def fingerprint(
    optimizer_class: Any, layout: Layout, param_shapes: Sequence[torch.Size], param_dtype: Any, mode: str
) -> dict[str, Any]:
    """What must match for a per-rank state to load (all of it) or a portable one (shapes, class).
    ``optimizer_class``: the class, or one class per param group."""
    return {
        "optimizer_class": class_names(optimizer_class),
        "mode": mode,
        "partition": layout.kind.value,
        "world_size": layout.world_size,
        "shard_size": layout.shard_size,
        "param_shapes": [list(s) for s in param_shapes],
        "param_groups_of_params": list(layout.param_groups),
        "param_dtype": str(param_dtype),
    }


def check_header(
    state_dict: Any, expected: Mapping[str, Any], rank: int, accepted: Sequence[str] = (PER_RANK, PORTABLE)
) -> tuple[str, dict[str, Any]]:
    """Validate a loaded state dict against this optimizer; returns its form and its ``acco`` part.
    ``accepted``: the forms the caller loads (a sharded state dict has a method of its own).

    Raises ``CheckpointError`` naming the first thing that differs.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    for key in ("state", "param_groups", "acco"):
        if key not in state_dict:
            hint = " (a plain torch optimizer's state dict? AccoOptimizer loads only its own forms)" if key == "acco" else ""
            raise CheckpointError(f"not an AccoOptimizer state dict: key {key!r} is missing{hint}")
    meta = state_dict["acco"]
    form = meta.get("format") if isinstance(meta, Mapping) else meta
    if isinstance(form, str) and form in _LOADED_BY and form not in accepted:
        raise CheckpointError(f"this is a {form!r} state dict: load it with {_LOADED_BY[form]}")
    if not isinstance(meta, Mapping) or form not in accepted:
        raise CheckpointError(f"unknown checkpoint format {form!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {meta.get('version')!r}, this acco reads version {FORMAT_VERSION}")
    form = meta["format"]
    compared = ["optimizer_class", "param_shapes", "param_groups_of_params"]
    if form == PER_RANK:
        compared += ["world_size", "partition", "shard_size", "mode", "param_dtype"]
    for key in compared:
        if key not in meta:
            raise CheckpointError(f"corrupted checkpoint: acco.{key} is missing")
        if meta[key] != expected[key]:
            if key == "world_size":
                raise CheckpointError(
                    f"this per-rank checkpoint was saved by {meta[key]} ranks, this run has {expected[key]}: "
                    "load a portable checkpoint (consolidated_state_dict()) to change the world size"
                )
            if key == "param_shapes":
                raise CheckpointError(f"parameter shapes differ: checkpoint {_shapes_diff(meta[key], expected[key])}")
            raise CheckpointError(f"{key} differs: checkpoint has {meta[key]!r}, this optimizer {expected[key]!r}")
    if form == PER_RANK and meta.get("rank") != rank:
        raise CheckpointError(f"this is rank {meta.get('rank')}'s per-rank checkpoint, loaded on rank {rank}: each rank loads its own")
    return form, dict(meta)


def check_param_groups(saved: Any, groups: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(saved, (list, tuple)) or len(saved) != len(groups):
        count = len(saved) if isinstance(saved, (list, tuple)) else saved
        raise CheckpointError(f"the checkpoint has {count} param groups, this optimizer {len(groups)}")
    for index, (old, new) in enumerate(zip(saved, groups)):
        if not isinstance(old, Mapping) or len(old.get("params", ())) != len(new["params"]):
            size = len(old.get("params", ())) if isinstance(old, Mapping) else "?"
            raise CheckpointError(f"param group {index} has {size} parameters in the checkpoint, {len(new['params'])} here")
        mine = new.get(OPTIMIZER_KEY)
        mine = class_name(mine) if isinstance(mine, type) else mine
        if old.get(OPTIMIZER_KEY) != mine:
            raise CheckpointError(
                f"param group {index}'s optimizer differs: checkpoint has {old.get(OPTIMIZER_KEY)!r}, this optimizer {mine!r}"
            )


COUNTERS = ("carried_count", "rounds_launched", "rounds_installed", "pending_calls", "num_updates", "num_skipped_updates")


@dataclass(frozen=True)
class PerRankState:
    """A validated per-rank checkpoint, ready to apply."""

    master_shard: torch.Tensor
    inner_state: dict[int, dict[str, Any]]
    carried_gradients: Optional[torch.Tensor]
    counters: dict[str, int]
    in_flight_shard: Optional[torch.Tensor]  # this rank's shard of the round in flight's result
    in_flight_result: Optional[dict[str, Any]]
    last_round: Optional[dict[str, Any]]
    carried_mask: Optional[list[bool]] = None  # parameters with gradients in the carried estimate (None: all)
    model_fingerprint: Optional[list[int]] = None  # of the model (whole, every rank alike) when it was saved


@dataclass(frozen=True)
class PortableState:
    """A validated portable checkpoint, cut to this rank's shard."""

    master: dict[int, torch.Tensor]  # whole committed parameters, by trainable index
    inner_state: dict[int, dict[str, Any]]
    counters: dict[str, int]


def read_per_rank(
    meta: Mapping[str, Any], layout: Layout, spans: Sequence[ViewSpan], master_dtype: torch.dtype, param_dtype: torch.dtype,
    flat_views: Optional[Sequence[bool]] = None,
) -> PerRankState:
    """``flat_views``: which shard views are flat (default: all of them if the layout is flat)."""
    size = layout.shard_size
    master = check_tensor("acco.master_shard", meta.get("master_shard"), size, master_dtype)
    if flat_views is None:
        flat_views = [layout.kind is PartitionKind.FLAT] * len(spans)
    inner = _check_view_states(meta.get("inner_state"), spans, flat_views)
    carried = meta.get("carried_gradients")
    if carried is not None:
        carried = check_tensor("acco.carried_gradients", carried, size, master_dtype)
    counters = _counters(meta, COUNTERS)
    if counters["rounds_launched"] - counters["rounds_installed"] not in (0, 1):
        raise CheckpointError("corrupted checkpoint: inconsistent round counters")
    in_flight = meta.get("in_flight")
    if (in_flight is not None) != (counters["rounds_launched"] > counters["rounds_installed"]):
        raise CheckpointError("corrupted checkpoint: acco.in_flight does not match the round counters")
    shard = result = None
    if in_flight is not None:
        if not isinstance(in_flight, Mapping):
            raise CheckpointError("corrupted checkpoint: acco.in_flight is unreadable")
        shard = check_tensor("acco.in_flight.param_shard", in_flight.get("param_shard"), size, param_dtype)
        result = in_flight.get("result")
    mask = meta.get("carried_mask")
    if mask is not None and (not isinstance(mask, list) or len(mask) != len(layout.param_numels) or not all(isinstance(m, bool) for m in mask)):
        raise CheckpointError("corrupted checkpoint: acco.carried_mask is unreadable")
    fingerprint = meta.get("model_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, list) or len(fingerprint) != 3 or not all(isinstance(v, int) for v in fingerprint)):
        raise CheckpointError("corrupted checkpoint: acco.model_fingerprint is unreadable")
    return PerRankState(master, inner, carried, counters, shard, result, meta.get("last_round"), mask, fingerprint)


def read_portable(
    state_dict: Mapping[str, Any],
    meta: Mapping[str, Any],
    layout: Layout,
    rank: int,
    spans: Sequence[ViewSpan],
    torch_indices: Sequence[int],
    param_shapes: Sequence[torch.Size],
) -> PortableState:
    """``torch_indices[t]``: the index ``torch.optim`` gives trainable parameter ``t``."""
    raw_master = meta.get("master")
    if not isinstance(raw_master, Mapping):
        raise CheckpointError("corrupted checkpoint: acco.master is missing")
    master = {}
    for t, torch_index in enumerate(torch_indices):
        value = check_tensor(f"acco.master[{torch_index}]", raw_master.get(torch_index), param_shapes[t].numel())
        master[t] = value.reshape(param_shapes[t])
    elementwise = set(meta.get("elementwise_keys") or ())
    trainable_of = {torch_index: t for t, torch_index in enumerate(torch_indices)}
    param_state = {}
    for torch_index, state in state_dict["state"].items():
        if torch_index not in trainable_of or not isinstance(state, Mapping):
            raise CheckpointError(f"corrupted checkpoint: state for parameter {torch_index!r}, which is not trainable here")
        t = trainable_of[torch_index]
        for key in elementwise & set(state):
            check_tensor(f"state[{torch_index}][{key!r}]", state[key], param_shapes[t].numel())
        param_state[t] = state
    try:
        inner = shard_state_from_portable(layout, rank, spans, param_state, elementwise)
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(f"corrupted checkpoint: the optimizer state does not fit this model ({error})") from error
    return PortableState(master, inner, _counters(meta, ("num_updates", "num_skipped_updates")))


def _counters(meta: Mapping[str, Any], keys: Sequence[str]) -> dict[str, int]:
    counters = {}
    for key in keys:
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"corrupted checkpoint: acco.{key} is {value!r}")
        counters[key] = value
    return counters


def _check_view_states(inner: Any, spans: Sequence[ViewSpan], flat: Sequence[bool]) -> dict[int, dict[str, Any]]:
    if not isinstance(inner, dict):
        raise CheckpointError(f"corrupted checkpoint: acco.inner_state is {type(inner).__name__}")
    for view, state in inner.items():
        if not isinstance(view, int) or not 0 <= view < len(spans) or not isinstance(state, dict):
            raise CheckpointError(f"corrupted checkpoint: acco.inner_state has an entry {view!r} for no shard tensor")
        if flat[view]:
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() == 1:
                    check_tensor(f"acco.inner_state[{view}][{key!r}]", value, spans[view].length)
    return inner


def check_tensor(name: str, value: Any, numel: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"corrupted checkpoint: {name} should be a tensor, got {type(value).__name__}")
    if value.numel() != numel:
        raise CheckpointError(f"corrupted checkpoint: {name} has {value.numel()} elements, expected {numel}")
    if dtype is not None and value.dtype != dtype:
        raise CheckpointError(f"corrupted checkpoint: {name} is {value.dtype}, expected {dtype}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(f"corrupted checkpoint: {name} holds non-finite values")
    return value


def _shapes_diff(saved: list, expected: list) -> str:
    if len(saved) != len(expected):
        return f"has {len(saved)} trainable parameters, this model {len(expected)}"
    for index, (a, b) in enumerate(zip(saved, expected)):
        if list(a) != list(b):
            return f"parameter {index} has shape {tuple(a)}, this model {tuple(b)}"
    return "(no difference found)"


def _detached_copy(value: Any) -> Any:
    """A host copy: whole-parameter state is assembled on one rank from every rank's shard, and a
    tensor left on a GPU would be on another rank's device (or one this rank does not have)."""
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def result_to_dict(result: RoundResult) -> dict[str, Any]:
    """A ``RoundResult`` in plain types, so that ``torch.load(weights_only=True)`` reads our checkpoints."""
    return {**dataclasses.asdict(result), "kind": result.kind.value}


def result_from_dict(raw: Any) -> RoundResult:
    """A round record of any version (one saved before ``noise_scale`` existed has none)."""
    try:
        noise = raw.get("noise_scale")
        if noise is not None:
            noise = NoiseScale(**noise)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dataclasses.astuple(noise)):
                raise TypeError(f"noise_scale holds a value that is not a number: {noise}")
        return RoundResult(**{**raw, "kind": RoundKind(raw["kind"]), "noise_scale": noise})
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise CheckpointError(f"corrupted checkpoint: a round record is unreadable ({error})") from error


def read_noise_scale(meta: Mapping[str, Any]) -> Optional[dict[str, float]]:
    """The moving average of the gradient noise scale a checkpoint carries (``acco.noise_scale``), checked;
    None where it has none (saved before it existed: the average starts afresh). The sharded form never has
    one (see ``CheckpointIO.sharded``)."""
    raw = meta.get("noise_scale")
    if raw is None:
        return None
    try:
        NoiseScaleEMA().load_state_dict(raw)
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise CheckpointError(f"corrupted checkpoint: acco.noise_scale is unreadable ({error})") from error
    return dict(raw)


def read_secant(meta: Mapping[str, Any], size: int, master_dtype: torch.dtype) -> Optional[dict[str, Any]]:
    """``correction="secant"``'s state in a per-rank checkpoint (``acco.secant``), checked; None where it has
    none (saved without the correction, or before it existed: the correction starts afresh, as after
    ``finish()``)."""
    raw = meta.get("secant")
    if raw is None:
        return None
    keys = {"point", "carried_valid", "kappa", "at_committed"}
    if not isinstance(raw, Mapping) or set(raw) not in (keys, keys | {"kappa_moments"}):
        raise CheckpointError("corrupted checkpoint: acco.secant is unreadable")
    moments = raw.get("kappa_moments")  # correction="secant-gated": the gate's m, v and whether started
    if moments is not None and not (
        isinstance(moments, (list, tuple)) and len(moments) == 3 and isinstance(moments[2], bool)
        and all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in moments[:2])
        and moments[1] >= 0
    ):
        raise CheckpointError(f"corrupted checkpoint: acco.secant's kappa_moments must be [mean, mean square >= 0, started], got {moments!r}")
    kappa = raw["kappa"]
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not math.isfinite(kappa) or kappa < 0:
        raise CheckpointError(f"corrupted checkpoint: acco.secant's kappa must be a finite number >= 0, got {kappa!r}")
    if not all(isinstance(raw[k], bool) for k in ("carried_valid", "at_committed")):
        raise CheckpointError("corrupted checkpoint: acco.secant's flags are unreadable")
    point = raw["point"]
    if point is None and (raw["carried_valid"] or not raw["at_committed"]):
        raise CheckpointError("corrupted checkpoint: acco.secant has no estimate point")
    if point is not None:
        point = check_tensor("acco.secant.point", point, size, master_dtype)
    return {**raw, "point": point, "kappa": float(kappa)}


class ShardedStateView(dict):
    """``AccoOptimizer.state``: always empty. Each rank's inner optimizer holds the state of its
    own shard (fp32, flat views); reading ``opt.state[p]`` raises a clear error instead of a bare
    ``KeyError``, and neither reading nor writing leaves entries that would reach ``state_dict()``."""

    _WHERE = (
        "AccoOptimizer shards the optimizer state across ranks (ZeRO-1): each rank's inner optimizer holds the state "
        "of its own slice of the parameters, so opt.state is empty. For the whole state of every parameter, keyed as "
        "torch.optim does, call opt.consolidated_state_dict() on every rank (collective; the result is on rank 0)"
    )

    def __missing__(self, key: Any) -> Any:
        raise ShardedStateError(self._WHERE)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ShardedStateError(self._WHERE)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        raise ShardedStateError(self._WHERE)
