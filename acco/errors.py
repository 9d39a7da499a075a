"""Every exception a user of acco may catch, in one place (exported from ``acco``). Each line says
when it is raised; every one of them is raised on every rank alike unless it says otherwise."""

from __future__ import annotations


class ParameterOwnershipError(RuntimeError):
    """The model's parameters changed in a way the optimizer cannot adopt (moved to another device,
    cast, reshaped, unfrozen), or were written on some ranks only; nothing was updated."""


class NonFiniteGradientError(FloatingPointError):
    """The averaged gradient of a round holds NaN or Inf (``nonfinite="raise"``); nothing was updated."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died, stopped calling ``step()`` / ``finish()``, or a
    collective method (a checkpoint, ``adopt_model_parameters``) was called on some ranks only."""


class PipelineFailedError(RuntimeError):
    """Any call after a round (or a check the ranks made together) failed: the optimizer cannot
    continue; the cause is chained. Restart from a checkpoint."""


class OptimizerClosedError(RuntimeError):
    """An AccoOptimizer was used after ``close()`` (raised on the calling rank; no collective runs)."""


class CheckpointError(ValueError):
    """A state dict that cannot be loaded into this optimizer; the message names what differs."""


class ShardedStateError(KeyError):
    """``opt.state[p]`` on an AccoOptimizer: the state is sharded across ranks (raised on the
    calling rank); ``consolidated_state_dict()`` gives all of it."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])
