"""What this rank holds of one global tensor, in the form ``torch.distributed.checkpoint`` (DCP) saves,
re-shards and loads: ``RunsTensor``.

A flat shard cuts a parameter at any element, so a rank holds *runs* of a parameter's row-major
elements (of its fp32 master, of each element-wise state tensor). DCP describes what a rank holds of
a tensor as rectangular blocks of it; each run is shown as the blocks ``layout.row_major_boxes``
cuts it into, each a ``view`` of the run. On load DCP reads, for each block of the new layout, the
saved blocks that overlap it, whatever world size saved them.

Why a tensor subclass of our own (docs/design.md, "Sharded checkpoints"): ``ShardedTensor`` expresses
such blocks too, but torch 2.13's default ``dcp.async_save`` stager cannot copy one (it asks for its
``data_ptr``, which ``ShardedTensor`` refuses); ``DTensor`` places blocks by its placements and cannot
express cuts at arbitrary offsets. DCP also accepts any tensor that implements its ``_Checkpointable``
protocol, as ``DTensor`` and torch's ``LocalShardsWrapper`` do; the stager copies such a tensor's slots.

**Private torch APIs, all in this module** (README, "Private torch APIs"): the ``_Checkpointable``
protocol (``__create_write_items__`` at save, ``__create_chunk_list__`` at load, ``__get_tensor_shard__``
for both) and ``torch.Tensor._make_wrapper_subclass`` (a tensor of the global shape with no storage of
its own). DCP's own classes (``WriteItem``, ``ChunkStorageMetadata``, ...) are read from
``torch.distributed.checkpoint`` when DCP calls us, so imported by then: importing it here would add
over a second to every ``import acco``.

**Loading never writes into the optimizer.** The same dict serves ``dcp.save`` (its runs are views of
the live master and state: no copy) and ``dcp.load`` (a template). DCP calls ``__create_chunk_list__``
only when it plans a load; the tensor then swaps its runs for fresh buffers of the same shape, dtype
and device, and DCP reads into those. A load that fails half-way (a missing file) leaves the
optimizer as it was; ``load_sharded_state_dict`` validates, then installs the fresh buffers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .layout import row_major_boxes

aten = torch.ops.aten


def _dcp() -> Any:
    """``torch.distributed.checkpoint``, which has imported itself by the time it calls us."""
    return torch.distributed.checkpoint


class RunsTensor(torch.Tensor):
    """A global tensor of ``shape`` of which this rank holds ``runs``: ``(start, tensor)`` pairs, each a
    1-D contiguous run of the tensor's row-major elements beginning at element ``start``.

    ``live``: the runs are the optimizer's own memory (saving needs no copy; a load swaps them for fresh
    buffers first, see the module's docstring). Only DCP and acco use it: no tensor operation is
    defined on it beyond those DCP and its async stager need.
    """

    __slots__ = ("_runs", "_boxes", "_box_at", "_live", "_loaded", "_consumed")
    _runs: list[tuple[int, torch.Tensor]]
    _boxes: list[tuple[torch.Size, torch.Size, int, int, int]]  # offsets, sizes, run, first element in the run, numel
    _box_at: dict[torch.Size, int]  # a box's number by its offsets

    __torch_function__ = torch._C._disabled_torch_function_impl  # straight to __torch_dispatch__

    @staticmethod
    def __new__(cls, shape: Sequence[int], runs: Sequence[tuple[int, torch.Tensor]], *, live: bool,
                dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "RunsTensor":
        if not runs and (dtype is None or device is None):
            raise ValueError("a RunsTensor without runs needs its dtype and device")
        first = runs[0][1] if runs else None
        dtype = first.dtype if first is not None else dtype
        device = first.device if first is not None else device
        self = torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=device, requires_grad=False)
        self._set_runs(list(runs))
        self._live, self._loaded, self._consumed = live, False, False
        return self

    def _set_runs(self, runs: list[tuple[int, torch.Tensor]]) -> None:
        boxes = []
        for index, (start, run) in enumerate(runs):
            if run.dim() != 1 or not run.is_contiguous() or run.dtype != self.dtype:
                raise ValueError(f"a run must be a contiguous 1-D {self.dtype} tensor, got {tuple(run.shape)} {run.dtype}")
            position = 0
            for offsets, sizes in row_major_boxes(self.shape, start, start + run.numel()):
                numel = 1
                for size in sizes:
                    numel *= size
                boxes.append((torch.Size(offsets), torch.Size(sizes), index, position, numel))
                position += numel
        self._runs, self._boxes = runs, boxes
        self._box_at = {box[0]: number for number, box in enumerate(boxes)}

    # ------------------------------------------------------------------ what acco reads
    @property
    def runs(self) -> list[tuple[int, torch.Tensor]]:
        return self._runs

    @property
    def loaded(self) -> bool:
        """``dcp.load`` has planned to read into this tensor (its runs are fresh buffers, not the optimizer's)."""
        return self._loaded

    @property
    def consumed(self) -> bool:
        """``load_sharded_state_dict`` has installed the runs as the optimizer's own: this dict is spent."""
        return self._consumed

    def consume(self) -> None:
        """Forget the runs: they now belong to the optimizer, which a later use of this dict must not reach."""
        self._set_runs([])
        self._consumed = True

    # ------------------------------------------------------------------ DCP's _Checkpointable protocol
    def __create_write_items__(self, fqn: str, obj: Any) -> list[Any]:
        metadata, planner = _dcp().metadata, _dcp().planner
        properties = metadata.TensorProperties(dtype=self.dtype)
        return [
            planner.WriteItem(
                index=metadata.MetadataIndex(fqn, offsets),
                type=planner.WriteItemType.SHARD,
                tensor_data=planner.TensorWriteData(
                    chunk=metadata.ChunkStorageMetadata(offsets=offsets, sizes=sizes), properties=properties, size=self.shape
                ),
            )
            for offsets, sizes, *_ in self._boxes
        ]

    def __create_chunk_list__(self) -> list[Any]:
        """Called by DCP only when it plans a load into this tensor: read into fresh buffers, never the live ones."""
        if self._consumed:
            raise RuntimeError("this sharded state dict was installed already: take a new one from sharded_state_dict()")
        if self._live:
            self._set_runs([(start, torch.empty_like(run)) for start, run in self._runs])
            self._live = False
        self._loaded = True
        metadata = _dcp().metadata
        return [metadata.ChunkStorageMetadata(offsets=offsets, sizes=sizes) for offsets, sizes, *_ in self._boxes]

    def __get_tensor_shard__(self, index: Any) -> torch.Tensor:
        number = self._box_at.get(index.offset)
        if number is None:
            raise ValueError(f"{index.fqn}: this rank holds no block at {tuple(index.offset or ())}")
        _, sizes, run_index, first, numel = self._boxes[number]
        return _block(self._runs[run_index][1], first, numel, sizes)

    # ------------------------------------------------------------------ what DCP's async stagers do to a tensor
    # The default stager (``StateDictStager``) makes ``new_empty(..., device="cpu")`` and then deep-copies the
    # slots into it; ``FileSystemWriter``'s own (``BlockingAsyncStager``) makes ``zeros_like(..., device="cpu")``
    # and then ``copy_``s into it. Anything else is refused with a clear error.
    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is aten.copy_.default:
            destination, source = args[0], args[1]
            return _copy_runs(destination, source, bool(kwargs.get("non_blocking", args[2] if len(args) > 2 else False)))
        self = args[0]
        if func is aten.detach.default:
            return self
        if func is aten.new_empty.default:  # the slots are filled by the caller
            return RunsTensor(self.shape, [], live=False, dtype=kwargs.get("dtype") or self.dtype, device=kwargs.get("device") or self.device)
        if func in (aten.zeros_like.default, aten.empty_like.default, aten.clone.default, aten._to_copy.default):
            device, dtype = kwargs.get("device") or self.device, kwargs.get("dtype") or self.dtype
            if func is aten.zeros_like.default:
                runs = [(start, torch.zeros(run.shape, dtype=dtype, device=device)) for start, run in self._runs]
            elif func is aten.empty_like.default:
                runs = [(start, torch.empty(run.shape, dtype=dtype, device=device)) for start, run in self._runs]
            else:
                runs = [(start, run.to(device=device, dtype=dtype, copy=True)) for start, run in self._runs]
            return RunsTensor(self.shape, runs, live=False, dtype=dtype, device=device)
        raise NotImplementedError(f"{func} is not defined on acco's RunsTensor (a checkpoint container for DCP)")

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        held = sum(run.numel() for _, run in self._runs)
        return f"RunsTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {len(self._runs)} runs, {held} elements here)"


def _copy_runs(destination: torch.Tensor, source: torch.Tensor, non_blocking: bool) -> torch.Tensor:
    """``destination.copy_(source)`` where either is a ``RunsTensor`` (a stager's copy): run by run between two of
    the same runs; into a plain tensor, a ``RunsTensor`` that holds all of it (a 0-dim one, which a stager stages as
    a plain scalar)."""
    if isinstance(destination, RunsTensor) and isinstance(source, RunsTensor):
        if [(s, r.numel()) for s, r in destination.runs] != [(s, r.numel()) for s, r in source.runs]:
            raise RuntimeError("copy_ between RunsTensors of different runs")
        for (_, into), (_, run) in zip(destination.runs, source.runs):
            into.copy_(run, non_blocking=non_blocking)
        return destination
    if isinstance(source, RunsTensor) and len(source.runs) == 1 and source.runs[0][1].numel() == destination.numel():
        destination.copy_(source.runs[0][1].view(destination.shape), non_blocking=non_blocking)
        return destination
    raise NotImplementedError("copy_ into or out of a RunsTensor that does not hold the whole tensor")


def _block(run: torch.Tensor, first: int, numel: int, sizes: torch.Size) -> torch.Tensor:
    """Elements ``[first, first + numel)`` of ``run`` as a tensor of ``sizes`` whose storage is exactly those bytes
    (a slice of the run's storage: the same memory, which the slice keeps alive). DCP's file writer copies any
    tensor whose storage is larger than itself, and keeps every tensor of a file until the file is written
    (torch 2.13): a plain ``view`` of the master or of a state tensor would cost one shard's copy per save."""
    itemsize = run.element_size()
    start = (run.storage_offset() + first) * itemsize
    storage = run.untyped_storage()[start : start + numel * itemsize]
    return torch.empty(0, dtype=run.dtype, device=run.device).set_(storage, 0, sizes)
