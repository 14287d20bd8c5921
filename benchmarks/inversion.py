"""GAN inversion quality and cost: the encoder after stage 1, after stage 2, and after refinement.

Trains an encoder for the generator (default: the shipped one) with ``--steps`` supervised and
``--lpips-steps`` LPIPS fine-tune steps (stage 2 draws half its batches from ``--train-images``
rendered heads images of seed 0, the GAN's own training distribution), then measures:

* reconstruction LPIPS (VGG) and PSNR on ``--n`` held-out rendered heads images (seed
  ``--eval-seed`` = 1000, which no training uses) after stage 1, after stage 2, and after
  ``--refine-steps`` steps of per-image refinement of the stage-2 codes;
* the latent error on ``--n`` generated images (psi 0.7, seed 2000): mean squared error of the
  predicted ws in units of the generator's w spread (``encoder.w_scale``), and their
  reconstruction LPIPS/PSNR;
* the time of each stage (training steps, encoding, refinement).

``--encoder FILE`` measures a trained encoder (e.g. the shipped one) instead of training one.
A quick CPU run (a few minutes): ``--steps 100 --lpips-steps 20 --refine-steps 10 --n 32``.

    python benchmarks/inversion.py                 # writes benchmarks/results/inversion-cpu.json
    python benchmarks/inversion.py --encoder checkpoints/heads64/encoder.safetensors --out /tmp/shipped.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from handsoff.defaults import DEFAULT_GENERATOR  # noqa: E402
from handsoff.domains import get_domain  # noqa: E402
from handsoff.gan.checkpoints import load_generator  # noqa: E402
from handsoff.gan.digest import generator_digest  # noqa: E402
from handsoff.invert.encoder import Encoder, load_encoder  # noqa: E402
from handsoff.invert.invert import invert_images  # noqa: E402
from handsoff.invert.lpips import load_lpips  # noqa: E402
from handsoff.invert.train import fit_encoder, images_to_tensor  # noqa: E402
from handsoff.utils.images import to_uint8  # noqa: E402


def generated_set(G: torch.nn.Module, n: int, seed: int, psi: float = 0.7) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` generated images (uint8) and their ws, seed ``seed``, truncation ``psi``, no mixing."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(n, G.z_dim)).float()
    with torch.no_grad():
        ws = G.mapping(z, None, truncation_psi=psi)
        images = to_uint8(G.synthesis(ws, noise_mode="const"))
    return ws, images


def summarize(result: Any) -> dict[str, float]:
    return {"lpips": round(float(np.mean(result.lpips)), 4), "lpips_median": round(float(np.median(result.lpips)), 4),
            "psnr": round(float(np.mean(result.psnr)), 2)}


def evaluate(G: torch.nn.Module, encoder: Encoder, lpips: torch.nn.Module, rendered: np.ndarray,
             generated: tuple[torch.Tensor, np.ndarray]) -> dict[str, Any]:
    """Encoder-only reconstruction metrics on both sets, the latent error, and the encoding speed."""
    start = time.perf_counter()
    on_rendered = invert_images(G, encoder, rendered, lpips=lpips, progress=False)
    seconds = time.perf_counter() - start
    ws_true, images = generated
    on_generated = invert_images(G, encoder, images, lpips=lpips, progress=False)
    with torch.no_grad():
        # The error of the codes the encoder gives for G's own images (uint8-quantised, as a user's are).
        pred = torch.cat([encoder(images_to_tensor(images[i:i + 32])) for i in range(0, len(images), 32)])
    latent = float(((pred - ws_true) / encoder.w_scale).square().mean())
    return {"rendered": summarize(on_rendered), "generated": {**summarize(on_generated),
                                                              "latent_mse_in_w_scale_units": round(latent, 4)},
            "encode_img_per_s_with_metrics": round(len(rendered) / seconds, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    parser.add_argument("--encoder", type=Path, default=None, help="measure this encoder instead of training one")
    parser.add_argument("--steps", type=int, default=500, help="stage-1 steps (default: 500)")
    parser.add_argument("--lpips-steps", type=int, default=100, help="stage-2 steps (default: 100)")
    parser.add_argument("--train-images", type=int, default=2000,
                        help="rendered heads images (seed 0) mixed into stage 2; 0 = generated only (default: 2000)")
    parser.add_argument("--refine-steps", type=int, default=20, help="refinement steps (default: 20)")
    parser.add_argument("--n", type=int, default=100, help="held-out images per set (default: 100)")
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default: 1; on a shared 2-core machine 2 threads are slower)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inversion-cpu.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = load_average()
    G = load_generator(args.generator)
    lpips = load_lpips("vgg")
    res = G.img_resolution
    rendered = get_domain("heads").render(args.n, args.eval_seed, res).images
    generated = generated_set(G, args.n, 2000)
    rows: dict[str, dict[str, Any]] = {}

    def on_stage_end(stage: str, encoder: Encoder) -> None:
        rows[f"after {stage}"] = evaluate(G, encoder, lpips, rendered, generated)
        print(f"after {stage}: {json.dumps(rows[f'after {stage}'])}", flush=True)

    training: dict[str, Any] = {}
    if args.encoder is not None:
        encoder = load_encoder(args.encoder, G)
        training = {"encoder": str(args.encoder), **encoder.training_record}
        rows["encoder"] = evaluate(G, encoder, lpips, rendered, generated)
    else:
        train_images = get_domain("heads").render(args.train_images, 0, res).images if args.train_images else None
        encoder = fit_encoder(G, steps=args.steps, lpips_steps=args.lpips_steps, batch=args.batch,
                              images=train_images, seed=args.seed, lpips=lpips, on_stage_end=on_stage_end)
        training = encoder.training_record
    if args.refine_steps:
        start = time.perf_counter()
        refined = invert_images(G, encoder, rendered, refine_steps=args.refine_steps, lpips=lpips, progress=True)
        seconds = time.perf_counter() - start
        rows[f"after refinement ({args.refine_steps} steps)"] = {
            "rendered": summarize(refined), "seconds_per_image": round(seconds / args.n, 2),
            "loss_start": round(float(np.mean(refined.refine_loss_start)), 4),
            "loss_best": round(float(np.mean(refined.refine_loss_best)), 4)}

    stage1, stage2 = rows.get("after supervised"), rows.get("after lpips")
    improvement = None
    if stage1 and stage2:
        a, b = stage1["rendered"]["lpips"], stage2["rendered"]["lpips"]
        improvement = {"lpips_rendered_stage1": a, "lpips_rendered_stage2": b, "lpips_change": round(b - a, 4),
                       "lpips_change_relative": round((b - a) / a, 4),
                       "psnr_change_db": round(stage2["rendered"]["psnr"] - stage1["rendered"]["psnr"], 2),
                       "stage2_improved_lpips": b < a}
    record = {
        "benchmark": "GAN inversion: reconstruction LPIPS (VGG) / PSNR on held-out rendered heads, latent error on "
                     "generated images, time per stage",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generator": str(args.generator), "generator_digest": generator_digest(G),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_before": load_before, "load_average_after": load_average(),
        "training": training, "results": rows, "stage2_vs_stage1": improvement,
        "note": "lpips/psnr: means over the set (uint8 inputs vs uint8 reconstructions); latent error: mean over "
                "ws and dims of ((w_pred - w) / w_scale)^2 on generated images (psi 0.7).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{'':34} {'rendered LPIPS':>15} {'PSNR dB':>8} {'generated LPIPS':>16} {'PSNR dB':>8} "
          f"{'latent err':>11}")
    for name, row in rows.items():
        gen = row.get("generated", {})
        print(f"{name:34} {row['rendered']['lpips']:>15.4f} {row['rendered']['psnr']:>8.2f} "
              f"{gen.get('lpips', float('nan')):>16.4f} {gen.get('psnr', float('nan')):>8.2f} "
              f"{gen.get('latent_mse_in_w_scale_units', float('nan')):>11.4f}")
    seconds = training.get("seconds", {})
    if seconds:
        print(f"training time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")
    if improvement:
        verdict = "improved" if improvement["stage2_improved_lpips"] else "did NOT improve"
        print(f"stage 2 {verdict} rendered LPIPS: {improvement['lpips_rendered_stage1']:.4f} -> "
              f"{improvement['lpips_rendered_stage2']:.4f} ({100 * improvement['lpips_change_relative']:+.1f}%)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
