"""Latents of the samples of a run: every sample's W+ code is a pure function of its seed.

* Plain sampling: ``z = np.random.RandomState(seed).randn(z_dim)`` (as
  `handsoff.gan.sampling.z_from_seeds` and NVlabs' ``generate.py``), ``w = mapping(z, psi)``.
* Around given images (``--around latents.safetensors``, N codes): sample ``i`` starts from
  the W+ code of image ``i % N``; its fine layers (``mix_from ..``, the layers that carry
  colour and texture but not layout, so the base image's labels stay meaningful) are
  replaced by the truncated ``w`` of its seed plus Gaussian noise of standard deviation
  ``mix_noise``. The noise is drawn from the same ``RandomState(seed)`` right after ``z``.
* Retries of ``--want-class``: attempt 0 of sample ``i`` uses seed ``seed + i``; attempt
  ``a > 0`` uses `candidate_seed`, a 32-bit seed hashed from ``(seed, i, a)``, so a retry
  never depends on which other samples were retried.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from handsoff.errors import HandsoffError
from handsoff.synth.settings import GenerateSettings

__all__ = ["candidate_seed", "default_mix_from", "LatentSampler"]


def candidate_seed(seed: int, index: int, attempt: int) -> int:
    """The seed of candidate ``attempt`` for sample ``index`` of a run started at ``seed``."""
    if attempt == 0:
        return seed + index
    return int(np.random.SeedSequence([seed, index, attempt]).generate_state(1, np.uint32)[0])


def default_mix_from(num_ws: int) -> int:
    """The first fine W+ layer: the upper half (8 of 18 layers at 1024x1024, 5 of 10 at 64x64)."""
    return num_ws // 2


class LatentSampler:
    """Maps (sample index, seed) pairs to W+ codes on the generator's device.

    Args:
        G: the generator (its mapping network and ``w_avg`` are used).
        settings: the run's settings (truncation, and for ``around`` mix_from / mix_noise).
        around: W+ codes ``[N, num_ws, w_dim]`` to generate variations of, or None.
    """

    def __init__(self, G: torch.nn.Module, settings: GenerateSettings, around: Optional[torch.Tensor] = None) -> None:
        self.G = G
        self.settings = settings
        self.device = next(G.parameters()).device
        self.around = None if around is None else around.to(self.device, torch.float32)
        self.mix_from = settings.mix_from if settings.mix_from is not None else default_mix_from(G.num_ws)
        if around is not None and not 0 <= self.mix_from < G.num_ws:
            raise HandsoffError(f"generate: --mix-from must lie in [0, {G.num_ws}) for this generator "
                                f"(got {self.mix_from})")

    def _draws(self, seeds: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z ``[B, z_dim]`` and, around images, the fine-layer noise ``[B, fine, w_dim]``."""
        fine = self.G.num_ws - self.mix_from
        zs, noise = [], []
        for s in seeds:
            rs = np.random.RandomState(int(s))
            zs.append(rs.randn(self.G.z_dim))
            if self.around is not None:
                noise.append(rs.randn(fine, self.G.w_dim))
        z = torch.from_numpy(np.stack(zs)).float().to(self.device)
        eps = torch.from_numpy(np.stack(noise)).float().to(self.device) if noise else None
        return z, eps

    @torch.no_grad()
    def ws(self, index: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
        """W+ codes ``[B, num_ws, w_dim]`` of samples ``index`` drawn from ``seeds``."""
        z, eps = self._draws(seeds)
        ws = self.G.mapping(z, truncation_psi=self.settings.truncation)
        if self.around is None:
            return ws
        base = self.around[torch.as_tensor(index % len(self.around), device=self.device)].clone()
        base[:, self.mix_from:] = ws[:, self.mix_from:] + self.settings.mix_noise * eps
        return base
