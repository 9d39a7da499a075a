"""The sharded checkpoint form (``AccoOptimizer.sharded_state_dict()``, for ``torch.distributed.checkpoint``):
built from one rank's shard, and read back from a template that ``dcp.load`` filled. No process
groups here: ``checkpoint_io`` makes the ranks agree and applies what ``read_sharded`` returns.

The form is ``torch.optim``'s, keyed per parameter (its name where the optimizer was built from
``named_parameters()``, else its ``torch.optim`` index), so that a reader without acco finds
``optimizer.state.<key>.exp_avg`` with the parameter's own shape (docs/design.md, "Sharded checkpoints"):

* ``state[key][name]``: a state tensor of the parameter's shape (element-wise: AdamW's moments, Muon's
  momentum) is one global tensor of which each rank saves the runs it owns (``RunsTensor``); any
  other tensor (a scalar such as ``step``, Adafactor's factored moments) is saved whole, by every
  rank that owns part of the parameter (they hold the same value; DCP writes it once).
* ``param_groups``: as ``torch.optim``'s, with each group's ``params`` listed by key.
* ``acco``: the fp32 master weights (``master[key]``, runs as above) and a header: format, version,
  the optimizer classes and parameter shapes a load checks, the parameters that had no state yet
  (``stateless``: saved as zeros, so that every checkpoint of a model has the same keys), counters.

Every tensor is committed state: the round in flight was committed first (``finish()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from .checkpoint import FORMAT_VERSION, SHARDED, check_header, check_tensor
from .dcp_tensor import RunsTensor
from .errors import CheckpointError
from .layout import Layout, PartitionKind, ViewSpan

Key = Any  # a parameter's name (str) or its torch.optim index (int)


@dataclass(frozen=True)
class ShardedState:
    """A validated sharded checkpoint, cut to this rank's shard: ready to apply."""

    master_runs: list[tuple[int, torch.Tensor]]  # (shard offset, values) of each owned piece
    view_states: dict[int, dict[str, Any]]  # the inner optimizer's state by view (the template's fresh buffers)
    counters: dict[str, int]


