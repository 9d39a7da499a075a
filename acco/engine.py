"""Runs rounds in the background. The facade only submits work and waits on futures.

One interface, so that a CUDA side-stream engine can slot in beside the thread engine.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Optional, TypeVar

import torch

logger = logging.getLogger("acco")

T = TypeVar("T")


class RoundEngine:
    """Executes submitted rounds one at a time, in submission order."""

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class ThreadEngine(RoundEngine):
    """One worker thread: collectives and torch kernels release the GIL, so the caller's
    forward/backward runs while the round communicates.

    An exception raised by a round is stored in its future and re-raised, with its original
    traceback, in the thread that calls ``result()``: it never vanishes in the worker.
    """

    def __init__(self, name: str = "acco-round") -> None:
        self._queue: "queue.SimpleQueue[Optional[tuple[Future, Callable[[], object]]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
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

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        if not self._thread.is_alive():
            raise RuntimeError("the round engine has been shut down")
        future: "Future[T]" = Future()
        self._queue.put((future, fn))
        return future

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()


class InlineEngine(RoundEngine):
    """Runs each round at once in the caller's thread (handy for debugging)."""

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        future: "Future[T]" = Future()
        try:
            future.set_result(fn())
        except BaseException as error:  # noqa: BLE001
            future.set_exception(error)
        return future


def make_engine(device: torch.device) -> RoundEngine:
    """The engine for parameters on ``device``. Today every device uses the worker thread (on CUDA
    its kernels go to the default stream: correct, with little overlap); a side-stream engine for
    CUDA slots in here."""
    if device.type == "cuda":
        logger.info("acco: CUDA parameters run their rounds on the worker thread (no side stream yet)")
    return ThreadEngine()
