"""Seeded sampling from a generator: the same seed gives the same image on the same device."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def z_from_seeds(seeds: Sequence[int], z_dim: int) -> torch.Tensor:
    """Latents ``[len(seeds), z_dim]`` float32, one ``np.random.RandomState(seed).randn`` draw each.

    This is the convention of the NVlabs ``generate.py`` tools, so seed 42 names the same
    latent here as there.
    """
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])).float()


@torch.no_grad()
def generate_images(G: torch.nn.Module, seeds: Sequence[int], truncation_psi: float = 1.0,
                    noise_mode: str = "const", batch_size: int = 16) -> torch.Tensor:
    """Images ``[N, C, H, W]`` float32 on the CPU, about [-1, 1], for ``seeds`` through ``G``.

    Runs on the device where ``G``'s parameters are, ``batch_size`` seeds at a time.
    """
    device = next(G.parameters()).device
    chunks = []
    for start in range(0, len(seeds), batch_size):
        z = z_from_seeds(seeds[start:start + batch_size], G.z_dim).to(device)
        ws = G.mapping(z, truncation_psi=truncation_psi)
        chunks.append(G.synthesis(ws, noise_mode=noise_mode).float().cpu())
    return torch.cat(chunks)
