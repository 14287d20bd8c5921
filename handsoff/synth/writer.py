"""Writing overlaps computing: a worker thread consumes items from a bounded queue.

The producer (the generation loop) blocks only when the queue is full, so at most
``maxsize`` items wait in memory. An exception in the worker stops it and is raised again
in the producer at its next `BackgroundWriter.put` or at `BackgroundWriter.close`.
"""
from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Callable, Generic, Optional, TypeVar

__all__ = ["BackgroundWriter"]

T = TypeVar("T")
_STOP = object()
_POLL_S = 0.1  # how often a blocked producer looks for a worker error


class BackgroundWriter(Generic[T]):
    """Run ``handle(item)`` for every `put` item, in order, in one worker thread.

    Use as a context manager: leaving the block normally waits for every item to be
    handled (and raises the worker's error, if any); leaving it with an exception stops
    the worker after its current item and lets the exception propagate.
    """

    def __init__(self, handle: Callable[[T], None], maxsize: int = 1, name: str = "handsoff-writer") -> None:
        self._handle = handle
        self._queue: "queue.Queue[object]" = queue.Queue(maxsize=maxsize)
        self._error: Optional[BaseException] = None
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._cancelled.is_set():
                return
            try:
                self._handle(item)  # type: ignore[arg-type]
            except BaseException as err:  # noqa: BLE001 - handed to the producer thread
                self._error = err
                return

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: T) -> None:
        """Queue ``item`` (blocks while the queue is full); raises the worker's error if it failed."""
        while True:
            self._raise_error()
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._raise_error()
                    raise RuntimeError("the writer thread stopped unexpectedly")

    def close(self) -> None:
        """Wait until every queued item is handled; raise the worker's error, if any."""
        if self._thread.is_alive():
            self.put(_STOP)  # type: ignore[arg-type]
            self._thread.join()
        self._raise_error()

    def cancel(self) -> None:
        """Stop after the current item, dropping queued ones."""
        self._cancelled.set()
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=_POLL_S)
            except queue.Full:
                pass
            self._thread.join(timeout=_POLL_S)

    def __enter__(self) -> "BackgroundWriter[T]":
        return self

    def __exit__(self, kind: Optional[type], exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        if exc is None:
            self.close()
        else:
            self.cancel()
