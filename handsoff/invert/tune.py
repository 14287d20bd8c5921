"""Pivotal tuning: fine-tune a copy of the generator so that it draws the labeled images at their pivots.

PTI (Roich, Mokady, Bermano, Cohen-Or 2021), in its multi-image form. The inversion's codes are
the pivots and stay fixed; a copy G' of the generator has its synthesis weights tuned with Adam
(constant learning rate) so that ``G'(w_i)`` reproduces image ``i``, all images jointly: each step
takes ``batch`` pivots (a fresh random order every pass over the images) and minimises

    lpips_weight * LPIPS(G'(w_p), x) + l2_weight * MSE(G'(w_p), x)
    + locality_weight * (LPIPS(G'(w_r), G(w_r)) + l2_weight * MSE(G'(w_r), G(w_r)))

The second line is PTI's locality regulariser: ``w_r = w_p + locality_alpha * (w_z - w_p)`` lies
on the way from a pivot toward ``w_z``, a random sample of the mapping network (truncation
``truncation_psi``), and there G' must keep drawing G's image, so that G' still draws the whole
domain and not only the labeled images. PTI moves a fixed distance (30) in FFHQ's W; a fraction
of the way is used here because it means the same for generators whose W spreads differently.

The mapping network is not tuned (pivots are codes, not z), so G' samples the same ws as G. All
random numbers come from ``seed``: the same inputs, seed, device and thread count give the same
weights, byte for byte.

`tune_folder` is the whole stage on files (``handsoff tune`` and the ``tune`` stage of
``handsoff run``): it writes a folder holding G' (``generator.safetensors``, with its own digest
and metadata naming the generator it was tuned from and the latents' sha256), the same latents
re-stamped for G' (``latents.safetensors``: fit a labeler and generate with these two), a report
(``tune.json``) and a picture (``tune.png``: each image, G's reconstruction, G''s reconstruction).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from handsoff.errors import HandsoffError
from handsoff.invert.invert import comparison_grid, lpips_distances, psnr, reconstruct
from handsoff.invert.train import images_to_tensor, synthesize

__all__ = ["TuneResult", "tune_generator", "sample_drift", "tune_folder", "tune_settings",
           "TUNE_STEPS", "TUNE_LR", "TUNE_BATCH", "TUNE_LPIPS_WEIGHT", "TUNE_L2_WEIGHT", "LOCALITY_WEIGHT",
           "LOCALITY_ALPHA", "LOCALITY_BATCH", "LOCALITY_PSI", "TUNED_GENERATOR", "TUNED_LATENTS", "TUNE_REPORT",
           "TUNE_PICTURE", "DRIFT_SAMPLES"]

PathLike = Union[str, "os.PathLike[str]"]

# Defaults, chosen by benchmarks/tune.py on the shipped generator and 16 labeled heads at their codes after
# 50 refinement steps (benchmarks/results/tune-cpu.json): lr 3e-3 gains more than PTI's 3e-4 in 100 steps
# (PSNR +1.8 against +1.0 dB) with FD-heads-seg against real renders unchanged; 300 steps improve on 100
# (LPIPS 0.227 -> 0.190) with FD still unchanged; locality weight 0.3 halves the drift from G of no
# regulariser (sample LPIPS 0.049 against 0.112, FD vs G 0.071 against 0.144, real-vs-real floor 0.116).
TUNE_STEPS = 300
TUNE_LR = 3e-3
TUNE_BATCH = 4
TUNE_LPIPS_WEIGHT = 1.0
TUNE_L2_WEIGHT = 1.0
LOCALITY_WEIGHT = 0.3
LOCALITY_ALPHA = 0.5
LOCALITY_BATCH = 2
LOCALITY_PSI = 0.7  # the truncation `handsoff generate` samples with: the region G' must keep
DRIFT_SAMPLES = 64  # random samples on which a report measures how far G' moved from G
_DRIFT_SEED = 0x7E57

TUNED_GENERATOR = "generator.safetensors"
TUNED_LATENTS = "latents.safetensors"
TUNE_REPORT = "tune.json"
TUNE_PICTURE = "tune.png"


@dataclass(frozen=True)
class TuneResult:
    """What `tune_generator` returns.

    Attributes:
        generator: G', a tuned copy of G (eval mode, no gradients, on G's device).
        lpips_before, lpips_after: float32 ``[N]``: LPIPS between each image and its reconstruction by G / G'.
        psnr_before, psnr_after: float32 ``[N]``: their PSNR in dB.
        reconstructions_before, reconstructions_after: uint8 ``[N, H, W, 3]`` (`handsoff.invert.invert.reconstruct`).
        losses: per step, the mean ``total``, ``reconstruction`` and ``locality`` losses (float lists of ``steps``).
        seconds: wall time of the tuning steps.
        settings: the settings used (JSON-able).
    """

    generator: nn.Module
    lpips_before: np.ndarray
    lpips_after: np.ndarray
    psnr_before: np.ndarray
    psnr_after: np.ndarray
    reconstructions_before: np.ndarray
    reconstructions_after: np.ndarray
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Means of the per-image figures, before and after."""
        return {"lpips_before": round(float(np.mean(self.lpips_before)), 5),
                "lpips_after": round(float(np.mean(self.lpips_after)), 5),
                "psnr_before": round(float(np.mean(self.psnr_before)), 3),
                "psnr_after": round(float(np.mean(self.psnr_after)), 3)}


