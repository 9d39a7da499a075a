"""Saving and loading an AccoOptimizer: what each part contributes, and the checks the ranks make
together. The formats and the re-sharding maths are ``checkpoint``'s and ``sharded_checkpoint``'s
(no process groups); this module talks to the pipeline (through ``snapshot`` / ``restore`` only) and
to the process group.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional, Sequence

import torch

from .buffers import model_fingerprint
from .checkpoint import (
    FORMAT_VERSION,
    OPTIMIZER_KEY,
    PER_RANK,
    PORTABLE,
    PortableStateBuilder,
    check_header,
    check_param_groups,
    fingerprint,
    master_shard_from_portable,
    read_noise_scale,
    read_secant,
    read_per_rank,
    read_portable,
    result_from_dict,
    result_to_dict,
    saved_param_groups,
)
from .comm import training_collective
from .errors import CheckpointError
from .layout import Layout, PartitionKind
from .pipeline import PipelineSnapshot
from .sharded_checkpoint import build_sharded, read_sharded, template_tensors
from .transfer import send_to


def _snapshot(value: Any) -> Any:
    """A copy that later rounds cannot change (the inner optimizer updates its tensors in place), in
    host memory: a per-rank state dict holds (k + 3) shard-sized tensors, which must not become a
    transient on the GPU (17 GB per rank at 7B / 8 ranks)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


