"""Pivotal tuning (`handsoff.invert.tune`, ``handsoff tune``, the ``tune`` stage of ``handsoff run``).

Tiny random generators on the CPU: the method's tests use a stand-in perceptual distance
(test_invert.FakeLPIPS); the file-level tests (CLI, digest chain, pipeline) use real LPIPS-AlexNet
or -VGG weights and are skipped without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import handsoff.cli as cli
from handsoff.errors import HandsoffError
from handsoff.gan.checkpoints import load_generator, save_generator
from handsoff.gan.digest import generator_digest
from handsoff.invert.latents import Latents, load_latents, save_latents
from handsoff.invert.lpips import backbone_candidates
from handsoff.invert.tune import (TUNE_PICTURE, TUNE_REPORT, TUNED_GENERATOR, TUNED_LATENTS, sample_drift,
                                  tune_folder, tune_generator)
from handsoff.utils.images import to_uint8

from test_invert import FakeLPIPS, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RES = 32  # LPIPS-AlexNet needs at least 32 pixels


def _has(net: str) -> bool:
    return any(p.is_file() for p in backbone_candidates(net))


needs_alexnet = pytest.mark.skipif(not _has("alexnet"), reason="no ImageNet AlexNet weights for LPIPS")
needs_vgg = pytest.mark.skipif(not _has("vgg"), reason="no ImageNet VGG weights for LPIPS")


def _problem(G: torch.nn.Module, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Pivots of G and target images that G cannot draw exactly (another generator's images of them)."""
    other = tiny_generator(G.img_resolution, seed=seed + 7)
    z = torch.from_numpy(np.random.RandomState(seed).randn(n, G.z_dim)).float()
    with torch.no_grad():
        ws = G.mapping(z, None, truncation_psi=0.7)
        images = to_uint8(other.synthesis(ws, noise_mode="const"))
    return ws, images


@pytest.fixture(scope="module")
def G() -> torch.nn.Module:
    return tiny_generator(16)


FAST = {"steps": 25, "lr": 5e-3, "batch": 4, "progress": False}


# ----------------------------------------------------------------------------------------- the method

def test_tuning_lowers_reconstruction_loss_and_leaves_G_alone(G) -> None:
    ws, images = _problem(G)
    digest = generator_digest(G)
    result = tune_generator(G, ws, images, lpips=FakeLPIPS(), **FAST)
    assert generator_digest(G) == digest  # G itself is not touched
    tuned = result.generator
    assert generator_digest(tuned) != digest and not any(p.requires_grad for p in tuned.parameters())
    assert torch.equal(tuned.mapping.fc0.weight, G.mapping.fc0.weight)  # only synthesis is tuned
    assert result.lpips_after.mean() < 0.8 * result.lpips_before.mean()
    assert result.psnr_after.mean() > result.psnr_before.mean() + 1.0
    assert len(result.losses["reconstruction"]) == 25
    assert np.mean(result.losses["reconstruction"][-5:]) < np.mean(result.losses["reconstruction"][:5])
    assert result.reconstructions_after.shape == images.shape
    summary = result.summary()
    assert summary["lpips_after"] < summary["lpips_before"]


def test_zero_steps_is_an_unchanged_copy(G) -> None:
    ws, images = _problem(G)
    result = tune_generator(G, ws, images, lpips=FakeLPIPS(), steps=0, progress=False)
    assert generator_digest(result.generator) == generator_digest(G)
    assert np.array_equal(result.reconstructions_before, result.reconstructions_after)


def test_locality_keeps_random_samples_close(G) -> None:
    ws, images = _problem(G)
    lp = FakeLPIPS()
    free = tune_generator(G, ws, images, lpips=lp, locality_weight=0.0, **FAST)
    kept = tune_generator(G, ws, images, lpips=lp, locality_weight=4.0, locality_alpha=1.0, locality_batch=4,
                          **FAST)
    drift_free, drift_kept = sample_drift(G, free.generator, lp, n=32), sample_drift(G, kept.generator, lp, n=32)
    assert drift_kept["lpips"] < 0.7 * drift_free["lpips"] and drift_kept["psnr"] > drift_free["psnr"]
    assert max(kept.losses["locality"]) > 0 and max(free.losses["locality"]) == 0
    assert kept.lpips_after.mean() < kept.lpips_before.mean()  # it still learns the pivots
    same = sample_drift(G, G, lp, n=4)
    assert same["lpips"] == 0 and same["psnr"] == 100