def tune_settings(steps: int = TUNE_STEPS, lr: float = TUNE_LR, batch: int = TUNE_BATCH,
                  lpips_weight: float = TUNE_LPIPS_WEIGHT, l2_weight: float = TUNE_L2_WEIGHT,
                  locality_weight: float = LOCALITY_WEIGHT, locality_alpha: float = LOCALITY_ALPHA,
                  locality_batch: int = LOCALITY_BATCH, truncation_psi: float = LOCALITY_PSI,
                  seed: int = 0) -> dict[str, Any]:
    """The settings of a tuning run as a checked, JSON-able dict (defaults filled in).

    Raises:
        ValueError: a setting out of range.
    """
    if steps < 0 or batch < 1 or locality_batch < 1 or lr <= 0:
        raise ValueError(f"need steps >= 0, batch >= 1, locality_batch >= 1 and lr > 0, got {steps}, {batch}, "
                         f"{locality_batch}, {lr}")
    if min(lpips_weight, l2_weight, locality_weight) < 0 or not 0 <= locality_alpha <= 1:
        raise ValueError("weights must be >= 0 and locality_alpha in [0, 1]")
    return {"steps": int(steps), "lr": float(lr), "batch": int(batch), "lpips_weight": float(lpips_weight),
            "l2_weight": float(l2_weight), "locality_weight": float(locality_weight),
            "locality_alpha": float(locality_alpha), "locality_batch": int(locality_batch),
            "truncation_psi": float(truncation_psi), "seed": int(seed)}


def _trainable_copy(G: nn.Module) -> nn.Module:
    """A deep copy of G whose synthesis weights (and only those) require gradients."""
    tuned = copy.deepcopy(G).eval().requires_grad_(False)
    tuned.synthesis.requires_grad_(True)
    return tuned


def _distance(lpips: nn.Module, a: torch.Tensor, b: torch.Tensor, lpips_weight: float, l2_weight: float
              ) -> torch.Tensor:
    """Per-image ``lpips_weight * LPIPS + l2_weight * MSE`` of float images in [-1, 1]: ``[N]``."""
    out = l2_weight * (a - b).square().flatten(1).mean(1)
    if lpips_weight:
        out = out + lpips_weight * lpips(a, b)
    return out


