"""Construction checks: every argument validated on its own rank, then compared across ranks, so
that a mistake raises the same clear error on every rank before anything is built
(docs/design.md §5). Also the checks the first ``step()`` in mode ``acco`` makes (callers that count calls as
updates, the batch rule)."""

from __future__ import annotations

import datetime
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .checkpoint import class_name
from .comm import Communicator
from .engine import choose_engine
from .layout import PartitionKind
from .policy import check_supported, choose_partition, needs_matrices
from .round import NONFINITE_POLICIES
from .secant import CORRECTIONS
from .schedule import Mode

logger = logging.getLogger("acco")

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]], torch.optim.Optimizer]

# The class attribute that marks AccoOptimizer (and its subclasses), which must be refused as an inner
# optimizer. Validation owns the marker and the facade sets it, so that validation never imports the
# facade it validates (the facade imports validation).
FACADE_MARKER = "_acco_facade"


def is_facade_class(cls: type) -> bool:
    """Whether ``cls`` is AccoOptimizer or a subclass (the marker is inherited, as ``issubclass`` would be)."""
    return getattr(cls, FACADE_MARKER, False) is True


_logged_single_worker = False
_warned_shared_restart_store = False


@dataclass
class Settings:
    """The constructor's arguments, checked on this rank."""

    groups: list[dict[str, Any]]  # the user's param groups (the template optimizers', with any "optimizer" key kept)
    defaults: dict[str, Any]  # the facade's (per-group optimizers: {}, every group is complete)
    optimizer_class: Optional[type]  # the one class; per-group optimizers: the default class (None if none was given)
    mode: Mode
    partition: PartitionKind  # FLAT, PARAM, or MIXED when the groups' optimizers need both
    blocking: bool
    max_grad_norm: Optional[float]
    comm_dtype: Optional[torch.dtype]  # None: each dtype lane communicates in its own dtype
    timeout: Optional[datetime.timedelta]
    nonfinite: str
    estimate: str
    engine: str
    signature: dict[str, Any]  # what every rank must have alike
    group_classes: list[type] = None  # the inner optimizer class of each param group
    class_defaults: dict[type, dict[str, Any]] = None  # each inner class's defaults (its template's)
    group_partitions: list[PartitionKind] = None  # the partition each group's optimizer needs
    correction: str = "none"  # what a commit does with the estimate's error (``secant``)

    @property
    def param_kinds(self) -> list[PartitionKind]:
        """The partition of each trainable parameter (its group's)."""
        return [self.group_partitions[g] for g in self.group_of]

    @property
    def lanes(self) -> list[int]:
        """The lane of each trainable parameter: its dtype's, numbered in order of first appearance."""
        order: dict[torch.dtype, int] = {}
        return [order.setdefault(p.dtype, len(order)) for p in self.trainable]

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
    correction: Any = "none",
) -> Settings:
    """This rank's verdict on the constructor's arguments (raises TypeError / ValueError / NotImplementedError)."""
    timeout = parse_timeout(timeout)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    templates = template_optimizers(params, optimizer_class, defaults)
    mode = parse_mode(mode)
    if mode is Mode.SYNC and not blocking:
        raise ValueError("blocking=False has no meaning in mode='sync', which waits for every round")
    hybrid = len(set(templates.group_classes)) > 1
    group_partitions = [
        choose_partition(cls, partition, f"param group {i} uses " if hybrid else "") for i, cls in enumerate(templates.group_classes)
    ]
    if max_grad_norm is not None and not (float(max_grad_norm) > 0):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    groups = templates.groups
    trainable = [p for g in groups for p in g["params"] if p.requires_grad]
    group_of = [i for i, g in enumerate(groups) for p in g["params"] if p.requires_grad]
    check_params(trainable)
    used = {group_partitions[g] for g in group_of}
    partition_kind = used.pop() if len(used) == 1 else PartitionKind.MIXED
    comm_dtype = parse_comm_dtype(comm_dtype)
    classes: Any = class_name(templates.group_classes[0]) if not hybrid else [class_name(c) for c in templates.group_classes]
    signature = signature_of(classes, mode, partition_kind, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of)
    signature["settings"]["nonfinite"] = nonfinite
    for cls in dict.fromkeys(templates.group_classes):
        check_estimate(estimate, mode, cls)
    signature["settings"]["estimate"] = estimate
    check_correction(correction, mode, estimate)
    signature["settings"]["correction"] = correction
    engine_kind = choose_engine(engine, trainable[0].device, backend_of(process_group))
    signature["settings"]["engine"] = engine_kind
    return Settings(
        groups=groups,
        defaults=dict(templates.defaults),
        optimizer_class=templates.default_class,
        mode=mode,
        partition=partition_kind,
        blocking=bool(blocking),
        max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
        comm_dtype=comm_dtype,
        timeout=timeout,
        nonfinite=nonfinite,
        estimate=estimate,
        engine=engine_kind,
        correction=correction,
        signature=signature,
        group_classes=list(templates.group_classes),
        class_defaults=dict(templates.class_defaults),
        group_partitions=group_partitions,
    )


