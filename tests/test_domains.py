"""The built-in 'heads' domain: contract, determinism and the consistency of its labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import handsoff.domains.heads as heads
from handsoff.domains import DOMAINS, FAR_DEPTH, Domain, LabeledBatch, get_domain
from handsoff.domains.preview import label_grid

SEED = 1234


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def domain() -> Domain:
    return get_domain("heads")


@pytest.fixture(scope="module")
def batch64(domain: Domain) -> LabeledBatch:
    """64 images at 64x64: two blocks, enough for statistics."""
    return domain.render(64, SEED, 64)


def _same(a: LabeledBatch, b: LabeledBatch) -> None:
    assert a.names == b.names
    for field in ("images", "seg", "depth", "keypoints"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        assert x.tobytes() == y.tobytes(), f"{field} differs"


def test_registry() -> None:
    domain = get_domain()
    assert domain is DOMAINS["heads"] is get_domain("heads")
    assert isinstance(domain, Domain)
    with pytest.raises(ValueError, match="heads"):
        get_domain("no-such-domain")


def test_shapes_and_dtypes(domain: Domain) -> None:
    batch = domain.render(5, SEED, 32, start=10)
    k = len(domain.keypoint_names)
    assert len(domain.classes) >= 7 and domain.classes[0] == "background" and k >= 8
    assert batch.images.shape == (5, 32, 32, 3) and batch.images.dtype == np.uint8
    assert batch.seg.shape == (5, 32, 32) and batch.seg.dtype == np.uint8
    assert batch.depth.shape == (5, 32, 32) and batch.depth.dtype == np.float32
    assert batch.keypoints.shape == (5, k, 3) and batch.keypoints.dtype == np.float32
    assert batch.names == [f"s{SEED}_{i:08d}" for i in range(10, 15)]
    assert batch.seg.max() < len(domain.classes)
    assert set(np.unique(batch.keypoints[:, :, 2])) <= {0.0, 1.0}


def test_same_seed_same_bytes_other_seed_differs(domain: Domain) -> None:
    _same(domain.render(6, SEED, 32), domain.render(6, SEED, 32))
    assert not np.array_equal(domain.render(6, SEED + 1, 32).images, domain.render(6, SEED, 32).images)


def test_chunking_does_not_change_images(domain: Domain) -> None:
    _same(domain.render(8, SEED, 32), LabeledBatch.concat([domain.render(3, SEED, 32), domain.render(5, SEED, 32, 3)]))
    # Across a block boundary (32 images at 64x64), and one image alone.
    whole = domain.render(36, SEED, 64)
    _same(whole.select(slice(28, 36)), domain.render(8, SEED, 64, start=28))
    _same(whole.select([33]), domain.render(1, SEED, 64, start=33))


def test_block_size_and_threads_do_not_change_images(domain: Domain, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample arithmetic is position-independent: any block composition gives the same bytes."""
    reference = domain.render(12, SEED, 32)
    monkeypatch.setattr(heads, "_BLOCK_SAMPLES", 3 * 64 * 64)  # blocks of 3 images
    _same(reference, domain.render(12, SEED, 32))
    torch.set_num_threads(2)
    try:
        _same(reference, domain.render(12, SEED, 32))
    finally:
        torch.set_num_threads(1)


def test_bad_arguments(domain: Domain) -> None:
    for kwargs in ({"n": -1}, {"size": 33}, {"size": 8}, {"seed": -5}, {"start": -1}):
        args = {"n": 2, "seed": 0, "size": 32, "start": 0, **kwargs}
        with pytest.raises(ValueError):
            domain.render(**args)
    with pytest.raises(TypeError):
        domain.render(2, 0, 32.0)  # type: ignore[arg-type]
    empty = domain.render(0, 0, 32)
    assert len(empty) == 0 and empty.images.shape == (0, 32, 32, 3)


def test_every_class_appears(domain: Domain, batch64: LabeledBatch) -> None:
    present = set(np.unique(batch64.seg).tolist())
    missing = [domain.classes[c] for c in range(len(domain.classes)) if c not in present]
    assert not missing, f"classes never rendered: {missing}"


def test_depth_finite_and_background_constant(domain: Domain, batch64: LabeledBatch) -> None:
    depth, seg = batch64.depth, batch64.seg
    assert np.isfinite(depth).all()
    assert (depth[seg == 0] == FAR_DEPTH).all()
    assert (depth[seg != 0] < FAR_DEPTH).all() and (depth > 0).all()


def _near(seg: np.ndarray, x: float, y: float, radius: int = 1) -> set[int]:
    """Classes in the (2 radius + 1)^2 pixels around the pixel holding (x, y)."""
    j, i = int(np.floor(x)), int(np.floor(y))
    return set(np.unique(seg[max(i - radius, 0):i + radius + 1, max(j - radius, 0):j + radius + 1]).tolist())


def test_visible_keypoints_land_on_their_part(domain: Domain, batch64: LabeledBatch) -> None:
    cls = {name: i for i, name in enumerate(domain.classes)}
    expect = {"right_eye": "eye", "left_eye": "eye", "nose_tip": "nose", "mouth_left": "mouth",
              "mouth_right": "mouth", "right_ear": "ear", "left_ear": "ear", "right_brow": "brow", "left_brow": "brow"}
    size = batch64.images.shape[1]
    for name, part in expect.items():
        k = domain.keypoint_names.index(name)
        hits = total = 0
        for seg, (x, y, visible) in zip(batch64.seg, batch64.keypoints[:, k]):
            if visible:
                assert 0 <= x <= size and 0 <= y <= size
                total += 1
                hits += cls[part] in _near(seg, x, y)
        assert total >= 16, f"{name}: only {total} of 64 visible"
        assert hits >= 0.8 * total, f"{name}: on a {part} pixel in {hits} of {total} visible cases"


def test_occlusion_happens_and_matches_depth(domain: Domain, batch64: LabeledBatch) -> None:
    visible = batch64.keypoints[:, :, 2]
    assert 0.02 < 1.0 - visible.mean() < 0.5, f"occluded fraction {1 - visible.mean():.3f}"
    ears = [domain.keypoint_names.index(n) for n in ("right_ear", "left_ear")]
    assert (visible[:, ears] == 0).any(), "turned heads should hide an ear sometimes"
    # A hidden keypoint inside the frame has something nearer than it in front: not background.
    size = batch64.images.shape[1]
    for seg, points in zip(batch64.seg, batch64.keypoints):
        for x, y, v in points:
            if not v and 0 <= x < size and 0 <= y < size:
                assert _near(seg, x, y) != {0}


def test_label_grid(batch64: LabeledBatch) -> None:
    picture = label_grid(batch64, max_items=6, per_row=3)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3
    assert picture.shape[1] > 3 * 4 * 64 and picture.shape[0] > 2 * 64


def test_labeled_batch_checks_its_arrays() -> None:
    good = dict(images=np.zeros((1, 4, 4, 3), np.uint8), seg=np.zeros((1, 4, 4), np.uint8),
                depth=np.zeros((1, 4, 4), np.float32), keypoints=np.zeros((1, 2, 3), np.float32), names=["a"])
    LabeledBatch(**good)
    for field, bad in (("images", np.zeros((1, 4, 4, 3), np.float32)), ("depth", np.zeros((1, 4, 5), np.float32)),
                       ("keypoints", np.zeros((2, 2, 3), np.float32)), ("names", ["a", "b"])):
        with pytest.raises(ValueError, match=field):
            LabeledBatch(**{**good, field: bad})