def tune_generator(G: nn.Module, ws: torch.Tensor, images: np.ndarray, *, steps: int = TUNE_STEPS,
                   lr: float = TUNE_LR, batch: int = TUNE_BATCH, lpips_weight: float = TUNE_LPIPS_WEIGHT,
                   l2_weight: float = TUNE_L2_WEIGHT, locality_weight: float = LOCALITY_WEIGHT,
                   locality_alpha: float = LOCALITY_ALPHA, locality_batch: int = LOCALITY_BATCH,
                   truncation_psi: float = LOCALITY_PSI, seed: int = 0, lpips: Optional[nn.Module] = None,
                   progress: bool = True, callback: Optional[Callable[[int, nn.Module], None]] = None
                   ) -> TuneResult:
    """Tune a copy of ``G`` so that it reproduces ``images`` at the pivots ``ws`` (module docstring).

    Args:
        G: the generator (left unchanged).
        ws: the pivots, float ``[N, num_ws, w_dim]`` (any device); row i is image i's code under G.
        images: uint8 ``[N, R, R, 3]`` at G's resolution R.
        steps: Adam steps (0 returns an unchanged copy, with the metrics).
        lr: Adam's learning rate (constant).
        batch: pivots per step.
        lpips_weight, l2_weight: weights of LPIPS and pixel MSE in both loss terms.
        locality_weight: weight of the locality term (0 turns the regulariser off).
        locality_alpha: how far toward the random w the regularised code lies (0 = the pivot, 1 = the random w).
        locality_batch: regularised codes per step.
        truncation_psi: truncation of the random ws.
        seed: seeds the pivot order and the random ws.
        lpips: an LPIPS module (`handsoff.invert.lpips.load_lpips`) on G's device; None loads LPIPS-VGG.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, G')`` after each step (step counts from 1), e.g. to
            measure intermediate generators; it must not change G'.

    Returns:
        A `TuneResult` (its ``generator`` is G').
    """
    from tqdm import tqdm

    settings = tune_settings(steps, lr, batch, lpips_weight, l2_weight, locality_weight, locality_alpha,
                             locality_batch, truncation_psi, seed)
    device = G.mapping.w_avg.device
    res = G.img_resolution
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (res, res, 3) \
            or len(images) == 0:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be uint8 [N, {res}, {res}, 3] with N >= 1, got {got}")
    if tuple(ws.shape) != (len(images), G.num_ws, G.w_dim):
        raise ValueError(f"ws must be [{len(images)}, {G.num_ws}, {G.w_dim}], got {list(ws.shape)}")
    if lpips is None:
        from handsoff.invert.lpips import load_lpips

        lpips = load_lpips("vgg", device=device)
    pivots = ws.detach().to(device, torch.float32)
    target = images_to_tensor(images, device)
    before = reconstruct(G, pivots)
    tuned = _trainable_copy(G)
    params = [p for p in tuned.synthesis.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)  # CPU stream: the same draws on every device
    n, order = len(pivots), torch.empty(0, dtype=torch.long)
    history: dict[str, list[float]] = {"total": [], "reconstruction": [], "locality": []}
    start = time.perf_counter()
    with tqdm(total=steps, unit="step", desc="tune", disable=not progress) as bar:
        for step in range(1, steps + 1):
            if len(order) < min(batch, n):  # a new pass: every image once before any twice
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            pick, order = order[:min(batch, n)], order[min(batch, n):]
            recon = _distance(lpips, synthesize(tuned, pivots[pick]), target[pick], lpips_weight, l2_weight).mean()
            loss, local = recon, torch.zeros(())
            if locality_weight > 0:
                z = torch.randn(locality_batch, G.z_dim, generator=gen)
                anchor = pivots[torch.randint(n, (locality_batch,), generator=gen)]
                with torch.no_grad():
                    w_z = G.mapping(z.to(device), None, truncation_psi=truncation_psi)
                    w_r = anchor + locality_alpha * (w_z - anchor)
                    old = synthesize(G, w_r)
                local = _distance(lpips, synthesize(tuned, w_r), old, lpips_weight, l2_weight).mean()
                loss = recon + locality_weight * local
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)
            opt.step()
            loss, recon, local = loss.detach(), recon.detach(), local.detach()
            for key, value in (("total", loss), ("reconstruction", recon), ("locality", local)):
                history[key].append(round(value.item(), 6))
            bar.set_postfix(recon=f"{history['reconstruction'][-1]:.4f}", local=f"{history['locality'][-1]:.4f}")
            bar.update()
            if callback is not None:
                callback(step, tuned)
    seconds = time.perf_counter() - start
    tuned.eval().requires_grad_(False)
    after = reconstruct(tuned, pivots)
    return TuneResult(generator=tuned, lpips_before=lpips_distances(lpips, before, images),
                      lpips_after=lpips_distances(lpips, after, images), psnr_before=psnr(before, images),
                      psnr_after=psnr(after, images), reconstructions_before=before, reconstructions_after=after,
                      losses=history, seconds=round(seconds, 2), settings=settings)


@torch.no_grad()
def sample_drift(G: nn.Module, tuned: nn.Module, lpips: nn.Module, n: int = DRIFT_SAMPLES,
                 truncation_psi: float = LOCALITY_PSI, seed: int = _DRIFT_SEED) -> dict[str, float]:
    """How far ``tuned`` moved from ``G`` on ``n`` random samples (the same ws for both).

    Returns:
        ``{"lpips": mean LPIPS, "psnr": mean PSNR in dB, "samples": n, "truncation_psi": psi}`` between
        G's and the tuned generator's uint8 images (identical generators give LPIPS 0, PSNR 100).
    """
    device = G.mapping.w_avg.device
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    ws = G.mapping(z.to(device), None, truncation_psi=truncation_psi)
    a, b = reconstruct(G, ws), reconstruct(tuned, ws)
    return {"lpips": round(float(np.mean(lpips_distances(lpips, a, b))), 5),
            "psnr": round(float(np.mean(psnr(a, b))), 3), "samples": n, "truncation_psi": truncation_psi}


# ---------------------------------------------------------------------------------------------
# The stage on files