@dataclass
class Templates:
    """The inner optimizers the user asked for, built once on full tensors so that each validates
    its own hyper-parameters before anything else changes."""

    groups: list[dict[str, Any]]  # complete param groups, in the user's order
    group_classes: list[type]  # the inner class of each group
    class_defaults: dict[type, dict[str, Any]]  # each class's defaults (its template's)
    defaults: dict[str, Any]  # the facade's
    default_class: Optional[type]


OPTIMIZER_KEY = "optimizer"  # a param group's own inner optimizer class


def template_optimizers(params: ParamsT, optimizer_class: Optional[type], defaults: dict[str, Any]) -> Templates:
    """The plain forms (one class) or per-group optimizers (groups with an ``"optimizer"`` key: it
    overrides ``optimizer_class``, which is the default for groups without the key; ``**defaults``
    are ``optimizer_class``'s constructor arguments, so they apply to the groups of that class)."""
    if not isinstance(params, torch.optim.Optimizer) and not isinstance(params, torch.Tensor):
        params = list(params)
        if any(isinstance(g, dict) and OPTIMIZER_KEY in g for g in params):
            return _per_group_templates(params, optimizer_class, defaults)
    template = template_optimizer(params, optimizer_class, defaults)
    cls = type(template)
    check_supported(cls)
    if any(OPTIMIZER_KEY in g for g in template.param_groups):
        raise TypeError(
            f"the {cls.__name__} to wrap has param groups with an {OPTIMIZER_KEY!r} key; to give groups their own optimizers, "
            "pass the param groups to AccoOptimizer itself: AccoOptimizer([{'params': ..., 'optimizer': torch.optim.Muon}, ...])"
        )
    groups = template.param_groups
    return Templates(groups, [cls] * len(groups), {cls: dict(template.defaults)}, dict(template.defaults), cls)


def _check_optimizer_class(cls: Any, what: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"{what} must be a torch.optim.Optimizer subclass, got {cls!r}")
    if is_facade_class(cls):
        raise TypeError(f"{what} cannot be AccoOptimizer itself")
    check_supported(cls)


