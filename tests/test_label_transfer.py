"""Label transfer by dense correspondence (`handsoff.label.transfer`) and the labeler's use of it."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from handsoff.cli import main
from handsoff.data.labeled_set import IGNORE_INDEX, LabeledSet, write_labeled_set
from handsoff.domains.base import LabeledBatch
from handsoff.errors import HandsoffError
from handsoff.gan.checkpoints import save_generator
from handsoff.gan.digest import generator_digest
from handsoff.invert.latents import Latents, save_latents
from handsoff.label.heads import keypoint_loss
from handsoff.label.io import load_labeler
from handsoff.label.targets import labels_at_resolution
from handsoff.label.train import fit_labeler
from handsoff.label.transfer import consistent_flow, dense_flow, resize_flow, summarize, transfer_labels
from test_label_fakes import image_labels, random_ws, rendered_set, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SIZE, MARGIN = 64, 8
SHIFT = (3, 2)  # content of the real image at (x, y) is at (x + 3, y + 2) in the "reconstruction"
CLASSES = ["background", "a", "b"]


def _texture(seed: int, size: int) -> np.ndarray:
    """A smooth random RGB texture: every patch has structure for the flow to lock on."""
    noise = np.random.RandomState(seed).rand(size, size, 3).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 1.5)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A real image and its "reconstruction": the same texture seen through a window moved by SHIFT."""
    big = _texture(seed, SIZE + 2 * MARGIN)
    dx, dy = SHIFT
    real = big[MARGIN:MARGIN + SIZE, MARGIN:MARGIN + SIZE]
    recon = big[MARGIN - dy:MARGIN - dy + SIZE, MARGIN - dx:MARGIN - dx + SIZE]
    return np.ascontiguousarray(real), np.ascontiguousarray(recon)


def _labels(images: list[np.ndarray], scale: int = 1, root: Path = Path("<memory>")) -> LabeledSet:
    """Two class blocks, a depth ramp with an invalid corner, three keypoints; ``scale`` x finer than the images."""
    n, size = len(images), SIZE * scale
    seg = np.zeros((size, size), np.uint8)
    seg[20 * scale:36 * scale, 16 * scale:40 * scale] = 1
    seg[40 * scale:52 * scale, 24 * scale:34 * scale] = 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    depth = 1.0 + xs / size + 0.5 * ys / size
    depth[:6 * scale, :6 * scale] = 0.0  # no depth label there
    points = np.asarray([[30.5, 25.5, 1], [20.0, 45.0, 1], [62.5, 30.5, 1]], np.float32)
    points[:, :2] *= scale
    return LabeledSet(root, [f"img{i}" for i in range(n)],
                      [cv2.resize(im, (size, size), interpolation=cv2.INTER_NEAREST) for im in images],
                      [seg.copy() for _ in range(n)], [depth.copy() for _ in range(n)],
                      np.stack([points] * n), {"classes": CLASSES, "keypoint_names": ["p", "q", "edge"]})


def _shifted(array: np.ndarray, scale: int = 1) -> np.ndarray:
    """What ``array`` (a label map) should become: moved by SHIFT, nothing where it came from outside."""
    dx, dy = SHIFT[0] * scale, SHIFT[1] * scale
    out = np.zeros_like(array)
    out[dy:, dx:] = array[:array.shape[0] - dy, :array.shape[1] - dx]
    return out


def _interior(scale: int = 1) -> np.ndarray:
    """Pixels of the reconstruction whose content came from inside the real frame (not near its border)."""
    size = SIZE * scale
    mask = np.zeros((size, size), bool)
    mask[(SHIFT[1] + 2) * scale:size - 2 * scale, (SHIFT[0] + 2) * scale:size - 2 * scale] = True
    return mask


def test_flow_recovers_a_known_shift():
    real, recon = _pair()
    forward, backward = dense_flow(real, recon), dense_flow(recon, real)
    inner = _interior()
    np.testing.assert_allclose(np.median(forward[inner], 0), SHIFT, atol=0.1)
    np.testing.assert_allclose(np.median(backward[inner], 0), [-SHIFT[0], -SHIFT[1]], atol=0.1)
    assert consistent_flow(backward, forward)[inner].mean() > 0.95
    np.testing.assert_allclose(np.median(dense_flow(real, recon, "farneback")[inner], 0), SHIFT, atol=0.3)
    doubled = resize_flow(forward, 2 * SIZE, 2 * SIZE)
    assert doubled.shape == (2 * SIZE, 2 * SIZE, 2)
    np.testing.assert_allclose(np.median(doubled[_interior(2)], 0), [2 * SHIFT[0], 2 * SHIFT[1]], atol=0.2)


