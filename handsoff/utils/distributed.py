"""Several processes (``torchrun``): one process-group set-up and tear-down for the whole project.

The GAN trainer and the generation engine both run under ``torchrun``: one process per GPU,
NCCL on CUDA, gloo on the CPU, ``LOCAL_RANK`` picks the GPU. `process_group` sets the group
up from torchrun's environment and tears it down on every way out of its block: a normal
return, an exception, and SIGTERM (which torchrun sends to the other ranks when one fails, and
which by default ends Python without running any ``finally``). Outside torchrun
(``WORLD_SIZE`` unset or 1) it yields a single process of rank 0 and touches nothing.

Tear-down waits for every rank first (a barrier) on a normal exit, then destroys the group, so
that no rank tears its gloo context down while a slower peer may still be in the last collective.

A torchrun rank then ends with `exit_without_finalizing`, never through interpreter
finalization. Why (issue 14; the core of an aborted rank, ``gdb -ex "thread apply all bt"``):
gloo runs collectives on worker threads of its own, and a worker frees each finished piece of
work some time after the caller's ``wait`` returned. Freeing the work of ``all_gather_object``
(held on by the barrier's work) drops tensors that Python owns, which takes the GIL. When the
main thread has meanwhile returned and the interpreter is finalizing, taking the GIL ends the
worker with ``pthread_exit``, whose unwinding crosses the work's ``noexcept`` destructor:
``std::terminate`` - "terminate called without an active exception", SIGABRT, and torchrun
kills the run. ``destroy_process_group`` does not join gloo's workers (they live as long as the
backend object, which outlives it), so the window stays open on every rank; a starved worker
(a busy CPU) widens it: 3 aborts in 83 runs of the torchrun test under load
(``benchmarks/results/soak-cpu.json``). Ending the process without finalizing closes it: no
thread can be asked to give the GIL back to a dying interpreter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import logging
import signal
import sys
import threading
from typing import Any, Iterator, NoReturn, TypeVar

import torch
import torch.distributed as dist

from handsoff.errors import HandsoffError, Terminated
from handsoff.utils.runtime import resolve_device

__all__ = ["Ranks", "process_group", "device_for", "broadcast", "gather", "barrier", "under_torchrun",
           "exit_without_finalizing"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a run of ``world`` processes (one process: rank 0 of 1).

    Attributes:
        rank: global rank, 0 .. world-1.
        world: number of processes.
        local_rank: rank on this machine (picks the GPU).
        initialized_here: whether `process_group` created the group (and so destroys it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes shared files."""
        return self.rank == 0


def _init(device_name: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = torch.cuda.is_available() and device_name.split(":")[0] in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if dist.is_initialized():  # a caller (a test, a larger program) owns the group
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    try:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    except (RuntimeError, ValueError) as err:
        raise HandsoffError(f"cannot join the torchrun process group (rank {rank} of {world}): {err}") from None
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, initialized_here=True)


def _teardown(ranks: Ranks, clean: bool) -> None:
    if not (ranks.initialized_here and dist.is_initialized()):
        return
    if clean:
        # Every rank reaches this point on a normal exit; after the barrier no peer sends anything,
        # so destroying the group cannot race with a slower rank's last collective.
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `Terminated` in the main thread for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def process_group(device_name: str = "auto", *, sigterm: bool = True) -> Iterator[Ranks]:
    """This process's `Ranks`, with the torchrun process group set up for the block.

    Args:
        device_name: ``auto``, ``cpu``, ``cuda`` or ``cuda:K``: NCCL when it resolves to CUDA,
            else gloo.
        sigterm: turn SIGTERM into `Terminated` inside the block, so tear-down runs (pass False
            when the caller handles SIGTERM itself, as the GAN trainer's graceful stop does).

    The group is destroyed when the block is left, however it is left; on a normal exit all
    ranks meet at a barrier first. A group that already existed is left alone.

    Raises:
        HandsoffError: the process group cannot be joined.
    """
    ranks = _init(device_name)
    clean = False
    try:
        with _sigterm_raises() if sigterm and ranks.world > 1 else contextlib.nullcontext():
            yield ranks
        clean = True
    finally:
        _teardown(ranks, clean)


def device_for(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank: ``auto`` -> CUDA when available; ``cuda`` -> ``cuda:LOCAL_RANK``
    under torchrun (the current CUDA device in a single process)."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank if ranks.world > 1 else torch.cuda.current_device())
    return device


def broadcast(ranks: Ranks, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a no-op in a single process)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(ranks: Ranks, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if ranks.world == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ranks: Ranks) -> None:
    """Wait until every rank arrives."""
    if ranks.world > 1:
        dist.barrier()


def under_torchrun() -> bool:
    """Whether this process is one rank of several launched by torchrun (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def exit_without_finalizing(status: int) -> NoReturn:
    """End this process now with ``status``, after flushing Python's output, without interpreter
    finalization (module docstring: a gloo worker may still be freeing work that holds Python
    tensors, and finalization would make it abort the process).

    Call it only when everything the process writes is written and closed (the handsoff
    commands write files atomically and close them before they return).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    os._exit(status)
