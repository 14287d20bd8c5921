"""Hypercolumn labeler: factorised against naive inference, labeling against generating, training memory.

All on random-init generators (channel_base 4096, channel_max 256, as a modest CPU-sized
StyleGAN2) and random-init labelers with the official ensemble (10 members, hidden 256, 32)
and the heads domain's heads (11 classes, 10 keypoint heatmaps, depth). Three parts, each
measured side by side in one run:

1. Inference per image at 64, 128, 256: `HypercolumnLabeler.predict` (factorised, banded)
   against `predict_naive` (upsample every map, concatenate, run the MLPs), from the same
   features. Time: best of ``--repeats`` wall-clock runs in this process, and the CPU time of
   that run; the speed-up is the ratio of CPU times (steadier on a shared machine, where wall
   time also counts waiting for a core; the wall-clock ratio is recorded too). Peak memory: measured in a fresh subprocess per configuration (features made,
   one warm-up call), as the rise of the peak resident set size during one call over the
   resident size just before it (Linux: VmHWM reset through /proc/self/clear_refs). The
   subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc maps every large block
   separately and returns it when freed: RSS then follows the live tensors.
2. Labeled images per second (`label_ws`: synthesis with features, labeling, uint8 images)
   against the generator alone (``G.synthesis``), same batch.
3. Training memory: peak RSS of a subprocess while it fits a labeler on ``--train-images``
   labeled 256x256 images (heads renders, random latents; ``--train-steps`` steps), against
   the size of the N x H x W x C float32 hypercolumn matrix that DatasetGAN/HandsOff keep in
   memory. The peak is the whole process's (torch itself is about 0.5 GB here), taken over
   `fit_labeler` only (not over rendering the labels).

    python benchmarks/labeler.py                 # full run (about 10 minutes here), writes results/labeler-cpu.json
    python benchmarks/labeler.py --quick         # 64 and 128 only, 8 training images
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from handsoff.gan.config import GeneratorConfig  # noqa: E402
from handsoff.gan.networks import Generator  # noqa: E402
from handsoff.label.model import HypercolumnLabeler, LabelerConfig  # noqa: E402
from handsoff.utils.io import atomic_write_bytes  # noqa: E402

CHANNEL_BASE, CHANNEL_MAX = 4096, 256
BATCH = {64: 8, 128: 4, 256: 2}  # images per call in the throughput part
GOALS = {"speedup_256": 20.0, "leaner_256": 50.0, "label_overhead": 0.5, "train_rss_gb": 2.0}


# --------------------------------------------------------------------------- setup
def make_generator(resolution: int) -> Generator:
    torch.manual_seed(resolution)
    config = GeneratorConfig(img_resolution=resolution, z_dim=256, w_dim=256, mapping_layers=2,
                             channel_base=CHANNEL_BASE, channel_max=CHANNEL_MAX, num_fp16_res=0)
    return Generator(config).eval().requires_grad_(False)


def make_labeler(G: Generator) -> HypercolumnLabeler:
    from handsoff.domains import get_domain

    domain = get_domain("heads")
    shapes = tuple(G.feature_shapes())
    config = LabelerConfig(shapes, tuple(range(len(shapes))), G.img_resolution, classes=domain.classes,
                           keypoint_names=domain.keypoint_names, depth=True)
    return HypercolumnLabeler(config, seed=0).eval()


def make_ws(G: Generator, n: int) -> torch.Tensor:
    return G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(1)), truncation_psi=0.7)


def features_of(G: Generator, n: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return G.synthesis(make_ws(G, n), noise_mode="const", return_features=True)[1]


# --------------------------------------------------------------------------- memory (subprocess side)
def _status_kb(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_rise(call: Callable[[], Any]) -> int:
    """Bytes by which the peak RSS during ``call()`` exceeds the RSS just before it."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    call()
    return (_status_kb("VmHWM") - before) * 1024


