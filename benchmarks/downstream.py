"""Speed of the benchmark's downstream models: training and inference images/s at 64x64.

Times a training step (forward, backward, AdamW step; batch ``--batch``, segmentation with 11
classes, channels-last as `handsoff.bench.train` runs it) and inference, for the small UNet at
several widths and for torchvision's DeepLabV3-MobileNetV3 (random weights). Each figure is
the median of ``--repeats`` steps after a warm-up, measured in CPU time of this process, which
hardly depends on what else runs on a shared machine (wall time is recorded too). This is the
measurement behind the default model of ``handsoff bench``.

    python benchmarks/downstream.py            # writes benchmarks/results/downstream-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from handsoff.bench.models import build_model, count_parameters  # noqa: E402
from handsoff.bench.train import DEFAULT_BASE  # noqa: E402

MODELS = (("unet", 8), ("unet", 16), ("unet", 32), ("deeplabv3", 0))


def _median_times(fn, repeats: int) -> tuple[float, float]:
    """Median CPU seconds and median wall seconds of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def measure(arch: str, width: int, batch: int, size: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model("seg", 11, arch=arch, base=width or DEFAULT_BASE).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 11, (batch, size, size))

    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer() -> None:
        with torch.no_grad():
            model(x)

    model.train()
    train_cpu, train_wall = _median_times(train_step, repeats)
    model.eval()
    infer_cpu, infer_wall = _median_times(infer, repeats)
    return {"parameters": count_parameters(model),
            "train_img_per_cpu_s": round(batch / train_cpu, 1), "train_img_per_s": round(batch / train_wall, 1),
            "infer_img_per_cpu_s": round(batch / infer_cpu, 1), "infer_img_per_s": round(batch / infer_wall, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "downstream-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = {}
    for arch, width in MODELS:
        name = f"{arch}-{width}" if width else arch
        rows[name] = measure(arch, width, args.batch, args.size, args.repeats)
        print(f"{name:>12}: {json.dumps(rows[name])}", flush=True)
    default = f"unet-{DEFAULT_BASE}"
    record = {
        "benchmark": "downstream models: training and inference images/s (CPU time) at 64x64",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": args.threads, "batch": args.batch, "size": args.size,
        "repeats": args.repeats, "default_model": default, "models": rows,
        "load_average_before": load_before, "load_average_after": load_average(),
        "note": "img_per_cpu_s = images per second of this process's CPU time (robust on a shared machine); "
                "img_per_s = wall clock.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
