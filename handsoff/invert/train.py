"""Training the inversion encoder in two stages (the EditGAN/HandsOff recipe, DESIGN.md section 4).

Stage 1, supervised: z is sampled, mapped to ws (a truncation psi drawn per image from
`PSI_RANGE`, and style mixing with probability `MIX_PROB`: a second z's ws from a random layer
on), and rendered as x = G(ws); the encoder learns ws from x with a latent MSE (in units of the
generator's w spread) plus a pixel MSE of G(E(x)) against x. Pairs stream from G; nothing is
stored.

Stage 2, LPIPS fine-tune: LPIPS(G(E(x)), x) + pixel MSE, plus the latent term on generated x,
for a fixed number of steps (the cap is part of the method: longer fine-tuning drifts away
from W+ regions G renders well). When real images are given, half of every batch is real.

Both stages use Adam with a short linear warm-up and a cosine decay to a tenth of the rate.
The same seed gives the same encoder on the same device; a run that writes a checkpoint
(``checkpoint_path``) continues from it, when restarted with the same settings, exactly as if
it had not stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from handsoff.errors import HandsoffError
from handsoff.invert.encoder import Encoder
from handsoff.utils.io import atomic_path

__all__ = ["fit_encoder", "synthesize", "StageSettings", "SUPERVISED", "LPIPS_FINETUNE",
           "sample_training_pairs", "images_to_tensor", "PSI_RANGE", "MIX_PROB"]

PathLike = Union[str, "os.PathLike[str]"]

#: Truncation psi of stage-1 samples, drawn uniformly per image: the encoder sees both typical
#: (truncated, as generated corpora use psi 0.7) and diverse (psi 1) images.
PSI_RANGE = (0.5, 1.0)
#: Probability that a stage-1 sample mixes two ws (teaches W+, not only W).
MIX_PROB = 0.5
_WARMUP = 0.02
_FINAL_LR = 0.1
_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class StageSettings:
    """Learning rate and loss weights of one training stage."""

    name: str
    lr: float
    latent_weight: float
    pixel_weight: float
    lpips_weight: float


SUPERVISED = StageSettings("supervised", lr=1e-3, latent_weight=1.0, pixel_weight=1.0, lpips_weight=0.0)
LPIPS_FINETUNE = StageSettings("lpips", lr=1e-4, latent_weight=0.5, pixel_weight=1.0, lpips_weight=1.0)


def images_to_tensor(images: np.ndarray, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float32 ``[N, 3, H, W]`` in [-1, 1] (the generator's range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def synthesize(G: nn.Module, ws: torch.Tensor) -> torch.Tensor:
    """``G``'s images of ``ws`` ``[N, num_ws, w_dim]`` as inversion sees them: float ``[N, 3, R, R]``, const noise.

    Differentiable (with respect to ``ws`` and G's parameters); every inversion and tuning loss uses it.
    """
    # fused_modconv=False: the same images, but its backward pass is about 1.5x faster on the CPU.
    return G.synthesis(ws, noise_mode="const", fused_modconv=False)


@torch.no_grad()
def sample_training_pairs(G: nn.Module, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` stage-1 pairs: ws float ``[B, num_ws, w_dim]`` and images ``G(ws)`` ``[B, 3, R, R]`` in [-1, 1].

    All random numbers come from ``gen`` (a CPU generator), so the pairs are the same on every device.
    """
    device = G.mapping.w_avg.device
    z = torch.randn(2 * batch, G.z_dim, generator=gen)
    psi = PSI_RANGE[0] + (PSI_RANGE[1] - PSI_RANGE[0]) * torch.rand(batch, generator=gen)
    mix = torch.rand(batch, generator=gen) < MIX_PROB
    cut = torch.randint(1, max(G.num_ws, 2), (batch,), generator=gen)
    w = G.mapping(z.to(device), None)
    w_avg = G.mapping.w_avg
    w = w_avg + psi.repeat(2).to(device)[:, None, None] * (w - w_avg)
    second = mix[:, None] & (torch.arange(G.num_ws)[None] >= cut[:, None])
    ws = torch.where(second.to(device)[:, :, None], w[batch:], w[:batch])
    return ws, synthesize(G, ws)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over the first 2% of the steps, then cosine decay to a tenth."""
    warm = min(1.0, (step + 1) / max(1.0, _WARMUP * total))
    cosine = 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    return warm * (_FINAL_LR + (1 - _FINAL_LR) * cosine)


def _stage_losses(encoder: Encoder, G: nn.Module, x: torch.Tensor, w_true: Optional[torch.Tensor],
                  settings: StageSettings, lpips: Optional[nn.Module]) -> dict[str, torch.Tensor]:
    """Weighted total ``loss`` and its parts; ``w_true`` belongs to the first rows of ``x``."""
    ws = encoder(x)
    img = synthesize(G, ws)
    parts: dict[str, torch.Tensor] = {"pixel": (img - x).square().mean()}
    if w_true is not None and settings.latent_weight:
        parts["latent"] = ((ws[:len(w_true)] - w_true) / encoder.w_scale).square().mean()
    if settings.lpips_weight:
        assert lpips is not None
        parts["lpips"] = lpips(img, x).mean()
    weights = {"pixel": settings.pixel_weight, "latent": settings.latent_weight, "lpips": settings.lpips_weight}
    parts["loss"] = sum(weights[k] * v for k, v in parts.items())
    return parts


# ---------------------------------------------------------------------------------------------
# The training loop (shared by both stages), with checkpoints

@dataclass
class _Stage:
    settings: StageSettings
    steps: int
    batch_fn: Callable[[torch.Generator], tuple[torch.Tensor, Optional[torch.Tensor]]]  # -> (x, w_true)


@dataclass
class _Progress:
    """Everything a checkpoint needs besides the encoder's and optimizer's state."""

    stage: int = 0
    step: int = 0
    records: list = dataclasses.field(default_factory=list)
    seconds: dict = dataclasses.field(default_factory=dict)


def _stage_generator(seed: int, stage: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stage]).generate_state(1)[0]))


def _save_checkpoint(path: Path, encoder: Encoder, opt: torch.optim.Optimizer, gen: torch.Generator,
                     progress: _Progress, settings_key: str) -> None:
    state = {"version": _CHECKPOINT_VERSION, "settings": settings_key, "encoder": encoder.state_dict(),
             "optimizer": opt.state_dict(), "rng": gen.get_state(), "stage": progress.stage, "step": progress.step,
             "records": json.dumps(progress.records), "seconds": json.dumps(progress.seconds)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, settings_key: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read means the same thing to the user
        raise HandsoffError(f"{path}: unreadable training checkpoint ({' '.join(str(err).split())[:160]}); "
                            "delete it to start afresh") from None
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
        raise HandsoffError(f"{path}: not a handsoff encoder training checkpoint; delete it to start afresh")
    if state.get("settings") != settings_key:
        raise HandsoffError(f"{path}: checkpoint of a run with other settings; rerun with the same settings "
                            "to continue it, or delete it to start afresh")
    return state


def _train_step(encoder: Encoder, G: nn.Module, stage: _Stage, opt: torch.optim.Optimizer, gen: torch.Generator,
                step: int, lpips: Optional[nn.Module]) -> dict[str, float]:
    """One optimizer step of ``stage``; returns the loss values."""
    for group in opt.param_groups:
        group["lr"] = stage.settings.lr * _lr_factor(step, stage.steps)
    x, w_true = stage.batch_fn(gen)
    parts = _stage_losses(encoder, G, x, w_true, stage.settings, lpips)
    opt.zero_grad(set_to_none=True)
    params = [p for group in opt.param_groups for p in group["params"]]
    parts["loss"].backward(inputs=params)  # gradients for the encoder only, never for G
    opt.step()
    return {k: float(v.detach()) for k, v in parts.items()}


def _run_stages(encoder: Encoder, G: nn.Module, stages: list[_Stage], *, seed: int, lpips: Optional[nn.Module],
                show_progress: bool, log_every: int, checkpoint_path: Optional[Path], checkpoint_every: int,
                settings_key: str, on_stage_end: Optional[Callable[[str, Encoder], None]]) -> _Progress:
    from tqdm import tqdm

    progress, resumed = _Progress(), None
    if checkpoint_path is not None and checkpoint_path.exists():
        resumed = _load_checkpoint(checkpoint_path, settings_key)
        encoder.load_state_dict(resumed["encoder"])
        progress = _Progress(resumed["stage"], resumed["step"], json.loads(resumed["records"]),
                             json.loads(resumed["seconds"]))
    done = sum(s.steps for s in stages[:progress.stage])
    params = [p for p in encoder.parameters() if p.requires_grad]
    with tqdm(total=sum(s.steps for s in stages), initial=done + progress.step, unit="step",
              disable=not show_progress) as bar:
        for index in range(progress.stage, len(stages)):
            stage, name = stages[index], stages[index].settings.name
            opt = torch.optim.Adam(params, lr=stage.settings.lr, betas=(0.9, 0.999))
            gen = _stage_generator(seed, index)
            if resumed is not None and progress.step > 0:  # taken inside this stage: continue its state
                opt.load_state_dict(resumed["optimizer"])
                gen.set_state(resumed["rng"])
            bar.set_description(f"fit-encoder {name}")
            sums: dict[str, float] = {}
            clock = time.perf_counter()
            for step in range(progress.step, stage.steps):
                for k, v in _train_step(encoder, G, stage, opt, gen, step, lpips).items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.update(1)
                progress.step = step + 1
                if progress.step % log_every == 0 or progress.step == stage.steps:
                    count = (progress.step - 1) % log_every + 1
                    progress.records.append({"stage": name, "step": done + progress.step, "stage_step": progress.step,
                                             "lr": opt.param_groups[0]["lr"],
                                             **{k: v / count for k, v in sums.items()}})
                    bar.set_postfix(loss=f"{progress.records[-1]['loss']:.4f}")
                    sums = {}
                if checkpoint_path is not None and progress.step % checkpoint_every == 0 \
                        and progress.step < stage.steps:
                    clock = _add_seconds(progress, name, clock)
                    _save_checkpoint(checkpoint_path, encoder, opt, gen, progress, settings_key)
            _add_seconds(progress, name, clock)
            progress.stage, progress.step = index + 1, 0
            done += stage.steps
            if checkpoint_path is not None:  # at a stage boundary: the next stage starts afresh
                _save_checkpoint(checkpoint_path, encoder, opt, gen, progress, settings_key)
            if on_stage_end is not None and stage.steps:
                on_stage_end(name, encoder)
    return progress


def _add_seconds(progress: _Progress, name: str, since: float) -> float:
    """Add the time since ``since`` to stage ``name``'s total; returns now."""
    now = time.perf_counter()
    progress.seconds[name] = progress.seconds.get(name, 0.0) + now - since
    return now


# ---------------------------------------------------------------------------------------------
# Public entry point

def _check_images(images: Optional[np.ndarray], resolution: int) -> None:
    if images is None:
        return
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (resolution, resolution, 3) \
            or len(images) == 0:
        raise ValueError(f"images must be uint8 [N, {resolution}, {resolution}, 3] with N >= 1, "
                         f"got {images.dtype} {list(images.shape)}")


def _device_of(G: nn.Module) -> torch.device:
    return G.mapping.w_avg.device


def _machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _settings_key(G: nn.Module, encoder: Encoder, **settings: Any) -> str:
    """What a checkpoint must match to be continued (the generator and every setting)."""
    from handsoff.gan.digest import generator_digest

    return json.dumps({"generator": generator_digest(G), "encoder": encoder.config.to_dict(), **settings},
                      sort_keys=True)


def _final_losses(records: list[dict[str, Any]], stage: str) -> dict[str, float]:
    """Mean of each loss over the last 10% of a stage's records (at least one)."""
    rows = [r for r in records if r["stage"] == stage]
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 10):]
    keys = [k for k in tail[0] if k not in ("stage", "step", "stage_step", "lr")]
    return {k: round(float(np.mean([r[k] for r in tail])), 6) for k in keys}


