"""The StyleGAN2 training loop: losses, lazy regularisation, EMA, snapshots and resume.

One training step (NVlabs stylegan2-ada-pytorch phases, each with its own latents):

1. ``Gmain``: non-saturating loss ``softplus(-D(G(z)))``; Adam step on G.
2. ``Greg`` every ``pl_interval`` steps when ``pl_weight > 0``: path-length penalty on
   ``batch / pl_batch_shrink`` samples, scaled by ``pl_interval``; Adam step on G.
3. ``Dmain``: ``softplus(D(G(z))) + softplus(-D(x))``; Adam step on D.
4. ``Dreg`` every ``r1_interval`` steps: R1 ``gamma/2 * |grad_x D(x)|^2`` on real images,
   through ``torch.autograd.grad(create_graph=True)`` (double backward of the ops), scaled
   by ``r1_interval``; Adam step on D.
5. G_ema <- lerp(G, G_ema, beta), ``beta = 0.5 ** (batch / (ema_kimg * 1000))`` with the
   EMA horizon ramped up as ``min(ema_kimg * 1000, nimg * ema_rampup)``.

A lazily regularised network's Adam uses ``lr * c`` and ``betas ** c`` with
``c = interval / (interval + 1)``. Style mixing (per sample, probability
``style_mixing_prob``) swaps the ws after a random cut-off for those of a second latent.

Randomness comes only from the global torch (CPU and CUDA) generators, seeded per rank,
and from `DataOrder` (a pure function of seed and step). Snapshots store every generator
state of every rank, the optimizers, the networks and the step, so a resumed run repeats
an uninterrupted one exactly (bit for bit on the CPU; on CUDA up to the non-determinism
of cuDNN kernels). Sampling, evaluation and file writing never touch the training RNG.

Several GPUs: launch with ``torchrun --nproc_per_node=K``; each process trains on
``batch / K`` images, gradients are averaged with one all-reduce per phase over a flat
gradient buffer, and rank 0 writes all files.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from handsoff.errors import HandsoffError
from handsoff.utils.distributed import Ranks, device_for, process_group
from handsoff.utils.io import atomic_path

from ..discriminator import Discriminator, DiscriminatorConfig, count_parameters
from .config import TrainConfig
from .data import (DataOrder, DataSource, ImageStore, RenderIncomplete, cache_path, describe_size, load_images,
                   sample_reals)

__all__ = ["train_gan", "build_networks", "GANTrainer", "find_snapshots", "SNAPSHOT_FORMAT",
           "generator_config", "discriminator_config"]

SNAPSHOT_FORMAT = "handsoff-gan-training-state"
SNAPSHOT_VERSION = 1
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{6,})\.pt$")


# --------------------------------------------------------------------------- configs
def generator_config(cfg: TrainConfig, cuda: bool = True):
    from ..config import GeneratorConfig

    fp16 = cfg.mixed_precision and cuda
    return GeneratorConfig(img_resolution=cfg.resolution, z_dim=cfg.z_dim, w_dim=cfg.w_dim, c_dim=0,
                           mapping_layers=cfg.mapping_layers, channel_base=cfg.g_channel_base,
                           channel_max=cfg.g_channel_max, num_fp16_res=cfg.num_fp16_res if fp16 else 0,
                           conv_clamp=cfg.conv_clamp)


def discriminator_config(cfg: TrainConfig, cuda: bool = True) -> DiscriminatorConfig:
    fp16 = cfg.mixed_precision and cuda
    return DiscriminatorConfig(img_resolution=cfg.resolution, img_channels=3, channel_base=cfg.d_channel_base,
                               channel_max=cfg.d_channel_max, num_fp16_res=cfg.num_fp16_res if fp16 else 0,
                               conv_clamp=cfg.conv_clamp, mbstd_group_size=cfg.mbstd_group_size,
                               mbstd_num_channels=cfg.mbstd_num_channels)


def build_networks(cfg: TrainConfig, device: torch.device):
    """G, D and G_ema (a copy of G in eval mode), initialised from ``cfg.seed``."""
    from ..networks import Generator

    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        G = Generator(generator_config(cfg, cuda))
        D = Discriminator(discriminator_config(cfg, cuda))
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G.train().to(device), D.train().to(device), G_ema.to(device)


# --------------------------------------------------------------------------- gradients
class FlatGrads:
    """All parameter gradients of a module as views into one flat buffer: zeroing, the
    NaN/Inf guard and the multi-GPU all-reduce are one kernel each."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters()]
        total = sum(p.numel() for p in self.params)
        device = self.params[0].device
        self.buffer = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = self.buffer[offset:offset + n].view(p.shape)
            offset += n

    def zero(self) -> None:
        self.buffer.zero_()

    def finish(self, world: int) -> None:
        if world > 1:
            dist.all_reduce(self.buffer)
            self.buffer.div_(world)
        torch.nan_to_num(self.buffer, nan=0.0, posinf=1e5, neginf=-1e5, out=self.buffer)


