"""``handsoff fit-labeler`` end to end, and its one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handsoff.cli import main
from handsoff.gan.checkpoints import save_generator
from handsoff.gan.digest import generator_digest
from handsoff.invert.latents import Latents, save_latents
from handsoff.label.io import load_labeler
from test_label_fakes import random_ws, rendered_set, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")

QUICK = ["--steps", "3", "--batch-pixels", "64", "--ensemble", "2", "--hidden", "16,8", "--device", "cpu"]


def _latents(path: Path, G, names: list[str], seed: int) -> Path:
    return save_latents(path, Latents(random_ws(G, len(names), seed), names, generator_digest(G)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny generator, a labeled set and a held-out set with their latents."""
    root = tmp_path_factory.mktemp("fit")
    G = tiny_generator(0)
    save_generator(G, root / "G.safetensors")
    rendered_set(root / "train", n=4, seed=0)
    rendered_set(root / "heldout", n=2, seed=1)
    names = sorted(p.stem for p in (root / "train" / "images").iterdir())
    _latents(root / "train.safetensors", G, names, 0)
    _latents(root / "heldout.safetensors", G, sorted(p.stem for p in (root / "heldout" / "images").iterdir()), 1)
    _latents(root / "other.safetensors", tiny_generator(1), names, 0)
    _latents(root / "short.safetensors", G, names[:-1], 0)
    return root


def _args(root: Path, labels: Path, out: Path, latents: str = "train.safetensors") -> list[str]:
    return ["fit-labeler", "--generator", str(root / "G.safetensors"), "--latents", str(root / latents),
            "--labels", str(labels), "--out", str(out), *QUICK]


def test_fit_labeler_end_to_end(workspace, tmp_path, capsys):
    out = tmp_path / "L.safetensors"
    args = _args(workspace, workspace / "train", out) + [
        "--heldout-latents", str(workspace / "heldout.safetensors"), "--heldout-labels", str(workspace / "heldout")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "held-out" in printed
    G = tiny_generator(0)
    labeler = load_labeler(out, G=G)
    assert labeler.config.tasks == ("seg", "keypoints", "depth") and labeler.config.ensemble == 2
    report = json.loads((tmp_path / "L.report.json").read_text())
    assert {"seg", "keypoints", "depth"} <= set(report["heldout"])
    assert set(labeler.extra["heldout"]) >= {"miou", "pck@0.1", "depth_rmse"}
    assert labeler.extra["heldout"]["miou"] == report["heldout"]["seg"]["miou"]
    assert main(_args(workspace, workspace / "train", out)) == 2  # exists: needs --force
    assert main(_args(workspace, workspace / "train", out) + ["--force", "--tasks", "seg", "--layers=-2,-1"]) == 0
    assert load_labeler(out).config.tasks == ("seg",) and load_labeler(out).config.layers == (3, 4)


def _first(folder: Path, suffix: str) -> Path:
    return sorted(folder.glob(f"*{suffix}"))[0]


def _resize_label_map(root: Path) -> Path:
    path = _first(root / "seg", ".png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


def _unknown_class(root: Path) -> Path:
    path = _first(root / "seg", ".png")
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(path)
    return path


def _keypoint_outside(root: Path) -> Path:
    path = root / "keypoints.json"
    data = json.loads(path.read_text())
    name = sorted(data["points"])[0]
    data["points"][name][0] = [40.0, 3.0, 1]
    path.write_text(json.dumps(data))
    return path


def _depth_missing(root: Path) -> Path:
    path = _first(root / "depth", ".npy")
    path.unlink()
    return path


BAD_SETS = {"label map size": (_resize_label_map, "label map is 8x8"),
            "class id": (_unknown_class, "class id 200"),
            "keypoint outside": (_keypoint_outside, "outside the 16x16 image"),
            "depth for some images": (_depth_missing, "missing: depth/ must cover every image")}


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_labeled_sets(workspace, tmp_path, capsys, case):
    labels = Path(shutil.copytree(workspace / "train", tmp_path / "set"))
    spoil, message = BAD_SETS[case]
    named = spoil(labels)
    out = tmp_path / "L.safetensors"
    assert main(_args(workspace, labels, out)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and str(named) in err, err
    assert not out.exists() and list(tmp_path.glob("*.safetensors")) == []


@pytest.mark.parametrize("latents, extra, message, named", [
    ("other.safetensors", [], "made for another generator", "other.safetensors"),
    ("short.safetensors", [], "has no latents for image", "short.safetensors"),
    ("train.safetensors", ["--tasks", "seg,edges"], "unknown task 'edges'", None),
    ("train.safetensors", ["--layers", "0,42"], "feature maps", None),
])
def test_bad_latents_and_arguments(workspace, tmp_path, capsys, latents, extra, message, named):
    out = tmp_path / "L.safetensors"
    assert main(_args(workspace, workspace / "train", out, latents) + extra) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert named is None or named in err
    assert not out.exists()


def test_requested_task_absent(workspace, tmp_path, capsys):
    labels = Path(shutil.copytree(workspace / "train", tmp_path / "set"))
    shutil.rmtree(labels / "depth")
    out = tmp_path / "L.safetensors"
    assert main(_args(workspace, labels, out) + ["--tasks", "seg,depth"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "task 'depth' requested" in err and str(labels) in err
    assert not out.exists()