def fit_encoder(G: nn.Module, *, steps: int, lpips_steps: int, batch: int = 8, images: Optional[np.ndarray] = None,
                lpips_net: str = "vgg", seed: int = 0, device: Union[str, torch.device] = "cpu",
                progress: bool = True, log_path: Optional[PathLike] = None, lpips: Optional[nn.Module] = None,
                encoder_config: Optional[dict[str, Any]] = None, checkpoint_path: Optional[PathLike] = None,
                checkpoint_every: int = 200, log_every: int = 10,
                settings: tuple[StageSettings, StageSettings] = (SUPERVISED, LPIPS_FINETUNE),
                on_stage_end: Optional[Callable[[str, Encoder], None]] = None) -> Encoder:
    """Train an encoder for ``G``: stage 1 for ``steps`` steps, then stage 2 for ``lpips_steps``.

    Args:
        G: the generator (it is not changed); it must live on ``device``.
        steps: stage-1 (supervised) steps.
        lpips_steps: stage-2 (LPIPS fine-tune) steps, the cap of that stage; 0 skips it.
        batch: images per step.
        images: optional real images, uint8 ``[N, R, R, 3]`` at G's resolution: half of every
            stage-2 batch (``batch // 2`` images) is drawn from them.
        lpips_net: LPIPS backbone of stage 2 (see `handsoff.invert.lpips.load_lpips`).
        seed: seeds the encoder's initial weights and every sample; same seed, same encoder
            (on the same device).
        device: where to train.
        progress: show a tqdm progress bar.
        log_path: write the loss log here (JSON) and its plot beside it (same stem, ``.png``).
        lpips: an LPIPS module to use instead of loading one (``lpips_net`` is then only recorded).
        encoder_config: `EncoderConfig` fields to override.
        checkpoint_path: save the training state here every ``checkpoint_every`` steps and at the
            end of each stage; when the file exists, training continues from it (it must come from
            a run with the same settings). The caller deletes it when it no longer needs it.
        log_every: steps per loss record (each record averages its steps).
        settings: learning rates and loss weights of stage 1 and stage 2.
        on_stage_end: called as ``on_stage_end(stage_name, encoder)`` after each stage that ran
            (``"supervised"``, ``"lpips"``), e.g. to evaluate the encoder between the stages; it
            must not change the encoder.

    Returns:
        The trained `Encoder` (eval mode, no gradients) with ``training_record`` filled in.
    """
    device = torch.device(device)
    if steps < 0 or lpips_steps < 0 or batch < 1 or steps + lpips_steps == 0:
        raise ValueError(f"need steps >= 0, lpips_steps >= 0 (not both 0) and batch >= 1; got {steps}, "
                         f"{lpips_steps}, {batch}")
    if _device_of(G).type != device.type:
        raise ValueError(f"G lives on {_device_of(G)}, training was asked for on {device}")
    _check_images(images, G.img_resolution)
    with torch.random.fork_rng(devices=[]):  # seed the initial weights without touching the global RNG
        torch.manual_seed(seed)
        encoder = Encoder.for_generator(G, seed=seed, **(encoder_config or {}))
    encoder.train().requires_grad_(True)
    if lpips_steps and lpips is None:
        from handsoff.invert.lpips import load_lpips

        lpips = load_lpips(lpips_net, device=device)
    real = images_to_tensor(images, device) if images is not None else None
    n_real = batch // 2 if real is not None else 0

    def supervised_batch(gen: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ws, x = sample_training_pairs(G, batch, gen)
        return x, ws

    def lpips_batch(gen: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        ws, x = sample_training_pairs(G, batch - n_real, gen)
        if n_real:
            pick = torch.randint(0, len(real), (n_real,), generator=gen)
            x = torch.cat([x, real[pick.to(device)]])
        return x, ws

    stages = [_Stage(settings[0], steps, supervised_batch), _Stage(settings[1], lpips_steps, lpips_batch)]
    images_digest = hashlib.sha256(images.tobytes()).hexdigest()[:16] if images is not None else None
    record = {"steps": steps, "lpips_steps": lpips_steps, "batch": batch, "seed": seed, "lpips_net": lpips_net,
                "images": None if images is None else len(images), "images_sha256": images_digest,
                "psi_range": list(PSI_RANGE), "mix_prob": MIX_PROB,
                "stages": [dataclasses.asdict(s) for s in settings]}
    run = _run_stages(encoder, G, stages, seed=seed, lpips=lpips, show_progress=progress, log_every=max(1, log_every),
                      checkpoint_path=Path(checkpoint_path) if checkpoint_path is not None else None,
                      checkpoint_every=max(1, checkpoint_every), settings_key=_settings_key(G, encoder, **record),
                      on_stage_end=on_stage_end)
    encoder.training_record = {
        **record, "seconds": {k: round(v, 1) for k, v in run.seconds.items()},
        "final_losses": {s.settings.name: _final_losses(run.records, s.settings.name) for s in stages if s.steps},
        "device": str(device) if device.type != "cpu" else _machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "lpips_backbone": getattr(lpips, "source", None) if lpips_steps else None,
    }
    if log_path is not None:
        from handsoff.invert.curves import plot_loss_curves, write_loss_log

        log = Path(log_path)
        write_loss_log(log, run.records)
        plot_loss_curves(log.with_suffix(".png"), run.records, title="encoder training loss")
    return encoder.eval().requires_grad_(False)
