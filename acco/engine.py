"""Runs rounds in the background. The facade submits a round and gets a ``RoundHandle`` back.

Two engines behind one interface:

* ``ThreadEngine``: a worker thread runs each round (CPU/gloo; and CUDA tensors on a gloo group,
  whose collectives block a host thread). On CUDA its kernels go to a side stream.
* ``StreamEngine``: the caller enqueues each round on a side CUDA stream and returns at once
  (NCCL, or a single CUDA worker). Nothing waits for the GPU: the round's decisions stay on the
  device, and CUDA events order the launch copy before the round and the round before the swap.
  On CPU it runs each round at once in the caller's thread (with the same device-side decisions),
  which lets the CPU test suite check its logic.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

import torch

from .outcome import RoundResult

logger = logging.getLogger("acco")

ENGINES = ("auto", "thread", "stream")


def resolve(outcome: Any) -> RoundResult:
    """A round's outcome as a ``RoundResult`` (deferred outcomes read their device flags)."""
    return outcome.resolve() if hasattr(outcome, "resolve") else outcome


class RoundHandle:
    """One launched round."""

    def done(self) -> bool:
        """True once the round has finished; never waits."""
        raise NotImplementedError

    def wait(self) -> None:
        """Order the caller's next work after the round (the thread engine blocks; the stream
        engine makes the caller's current stream wait, on the device). Raises the round's error."""
        raise NotImplementedError

    def result(self) -> RoundResult:
        """The round's outcome; blocks the host until it is known. Raises the round's error."""
        raise NotImplementedError

    def counts(self) -> tuple[bool, int]:
        """(every rank was finishing, micro-batches averaged): what ``finish()`` needs to know of a round
        before it may raise the round's error (blocks the host until they are known)."""
        result = self.result()
        return result.all_finishing, result.total_count


