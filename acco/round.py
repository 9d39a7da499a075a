"""One round, in its plain phases: agree on counts → reduce-scatter → average → clip →
step the shard (tentatively for an estimate) → all-gather the parameters.

Runs in the engine's background thread. It touches only the communication buffer, the shard
buffers and the inner optimizer; the training thread touches the model and the gradient buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .comm import Communicator
from .schedule import Launch, RoundKind
from .shard import ShardOptimizer

_CLIP_EPS = 1e-6  # the same epsilon as torch.nn.utils.clip_grad_norm_


@dataclass(frozen=True)
class RoundResult:
    index: int
    kind: RoundKind
    local_count: int  # step() calls this rank fed into the round
    global_count: int  # step() calls all ranks fed into the round
    total_count: int  # micro-batches averaged (an estimate's count is added to its commit)
    all_finishing: bool  # every rank launched this round from finish()
    updated: bool  # the optimizer stepped (a round with no gradients changes nothing)
    grad_norm: Optional[float]  # global norm of the averaged gradient, before clipping


class RoundRunner:
    def __init__(
        self,
        comm: Communicator,
        shard: ShardOptimizer,
        comm_grads: torch.Tensor,
        comm_params: torch.Tensor,
        max_grad_norm: Optional[float],
    ) -> None:
        self.comm = comm
        self.shard = shard
        self.comm_grads = comm_grads  # world * shard elements, comm dtype
        self.comm_params = comm_params  # world * shard elements, parameter dtype (same memory)
        self.max_grad_norm = max_grad_norm
        size, master = shard.master.numel(), shard.master
        same_grad_dtype = comm_grads.dtype == master.dtype
        self._grad_shard_comm = shard.grad if same_grad_dtype else torch.empty(size, dtype=comm_grads.dtype, device=master.device)
        same_param_dtype = comm_params.dtype == master.dtype
        self._param_shard = None if same_param_dtype else torch.empty(size, dtype=comm_params.dtype, device=master.device)
        self._carried: Optional[torch.Tensor] = None  # the last estimate's summed gradient shard
        self._carried_count = 0
        self._output = comm_params

    def run(
        self, launch: Launch, hyperparameters: Sequence[dict[str, Any]], finishing: bool, output: Optional[torch.Tensor] = None
    ) -> RoundResult:
        """``output``: where the all-gathered parameters go (default: the communication buffer).
        The model's own flat buffer may be given when nothing reads the model during the round."""
        self._output = self.comm_params if output is None else output
        global_count, finishing_ranks = self._agree_on_counts(launch.local_count, finishing)
        grad = self._reduce_scatter(launch.local_count, global_count)
        total_count = global_count
        if launch.adds_estimate_gradients:
            grad.add_(self._carried)
            total_count += self._carried_count
        if launch.kind is RoundKind.ESTIMATE:
            self._carry(grad, global_count)
        else:
            self._carried_count = 0
        norm = None
        updated = total_count > 0
        if updated:
            grad.div_(total_count)
            if self.max_grad_norm is not None:
                norm = self._clip(grad)
            self.shard.apply_hyperparameters(hyperparameters)
            if launch.kind is RoundKind.ESTIMATE:
                self.shard.tentative_step(self._all_gather_params)
            else:
                self.shard.step()
                self._all_gather_params()
        else:
            self._all_gather_params()
        return RoundResult(
            index=launch.index,
            kind=launch.kind,
            local_count=launch.local_count,
            global_count=global_count,
            total_count=total_count,
            all_finishing=finishing_ranks == self.comm.world_size,
            updated=updated,
            grad_norm=norm,
        )

    def _agree_on_counts(self, local_count: int, finishing: bool) -> tuple[int, int]:
        counts = torch.tensor([float(local_count), 1.0 if finishing else 0.0], dtype=torch.float64, device=self.shard.master.device)
        self.comm.all_reduce_sum(counts)
        global_count, finishing_ranks = counts.tolist()
        return int(global_count), int(finishing_ranks)

    def _reduce_scatter(self, local_count: int, global_count: int) -> torch.Tensor:
        """Sum of all ranks' gradients, this rank's shard, in the master dtype."""
        grad = self.shard.grad
        if global_count == 0:  # every rank agrees: nothing to reduce
            grad.zero_()
            return grad
        if local_count == 0:  # this rank only joins (e.g. it is finishing)
            self.comm_grads.zero_()
        self.comm.reduce_scatter_sum(self._grad_shard_comm, self.comm_grads)
        if self._grad_shard_comm is not grad:
            grad.copy_(self._grad_shard_comm)
        return grad

    def _carry(self, grad: torch.Tensor, count: int) -> None:
        if self._carried is None:
            self._carried = torch.empty_like(grad)
        self._carried.copy_(grad)
        self._carried_count = count

    def _clip(self, grad: torch.Tensor) -> float:
        """Clip by the global norm of the averaged gradient, all shards together."""
        square = torch.linalg.vector_norm(grad).square().reshape(1)
        self.comm.all_reduce_sum(square)
        norm = math.sqrt(square.item())
        coefficient = min(self.max_grad_norm / (norm + _CLIP_EPS), 1.0)
        if coefficient < 1.0:
            grad.mul_(coefficient)
        return norm

    def _all_gather_params(self) -> None:
        source = self.shard.master
        if self._param_shard is not None:
            self._param_shard.copy_(source)
            source = self._param_shard
        self.comm.all_gather(self._output, source)

    @property
    def carried_bytes(self) -> int:
        return 0 if self._carried is None else self._carried.numel() * self._carried.element_size()

    @property
    def conversion_bytes(self) -> int:
        """Shard-sized buffers for a comm or parameter dtype other than the master's."""
        extra = [t for t in (self._param_shard,) if t is not None]
        if self._grad_shard_comm is not self.shard.grad:
            extra.append(self._grad_shard_comm)
        return sum(t.numel() * t.element_size() for t in extra)
