"""A tiny generator, a tiny real labeler and a fake labeler for the generation-engine tests.

Also a command line: ``python tests/test_synth_fakes.py ARGS`` runs ``handsoff ARGS`` with
`load_labeling` replaced by the fake labeler (the ``--labeler`` file only names it), for
CLI tests that should not depend on the labeler's training.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handsoff.gan.checkpoints import save_generator  # noqa: E402
from handsoff.gan.config import GeneratorConfig  # noqa: E402
from handsoff.gan.networks import Generator  # noqa: E402
from handsoff.label.prediction import LabelPrediction  # noqa: E402
from handsoff.synth.engine import LabelerInfo  # noqa: E402
from handsoff.utils.images import to_uint8  # noqa: E402

CLASSES = ("background", "dark", "bright")
KEYPOINTS = ("darkest", "brightest")
FAKE_INFO = LabelerInfo(classes=CLASSES, keypoint_names=KEYPOINTS, depth=True, digest="fake-labeler-1")


def tiny_generator(seed: int = 0, resolution: int = 16) -> Generator:
    """A random StyleGAN2 small enough for many CPU calls per test."""
    torch.manual_seed(seed)
    config = GeneratorConfig(img_resolution=resolution, z_dim=8, w_dim=8, mapping_layers=2, channel_base=64,
                             channel_max=8)
    return Generator(config).eval().requires_grad_(False)


def save_tiny_generator(path: Path, seed: int = 0) -> Path:
    save_generator(tiny_generator(seed), path)
    return path


def save_tiny_labeler(folder: Path, generator: Path) -> Path:
    """A real labeler (2 members, 3 steps) for the generator file ``generator``, fitted on 4
    rendered 16x16 'heads' images with random latents; returns ``folder/labeler.safetensors``."""
    from handsoff.data.labeled_set import read_labeled_set, render_to_folder
    from handsoff.domains import get_domain
    from handsoff.gan.checkpoints import load_generator
    from handsoff.label.io import save_labeler
    from handsoff.label.train import fit_labeler

    G = load_generator(generator)
    labels = read_labeled_set(render_to_folder(get_domain("heads"), 4, 0, G.img_resolution, folder / "labeled",
                                               progress=False))
    ws = G.mapping(torch.from_numpy(np.random.RandomState(0).randn(4, G.z_dim)).float(), truncation_psi=0.7)
    labeler = fit_labeler(G, ws, labels, ensemble=2, hidden=(8,), steps=3, batch_pixels=64, progress=False)
    return save_labeler(folder / "labeler.safetensors", labeler, G)


def fake_predict(images: np.ndarray) -> LabelPrediction:
    """Labels that are a deterministic function of the pixels: classes by brightness (dark < 0.45,
    bright > 0.6), keypoints at the darkest and brightest pixels, depth = 1 - brightness."""
    gray = images.astype(np.float32).mean(axis=-1) / 255.0
    n, h, w = gray.shape
    flat = gray.reshape(n, -1)
    seg = np.where(gray < 0.45, 1, np.where(gray > 0.6, 2, 0)).astype(np.uint8)
    points = []
    for pick in (flat.argmin(axis=1), flat.argmax(axis=1)):
        y, x = np.divmod(pick, w)
        points.append(np.stack([x + 0.5, y + 0.5, (flat.max(axis=1) - flat.min(axis=1))], axis=1))
    uncertainty = flat.std(axis=1).astype(np.float32)
    return LabelPrediction(uncertainty=uncertainty, seg=seg, keypoints=np.stack(points, axis=1).astype(np.float32),
                           depth=(1.0 - gray).astype(np.float32),
                           scores={"seg_js": uncertainty, "spread": -uncertainty})


def fake_label_fn(G: torch.nn.Module, noise_mode: str = "const"):
    """A `LabelFn` for ``G`` with the fake labels."""
    @torch.no_grad()
    def label(ws: torch.Tensor):
        images = to_uint8(G.synthesis(ws, noise_mode=noise_mode))
        return images, fake_predict(images)

    return label


def _fake_load_labeling(path, G, device="cpu", noise_mode="const"):
    return fake_label_fn(G, noise_mode), FAKE_INFO


def main(argv: list[str]) -> int:
    import handsoff.synth.generation as generation
    from handsoff.cli import main as cli_main

    torch.set_num_threads(1)  # bytes depend on the thread count: every test process uses one
    real, generation.load_labeling = generation.load_labeling, _fake_load_labeling
    try:
        return cli_main(argv)
    finally:
        generation.load_labeling = real


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
