"""acco: Accumulate While You Communicate — a ZeRO-1 sharded optimizer that hides its
communication behind the next gradients' computation (Nabli et al., arXiv 2406.02613)."""

from .errors import (
    CheckpointError,
    CollectiveError,
    NonFiniteGradientError,
    OptimizerClosedError,
    ParameterOwnershipError,
    PipelineFailedError,
    ShardedStateError,
)
from .layout import Layout, PartitionKind, build_layout
from .noise_scale import NoiseScale, NoiseScaleEMA
from .optimizer import AccoOptimizer
from .outcome import RoundResult
from .schedule import Mode, RoundKind

__all__ = [
    "AccoOptimizer",
    "CheckpointError",
    "CollectiveError",
    "Layout",
    "Mode",
    "NoiseScale",
    "NoiseScaleEMA",
    "NonFiniteGradientError",
    "OptimizerClosedError",
    "ParameterOwnershipError",
    "PartitionKind",
    "PipelineFailedError",
    "RoundKind",
    "RoundResult",
    "ShardedStateError",
    "build_layout",
]
__version__ = "0.1.0"
