"""Quality figure of a GAN: Fréchet distance between feature statistics of real and
generated images.

``FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, computed in float64.

Which features:

* **FID** when Inception-v3 weights are already on disk (this tool never downloads):
  pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (the TF FID network: its pooling
  quirks are reproduced, so values compare with published FIDs) or torchvision's
  ``inception_v3_google-*.pth`` (ImageNet classifier; values are close to, not equal to,
  published FIDs). Searched in the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and
  at ``$HANDSOFF_INCEPTION``.
* Otherwise **FD-<domain>-seg**: a small CNN trained for a few hundred steps to segment a
  built-in domain's rendered images (exact labels come free with the renderer); its
  pooled features are the embedding. Trained once, with a fixed seed, and cached (in the
  run directory and in the user cache ``$HANDSOFF_CACHE`` or ``~/.cache/handsoff``), so
  numbers from different runs on the same cache compare. It is NOT FID and is never
  called FID.

Everything here runs under `torch.random.fork_rng`, so evaluating never changes the
random streams of the training it interrupts.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import types
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "frechet_distance", "frechet_distance_from_stats", "feature_statistics",
    "FeatureExtractor", "InceptionFeatureExtractor", "SegFeatureNet", "SegFeatureExtractor",
    "find_inception_weights", "train_seg_feature_net", "load_or_train_seg_extractor",
    "get_feature_extractor", "QualityEvaluator", "user_cache_dir",
]

SEG_FEATURES_VERSION = 1
SEG_INPUT_RES = 64


# --------------------------------------------------------------------------- the distance
def feature_statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``feats [N, D]``, float64."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray,
                                sigma_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu_a, sigma_a) and N(mu_b, sigma_b).

    ``tr((S_a S_b)^(1/2))`` is computed as ``sum(sqrt(eig(A S_b A)))`` with ``A = S_a^(1/2)``:
    ``A S_b A`` is symmetric positive semi-definite and similar to ``S_a S_b``, so this is
    exact and stable without a general (complex) matrix square root.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
        raise ValueError("feature statistics have different shapes")
    root_a = _sqrtm_psd(sigma_a)
    m = root_a @ sigma_b @ root_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``[N, D]`` and ``[M, D]``."""
    return frechet_distance_from_stats(*feature_statistics(feats_a), *feature_statistics(feats_b))


# --------------------------------------------------------------------------- extractors
class FeatureExtractor(nn.Module):
    """Base: ``forward(uint8 [N, 3, H, W]) -> float32 [N, D]``; ``metric`` names the figure."""

    metric: str = "FD"
    description: str = ""
    dims: int = 0

    def device(self) -> torch.device:
        return next(self.parameters()).device


def user_cache_dir() -> Path:
    root = os.environ.get("HANDSOFF_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "handsoff"


@contextlib.contextmanager
def _isolated_rng(device: Optional[torch.device]) -> Iterator[None]:
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


# ---- Inception (FID)
def find_inception_weights() -> Optional[Tuple[Path, str]]:
    """``(path, kind)`` of Inception weights on disk, kind ``'fid'`` or ``'torchvision'``; else None."""
    env = os.environ.get("HANDSOFF_INCEPTION")
    candidates: List[Path] = [Path(env)] if env else []
    try:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        candidates += sorted(hub.glob("pt_inception-2015-12-05*.pth")) + sorted(hub.glob("inception_v3_google*.pth"))
    except Exception:  # noqa: BLE001 - a broken hub dir only means "no weights"
        pass
    for p in candidates:
        if p.is_file():
            return p, ("fid" if p.name.startswith("pt_inception") else "torchvision")
    return None


def _fid_block_a(self, x):  # InceptionA with the TF graph's average pooling (padding not counted)
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b5, b3, bp], 1)