def test_same_seed_same_weights_other_seed_other_weights(G) -> None:
    ws, images = _problem(G)
    runs = [tune_generator(G, ws, images, lpips=FakeLPIPS(), seed=s, steps=6, batch=3, progress=False)
            for s in (1, 1, 2)]
    a, b, c = (r.generator.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a) and runs[0].losses == runs[1].losses
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_callback_sees_every_step(G) -> None:
    ws, images = _problem(G)
    seen = []
    tune_generator(G, ws, images, lpips=FakeLPIPS(), steps=3, progress=False,
                   callback=lambda step, tuned: seen.append((step, generator_digest(tuned))))
    assert [s for s, _ in seen] == [1, 2, 3] and len({d for _, d in seen}) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps >= 0"), ({"batch": 0}, "batch >= 1"), ({"locality_alpha": 2.0}, "locality_alpha"),
])
def test_bad_settings(G, kwargs, message) -> None:
    ws, images = _problem(G)
    with pytest.raises(ValueError, match=message):
        tune_generator(G, ws, images, lpips=FakeLPIPS(), progress=False, **kwargs)
    with pytest.raises(ValueError, match="ws must be"):
        tune_generator(G, ws[:2], images, lpips=FakeLPIPS(), progress=False)
    with pytest.raises(ValueError, match="images must be"):
        tune_generator(G, ws, images[:, :8], lpips=FakeLPIPS(), progress=False)


# ----------------------------------------------------------------------------------------- files and CLI

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """G at 32 px, a labeled set of 3 rendered heads, and latents of them made for G (random codes)."""
    from handsoff.data.labeled_set import render_to_folder
    from handsoff.domains import get_domain

    root = tmp_path_factory.mktemp("tune")
    G = tiny_generator(RES)
    save_generator(G, root / "G.safetensors")
    labeled = render_to_folder(get_domain("heads"), 3, 0, RES, root / "labeled", progress=False)
    names = sorted(p.stem for p in (labeled / "images").iterdir())
    ws = G.mapping(torch.from_numpy(np.random.RandomState(0).randn(3, G.z_dim)).float(), None, truncation_psi=0.7)
    save_latents(root / "lat.safetensors", Latents(ws, names, generator_digest(G), {"note": "from invert"}))
    return {"root": root, "G": root / "G.safetensors", "labeled": labeled, "latents": root / "lat.safetensors"}


def _tune_cli(files: dict[str, Path], out: Path, *extra: str) -> int:
    return cli.main(["tune", "--generator", str(files["G"]), "--latents", str(files["latents"]), "--images",
                     str(files["labeled"]), "--out", str(out), "--device", "cpu", "--lpips-net", "alexnet",
                     "--no-progress", "--steps", "3", "--batch", "2", *extra])


@pytest.fixture(scope="module")
def tuned(files) -> Path:
    if not _has("alexnet"):
        pytest.skip("no ImageNet AlexNet weights for LPIPS")
    out = files["root"] / "tuned"
    assert _tune_cli(files, out) == 0
    return out


@pytest.fixture(autouse=True)
def stage_clis(monkeypatch):
    monkeypatch.setattr(cli, "STAGE_CLIS", ("handsoff.invert.cli", "handsoff.label.cli", "handsoff.synth.cli"))


@needs_alexnet
def test_cli_writes_the_tuned_folder(files, tuned, capsys) -> None:
    assert sorted(p.name for p in tuned.iterdir()) == sorted([TUNED_GENERATOR, TUNED_LATENTS, TUNE_REPORT,
                                                               TUNE_PICTURE])
    G, G2 = load_generator(files["G"]), load_generator(tuned / TUNED_GENERATOR)
    original = load_latents(files["latents"])
    latents = load_latents(tuned / TUNED_LATENTS, expect_digest=generator_digest(G2))
    assert torch.equal(latents.ws, original.ws) and latents.names == original.names  # the same codes, re-stamped
    assert latents.extra["note"] == "from invert" and latents.extra["tuned"]["generator_digest"] == generator_digest(G)
    from safetensors import safe_open

    with safe_open(str(tuned / TUNED_GENERATOR), framework="pt") as f:
        meta = f.metadata()
    origin = json.loads(meta["tuned_from"])
    assert origin["generator_digest"] == generator_digest(G) and len(origin["latents_sha256"]) == 16
    assert json.loads(meta["tune_settings"])["steps"] == 3
    report = json.loads((tuned / TUNE_REPORT).read_text())
    assert report["tuned_generator_digest"] == generator_digest(G2) and len(report["lpips_after"]) == 3
    assert report["command"].startswith("handsoff ") and report["drift_from_generator"]["samples"] == 64
    assert not [p for p in files["root"].iterdir() if p.name.startswith(".")]  # no temporary folder left


