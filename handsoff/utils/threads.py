"""Torch CPU threads of the long commands: one per process unless asked otherwise.

On a CPU shared with other work, OpenMP threads spin at barriers while a sibling waits for a
core: with torch's default (one thread per core) `handsoff generate` ran 2.5x to 13x slower beside
one other single-threaded process on 2 cores, while one thread kept its speed
(`benchmarks/threads.py`, ``benchmarks/results/threads-cpu.json``). So every long command runs on
one thread by default; processes (``torchrun``, ``--workers``, the quality study's ``--jobs``) are
the way to use more cores, and ``--threads N`` raises it on a machine known to be idle.

Floating-point sums can be split differently with another thread count, so outputs are byte for
byte reproducible for the same device and thread count (which the reports record).
Importable without torch, so that ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
from typing import Optional

from handsoff.errors import HandsoffError

__all__ = ["DEFAULT_THREADS", "THREADS_HELP", "add_threads_option", "apply_threads"]

DEFAULT_THREADS = 1
THREADS_HELP = (f"torch CPU threads (default: {DEFAULT_THREADS}: fastest on a shared CPU, where more threads "
                "ran up to 13x slower beside one other process; use processes for more cores, or raise it "
                "on an idle machine). Output bytes depend on the device and the thread count")


def add_threads_option(parser: argparse.ArgumentParser, default: Optional[int] = DEFAULT_THREADS,
                       help_text: str = THREADS_HELP) -> None:
    """Add ``--threads N`` to a command's parser (`handsoff.cli.main` applies it before the command runs)."""
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=help_text)


def apply_threads(threads: Optional[int]) -> None:
    """Set torch's intra-op threads (None: leave them as they are).

    Raises:
        HandsoffError: ``threads`` is below 1.
    """
    if threads is None:
        return
    if threads < 1:
        raise HandsoffError(f"--threads must be at least 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)