def _adam(params, lr: float, betas, eps: float, interval: Optional[int], device: torch.device):
    c = 1.0 if not interval else interval / (interval + 1)
    kw: Dict[str, Any] = {}
    if device.type == "cuda":
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.Adam(params, lr=lr * c, betas=(betas[0] ** c, betas[1] ** c), eps=eps, **kw)


# --------------------------------------------------------------------------- RNG state
def _rng_state(device: torch.device) -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_all(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    random.seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


# --------------------------------------------------------------------------- files
def find_snapshots(run_dir: Path) -> List[Path]:
    """Snapshots in ``run_dir``, oldest first (by kimg in the name, then modification time)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _SNAPSHOT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p.stat().st_mtime, p))
    return [p for _, _, p in sorted(found)]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


class _Log:
    def __init__(self, path: Optional[Path], bar=None):
        self.path = path
        self.bar = bar

    def event(self, **record: Any) -> None:
        if self.path is None:
            return
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def say(self, msg: str) -> None:
        if self.path is None:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


# --------------------------------------------------------------------------- the trainer
class GANTrainer:
    """Holds the networks, optimizers, data and schedule of one process of a training run.

    Most users call `train_gan`; the class is public so tests and tools can step it.
    """

    def __init__(self, cfg: TrainConfig, images: np.ndarray, device: torch.device, dist_info: Optional[Ranks] = None):
        dist_info = dist_info if dist_info is not None else Ranks()
        self.cfg = cfg.resolved()
        self.device = device
        self.dist = dist_info
        c = self.cfg
        if c.batch % dist_info.world:
            raise HandsoffError(f"--batch {c.batch} is not divisible by the {dist_info.world} processes")
        self.local_batch = c.batch // dist_info.world
        group = min(c.mbstd_group_size, self.local_batch) if c.mbstd_group_size else self.local_batch
        if self.local_batch % max(group, 1):
            raise HandsoffError(f"per-process batch {self.local_batch} is not a multiple of the minibatch-stddev "
                                f"group size {group}")
        self.G, self.D, self.G_ema = build_networks(c, device)
        self.num_ws = self.G.num_ws
        self.g_grads = FlatGrads(self.G)
        self.d_grads = FlatGrads(self.D)
        self.pl_enabled = c.pl_weight > 0
        self.opt_G = _adam(self.G.parameters(), c.lr_g, c.betas, c.adam_eps,
                           c.pl_interval if self.pl_enabled else None, device)
        self.opt_D = _adam(self.D.parameters(), c.lr_d, c.betas, c.adam_eps,
                           c.r1_interval if c.r1_gamma_value > 0 else None, device)
        self.pl_mean = torch.zeros([], device=device)
        self.ema_pairs = (list(self.G_ema.parameters()), list(self.G.parameters()))
        self.ema_buffers = (list(self.G_ema.buffers()), list(self.G.buffers()))
        self.images = images
        self.order = DataOrder(len(images), c.seed, c.batch, dist_info.rank, dist_info.world)
        self.store = ImageStore(images, device)
        self.step = 0
        self.cur_nimg = 0
        self._ws_index = torch.arange(self.num_ws, device=device).view(1, -1)
        self._stats: Dict[str, torch.Tensor] = {}
        self._stat_counts: Dict[str, int] = {}
        _seed_all(c.seed * dist_info.world + dist_info.rank, device)

    # ----------------------------------------------------------------- statistics (no host sync)
    def _acc(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float().mean()
        if name in self._stats:
            self._stats[name] += v
            self._stat_counts[name] += 1
        else:
            self._stats[name] = v.clone()
            self._stat_counts[name] = 1

    def pop_stats(self) -> Dict[str, float]:
        """Means since the last call (one host synchronisation)."""
        if not self._stats:
            return {}
        names = list(self._stats)
        values = torch.stack([self._stats[n] for n in names]).cpu().tolist()
        out = {n: v / self._stat_counts[n] for n, v in zip(names, values)}
        self._stats, self._stat_counts = {}, {}
        return out

    # ----------------------------------------------------------------- forward helpers
    def run_G(self, z: torch.Tensor, update_emas: bool = False):
        G = self.G
        ws = G.mapping(z, None, update_emas=update_emas)
        p = self.cfg.style_mixing_prob
        if p > 0:
            n = z.shape[0]
            cutoff = torch.randint(1, self.num_ws, (n, 1), device=z.device)
            cutoff = torch.where(torch.rand((n, 1), device=z.device) < p, cutoff, torch.full_like(cutoff, self.num_ws))
            ws_mix = G.mapping(torch.randn_like(z), None, update_emas=False)
            ws = torch.where((self._ws_index >= cutoff).unsqueeze(-1), ws_mix, ws)
        img = G.synthesis(ws, noise_mode="random")
        return img, ws

    def _z(self, n: int) -> torch.Tensor:
        return torch.randn([n, self.cfg.z_dim], device=self.device)

    def r1_penalty(self, real: torch.Tensor):
        """``(logits, |grad_x D(x)|^2 per sample)`` with a graph for the D-weight gradient."""
        real = real.detach().requires_grad_(True)
        logits = self.D(real)
        (grad,) = torch.autograd.grad(outputs=[logits.sum()], inputs=[real], create_graph=True, only_inputs=True)
        return logits, grad.square().sum(dim=[1, 2, 3])

    # ----------------------------------------------------------------- one step
    def train_step(self) -> None:
        c = self.cfg
        step = self.step
        b = self.local_batch
        G, D = self.G, self.D
        world = self.dist.world

        nxt = self.order.indices(step + 1) if not self.store.on_device else None
        real = self.store.batch(self.order.indices(step), step=step, next_idx=nxt)
        if c.xflip:
            flip = torch.rand((b, 1, 1, 1), device=self.device) < 0.5
            real = torch.where(flip, real.flip(3), real)

        # Gmain
        G.requires_grad_(True)
        D.requires_grad_(False)
        self.g_grads.zero()
        img, _ = self.run_G(self._z(b))
        logits = D(img)
        loss_G = F.softplus(-logits)
        loss_G.mean().backward()
        self.g_grads.finish(world)
        self.opt_G.step()
        self._acc("loss_G", loss_G)
        self._acc("D_fake_logit", logits)

        # Greg: path length
        if self.pl_enabled and step % c.pl_interval == 0:
            self.g_grads.zero()
            n = max(b // c.pl_batch_shrink, 1)
            img, ws = self.run_G(self._z(n))
            noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
            (g,) = torch.autograd.grad(outputs=[(img * noise).sum()], inputs=[ws], create_graph=True, only_inputs=True)
            lengths = g.square().sum(2).mean(1).sqrt()
            pl_mean = self.pl_mean.lerp(lengths.mean(), c.pl_decay)
            self.pl_mean.copy_(pl_mean.detach())
            penalty = (lengths - pl_mean).square()
            (img[:, 0, 0, 0] * 0 + penalty * c.pl_weight).mean().mul(c.pl_interval).backward()
            self.g_grads.finish(world)
            self.opt_G.step()
            self._acc("pl_penalty", penalty)

        # Dmain
        G.requires_grad_(False)
        D.requires_grad_(True)
        self.d_grads.zero()
        with torch.no_grad():
            img, _ = self.run_G(self._z(b), update_emas=True)
        logits_fake = D(img)
        loss_fake = F.softplus(logits_fake)
        loss_fake.mean().backward()
        logits_real = D(real)
        loss_real = F.softplus(-logits_real)
        loss_real.mean().backward()
        self.d_grads.finish(world)
        self.opt_D.step()
        self._acc("loss_D", loss_fake + loss_real)
        self._acc("D_real_logit", logits_real)

        # Dreg: lazy R1
        gamma = c.r1_gamma_value
        if gamma > 0 and step % c.r1_interval == 0:
            self.d_grads.zero()
            logits_r1, penalty = self.r1_penalty(real)
            (logits_r1.squeeze(1) * 0 + penalty * (gamma / 2)).mean().mul(c.r1_interval).backward()
            self.d_grads.finish(world)
            self.opt_D.step()
            self._acc("r1_penalty", penalty)
        D.requires_grad_(False)

        # G_ema
        self.update_ema()
        self.step += 1
        self.cur_nimg += c.batch

    @torch.no_grad()
    def update_ema(self) -> None:
        c = self.cfg
        ema_nimg = c.ema_kimg_value * 1000
        if c.ema_rampup:
            ema_nimg = min(ema_nimg, self.cur_nimg * c.ema_rampup)
        beta = 0.5 ** (c.batch / max(ema_nimg, 1e-8))
        ema_p, p = self.ema_pairs
        torch._foreach_lerp_(ema_p, p, 1.0 - beta)
        ema_b, buf = self.ema_buffers
        torch._foreach_copy_(ema_b, buf)

    # ----------------------------------------------------------------- state
    def state_dict(self, all_rng: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION,
            "config": self.cfg.to_dict(),
            "G_config": self.G.config.to_dict(), "D_config": self.D.config.to_dict(),
            "step": self.step, "cur_nimg": self.cur_nimg, "world_size": self.dist.world,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(),
            "pl_mean": self.pl_mean.detach().clone(),
            "rng": all_rng if all_rng is not None else [_rng_state(self.device)],
            "data_order": self.order.state(self.step),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != SNAPSHOT_FORMAT:
            raise HandsoffError("not a handsoff GAN training snapshot")
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.G_ema.load_state_dict(state["G_ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        # Adam's load_state_dict keeps our flat-gradient views: it only touches optimizer state.
        self.pl_mean.copy_(state["pl_mean"])
        self.step = int(state["step"])
        self.cur_nimg = int(state["cur_nimg"])
        rngs = state["rng"]
        if len(rngs) == self.dist.world:
            _set_rng_state(rngs[self.dist.rank], self.device)
        else:
            _seed_all(self.cfg.seed * self.dist.world + self.dist.rank + 7919 * self.step, self.device)

    def init_generator_from(self, path: Path) -> None:
        """Start G and G_ema from the weights of a generator file of the same architecture."""
        from ..checkpoints import load_generator_state

        config, state, _ = load_generator_state(path)
        if config.to_dict() != self.G.config.to_dict():
            raise HandsoffError(f"{path}: its architecture differs from this run's generator "
                                "(compare its config with the --channel-base/--z-dim/... options)")
        self.G.load_state_dict(state)
        self.G_ema.load_state_dict(state)

    def gather_rng(self) -> List[Dict[str, Any]]:
        mine = _rng_state(self.device)
        if self.dist.world == 1:
            return [mine]
        cpu_mine = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in mine.items()}
        out: List[Any] = [None] * self.dist.world
        dist.all_gather_object(out, cpu_mine)
        return out


# --------------------------------------------------------------------------- run directory
def _samples_grid_size(resolution: int) -> int:
    return 64 if resolution <= 128 else 32 if resolution <= 256 else 16


def _grid(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one square-ish grid picture."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for i, img in enumerate(images):
        y, x = 2 + (i // cols) * (h + 2), 2 + (i % cols) * (w + 2)
        grid[y:y + h, x:x + w] = img
    return grid


def _write_png(path: Path, picture: np.ndarray) -> None:
    """PNG through Pillow (handsoff.utils.images), or OpenCV where Pillow is missing."""
    try:
        from handsoff.utils.images import save_png
    except ImportError:
        import cv2

        with atomic_path(path) as tmp:
            ok, buf = cv2.imencode(".png", np.ascontiguousarray(picture[..., ::-1]))
            if not ok:
                raise OSError(f"{path}: cannot encode PNG")
            tmp.write_bytes(buf.tobytes())
        return
    save_png(path, picture)


@torch.no_grad()
def _save_samples(G_ema: nn.Module, path: Path, count: int) -> None:
    """Grid of G_ema images for seeds 0..count-1 (NVlabs seed convention, constant noise)."""
    from ..sampling import z_from_seeds

    device = next(G_ema.parameters()).device
    z = z_from_seeds(list(range(count)), G_ema.z_dim).to(device)
    imgs = []
    for s in range(0, count, 32):
        ws = G_ema.mapping(z[s:s + 32], None)
        img = G_ema.synthesis(ws, noise_mode="const").float()
        imgs.append((img * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    _write_png(path, _grid(torch.cat(imgs).numpy()))


def _save_reals(images: np.ndarray, path: Path, count: int) -> None:
    _write_png(path, _grid(sample_reals(images, min(count, len(images)), seed=1)))


def _prune_snapshots(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    snaps = find_snapshots(run_dir)
    for p in snaps[:-keep]:
        p.unlink(missing_ok=True)


def _crossed(prev_nimg: int, cur_nimg: int, every_kimg: float) -> bool:
    if not every_kimg or every_kimg <= 0:
        return False
    every = every_kimg * 1000
    return int(cur_nimg // every) > int(prev_nimg // every)


def _load_stored_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HandsoffError(f"{p}: cannot read ({err})") from err


def _check_compatible(cfg: TrainConfig, stored: Dict[str, Any], source: DataSource, run_dir: Path) -> None:
    old = TrainConfig.from_dict(stored["train"])
    diff = cfg.trajectory_differences(old)
    if diff:
        lines = ", ".join(f"{k}: run has {a_old!r}, now {a_new!r}" for k, (a_new, a_old) in sorted(diff.items()))
        raise HandsoffError(f"{run_dir}: cannot resume with different settings ({lines}); "
                            "use a new --out folder or the original settings")
    if "data" in stored and not source.same_as(stored["data"]):
        raise HandsoffError(f"{run_dir}: cannot resume on different data (run used {stored['data']}, "
                            f"now {source.describe()})")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (with a snapshot)."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- entry point
def train_gan(config: TrainConfig, run_dir: Union[str, Path], data: Any, resume: Union[bool, str, Path] = "auto", *,
              device: str = "auto", time_limit: Optional[float] = None, stop_at_kimg: Optional[float] = None,
              max_steps: Optional[int] = None, progress: bool = True, seg_feature_steps: int = 300,
              seg_feature_images: int = 1024, log_fn: Optional[Callable[[str], None]] = None,
              init_generator: Optional[Union[str, Path]] = None,
              state_file: Optional[Union[str, Path]] = None) -> Path:
    """Train a StyleGAN2 (G, D, G_ema) on ``data``; returns the path of ``G_ema-latest.safetensors``
    (written at every snapshot; absent only if the time limit ran out before the first one).

    Args:
        config: Hyper-parameters (see `TrainConfig`).
        run_dir: Output folder: config.json, snapshot-KKKKKK.pt, G_ema-latest.safetensors,
            G_ema-best.safetensors (lowest quality figure so far), samples-KKKKKK.png, reals.png,
            log.jsonl, quality/ (feature CNN, real statistics, best.json) and cache/ (the data).
        data: A `DataSource`, a folder path, ``"domain:NAME"`` or a uint8 array ``[N, H, W, 3]``.
        resume: ``"auto"``: continue from the newest snapshot in ``run_dir`` if there is
            one; ``True``: the same but a snapshot must exist; ``False``: start anew (an
            error if ``run_dir`` already holds snapshots); a path: continue from that snapshot.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` (torchrun ranks use LOCAL_RANK).
        time_limit: Wall-clock budget in seconds, counted from this call (setup, rendering and
            evaluation included): past it the run writes a snapshot after the current step and
            returns; calling again continues. Leave a margin for the final snapshot and exit.
        stop_at_kimg / max_steps: Stop (with a snapshot) at this many kimg / steps in total,
            before ``total_kimg``; the run can be resumed to ``total_kimg`` later.
        progress: Show progress bars.
        seg_feature_steps / seg_feature_images: Training steps and rendered 64x64 images of the
            FD feature CNN (used when no Inception weights exist).
        init_generator: A generator file whose weights start G and G_ema of a fresh run (its
            architecture must be the run's); D and the optimizers start anew. Ignored on resume.
        state_file: One file that always holds the newest snapshot (replaced atomically at each
            one), for runs that continue on another machine: a run whose ``run_dir`` has no
            snapshot resumes from it (with ``resume="auto"``). Keep it in version control.
    """
    run_dir = Path(run_dir)
    source = DataSource.coerce(data)
    # The trainer stops gracefully on SIGTERM itself (a snapshot first), so the group keeps the
    # default handler out of the way.
    with process_group(device, sigterm=False) as d:
        return _train(config, run_dir, source, resume, d, device, time_limit, stop_at_kimg, max_steps, progress,
                      seg_feature_steps, seg_feature_images, log_fn,
                      Path(init_generator) if init_generator is not None else None,
                      Path(state_file) if state_file is not None else None)


def _train(config: TrainConfig, run_dir: Path, source: DataSource, resume, d: Ranks, device_name: str,
           time_limit: Optional[float], stop_at_kimg: Optional[float], max_steps: Optional[int], progress: bool,
           seg_feature_steps: int, seg_feature_images: int, log_fn: Optional[Callable[[str], None]],
           init_generator: Optional[Path] = None, state_file: Optional[Path] = None) -> Path:
    from tqdm.auto import tqdm

    from ..checkpoints import save_generator

    t_start = time.time()
    device = device_for(device_name, d)
    cfg = config.resolved()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32

    # ---- which snapshot, and is the folder ours?
    snapshot_path: Optional[Path] = None
    stored = _load_stored_config(run_dir)
    snapshots = find_snapshots(run_dir)
    if isinstance(resume, (str, Path)) and str(resume) != "auto":
        snapshot_path = Path(resume)
        if not snapshot_path.is_file():
            raise HandsoffError(f"{snapshot_path}: no such snapshot")
    elif resume is True or resume == "auto":
        if snapshots:
            snapshot_path = snapshots[-1]
        elif state_file is not None and state_file.is_file():
            snapshot_path = state_file
        elif resume is True:
            raise HandsoffError(f"{run_dir}: nothing to resume (no snapshot-*.pt)")
    elif snapshots:
        raise HandsoffError(f"{run_dir}: already holds a training run ({snapshots[-1].name}); "
                            "resume it or choose another --out folder")
    if stored is not None and (snapshot_path is not None or snapshots):
        _check_compatible(cfg, stored, source, run_dir)

    log_path = run_dir / "log.jsonl" if d.main else None
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(log_path)
    say = log_fn or log.say

    # ---- data (rank 0 builds the cache; the others wait and read it)
    cache_dir = run_dir / "cache"
    deadline = t_start + time_limit if time_limit is not None else None
    workers = _render_workers(cfg) if source.kind == "domain" else max(cfg.num_workers, 1)
    if d.world > 1 and not d.main and source.kind != "array":
        # rank 0 decodes/renders into the cache (can take long: no collective timeout), the others wait
        target = cache_path(source, cfg.resolution, cache_dir)
        while not target.exists():
            if deadline is not None and time.time() >= deadline:
                return run_dir / "G_ema-latest.safetensors"
            time.sleep(2.0)
    try:
        images = load_images(source, cfg.resolution, cache_dir=None if source.kind == "array" else cache_dir,
                             workers=workers, progress=progress and d.main, deadline=deadline)
    except RenderIncomplete as err:
        say(f"handsoff train-gan: {err}")
        log.event(event="stop", reason="time_limit_while_rendering", rendered=err.done, total=err.total)
        return run_dir / "G_ema-latest.safetensors"

    trainer = GANTrainer(cfg, images, device, d)
    if snapshot_path is not None:
        state = torch.load(snapshot_path, map_location="cpu", weights_only=True)
        if state.get("world_size", 1) != d.world and d.main:
            say(f"warning: the snapshot was written by {state.get('world_size')} processes, now {d.world}: "
                "the run continues but will not repeat an uninterrupted run exactly")
        trainer.load_state_dict(state)
        del state
    elif init_generator is not None:
        trainer.init_generator_from(init_generator)

    if d.main:
        _write_json(run_dir / "config.json", {
            "train": config.to_dict(), "resolved": cfg.to_dict(),
            "generator": trainer.G.config.to_dict(), "discriminator": trainer.D.config.to_dict(),
            "data": source.describe(), "num_images": int(len(images)), "world_size": d.world,
            "device": str(device), "torch": torch.__version__,
        })
        if not (run_dir / "reals.png").exists():
            _save_reals(images, run_dir / "reals.png", _samples_grid_size(cfg.resolution))

    total_nimg = cfg.total_nimg
    stop_nimg = total_nimg
    if stop_at_kimg is not None:
        stop_nimg = min(stop_nimg, int(math.ceil(stop_at_kimg * 1000)))
    if max_steps is not None:
        stop_nimg = min(stop_nimg, max_steps * cfg.batch)

    evaluator = None
    if d.main and cfg.fd_samples > 0:
        from .quality import QualityEvaluator, get_feature_extractor

        extractor = get_feature_extractor(device, [run_dir / "quality", _user_cache()],
                                          domain=source.domain if source.kind == "domain" else "heads",
                                          seg_steps=seg_feature_steps, seg_images=seg_feature_images,
                                          workers=_render_workers(cfg), log=say)
        if extractor is not None:
            evaluator = QualityEvaluator(extractor, images, min(cfg.fd_samples, max(len(images), 2)),
                                         cache_dir=run_dir / "quality")

    if d.main:
        say(f"handsoff train-gan: {run_dir}  device {device} x{d.world}  "
            f"G {count_parameters(trainer.G) / 1e6:.2f}M  D {count_parameters(trainer.D) / 1e6:.2f}M params  "
            f"data {len(images)} images {cfg.resolution}px ({describe_size(trainer.store.nbytes)}, "
            f"{'on device' if trainer.store.on_device else 'host memory'})  batch {cfg.batch}  "
            f"r1_gamma {cfg.r1_gamma_value:g}  ema_kimg {cfg.ema_kimg_value:g}"
            + (f"  resuming {snapshot_path.name} at {trainer.cur_nimg / 1000:.1f} kimg" if snapshot_path else ""))
        log.event(event="resume" if snapshot_path else "start", kimg=trainer.cur_nimg / 1000, step=trainer.step,
                  snapshot=snapshot_path.name if snapshot_path else None, world_size=d.world, device=str(device))

    bar = tqdm(total=total_nimg, initial=trainer.cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True,
               disable=not (progress and d.main), desc="train-gan",
               mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.05)
    log.bar = bar

    def write_snapshot(reason: str, evaluate: bool) -> None:
        rngs = trainer.gather_rng()  # collective: every rank calls write_snapshot at the same step
        if not d.main:
            return
        kimg = trainer.cur_nimg // 1000
        path = run_dir / f"snapshot-{kimg:06d}.pt"
        t0 = time.time()
        with atomic_path(path) as tmp:
            torch.save(trainer.state_dict(rngs), tmp)
        save_generator(trainer.G_ema, run_dir / "G_ema-latest.safetensors",
                       extra_metadata={"kimg": f"{trainer.cur_nimg / 1000:.3f}", "step": str(trainer.step),
                                       "trained_by": "handsoff train-gan"})
        _prune_snapshots(run_dir, cfg.keep_snapshots)
        if state_file is not None:
            state_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(state_file) as tmp:
                tmp.write_bytes(path.read_bytes())
        rec: Dict[str, Any] = {"event": "snapshot", "reason": reason, "kimg": trainer.cur_nimg / 1000,
                               "step": trainer.step, "file": path.name,
                               "seconds": round(time.time() - t0, 2)}
        if evaluate and evaluator is not None:
            q = evaluator.evaluate(trainer.G_ema)
            rec["quality"] = {q["metric"]: q["value"]}
            log.event(event="quality", kimg=trainer.cur_nimg / 1000, step=trainer.step, **q)
            best_path = run_dir / "quality" / "best.json"
            best = json.loads(best_path.read_text()) if best_path.is_file() else None
            is_best = best is None or best.get("metric") != q["metric"] or q["value"] < best["value"]
            if is_best and math.isfinite(q["value"]):
                save_generator(trainer.G_ema, run_dir / "G_ema-best.safetensors",
                               extra_metadata={"kimg": f"{trainer.cur_nimg / 1000:.3f}", "step": str(trainer.step),
                                               q["metric"]: f"{q['value']:.4f}", "trained_by": "handsoff train-gan"})
                _write_json(best_path, {"metric": q["metric"], "value": q["value"], "kimg": trainer.cur_nimg / 1000,
                                        "step": trainer.step})
            say(f"kimg {trainer.cur_nimg / 1000:.1f}: {q['metric']} {q['value']:.3f} "
                f"({q['num_samples']} samples, {q['seconds']:.0f} s){'  (best so far)' if is_best else ''}")
        log.event(**rec)

    stop = _StopFlag()
    reason = "done" if trainer.cur_nimg >= total_nimg else "stop_at"
    tick = {"nimg": trainer.cur_nimg, "time": time.time()}

    def log_tick(now: float) -> None:
        stats = trainer.pop_stats()  # the one host synchronisation per tick
        if not d.main or not stats:
            return
        cur = trainer.cur_nimg
        speed = (cur - tick["nimg"]) / max(now - tick["time"], 1e-9)
        rec = {"event": "tick", "kimg": round(cur / 1000, 3), "step": trainer.step, "img_per_s": round(speed, 2),
               "sec_per_kimg": round(1000 / max(speed, 1e-9), 3), **{k: round(v, 5) for k, v in stats.items()}}
        if device.type == "cuda":
            rec["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        log.event(**rec)
        bar.set_postfix_str(f"kimg {cur / 1000:.1f} {speed:.0f} img/s G {stats.get('loss_G', float('nan')):.3f} "
                            f"D {stats.get('loss_D', float('nan')):.3f}", refresh=False)
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad:
            say(f"warning: non-finite {', '.join(bad)} at kimg {cur / 1000:.1f}")
        tick["nimg"], tick["time"] = cur, now

    with stop:
        try:
            while trainer.cur_nimg < stop_nimg:
                prev = trainer.cur_nimg
                trainer.train_step()
                cur = trainer.cur_nimg
                bar.update(cur - prev)
                now = time.time()

                # Ticks come every tick_kimg (and, in a single process, at least once a minute).
                # Stop requests (time limit, SIGINT/SIGTERM) are honoured after any step in a single
                # process, and at ticks, agreed by all ranks, with several.
                is_tick = _crossed(prev, cur, cfg.tick_kimg) or (d.world == 1 and now - tick["time"] > 60)
                want_stop = stop.requested is not None or (deadline is not None and now >= deadline)
                if d.world > 1:
                    want_stop = want_stop and is_tick
                    if is_tick:
                        flag = torch.tensor([1.0 if want_stop else 0.0], device=device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        want_stop = bool(flag.item())
                if is_tick:
                    log_tick(now)

                if d.main and _crossed(prev, cur, cfg.sample_kimg):
                    _save_samples(trainer.G_ema, run_dir / f"samples-{cur // 1000:06d}.png",
                                  _samples_grid_size(cfg.resolution))
                done = cur >= total_nimg
                if _crossed(prev, cur, cfg.snapshot_kimg) or done:
                    write_snapshot("done" if done else "schedule", evaluate=True)
                elif cur >= stop_nimg or want_stop:
                    write_snapshot("stop_at" if cur >= stop_nimg else (stop.requested or "time_limit"),
                                   evaluate=False)
                if done:
                    reason = "done"
                elif want_stop:
                    reason = stop.requested or "time_limit"
                    break
                elif cur >= stop_nimg:
                    reason = "stop_at"
            log_tick(time.time())
        finally:
            bar.close()
            trainer.store.close()

    if d.main:
        if not (run_dir / f"samples-{trainer.cur_nimg // 1000:06d}.png").exists():
            _save_samples(trainer.G_ema, run_dir / f"samples-{trainer.cur_nimg // 1000:06d}.png",
                          _samples_grid_size(cfg.resolution))
        done = trainer.cur_nimg >= total_nimg
        log.event(event="stop", reason=reason, kimg=trainer.cur_nimg / 1000, step=trainer.step,
                  wall_seconds=round(time.time() - t_start, 1))
        say(f"{'finished' if done else 'stopped'} at {trainer.cur_nimg / 1000:.1f} kimg "
            f"(step {trainer.step}, {reason}); "
            + ("" if done else "rerun without --stop-at-kimg (or with a larger value) to continue; "
               if reason == "stop_at" else f"rerun the same command to continue to {cfg.total_kimg:g} kimg; ")
            + f"generator: {run_dir / 'G_ema-latest.safetensors'}")
    return run_dir / "G_ema-latest.safetensors"


def _render_workers(cfg: TrainConfig) -> int:
    """Processes that render a built-in domain: --domain-workers, else one per core."""
    if cfg.domain_workers:
        return cfg.domain_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _user_cache() -> Path:
    from .quality import user_cache_dir

    return user_cache_dir()