def worker(spec: dict) -> dict:
    """One memory measurement in this (fresh) process; see the module docstring."""
    torch.set_num_threads(spec["threads"])
    G = make_generator(spec["resolution"])
    if spec["kind"] == "train":
        return train_worker(G, spec)
    labeler = make_labeler(G)
    features = features_of(G, 1)
    call = labeler.predict_naive if spec["kind"] == "naive" else labeler.predict
    call(features)  # warm-up: one-time allocations of the libraries
    return {"peak_rise_bytes": peak_rise(lambda: call(features))}


def train_worker(G: Generator, spec: dict) -> dict:
    from handsoff.data.labeled_set import LabeledSet
    from handsoff.domains import get_domain
    from handsoff.label.train import fit_labeler

    n, r = spec["images"], spec["resolution"]
    domain = get_domain("heads")
    batch = domain.render(n, 0, r)
    meta = {"classes": list(domain.classes), "keypoint_names": list(domain.keypoint_names)}
    labels = LabeledSet(Path("<rendered>"), batch.names, list(batch.images), list(batch.seg), list(batch.depth),
                        batch.keypoints, meta)
    ws = make_ws(G, n)
    steps: list[float] = []
    Path("/proc/self/clear_refs").write_text("5")  # the peak of fit_labeler, not of rendering the labels
    rss_before = _status_kb("VmRSS") * 1024
    fit_labeler(G, ws, labels, steps=spec["steps"], batch_pixels=spec["batch_pixels"], progress=False,
                callback=lambda step, record: steps.append(time.perf_counter()))
    channels = sum(c for c, _ in G.feature_shapes())
    shapes = G.feature_shapes()
    return {"peak_rss_bytes": _status_kb("VmHWM") * 1024,
            "rss_before_fit_bytes": rss_before,
            "feature_bank_bytes": 4 * n * sum(c * s * s for c, s in shapes),
            "naive_matrix_bytes": 4 * n * r * r * channels,
            "seconds_per_step": (steps[-1] - steps[0]) / max(1, len(steps) - 1)}


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing (this process)
def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best wall-clock seconds of ``call()`` over ``repeats`` runs, and the CPU seconds of that run."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def inference_row(resolution: int, repeats: int, threads: int) -> dict:
    from handsoff.label.infer import label_ws

    G = make_generator(resolution)
    labeler = make_labeler(G)
    features = features_of(G, 1)
    labeler.predict(features)  # warm-up
    row: dict[str, Any] = {"hypercolumn_channels": labeler.config.channels,
                           "naive_stack_bytes_per_image": 4 * resolution ** 2 * labeler.config.channels}
    for kind, call in (("factorised", labeler.predict), ("naive", labeler.predict_naive)):
        wall, cpu = timed(lambda: call(features), repeats)
        row[kind] = {"seconds_per_image": round(wall, 4), "cpu_seconds": round(cpu, 4),
                     "peak_bytes": run_worker({"kind": kind, "resolution": resolution, "threads": threads})[
                         "peak_rise_bytes"]}
    # CPU time is the steadier figure on a shared machine (wall-clock time also counts waiting for a core).
    row["speedup"] = round(row["naive"]["cpu_seconds"] / row["factorised"]["cpu_seconds"], 2)
    row["speedup_wall"] = round(row["naive"]["seconds_per_image"] / row["factorised"]["seconds_per_image"], 2)
    row["leaner"] = round(row["naive"]["peak_bytes"] / max(1, row["factorised"]["peak_bytes"]), 1)

    ws = make_ws(G, BATCH[resolution])
    with torch.no_grad():
        G.synthesis(ws, noise_mode="const")
        generator, _ = timed(lambda: G.synthesis(ws, noise_mode="const"), repeats)
    labeled, _ = timed(lambda: label_ws(G, labeler, ws), repeats)
    row["throughput"] = {"batch": len(ws), "generator_img_per_s": round(len(ws) / generator, 2),
                         "labeled_img_per_s": round(len(ws) / labeled, 2),
                         "labeling_overhead": round(labeled / generator - 1, 2)}
    return row


# --------------------------------------------------------------------------- main
def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MB"


