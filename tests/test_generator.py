"""StyleGAN2 generator: NVlabs compatibility, rosinality reproduction, features, gradients.

Test vectors (../shared/testvectors/stylegan, see its README) come from the reference
implementations; tests that need them are skipped when they are absent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from handsoff.gan.config import GeneratorConfig
from handsoff.gan.networks import Generator, conv2d_resample
from stylegan_ops import setup_filter, upfirdn2d

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "stylegan"
NVLABS_WEIGHTS = VECTORS / "nvlabs_sg2ada_64_G_ema.safetensors"
NVLABS_EXPECTED = VECTORS / "nvlabs_sg2ada_64_expected.npz"
ROSINALITY_WEIGHTS = VECTORS / "rosinality_64.pt"
ROSINALITY_EXPECTED = VECTORS / "rosinality_64_expected.npz"

ATOL = 1e-3  # required agreement with the reference outputs (reached: see the asserts' messages)


def _need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"test vectors missing: {missing}")


def _max_err(a: torch.Tensor, b: np.ndarray) -> float:
    return (a.detach().cpu() - torch.from_numpy(b)).abs().max().item()


# ----------------------------------------------------------------------------------------
# NVlabs stylegan2-ada-pytorch test vector


@pytest.fixture(scope="module")
def nvlabs() -> Dict[str, object]:
    _need(NVLABS_WEIGHTS, NVLABS_EXPECTED)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(NVLABS_WEIGHTS), "pt") as f:
        init_kwargs = json.loads(f.metadata()["init_kwargs"])
    config = GeneratorConfig.from_nvlabs_init_kwargs(init_kwargs)
    G = Generator(config).eval()
    state = load_file(str(NVLABS_WEIGHTS))
    G.load_state_dict(state, strict=True)
    return {"G": G, "state": state, "expected": dict(np.load(NVLABS_EXPECTED)), "init_kwargs": init_kwargs}


def test_nvlabs_state_dict_keys_and_shapes(nvlabs):
    G, state = nvlabs["G"], nvlabs["state"]
    ours = G.state_dict()
    assert sorted(ours) == sorted(state)
    for key, value in state.items():
        assert tuple(ours[key].shape) == tuple(value.shape), key
    assert G.num_ws == 10 and G.config.num_ws == 10


@pytest.mark.parametrize("psi,key", [(1.0, "ws_psi1"), (0.7, "ws_psi07")])
def test_nvlabs_mapping(nvlabs, psi, key):
    G, e = nvlabs["G"], nvlabs["expected"]
    with torch.no_grad():
        ws = G.mapping(torch.from_numpy(e["z"]), truncation_psi=psi)
    assert ws.shape == e[key].shape
    err = _max_err(ws, e[key])
    assert err <= ATOL, f"mapping psi={psi}: max abs error {err:.3g}"


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("fused_modconv", [None, False])
def test_nvlabs_synthesis(nvlabs, impl, fused_modconv):
    G, e = nvlabs["G"], nvlabs["expected"]
    with torch.no_grad():
        img = G.synthesis(torch.from_numpy(e["ws_psi07"]), noise_mode="const", force_fp32=True, impl=impl,
                          fused_modconv=fused_modconv)
    assert img.dtype == torch.float32 and img.shape == e["img_psi07_noiseconst"].shape
    err = _max_err(img, e["img_psi07_noiseconst"])
    assert err <= ATOL, f"synthesis (impl={impl}, fused_modconv={fused_modconv}): max abs error {err:.3g}"


def test_nvlabs_generator_call_equals_mapping_then_synthesis(nvlabs):
    G, e = nvlabs["G"], nvlabs["expected"]
    z = torch.from_numpy(e["z"][:2])
    with torch.no_grad():
        img = G(z, truncation_psi=0.7, noise_mode="const")
        again = G(z, truncation_psi=0.7, noise_mode="const")
    assert torch.equal(img, again)  # deterministic
    assert _max_err(img, e["img_psi07_noiseconst"][:2]) <= ATOL


def test_nvlabs_config(nvlabs):
    config = nvlabs["G"].config
    kw = nvlabs["init_kwargs"]
    assert (config.img_resolution, config.channel_base, config.channel_max) == (64, 4096, 128)
    assert config.conv_clamp == 256 and config.num_fp16_res == 4 and config.mapping_layers == 8
    assert kw["synthesis_kwargs"]["channel_base"] == config.channel_base


# ----------------------------------------------------------------------------------------
# rosinality/stylegan2-pytorch test vector (test-local key mapping; the supported converter
# lives in handsoff.gan.checkpoints)


def _rosinality_to_nvlabs(sd: Dict[str, torch.Tensor], latent_avg: torch.Tensor,
                          resolutions: List[int]) -> Dict[str, torch.Tensor]:
    """Rename a rosinality `g_ema` state dict to NVlabs keys (resample filters excluded)."""
    out = {"mapping.w_avg": latent_avg.reshape(-1), "synthesis.b4.const": sd["input.input"][0]}
    n_mapping = len([k for k in sd if k.startswith("style.") and k.endswith(".weight")])
    for i in range(n_mapping):
        out[f"mapping.fc{i}.weight"] = sd[f"style.{i + 1}.weight"]
        out[f"mapping.fc{i}.bias"] = sd[f"style.{i + 1}.bias"]

    def modconv(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        out[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        out[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]

    convs = [("conv1", "b4.conv1")] + [(f"convs.{2 * k + j}", f"b{res}.conv{j}")
                                       for k, res in enumerate(resolutions[1:]) for j in (0, 1)]
    for noise_idx, (src, dst) in enumerate(convs):
        modconv(src, f"synthesis.{dst}")
        out[f"synthesis.{dst}.bias"] = sd[f"{src}.activate.bias"]
        out[f"synthesis.{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape([])
        out[f"synthesis.{dst}.noise_const"] = sd[f"noises.noise_{noise_idx}"][0, 0]
    rgbs = [("to_rgb1", "b4.torgb")] + [(f"to_rgbs.{k}", f"b{res}.torgb") for k, res in enumerate(resolutions[1:])]
    for src, dst in rgbs:
        modconv(src, f"synthesis.{dst}")
        out[f"synthesis.{dst}.bias"] = sd[f"{src}.bias"].reshape(-1)
    return out


def test_rosinality_reproduction():
    _need(ROSINALITY_WEIGHTS, ROSINALITY_EXPECTED)
    ckpt = torch.load(ROSINALITY_WEIGHTS, map_location="cpu", weights_only=True)
    sd, e = ckpt["g_ema"], np.load(ROSINALITY_EXPECTED)
    resolutions = [4, 8, 16, 32, 64]
    # Channel counts come from tensor shapes: this table is not channel_base // res.
    channels = {4: sd["conv1.conv.weight"].shape[1]}
    channels.update({res: sd[f"convs.{2 * k + 1}.conv.weight"].shape[1] for k, res in enumerate(resolutions[1:])})
    assert channels == {4: 128, 8: 128, 16: 128, 32: 96, 64: 64}
    # rosinality has no activation clamping and runs in float32.
    config = GeneratorConfig(img_resolution=64, channels_by_res=channels, conv_clamp=None, num_fp16_res=0)
    G = Generator(config).eval()
    state = _rosinality_to_nvlabs(sd, ckpt["latent_avg"], resolutions)
    state.update({k: v for k, v in G.state_dict().items() if k.endswith("resample_filter")})
    G.load_state_dict(state, strict=True)
    with torch.no_grad():
        img = G(torch.from_numpy(e["z"]), truncation_psi=0.7, noise_mode="const")
    err = _max_err(img, e["img"])
    assert err <= ATOL, f"rosinality: max abs error {err:.3g}"


# ----------------------------------------------------------------------------------------
# Small generators (random weights)


def _small_config(**overrides) -> GeneratorConfig:
    kw = dict(img_resolution=32, z_dim=64, w_dim=64, channel_base=1024, channel_max=64, mapping_layers=2)
    kw.update(overrides)
    return GeneratorConfig(**kw)


def _randomize_(G: Generator, seed: int = 0) -> Generator:
    """Perturb every parameter (noise strengths and biases start at 0) so all terms matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return G