class RoundEngine:
    """Executes submitted rounds one at a time, in submission order."""

    #: whether handles know their outcome as soon as ``wait()`` returns (else only ``result()`` waits for it)
    resolves_on_wait = True

    def submit(self, fn: Callable[[], Any]) -> RoundHandle:
        raise NotImplementedError

    def keep_alive(self, tensors: list[torch.Tensor]) -> None:
        """Long-lived tensors (allocated on the caller's stream) that rounds use on the engine's
        side stream: their memory must not be reused before the side stream is done with them."""

    def shutdown(self) -> None:
        """Finish the round in flight and stop; afterwards no queued work uses any buffer."""

    _device: torch.device = torch.device("cpu")

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Around each public call of the optimizer: its work (launch copies, installs, rounds,
        which order themselves after the caller's *current* stream) also comes after the device's
        default stream, where autograd's gradients usually are, and the default stream sees its
        results. Nothing to do on CPU, or when the current stream is the default one."""
        if self._device.type != "cuda":
            yield
            return
        current, default = torch.cuda.current_stream(self._device), torch.cuda.default_stream(self._device)
        if current == default:
            yield
            return
        current.wait_stream(default)
        try:
            yield
        finally:
            default.wait_stream(current)


class _FutureHandle(RoundHandle):
    def __init__(self, future: "Future[RoundResult]", finished: Optional["torch.cuda.Event"], device: Optional[torch.device] = None) -> None:
        self._future = future
        self._finished = finished  # recorded on the side stream after the round, when on CUDA
        self._device = device

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.result()
        if self._finished is not None:
            torch.cuda.current_stream(self._device).wait_event(self._finished)

    def result(self) -> RoundResult:
        return self._future.result()


class ThreadEngine(RoundEngine):
    """One worker thread: collectives and torch kernels release the GIL, so the caller's
    forward/backward runs while the round communicates.

    An exception raised by a round is stored in its future and re-raised, with its original
    traceback, in the thread that waits for it: it never vanishes in the worker.
    """

    def __init__(self, device: torch.device = torch.device("cpu"), name: str = "acco-round") -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: "queue.SimpleQueue[Optional[tuple[Future, Callable[[], Any]]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                future.set_exception(error)

    def submit(self, fn: Callable[[], Any]) -> RoundHandle:
        if not self._thread.is_alive():
            raise RuntimeError("the round engine has been shut down")
        future: "Future[RoundResult]" = Future()
        finished = None
        if self._stream is None:
            task = lambda: resolve(fn())  # noqa: E731
        else:
            stream, ready, finished = self._stream, torch.cuda.Event(), torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))  # after the launch copy, on the caller's stream

            def task() -> RoundResult:
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    outcome = fn()
                    finished.record(stream)
                finished.synchronize()  # this worker waits, not the training thread
                return resolve(outcome)

        self._queue.put((future, task))
        return _FutureHandle(future, finished, self._device)

    def keep_alive(self, tensors: list[torch.Tensor]) -> None:
        _record_on(self._stream, tensors)

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class _StreamHandle(RoundHandle):
    def __init__(
        self,
        outcome: Any = None,
        finished: Optional["torch.cuda.Event"] = None,
        error: Optional[BaseException] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        self._device = device
        self._outcome = outcome
        self._finished = finished
        self._error = error
        self._result: Optional[RoundResult] = None

    def done(self) -> bool:
        return self._finished is None or self._finished.query()

    def wait(self) -> None:
        if self._error is not None:
            raise self._error
        if self._finished is not None:
            torch.cuda.current_stream(self._device).wait_event(self._finished)

    def result(self) -> RoundResult:
        if self._error is not None:
            raise self._error
        if self._result is None:
            if self._finished is not None:
                self._finished.synchronize()
            try:
                self._result = resolve(self._outcome)
            except BaseException as error:  # noqa: BLE001 - raised again on every later call
                self._error = error
                raise
        return self._result

    def counts(self) -> tuple[bool, int]:
        """Read without raising what the round decided (a non-finite gradient or a disagreement is raised
        by ``result()``, at the call where the peers raise it too)."""
        if self._error is not None or not hasattr(self._outcome, "counts"):
            return super().counts()
        if self._finished is not None:
            self._finished.synchronize()
        return self._outcome.counts()


class StreamEngine(RoundEngine):
    """Enqueues each round on a side CUDA stream from the caller's thread; never blocks."""

    resolves_on_wait = False

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, fn: Callable[[], Any]) -> RoundHandle:
        stream = self._stream
        if stream is None:  # CPU: at once, in this thread
            try:
                return _StreamHandle(fn())
            except BaseException as error:  # noqa: BLE001 - raised where the round is waited for
                return _StreamHandle(error=error)
        ready, finished = torch.cuda.Event(), torch.cuda.Event()
        ready.record(torch.cuda.current_stream(stream.device))  # after the launch copy (and all the caller enqueued before)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            try:
                outcome = fn()
            except BaseException as error:  # noqa: BLE001
                return _StreamHandle(error=error)
            finished.record(stream)
        return _StreamHandle(outcome, finished, device=stream.device)

    def keep_alive(self, tensors: list[torch.Tensor]) -> None:
        _record_on(self._stream, tensors)

    def shutdown(self) -> None:
        """Rounds are queued on the side stream, not on a thread: wait for them (the CUDA caching
        allocator would otherwise hand their buffers out again while they still write to them)."""
        if self._stream is not None:
            self._stream.synchronize()


def _record_on(stream: Optional["torch.cuda.Stream"], tensors: list[torch.Tensor]) -> None:
    """``record_stream`` once per tensor: when it is freed, the allocator waits for the work that
    ``stream`` had queued by then (the optimizer's buffers live as long as the optimizer)."""
    if stream is None:
        return
    for tensor in tensors:
        if tensor.is_cuda:
            tensor.record_stream(stream)


def choose_engine(requested: str, device: torch.device, backend: Optional[str]) -> str:
    """``"stream"`` for CUDA tensors unless a gloo group must carry them (its collectives block a
    host thread, so a worker thread runs them); ``"thread"`` on CPU."""
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {requested!r}")
    if requested != "auto":
        if requested == "stream" and device.type == "cuda" and backend == "gloo":
            raise ValueError("engine='stream' needs NCCL (or a single worker) for CUDA tensors; a gloo group blocks the caller")
        return requested
    return "stream" if device.type == "cuda" and backend != "gloo" else "thread"


def make_engine(kind: str, device: torch.device) -> RoundEngine:
    if kind == "stream":
        return StreamEngine(device)
    return ThreadEngine(device)
