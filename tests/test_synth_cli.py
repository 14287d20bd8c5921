"""``handsoff generate`` / ``handsoff export`` through the command line (in this process, fake labeler)."""
from __future__ import annotations

import runpy
import sys

import numpy as np
import pytest
import torch

from handsoff.data import ShardDataset, read_labeled_set
from handsoff.data.shards import read_shard
from handsoff.synth.lock import corpus_lock
from test_synth_fakes import KEYPOINTS, main as fake_cli, save_tiny_generator


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the fake CLI sets one thread


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return save_tiny_generator(tmp_path_factory.mktemp("g") / "g.safetensors")


def generate_args(generator, out, *extra):
    return ["generate", "--labeler", "fake", "--generator", str(generator), "--n", "30", "--shard-size", "12",
            "--batch", "6", "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def test_generate_then_errors_are_one_line_with_exit_2(generator, tmp_path, capsys):
    out = tmp_path / "c"
    assert fake_cli(generate_args(generator, out)) == 0
    assert "wrote" in capsys.readouterr().out and len(ShardDataset(out)) == 28  # 11 + 11 + 6 of 12 + 12 + 6
    assert fake_cli(generate_args(generator, out, "--seed", "5")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "handsoff generate: error:" in err and "seed 0 there, 5 now" in err
    with corpus_lock(out):
        assert fake_cli(generate_args(generator, out)) == 2
    assert "another run is writing this corpus" in capsys.readouterr().err
    assert fake_cli(generate_args(generator, tmp_path / "d", "--filter", "1.5")) == 2
    assert "--filter must lie in [0, 1)" in capsys.readouterr().err


def test_export_folder(generator, tmp_path, capsys):
    corpus = tmp_path / "c"
    assert fake_cli(generate_args(generator, corpus)) == 0
    assert fake_cli(["export", str(corpus), "--format", "folder", "--out", str(tmp_path / "f"), "--no-progress"]) == 0
    labeled = read_labeled_set(tmp_path / "f")
    assert len(labeled) == 28 and labeled.classes == ("background", "dark", "bright")
    assert labeled.keypoint_names == KEYPOINTS
    rec, _ = read_shard(corpus / "shard-00000.h5")
    name = f"i{rec.index[0]:08d}_s{rec.seeds[0]}"
    i = labeled.names.index(name)
    assert np.array_equal(labeled.images[i], rec.images[0]) and np.array_equal(labeled.seg[i], rec.seg[0])
    np.testing.assert_array_equal(labeled.depth[i], rec.depth[0])
    assert labeled.keypoints[i][:, 2].tolist() == (rec.keypoints[0][:, 2] >= 0.5).astype(float).tolist()
    lax = ["export", str(corpus), "--out", str(tmp_path / "lax"), "--min-confidence", "0", "--no-progress"]
    assert fake_cli(lax) == 0
    assert read_labeled_set(tmp_path / "lax").keypoints[i][:, 2].all()  # the fake's points lie inside
    assert fake_cli(["export", str(corpus), "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert fake_cli(["export", str(tmp_path), "--out", str(tmp_path / "g")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_python_dash_m_handsoff_has_the_commands(monkeypatch, capsys):
    for command in ("generate", "export", "run", "demo"):
        monkeypatch.setattr(sys, "argv", ["handsoff", command, "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_module("handsoff", run_name="__main__")
        assert done.value.code == 0 and f"usage: handsoff {command}" in capsys.readouterr().out