@pytest.fixture(scope="module")
def small() -> Generator:
    torch.manual_seed(0)
    return _randomize_(Generator(_small_config())).eval()


def test_features_match_feature_shapes(small):
    ws = small.mapping(torch.randn(2, small.z_dim))
    with torch.no_grad():
        img, feats = small.synthesis(ws, noise_mode="const", return_features=True)
        img_only = small.synthesis(ws, noise_mode="const")
    shapes = small.feature_shapes()
    assert len(feats) == len(shapes) == 2 * len(small.config.block_resolutions) - 1
    for f, (ch, res) in zip(feats, shapes):
        assert f.dtype == torch.float32
        assert tuple(f.shape) == (2, ch, res, res)
    assert [res for _, res in shapes] == sorted(res for _, res in shapes)
    assert shapes[-1][1] == small.img_resolution
    assert shapes[0] == (small.config.channels(4), 4)
    assert torch.equal(img, img_only)
    assert img.shape == (2, 3, 32, 32)


def test_features_are_post_activation_and_clamped():
    torch.manual_seed(1)
    G = _randomize_(Generator(_small_config(conv_clamp=0.5))).eval()
    with torch.no_grad():
        _, feats = G.synthesis(G.mapping(torch.randn(2, G.z_dim)), return_features=True)
    gain = 2 ** 0.5
    for f in feats:
        assert f.abs().max() <= 0.5 * gain + 1e-6
        assert f.min() >= -0.5 * gain - 1e-6
        assert (f < 0).any() and (f > 0).any()


