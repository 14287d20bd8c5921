"""GAN trainer and StyleGAN2 discriminator (CPU, tiny networks, a few steps)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from handsoff.gan.discriminator import Discriminator, DiscriminatorConfig, MinibatchStdLayer
from handsoff.gan.training.cli import add_train_gan_args, config_from_args, parse_duration
from handsoff.gan.training.config import TrainConfig
from handsoff.gan.training.data import DataOrder, DataSource
from handsoff.gan.training.loop import GANTrainer, find_snapshots, train_gan
from handsoff.gan.training.quality import frechet_distance, frechet_distance_from_stats

RES = 16


def _domain_available() -> bool:
    try:
        from handsoff.domains import get_domain

        get_domain("heads")
        return True
    except Exception:  # noqa: BLE001 - the domain is written by another part of the project
        return False


HAVE_DOMAIN = _domain_available()


def tiny_config(**kw) -> TrainConfig:
    base = dict(resolution=RES, batch=4, total_kimg=0.024, g_channel_base=512, g_channel_max=32,
                d_channel_base=512, d_channel_max=32, z_dim=32, w_dim=32, mapping_layers=2,
                snapshot_kimg=1000, sample_kimg=1000, tick_kimg=0.008, fd_samples=0, num_workers=1, domain_workers=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """A small training set: the built-in domain when it is there, else random pictures."""
    if HAVE_DOMAIN:
        from handsoff.domains import get_domain

        return np.asarray(get_domain("heads").render(24, 0, RES).images)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, RES, RES, 3), dtype=np.uint8)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HANDSOFF_CACHE", str(tmp_path / "user-cache"))


# --------------------------------------------------------------------------- discriminator
def test_discriminator_nvlabs_names_and_shapes():
    cfg = DiscriminatorConfig(img_resolution=32, channel_base=512, channel_max=32)
    D = Discriminator(cfg)
    sd = D.state_dict()
    c4 = cfg.channels(4)
    expected = {
        "b32.fromrgb.weight": (cfg.channels(32), 3, 1, 1), "b32.fromrgb.bias": (cfg.channels(32),),
        "b32.conv0.weight": (cfg.channels(32), cfg.channels(32), 3, 3),
        "b32.conv1.weight": (cfg.channels(16), cfg.channels(32), 3, 3),
        "b32.skip.weight": (cfg.channels(16), cfg.channels(32), 1, 1),
        "b32.resample_filter": (4, 4), "b32.conv1.resample_filter": (4, 4),
        "b16.conv0.weight": (cfg.channels(16), cfg.channels(16), 3, 3),
        "b8.skip.weight": (c4, cfg.channels(8), 1, 1),
        "b4.conv.weight": (c4, c4 + 1, 3, 3), "b4.conv.bias": (c4,),
        "b4.fc.weight": (c4, c4 * 16), "b4.fc.bias": (c4,),
        "b4.out.weight": (1, c4), "b4.out.bias": (1,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "b32.skip.bias" not in sd and "b16.fromrgb.weight" not in sd  # resnet: fromrgb at the top only
    assert not any(k.startswith("b4.mbstd") for k in sd)  # the stddev layer has no weights
    assert {k.split(".")[0] for k in sd} == {"b32", "b16", "b8", "b4"}
    out = D(torch.randn(8, 3, 32, 32))
    assert out.shape == (8, 1) and torch.isfinite(out).all()
    # an NVlabs-named state dict loads strictly, and the config round-trips through JSON
    D2 = Discriminator(DiscriminatorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))))
    D2.load_state_dict(sd, strict=True)
    assert torch.equal(D2(torch.ones(4, 3, 32, 32)), D(torch.ones(4, 3, 32, 32)))


def test_minibatch_stddev_groups():
    x = torch.randn(8, 6, 4, 4)
    y = MinibatchStdLayer(group_size=4, num_channels=1)(x)
    assert y.shape == (8, 7, 4, 4)
    # sample i is grouped with i + 2, i + 4, i + 6 (N/G = 2 groups)
    for i in range(2):
        group = x[i::2]
        expected = group.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
        for j in range(i, 8, 2):
            assert torch.allclose(y[j, 6], expected.expand(4, 4), atol=1e-6)
    with pytest.raises(ValueError):
        MinibatchStdLayer(4)(torch.randn(6, 4, 4, 4))


def test_discriminator_float16_blocks(monkeypatch):
    """The float16 path (CUDA only in real runs) forced on the CPU: top blocks run in half
    precision with clamping, the output stays float32 and close to the float32 network's."""
    import handsoff.gan.discriminator as dmod

    torch.manual_seed(0)
    cfg = DiscriminatorConfig(img_resolution=32, channel_base=512, channel_max=32, num_fp16_res=2, conv_clamp=256)
    D = Discriminator(cfg)
    x = torch.randn(4, 3, 32, 32)
    ref = D(x)
    monkeypatch.setattr(dmod, "fp16_allowed", lambda device: True)
    dtypes = {}
    hooks = [getattr(D, f"b{r}").register_forward_hook(lambda m, i, o, r=r: dtypes.__setitem__(r, o.dtype))
             for r in (32, 16, 8)]
    xr = x.clone().requires_grad_(True)
    out = D(xr)
    for h in hooks:
        h.remove()
    assert cfg.fp16_resolution == 16
    assert dtypes == {32: torch.float16, 16: torch.float16, 8: torch.float32}
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=2e-2)
    (g,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
    g.square().sum().backward()
    assert torch.isfinite(D.b32.conv0.weight.grad).all() and D.b32.conv0.weight.grad.abs().sum() > 0


def test_r1_double_backward_through_ops():
    torch.manual_seed(0)
    D = Discriminator(DiscriminatorConfig(img_resolution=16, channel_base=256, channel_max=16, mbstd_group_size=2))
    real = torch.randn(4, 3, 16, 16)
    x = real.clone().requires_grad_(True)
    logits = D(x)
    (g,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    penalty = g.square().sum([1, 2, 3])
    assert torch.isfinite(penalty).all() and (penalty > 0).all()
    penalty.mean().backward()
    grads = {n: p.grad for n, p in D.named_parameters()}
    for name in ("b16.fromrgb.weight", "b16.conv0.weight", "b16.conv1.weight", "b16.skip.weight", "b4.fc.weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        assert grads[name].abs().sum() > 0, name
    # the second-order gradient agrees with finite differences of the R1 penalty (float64)
    Dd = Discriminator(DiscriminatorConfig(img_resolution=8, channel_base=64, channel_max=8,
                                           mbstd_group_size=2)).double()
    xd = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = Dd.b8.conv0.weight

    def r1(weight_value):
        with torch.no_grad():
            w.copy_(weight_value)
        xi = xd.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(Dd(xi).sum(), xi, create_graph=True)
        return gi.square().sum()

    w0 = w.detach().clone()
    Dd.zero_grad()
    r1(w0).backward()
    analytic = w.grad.detach().clone()
    direction = torch.randn_like(w0)
    eps = 1e-6
    numeric = (r1(w0 + eps * direction).item() - r1(w0 - eps * direction).item()) / (2 * eps)
    assert math.isclose((analytic * direction).sum().item(), numeric, rel_tol=1e-5, abs_tol=1e-9)


# --------------------------------------------------------------------------- training
def test_trainer_steps_finite_and_r1_touches_d(images):
    cfg = tiny_config(r1_interval=2, pl_weight=2.0, pl_interval=2, xflip=True)
    tr = GANTrainer(cfg, images, torch.device("cpu"))
    before = {k: v.clone() for k, v in tr.D.state_dict().items()}
    ema_before = {k: v.clone() for k, v in tr.G_ema.state_dict().items()}
    for _ in range(3):
        tr.train_step()
    stats = tr.pop_stats()
    for key in ("loss_G", "loss_D", "r1_penalty", "pl_penalty", "D_real_logit", "D_fake_logit"):
        assert key in stats and math.isfinite(stats[key]), key
    assert stats["r1_penalty"] > 0
    assert tr.step == 3 and tr.cur_nimg == 12
    assert any(not torch.equal(before[k], v) for k, v in tr.D.state_dict().items())
    assert any(not torch.equal(ema_before[k], v) for k, v in tr.G_ema.state_dict().items())
    # lazy-regularisation correction of Adam: lr * c, betas ** c with c = 16/17 ... here 2/3
    c = 2 / 3
    assert math.isclose(tr.opt_D.param_groups[0]["lr"], cfg.lr_d * c)
    assert math.isclose(tr.opt_D.param_groups[0]["betas"][1], 0.99 ** c)


def _states(run_dir):
    blob = torch.load(find_snapshots(run_dir)[-1], map_location="cpu", weights_only=True)
    return blob


def test_resume_is_bitwise_identical(tmp_path, images):
    cfg = tiny_config(r1_interval=2, pl_weight=2.0, pl_interval=3, xflip=True)  # 6 steps of batch 4
    full = tmp_path / "full"
    split = tmp_path / "split"
    train_gan(cfg, full, images, resume=False, device="cpu", progress=False)
    train_gan(cfg, split, images, resume=False, device="cpu", progress=False, time_limit=0.0)  # one step
    assert _states(split)["step"] == 1
    stop = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()][-1]
    assert stop["event"] == "stop" and stop["reason"] == "time_limit"
    train_gan(cfg, split, images, resume="auto", device="cpu", progress=False, max_steps=4)
    assert _states(split)["step"] == 4
    train_gan(cfg, split, images, resume=True, device="cpu", progress=False)
    a, b = _states(full), _states(split)
    assert a["step"] == b["step"] == 6
    for net in ("G_ema", "G", "D"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs after resume"
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the written generator is the same too
    from safetensors.torch import load_file

    ga, gb = load_file(str(full / "G_ema-latest.safetensors")), load_file(str(split / "G_ema-latest.safetensors"))
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_run_dir_files(tmp_path, images):
    run = tmp_path / "run"
    data = DataSource.from_domain("heads", 24) if HAVE_DOMAIN else images
    cfg = tiny_config(total_kimg=0.016, snapshot_kimg=0.008, sample_kimg=0.008,
                      fd_samples=16 if HAVE_DOMAIN else 0)
    out = train_gan(cfg, run, data, device="cpu", progress=False, seg_feature_steps=3, seg_feature_images=16)
    assert out == run / "G_ema-latest.safetensors"
    names = {p.name for p in run.iterdir()}
    for name in ("config.json", "log.jsonl", "G_ema-latest.safetensors", "reals.png", "samples-000000.png",
                 "snapshot-000000.pt"):
        assert name in names, name
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["resolution"] == RES and config["resolved"]["r1_gamma"] == pytest.approx(0.0002 * 16 ** 2 / 4)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    ticks = [r for r in records if r["event"] == "tick"]
    assert ticks and all(math.isfinite(r["loss_G"]) and math.isfinite(r["loss_D"]) for r in ticks)
    assert records[-1]["event"] == "stop" and records[-1]["reason"] == "done"
    if HAVE_DOMAIN:
        quality = [r for r in records if r["event"] == "quality"]
        assert quality and quality[-1]["metric"] in ("FD-heads-seg", "FID") and math.isfinite(quality[-1]["value"])
        assert (run / "G_ema-best.safetensors").is_file()
        assert json.loads((run / "quality" / "best.json").read_text())["metric"] == quality[-1]["metric"]
    from handsoff.gan.checkpoints import load_generator

    G = load_generator(out, device="cpu")
    img = G.synthesis(G.mapping(torch.randn(2, G.z_dim)), noise_mode="const")
    assert img.shape == (2, 3, RES, RES) and torch.isfinite(img).all()
    # the folder is a training run now: starting it anew is refused, resuming a finished run is a no-op
    from handsoff.errors import HandsoffError

    with pytest.raises(HandsoffError):
        train_gan(cfg, run, data, resume=False, device="cpu", progress=False)
    with pytest.raises(HandsoffError):  # different settings that change training
        train_gan(tiny_config(total_kimg=0.016, lr_g=0.001), run, data, device="cpu", progress=False)


def test_folder_data_and_cli(tmp_path):
    from PIL import Image

    folder = tmp_path / "set" / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    parser = argparse.ArgumentParser()
    add_train_gan_args(parser)
    args = parser.parse_args(["--data", str(tmp_path / "set"), "--out", str(tmp_path / "run"), "--resolution", "16",
                              "--batch", "4", "--kimg", "0.008", "--channel-base", "512", "--channel-max", "16",
                              "--z-dim", "16", "--w-dim", "16", "--mapping-layers", "1", "--fd-samples", "0",
                              "--time-limit", "5m", "--xflip", "--no-progress", "--device", "cpu"])
    cfg = config_from_args(args)
    assert cfg.g_channel_max == cfg.d_channel_max == 16 and cfg.xflip and cfg.total_kimg == 0.008
    assert args.time_limit == 300
    from handsoff.gan.training.cli import train_gan_from_args

    out = train_gan_from_args(args)
    assert out.is_file()
    cached = list((tmp_path / "run" / "cache").glob("data-folder-16-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (8, 16, 16, 3)


def test_parse_duration():
    assert parse_duration("90s") == 90 and parse_duration("8m") == 480 and parse_duration("1.5h") == 5400
    assert parse_duration("2") == 120
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_data_order_deterministic_and_split():
    a = DataOrder(10, seed=3, global_batch=4)
    seq = np.concatenate([a.indices(s) for s in range(5)])  # 20 samples = two epochs
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert np.array_equal(seq, np.concatenate([DataOrder(10, 3, 4).indices(s) for s in range(5)]))
    r0, r1 = DataOrder(10, 3, 4, rank=0, world_size=2), DataOrder(10, 3, 4, rank=1, world_size=2)
    assert np.array_equal(np.concatenate([r0.indices(2), r1.indices(2)]), a.indices(2))


def test_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    assert abs(frechet_distance(x, x)) < 1e-8
    shift = np.full(8, 0.5)
    assert frechet_distance(x, x + shift) == pytest.approx(8 * 0.25, rel=1e-6)
    # closed form for diagonal covariances: sum (s_a - s_b)^2 over standard deviations
    sa, sb = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    assert frechet_distance_from_stats(np.zeros(3), sa, np.zeros(3), sb) == pytest.approx(1 + 1 + 4)
    # agrees with scipy's general matrix square root on a random pair
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    ca, cb = a @ a.T, b @ b.T
    ref = np.trace(ca) + np.trace(cb) - 2 * np.trace(scipy_linalg.sqrtm(ca @ cb).real)
    assert frechet_distance_from_stats(np.zeros(5), ca, np.zeros(5), cb) == pytest.approx(ref, rel=1e-6)


@pytest.mark.slow
def test_two_process_gloo_run_resumes_exactly(tmp_path):
    """torchrun with 2 CPU processes (gloo): a split run equals an uninterrupted one."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent("""
        import sys, numpy as np
        from handsoff.gan.training.config import TrainConfig
        from handsoff.gan.training.loop import train_gan
        imgs = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
        cfg = TrainConfig(resolution=16, batch=8, total_kimg=0.032, g_channel_base=512, g_channel_max=32,
                          d_channel_base=512, d_channel_max=32, z_dim=32, w_dim=32, mapping_layers=2,
                          snapshot_kimg=1000, sample_kimg=1000, tick_kimg=0.008, fd_samples=0, r1_interval=2)
        steps = int(sys.argv[2]) if len(sys.argv) > 2 else None
        train_gan(cfg, sys.argv[1], imgs, device="cpu", progress=False, max_steps=steps)
    """))
    root = str(Path(__file__).resolve().parents[1])
    env = {**__import__("os").environ, "PYTHONPATH": root}

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), *args]
        subprocess.run(cmd, check=True, env=env, cwd=root, timeout=600)

    torchrun(str(tmp_path / "full"))
    torchrun(str(tmp_path / "split"), "2")
    torchrun(str(tmp_path / "split"))
    a, b = _states(tmp_path / "full"), _states(tmp_path / "split")
    assert a["step"] == b["step"] == 4 and len(a["rng"]) == 2
    assert all(torch.equal(a["G_ema"][k], b["G_ema"][k]) for k in a["G_ema"])


def test_inception_weights_are_found_and_used(tmp_path, monkeypatch):
    """With Inception weights in the torch hub cache the figure is FID (random weights here:
    this checks discovery, loading and the 2048-d pool3 features, not the values)."""
    tv = pytest.importorskip("torchvision.models.inception")
    from handsoff.gan.training.quality import find_inception_weights, get_feature_extractor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_inception_weights() is None
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    torch.save(net.state_dict(), hub / "pt_inception-2015-12-05-6726825d.pth")
    path, kind = find_inception_weights()
    assert kind == "fid" and path.parent == hub
    ext = get_feature_extractor(torch.device("cpu"), [tmp_path / "cache"])
    assert ext.metric == "FID"
    feats = ext(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