class CheckpointIO:
    """``state_dict`` / ``consolidated_state_dict`` / ``load_state_dict`` of one AccoOptimizer.

    ``pipeline`` is the facade's ``Pipeline``; ``base_state_dict`` is ``torch.optim.Optimizer.state_dict``
    bound to the facade (the user's param groups, with our own ``state`` empty), as a ``WeakMethod``
    or a plain callable: a strong reference would make a cycle through the facade, which would keep
    its worker thread and private group alive until the garbage collector runs."""

    def __init__(self, *, pipeline: Any, shard: Any, buffers: Any, layout: Layout, comm: Any, optimizer_class: Any,
                 mode: str, param_groups: Sequence[Mapping[str, Any]], base_state_dict: Any) -> None:
        """``optimizer_class``: the inner class, or one class per param group."""
        self.pipeline, self.shard, self.buffers, self.layout, self.comm = pipeline, shard, buffers, layout, comm
        self.optimizer_class, self.mode, self.param_groups = optimizer_class, mode, param_groups
        self._base_state_dict = base_state_dict

    def base_state_dict(self) -> dict[str, Any]:
        method = self._base_state_dict
        if isinstance(method, weakref.WeakMethod):
            method = method()
        return method()

    def _collective(self, what: str, fn: Any, *args: Any) -> Any:
        return training_collective(self.comm, what, fn, *args)

    def fingerprint(self) -> dict[str, Any]:
        shapes = [p.shape for p in self.buffers.params]
        dtypes = self.buffers.lane_dtypes  # one dtype, or (mixed dtypes) each lane's in lane order
        return fingerprint(self.optimizer_class, self.layout, shapes, dtypes[0] if len(dtypes) == 1 else ",".join(map(str, dtypes)), self.mode)

    def torch_indices(self) -> list[int]:
        """The index ``torch.optim``'s state dicts give each trainable parameter (all params count).
        Trainable: at construction (a parameter frozen since keeps its place in the shard)."""
        trainable = {id(p) for p in self.buffers.params}
        indices, position = [], 0
        for group in self.param_groups:
            for param in group["params"]:
                if id(param) in trainable:
                    indices.append(position)
                position += 1
        return indices

    def group_keys(self) -> list[list[Any]]:
        """Each param group's parameters as a sharded checkpoint names them: by name where the optimizer
        was built from ``named_parameters()`` (torch keeps them as ``param_names``), else by their
        ``torch.optim`` index."""
        named = all("param_names" in group for group in self.param_groups)
        keys, position = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            keys.append(list(group["param_names"]) if named else list(range(position, position + count)))
            position += count
        return keys

    def param_keys(self) -> list[Any]:
        """The key of each trainable parameter (``group_keys``, trainable ones only)."""
        trainable = {id(p) for p in self.buffers.params}
        return [key for group, keys in zip(self.param_groups, self.group_keys()) for p, key in zip(group["params"], keys) if id(p) in trainable]

    # ------------------------------------------------------------------ saving
    def per_rank(self) -> dict[str, Any]:
        """This rank's whole state, copied: rounds that run after the call never change it."""
        snap = self.pipeline.snapshot()
        saved = self.base_state_dict()
        saved["param_groups"] = saved_param_groups(saved["param_groups"])
        in_flight = None
        if snap.in_flight is not None:
            result, param_shard = snap.in_flight
            in_flight = {"result": result_to_dict(result), "param_shard": _snapshot(param_shard)}
        saved["acco"] = {
            "format": PER_RANK,
            "version": FORMAT_VERSION,
            "rank": self.comm.rank,
            **self.fingerprint(),
            "master_shard": _snapshot(self.shard.master),
            "inner_state": _snapshot(self.shard.view_states()),
            "carried_gradients": None if snap.carried is None else _snapshot(snap.carried),
            "carried_count": snap.carried_count,
            "carried_mask": snap.carried_mask,
            "rounds_launched": snap.rounds_launched,
            "rounds_installed": snap.rounds_installed,
            "pending_calls": snap.pending_calls,
            "num_updates": snap.num_updates,
            "num_skipped_updates": snap.num_skipped,
            "in_flight": in_flight,
            "last_round": None if snap.last_round is None else result_to_dict(snap.last_round),
            "model_fingerprint": snap.model_fingerprint,
            "noise_scale": snap.noise_scale,
        }
        if snap.secant is not None:  # correction="secant" only: older readers never see the key
            saved["acco"]["secant"] = _snapshot(snap.secant)
        return saved

    def portable(self, to: int) -> Optional[dict[str, Any]]:
        """Collective, after ``finish()``: the committed state of every parameter, whole, on rank ``to``,
        in host memory. Each rank's shard goes to rank ``to`` in bounded pieces (``transfer``), never
        through an object collective."""
        shard, comm = self.shard, self.comm
        builder = PortableStateBuilder(self.layout, [p.shape for p in self.buffers.params]) if comm.rank == to else None
        for source in range(comm.world_size):
            payload = (shard.spans, shard.view_states(), shard.master) if comm.rank == source else None
            if source != to:
                payload = self._collective("consolidated_state_dict", send_to, comm, payload, source, to, comm.device)
            if builder is not None:
                builder.add_rank(source, *payload)
            del payload
        if builder is None:
            return None
        index = self.torch_indices()
        saved = self.base_state_dict()
        saved["param_groups"] = saved_param_groups(saved["param_groups"])
        saved["state"] = {index[t]: state for t, state in sorted(builder.state.items())}
        saved["acco"] = {
            "format": PORTABLE,
            "version": FORMAT_VERSION,
            **self.fingerprint(),
            "master": {index[t]: tensor for t, tensor in sorted(builder.master.items())},
            "elementwise_keys": sorted(builder.elementwise_keys),
            "num_updates": self.pipeline.num_updates,
            "num_skipped_updates": self.pipeline.num_skipped,
            "noise_scale": self.pipeline.noise_scale_average.state_dict(),
        }
        return saved

    def sharded(self) -> dict[str, Any]:
        """Collective, after ``finish()``: this rank's part of the sharded form (``sharded_checkpoint``),
        for ``torch.distributed.checkpoint``. Its master and state tensors are views of this rank's own
        (a save copies nothing); parameters without state yet get zeros, so that every checkpoint of a
        model has the same keys. Which parameters those are is the one thing the ranks exchange."""
        shard = self.shard
        view_states = shard.view_states()
        stateless_here = sorted({p for v, p in enumerate(shard.view_params) if v not in view_states})
        everyone = self._collective("sharded_state_dict", self.comm.all_gather_object, stateless_here)
        stateless = {p for rank_list in everyone for p in rank_list}
        shapes = [p.shape for p in self.buffers.params]
        keys = self.param_keys()
        saved = self.base_state_dict()
        groups = saved_param_groups(saved["param_groups"])
        for group, group_keys in zip(groups, self.group_keys()):
            group["params"] = group_keys
            for key, value in group.items():  # a tensor setting (lr): a load must not write into the live one
                if isinstance(value, torch.Tensor):
                    group[key] = value.detach().clone()

        def prototype(view: int) -> dict[str, Any]:
            param = shard.view_params[view]
            return shard.state_prototype(view, None if self.layout.param_kind(param) is PartitionKind.FLAT else shapes[param])

        header = {
            **self.fingerprint(),
            "keys": keys,
            "stateless": [keys[p] for p in sorted(stateless)],
            "num_updates": self.pipeline.num_updates,
            "num_skipped_updates": self.pipeline.num_skipped,
            # No noise-scale average: a template's keys are keys dcp.load requires, so one more would refuse
            # every sharded checkpoint written before it. It starts afresh after a sharded load.
        }
        return build_sharded(
            self.layout, self.comm.rank, shard.spans, shard.view_params, view_states, prototype, stateless, shard.master,
            shapes, keys, groups, header,
        )

    # ------------------------------------------------------------------ loading
    def load(self, state_dict: dict[str, Any]) -> None:
        """Validate on every rank, compare notes, then apply (see ``AccoOptimizer.load_state_dict``)."""
        rank = self.comm.rank
        self.pipeline.wait_for_rounds()  # nothing may run on our group meanwhile; replaced below on success
        error: Optional[Exception] = None
        apply: Any = None
        point = None
        try:
            form, meta = check_header(state_dict, self.fingerprint(), rank)
            check_param_groups(state_dict["param_groups"], self.param_groups)
            if form == PER_RANK:
                apply = self._plan_per_rank(meta)
                point = (form, meta.get("rounds_launched"), meta.get("rounds_installed"), meta.get("num_updates"))
            else:
                apply = self._plan_portable(state_dict, meta)
                point = (form, meta.get("num_updates"))
        except CheckpointError as caught:
            error = caught
        self._agree("load_state_dict", error, point)
        self._take_hyperparameters(state_dict["param_groups"])
        apply()

    def load_sharded(self, state_dict: dict[str, Any]) -> None:
        """Validate a template filled by ``dcp.load`` on every rank, compare notes, then install it: the
        master and state (the template's fresh buffers become the optimizer's own), the committed
        parameters into the model (all-gathered from the ranks' masters), the counters; nothing in flight."""
        shard, rank = self.shard, self.comm.rank
        self.pipeline.wait_for_rounds()
        error: Optional[Exception] = None
        loaded = None
        try:
            loaded, meta = read_sharded(
                state_dict, self.fingerprint(), rank, self.layout, shard.spans, shard.view_params,
                [p.shape for p in self.buffers.params], self.param_keys(), shard.master.dtype,
            )
            check_param_groups(state_dict["param_groups"], self.param_groups)
        except CheckpointError as caught:
            error = caught
        self._agree("load_sharded_state_dict", error, None if loaded is None else ("sharded", loaded.counters["num_updates"]))
        self._take_hyperparameters(state_dict["param_groups"])
        shard.master.zero_()  # padding stays zero
        for offset, run in loaded.master_runs:
            shard.master[offset : offset + run.numel()].copy_(run)
        shard.load_view_states(loaded.view_states, copy_tensors=False)
        for tensor in template_tensors(state_dict):  # their buffers are the optimizer's state now
            tensor.consume()
        self.pipeline.restore(PipelineSnapshot(
            num_updates=loaded.counters["num_updates"],
            num_skipped=loaded.counters["num_skipped_updates"],
            model_from_master=True,
        ))

    def _agree(self, what: str, error: Optional[Exception], point: Any) -> None:
        """Every rank's verdict on its own checkpoint, compared: an error anywhere is raised everywhere,
        before anything changes; so are checkpoints taken at different points."""
        verdicts = self._collective(what, self.comm.all_gather_object, {"error": None if error is None else str(error), "point": point})
        if error is not None:
            raise error
        for other, verdict in enumerate(verdicts):
            if verdict["error"] is not None:
                raise CheckpointError(f"rank {other} cannot load its checkpoint: {verdict['error']}")
        for other, verdict in enumerate(verdicts):
            if verdict["point"] != verdicts[0]["point"]:
                raise CheckpointError(
                    f"the ranks' checkpoints were taken at different points: (form, rounds launched, rounds installed, "
                    f"updates) is {verdicts[0]['point']} on rank 0 but {verdict['point']} on rank {other}"
                )

    def _take_hyperparameters(self, saved_groups: Sequence[Mapping[str, Any]]) -> None:
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", OPTIMIZER_KEY, "param_names")})

    def _plan_per_rank(self, meta: dict[str, Any]) -> Any:
        """Validate a per-rank checkpoint fully; return the function that applies it."""
        shard, pipeline = self.shard, self.pipeline
        flat_views = [self.layout.param_kind(p) is PartitionKind.FLAT for p in shard.view_params]
        saved = read_per_rank(meta, self.layout, shard.spans, shard.master.dtype, self.buffers.shard_dtype, flat_views)
        flight_result = None if saved.in_flight_result is None else result_from_dict(saved.in_flight_result)
        last = None if saved.last_round is None else result_from_dict(saved.last_round)
        counters = saved.counters
        noise_scale = read_noise_scale(meta)
        secant = read_secant(meta, self.layout.shard_size, shard.master.dtype)

        def apply() -> None:
            shard.master.copy_(saved.master_shard)
            shard.load_view_states(saved.inner_state)
            in_flight = None
            if flight_result is not None:
                in_flight = (flight_result, saved.in_flight_shard.to(self.buffers.device, copy=True))
            pipeline.restore(PipelineSnapshot(
                rounds_launched=counters["rounds_launched"],
                rounds_installed=counters["rounds_installed"],
                pending_calls=counters["pending_calls"],
                num_updates=counters["num_updates"],
                num_skipped=counters["num_skipped_updates"],
                last_round=last,
                in_flight=in_flight,
                carried=saved.carried_gradients,
                carried_count=counters["carried_count"],
                carried_mask=saved.carried_mask,
                model_fingerprint=saved.model_fingerprint,
                noise_scale=noise_scale,
                secant=secant,
            ))

        return apply

    def _plan_portable(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> Any:
        """Validate a portable checkpoint and cut this rank's shard of it; return the function that applies it."""
        shard, buffers, pipeline, rank = self.shard, self.buffers, self.pipeline, self.comm.rank
        saved = read_portable(state_dict, meta, self.layout, rank, shard.spans, self.torch_indices(), [p.shape for p in buffers.params])
        noise_scale = read_noise_scale(meta)

        def apply() -> None:
            master_shard_from_portable(self.layout, rank, saved.master, shard.master)
            shard.load_view_states(saved.inner_state)
            for t, view in enumerate(buffers.param_views):
                view.copy_(saved.master[t])  # the committed parameters, so the model matches the optimizer
            pipeline.restore(PipelineSnapshot(
                num_updates=saved.counters["num_updates"],
                num_skipped=saved.counters["num_skipped_updates"],
                model_fingerprint=model_fingerprint(buffers.param_flat),
                noise_scale=noise_scale,
            ))

        return apply
