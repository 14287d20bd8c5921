"""Stages that are skipped when their output is up to date: stamp files beside the outputs.

A `Stage` makes one output (a file or a folder) from input files/folders and settings.
After it ran, ``OUTPUT.stamp.json`` records the sha256 of every input and the settings;
the next run skips the stage when the output is there (its ``done`` check passes) and the
stamp still matches. Inputs are digested when the stage is reached, after the stages before
it ran, so a stage reruns exactly when something it reads changed. A stale folder output
(one with a stamp that no longer matches) is removed before the stage runs again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from handsoff.utils.io import atomic_write_bytes, sha256_file

__all__ = ["Stage", "stamp_path", "path_digest", "expected_stamp", "is_current", "run_stages", "STAMP_SUFFIX"]

STAMP_SUFFIX = ".stamp.json"
_STAMP_VERSION = 1


@dataclass
class Stage:
    """One step of a pipeline.

    Attributes:
        name: shown in messages (e.g. ``fit-labeler``).
        output: the file or folder it makes.
        run: makes ``output``.
        inputs: files/folders it reads, by role; their contents are digested.
        settings: JSON-able settings that change its output.
        done: whether ``output`` is complete (default: it exists).
    """

    name: str
    output: Path
    run: Callable[[], Any]
    inputs: Mapping[str, Path] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    done: Optional[Callable[[], bool]] = None

    def is_done(self) -> bool:
        return self.done() if self.done is not None else self.output.exists()


def stamp_path(output: Path) -> Path:
    """``OUTPUT.stamp.json`` beside the output."""
    return output.with_name(output.name + STAMP_SUFFIX)


def path_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, hidden files and
    stamps excluded); ``"missing"`` when ``path`` does not exist."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or file.name.endswith(STAMP_SUFFIX):
            continue
        digest.update(f"{rel.as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def expected_stamp(stage: Stage) -> dict[str, Any]:
    """The stamp the stage's output must carry to count as up to date."""
    return {"version": _STAMP_VERSION, "stage": stage.name,
            "inputs": {role: path_digest(Path(p)) for role, p in sorted(stage.inputs.items())},
            "settings": json.loads(json.dumps(stage.settings, sort_keys=True, default=str))}


def _read_stamp(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_current(stage: Stage) -> bool:
    """Whether ``stage`` can be skipped: its output is done and its stamp matches."""
    return stage.is_done() and _read_stamp(stamp_path(stage.output)) == expected_stamp(stage)


def _remove_stale(stage: Stage) -> None:
    """A folder output from other inputs: remove it (the stamp last, so a crash in between is safe)."""
    stamp = stamp_path(stage.output)
    if stamp.exists() and stage.output.is_dir():
        shutil.rmtree(stage.output)
    stamp.unlink(missing_ok=True)


def run_stages(stages: Sequence[Stage], log: Callable[[str], None] = print) -> list[str]:
    """Run every stage that is not current, in order; returns the names of the stages that ran."""
    ran = []
    for stage in stages:
        if is_current(stage):
            log(f"[{stage.name}] up to date: {stage.output}")
            continue
        log(f"[{stage.name}] -> {stage.output}")
        stamp = expected_stamp(stage)  # the inputs as the stage reads them
        _remove_stale(stage)
        stage.run()
        atomic_write_bytes(stamp_path(stage.output), (json.dumps(stamp, indent=1, sort_keys=True) + "\n").encode())
        ran.append(stage.name)
    return ran
