"""Which partition each inner optimizer class needs, and which classes cannot be wrapped."""

from __future__ import annotations

import torch

from .layout import PartitionKind

# Update rules that treat every element on its own: a shard may cut through a tensor.
ELEMENTWISE_OPTIMIZERS: frozenset[type] = frozenset(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Rprop", "ASGD")
    if hasattr(torch.optim, name)
)

# Update rules that look at a whole tensor (orthogonalisation, factored moments, trust ratios).
WHOLE_TENSOR_OPTIMIZERS: frozenset[type] = frozenset(
    getattr(torch.optim, name) for name in ("Muon", "Adafactor") if hasattr(torch.optim, name)
)

UNSUPPORTED_OPTIMIZERS: dict[str, str] = {
    "LBFGS": "it re-evaluates the loss through a closure and keeps global line-search state",
    "SparseAdam": "it needs sparse gradients, which a flat gradient buffer cannot hold",
}


def check_supported(optimizer_class: type) -> None:
    for name, reason in UNSUPPORTED_OPTIMIZERS.items():
        cls = getattr(torch.optim, name, None)
        if cls is not None and issubclass(optimizer_class, cls):
            raise TypeError(f"AccoOptimizer cannot wrap {optimizer_class.__name__}: {reason}")


def needs_whole_tensors(optimizer_class: type) -> bool:
    return any(issubclass(optimizer_class, c) for c in WHOLE_TENSOR_OPTIMIZERS)


def needs_matrices(optimizer_class: type) -> bool:
    """Optimizers whose update is defined for 2-D parameters only (Muon orthogonalises a matrix)."""
    muon = getattr(torch.optim, "Muon", None)
    return muon is not None and issubclass(optimizer_class, muon)


def choose_partition(optimizer_class: type, requested: str, where: str = "") -> PartitionKind:
    """``auto`` gives ``flat`` to the element-wise optimizers of torch.optim, ``param`` to the rest.

    ``where`` names the param group in errors (per-group optimizers)."""
    if requested == "auto":
        return PartitionKind.FLAT if optimizer_class in ELEMENTWISE_OPTIMIZERS else PartitionKind.PARAM
    try:
        kind = PartitionKind(requested)
    except ValueError:
        kind = None
    if kind not in (PartitionKind.FLAT, PartitionKind.PARAM):
        raise ValueError(f"partition must be 'auto', 'flat' or 'param', got {requested!r}")
    if kind is PartitionKind.FLAT and needs_whole_tensors(optimizer_class):
        raise ValueError(
            f"partition='flat' would cut tensors apart, but {where}{optimizer_class.__name__} needs whole tensors; "
            "use partition='param' (or 'auto')"
        )
    return kind
