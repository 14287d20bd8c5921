"""GAN inversion: encoder shapes and file format, the two training stages, refinement, invert_images.

Everything runs on tiny random generators (16-32 px, w_dim 32) and a stand-in perceptual
distance, so the file takes seconds; the real LPIPS is tested in test_lpips.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import handsoff.invert.train as train_mod
from handsoff.errors import HandsoffError
from handsoff.gan.config import GeneratorConfig
from handsoff.gan.networks import Generator
from handsoff.invert.encoder import Encoder, EncoderConfig, load_encoder, save_encoder, style_groups
from handsoff.invert.invert import invert_images, psnr, refine_latents, refine_lr
from handsoff.invert.train import fit_encoder, images_to_tensor, sample_training_pairs

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL_ENCODER = {"channel_base": 128, "max_channels": 32, "fpn_channels": 16, "head_channels": 32}


def tiny_generator(resolution: int = 16, seed: int = 0, w_dim: int = 32) -> Generator:
    """A random generator with w_avg set to its mean w (as a trained one has)."""
    config = GeneratorConfig(img_resolution=resolution, z_dim=w_dim, w_dim=w_dim, channel_base=256, channel_max=16,
                             mapping_layers=2, num_fp16_res=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = Generator(config)
        with torch.no_grad():
            G.mapping.w_avg.copy_(G.mapping(torch.randn(512, w_dim))[:, 0].mean(0))
    return G.eval().requires_grad_(False)


class FakeLPIPS(nn.Module):
    """A cheap differentiable per-image distance standing in for LPIPS: mean |x - y| of 2x-pooled images."""

    def __init__(self) -> None:
        super().__init__()
        self.register_parameter("unused", nn.Parameter(torch.zeros(()), requires_grad=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (nn.functional.avg_pool2d(x - y, 2)).abs().flatten(1).mean(1)


@pytest.fixture(scope="module")
def G() -> Generator:
    return tiny_generator(16)


def _images(G: Generator, n: int, seed: int) -> np.ndarray:
    from handsoff.utils.images import to_uint8

    _, x = sample_training_pairs(G, n, torch.Generator().manual_seed(seed))
    return to_uint8(x)


# ----------------------------------------------------------------------------------------- encoder

@pytest.mark.parametrize("resolution,num_ws", [(16, 6), (32, 8), (64, 10)])
def test_encoder_shapes(resolution: int, num_ws: int) -> None:
    G = tiny_generator(resolution)
    assert G.num_ws == num_ws
    E = Encoder.for_generator(G, **SMALL_ENCODER)
    ws = E(torch.zeros(2, 3, resolution, resolution))
    assert ws.shape == (2, num_ws, 32) and ws.dtype == torch.float32
    assert E.w_scale > 0 and torch.equal(E.w_avg, G.mapping.w_avg)
    # The heads start near w_avg.
    assert (ws - E.w_avg).abs().mean() < E.w_scale
    with pytest.raises(ValueError, match="images must be"):
        E(torch.zeros(1, 3, resolution // 2, resolution // 2))


def test_style_groups_and_pyramid() -> None:
    assert style_groups(10) == [range(0, 3), range(3, 7), range(7, 10)]
    assert style_groups(6) == [range(0, 3), range(3, 6)]
    assert style_groups(18)[2] == range(7, 18)
    assert EncoderConfig(resolution=64, num_ws=10, w_dim=8).pyramid == [4, 8, 16]
    assert EncoderConfig(resolution=1024, num_ws=18, w_dim=8).pyramid == [64, 128, 256]
    assert EncoderConfig(resolution=1024, num_ws=18, w_dim=8).channels(1024) == 16


def test_save_load_round_trip_and_digest_check(G: Generator, tmp_path: Path) -> None:
    E = Encoder.for_generator(G, **SMALL_ENCODER)
    E.training_record = {"steps": 3}
    path = save_encoder(tmp_path / "E.safetensors", E, G)
    loaded = load_encoder(path, G)
    assert loaded.config == E.config and loaded.training_record == {"steps": 3}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded(x), E(x))
    other = tiny_generator(16, seed=1)
    with pytest.raises(HandsoffError) as info:
        load_encoder(path, other)
    assert str(path) in str(info.value) and "another generator" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(HandsoffError, match="junk.safetensors"):
        load_encoder(tmp_path / "junk.safetensors")
    with pytest.raises(HandsoffError, match="no such encoder file"):
        load_encoder(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------- training

def _latent_error(E: Encoder, G: Generator) -> float:
    ws, x = sample_training_pairs(G, 32, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float(((E(x) - ws) / E.w_scale).square().mean())


def test_stage1_reduces_latent_loss() -> None:
    # w_dim 8: a random generator's ws are learnable in a few dozen steps (w_dim 32 needs hundreds).
    G = tiny_generator(16, w_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = Encoder.for_generator(G, seed=0, **SMALL_ENCODER)
    E = fit_encoder(G, steps=40, lpips_steps=0, batch=8, seed=0, progress=False, encoder_config=SMALL_ENCODER)
    before, after = _latent_error(untrained, G), _latent_error(E, G)
    assert after < 0.75 * before, (before, after)
    assert not E.training and not any(p.requires_grad for p in E.parameters())
    assert set(E.training_record["final_losses"]) == {"supervised"}


def test_same_seed_same_encoder(G: Generator) -> None:
    kw = dict(steps=3, lpips_steps=2, batch=4, progress=False, encoder_config=SMALL_ENCODER, lpips=FakeLPIPS())
    a, b = fit_encoder(G, seed=5, **kw), fit_encoder(G, seed=5, **kw)
    c = fit_encoder(G, seed=6, **kw)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_stage2_runs_capped_with_real_images(G: Generator, tmp_path: Path) -> None:
    real = _images(G, 5, seed=9)
    log = tmp_path / "E.losses.json"
    E = fit_encoder(G, steps=2, lpips_steps=3, batch=4, images=real, progress=False, log_every=1, log_path=log,
                    encoder_config=SMALL_ENCODER, lpips=FakeLPIPS())
    import json

    records = json.loads(log.read_text())["records"]
    assert [r["stage"] for r in records] == ["supervised"] * 2 + ["lpips"] * 3
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert {"lpips", "pixel", "latent", "loss"} <= set(records[-1])
    assert log.with_suffix(".png").stat().st_size > 0
    assert E.training_record["lpips_steps"] == 3 and E.training_record["images"] == 5
    with pytest.raises(ValueError, match="images must be uint8"):
        fit_encoder(G, steps=1, lpips_steps=1, images=real[:, :8], progress=False, lpips=FakeLPIPS())


def test_resume_equals_uninterrupted(G: Generator, tmp_path: Path, monkeypatch) -> None:
    kw = dict(steps=4, lpips_steps=3, batch=2, seed=1, progress=False, encoder_config=SMALL_ENCODER,
              lpips=FakeLPIPS(), checkpoint_every=2)
    straight = fit_encoder(G, **kw)
    ckpt = tmp_path / "E.resume.pt"
    calls = {"n": 0}
    real_sample = train_mod.sample_training_pairs

    def crash_on_sixth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside stage 2, after its first step
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train_mod, "sample_training_pairs", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        fit_encoder(G, checkpoint_path=ckpt, **kw)
    assert ckpt.exists()
    monkeypatch.setattr(train_mod, "sample_training_pairs", real_sample)
    resumed = fit_encoder(G, checkpoint_path=ckpt, **kw)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(HandsoffError, match="other settings"):
        fit_encoder(G, checkpoint_path=ckpt, **{**kw, "seed": 2})


# ----------------------------------------------------------------------------------------- refinement

def test_refine_lr_schedule() -> None:
    lrs = [refine_lr(s, 100) for s in range(100)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[75:], lrs[76:])) and lrs[99] < 0.01
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6]))


def test_refinement_keeps_best_and_never_worsens(G: Generator) -> None:
    target = images_to_tensor(_images(G, 3, seed=4))
    start = G.mapping.w_avg.expand(3, G.num_ws, -1).clone()
    lp = FakeLPIPS()
    ws, loss_start, loss_best = refine_latents(G, target, start, steps=8, lpips=lp)
    assert ws.shape == start.shape
    assert (loss_best <= loss_start).all() and (loss_best < loss_start).any()
    # The kept codes are the ones that scored loss_best.
    from handsoff.invert.invert import _refine_losses

    with torch.no_grad():
        again = _refine_losses(G, lp, target, ws, start, ws)
    assert torch.allclose(again, loss_best, rtol=1e-4, atol=1e-6)
    # Zero steps: the start is kept.
    ws0, s0, b0 = refine_latents(G, target, start, steps=0, lpips=lp)
    assert torch.equal(ws0, start) and torch.equal(s0, b0)


def test_refinement_is_independent_per_image(G: Generator) -> None:
    target = images_to_tensor(_images(G, 2, seed=8))
    start = G.mapping.w_avg.expand(2, G.num_ws, -1).clone()
    both, _, _ = refine_latents(G, target, start, steps=5, lpips=FakeLPIPS())
    alone, _, _ = refine_latents(G, target[:1], start[:1], steps=5, lpips=FakeLPIPS())
    assert torch.allclose(both[:1], alone, atol=1e-5)


# ----------------------------------------------------------------------------------------- invert_images

def test_invert_images_w_plus_and_w_only(G: Generator) -> None:
    E = Encoder.for_generator(G, **SMALL_ENCODER).eval()
    images = _images(G, 5, seed=3)
    plain = invert_images(G, E, images, lpips=FakeLPIPS(), batch=2, progress=False)
    assert plain.ws.shape == (5, G.num_ws, 32) and plain.ws.dtype == torch.float32 and plain.ws.device.type == "cpu"
    assert plain.reconstructions.shape == images.shape and plain.reconstructions.dtype == np.uint8
    assert plain.lpips.shape == (5,) and plain.psnr.shape == (5,) and plain.refine_loss_start is None
    assert plain.lpips.dtype == np.float32 and plain.psnr.dtype == np.float32
    refined = invert_images(G, E, images, refine_steps=3, lpips=FakeLPIPS(), batch=2, progress=False)
    assert (refined.refine_loss_best <= refined.refine_loss_start).all()
    w_only = invert_images(G, E, images, refine_steps=2, lpips=FakeLPIPS(), batch=4, progress=False, w_only=True)
    assert torch.equal(w_only.ws, w_only.ws[:, :1].expand_as(w_only.ws))
    again = invert_images(G, E, images, refine_steps=3, lpips=FakeLPIPS(), batch=2, progress=False)
    assert torch.equal(again.ws, refined.ws)
    with pytest.raises(ValueError, match="images must be uint8"):
        invert_images(G, E, images[:, :8], lpips=FakeLPIPS(), progress=False)


def test_psnr() -> None:
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    assert psnr(a, b).tolist() == [100.0, 0.0]
