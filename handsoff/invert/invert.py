"""Inverting images: the encoder's W+ codes, optionally refined per image, and reconstruction metrics.

Per-image refinement follows the official HandsOff code (DESIGN.md section 4): each image's
w+ is optimised for ``10 * LPIPS(G(w), x) + MSE(G(w), x) + MSE(w, w_init)`` with Adam at a
peak learning rate of 0.1, ramped up linearly over the first 5% of the steps and down along a
cosine over the last 25%; the w+ with the lowest loss seen (the start included) is kept, so
refinement never makes an image's loss worse. Images are refined in batches: the per-image
losses are summed, and since Adam works element by element, each image's optimisation is
independent of the others in its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from handsoff.invert.train import images_to_tensor, synthesize

__all__ = ["InversionResult", "invert_images", "reconstruct", "comparison_grid", "refine_latents", "psnr",
           "lpips_distances", "refine_lr", "REFINE_LR", "REFINE_LPIPS_WEIGHT", "REFINE_PULL_WEIGHT"]

REFINE_LR = 0.1
REFINE_LPIPS_WEIGHT = 10.0
REFINE_PULL_WEIGHT = 1.0
_RAMP_UP = 0.05
_RAMP_DOWN = 0.25
_PSNR_MAX = 100.0


@dataclass(frozen=True)
class InversionResult:
    """What `invert_images` returns.

    Attributes:
        ws: float32 ``[N, num_ws, w_dim]`` (CPU).
        reconstructions: uint8 ``[N, H, W, 3]``, ``G.synthesis(ws, noise_mode='const')``.
        lpips: float32 ``[N]``, LPIPS between each reconstruction and its image (both as uint8).
        psnr: float32 ``[N]``, PSNR in dB of each reconstruction (uint8 peak 255, capped at 100).
        refine_loss_start, refine_loss_best: float32 ``[N]`` refinement loss of the encoder's
            ws and of the kept ws (None without refinement).
    """

    ws: torch.Tensor
    reconstructions: np.ndarray
    lpips: np.ndarray
    psnr: np.ndarray
    refine_loss_start: Optional[np.ndarray] = None
    refine_loss_best: Optional[np.ndarray] = None


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per image of uint8 ``[N, H, W, C]`` arrays (peak 255; identical images give 100)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        value = 10 * np.log10(255.0 ** 2 / mse)
    return np.minimum(value, _PSNR_MAX).astype(np.float32)


def refine_lr(step: int, steps: int, peak: float = REFINE_LR) -> float:
    """Learning rate at ``step`` of ``steps``: linear ramp-up over 5%, cosine ramp-down over the last 25%."""
    t = step / max(1, steps)
    down = min(1.0, (1.0 - t) / _RAMP_DOWN)
    down = 0.5 - 0.5 * math.cos(down * math.pi)
    return peak * down * min(1.0, t / _RAMP_UP)


def _refine_losses(G: nn.Module, lpips: nn.Module, target: torch.Tensor, ws: torch.Tensor,
                   w_init: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Per-image refinement loss, float ``[N]``."""
    img = synthesize(G, ws)
    pixel = (img - target).square().flatten(1).mean(1)
    pull = (param - w_init).square().flatten(1).mean(1)
    return REFINE_LPIPS_WEIGHT * lpips(img, target) + pixel + REFINE_PULL_WEIGHT * pull


