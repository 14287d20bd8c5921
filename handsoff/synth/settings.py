"""What a generation run is: the settings that determine a corpus's bytes.

`GenerateSettings` holds every choice that changes which samples a corpus holds or their
bytes; the manifest records it, and resuming into a folder made with other settings is an
error. Compute settings (batch size, device, number of processes) are not part of it:
they change only the speed. (Bytes are identical for the same device, batch size and torch
thread count; across those, floating-point sums may differ in the last bits, which can move
a label at a class boundary.)

``n`` counts *generated* samples: sample ``i`` of the run (``0 <= i < n``) is generated
from seed ``seed + i`` whatever the filter later decides, so the seed range of a run is
known in advance and shards are independent. The manifest and report record how many
were kept.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from handsoff.errors import HandsoffError

__all__ = ["GenerateSettings", "MAX_SEED"]

#: Seeds name ``np.random.RandomState(seed)``, which takes 32-bit seeds.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerateSettings:
    """The settings of one corpus.

    Attributes:
        n: samples to generate (the corpus keeps about ``n * (1 - filter)``).
        seed: sample ``i`` uses seed ``seed + i`` (``z = np.random.RandomState(seed + i).randn``).
        truncation: truncation psi of the mapping network (1 = none).
        filter: fraction of each shard's samples dropped as the most uncertain
            (``floor(filter * generated)`` per shard, decided per shard so that shards stay
            independent and reproducible).
        keep_all: keep every sample and store the filter's verdict in ``keep`` instead.
        shard_size: generated samples per shard (the last shard may be smaller).
        noise_mode: the synthesis network's per-layer noise, ``const`` (reproducible),
            ``random`` or ``none``.
        store_ws: store each sample's W+ code in the shard (``ws``).
        mix_from: with ``--around``: the first W+ layer taken from the random latent
            (layers ``mix_from ..`` are the fine layers that are style-mixed).
        mix_noise: with ``--around``: standard deviation of the Gaussian noise added to the
            mixed fine layers.
        want_class: oversample samples whose predicted segmentation holds this class.
        want_pixels: a sample "holds" the class when at least this many pixels have it.
        want_ratio: the fraction of sample indices that must hold the class (indices ``i``
            with ``floor((i + 1) * ratio) > floor(i * ratio)``).
        want_tries: candidate latents tried per such index before the last one is kept.
    """

    n: int
    seed: int = 0
    truncation: float = 0.7
    filter: float = 0.1
    keep_all: bool = False
    shard_size: int = 1000
    noise_mode: str = "const"
    store_ws: bool = False
    mix_from: Optional[int] = None
    mix_noise: float = 0.05
    want_class: Optional[str] = None
    want_pixels: int = 16
    want_ratio: float = 0.5
    want_tries: int = 8

    def validate(self, around: bool = False) -> "GenerateSettings":
        """Return self; raise `HandsoffError` naming the first invalid setting."""
        checks = [
            (self.n >= 1, f"--n must be at least 1 (got {self.n})"),
            (0 <= self.seed and self.seed + self.n - 1 <= MAX_SEED,
             f"seeds {self.seed}..{self.seed + self.n - 1} must lie in [0, 2**32)"),
            (0 <= self.filter < 1, f"--filter must lie in [0, 1) (got {self.filter})"),
            (self.shard_size >= 1, f"--shard-size must be at least 1 (got {self.shard_size})"),
            (self.noise_mode in ("const", "random", "none"),
             f"noise mode {self.noise_mode!r} is not const, random or none"),
            (self.truncation > 0, f"--truncation must be positive (got {self.truncation})"),
            (self.mix_noise >= 0, f"--mix-noise must be >= 0 (got {self.mix_noise})"),
            (0 < self.want_ratio <= 1, f"--want-ratio must lie in (0, 1] (got {self.want_ratio})"),
            (self.want_tries >= 1, f"--want-tries must be at least 1 (got {self.want_tries})"),
            (self.want_pixels >= 1, f"--want-pixels must be at least 1 (got {self.want_pixels})"),
            (around or self.mix_from is None, "--mix-from only applies with --around"),
        ]
        for ok, message in checks:
            if not ok:
                raise HandsoffError(f"generate: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
