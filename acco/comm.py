"""The four collectives a round needs, over a process group of our own or a single process.

The optimizer never calls ``torch.distributed`` directly in the hot path; it calls these. That
keeps the round readable, lets the single-worker fallback run the very same code, and keeps gloo's
chunked collectives (bounded temporaries) in one place.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import pickle
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import CollectiveError

logger = logging.getLogger("acco")


class Communicator:
    """Collectives for one data-parallel group. All methods are blocking and in place."""

    rank: int = 0
    world_size: int = 1
    backend: str = "none"
    timeout: Optional[datetime.timedelta] = None  # how long a collective waits for the peers
    scratch_bytes: int = 0  # chunk-sized buffers the collectives keep

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (n) receives the sum over ranks of chunk ``rank`` of ``input`` (world * n)."""
        raise NotImplementedError

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """``output`` (world * n) receives every rank's ``input`` (n), in rank order."""
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order. Tensors in it arrive in host memory (use
        ``transfer.send_to`` for anything larger than a few numbers)."""
        raise NotImplementedError

    def broadcast_object(self, obj: Any, src_rank: int) -> Any:
        """Every rank returns ``src_rank``'s ``obj``; tensors in it arrive in host memory."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Where this group's collectives take their tensors (the current GPU for NCCL)."""
        return torch.device("cpu")

    def close(self) -> None:
        pass


class LocalCommunicator(Communicator):
    """A group of one: every collective is a copy or nothing."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.data_ptr() != input.data_ptr():
            output.copy_(input)

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        pass

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src_rank: int) -> Any:
        return obj


# gloo's collectives copy their whole input or output into temporaries; ours go in pieces that
# span this many elements over all ranks together (4 MiB of fp32), whatever the world size,
# which bounds those temporaries and our own scratch.
GLOO_CHUNK_ELEMENTS = 1 << 20