def refine_latents(G: nn.Module, target: torch.Tensor, ws_init: torch.Tensor, *, steps: int, lpips: nn.Module,
                   w_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise each image's code for ``steps`` Adam steps (module docstring), keeping the best.

    Args:
        G: the generator.
        target: the images, float ``[N, 3, R, R]`` in [-1, 1].
        ws_init: starting codes, float ``[N, num_ws, w_dim]``; with ``w_only`` every row must
            be the same w, and one w per image is optimised.
        steps: Adam steps (the loss is evaluated ``steps + 1`` times: the start and after each step).
        lpips: an LPIPS module (`handsoff.invert.lpips.load_lpips`).

    Returns:
        ``(ws, loss_start, loss_best)``: the kept codes ``[N, num_ws, w_dim]`` and the per-image
        losses ``[N]`` of ``ws_init`` and of the kept codes (``loss_best <= loss_start``).
    """
    w_init = (ws_init[:, :1] if w_only else ws_init).detach().float()
    param = w_init.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=REFINE_LR, betas=(0.9, 0.999))
    best = w_init.clone()
    best_loss = torch.full((len(w_init),), math.inf, device=w_init.device)
    start_loss = best_loss
    for step in range(steps + 1):
        ws = param.expand(-1, G.num_ws, -1) if w_only else param
        with torch.set_grad_enabled(step < steps):  # the last evaluation needs no gradient
            losses = _refine_losses(G, lpips, target, ws, w_init, param)
        with torch.no_grad():
            better = losses < best_loss
            best[better] = param[better]
            best_loss = torch.where(better, losses, best_loss)
            if step == 0:
                start_loss = losses.detach().clone()
        if step == steps:
            break
        for group in opt.param_groups:
            group["lr"] = refine_lr(step, steps)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward(inputs=[param])
        opt.step()
    ws = best.expand(-1, G.num_ws, -1) if w_only else best
    return ws.contiguous(), start_loss, best_loss


def _check_images(images: np.ndarray, resolution: int) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1:] != (resolution, resolution, 3) or len(images) == 0:
        got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be uint8 [N, {resolution}, {resolution}, 3] with N >= 1, got {got}")


@torch.no_grad()
def reconstruct(G: nn.Module, ws: torch.Tensor, batch: int = 16) -> np.ndarray:
    """The images of ``ws`` exactly as an inversion is scored on them.

    Args:
        G: the generator.
        ws: ``[N, num_ws, w_dim]`` latents, on any device (moved to G's, ``batch`` at a time).
        batch: images per generator call.

    Returns:
        uint8 ``[N, H, W, 3]``: ``G.synthesis(ws, noise_mode='const', fused_modconv=False)``.
    """
    from handsoff.utils.images import to_uint8

    device = G.mapping.w_avg.device
    return np.concatenate([to_uint8(synthesize(G, w.to(device))) for w in ws.split(batch)])


def invert_images(G: nn.Module, encoder: nn.Module, images: np.ndarray, *, refine_steps: int = 0,
                  lpips: Optional[nn.Module] = None, batch: int = 16, seed: int = 0, progress: bool = True,
                  w_only: bool = False) -> InversionResult:
    """W+ codes of ``images`` under ``G``: the encoder's, then (optionally) refined per image.

    Args:
        G: the generator; ``encoder`` must have been trained for it and live on its device.
        encoder: an `handsoff.invert.encoder.Encoder` (or any module images -> ws).
        images: uint8 ``[N, R, R, 3]`` RGB at the generator's resolution R.
        refine_steps: per-image refinement steps (0 = the encoder's codes only).
        lpips: LPIPS module for the refinement and the metric; None loads LPIPS-VGG.
        batch: images per forward pass (and per refinement batch).
        seed: seeds torch's RNG during the run (the method itself draws no random numbers, so
            the result is the same for every seed; it is there so that it stays reproducible).
        progress: show a tqdm progress bar.
        w_only: the "W instead of W+" ablation: one w per image (the mean of the encoder's ws,
            repeated num_ws times) and, when refining, one shared w per image.

    Returns:
        An `InversionResult`.
    """
    from tqdm import tqdm

    _check_images(images, G.img_resolution)
    if refine_steps < 0 or batch < 1:
        raise ValueError(f"need refine_steps >= 0 and batch >= 1, got {refine_steps}, {batch}")
    device = G.mapping.w_avg.device
    if lpips is None:
        from handsoff.invert.lpips import load_lpips

        lpips = load_lpips("vgg", device=device)
    out_ws, recons, starts, bests = [], [], [], []
    with torch.random.fork_rng(devices=[]), tqdm(total=len(images), unit="img", disable=not progress,
                                                  desc="invert") as bar:
        torch.manual_seed(seed)
        for i in range(0, len(images), batch):
            x = images_to_tensor(images[i:i + batch], device)
            with torch.no_grad():
                ws = encoder(x).float()
            if w_only:
                ws = ws.mean(dim=1, keepdim=True).expand(-1, G.num_ws, -1).contiguous()
            if refine_steps:
                ws, start, best = refine_latents(G, x, ws, steps=refine_steps, lpips=lpips, w_only=w_only)
                starts.append(start.cpu())
                bests.append(best.cpu())
            recons.append(reconstruct(G, ws, batch))
            out_ws.append(ws.detach().cpu())
            bar.update(len(x))
    reconstructions = np.concatenate(recons)
    return InversionResult(
        ws=torch.cat(out_ws).float(), reconstructions=reconstructions,
        lpips=lpips_distances(lpips, reconstructions, images, batch=batch), psnr=psnr(reconstructions, images),
        refine_loss_start=torch.cat(starts).numpy().astype(np.float32) if starts else None,
        refine_loss_best=torch.cat(bests).numpy().astype(np.float32) if bests else None)


@torch.no_grad()
def lpips_distances(lpips: nn.Module, a: np.ndarray, b: np.ndarray, batch: int = 16) -> np.ndarray:
    """LPIPS between uint8 ``[N, H, W, 3]`` image arrays, pair by pair: float32 ``[N]``."""
    device = next(lpips.parameters()).device
    out = [lpips(images_to_tensor(a[i:i + batch], device), images_to_tensor(b[i:i + batch], device)).cpu()
           for i in range(0, len(a), batch)]
    return torch.cat(out).numpy().astype(np.float32)


def comparison_grid(columns: Sequence[np.ndarray], max_rows: int = 32) -> np.ndarray:
    """A picture of image sets side by side: row i shows image i of each set (first ``max_rows`` rows).

    Args:
        columns: uint8 ``[N, H, W, 3]`` arrays of one shape (e.g. inputs, reconstructions).
        max_rows: rows shown; up to four rows are placed side by side per picture row.

    Returns:
        uint8 ``[H', W', 3]``.
    """
    from handsoff.utils.images import image_grid

    n = min(len(columns[0]), max_rows)
    groups = np.stack([c[:n] for c in columns], axis=1).reshape(len(columns) * n, *columns[0].shape[1:])
    return image_grid(groups, cols=len(columns) * min(n, 4))