def print_table(rows: dict[str, dict], train: dict | None) -> None:
    print(f"\n{'res':>4} {'C':>5} | {'factorised s/img':>16} {'naive s/img':>12} {'speed-up':>8} {'(wall)':>7} | "
          f"{'factorised peak':>15} {'naive peak':>12} {'leaner':>7} | {'gen img/s':>9} {'labeled img/s':>13} "
          f"{'+time':>6}")
    for res, row in rows.items():
        t = row["throughput"]
        print(f"{res:>4} {row['hypercolumn_channels']:>5} | {row['factorised']['seconds_per_image']:>16.3f} "
              f"{row['naive']['seconds_per_image']:>12.3f} {row['speedup']:>7.1f}x {row['speedup_wall']:>6.1f}x | "
              f"{_mb(row['factorised']['peak_bytes']):>15} {_mb(row['naive']['peak_bytes']):>12} "
              f"{row['leaner']:>6.0f}x | "
              f"{t['generator_img_per_s']:>9.2f} {t['labeled_img_per_s']:>13.2f} {t['labeling_overhead']:>+6.0%}")
    if train:
        print(f"\ntraining on {train['images']} labeled {train['resolution']}x{train['resolution']} images: peak RSS "
              f"{_mb(train['peak_rss_bytes'])} (feature maps {_mb(train['feature_bank_bytes'])}; the naive "
              f"N x H x W x C matrix would be {_mb(train['naive_matrix_bytes'])}), "
              f"{train['seconds_per_step']:.2f} s per step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best counts")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine one thread gives stable figures)")
    parser.add_argument("--train-images", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="sizes 64 128, 8 training images, 5 steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "labeler-cpu.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.sizes, args.train_images, args.train_steps = [64, 128], 8, 5
    torch.set_num_threads(args.threads)

    load_before = load_average()
    rows = {}
    for res in args.sizes:
        rows[str(res)] = inference_row(res, args.repeats, args.threads)
        print(f"{res}: {json.dumps(rows[str(res)])}", flush=True)
    train_res = 256 if 256 in args.sizes else max(args.sizes)
    train = {"images": args.train_images, "resolution": train_res, "steps": args.train_steps, "batch_pixels": 1024,
             **run_worker({"kind": "train", "resolution": train_res, "images": args.train_images,
                           "steps": args.train_steps, "batch_pixels": 1024, "threads": args.threads})}
    print_table(rows, train)

    top = rows.get("256")
    record = {
        "benchmark": "hypercolumn labeler: factorised vs naive inference, labeling vs generating, training memory",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores", "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generator": {"channel_base": CHANNEL_BASE, "channel_max": CHANNEL_MAX, "init": "random"},
        "labeler": {"ensemble": 10, "hidden": [256, 32], "outputs": "11 classes + 10 keypoint heatmaps + depth",
                    "init": "random"},
        "repeats": args.repeats, "load_average_before": load_before, "load_average_after": load_average(),
        "inference": rows, "training": train,
        "memory_method": "peak RSS rise during one call in a fresh subprocess (VmHWM reset via /proc/self/clear_refs, "
                         "MALLOC_MMAP_THRESHOLD_=65536 so freed blocks leave the RSS); training: peak RSS (VmHWM) of "
                         "the training subprocess during fit_labeler (whole process: torch, generator, labels, "
                         "feature maps, training step)",
        "goals": GOALS,
        "goals_met": {
            "speedup_256": None if top is None else top["speedup"] >= GOALS["speedup_256"],
            "leaner_256": None if top is None else top["leaner"] >= GOALS["leaner_256"],
            "label_overhead": {res: row["throughput"]["labeling_overhead"] <= GOALS["label_overhead"]
                               for res, row in rows.items()},
            "train_rss_gb": train["peak_rss_bytes"] < GOALS["train_rss_gb"] * 2 ** 30,
        },
    }
    atomic_write_bytes(args.out, (json.dumps(record, indent=2) + "\n").encode())
    print(f"goals: {json.dumps(record['goals_met'])}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
