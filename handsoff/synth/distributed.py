"""Several processes (``torchrun``) generating one corpus: process-group set-up and the few
collectives the engine needs. The set-up is the GAN trainer's (one process per GPU, NCCL on
CUDA, gloo on the CPU, ``LOCAL_RANK`` picks the GPU); only objects are exchanged here.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

# One process-group set-up for the whole project: the trainer's helpers, reused.
from handsoff.gan.training.loop import _Dist as Ranks
from handsoff.gan.training.loop import _init_distributed, _resolve_device

__all__ = ["Ranks", "ranks_for", "device_for", "broadcast", "gather", "barrier"]

T = TypeVar("T")


@contextlib.contextmanager
def ranks_for(device_name: str) -> Iterator[Ranks]:
    """This process's rank and the world size; sets up (and tears down) the process group when
    launched by torchrun with ``WORLD_SIZE > 1``, else a single process of rank 0."""
    ranks = _init_distributed(device_name)
    try:
        yield ranks
    finally:
        if ranks.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def device_for(name: str, ranks: Ranks) -> torch.device:
    """The device of this rank: ``auto`` -> CUDA when available; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    return _resolve_device(name, ranks)


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