class ProcessGroupCommunicator(Communicator):
    """Collectives on a private process group spanning the user's data-parallel ranks.

    A private group keeps our background collectives from interleaving with collectives the
    training script issues on its own groups (docs/design.md §5: collective order across threads).
    """

    def __init__(self, parent: Optional[dist.ProcessGroup] = None, timeout: Optional[datetime.timedelta] = None) -> None:
        whole_world = parent is None or parent == dist.group.WORLD
        ranks = dist.get_process_group_ranks(dist.group.WORLD if whole_world else parent)
        self.timeout = resolve_timeout(dist.group.WORLD if whole_world else parent, timeout)
        kwargs = {"timeout": self.timeout}
        # A sub-group (one data-parallel replica of several) is created by its members alone.
        # Such groups are named after their ranks, and a destroyed group's name (and its stale
        # rendezvous keys in the store) would be reused by the next one: so those are never
        # destroyed. Whole-world groups get fresh names and are destroyed by close().
        self._destroyable = whole_world
        self.group = dist.new_group(ranks=ranks, use_local_synchronization=not whole_world, **kwargs)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        self._chunked = self.backend == "gloo"
        self._reduce_scatter_via = self._choose_reduce_scatter()
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # host memory, one per dtype

    def _choose_reduce_scatter(self) -> str:
        """How to reduce-scatter: NCCL's own; on gloo, pairwise sends straight from the input and a
        local sum (gloo's reduce-scatter all-reduces a copy of the whole input: twice the traffic,
        1.5x the memory), or for CUDA tensors staged through host memory a chunked all-to-all;
        all-reduce where nothing else exists. Probes fail locally, before any traffic, alike on
        every rank (same build)."""
        device = self._device()
        candidates = (["pairwise", "all_to_all"] if self._chunked else []) + ["native"]
        for name in candidates:
            try:
                if name == "pairwise":
                    for work in self._exchange([(peer, torch.ones(1), torch.zeros(1)) for peer in self._peers()]):
                        work.wait()
                elif name == "all_to_all":
                    dist.all_to_all_single(
                        torch.zeros(self.world_size, device=device), torch.ones(self.world_size, device=device), group=self.group
                    )
                else:
                    dist.reduce_scatter_tensor(torch.zeros(1, device=device), torch.ones(self.world_size, device=device), group=self._live())
                return name
            except (RuntimeError, NotImplementedError) as error:
                logger.info("acco: %s has no %s (%s)", self.backend, name, error)
        logger.info("acco: %s reduce-scatters through all_reduce", self.backend)
        return "all_reduce"

    def _peers(self) -> list[int]:
        return [peer for peer in range(self.world_size) if peer != self.rank]

    def _exchange(self, transfers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[Any]:
        """Post ``(peer, send, receive)`` point-to-point transfers on our group at once; returns
        their works. Contiguous views go to the socket as they are: no staging copy. A peer that
        never answers fails the wait after the group's timeout."""
        group = self._live()
        operations = []
        for peer, outgoing, incoming in transfers:
            operations.append(dist.P2POp(dist.isend, outgoing, peer, group))
            operations.append(dist.P2POp(dist.irecv, incoming, peer, group))
        return dist.batch_isend_irecv(operations)

    def _live(self) -> dist.ProcessGroup:
        """Our group, never the default one: a closed communicator refuses every collective."""
        if self.group is None:
            raise RuntimeError("acco: this optimizer's process group was closed (close() was called)")
        return self.group

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        if self._staged(tensor):
            host = tensor.cpu()
            dist.all_reduce(host, op=dist.ReduceOp.SUM, group=self._live())
            tensor.copy_(host)
            return
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self._live())

    def _staged(self, tensor: torch.Tensor) -> bool:
        """gloo gets CUDA tensors through host memory, copied here piece by piece (its own CUDA
        support differs between collectives and builds). Only the worker thread runs these."""
        return self._chunked and tensor.device.type != "cpu"

    def reduce_scatter_sum(self, output: torch.Tensor, input: torch.Tensor) -> None:
        staged = self._staged(input)
        if staged and self._reduce_scatter_via not in ("all_to_all", "pairwise"):
            host = output.cpu()
            self.reduce_scatter_sum(host, input.cpu())
            output.copy_(host)
            return
        if self._reduce_scatter_via == "native":
            dist.reduce_scatter_tensor(output, input, group=self._live())
        elif self._reduce_scatter_via == "pairwise" and not staged:
            self._reduce_scatter_pairwise(output, input)
        elif self._reduce_scatter_via in ("all_to_all", "pairwise"):
            self._reduce_scatter_all_to_all(output, input)
        else:
            dist.all_reduce(input, op=dist.ReduceOp.SUM, group=self._live())
            n = output.numel()
            output.copy_(input[self.rank * n : (self.rank + 1) * n])

    def _reduce_scatter_pairwise(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """Chunk by chunk, each rank sends piece j of every other rank's region straight from the
        input and receives the others' pieces of its own region into scratch, then adds them to its
        own piece. Each element crosses the network once and is copied by nobody; the next chunk is
        in flight while this one is summed (two chunk-sized scratch halves)."""
        world, n = self.world_size, output.numel()
        chunk = self._chunk(n)
        peers = self._peers()
        scratch = self._scratch_for(2 * (world - 1) * chunk, input.dtype)
        halves = (scratch[: (world - 1) * chunk], scratch[(world - 1) * chunk :])
        regions = input.view(world, n)

        def post(start: int, half: torch.Tensor) -> tuple[int, int, torch.Tensor, list[Any]]:
            length = min(chunk, n - start)
            incoming = half[: (world - 1) * length].view(world - 1, length)
            works = self._exchange([(peer, regions[peer, start : start + length], incoming[k]) for k, peer in enumerate(peers)])
            return start, length, incoming, works

        pending = post(0, halves[0])
        for index, next_start in enumerate(list(range(chunk, n, chunk)) + [None]):
            start, length, incoming, works = pending
            for work in works:
                work.wait()
            if next_start is not None:
                pending = post(next_start, halves[(index + 1) % 2])
            piece = output[start : start + length]
            torch.add(regions[self.rank, start : start + length], incoming[0], out=piece)
            for received in incoming[1:]:
                piece.add_(received)

    def _reduce_scatter_all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """Chunk by chunk: every rank sends piece j of each rank's region to that rank, then sums the
        pieces it received. Each element crosses the network once, and temporaries stay chunk-sized."""
        world, n = self.world_size, output.numel()
        chunk = self._chunk(n)
        scratch = self._scratch_for(2 * world * chunk, input.dtype)
        send, receive = scratch[: world * chunk], scratch[world * chunk :]
        regions = input.view(world, n)
        staged = self._staged(output)
        for start in range(0, n, chunk):
            length = min(chunk, n - start)
            outgoing = send[: world * length].view(world, length)
            incoming = receive[: world * length].view(world, length)
            outgoing.copy_(regions[:, start : start + length])
            dist.all_to_all_single(incoming, outgoing, group=self._live())
            if staged:
                output[start : start + length].copy_(incoming.sum(dim=0))
            else:
                torch.sum(incoming, dim=0, out=output[start : start + length])

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if self._chunked and not self._staged(output) and self._reduce_scatter_via == "pairwise":
            # Every rank's shard straight into its place in the output: no temporaries, no copies.
            n = input.numel()
            regions = output.view(self.world_size, n)
            for work in self._exchange([(peer, input, regions[peer]) for peer in self._peers()]):
                work.wait()
            if regions[self.rank].data_ptr() != input.data_ptr():
                regions[self.rank].copy_(input)
        elif self._chunked:  # gloo gathers into a temporary of the output's size: keep it chunk-sized
            n = input.numel()
            regions = output.view(self.world_size, n)
            chunk = self._chunk(n)
            staged = self._staged(output)
            if staged:
                scratch = self._scratch_for((self.world_size + 1) * chunk, output.dtype)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                if not staged:
                    dist.all_gather(list(regions[:, start:end].unbind(0)), input[start:end], group=self._live())
                    continue
                length = end - start
                mine = scratch[:length]
                gathered = scratch[chunk : chunk + self.world_size * length].view(self.world_size, length)
                mine.copy_(input[start:end])
                dist.all_gather(list(gathered.unbind(0)), mine, group=self._live())
                regions[:, start:end].copy_(gathered)
        else:
            dist.all_gather_into_tensor(output, input, group=self._live())

    def _chunk(self, n: int) -> int:
        """Elements per rank in one piece."""
        return max(1, min(GLOO_CHUNK_ELEMENTS // self.world_size, n))

    def _scratch_for(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        scratch = self._scratch.get(dtype)
        if scratch is None or scratch.numel() < numel:
            scratch = self._scratch[dtype] = torch.empty(numel, dtype=dtype)
            # Published as one number: the training thread reads it while this (worker) thread may
            # insert into the dict, and iterating a dict that grows meanwhile raises.
            self.scratch_bytes = sum(t.numel() * t.element_size() for t in self._scratch.values())
        return scratch[:numel]

    def broadcast(self, tensor: torch.Tensor, src_rank: int = 0) -> None:
        target = tensor.cpu() if self._staged(tensor) else tensor
        group = self._live()
        dist.broadcast(target, src=dist.get_global_rank(group, src_rank), group=group)
        if target is not tensor:
            tensor.copy_(target)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Pickle through byte tensors (torch's own all_gather_object needs numpy)."""
        device = self._device()
        payload = torch.frombuffer(bytearray(pickle.dumps(on_host(obj))), dtype=torch.uint8).to(device)
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=device)
        self.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.int64, device=device))
        longest = int(sizes.max().item())
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: payload.numel()] = payload
        gathered = torch.empty(self.world_size * longest, dtype=torch.uint8, device=device)
        self.all_gather(gathered, padded)
        rows = gathered.view(self.world_size, longest).cpu()
        return [pickle.loads(_tensor_bytes(rows[r, : int(sizes[r])])) for r in range(self.world_size)]

    def broadcast_object(self, obj: Any, src_rank: int) -> Any:
        device = self._device()
        size = torch.zeros(1, dtype=torch.int64, device=device)
        payload = None
        if self.rank == src_rank:
            payload = torch.frombuffer(bytearray(pickle.dumps(on_host(obj))), dtype=torch.uint8).to(device)
            size[0] = payload.numel()
        self.broadcast(size, src_rank)
        if payload is None:
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        self.broadcast(payload, src_rank)
        return obj if self.rank == src_rank else pickle.loads(_tensor_bytes(payload))

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device()

    def close(self) -> None:
        if self.group is not None and self._destroyable and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None


def on_host(obj: Any) -> Any:
    """``obj`` with every tensor inside dicts, lists and tuples copied to host memory: a pickled CUDA
    tensor would be unpickled onto the sender's device index on every receiver (another rank's GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if isinstance(obj, dict):
        return {key: on_host(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(on_host(value) for value in obj)
    return obj


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The bytes of a uint8 tensor, in one memory copy (without numpy; ``bytes(storage)`` would
    go through Python one byte at a time)."""
    flat = tensor.cpu().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel())


DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def resolve_timeout(parent: dist.ProcessGroup, timeout: Optional[datetime.timedelta]) -> datetime.timedelta:
    """The user's ``timeout``; else the parent group's own, if the user chose one when creating it;
    else five minutes (torch's defaults, 10 to 30 minutes, are long to wait for a dead peer)."""
    if timeout is not None:
        return timeout
    own = _group_timeout(parent)
    defaults = {getattr(dist, "default_pg_timeout", None), getattr(dist.distributed_c10d, "default_pg_nccl_timeout", None)}
    if own is not None and own not in defaults:
        return own
    return DEFAULT_TIMEOUT


def _group_timeout(group: dist.ProcessGroup) -> Optional[datetime.timedelta]:
    """Best effort: torch keeps a group's timeout in its backend's options (private API)."""
    try:
        device = torch.device("cuda") if str(dist.get_backend(group)) == "nccl" else torch.device("cpu")
        timeout = group._get_backend(device).options._timeout
        return timeout if isinstance(timeout, datetime.timedelta) else None
    except Exception:  # noqa: BLE001 - fall back to our default
        return None


def make_communicator(process_group: Optional[dist.ProcessGroup], timeout: Optional[datetime.timedelta] = None) -> Communicator:
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalCommunicator()
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised")
    if dist.get_world_size(process_group) == 1:  # nothing to communicate: no group, no threads, no scratch
        return LocalCommunicator()
    return ProcessGroupCommunicator(process_group, timeout=timeout)


def training_collective(comm: Communicator, what: str, fn: Any, *args: Any) -> Any:
    """A collective issued from the training thread (a checkpoint, ``adopt_model_parameters``); a
    failure or timeout says that every rank must call ``what``."""
    try:
        return fn(*args)
    except RuntimeError as error:
        raise CollectiveError(
            f"acco: {what}() is collective: every rank of the group must call it (rank {comm.rank} of "
            f"{comm.world_size} waited{'' if comm.timeout is None else f' up to {comm.timeout}'}): {error}"
        ) from error
