"""acco: Accumulate While You Communicate — a ZeRO-1 sharded optimizer that hides its
communication behind the next gradients' computation (Nabli et al., arXiv 2406.02613)."""

from .checkpoint import CheckpointError
from .layout import Layout, PartitionKind, build_layout
from .optimizer import AccoOptimizer
from .pipeline import OptimizerClosedError
from .round import CollectiveError, NonFiniteGradientError, ParameterOwnershipError, RoundResult
from .schedule import Mode, RoundKind

__all__ = [
    "AccoOptimizer",
    "CheckpointError",
    "CollectiveError",
    "Layout",
    "Mode",
    "NonFiniteGradientError",
    "OptimizerClosedError",
    "ParameterOwnershipError",
    "PartitionKind",
    "RoundKind",
    "RoundResult",
    "build_layout",
]
__version__ = "0.1.0"