def test_noise_modes(small):
    ws = small.mapping(torch.randn(2, small.z_dim))
    with torch.no_grad():
        const = small.synthesis(ws, noise_mode="const")
        const2 = small.synthesis(ws, noise_mode="const")
        none = small.synthesis(ws, noise_mode="none")
        rand1 = small.synthesis(ws, noise_mode="random")
        rand2 = small.synthesis(ws, noise_mode="random")
        torch.manual_seed(123)
        seeded1 = small.synthesis(ws, noise_mode="random")
        torch.manual_seed(123)
        seeded2 = small.synthesis(ws, noise_mode="random")
    assert torch.equal(const, const2)
    assert not torch.allclose(const, none)
    assert not torch.allclose(rand1, rand2)
    assert not torch.allclose(rand1, const)
    assert torch.equal(seeded1, seeded2)
    with pytest.raises(ValueError, match="noise_mode"):
        small.synthesis(ws, noise_mode="fixed")


def test_bad_inputs(small):
    with pytest.raises(ValueError, match="ws must be"):
        small.synthesis(torch.zeros(1, small.num_ws + 1, small.w_dim))
    with pytest.raises(ValueError, match="z must be"):
        small.mapping(torch.zeros(1, small.z_dim + 1))


def test_forward_backward_small_ref():
    torch.manual_seed(2)
    G = _randomize_(Generator(_small_config())).train()
    assert G.num_ws == 8
    z = torch.randn(3, G.z_dim)
    ws = G.mapping(z).detach().requires_grad_(True)
    img, feats = G.synthesis(ws, noise_mode="random", impl="ref", return_features=True)
    (img.square().mean() + sum(f.mean() for f in feats)).backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all()
    assert (ws.grad.abs().sum(dim=(0, 2)) > 0).all()  # every w influences the image
    for name, p in G.synthesis.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # Double backward (R1-style penalties need it).
    G.zero_grad()
    ws2 = G.mapping(z).detach().requires_grad_(True)
    out = G.synthesis(ws2, noise_mode="const", impl="ref")
    (g,) = torch.autograd.grad(out.sum(), ws2, create_graph=True)
    g.square().sum().backward()
    assert G.synthesis.b32.conv1.weight.grad is not None


