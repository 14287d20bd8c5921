"""Several processes: ``torchrun --nproc-per-node 2 -m handsoff generate`` (gloo on the CPU)
makes the same corpus, byte for byte, as one process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_synth_crash import ONE_THREAD, command, corpus_bytes, reference, tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory)


def test_two_torchrun_processes_make_the_single_process_corpus(models, tmp_path):
    reference(models, tmp_path / "ref", n=120, shard_size=20)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "handsoff",
            *command(models, out, n=120, shard_size=20)]
    done = subprocess.run(argv, capture_output=True, text=True, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-20000:]  # whole: a crashing rank prints its threads (faulthandler)
    assert corpus_bytes(out) == corpus_bytes(tmp_path / "ref")
    report = json.loads((out / "report.json").read_text())
    assert report["this_run"]["processes"] == 2 and report["this_run"]["shards_written"] == 6
    assert not list(out.glob("manifest.part-*"))