def build_sharded(
    layout: Layout,
    rank: int,
    spans: Sequence[ViewSpan],
    view_params: Sequence[int],
    view_states: Mapping[int, Mapping[str, Any]],
    prototype: Callable[[int], dict[str, Any]],
    stateless: set[int],
    master: torch.Tensor,
    param_shapes: Sequence[torch.Size],
    keys: Sequence[Key],
    param_groups: list[dict[str, Any]],
    header: dict[str, Any],
) -> dict[str, Any]:
    """This rank's part of the sharded form. Tensors of the optimizer's own state and master are views
    (no copy: a save reads them, a load swaps them for fresh buffers first); the state of a parameter in
    ``stateless`` (no step yet) is ``prototype(view)``'s zeros."""
    runs: dict[tuple[int, str], list[tuple[int, torch.Tensor]]] = {}
    live: dict[tuple[int, str], bool] = {}
    whole: dict[int, dict[str, Any]] = {}
    for view, span in enumerate(spans):
        param = view_params[view]
        shape = param_shapes[param]
        _, param_start, _, length = _the_piece(layout, rank, span, param)
        own = param not in stateless
        state = view_states.get(view) if own else prototype(view)
        if state is None:
            raise CheckpointError(f"shard view {view} of parameter {keys[param]!r} has no optimizer state, unlike the others")
        flat = layout.param_kind(param) is PartitionKind.FLAT
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and _is_run(value, flat, length, shape):
                runs.setdefault((param, name), []).append((param_start, value.detach().reshape(-1)))
                live[(param, name)] = own
            elif isinstance(value, torch.Tensor) and flat and value.dim() > 0:
                raise CheckpointError(
                    f"state {name!r} of parameter {keys[param]!r} has shape {tuple(value.shape)} on a shard piece of "
                    f"{length} elements: neither element-wise nor a scalar, so it cannot be re-sharded"
                )
            elif name not in whole.setdefault(param, {}):
                whole[param][name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    state_out: dict[Key, dict[str, Any]] = {keys[param]: dict(values) for param, values in whole.items()}
    for (param, name), pieces in runs.items():
        state_out.setdefault(keys[param], {})[name] = RunsTensor(param_shapes[param], sorted(pieces, key=lambda p: p[0]), live=live[(param, name)])
    masters: dict[Key, RunsTensor] = {}
    for piece in layout.owned_slices(rank):
        run = master[piece.shard_offset : piece.shard_offset + piece.length]
        masters[keys[piece.param_index]] = RunsTensor(param_shapes[piece.param_index], [(piece.param_start, run)], live=True)
    return {"state": state_out, "param_groups": param_groups, "acco": {**header, "format": SHARDED, "version": FORMAT_VERSION, "master": masters}}


def _is_run(value: torch.Tensor, flat: bool, length: int, shape: torch.Size) -> bool:
    """Does this state tensor lie where its view lies (one element per element of the parameter)?"""
    if flat:
        return value.dim() == 1 and value.numel() == length
    return value.shape == shape


def _the_piece(layout: Layout, rank: int, span: ViewSpan, param: int) -> tuple[int, int, int, int]:
    """The one parameter piece a view covers: ``(param_index, param_start, view_start, length)``."""
    lo, hi = span.shard_offset, span.shard_offset + span.length
    for piece in layout.owned_slices(rank):
        if piece.param_index == param and piece.shard_offset <= lo and hi <= piece.shard_offset + piece.length:
            return param, piece.param_start + lo - piece.shard_offset, 0, span.length
    raise AssertionError(f"shard view at {lo} is not inside one piece of parameter {param}")


def read_sharded(
    state_dict: Any,
    expected: Mapping[str, Any],
    rank: int,
    layout: Layout,
    spans: Sequence[ViewSpan],
    view_params: Sequence[int],
    param_shapes: Sequence[torch.Size],
    keys: Sequence[Key],
    master_dtype: torch.dtype,
) -> tuple[ShardedState, dict[str, Any]]:
    """Validate a template that ``dcp.load`` filled and cut this rank's state out of it (no copies: the
    template's fresh buffers become the state). Returns it and the header. Raises ``CheckpointError``."""
    _, meta = check_header(state_dict, expected, rank, accepted=(SHARDED,))
    if list(meta.get("keys") or ()) != list(keys):
        raise CheckpointError(
            "the checkpoint keys its parameters otherwise: "
            f"{_first_difference(list(meta.get('keys') or ()), list(keys))} (build the optimizer from named_parameters() "
            "on both sides, or from parameters on both)"
        )
    stateless = meta.get("stateless")
    if not isinstance(stateless, list) or not set(stateless) <= set(keys):
        raise CheckpointError("corrupted checkpoint: acco.stateless is unreadable")
    stateless = set(stateless)
    masters = meta.get("master")
    if not isinstance(masters, Mapping):
        raise CheckpointError("corrupted checkpoint: acco.master is missing")
    master_runs = []
    for piece in layout.owned_slices(rank):
        key = keys[piece.param_index]
        run = _run_of(masters.get(key), f"acco.master[{key!r}]", piece.param_start, piece.length)
        master_runs.append((piece.shard_offset, check_tensor(f"acco.master[{key!r}]", run, piece.length, master_dtype)))
    states = state_dict["state"]
    if not isinstance(states, Mapping):
        raise CheckpointError("corrupted checkpoint: state is not a mapping")
    view_states: dict[int, dict[str, Any]] = {}
    for view, span in enumerate(spans):
        param = view_params[view]
        key = keys[param]
        if key in stateless:
            continue
        saved = states.get(key)
        if not isinstance(saved, Mapping) or not saved:
            raise CheckpointError(f"the checkpoint holds no optimizer state for parameter {key!r}")
        _, param_start, _, length = _the_piece(layout, rank, span, param)
        flat = layout.param_kind(param) is PartitionKind.FLAT
        state: dict[str, Any] = {}
        for name, value in saved.items():
            where = f"state[{key!r}][{name!r}]"
            if isinstance(value, RunsTensor):
                run = _run_of(value, where, param_start, length)
                state[name] = run if flat else run.view(param_shapes[param])
            elif isinstance(value, torch.Tensor):
                state[name] = value.detach().clone()  # one per view: an optimizer steps a counter in place
            else:
                state[name] = value
        view_states[view] = state
    counters = {}
    for name in ("num_updates", "num_skipped_updates"):
        value = meta.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"corrupted checkpoint: acco.{name} is {value!r}")
        counters[name] = value
    return ShardedState(master_runs, view_states, counters), meta


def template_tensors(value: Any) -> list[RunsTensor]:
    """Every ``RunsTensor`` in a (nested) sharded state dict."""
    if isinstance(value, RunsTensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in template_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in template_tensors(v)]
    return []


def _run_of(value: Any, where: str, start: int, length: int) -> torch.Tensor:
    """The run of ``value`` (a template's ``RunsTensor`` that ``dcp.load`` filled) at ``[start, start + length)``."""
    if not isinstance(value, RunsTensor):
        raise CheckpointError(f"{where} is not part of a template from sharded_state_dict() (got {type(value).__name__})")
    if value.consumed:
        raise CheckpointError("this sharded state dict was loaded into an optimizer already: take a new template from sharded_state_dict()")
    if not value.loaded:
        raise CheckpointError(
            f"{where} was not filled by torch.distributed.checkpoint.load: call dcp.load(state_dict, checkpoint_id=...) on "
            "the template first"
        )
    for run_start, run in value.runs:
        if run_start == start and run.numel() == length:
            return run
    raise CheckpointError(f"{where} has no run of elements [{start}, {start + length}): the template comes from another optimizer")


def _first_difference(saved: list, mine: list) -> str:
    if len(saved) != len(mine):
        return f"{len(saved)} trainable parameters there, {len(mine)} here"
    for index, (a, b) in enumerate(zip(saved, mine)):
        if a != b:
            return f"parameter {index} is {a!r} there, {b!r} here"
    return "(no difference found)"