def _per_group_templates(groups: list[Any], optimizer_class: Optional[type], defaults: dict[str, Any]) -> Templates:
    if optimizer_class is not None:
        _check_optimizer_class(optimizer_class, "optimizer_class")
    elif defaults:
        raise TypeError(
            f"hyper-parameter keywords {sorted(defaults)} are optimizer_class's constructor arguments, but no optimizer_class "
            "was given: put them in the param groups, or pass optimizer_class (the default for groups without 'optimizer')"
        )
    normalized, classes = [], []
    for index, group in enumerate(groups):
        if not isinstance(group, dict):
            raise TypeError(f"param group {index} is {type(group).__name__}; with per-group optimizers every entry must be a dict")
        cls = group.get(OPTIMIZER_KEY, optimizer_class)
        if cls is None:
            raise TypeError(
                f"param group {index} names no optimizer and no optimizer_class was given: add 'optimizer': <class> to "
                "the group, or pass optimizer_class as the default for groups without one"
            )
        _check_optimizer_class(cls, f"param group {index}'s 'optimizer'")
        normalized.append({**group, "params": _params_of(group)})
        classes.append(cls)
    check_one_group_per_parameter(normalized)
    check_matrices(normalized, classes)
    complete: list[Optional[dict[str, Any]]] = [None] * len(normalized)
    class_defaults: dict[type, dict[str, Any]] = {}
    for cls in dict.fromkeys(classes):  # one template per class, over its groups, in the user's order
        members = [i for i, c in enumerate(classes) if c is cls]
        own = [{k: v for k, v in normalized[i].items() if k != OPTIMIZER_KEY} for i in members]
        template = cls(own, **(defaults if cls is optimizer_class else {}))
        class_defaults[cls] = dict(template.defaults)
        for i, built in zip(members, template.param_groups):
            if OPTIMIZER_KEY in normalized[i]:
                built[OPTIMIZER_KEY] = normalized[i][OPTIMIZER_KEY]  # kept as given
            complete[i] = built
    return Templates(complete, classes, class_defaults, {}, optimizer_class)


def _params_of(group: dict[str, Any]) -> list[Any]:
    params = group.get("params", ())
    return [params] if isinstance(params, torch.Tensor) else list(params)


def check_one_group_per_parameter(groups: Sequence[dict[str, Any]]) -> None:
    seen: dict[int, int] = {}
    for index, group in enumerate(groups):
        for p in group["params"]:
            first = seen.setdefault(id(p), index)
            if first != index:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is in param groups {first} and {index}: each parameter belongs "
                    "to one group (and so to one optimizer)"
                )


def check_matrices(groups: Sequence[dict[str, Any]], classes: Sequence[type]) -> None:
    """Muon orthogonalises 2-D matrices: anything else must go to a group with another optimizer."""
    for index, (group, cls) in enumerate(zip(groups, classes)):
        if not needs_matrices(cls):
            continue
        for position, p in enumerate(group["params"]):
            if p.dim() != 2:
                raise ValueError(
                    f"param group {index} uses {cls.__name__}, which updates 2-D matrices only, but its parameter {position} "
                    f"has shape {tuple(p.shape)}; put biases, norms and embeddings in a group with another optimizer, e.g. "
                    "{'params': [...], 'optimizer': torch.optim.AdamW}"
                )


def template_optimizer(params: ParamsT, optimizer_class: Optional[type], defaults: dict[str, Any]) -> torch.optim.Optimizer:
    """The user's optimizer (instance form), or one built from the class form. Building it lets
    the inner optimizer validate its own hyper-parameters before anything else changes."""
    if is_facade_class(type(params)):
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
    if is_facade_class(optimizer_class):
        raise TypeError("optimizer_class cannot be AccoOptimizer itself")
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if params and all(isinstance(g, dict) for g in params):
        for group in params:  # as torch's add_param_group does, so that a generator is read once
            group["params"] = _params_of(group)
        check_matrices(params, [optimizer_class] * len(params))
    elif needs_matrices(optimizer_class):
        check_matrices([{"params": params}], [optimizer_class])
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


def check_correction(correction: Any, mode: Mode, estimate: str) -> None:
    """``correction="secant"`` corrects what acco's estimate error does to the halves: only mode
    ``acco`` has an estimate, and ``estimate="momentum"`` already changes what it steps on (untested together)."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if correction == "none":
        return
    if mode is not Mode.ACCO:
        raise ValueError(f"correction={correction!r} corrects the estimate's error, which only mode='acco' has (mode is {mode.value!r})")
    if estimate != "plain":
        raise ValueError(f"correction={correction!r} needs estimate='plain' (got {estimate!r}): the two are not defined together")


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


def parse_comm_dtype(comm_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """``None``: gradients travel in their parameters' dtype (each dtype lane in its own)."""
    if comm_dtype is None:
        return None
    if not isinstance(comm_dtype, torch.dtype) or not comm_dtype.is_floating_point:
        raise TypeError(f"comm_dtype must be a floating torch.dtype such as torch.bfloat16, got {comm_dtype!r}")
    return comm_dtype


