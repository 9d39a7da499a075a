"""Construction checks: every argument validated on its own rank, then compared across ranks, so
that a mistake raises the same clear error on every rank before anything is built
(docs/design.md §5). Also the checks a ``step()`` makes once (a plain Hugging Face ``Trainer``)."""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist

from .comm import Communicator
from .engine import choose_engine
from .layout import PartitionKind
from .policy import check_supported, choose_partition
from .round import NONFINITE_POLICIES
from .schedule import Mode

logger = logging.getLogger("acco")

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]], torch.optim.Optimizer]

_logged_single_worker = False


@dataclass
class Settings:
    """The constructor's arguments, checked on this rank."""

    groups: list[dict[str, Any]]  # the user's param groups (the template optimizer's)
    defaults: dict[str, Any]
    optimizer_class: type
    mode: Mode
    partition: PartitionKind
    blocking: bool
    max_grad_norm: Optional[float]
    comm_dtype: torch.dtype
    timeout: Optional[datetime.timedelta]
    nonfinite: str
    estimate: str
    engine: str
    signature: dict[str, Any]  # what every rank must have alike

    @property
    def all_params(self) -> list[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.all_params if p.requires_grad]

    @property
    def frozen(self) -> list[torch.Tensor]:
        return [p for p in self.all_params if not p.requires_grad]

    @property
    def group_of(self) -> list[int]:
        """The param group of each trainable parameter."""
        return [i for i, g in enumerate(self.groups) for p in g["params"] if p.requires_grad]


