"""Torch threads on a shared CPU: how much each long command slows down beside one other process.

Every long handsoff command spends its time in one of four kinds of work, measured here with
the shipped generator at 64x64:

- ``label``: synthesis with features plus the ten-member labeler (``generate``, ``run``,
  ``demo``; ``fit-labeler``'s MLPs are the same kind of matrix products);
- ``downstream``: a UNet-8 training step, batch 16 (``bench``, the quality study);
- ``gan``: a StyleGAN2 training step, batch 16, lazy R1 (``train-gan``);
- ``invert``: a per-image refinement step on 8 images, LPIPS-VGG (``invert``, ``fit-encoder``).

Each kind runs in a fresh process for ``--seconds`` of wall time (after a warm-up), with 1
torch thread and with torch's default (one per core), on the quiet machine and beside one
competing process: a single-threaded downstream training, what the issue saw beside
``generate``. The slowdown is quiet over loaded for the same setting; everything is measured
side by side in one run, so the ratios hold even where the absolute rates do not.

    python benchmarks/threads.py                 # writes benchmarks/results/threads-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import device_name, load_average  # noqa: E402

KINDS = ("label", "downstream", "gan", "invert")
GOAL_SLOWDOWN = 2.5


def _downstream_step() -> tuple[Callable[[], None], int]:
    from torch.nn import functional as F

    from handsoff.bench.models import build_model

    torch.manual_seed(0)
    model = build_model("seg", 11, base=8).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(16, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (16, 64, 64))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, 16


def _label_step() -> tuple[Callable[[], None], int]:
    from handsoff.defaults import DEFAULT_GENERATOR
    from handsoff.domains.heads_scene import CLASSES, KEYPOINT_NAMES
    from handsoff.gan.checkpoints import load_generator
    from handsoff.label.infer import label_ws
    from handsoff.label.model import HypercolumnLabeler, LabelerConfig

    G = load_generator(DEFAULT_GENERATOR)
    shapes = tuple(G.synthesis.feature_shapes())
    config = LabelerConfig(feature_shapes=shapes, layers=tuple(range(len(shapes))), label_resolution=64,
                           classes=CLASSES, keypoint_names=KEYPOINT_NAMES, depth=True)
    labeler = HypercolumnLabeler(config).eval()
    with torch.no_grad():
        ws = G.mapping(torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(0)), truncation_psi=0.7)

    def step() -> None:
        with torch.no_grad():
            label_ws(G, labeler, ws, batch_size=16)

    return step, 16


def _gan_step() -> tuple[Callable[[], None], int]:
    import numpy as np

    from handsoff.gan.training.config import TrainConfig
    from handsoff.gan.training.loop import GANTrainer

    stored = json.loads((Path(__file__).resolve().parents[1] / "checkpoints/heads64/train_config.json").read_text())
    cfg = TrainConfig.from_dict({**stored["train"], "fd_samples": 0})
    images = np.random.default_rng(0).integers(0, 256, (256, 64, 64, 3), dtype=np.uint8)
    trainer = GANTrainer(cfg, images, torch.device("cpu"))
    return trainer.train_step, cfg.batch


def _invert_step() -> tuple[Callable[[], None], int]:
    from handsoff.defaults import DEFAULT_GENERATOR
    from handsoff.gan.checkpoints import load_generator
    from handsoff.invert.invert import refine_latents
    from handsoff.invert.lpips import load_lpips

    G = load_generator(DEFAULT_GENERATOR)
    lpips = load_lpips("vgg")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ws = G.mapping(torch.randn(8, G.z_dim, generator=gen), truncation_psi=0.7)
        target = G.synthesis(G.mapping(torch.randn(8, G.z_dim, generator=gen), truncation_psi=0.7),
                             noise_mode="const").clamp(-1, 1)

    def step() -> None:
        refine_latents(G, target, ws, steps=1, lpips=lpips)

    return step, 8


STEPS: dict[str, Callable[[], tuple[Callable[[], None], int]]] = {
    "label": _label_step, "downstream": _downstream_step, "gan": _gan_step, "invert": _invert_step}


def _measure(kind: str, threads: Optional[int], seconds: float, queue: Any) -> None:
    """Child process: the kind's images/s over ``seconds`` of wall time, after one warm-up step."""
    if threads is not None:
        torch.set_num_threads(threads)
    step, images = STEPS[kind]()
    step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    queue.put({"img_per_s": round(count * images / (time.perf_counter() - start), 2), "steps": count,
               "threads": torch.get_num_threads()})


def _compete() -> None:
    """The competitor: a single-threaded downstream training, forever."""
    torch.set_num_threads(1)
    step, _ = _downstream_step()
    while True:
        step()


def _cell(ctx: Any, kind: str, threads: Optional[int], seconds: float, loaded: bool) -> dict[str, Any]:
    competitor = None
    if loaded:
        competitor = ctx.Process(target=_compete, daemon=True)
        competitor.start()
        time.sleep(2.0)  # let it reach its steady state
    try:
        queue = ctx.Queue()
        child = ctx.Process(target=_measure, args=(kind, threads, seconds, queue))
        child.start()
        result = queue.get(timeout=seconds * 20 + 300)
        child.join()
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.join()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--seconds", type=float, default=8.0, help="measured wall seconds per cell (default: 8)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threads-cpu.json")
    args = p.parse_args(argv)

    ctx = mp.get_context("spawn")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {"threads=1": 1, f"default ({cores})": None}
    load_before = load_average()
    started = time.time()
    results: dict[str, Any] = {}
    for kind in args.kinds:
        results[kind] = {}
        for name, threads in settings.items():
            quiet = _cell(ctx, kind, threads, args.seconds, loaded=False)
            loaded = _cell(ctx, kind, threads, args.seconds, loaded=True)
            slowdown = quiet["img_per_s"] / max(loaded["img_per_s"], 1e-9)
            results[kind][name] = {"quiet": quiet, "loaded": loaded, "slowdown": round(slowdown, 2)}
            print(f"{kind:>10} {name:>12}: quiet {quiet['img_per_s']:7.2f} img/s, beside one process "
                  f"{loaded['img_per_s']:7.2f} img/s, slowdown {slowdown:.2f}x", flush=True)
    default_name = next(n for n in settings if n != "threads=1")
    record = {
        "benchmark": "torch threads on a shared CPU: images/s quiet and beside one single-threaded process",
        "device": f"cpu: {device_name()}, {cores} cores",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "seconds_per_cell": args.seconds,
        "load_average_before": load_before, "load_average_after": load_average(),
        "wall_time_s": round(time.time() - started, 1),
        "results": results,
        "goal_slowdown": GOAL_SLOWDOWN,
        "goal_met": {name: all(results[k][name]["slowdown"] <= GOAL_SLOWDOWN for k in results) for name in settings},
        "threads_1_over_default_loaded": {
            k: round(results[k]["threads=1"]["loaded"]["img_per_s"] /
                     max(results[k][default_name]["loaded"]["img_per_s"], 1e-9), 2) for k in results},
        "note": "slowdown = quiet img/s / loaded img/s for the same thread setting; the competitor is one "
                "single-threaded UNet-8 training (handsoff bench's model) started 2 s before the cell.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
