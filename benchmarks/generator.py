"""Whole-generator forward speed: compiled ops (impl='cuda' or 'cpu') against the reference path.

Both paths run side by side in one process on the same randomly initialised generator, so
the printed ratio compares like with like. Config-f channel counts (channel_base 32768,
channel_max 512) with fp16 on the top 4 resolutions on CUDA, as NVlabs trains them.

    python benchmarks/generator.py --resolutions 256 1024 --batch 8          # on a GPU
    python benchmarks/generator.py --resolutions 64 --channel-max 128 --batch 8   # on this CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name  # noqa: E402
from handsoff.gan.config import GeneratorConfig  # noqa: E402
from handsoff.gan.networks import Generator  # noqa: E402
from stylegan_ops import available_impls  # noqa: E402


def time_forward(G: Generator, ws: torch.Tensor, impl: str, repeats: int, warmup: int) -> float:
    """Median seconds of one ``G.synthesis`` call with the given ops implementation."""
    sync = torch.cuda.synchronize if ws.is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            G.synthesis(ws, noise_mode="const", impl=impl)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--channel-base", type=int, default=32768)
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/generator-<device>.json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    fast = [i for i in available_impls(device) if i != "ref"]
    if not fast:
        sys.exit(f"no compiled ops available on {device}; nothing to compare")
    fast_impl = fast[0]
    torch.manual_seed(0)
    rows = []
    for res in args.resolutions:
        config = GeneratorConfig(img_resolution=res, channel_base=args.channel_base, channel_max=args.channel_max)
        G = Generator(config).to(device).eval()
        ws = G.mapping(torch.randn(args.batch, config.z_dim, device=device), truncation_psi=0.7)
        t_ref = time_forward(G, ws, "ref", args.repeats, args.warmup)
        t_fast = time_forward(G, ws, fast_impl, args.repeats, args.warmup)
        row = {"resolution": res, "batch": args.batch, "impl": fast_impl,
               "ref_img_per_s": args.batch / t_ref, f"{fast_impl}_img_per_s": args.batch / t_fast,
               "ratio": t_ref / t_fast}
        rows.append(row)
        print(f"{res:>5}x{res:<5} batch {args.batch}: ref {row['ref_img_per_s']:8.1f} img/s   "
              f"{fast_impl} {row[f'{fast_impl}_img_per_s']:8.1f} img/s   ratio {row['ratio']:.2f}x", flush=True)
        del G, ws
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {"benchmark": "generator_forward", "device": device_name(device), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "channel_base": args.channel_base,
              "channel_max": args.channel_max, "fp16_top_resolutions": 4 if device.type == "cuda" else 0,
              "results": rows}
    out = args.out or Path(__file__).parent / "results" / f"generator-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