@needs_alexnet
def test_same_seed_same_generator_file(files, tuned, tmp_path) -> None:
    """Same inputs and seed: the same files, byte for byte (handsoff writes safetensors headers sorted)."""
    assert _tune_cli(files, tmp_path / "again") == 0
    for name in (TUNED_GENERATOR, TUNED_LATENTS):
        assert (tmp_path / "again" / name).read_bytes() == (tuned / name).read_bytes()


@needs_alexnet
def test_digest_chain(files, tuned, tmp_path, capsys) -> None:
    """Latents of G are refused with G', a labeler fit on G' is refused with G, and G' with its own latents works."""
    G2 = tuned / TUNED_GENERATOR
    common = ["--labels", str(files["labeled"]), "--ensemble", "2", "--hidden", "8", "--steps", "2",
              "--batch-pixels", "64", "--device", "cpu"]
    refused = tmp_path / "refused.safetensors"
    assert cli.main(["fit-labeler", "--generator", str(G2), "--latents", str(files["latents"]), "--out",
                     str(refused), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(files["latents"]) in err and "another generator" in err and not refused.exists()
    assert cli.main(["fit-labeler", "--generator", str(files["G"]), "--latents", str(tuned / TUNED_LATENTS),
                     "--out", str(refused), *common]) == 2
    assert str(tuned / TUNED_LATENTS) in capsys.readouterr().err and not refused.exists()

    labeler = tmp_path / "L.safetensors"
    assert cli.main(["fit-labeler", "--generator", str(G2), "--latents", str(tuned / TUNED_LATENTS), "--out",
                     str(labeler), *common]) == 0
    capsys.readouterr()  # its progress bar
    corpus = tmp_path / "corpus"
    assert cli.main(["generate", "--generator", str(files["G"]), "--labeler", str(labeler), "--n", "2", "--out",
                     str(corpus), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(labeler) in err and "another generator" in err
    assert cli.main(["generate", "--generator", str(G2), "--labeler", str(labeler), "--n", "2", "--out",
                     str(tmp_path / "ok"), "--device", "cpu", "--no-progress"]) == 0
    from handsoff.data.shards import read_manifest

    assert read_manifest(tmp_path / "ok").kept >= 1


def _bad_cases(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """Each case: (argument overrides, the file the error must name)."""
    from handsoff.data.labeled_set import render_to_folder
    from handsoff.domains import get_domain

    other = tmp / "other.safetensors"
    save_generator(tiny_generator(RES, seed=5), other)
    extra = render_to_folder(get_domain("heads"), 4, 1, RES, tmp / "four", progress=False)  # one has no code
    small = render_to_folder(get_domain("heads"), 3, 0, 16, tmp / "small", progress=False)
    return {
        "latents of another generator": (["--generator", str(other)], files["latents"]),
        "image without a code": (["--images", str(extra)], files["latents"]),
        "wrong image size": (["--images", str(small)], next(iter(sorted((small / "images").iterdir())))),
        "missing latents": (["--latents", str(tmp / "nope.safetensors")], tmp / "nope.safetensors"),
        "not a generator": (["--generator", str(files["latents"])], files["latents"]),
    }


@needs_alexnet
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, capsys) -> None:
    out = tmp_path / "out" / "tuned"
    for case, (override, named) in _bad_cases(files, tmp_path).items():
        args = ["tune", "--generator", str(files["G"]), "--latents", str(files["latents"]), "--images",
                str(files["labeled"]), "--out", str(out), "--device", "cpu", "--lpips-net", "alexnet",
                "--no-progress", "--steps", "2"]
        for i in range(0, len(override), 2):
            args[args.index(override[i]) + 1] = override[i + 1]
        assert cli.main(args) == 2, case
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and str(named) in err, (case, err)
        assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir())), case
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("x")
    assert _tune_cli(files, out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert _tune_cli(files, tmp_path / "neg", "--locality-alpha", "3") == 2
    assert "locality_alpha" in capsys.readouterr().err and not (tmp_path / "neg").exists()


@needs_alexnet
def test_force_replaces_a_finished_folder(files, tmp_path) -> None:
    out = tmp_path / "t"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert _tune_cli(files, out, "--force") == 0
    assert not (out / "old.txt").exists() and (out / TUNED_GENERATOR).is_file()


# ----------------------------------------------------------------------------------------- pipeline

@needs_vgg
def test_pipeline_tune_stage_runs_skips_and_reruns(tmp_path) -> None:
    from handsoff.data.shards import read_manifest
    from handsoff.label.io import load_labeler
    from test_synth_real import tiny_config, write_config

    from handsoff.synth.pipeline import run_pipeline

    config = {**tiny_config(tmp_path), "tune": {"steps": 2, "batch": 2, "locality_batch": 1}}
    quiet = {"progress": False, "log": lambda _: None}
    record = run_pipeline(write_config(tmp_path, config), **quiet)
    assert record["ran"] == ["render", "fit-encoder", "invert", "tune", "fit-labeler", "generate"]
    out = tmp_path / "run"
    G2 = load_generator(out / "tuned" / TUNED_GENERATOR)
    digest = generator_digest(G2)
    assert digest != generator_digest(load_generator(tmp_path / "g.safetensors"))
    load_labeler(out / "labeler.safetensors", G=G2)  # fit on G'
    with pytest.raises(HandsoffError, match="another generator"):
        load_labeler(out / "labeler.safetensors", G=load_generator(tmp_path / "g.safetensors"))
    assert read_manifest(out / "shards").identity["generator_digest"] == digest  # generated with G'

    assert run_pipeline(write_config(tmp_path, config), **quiet)["ran"] == []
    config["tune"]["steps"] = 3
    assert run_pipeline(write_config(tmp_path, config), **quiet)["ran"] == ["tune", "fit-labeler", "generate"]
    assert generator_digest(load_generator(out / "tuned" / TUNED_GENERATOR)) != digest
    del config["tune"]  # back to G: the labeler and the corpus are made again, from G's latents
    assert run_pipeline(write_config(tmp_path, config), **quiet)["ran"] == ["fit-labeler", "generate"]


def test_pipeline_tune_table_is_checked(tmp_path) -> None:
    import tomllib

    from handsoff.synth.pipeline import _Paths, build_stages, config_from_dict
    from test_synth_pipeline import CONFIG

    config = config_from_dict(tomllib.loads(CONFIG + "[tune]\nsteps = 5\n"), tmp_path, "p.toml")
    names = [s.name for s in build_stages(config, progress=False)]
    assert names == ["invert", "tune", "fit-labeler", "generate"]
    paths = _Paths.of(config)
    assert paths.generator == tmp_path / "run" / "tuned" / TUNED_GENERATOR
    assert paths.labeler_latents == tmp_path / "run" / "tuned" / TUNED_LATENTS
    bad = config_from_dict(tomllib.loads(CONFIG + "[tune]\nstep = 5\n"), tmp_path, "p.toml")
    with pytest.raises(HandsoffError, match=r"\[tune\] has no setting 'step' \(known: .*steps"):
        build_stages(bad, progress=False)
    plain = config_from_dict(tomllib.loads(CONFIG), tmp_path, "p.toml")
    assert "tune" not in [s.name for s in build_stages(plain, progress=False)]


def test_demo_tune_setting(tmp_path) -> None:
    from handsoff.synth.demo import DEMO_TUNE_STEPS, demo_config

    assert ("tune" in demo_config(tmp_path)) == bool(DEMO_TUNE_STEPS)
    assert demo_config(tmp_path, tune_steps=50)["tune"] == {"steps": 50, "seed": 0}
    assert "tune" not in demo_config(tmp_path, tune_steps=0)


def test_tune_folder_refuses_an_existing_folder_before_loading(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(HandsoffError, match="already exists"):
        tune_folder(tmp_path / "no-G", tmp_path / "no-L", tmp_path / "no-images", tmp_path / "out")
