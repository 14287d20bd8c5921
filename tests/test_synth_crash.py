"""Crash safety of ``handsoff generate``: SIGKILL at random points, then resume.

``python -m handsoff generate`` runs in a subprocess on a tiny generator and a tiny real
labeler; the reference corpus is made in this process with the same files, settings and
thread count (one), so its bytes must be the same.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from handsoff.data.shards import read_manifest
from handsoff.synth.generation import generate
from handsoff.synth.settings import GenerateSettings
from handsoff.utils.io import sha256_file
from test_synth_fakes import save_tiny_generator, save_tiny_labeler

N, SHARD, BATCH = 600, 30, 6
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # bytes depend on the thread count


def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(generator file, labeler file), made once per test session (test_synth_dist uses them too)."""
    folder = tmp_path_factory.getbasetemp() / "synth-models"
    generator, labeler = folder / "g.safetensors", folder / "labeler.safetensors"
    if not labeler.exists():
        folder.mkdir(exist_ok=True)
        save_tiny_labeler(folder, save_tiny_generator(generator))
    return generator, labeler


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_models(tmp_path_factory)


def command(models: tuple[Path, Path], out: Path, n: int = N, shard_size: int = SHARD) -> list[str]:
    """``handsoff generate`` arguments (after the launcher)."""
    return ["generate", "--labeler", str(models[1]), "--generator", str(models[0]), "--num-samples", str(n),
            "--shard-size", str(shard_size), "--batch", str(BATCH), "--device", "cpu", "--no-progress",
            "--out", str(out)]


def reference(models: tuple[Path, Path], out: Path, n: int = N, shard_size: int = SHARD) -> None:
    """The corpus of `command`, made in this process on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(models[1], out, GenerateSettings(n=n, shard_size=shard_size), generator=models[0], batch=BATCH,
                 device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)


def corpus_bytes(folder: Path) -> dict[str, bytes]:
    """The files that make up a corpus (report.json carries timings and is left out)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.startswith("shard-") or p.name == "manifest.json"}


def check_listed_shards_are_whole(out: Path) -> int:
    """Everything the manifest lists exists with its sha256; returns how many shards it lists."""
    manifest = read_manifest(out)
    if manifest is None:
        return 0
    for entry in manifest.shards:
        assert sha256_file(out / entry.file) == entry.sha256, f"{entry.file} is listed but not whole"
    return len(manifest.shards)


def _listed(out: Path) -> int:
    try:
        manifest = read_manifest(out)
    except Exception:  # noqa: BLE001 - never partial (atomic replace), but be lenient while polling
        return -1
    return 0 if manifest is None else len(manifest.shards)


def _kill_after(argv: list[str], out: Path, rng: random.Random, new_shard: bool) -> None:
    """Start a run and SIGKILL it: during start-up (at a random time), or a random moment
    after it listed a new shard (mid-batch, mid-write or mid-rename)."""
    before = _listed(out)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    if new_shard:
        while proc.poll() is None and _listed(out) <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        time.sleep(rng.uniform(0.5, 3.0))
    proc.kill()
    proc.wait()


def test_sigkill_at_random_points_then_resume_gives_the_same_bytes(models, tmp_path):
    reference(models, tmp_path / "ref")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "handsoff", *command(models, out)]
    rng = random.Random(0)
    listed = []
    for new_shard in (False, True, True):
        _kill_after(argv, out, rng, new_shard)
        listed.append(check_listed_shards_are_whole(out))
    assert 0 < listed[1] <= listed[2] < N // SHARD, listed  # progress, and the last kill left work to do
    done = subprocess.run(argv, capture_output=True, text=True, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert corpus_bytes(out) == corpus_bytes(tmp_path / "ref")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("manifest.part")]