def check_params(trainable: list[torch.Tensor]) -> None:
    if not trainable:
        raise ValueError("AccoOptimizer got no trainable parameters (all have requires_grad=False)")
    devices: dict[str, list[int]] = {}
    for index, p in enumerate(trainable):
        devices.setdefault(str(p.device), []).append(index)
    if len(devices) > 1:
        where = "; ".join(f"{device}: {_indices(indices)}" for device, indices in devices.items())
        raise ValueError(
            f"all trainable parameters must be on one device (one process drives one device; data parallelism "
            f"replicates the model), got trainable parameters {where}"
        )
    not_float = [index for index, p in enumerate(trainable) if not p.dtype.is_floating_point]
    if not_float:
        dtypes = sorted({str(trainable[i].dtype) for i in not_float})
        raise ValueError(f"trainable parameters must be floating point: trainable parameters {_indices(not_float)} are {dtypes}")
    for index, p in enumerate(trainable):
        if p.layout != torch.strided:
            raise ValueError(f"parameter {index} has layout {p.layout}; only dense (strided) parameters are supported")


def _indices(indices: list[int], shown: int = 8) -> str:
    """Parameter indices for a message: the first few, and how many more."""
    text = ", ".join(str(i) for i in indices[:shown])
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


def signature_of(optimizer_class, mode, partition, blocking, comm_dtype, max_grad_norm, groups, trainable, group_of) -> dict[str, Any]:
    """``optimizer_class``: the class's name, or (per-group optimizers) one name per group."""
    return {
        "params": [(tuple(p.shape), str(p.dtype), g) for p, g in zip(trainable, group_of)],
        "settings": {
            "optimizer_class": optimizer_class,
            "mode": mode.value,
            "partition": partition.value,
            "blocking": bool(blocking),
            "comm_dtype": str(comm_dtype),
            "max_grad_norm": max_grad_norm,
            "hyper-parameters": [{k: comparable(v) for k, v in g.items() if k != "params"} for g in groups],
        },
    }