def _fid_block_c(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    b7d = x
    for name in ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"):
        b7d = getattr(self, name)(b7d)
    bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
    return torch.cat([b1, b7, b7d, bp], 1)


def _fid_block_e(self, x, max_pool: bool):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
    if max_pool:  # the last block of the TF graph max-pools here
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
        pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


class InceptionFeatureExtractor(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d) from weights found on disk; metric ``FID``."""

    metric = "FID"
    dims = 2048

    def __init__(self, weights: Path, kind: str):
        super().__init__()
        from torchvision.models.inception import Inception3

        self.kind = kind
        num_classes = 1008 if kind == "fid" else 1000
        net = Inception3(num_classes=num_classes, aux_logits=(kind != "fid"), transform_input=False,
                         init_weights=False)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=(kind == "fid"))
        if kind == "fid":
            for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
                m = getattr(net, name)
                m.forward = types.MethodType(_fid_block_a, m)
            for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
                m = getattr(net, name)
                m.forward = types.MethodType(_fid_block_c, m)
            net.Mixed_7b.forward = types.MethodType(lambda s, x: _fid_block_e(s, x, False), net.Mixed_7b)
            net.Mixed_7c.forward = types.MethodType(lambda s, x: _fid_block_e(s, x, True), net.Mixed_7c)
            self.description = f"Inception-v3 pool3, TF FID weights ({weights.name})"
        else:
            self.description = (f"Inception-v3 pool3, torchvision ImageNet weights ({weights.name}); "
                                "close to but not equal to the TF FID network")
        self.net = net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        # Both weight sets come from Google's Inception-v3, which takes inputs in [-1, 1]
        # (torchvision's transform_input maps ImageNet-normalised inputs to exactly that).
        x = images_u8.to(self.device(), torch.float32) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x * 2 - 1
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1).float()


# ---- the small segmentation CNN (FD-<domain>-seg)
def _conv_gn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class SegFeatureNet(nn.Module):
    """64x64 RGB -> per-pixel class logits; its embedding is the global average of the last
    two stages (16x16 and 8x8, 128 channels each) plus a 2x2 average of the last stage:
    768 dimensions that see both appearance and layout."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Sequential(_conv_gn(3, width), _conv_gn(width, width))          # 64
        self.s1 = _conv_gn(width, 2 * width, 2)                                        # 32
        self.s2 = nn.Sequential(_conv_gn(2 * width, 4 * width, 2), _conv_gn(4 * width, 4 * width))  # 16
        self.s3 = nn.Sequential(_conv_gn(4 * width, 4 * width, 2), _conv_gn(4 * width, 4 * width))  # 8
        self.head = nn.Conv2d(4 * width + 4 * width + 2 * width, num_classes, 1)

    def _stages(self, x: torch.Tensor):
        x0 = self.stem(x)
        x1 = self.s1(x0)
        x2 = self.s2(x1)
        x3 = self.s3(x2)
        return x1, x2, x3

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3 = self._stages(x)
        size = x1.shape[-2:]
        h = torch.cat([x1, F.interpolate(x2, size=size, mode="bilinear", align_corners=False),
                       F.interpolate(x3, size=size, mode="bilinear", align_corners=False)], 1)
        return F.interpolate(self.head(h), size=x.shape[-2:], mode="bilinear", align_corners=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        _, x2, x3 = self._stages(x)
        return torch.cat([x2.mean(dim=(2, 3)), x3.mean(dim=(2, 3)), F.adaptive_avg_pool2d(x3, 2).flatten(1)], 1)


def _to_net_input(images_u8: torch.Tensor) -> torch.Tensor:
    x = images_u8.to(torch.float32) / 127.5 - 1
    if x.shape[-1] != SEG_INPUT_RES:
        x = F.interpolate(x, size=(SEG_INPUT_RES, SEG_INPUT_RES), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > SEG_INPUT_RES)
    return x


class SegFeatureExtractor(FeatureExtractor):
    """Embedding of a trained `SegFeatureNet`; metric ``FD-<domain>-seg``."""

    def __init__(self, net: SegFeatureNet, domain: str):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.metric = f"FD-{domain}-seg"
        self.dims = 768
        self.description = (f"Fréchet distance in the features of a small CNN trained to segment the built-in "
                            f"'{domain}' domain (v{SEG_FEATURES_VERSION}); not FID")

    @torch.no_grad()
    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        dev = next(self.net.parameters()).device
        return self.net.embed(_to_net_input(images_u8.to(dev))).float()


def _render_seg_set(domain: str, count: int, seed: int, workers: int) -> Tuple[np.ndarray, np.ndarray, int]:
    from handsoff.domains import get_domain

    from .data import render_domain

    dom = get_domain(domain)
    images, seg = render_domain(domain, count, seed, SEG_INPUT_RES, workers=workers, with_seg=True,
                                progress=workers > 1, desc=f"rendering {domain} (feature CNN)")
    names = getattr(dom, "classes", None)
    valid = seg[seg != 255]
    top = int(valid.max()) + 1 if valid.size else 1
    return images, seg, max(len(names) if names else 0, top)


def train_seg_feature_net(domain: str = "heads", device: torch.device = torch.device("cpu"), steps: int = 300,
                          num_images: int = 1024, batch: int = 32, seed: int = 12345, workers: int = 1,
                          log: Optional[callable] = None) -> Tuple[SegFeatureNet, Dict]:
    """Train the feature CNN on ``num_images`` rendered images of ``domain`` (fixed seed)."""
    t0 = time.time()
    with _isolated_rng(device):
        images, seg, num_classes = _render_seg_set(domain, num_images, seed, workers)
        torch.manual_seed(seed)
        net = SegFeatureNet(num_classes).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        x_all = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
        y_all = torch.from_numpy(np.ascontiguousarray(seg)).long().to(device)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        loss_val = float("nan")
        for step in range(steps):
            idx = torch.randint(0, len(x_all), (batch,), generator=gen).to(device)
            x = _to_net_input(x_all[idx])
            if torch.rand((), generator=gen).item() < 0.5:  # flip for variety (labels flip with it)
                x, y = x.flip(3), y_all[idx].flip(2)
            else:
                y = y_all[idx]
            lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(net.segment(x), y, ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == steps - 1 or (log is not None and step % 100 == 0):
                loss_val = float(loss.detach())
                if log is not None:
                    log(f"feature CNN step {step}/{steps}: loss {loss_val:.3f}")
        net.eval()
    meta = {"version": SEG_FEATURES_VERSION, "domain": domain, "steps": steps, "num_images": num_images,
            "seed": seed, "num_classes": num_classes, "final_loss": loss_val, "train_seconds": time.time() - t0}
    return net, meta


def load_or_train_seg_extractor(domain: str, device: torch.device, cache_dirs: List[Path], steps: int = 300,
                                num_images: int = 1024, workers: int = 1,
                                log: Optional[callable] = None) -> SegFeatureExtractor:
    """The cached feature CNN for ``domain`` (first hit in ``cache_dirs``), else train and cache it."""
    name = f"fd-{domain}-seg-v{SEG_FEATURES_VERSION}-s{steps}-n{num_images}.pt"
    for d in cache_dirs:
        p = Path(d) / name
        if p.is_file():
            try:
                blob = torch.load(p, map_location="cpu", weights_only=True)
                net = SegFeatureNet(int(blob["meta"]["num_classes"]))
                net.load_state_dict(blob["state_dict"])
                _store(blob, [Path(c) / name for c in cache_dirs if not (Path(c) / name).exists()])
                return SegFeatureExtractor(net.to(device), domain)
            except Exception:  # noqa: BLE001 - damaged cache file: retrain
                continue
    if log is not None:
        log(f"training the {domain} segmentation CNN for FD-{domain}-seg ({steps} steps, cached afterwards)")
    net, meta = train_seg_feature_net(domain, device, steps=steps, num_images=num_images, workers=workers, log=log)
    blob = {"meta": meta, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    _store(blob, [Path(d) / name for d in cache_dirs])
    return SegFeatureExtractor(net, domain)


def _store(blob: Dict, paths: List[Path]) -> None:
    from handsoff.utils.io import atomic_path

    for p in paths:
        try:
            with atomic_path(p) as tmp:
                torch.save(blob, tmp)
        except OSError:
            pass  # an unwritable cache is not an error


def get_feature_extractor(device: torch.device, cache_dirs: List[Path], domain: str = "heads",
                          seg_steps: int = 300, seg_images: int = 1024, workers: int = 1,
                          log: Optional[callable] = None) -> Optional[FeatureExtractor]:
    """FID's Inception when its weights are on disk, else the domain segmentation CNN, else None."""
    found = find_inception_weights()
    if found is not None:
        try:
            return InceptionFeatureExtractor(*found).to(device)
        except Exception as err:  # noqa: BLE001 - fall back to the CNN, but say why
            if log is not None:
                log(f"cannot use Inception weights {found[0]} ({err}); using FD-{domain}-seg")
    try:
        with _isolated_rng(device):
            return load_or_train_seg_extractor(domain, device, cache_dirs, steps=seg_steps, num_images=seg_images,
                                               workers=workers, log=log)
    except ImportError as err:
        if log is not None:
            log(f"no quality figure: no Inception weights and no built-in domain ({err})")
        return None


# --------------------------------------------------------------------------- evaluation
def generated_uint8(G: nn.Module, num: int, batch: int, seed: int = 0x1234, truncation_psi: float = 1.0
                    ) -> Iterator[torch.Tensor]:
    """Yield uint8 ``[b, 3, H, W]`` batches of ``num`` samples from fixed latents (``seed``)."""
    device = next(G.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, num, batch):
        b = min(batch, num - s)
        z = torch.randn([b, G.z_dim], generator=gen).to(device)
        ws = G.mapping(z, None, truncation_psi=truncation_psi)
        img = G.synthesis(ws, noise_mode="const")
        yield (img.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class QualityEvaluator:
    """Fréchet distance between ``num_samples`` training images and as many samples of G.

    The real statistics are computed once and cached in ``cache_dir``.
    """

    def __init__(self, extractor: FeatureExtractor, real_images: np.ndarray, num_samples: int,
                 cache_dir: Optional[Path] = None, batch: int = 64):
        self.extractor = extractor
        self.real_images = real_images
        self.num_samples = int(num_samples)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch = batch
        self._real_stats: Optional[Tuple[np.ndarray, np.ndarray]] = None

    @property
    def metric(self) -> str:
        return self.extractor.metric

    def _features(self, batches) -> np.ndarray:
        return torch.cat([self.extractor(b).double().cpu() for b in batches]).numpy()

    def real_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._real_stats is not None:
            return self._real_stats
        from .data import sample_reals

        tag = f"{self.metric}-n{self.num_samples}-{len(self.real_images)}-r{self.real_images.shape[1]}"
        path = self.cache_dir / f"reals-{tag}.npz" if self.cache_dir is not None else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                self._real_stats = (z["mu"], z["sigma"])
                return self._real_stats
        reals = sample_reals(self.real_images, self.num_samples)
        device = self.extractor.device()
        batches = (torch.from_numpy(np.ascontiguousarray(reals[s:s + self.batch])).permute(0, 3, 1, 2).to(device)
                   for s in range(0, len(reals), self.batch))
        with _isolated_rng(device):
            self._real_stats = feature_statistics(self._features(batches))
        if path is not None:
            from handsoff.utils.io import atomic_path

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, mu=self._real_stats[0], sigma=self._real_stats[1])
        return self._real_stats

    @torch.no_grad()
    def evaluate(self, G: nn.Module) -> Dict[str, object]:
        t0 = time.time()
        device = next(G.parameters()).device
        mu_r, sig_r = self.real_stats()
        with _isolated_rng(device):
            feats = self._features(generated_uint8(G, self.num_samples, self.batch))
        value = frechet_distance_from_stats(*feature_statistics(feats), mu_r, sig_r)
        return {"metric": self.metric, "value": value, "num_samples": self.num_samples,
                "seconds": round(time.time() - t0, 2), "features": self.extractor.description}