@pytest.mark.parametrize("scale", [1, 2])
def test_labels_land_where_the_content_went(scale):
    real, recon = _pair()
    labels = _labels([real], scale)
    result = transfer_labels(real[None], recon[None], labels)
    moved, inner = result.labels, _interior(scale)
    seg, expected = moved.seg[0], _shifted(labels.seg[0], scale)
    kept = inner & (seg != IGNORE_INDEX)
    assert kept.sum() > 0.9 * inner.sum()
    assert (seg[kept] == expected[kept]).mean() > 0.98
    depth, want = moved.depth[0], _shifted(labels.depth[0], scale)
    ok = kept & (want > 0) & (depth > 0)
    assert ok.sum() > 0.85 * inner.sum()
    np.testing.assert_allclose(np.median(np.abs(depth[ok] - want[ok])), 0, atol=0.01 / scale)
    # Depth that had no label stays without one where it lands (0 = invalid), never blended in.
    dx, dy = SHIFT[0] * scale, SHIFT[1] * scale
    corner = depth[dy + scale:dy + 4 * scale, dx + scale:dx + 4 * scale]
    assert (corner == 0).all()
    points, known = moved.keypoints[0], result.keypoint_known[0]
    np.testing.assert_allclose(points[:2, :2], labels.keypoints[0, :2, :2] + np.multiply(SHIFT, scale), atol=0.3)
    assert points[:2, 2].tolist() == [1, 1] and known[:2].all()
    assert points[2, 2] == 0  # pushed out of the frame: invisible
    # The reconstruction is the new image, at the labels' size.
    assert moved.images[0].shape == (SIZE * scale, SIZE * scale, 3) and moved.names == labels.names
    stats = result.stats[0]
    assert 0.85 < stats.kept < 1 and abs(stats.mean_flow - np.hypot(*SHIFT)) < 0.5
    assert stats.keypoints_kept == pytest.approx(2 / 3)


def test_out_of_frame_and_occluded_pixels_become_ignore():
    real, recon = _pair()
    recon = recon.copy()
    recon[36:54, 36:54] = _texture(99, 18)  # a patch the real image does not contain anywhere
    labels = _labels([real])
    occluded = np.zeros((SIZE, SIZE), bool)
    occluded[39:51, 39:51] = True  # the patch without its rim (the flow there may lean on neighbours)
    strip = np.zeros((SIZE, SIZE), bool)
    strip[:, :SHIFT[0]] = True
    strip[:SHIFT[1], :] = True
    # Sundaram et al.'s tolerances catch most of the patch; the looser defaults (chosen for real
    # reconstructions) still more than half: a smooth random patch can match somewhere by chance.
    for tolerances, share in (({"alpha": 0.01, "beta": 0.5}, 0.75), ({}, 0.5)):
        moved = transfer_labels(real[None], recon[None], labels, **tolerances).labels
        seg, depth = moved.seg[0], moved.depth[0]
        assert (seg[strip] == IGNORE_INDEX).mean() > 0.9  # came from outside the real frame
        assert (seg[occluded] == IGNORE_INDEX).mean() > share
        assert ((seg == IGNORE_INDEX) == (depth == 0))[_interior()].mean() > 0.98


def test_identity_when_the_reconstruction_is_the_image():
    real, _ = _pair(1)
    labels = _labels([real, real])
    result = transfer_labels(np.stack([real, real]), np.stack([real, real]), labels)
    for i in range(2):
        np.testing.assert_array_equal(result.labels.seg[i], labels.seg[i])
        np.testing.assert_allclose(result.labels.depth[i], labels.depth[i], atol=1e-5)
        np.testing.assert_allclose(result.labels.keypoints[i], labels.keypoints[i], atol=1e-3)
    assert result.keypoint_known.all()
    assert summarize(result.stats) == {"kept": 1.0, "mean_flow": pytest.approx(0, abs=1e-3), "keypoints_kept": 1.0}


def test_deterministic_and_thread_count_restored():
    real, recon = _pair(2)
    labels = _labels([real])
    before = cv2.getNumThreads()
    first = transfer_labels(real[None], recon[None], labels)
    cv2.setNumThreads(2)
    try:
        second = transfer_labels(real[None], recon[None], labels)
        assert cv2.getNumThreads() == 2
    finally:
        cv2.setNumThreads(before)
    np.testing.assert_array_equal(first.labels.seg[0], second.labels.seg[0])
    np.testing.assert_array_equal(first.labels.depth[0], second.labels.depth[0])
    np.testing.assert_array_equal(first.labels.keypoints, second.labels.keypoints)
    assert first.stats == second.stats


def test_unreliable_keypoint_is_unknown():
    real, recon = _pair(3)
    recon = recon.copy()
    recon[20:34, 24:38] = _texture(98, 14)  # where keypoint p lands, content the real image lacks
    labels = _labels([real])
    result = transfer_labels(real[None], recon[None], labels)
    assert result.labels.keypoints[0, 0, 2] == 0 and not result.keypoint_known[0, 0]
    assert result.labels.keypoints[0, 1, 2] == 1 and result.keypoint_known[0, 1]
    maps = labels_at_resolution(result.labels, SIZE, ("keypoints", "depth"))
    assert np.isnan(maps.depth[0][result.labels.depth[0] == 0]).all()  # 0 depth = invalid for the labeler


