"""Training, saving, loading, labeling and scoring with the hypercolumn labeler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from handsoff.data.labeled_set import read_labeled_set
from handsoff.errors import HandsoffError
from handsoff.label.evaluate import evaluate_labeler
from handsoff.label.infer import label_ws
from handsoff.label.io import load_labeler, read_labeler_metadata, save_labeler
from handsoff.label.targets import labels_at_resolution, resolve_tasks
from handsoff.label.train import fit_labeler
from test_label_fakes import image_labels, random_ws, rendered_set, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = {"ensemble": 3, "hidden": (32, 16), "progress": False}


@pytest.fixture(scope="module")
def G():
    return tiny_generator(0)


@pytest.fixture(scope="module")
def easy(G):
    """Six generated images labeled by a function of their pixels, and their latents."""
    ws = random_ws(G, 6, seed=1)
    return ws, image_labels(G, ws)


@pytest.fixture(scope="module")
def trained(G, easy):
    ws, labels = easy
    history: list[dict] = []
    labeler = fit_labeler(G, ws, labels, steps=150, batch_pixels=256, seed=3,
                          callback=lambda step, record: history.append(record), **FAST)
    return labeler, history


def test_training_reduces_every_loss(trained):
    _, history = trained
    assert len(history) == 150
    for task in ("loss", "seg", "keypoints", "depth"):
        first = np.mean([h[task] for h in history[:5]])
        last = np.mean([h[task] for h in history[-10:]])
        assert last < 0.8 * first, (task, first, last)  # BCE on soft heatmaps has a floor above 0


def test_easy_task_is_learned(G, easy, trained):
    ws, labels = easy
    labeler, _ = trained
    scores = evaluate_labeler(G, labeler, ws, labels)
    assert scores["seg"]["pixel_accuracy"] > 0.85, scores
    assert scores["depth"]["absrel"] < 0.05, scores
    assert scores["keypoints"]["pck@0.1"] >= 0.5, scores
    assert scores["tasks"] == ["seg", "keypoints", "depth"] and scores["depth"]["pixels"].startswith("foreground")


def test_keypoint_confidence_is_calibrated_on_the_training_points(G, easy, trained):
    ws, labels = easy
    labeler, _ = trained
    assert 0 < labeler.config.keypoint_peak < 1  # smooth heatmaps never reach the target's peak of 1
    _, prediction = label_ws(G, labeler, ws)
    visible = labels.keypoints[..., 2] > 0.5
    confidence = prediction.keypoints[..., 2]
    assert confidence[visible].mean() > 0.8  # ~1 before clipping, by construction of the calibration
    assert confidence.min() >= 0 and confidence.max() <= 1


def test_seed_determinism_and_member_independence(G, easy):
    ws, labels = easy
    a = fit_labeler(G, ws, labels, steps=3, batch_pixels=64, seed=5, **FAST)
    b = fit_labeler(G, ws, labels, steps=3, batch_pixels=64, seed=5, **FAST)
    c = fit_labeler(G, ws, labels, steps=3, batch_pixels=64, seed=6, **FAST)
    first = a.linears[0].weight
    assert torch.equal(first, b.linears[0].weight) and not torch.equal(first, c.linears[0].weight)
    assert not torch.equal(first[0], first[1])  # every member its own init and pixel stream


def test_label_ws_and_save_load_round_trip(G, easy, trained, tmp_path):
    ws, _ = easy
    labeler, _ = trained
    images, pred = label_ws(G, labeler, ws, batch_size=4)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3) and len(pred) == 6
    path = save_labeler(tmp_path / "L.safetensors", labeler, G, extra={"note": "x"})
    back = load_labeler(path, G=G)
    _, again = label_ws(G, back, ws, batch_size=4)
    np.testing.assert_array_equal(again.seg, pred.seg)
    np.testing.assert_array_equal(again.depth, pred.depth)
    np.testing.assert_array_equal(again.keypoints, pred.keypoints)
    assert back.config == labeler.config and back.extra == {"note": "x"}
    assert read_labeler_metadata(path)["config"] == labeler.config

    with pytest.raises(HandsoffError, match="trained for another generator") as err:
        load_labeler(path, G=tiny_generator(1))
    assert str(path) in str(err.value)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HandsoffError, match="cut.safetensors"):
        load_labeler(truncated)
    with pytest.raises(HandsoffError, match="no such labeler file"):
        load_labeler(tmp_path / "missing.safetensors")


def test_label_resolution_and_layer_subset(G, easy):
    ws, labels = easy
    labeler = fit_labeler(G, ws, labels, steps=2, batch_pixels=64, layers=[-2, -1], label_resolution=8, **FAST)
    assert labeler.config.layers == (3, 4) and labeler.config.label_resolution == 8
    images, pred = label_ws(G, labeler, ws[:2])
    assert images.shape == (2, 8, 8, 3) and pred.seg.shape == (2, 8, 8) and pred.depth.shape == (2, 8, 8)
    maps = labels_at_resolution(labels, 8, ("seg", "keypoints", "depth"))
    np.testing.assert_allclose(maps.keypoints[..., :2], labels.keypoints[..., :2] / 2)
    assert maps.seg.shape == (6, 8, 8) and np.isfinite(maps.depth).all()


def test_rendered_set_at_another_size(G, tmp_path):
    labels = read_labeled_set(rendered_set(tmp_path / "set", n=3, size=32))
    labeler = fit_labeler(G, random_ws(G, 3), labels, steps=2, batch_pixels=64, class_balanced=True, **FAST)
    assert labeler.config.label_resolution == 16 and labeler.config.classes == labels.classes
    depth = labels_at_resolution(labels, 16, ("depth",)).depth
    assert depth.shape == (3, 16, 16) and np.nanmax(depth) <= labels.depth[0].max() + 1e-4


def test_task_and_input_errors(G, easy):
    ws, labels = easy
    assert resolve_tasks(labels, None) == ("seg", "keypoints", "depth")
    assert resolve_tasks(labels, ["depth", "seg"]) == ("seg", "depth")
    with pytest.raises(HandsoffError, match="unknown task 'edges'"):
        resolve_tasks(labels, ["edges"])
    with pytest.raises(HandsoffError, match="image-level class labels are not supported"):
        resolve_tasks(labels, ["image_class"])
    no_depth = type(labels)(labels.root, labels.names, labels.images, labels.seg, None, labels.keypoints, labels.meta)
    with pytest.raises(HandsoffError, match="task 'depth' requested but the set has no depth/ folder"):
        resolve_tasks(no_depth, ["depth"])
    with pytest.raises(HandsoffError, match="6 labeled images but 5 latents"):
        fit_labeler(G, ws[:5], labels, steps=1, **FAST)
    with pytest.raises(HandsoffError, match="feature maps"):
        fit_labeler(G, ws, labels, steps=1, layers=[99], **FAST)