def test_fused_and_unfused_modconv_agree(small):
    ws = small.mapping(torch.randn(3, small.z_dim), truncation_psi=0.5)
    with torch.no_grad():
        a = small.synthesis(ws, fused_modconv=True, impl="ref")
        b = small.synthesis(ws, fused_modconv=False, impl="ref")
    assert (a - b).abs().max() <= 1e-4


def test_mapping_truncation_and_w_avg():
    torch.manual_seed(3)
    G = _randomize_(Generator(_small_config(w_avg_beta=0.5)))
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
        ws = G.mapping(z)
        ws_t = G.mapping(z, truncation_psi=0.5)
        ws_cut = G.mapping(z, truncation_psi=0.5, truncation_cutoff=3)
    w_avg = G.mapping.w_avg
    assert ws.shape == (4, G.num_ws, G.w_dim)
    assert torch.allclose(ws_t, w_avg + 0.5 * (ws - w_avg), atol=1e-6)
    assert torch.allclose(ws_cut[:, :3], ws_t[:, :3]) and torch.equal(ws_cut[:, 3:], ws[:, 3:])
    before = w_avg.clone()
    G.mapping(z)  # no update without update_emas
    assert torch.equal(G.mapping.w_avg, before)
    G.mapping(z, update_emas=True)
    expected = ws[:, 0].mean(0).lerp(before, 0.5)
    assert torch.allclose(G.mapping.w_avg, expected, atol=1e-6)


def test_conditional_mapping():
    G = Generator(_small_config(c_dim=5))
    assert "mapping.embed.weight" in G.state_dict()
    c = F.one_hot(torch.tensor([0, 3]), 5).float()
    ws = G.mapping(torch.randn(2, G.z_dim), c)
    assert ws.shape == (2, G.num_ws, G.w_dim)
    with pytest.raises(ValueError, match="c must be"):
        G.mapping(torch.randn(2, G.z_dim))


# ----------------------------------------------------------------------------------------
# conv2d_resample against its definition


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("flip_weight", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_resample_up_matches_definition(k, flip_weight, groups):
    torch.manual_seed(4)
    f = setup_filter([1, 3, 3, 1])
    x = torch.randn(2, 4 * groups, 7, 6, dtype=torch.float64)
    w = torch.randn(3 * groups, 4, k, k, dtype=torch.float64)
    pad = k // 2
    got = conv2d_resample(x, w, f.double(), up=2, padding=pad, groups=groups, flip_weight=flip_weight, impl="ref")
    # Definition: FIR upsample (zero insertion, pad, filter, gain 4), then a valid convolution.
    p0, p1 = pad + 2, pad + 1  # (fw + up - 1) // 2, (fw - up) // 2 for fw = 4, up = 2
    up = upfirdn2d(x, f.double(), up=2, padding=[p0, p1, p0, p1], gain=4, impl="ref")
    want = F.conv2d(up, w if flip_weight else w.flip([2, 3]), groups=groups)
    assert got.shape == (2, 3 * groups, 14, 12)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_conv2d_resample_down_matches_definition(k):
    torch.manual_seed(5)
    f = setup_filter([1, 3, 3, 1]).double()
    x = torch.randn(2, 4, 8, 10, dtype=torch.float64)
    w = torch.randn(3, 4, k, k, dtype=torch.float64)
    pad = k // 2
    got = conv2d_resample(x, w, f, down=2, padding=pad, impl="ref")
    p0, p1 = pad + 1, pad + 1  # (fw - down + 1) // 2, (fw - down) // 2 for fw = 4
    want = F.conv2d(upfirdn2d(x, f, padding=[p0, p1, p0, p1], impl="ref"), w)[:, :, ::2, ::2]
    assert got.shape == (2, 3, 4, 5)
    assert torch.allclose(got, want, atol=1e-10)


# ----------------------------------------------------------------------------------------
# Config


def test_config_derived_values():
    c = GeneratorConfig(img_resolution=1024)
    assert c.num_ws == 18 and c.block_resolutions[0] == 4 and c.block_resolutions[-1] == 1024
    assert [c.channels(r) for r in (4, 64, 128, 256, 512, 1024)] == [512, 512, 256, 128, 64, 32]
    assert GeneratorConfig(img_resolution=256).num_ws == 14
    assert GeneratorConfig(img_resolution=512).num_ws == 16
    assert c.fp16_resolution == 128  # top 4 resolutions: 128..1024


def test_config_round_trip_and_errors():
    c = _small_config(channels_by_res={"32": 48}, conv_clamp=None)
    d = c.to_dict()
    assert d["config_version"] == 1
    assert json.loads(json.dumps(d)) == d
    assert GeneratorConfig.from_dict(json.loads(json.dumps(d))) == c
    assert c.channels(32) == 48 and c.channels(16) == 64
    with pytest.raises(ValueError, match="bogus"):
        GeneratorConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="config_version"):
        GeneratorConfig.from_dict({**d, "config_version": 99})
    for res in (8, 48, 2048):
        with pytest.raises(ValueError, match="power of two"):
            GeneratorConfig(img_resolution=res)
    with pytest.raises(ValueError, match="architecture"):
        GeneratorConfig(img_resolution=64, architecture="resnet")
    with pytest.raises(ValueError, match="channels_by_res"):
        GeneratorConfig(img_resolution=32, channels_by_res={64: 8})