def check_arguments(
    params: ParamsT,
    optimizer_class: Optional[type],
    defaults: dict[str, Any],
    *,
    mode: Any,
    process_group: Optional[dist.ProcessGroup],
    partition: Any,
    max_grad_norm: Any,
    blocking: bool,
    comm_dtype: Any,
    timeout: Any,
    nonfinite: Any,
    engine: Any,
    estimate: Any,
) -> Settings:
    """This rank's verdict on the constructor's arguments (raises TypeError / ValueError / NotImplementedError)."""
    timeout = parse_timeout(timeout)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    template = template_optimizer(params, optimizer_class, defaults)
    optimizer_class = type(template)
    check_supported(optimizer_class)
    mode = parse_mode(mode)
    if mode is Mode.SYNC and not blocking:
        raise ValueError("blocking=False has no meaning in mode='sync', which waits for every round")
    partition_kind = choose_partition(optimizer_class, partition)
    if max_grad_norm is not None and not (float(max_grad_norm) > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    groups = template.param_groups
    trainable = [p for g in groups for p in g["params"] if p.requires_grad]
    group_of = [i for i, g in enumerate(groups) for p in g["params"] if p.requires_grad]
    check_params(trainable)
    comm_dtype = parse_comm_dtype(comm_dtype, trainable[0].dtype)
    signature = signature_of(optimizer_class, mode, partition_kind, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of)
    signature["settings"]["nonfinite"] = nonfinite
    check_estimate(estimate, mode, optimizer_class)
    signature["settings"]["estimate"] = estimate
    engine_kind = choose_engine(engine, trainable[0].device, backend_of(process_group))
    signature["settings"]["engine"] = engine_kind
    return Settings(
        groups=groups,
        defaults=dict(template.defaults),
        optimizer_class=optimizer_class,
        mode=mode,
        partition=partition_kind,
        blocking=bool(blocking),
        max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
        comm_dtype=comm_dtype,
        timeout=timeout,
        nonfinite=nonfinite,
        estimate=estimate,
        engine=engine_kind,
        signature=signature,
    )


def template_optimizer(params: ParamsT, optimizer_class: Optional[type], defaults: dict[str, Any]) -> torch.optim.Optimizer:
    """The user's optimizer (instance form), or one built from the class form. Building it lets
    the inner optimizer validate its own hyper-parameters before anything else changes."""
    from .optimizer import AccoOptimizer  # the facade imports this module

    if isinstance(params, AccoOptimizer):
        raise TypeError("cannot wrap an AccoOptimizer in another AccoOptimizer")
    if isinstance(params, torch.optim.Optimizer):
        if optimizer_class is not None or defaults:
            raise TypeError(
                "when wrapping an optimizer instance, pass neither optimizer_class nor hyper-parameters "
                f"(got optimizer_class={optimizer_class!r}, {sorted(defaults)})"
            )
        if any(len(s) for s in params.state.values()):
            raise ValueError(
                f"the {type(params).__name__} to wrap already has optimizer state; wrap a freshly built optimizer"
            )
        return params
    if optimizer_class is None:
        raise TypeError("optimizer_class is required unless params is a torch.optim.Optimizer instance")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if issubclass(optimizer_class, AccoOptimizer):
        raise TypeError("optimizer_class cannot be AccoOptimizer itself")
    if isinstance(params, torch.Tensor):
        params = [params]
    return optimizer_class(params, **defaults)


def backend_of(process_group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """The backend our collectives will use; ``None`` when there is no one to talk to."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(process_group) == 1:
        return None
    return str(dist.get_backend(process_group))


def parse_timeout(timeout: Any) -> Optional[datetime.timedelta]:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        value = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        value = datetime.timedelta(seconds=float(timeout))
    else:
        raise TypeError(f"timeout must be a datetime.timedelta or a number of seconds, got {timeout!r}")
    if value is not None and value.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return value



ESTIMATES = ("plain", "momentum")
_FIRST_MOMENT_OPTIMIZERS = tuple(
    getattr(torch.optim, name) for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax") if hasattr(torch.optim, name)
)


def check_estimate(estimate: Any, mode: Mode, optimizer_class: type) -> None:
    if estimate not in ESTIMATES:
        raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
    if estimate == "plain":
        return
    if mode is not Mode.ACCO:
        raise ValueError(f"estimate={estimate!r} shapes estimate rounds, which only mode='acco' has (mode is {mode.value!r})")
    if not issubclass(optimizer_class, _FIRST_MOMENT_OPTIMIZERS):
        raise ValueError(
            f"estimate='momentum' predicts the second half's gradient by the optimizer's first moment (exp_avg, betas); "
            f"{optimizer_class.__name__} has none. Use estimate='plain'"
        )


def parse_mode(mode: Any) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be one of {[m.value for m in Mode]}, got {mode!r}") from None


def parse_comm_dtype(comm_dtype: Optional[torch.dtype], param_dtype: torch.dtype) -> torch.dtype:
    if comm_dtype is None:
        return param_dtype
    if not isinstance(comm_dtype, torch.dtype) or not comm_dtype.is_floating_point:
        raise TypeError(f"comm_dtype must be a floating torch.dtype such as torch.bfloat16, got {comm_dtype!r}")
    return comm_dtype


def check_params(trainable: list[torch.Tensor]) -> None:
    if not trainable:
        raise ValueError("AccoOptimizer got no trainable parameters (all have requires_grad=False)")
    devices = sorted({str(p.device) for p in trainable})
    if len(devices) > 1:
        raise ValueError(f"all trainable parameters must be on one device, got {devices}")
    dtypes = sorted({str(p.dtype) for p in trainable})
    if len(dtypes) > 1:
        raise ValueError(
            f"all trainable parameters must share one dtype, got {dtypes}; cast the model (e.g. model.to(torch.bfloat16))"
        )
    if not trainable[0].dtype.is_floating_point:
        raise ValueError(f"trainable parameters must be floating point, got {trainable[0].dtype}")
    for index, p in enumerate(trainable):
        if p.layout != torch.strided:
            raise ValueError(f"parameter {index} has layout {p.layout}; only dense (strided) parameters are supported")


def signature_of(optimizer_class, mode, partition, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of) -> dict[str, Any]:
    return {
        "params": [(tuple(p.shape), str(p.dtype), g) for p, g in zip(trainable, group_of)],
        "settings": {
            "optimizer_class": f"{optimizer_class.__module__}.{optimizer_class.__qualname__}",
            "mode": mode.value,
            "partition": partition.value,
            "blocking": bool(blocking),
            "comm_dtype": str(comm_dtype),
            "max_grad_norm": max_grad_norm,
            "hyper-parameters": [{k: repr(v) for k, v in g.items() if k != "params"} for g in groups],
        },
    }


def check_same_on_every_rank(comm: Communicator, signature: Optional[dict[str, Any]], local_error: Optional[Exception]) -> None:
    """Collective: every rank sees every rank's verdict and signature, so every rank raises alike.

    Parameters are compared before settings: a dtype difference also changes the default comm_dtype.
    """
    verdict = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    everyone = comm.all_gather_object({"error": verdict, "signature": signature})
    if local_error is not None:
        raise local_error
    for rank, other in enumerate(everyone):
        if other["error"] is not None:
            raise ValueError(f"rank {rank} rejected its AccoOptimizer arguments: {other['error']}")
    reference = everyone[0]["signature"]
    for rank, other in enumerate(everyone[1:], start=1):
        other = other["signature"]
        if other == reference:
            continue
        mine, theirs = reference["params"], other["params"]
        if len(mine) != len(theirs):
            raise ValueError(f"trainable parameters differ across ranks: rank 0 has {len(mine)}, rank {rank} has {len(theirs)}")
        for index, (a, b) in enumerate(zip(mine, theirs)):
            if a != b:
                raise ValueError(
                    f"trainable parameter {index} differs across ranks: (shape, dtype, group) is {a} on rank 0 but {b} on rank {rank}"
                )
        for key, value in reference["settings"].items():
            if other["settings"][key] != value:
                raise ValueError(
                    f"AccoOptimizer settings differ across ranks: {key} is {value!r} on rank 0 but {other['settings'][key]!r} on rank {rank}"
                )


def group_settings(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups' settings as they are now (tensors copied, so later in-place edits do not leak in)."""
    return [
        {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
        for g in groups
    ]



def refuse_plain_hf_trainer(depth: int = 12) -> None:
    """Mode ``acco`` under a plain ``transformers.Trainer`` trains, but wrongly for its user: Trainer counts
    ``step()`` calls as updates (two per update here), wraps the model in DDP and saves an uncommitted
    estimate at the end. Checked once, at the first ``step()`` (every rank runs the same Trainer)."""
    trainer_module = sys.modules.get("transformers.trainer")
    trainer_class = getattr(trainer_module, "Trainer", None)
    if trainer_class is None:
        return
    # Only the Trainer's own frames are asked for ``self``: on Python < 3.13 reading ``f_locals``
    # leaves a snapshot of the frame's locals on it, which would keep the caller's objects (the
    # optimizer itself, in a user's loop) alive after they are deleted.
    trainer_code = {f.__code__ for f in vars(trainer_class).values() if inspect.isfunction(f)}
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        owner = frame.f_locals.get("self") if frame.f_code in trainer_code else None
        if isinstance(owner, trainer_class) and not hasattr(owner, "acco_kwargs"):
            raise ValueError(
                "acco: AccoOptimizer(mode='acco') is being stepped by a plain transformers.Trainer, which would count "
                "each of its two step() calls per update as a training step, wrap the model in DDP and save an "
                "uncommitted estimate at the end. Use acco.integrations.hf.AccoTrainer instead of Trainer (one line), "
                "or mode='sync'"
            )
        frame = frame.f_back


def log_single_worker_once() -> None:
    global _logged_single_worker
    if _logged_single_worker:
        return
    _logged_single_worker = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.warning(
            "acco: WORLD_SIZE=%s but torch.distributed is not initialised: this process trains alone. "
            "Call torch.distributed.init_process_group() before building AccoOptimizer.",
            os.environ["WORLD_SIZE"],
        )
    else:
        logger.info("acco: a single worker (no process group, or a group of one): nothing to communicate")