def comparable(value: Any) -> Any:
    """A setting as the ranks compare it: its value, exactly, and never where it lives. A tensor's
    ``repr`` names its device (a CUDA learning rate is on cuda:0 on one rank and cuda:1 on the next)
    and rounds to 4 digits (1e-3 and 1.00001e-3 print alike); its dtype, shape and values do not."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), repr(value.detach().cpu().tolist()))
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return (type(value).__name__, tuple(comparable(v) for v in value))
    return repr(value)  # exact for numbers (repr(float) round-trips) and strings


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
    """The groups' settings as they are now (tensors copied, so later in-place edits do not leak in).
    The ``"optimizer"`` key is the facade's, never an inner optimizer's setting."""
    return [
        {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k not in ("params", OPTIMIZER_KEY)}
        for g in groups
    ]



BATCH_RULE = (
    "acco: in mode 'acco' one optimizer update is two step() calls, each on half of the update's batch, so a loop "
    "written for DDP makes half the updates it meant: give each call half the per-rank batch, make twice the calls "
    "and count a per-call scheduler (warm-up included) in calls (README, \"Batch size and schedule length\"), then "
    "pass AccoOptimizer(..., batch_rule_applied=True) to silence this warning"
)


def check_first_acco_step(optimizer: Any, depth: int = 16) -> None:
    """Mode ``acco``, at the first ``step()`` (every rank runs the same code, so every rank raises alike).

    Callers that count ``step()`` calls as updates are refused: a plain ``transformers.Trainer`` (it
    would also wrap the model in DDP and save an uncommitted estimate at the end) and accelerate's
    ``AcceleratedOptimizer`` (schedulers and accumulation counted in calls). Else the batch rule is
    logged once, unless the optimizer was told the loop applies it (``batch_rule_applied``)."""
    trainer_frame, accelerated_frame = _frames_that_count_calls(depth)
    if trainer_frame:
        raise ValueError(
            "acco: AccoOptimizer(mode='acco') is being stepped by a plain transformers.Trainer, which would count "
            "each of its two step() calls per update as a training step, wrap the model in DDP and save an "
            "uncommitted estimate at the end. Use acco.integrations.hf.AccoTrainer instead of Trainer (one line), "
            "or mode='sync'"
        )
    if accelerated_frame:
        raise ValueError(
            "acco: AccoOptimizer(mode='acco') is being stepped through accelerate's AcceleratedOptimizer "
            "(accelerator.prepare(..., optimizer, ...)), which takes each step() call for an update: in mode 'acco' an "
            "update is two calls, so the run would make half the updates its batch size and schedule assume. Pass only "
            "the dataloader and the scheduler to accelerator.prepare and call opt.step() yourself (the pattern in "
            "acco/integrations/hf.py, 'accelerate without Trainer'), use AccoTrainer with transformers.Trainer, "
            "or mode='sync'"
        )
    if not getattr(optimizer, "batch_rule_applied", False) and not getattr(optimizer, "_batch_rule_logged", False):
        optimizer._batch_rule_logged = True
        logger.warning(BATCH_RULE)


def _frames_that_count_calls(depth: int) -> tuple[bool, bool]:
    """Whether a plain ``transformers.Trainer`` method / ``AcceleratedOptimizer.step`` is among our callers.

    Only the Trainer's own frames are asked for ``self``: on Python < 3.13 reading ``f_locals`` leaves a
    snapshot of the frame's locals on it, which would keep the caller's objects (the optimizer itself, in a
    user's loop) alive after they are deleted. ``AcceleratedOptimizer.step`` is recognised by its code alone
    (a subclass that overrides ``step``, as AccoTrainer's fp16 wrapper does, is not it)."""
    trainer_class = getattr(sys.modules.get("transformers.trainer"), "Trainer", None)
    accelerated_class = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)
    trainer_code = set() if trainer_class is None else {f.__code__ for f in vars(trainer_class).values() if inspect.isfunction(f)}
    accelerated_step = getattr(vars(accelerated_class).get("step") if accelerated_class is not None else None, "__code__", None)
    trainer_frame = accelerated_frame = False
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            break
        if frame.f_code is accelerated_step:
            accelerated_frame = True
        elif frame.f_code in trainer_code:
            owner = frame.f_locals.get("self")
            trainer_frame = trainer_frame or (isinstance(owner, trainer_class) and not hasattr(owner, "acco_kwargs"))
        frame = frame.f_back
    return trainer_frame, accelerated_frame


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


def warn_if_restarts_share_a_store(global_rank: int) -> None:
    """torchrun restarts (``--max-restarts``) re-use the agent's TCPStore when it is shared with the workers (the
    static rendezvous always; c10d unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``): the restarted group then reads
    the dead group's keys and fails to connect, or hangs (pytorch/pytorch#135712; seen with gloo on torch 2.13).
    Said once, by global rank 0, at the first start, long before the restart that would fail."""
    global _warned_shared_restart_store
    if _warned_shared_restart_store or global_rank != 0:
        return
    _warned_shared_restart_store = True
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        logger.warning(
            "acco: torchrun may restart this job (--max-restarts %s) but shares its rendezvous store with the workers, so a "
            "restarted group can fail to connect or hang (pytorch/pytorch#135712). Launch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and the c10d rendezvous (--standalone on one node; --rdzv-backend c10d "
            "--rdzv-endpoint HOST:PORT --rdzv-id JOB on several)",
            os.environ["TORCHELASTIC_MAX_RESTARTS"],
        )