def test_config_from_nvlabs_init_kwargs_layouts():
    ada = {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": 256, "img_channels": 3,
           "mapping_kwargs": {"num_layers": 8},
           "synthesis_kwargs": {"channel_base": 16384, "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256,
                                "architecture": "skip", "fp16_channels_last": False}}
    c = GeneratorConfig.from_nvlabs_init_kwargs(ada)
    assert (c.channel_base, c.num_fp16_res, c.conv_clamp, c.w_avg_beta) == (16384, 4, 256, 0.995)
    flat = {"z_dim": 512, "c_dim": 0, "w_dim": 512, "img_resolution": 256, "img_channels": 3,
            "mapping_kwargs": {"num_layers": 2}, "channel_base": 16384, "channel_max": 512, "num_fp16_res": 4,
            "conv_clamp": 256, "fused_modconv_default": "inference_only"}
    c3 = GeneratorConfig.from_nvlabs_init_kwargs(flat)
    assert (c3.mapping_layers, c3.channel_base, c3.w_avg_beta) == (2, 16384, 0.998)
    with pytest.raises(ValueError, match="architecture"):
        GeneratorConfig.from_nvlabs_init_kwargs({**ada, "synthesis_kwargs": {"architecture": "resnet"}})
    with pytest.raises(ValueError, match="resample_filter"):
        GeneratorConfig.from_nvlabs_init_kwargs({**ada, "synthesis_kwargs": {"resample_filter": [1, 2, 1]}})


# ----------------------------------------------------------------------------------------
# CUDA float16 path (runs only where a GPU is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_close_to_fp32(nvlabs):
    G, e = nvlabs["G"], nvlabs["expected"]
    G = Generator(G.config).cuda().eval()
    G.load_state_dict(nvlabs["state"], strict=True)
    ws = torch.from_numpy(e["ws_psi07"]).cuda()
    # TF32 convolutions (PyTorch's cuDNN default on Ampere and later) alone cost ~3e-3 here.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            fp32 = G.synthesis(ws, noise_mode="const", force_fp32=True)
            fp16, feats = G.synthesis(ws, noise_mode="const", return_features=True)
            fp16_unfused = G.synthesis(ws, noise_mode="const", fused_modconv=False)
            fp16_b1 = G.synthesis(ws[:1], noise_mode="const")  # batch 1: fused modconv in float16
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert _max_err(fp32, e["img_psi07_noiseconst"]) <= ATOL
    assert fp16.dtype == torch.float32 and all(f.dtype == torch.float32 for f in feats)
    scale = fp32.abs().max().item()  # float16 on the top 4 resolutions: ~0.2% of the range seen on an H100
    for out in (fp16, fp16_unfused, fp16_b1):
        assert (out - fp32[: out.shape[0]]).abs().max().item() <= 0.01 * scale
