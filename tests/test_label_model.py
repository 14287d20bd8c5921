"""The hypercolumn labeler's model: exact factorised inference, exact row gathering, heads, uncertainty."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from handsoff.label.features import FeatureBank, LinearResample, naive_hypercolumns, select_layers
from handsoff.label.heads import decode_heatmaps, js_divergence, top_fraction_mean
from handsoff.label.model import HypercolumnLabeler, LabelerConfig
from test_label_fakes import random_ws, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # tiny tensors: threads only add overhead

CLASSES = ("bg", "a", "b")
KEYPOINTS = ("p", "q")


@pytest.fixture(scope="module")
def G():
    return tiny_generator(0, resolution=16)


@pytest.fixture(scope="module")
def features(G):
    with torch.no_grad():
        return G.synthesis(random_ws(G, 3), noise_mode="const", return_features=True)[1]


@pytest.fixture(scope="module")
def G64():
    """Resolutions up to 64: groups resized along x by F.interpolate as well as by a dense product."""
    return tiny_generator(0, resolution=64)


def _config(G, layers=None, resolution=16, **kw) -> LabelerConfig:
    shapes = tuple(G.feature_shapes())
    kw = {"hidden": (12, 6), "ensemble": 3, "classes": CLASSES, "keypoint_names": KEYPOINTS, "depth": True, **kw}
    return LabelerConfig(shapes, tuple(layers or range(len(shapes))), resolution, **kw)


def _labeler(config: LabelerConfig, seed: int = 1) -> HypercolumnLabeler:
    """A random labeler whose BatchNorm statistics are not the identity (so folding is exercised)."""
    labeler = HypercolumnLabeler(config, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in labeler.norms:
            for t, lo, hi in ((norm.running_mean, -0.5, 0.5), (norm.running_var, 0.5, 2.0), (norm.weight, 0.5, 1.5),
                              (norm.bias, -0.5, 0.5)):
                t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return labeler


# --------------------------------------------------------------------------- resampling and gathering
@pytest.mark.parametrize("src, dst", [(4, 16), (8, 16), (16, 16), (16, 8), (5, 7), (7, 5), (3, 100), (16, 24)])
def test_resample_weights_are_pytorchs(src, dst):
    plan = LinearResample.create(src, dst)
    # Interpolating the identity yields PyTorch's own weight matrix.
    expected = F.interpolate(torch.eye(src)[None], size=dst, mode="linear", align_corners=False)[0].T
    assert torch.equal(plan.matrix(), expected)
    s0, s1, band = plan.band(2, min(dst, 5))
    assert torch.equal(band, expected[2:min(dst, 5), s0:s1])


@pytest.mark.parametrize("resolution", [16, 24, 8])
def test_gathered_rows_equal_the_naive_stack(G, features, resolution):
    maps = select_layers(features, range(len(features)), G.feature_shapes())
    bank = FeatureBank.from_maps(maps, resolution)
    stack = naive_hypercolumns(maps, resolution).permute(0, 2, 3, 1)  # [N, R, R, C]
    n, y, x = (t.flatten() for t in torch.meshgrid(torch.arange(3), torch.arange(resolution),
                                                    torch.arange(resolution), indexing="ij"))
    rows = bank.gather(n, y, x)
    assert rows.shape == (3 * resolution ** 2, sum(c for c, _ in G.feature_shapes()))
    torch.testing.assert_close(rows, stack[n, y, x], atol=1e-6, rtol=1e-6)
    assert bank.nbytes == 4 * sum(m[:1].numel() for m in maps) * 3


# --------------------------------------------------------------------------- factorised == naive
@pytest.mark.parametrize("layers, resolution", [(None, 16), ([3, 4], 16), ([0, 2, 4], 24), (None, 8)])
@pytest.mark.parametrize("band_elements", [10 ** 9, 3000])
def test_factorised_equals_naive(G, features, layers, resolution, band_elements):
    labeler = _labeler(_config(G, layers, resolution))
    fast = labeler.raw_outputs(features, band_elements=band_elements)
    slow = labeler.raw_outputs(features, naive=True)
    assert fast.shape == slow.shape == (3, 3, resolution, resolution, len(CLASSES) + len(KEYPOINTS) + 1)
    cfg = labeler.config
    seg, kp, depth = (cfg.task_slices[t] for t in ("seg", "keypoints", "depth"))
    for a, b in ((fast[..., seg].softmax(-1), slow[..., seg].softmax(-1)),
                 (fast[..., kp].sigmoid(), slow[..., kp].sigmoid()),
                 (fast[..., depth], slow[..., depth])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    p, q = labeler.predict(features, band_elements=band_elements), labeler.predict_naive(features)
    np.testing.assert_allclose(p.depth, q.depth, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(p.seg_uncertainty, q.seg_uncertainty, atol=1e-5)
    assert (p.seg != q.seg).mean() < 1e-3  # argmax ties broken by rounding, if any


@pytest.mark.parametrize("layers, resolution", [(None, 64), ([4, 6, 7, 8], 48), (None, 32)])
def test_factorised_equals_naive_at_64(G64, layers, resolution):
    with torch.no_grad():
        features = G64.synthesis(random_ws(G64, 2), noise_mode="const", return_features=True)[1]
    labeler = _labeler(_config(G64, layers, resolution))
    for band_elements in (10 ** 9, 20000):
        fast = labeler.raw_outputs(features, band_elements=band_elements)
        torch.testing.assert_close(fast, labeler.raw_outputs(features, naive=True), atol=1e-4, rtol=1e-4)


def test_folded_batchnorm_equals_forward_rows(G):
    labeler = _labeler(_config(G))
    rows = torch.randn(50, labeler.config.channels)
    h = torch.relu(labeler.linears[0](rows))
    for (weight, bias), i in zip(labeler._folded_tail(), range(len(labeler.norms))):
        h = torch.baddbmm(bias, h, weight)
        h = torch.relu(h) if i < len(labeler.norms) - 1 else h
    torch.testing.assert_close(h, labeler.forward_rows(rows), atol=1e-5, rtol=1e-5)


def test_predict_shapes_and_contract(G, features):
    labeler = _labeler(_config(G))
    pred = labeler.predict(features)
    assert pred.seg.dtype == np.uint8 and pred.seg.shape == (3, 16, 16) and pred.seg.max() < len(CLASSES)
    assert pred.keypoints.dtype == np.float32 and pred.keypoints.shape == (3, 2, 3)
    assert ((pred.keypoints[..., 2] >= 0) & (pred.keypoints[..., 2] <= 1)).all()
    assert pred.depth.dtype == np.float32 and (pred.depth > 0).all()
    assert set(pred.scores) == {"seg_js", "keypoints_spread", "depth_spread"}
    np.testing.assert_array_equal(pred.uncertainty, pred.scores["seg_js"])
    no_seg = _labeler(_config(G, classes=()))
    pred = no_seg.predict(features)
    assert pred.seg is None and pred.seg_uncertainty is None
    np.testing.assert_allclose(pred.uncertainty, (pred.scores["keypoints_spread"] + pred.scores["depth_spread"]) / 2)
    with pytest.raises(ValueError, match="feature map"):
        labeler.predict(features[:-1])


def test_identical_members_have_no_uncertainty(G, features):
    labeler = _labeler(_config(G))
    with torch.no_grad():
        for p in list(labeler.parameters()) + list(labeler.buffers()):
            p.copy_(p[:1].expand_as(p))
    pred = labeler.predict(features)
    assert np.abs(pred.seg_uncertainty).max() < 1e-6
    assert np.abs(pred.scores["depth_spread"]).max() < 1e-5
    assert np.abs(pred.scores["keypoints_spread"]).max() == 0
    different = _labeler(_config(G)).predict(features)
    assert (different.scores["seg_js"] > 0).all() and (different.scores["depth_spread"] > 0).all()


# --------------------------------------------------------------------------- heads
def test_js_divergence():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    same = torch.stack([probs.log()] * 4)
    mean, js = js_divergence(same)
    torch.testing.assert_close(mean, probs)
    assert js.abs().max() < 1e-6
    two = torch.stack([torch.tensor([[1.0, 1e-9]]).log(), torch.tensor([[1e-9, 1.0]]).log()])
    _, js = js_divergence(two)
    assert math.isclose(float(js), math.log(2), rel_tol=1e-4)  # maximal disagreement of two members


def test_top_fraction_mean():
    values = torch.arange(100.0).view(1, 10, 10).repeat(2, 1, 1)
    values[1] = 1.0
    torch.testing.assert_close(top_fraction_mean(values), torch.tensor([94.5, 1.0]))  # mean of 90..99
    assert float(top_fraction_mean(torch.tensor([[3.0, 1.0, 2.0]]))) == 3.0  # at least one pixel


@pytest.mark.parametrize("x, y", [(10.3, 7.8), (5.5, 5.5), (0.9, 30.2), (20.01, 12.99)])
def test_decode_recovers_a_planted_gaussian(x, y):
    h = w = 32
    ii, jj = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    sigma = 1.6
    heat = 0.9 * torch.exp(-((jj - x) ** 2 + (ii - y) ** 2) / (2 * sigma ** 2))
    out = decode_heatmaps(heat[None, None])[0, 0]
    assert abs(float(out[0]) - x) < 0.1 and abs(float(out[1]) - y) < 0.1
    assert math.isclose(float(out[2]), float(heat.max()), rel_tol=1e-6)


# --------------------------------------------------------------------------- config
def test_config_round_trip_and_checks(G):
    cfg = _config(G, [1, 4], 24)
    assert LabelerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.tasks == ("seg", "keypoints", "depth") and cfg.out_channels == 6
    assert cfg.channels == sum(G.feature_shapes()[i][0] for i in (1, 4))
    with pytest.raises(ValueError, match="unknown labeler config keys"):
        LabelerConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="config_version"):
        LabelerConfig.from_dict({**cfg.to_dict(), "config_version": 99})
    with pytest.raises(ValueError, match="layers"):
        _config(G, [4, 1])
    with pytest.raises(ValueError, match="at least one task"):
        _config(G, classes=(), keypoint_names=(), depth=False)
