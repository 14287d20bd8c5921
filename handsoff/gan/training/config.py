"""`TrainConfig`: every setting that shapes a GAN training run.

A run directory stores its `TrainConfig` in ``config.json``; a resumed run must use the
same values for every field that changes the training trajectory. The fields in
`RUN_CONTROL_FIELDS` (how long to train, how often to write files, how many workers
load data, how big the quality evaluation is) may change between resumes.

Defaults follow the NVlabs stylegan2-ada-pytorch "auto" configuration where it has one:
``r1_gamma = 0.0002 * resolution**2 / batch``, ``ema_kimg = 10 * batch / 32``,
``ema_rampup = 0.05``, Adam ``lr = 0.0025, betas = (0, 0.99), eps = 1e-8``, lazy R1
every 16 minibatches, float16 in the 4 highest resolutions with ``conv_clamp = 256``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

__all__ = ["TrainConfig", "RUN_CONTROL_FIELDS"]

RUN_CONTROL_FIELDS = frozenset({
    "total_kimg", "snapshot_kimg", "sample_kimg", "tick_kimg", "num_workers", "fd_samples",
    "keep_snapshots", "domain_workers",
})
"""Fields that do not change what the networks learn and may differ when resuming."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and schedule of a StyleGAN2 training run.

    ``batch`` is the global batch (split evenly over the processes of a torchrun job).
    ``None`` for ``r1_gamma`` / ``ema_kimg`` means "derive from resolution and batch" (see
    `resolved`). Durations are in thousands of training images (kimg) shown to D.
    """

    resolution: int = 64
    batch: int = 64
    total_kimg: float = 10000.0
    # optimisation
    lr_g: float = 0.0025
    lr_d: float = 0.0025
    betas: Tuple[float, float] = (0.0, 0.99)
    adam_eps: float = 1e-8
    r1_gamma: Optional[float] = None
    r1_interval: int = 16
    pl_weight: float = 0.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    ema_kimg: Optional[float] = None
    ema_rampup: Optional[float] = 0.05
    style_mixing_prob: float = 0.9
    xflip: bool = False
    # precision (float16 is used on CUDA only; the CPU always runs float32)
    mixed_precision: bool = True
    num_fp16_res: int = 4
    conv_clamp: Optional[float] = 256.0
    allow_tf32: bool = False
    # architecture
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    g_channel_base: int = 16384
    g_channel_max: int = 512
    d_channel_base: int = 16384
    d_channel_max: int = 512
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    # randomness
    seed: int = 0
    # schedule of files (kimg); 0 disables
    snapshot_kimg: float = 200.0
    sample_kimg: float = 100.0
    tick_kimg: float = 4.0
    keep_snapshots: int = 0
    # quality figure at each snapshot: samples per side (0 disables)
    fd_samples: int = 5000
    # data loading
    num_workers: int = 4
    domain_workers: int = 0

    def __post_init__(self) -> None:
        r = self.resolution
        if r < 16 or r & (r - 1):
            raise ValueError(f"resolution must be a power of two >= 16, got {r}")
        if self.batch <= 0:
            raise ValueError(f"batch must be positive, got {self.batch}")
        if self.total_kimg <= 0:
            raise ValueError(f"total_kimg must be positive, got {self.total_kimg}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("r1_interval", "pl_interval", "pl_batch_shrink"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.style_mixing_prob <= 1:
            raise ValueError(f"style_mixing_prob must be in [0, 1], got {self.style_mixing_prob}")
        if self.r1_gamma is not None and self.r1_gamma < 0:
            raise ValueError(f"r1_gamma must be >= 0, got {self.r1_gamma}")
        if self.pl_weight < 0:
            raise ValueError(f"pl_weight must be >= 0, got {self.pl_weight}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    # ------------------------------------------------------------------ derived values
    @property
    def r1_gamma_value(self) -> float:
        """R1 weight: the configured one, or NVlabs' heuristic ``0.0002 * res**2 / batch``."""
        if self.r1_gamma is not None:
            return float(self.r1_gamma)
        return 0.0002 * self.resolution ** 2 / self.batch

    @property
    def ema_kimg_value(self) -> float:
        """Half-life of the generator EMA in kimg: configured, or ``10 * batch / 32``."""
        if self.ema_kimg is not None:
            return float(self.ema_kimg)
        return 10.0 * self.batch / 32

    def resolved(self) -> "TrainConfig":
        """A copy with ``r1_gamma`` and ``ema_kimg`` filled in."""
        return dataclasses.replace(self, r1_gamma=self.r1_gamma_value, ema_kimg=self.ema_kimg_value)

    def lazy_ratio(self, interval: Optional[int]) -> float:
        """``c = interval / (interval + 1)``: lr *= c and betas **= c for lazily regularised nets."""
        return 1.0 if not interval else interval / (interval + 1)

    @property
    def total_nimg(self) -> int:
        return int(math.ceil(self.total_kimg * 1000))

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def trajectory_differences(self, other: "TrainConfig") -> Dict[str, Tuple[Any, Any]]:
        """Fields (outside `RUN_CONTROL_FIELDS`) whose values differ: ``{name: (self, other)}``."""
        a, b = self.resolved().to_dict(), other.resolved().to_dict()
        return {k: (a[k], b[k]) for k in a if k not in RUN_CONTROL_FIELDS and a[k] != b[k]}
