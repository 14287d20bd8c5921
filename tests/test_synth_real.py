"""The engine with the real encoder, inversion and labeler modules, on a tiny generator:
``handsoff run`` through every stage, skipping on rerun, and ``generate --around``."""
from __future__ import annotations

import json

import pytest
import torch

from handsoff.data import ShardDataset
from handsoff.data.shards import read_manifest
from handsoff.synth.pipeline import dump_toml, load_config, run_pipeline
from test_synth_fakes import save_tiny_generator

pytest.importorskip("lpips")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, **generate) -> dict:
    generator = save_tiny_generator(tmp_path / "g.safetensors")
    return {
        "out": "run", "generator": str(generator), "device": "cpu",
        "labeled": {"render": {"domain": "heads", "n": 4, "seed": 0, "size": 16}},
        "encoder": {"steps": 3, "lpips_steps": 0, "batch": 4},
        "invert": {"refine_steps": 0},
        "labeler": {"ensemble": 2, "hidden": [8], "steps": 3, "batch_pixels": 64},
        "generate": {"n": 12, "shard_size": 6, "batch": 4, **generate},
    }


def write_config(tmp_path, config: dict):
    path = tmp_path / "p.toml"
    path.write_text(dump_toml(config))
    return load_config(path)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One pipeline run shared by the tests: (its folder, its config, its run record)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(tmp_path)
    return tmp_path, config, run_pipeline(write_config(tmp_path, config), progress=False, log=lambda _: None)


def test_run_every_stage_then_skip_then_rerun_what_changed(first_run):
    tmp_path, config, record = first_run
    assert record["ran"] == ["render", "fit-encoder", "invert", "fit-labeler", "generate"]
    out = tmp_path / "run"
    for name in ("labeler.safetensors", "latents.safetensors", "encoder.safetensors", "shards/preview.png",
                 "shards/report.json", "run.json"):
        assert (out / name).exists(), name
    dataset = ShardDataset(out / "shards")
    assert len(dataset) == 12  # floor(0.1 * 6) = 0 dropped per shard
    assert dataset.resolution == 16 and "skin" in dataset.classes
    assert set(dataset[0]) == {"image", "seg", "depth", "keypoints", "uncertainty", "seed"}

    again = run_pipeline(write_config(tmp_path, config), progress=False, log=lambda _: None)
    assert again["ran"] == [] and json.loads((out / "run.json").read_text())["ran"] == []

    config = {**config, "generate": {**config["generate"], "filter": 0.5}}
    changed = run_pipeline(write_config(tmp_path, config), progress=False, log=lambda _: None)
    assert changed["ran"] == ["generate"]  # the stale corpus was replaced, not refused
    assert read_manifest(out / "shards").kept == 6


def test_generate_around_inverted_images_with_the_real_labeler(first_run, tmp_path, capsys):
    from handsoff.cli import main

    config, out = first_run[1], first_run[0] / "run"

    def args(generator, folder):
        return ["generate", "--labeler", str(out / "labeler.safetensors"), "--generator", str(generator), "--n", "8",
                "--shard-size", "8", "--batch", "4", "--device", "cpu", "--no-progress", "--store-ws",
                "--around", str(out / "latents.safetensors"), "--out", str(tmp_path / folder)]

    assert main(args(config["generator"], "near")) == 0
    manifest = read_manifest(tmp_path / "near")
    assert manifest.identity["around_digest"] and manifest.kept == 8  # floor(0.1 * 8) = 0 dropped
    other = save_tiny_generator(tmp_path / "other.safetensors", seed=1)
    assert main(args(other, "x")) == 2
    assert "for another generator" in capsys.readouterr().err
