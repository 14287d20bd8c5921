"""Tiny generators and labeled sets for the labeler tests (helpers, plus checks of the helpers)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from handsoff.data.labeled_set import LabeledSet, read_labeled_set, write_labeled_set
from handsoff.domains import get_domain
from handsoff.gan.config import GeneratorConfig
from handsoff.gan.networks import Generator

CLASSES = ("background", "dark", "bright")
KEYPOINTS = ("brightest", "darkest")


def tiny_generator(seed: int = 0, resolution: int = 16) -> Generator:
    """A random StyleGAN2 with 16 channels per layer; every parameter perturbed so all terms matter."""
    torch.manual_seed(seed)
    config = GeneratorConfig(img_resolution=resolution, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256,
                             channel_max=16)
    G = Generator(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return G.eval().requires_grad_(False)


def random_ws(G: Generator, n: int, seed: int = 0) -> torch.Tensor:
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    return G.mapping(z, truncation_psi=0.7)


def rendered_set(root: Path, n: int = 4, size: int = 16, seed: int = 0) -> Path:
    """A labeled-set folder of ``n`` heads-domain renders (labels need not match any latents)."""
    domain = get_domain("heads")
    meta = {"classes": list(domain.classes), "keypoint_names": list(domain.keypoint_names)}
    return write_labeled_set(domain.render(n, seed, size), root, meta)


def image_labels(G: Generator, ws: torch.Tensor, root: Path = Path("<memory>")) -> LabeledSet:
    """Labels that are a function of the generated pictures, so a labeler can learn them.

    Classes by brightness terciles of the whole set, keypoints at each image's brightest and
    darkest pixel, depth = 2 + brightness.
    """
    with torch.no_grad():
        images = G.synthesis(ws, noise_mode="const")
    gray = images.mean(1).numpy()  # [N, H, W]
    n, h, w = gray.shape
    lo, hi = np.quantile(gray, [1 / 3, 2 / 3])
    seg = (gray > lo).astype(np.uint8) + (gray > hi)
    points = []
    for pick in (gray.reshape(n, -1).argmax(1), gray.reshape(n, -1).argmin(1)):
        y, x = np.divmod(pick, w)
        points.append(np.stack([x + 0.5, y + 0.5, np.ones(n)], 1))
    uint8 = ((images * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return LabeledSet(root, [f"img{i}" for i in range(n)], list(uint8), list(seg), list((2 + gray).astype(np.float32)),
                      np.stack(points, 1).astype(np.float32),
                      {"classes": list(CLASSES), "keypoint_names": list(KEYPOINTS)})


def test_helpers_make_consistent_sets(tmp_path):
    G = tiny_generator()
    labels = image_labels(G, random_ws(G, 3))
    assert len(labels) == 3 and labels.keypoints.shape == (3, 2, 3)
    assert {int(v) for s in labels.seg for v in np.unique(s)} == {0, 1, 2}
    back = read_labeled_set(rendered_set(tmp_path / "set", n=2))
    assert len(back) == 2 and back.images[0].shape == (16, 16, 3) and back.depth is not None
