"""Rendering a long range of a domain's sequence in chunks, optionally in worker processes.

Every image depends only on ``(seed, index, size)``, so chunks can be rendered anywhere and
in any order; they are yielded in order. One process per core, each on one torch thread,
uses a multi-core CPU better than torch's own threads do for the renderer's many small
tensor operations, and degrades gracefully when other programs share the cores.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator, Optional

import torch

from handsoff.domains.base import Domain, LabeledBatch

__all__ = ["Job", "RenderPool", "chunk_jobs", "render_chunks"]

#: ``(n, seed, size, start)``: the arguments of one `Domain.render` call.
Job = tuple[int, int, int, int]

_worker_domain: Optional[Domain] = None


def _init_worker(domain: Domain) -> None:
    global _worker_domain
    torch.set_num_threads(1)
    _worker_domain = domain


def _render(job: Job) -> LabeledBatch:
    assert _worker_domain is not None
    return _worker_domain.render(*job)


class RenderPool:
    """Worker processes (spawned, one torch thread each) that render jobs of one domain.

    Use as a context manager; start-up costs a few seconds (each worker imports torch).
    """

    def __init__(self, domain: Domain, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"RenderPool: need workers >= 1, got {workers}")
        context = multiprocessing.get_context("spawn")  # fork is unsafe once OpenMP threads exist
        self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(domain,))

    def map(self, jobs: Iterable[Job]) -> Iterator[LabeledBatch]:
        """Render all jobs (submitted at once); the batches come back in job order."""
        return self._pool.map(_render, list(jobs))

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def __enter__(self) -> "RenderPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunk_jobs(domain: Domain, n: int, seed: int, size: int, start: int = 0, chunk: int = 256) -> list[Job]:
    """Split images ``start .. start+n-1`` into jobs of about ``chunk`` images.

    ``chunk`` is rounded up to whole blocks for domains that render in blocks (``block_size``).
    """
    if n < 0 or chunk < 1:
        raise ValueError(f"chunk_jobs: need n >= 0 and chunk >= 1 (got {n}, {chunk})")
    block = getattr(domain, "block_size", None)
    if block is not None:  # a domain renders every block that a job touches
        chunk = -(-chunk // block(size)) * block(size)
    return [(min(chunk, n - i), seed, size, start + i) for i in range(0, n, chunk)]


def render_chunks(domain: Domain, n: int, seed: int, size: int, start: int = 0, chunk: int = 256,
                  workers: int = 1) -> Iterator[LabeledBatch]:
    """Yield images ``start .. start+n-1`` of sequence ``seed`` in batches of about ``chunk``.

    Args:
        workers: 1 renders here, on torch's threads; more renders in that many worker
            processes (`RenderPool`), ahead of the caller consuming the batches.
    """
    if workers < 1:
        raise ValueError(f"render_chunks: need workers >= 1, got {workers}")
    jobs = chunk_jobs(domain, n, seed, size, start, chunk)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield domain.render(*job)
        return
    with RenderPool(domain, min(workers, len(jobs))) as pool:
        yield from pool.map(jobs)