def _short_sha(path: Path) -> str:
    from handsoff.utils.io import sha256_file

    return sha256_file(path)[:16]


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out`` (an existing ``out`` is replaced only once ``tmp`` is complete)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tune_folder(generator: PathLike, latents: PathLike, images: PathLike, out: PathLike, *,
                device: Union[str, torch.device] = "cpu", resize: bool = False, overwrite: bool = False,
                lpips: Optional[nn.Module] = None, progress: bool = True, command: Optional[str] = None,
                **settings: Any) -> TuneResult:
    """Tune ``generator`` on the images of a folder at their latents and write the tuned folder ``out``.

    Args:
        generator: the generator checkpoint G.
        latents: a latents file made for G (`handsoff invert`); it must hold a code for every image.
        images: a labeled-set folder (its ``images/``) or a folder of images at G's resolution.
        out: the folder to write: ``generator.safetensors`` (G'), ``latents.safetensors`` (the same
            codes and names, stamped with G''s digest), ``tune.json`` and ``tune.png``. It appears
            complete or not at all (built beside it, then renamed).
        device: where to tune.
        resize: resize images of another size instead of refusing them.
        overwrite: replace an existing ``out`` (else it is an error).
        lpips: an LPIPS module on ``device``; None loads LPIPS-VGG.
        progress: show a progress bar.
        command: the command line, recorded in the report.
        **settings: `tune_generator`'s settings (``steps``, ``lr``, ``batch``, ...).

    Raises:
        HandsoffError: one line naming the bad file (generator, latents made for another generator,
            an image without a code, an unreadable or wrongly sized image, an existing ``out``).
    """
    from handsoff.data.images import read_image_folder
    from handsoff.gan.checkpoints import load_generator, save_generator
    from handsoff.gan.digest import generator_digest
    from handsoff.invert.latents import Latents, load_latents, save_latents
    from handsoff.utils.images import save_png
    from handsoff.utils.io import atomic_write_bytes

    generator, latents, out = Path(generator), Path(latents), Path(out)
    if out.exists() and not overwrite:
        raise HandsoffError(f"{out}: already exists (use --force to overwrite)")
    if out.exists() and not out.is_dir():
        raise HandsoffError(f"{out}: not a folder")
    try:
        tune_settings(**settings)  # bad settings fail before anything is loaded
    except (TypeError, ValueError) as err:
        raise HandsoffError(f"tune settings: {err}") from None
    G = load_generator(generator, device=device)
    digest = generator_digest(G)
    codes = load_latents(latents, expect_digest=digest, expect_shape=(G.num_ws, G.w_dim))
    names, pixels = read_image_folder(images, resolution=G.img_resolution, resize=resize)
    pivots = codes.select(names, latents)
    if lpips is None:
        from handsoff.invert.lpips import load_lpips

        lpips = load_lpips("vgg", device=device)
    result = tune_generator(G, pivots, pixels, lpips=lpips, progress=progress, **settings)
    tuned_digest = generator_digest(result.generator)
    latents_sha = _short_sha(latents)
    drift = sample_drift(G, result.generator, lpips)
    origin = {"generator": str(generator), "generator_digest": digest, "latents": str(latents),
              "latents_sha256": latents_sha, "images": str(images)}
    report = {"tuned_generator_digest": tuned_digest, **origin, "settings": result.settings,
              "summary": result.summary(), "drift_from_generator": drift, "seconds": result.seconds,
              "images_tuned": names, "lpips_before": [round(float(v), 5) for v in result.lpips_before],
              "lpips_after": [round(float(v), 5) for v in result.lpips_after],
              "psnr_before": [round(float(v), 3) for v in result.psnr_before],
              "psnr_after": [round(float(v), 3) for v in result.psnr_after], "losses": result.losses,
              "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_generator(result.generator, tmp / TUNED_GENERATOR,
                       extra_metadata={"tuned_from": origin, "tune_settings": result.settings})
        # The same codes, now belonging to G': the latents of the tuned images carry their figures under G'.
        after = dict(zip(names, zip(result.lpips_after.tolist(), result.psnr_after.tolist())))
        extra = {**codes.extra, "tuned": {**origin, "lpips_after": {k: round(v[0], 5) for k, v in after.items()},
                                          "psnr_after": {k: round(v[1], 3) for k, v in after.items()}}}
        save_latents(tmp / TUNED_LATENTS, Latents(codes.ws, codes.names, tuned_digest, extra))
        atomic_write_bytes(tmp / TUNE_REPORT, (json.dumps(report, indent=1) + "\n").encode())
        save_png(tmp / TUNE_PICTURE, comparison_grid([pixels, result.reconstructions_before,
                                                      result.reconstructions_after], max_rows=16))
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
