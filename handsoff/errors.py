"""User-facing errors.

Everything a user can cause by pointing handsoff at the wrong thing (a bad checkpoint,
a missing folder, ...) raises a `HandsoffError` subclass whose message is one line that
says what and where, so the command line can print it without a traceback.
"""
from __future__ import annotations

import os
from typing import Union

__all__ = ["HandsoffError", "CheckpointError", "Terminated"]


class HandsoffError(Exception):
    """Base class of the errors that handsoff reports to users as a one-line message."""


class CheckpointError(HandsoffError):
    """A checkpoint file cannot be read: the message names the file and the problem.

    >>> str(CheckpointError("checkpoints/x.pkl", "truncated file (pickle data ended early)"))
    'checkpoints/x.pkl: truncated file (pickle data ended early)'
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"], problem: str) -> None:
        # Keep both parts in `args` so that the exception pickles and copies faithfully.
        super().__init__(os.fspath(path), problem)
        self.path = os.fspath(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the caller passed

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class Terminated(Exception):
    """SIGTERM arrived inside `handsoff.utils.distributed.process_group`: raised in the main thread
    so that every ``finally`` (shard writer, locks, the process group) runs; the command line then
    exits with status 143, as a process killed by SIGTERM would."""