def test_bad_input_names_the_file(tmp_path):
    real, recon = _pair()
    labels = _labels([real], root=tmp_path)
    with pytest.raises(HandsoffError, match="reconstructions are"):
        transfer_labels(real[None], recon[None, :32], labels)
    with pytest.raises(HandsoffError, match="1 labeled images but 2"):
        transfer_labels(np.stack([real, real]), np.stack([recon, recon]), labels)
    wide = LabeledSet(tmp_path, ["img0"], [np.zeros((32, 64, 3), np.uint8)], [np.zeros((32, 64), np.uint8)], None,
                      None, {"classes": CLASSES})
    with pytest.raises(HandsoffError) as err:
        transfer_labels(real[None], recon[None], wide)
    assert str(tmp_path / "images" / "img0") in str(err.value) and "aspect ratio" in str(err.value)


def test_keypoint_loss_skips_unknown_keypoints():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 3, generator=gen), torch.rand(2, 5, 3, generator=gen)
    weight = torch.ones(2, 5, 3)
    weight[..., 1] = 0
    kept = keypoint_loss(logits[..., [0, 2]], targets[..., [0, 2]])
    torch.testing.assert_close(keypoint_loss(logits, targets, weight), kept)
    torch.testing.assert_close(keypoint_loss(logits, targets, torch.ones_like(weight)), keypoint_loss(logits, targets))


def test_fit_labeler_with_flow_transfer():
    G = tiny_generator(0)
    ws = random_ws(G, 3)
    labels = image_labels(G, ws)  # the images are G's own: the flow is (near) zero
    fast = dict(ensemble=2, hidden=(16, 8), steps=3, batch_pixels=64, progress=False)
    labeler = fit_labeler(G, ws, labels, transfer_labels="flow", **fast)
    assert labeler.config.tasks == ("seg", "keypoints", "depth")
    with pytest.raises(HandsoffError, match="transfer_labels 'warp'"):
        fit_labeler(G, ws, labels, transfer_labels="warp", **fast)


# --------------------------------------------------------------------------- the CLI option
QUICK = ["--steps", "3", "--batch-pixels", "64", "--ensemble", "2", "--hidden", "16,8", "--device", "cpu"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    G = tiny_generator(0)
    save_generator(G, root / "G.safetensors")
    rendered_set(root / "train", n=3, size=32, seed=0)  # labels finer than the 16x16 generator
    names = sorted(p.stem for p in (root / "train" / "images").iterdir())
    save_latents(root / "train.safetensors", Latents(random_ws(G, 3, 0), names, generator_digest(G)))
    return root


def _args(root: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return ["fit-labeler", "--generator", str(root / "G.safetensors"), "--latents", str(root / "train.safetensors"),
            "--labels", str(labels), "--out", str(out), *QUICK, *extra]


def test_cli_transfer_labels_end_to_end(workspace, tmp_path, capsys):
    out = tmp_path / "L.safetensors"
    assert main(_args(workspace, workspace / "train", out)) == 0  # flow is the default
    assert "wrote" in capsys.readouterr().out
    assert load_labeler(out).extra["training"]["transfer_labels"] == "flow"
    assert main(_args(workspace, workspace / "train", tmp_path / "M.safetensors", "--transfer-labels", "none")) == 0
    assert load_labeler(tmp_path / "M.safetensors").extra["training"]["transfer_labels"] == "none"
    with pytest.raises(SystemExit) as exit_:
        main(["fit-labeler", "--help"])
    assert exit_.value.code == 0 and "--transfer-labels {none,flow}" in capsys.readouterr().out


def test_cli_transfer_labels_bad_input(workspace, tmp_path, capsys):
    out = tmp_path / "L.safetensors"
    with pytest.raises(SystemExit) as exit_:
        main(_args(workspace, workspace / "train", out, "--transfer-labels", "warp"))
    assert exit_.value.code == 2
    capsys.readouterr()
    # A non-square image: the flow cannot pair it with the generator's square reconstruction.
    bad = tmp_path / "wide"
    images = np.zeros((3, 32, 48, 3), np.uint8)
    names = sorted(p.stem for p in (workspace / "train" / "images").iterdir())
    batch = LabeledBatch(images, np.zeros((3, 32, 48), np.uint8), np.ones((3, 32, 48), np.float32),
                         np.zeros((3, 0, 3), np.float32), names)
    write_labeled_set(batch, bad, {"classes": CLASSES, "keypoint_names": []})
    assert main(_args(workspace, bad, out, "--transfer-labels", "flow")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad / "images" / f"{batch.names[0]}.png") in err, err
    assert not out.exists()


def test_pipeline_labeler_table_takes_the_option(tmp_path):
    from handsoff.synth.pipeline import build_stages, config_from_dict

    def stages(labeler: dict) -> list:
        return build_stages(config_from_dict({"out": "run", "labeled": {"path": "set"}, "encoder": {"path": "E"},
                                              "labeler": labeler, "generate": {"n": 4}}, tmp_path), progress=False)

    stage = next(s for s in stages({"transfer_labels": "flow", "flow_method": "farneback"}) if s.name == "fit-labeler")
    assert stage.settings == {"transfer_labels": "flow", "flow_method": "farneback"}
    with pytest.raises(HandsoffError, match="no setting 'transfer'"):
        stages({"transfer": "flow"})
