"""Pivotal tuning (issue 15, lever 1): what tuning the generator on the labeled images buys, and what it costs.

On the quality study's draw 0 of 16 labeled heads (seed 7100, 64 px; the study's cache under
``benchmarks/work/quality`` supplies the rendered sets and the inversions with the shipped
encoder), each run tunes the shipped generator at the inversions' codes
(`handsoff.invert.tune.tune_generator`) and measures, at each checkpoint of steps (0 = G itself):

* reconstruction LPIPS-VGG / PSNR of the 16 labeled images (what tuning optimises);
* held-out reconstruction: 100 held-out renders (seed 7003) at their encoder codes, drawn by the
  tuned generator against drawn by G (does tuning toward 16 real images generalise, or overfit?);
* drift: LPIPS / PSNR between G's and G''s images of 64 random ws (psi 0.7);
* whether G' keeps the domain: FD-heads-seg (the GAN trainer's Fréchet distance,
  `handsoff.gan.training.quality`) of 1,000 G' samples against real renders and against G's
  samples of the same z (psi 1, as the trainer reports), beside G's own FD and the floor of two
  real sets;
* the wall time of the tuning steps (evaluation excluded).

Runs (``--runs``): ``refine50`` (codes after 50 refinement steps, the study's setting; checkpoints
``--steps``), ``refine0`` (the encoder's codes), ``refine50-nolocal`` (no locality regulariser) and
``refine50-pti-lr`` (PTI's learning rate, 3e-4); the last three at the first checkpoint only.
Single-threaded by default (this project's machine has 2 cores shared with other jobs).

    nice -n 5 python benchmarks/tune.py                    # writes benchmarks/results/tune-cpu.json
    python benchmarks/tune.py --runs refine50 --steps 50 --fd-samples 200 --out /tmp/t.json   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402  (the study's settings, seeds and cached artefacts)
from _machine import device_name, load_average  # noqa: E402
from handsoff.gan.digest import generator_digest  # noqa: E402
from handsoff.invert import tune as tune_mod  # noqa: E402
from handsoff.invert.invert import lpips_distances, psnr, reconstruct  # noqa: E402
from handsoff.utils.io import atomic_write_bytes  # noqa: E402

RUNS = {
    "refine50": {"refine": True, "settings": {}},
    "refine0": {"refine": False, "settings": {}},
    "refine50-nolocal": {"refine": True, "settings": {"locality_weight": 0.0}},
    "refine50-pti-lr": {"refine": True, "settings": {"lr": 3e-4}},
}
FD_TRUNCATION = 1.0  # as the GAN trainer's FD figures (MODEL_CARD.md)


class FD:
    """FD-heads-seg of generators against real renders and against G, with fixed z for every generator."""

    def __init__(self, study: quality.Study, n: int) -> None:
        from handsoff.gan.training.quality import get_feature_extractor, user_cache_dir

        self.n = n
        self.extractor = get_feature_extractor(study.device, [user_cache_dir(), study.work / "fd-cache"])
        reals = np.stack(study.labeled_set(study.rendered("fd-real", 2 * n, quality.SEEDS["heldout"] + 1)).images)
        self.real = self._stats_of_images(reals[:n])
        self.floor = self.distance(self.real, self._stats_of_images(reals[n:]))
        self.G = self.stats(study.generator())

    @torch.no_grad()
    def _stats_of_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from handsoff.gan.training.quality import feature_statistics

        batches = torch.from_numpy(images).permute(0, 3, 1, 2).split(64)
        return feature_statistics(torch.cat([self.extractor(b).double().cpu() for b in batches]).numpy())

    @torch.no_grad()
    def stats(self, G: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Feature statistics of ``n`` samples of G (the trainer's fixed z, psi 1)."""
        from handsoff.gan.training.quality import feature_statistics, generated_uint8

        feats = [self.extractor(b).double().cpu() for b in generated_uint8(G, self.n, 64, truncation_psi=FD_TRUNCATION)]
        return feature_statistics(torch.cat(feats).numpy())

    @staticmethod
    def distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
        from handsoff.gan.training.quality import frechet_distance_from_stats

        return round(float(frechet_distance_from_stats(*a, *b)), 4)

    def of(self, G: torch.nn.Module) -> dict[str, float]:
        s = self.stats(G)
        return {"vs_real": self.distance(s, self.real), "vs_G": self.distance(s, self.G)}


class Evaluator:
    """Every figure of one generator (see the module docstring)."""

    def __init__(self, study: quality.Study, labeled: np.ndarray, heldout: np.ndarray, heldout_ws: torch.Tensor,
                 fd: Optional[FD]) -> None:
        self.study, self.labeled, self.heldout, self.heldout_ws, self.fd = study, labeled, heldout, heldout_ws, fd
        self.G = study.generator()
        self.lpips = study.lpips()

    def __call__(self, G: torch.nn.Module, ws: torch.Tensor, with_fd: bool) -> dict[str, Any]:
        rec = reconstruct(G, ws)
        held = reconstruct(G, self.heldout_ws)
        row: dict[str, Any] = {
            "labeled": {"lpips": round(float(np.mean(lpips_distances(self.lpips, rec, self.labeled))), 4),
                        "psnr": round(float(np.mean(psnr(rec, self.labeled))), 2)},
            "heldout": {"lpips": round(float(np.mean(lpips_distances(self.lpips, held, self.heldout))), 4),
                        "psnr": round(float(np.mean(psnr(held, self.heldout))), 2)},
            "drift_from_G": tune_mod.sample_drift(self.G, G, self.lpips),
        }
        if with_fd and self.fd is not None:
            row["fd_heads_seg"] = self.fd.of(G)
        return row


def _say(message: str) -> None:
    print(f"[tune {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=list(RUNS), help="runs (default: all)")
    p.add_argument("--steps", type=int, nargs="+", default=[100, 300],
                   help="checkpoints of the refine50 run; the others stop at the first (default: 100 300)")
    p.add_argument("--fd-samples", type=int, default=1000, help="samples per FD (default: 1000; 0 = no FD)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "quality",
                   help="the quality study's cache (default: benchmarks/work/quality)")
    p.add_argument("--out", type=Path, default=quality.RESULTS / "tune-cpu.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), load_average()
    settings = quality.Settings()  # the study's: refine_steps 50, heldout_n 100
    device = torch.device("cpu")
    study = quality.Study(settings, args.work, device, quality.DEFAULT_ENCODER, quality.DEFAULT_GENERATOR,
                          progress=not args.no_progress)
    labeled_dir = study.labeled(16, 0)
    labeled = np.stack(study.labeled_set(labeled_dir).images)
    heldout_dir = study.rendered("heldout", settings.heldout_n, quality.SEEDS["heldout"])
    heldout = np.stack(study.labeled_set(heldout_dir).images)
    heldout_ws, _ = study.latents(quality.PIPELINES["no-refine"], heldout_dir)
    pivots = {True: study.latents(quality.PIPELINES["main"], labeled_dir)[0],
              False: study.latents(quality.PIPELINES["no-refine"], labeled_dir)[0]}
    prepare_s = round(time.perf_counter() - started, 1)
    _say(f"inversions ready ({prepare_s:.0f} s, cached ones included)")
    fd = FD(study, args.fd_samples) if args.fd_samples else None
    evaluate = Evaluator(study, labeled, heldout, heldout_ws, fd)
    G = study.generator()
    steps = sorted(set(args.steps))

    results: dict[str, Any] = {}
    for name in args.runs:
        spec = RUNS[name]
        checkpoints = steps if name == "refine50" else steps[:1]
        ws = pivots[spec["refine"]]
        _say(f"{name}: step 0")
        rows = {0: evaluate(G, ws, with_fd=False)}  # G's own FD is reported once, under "generator"
        eval_s = 0.0

        def on_step(step: int, tuned: torch.nn.Module) -> None:
            nonlocal eval_s
            if step in checkpoints:
                began = time.perf_counter()
                rows[step] = evaluate(tuned, ws, with_fd=True)
                eval_s += time.perf_counter() - began
                _say(f"{name}: step {step}: {json.dumps(rows[step])}")

        result = tune_mod.tune_generator(G, ws, labeled, steps=checkpoints[-1], lpips=study.lpips(), seed=0,
                                         progress=not args.no_progress, callback=on_step, **spec["settings"])
        tune_s = result.seconds - eval_s
        results[name] = {"refine_steps": settings.refine_steps if spec["refine"] else 0,
                         "settings": result.settings, "by_steps": {str(k): v for k, v in rows.items()},
                         "tune_seconds": round(tune_s, 1),
                         "seconds_per_step": round(tune_s / max(1, checkpoints[-1]), 3)}

    record = {
        "benchmark": "pivotal tuning: reconstruction, held-out reconstruction, drift and FD-heads-seg of the tuned "
                     "generator, 16 labeled heads (quality study draw 0)",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores (shared: a GAN training at nice 10 and other jobs; "
                  f"this ran at nice 5)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "generator": str(quality.DEFAULT_GENERATOR), "generator_digest": generator_digest(G),
        "encoder": str(quality.DEFAULT_ENCODER),
        "labeled": {"n": 16, "seed": quality.SEEDS["labeled"], "size": quality.SIZE},
        "heldout": {"n": settings.heldout_n, "seed": quality.SEEDS["heldout"], "codes": "encoder only (refine 0)"},
        "defaults": tune_mod.tune_settings(),
        "fd": None if fd is None else {"metric": fd.extractor.metric, "samples": fd.n, "truncation": FD_TRUNCATION,
                                       "generator_vs_real": fd.distance(fd.G, fd.real), "real_vs_real": fd.floor},
        "runs": results,
        "load_average": {"before": load_before, "after": load_average()},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1), "prepare_seconds": prepare_s,
        "how_to_rerun": " ".join(["python benchmarks/tune.py",
                                  *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "note": "labeled/heldout: mean LPIPS-VGG and PSNR (dB) of the reconstructions; drift_from_G: between G's and "
                "the tuned generator's images of 64 random ws (psi 0.7); fd_heads_seg: Fréchet distance in the "
                "features of the domain segmentation CNN (not FID), tuned generator vs real renders and vs G's "
                "samples of the same z; step 0 is G.",
    }
    atomic_write_bytes(args.out, (json.dumps(record, indent=1) + "\n").encode())
    print(f"\n| run | steps | labeled LPIPS / PSNR | held-out LPIPS / PSNR | drift LPIPS | FD vs real | FD vs G |")
    print("|---|---|---|---|---|---|---|")
    for name, run in results.items():
        for step, row in run["by_steps"].items():
            f = row.get("fd_heads_seg", {})
            print(f"| {name} | {step} | {row['labeled']['lpips']:.3f} / {row['labeled']['psnr']:.2f} | "
                  f"{row['heldout']['lpips']:.3f} / {row['heldout']['psnr']:.2f} | "
                  f"{row['drift_from_G']['lpips']:.3f} | "
                  f"{f.get('vs_real', '-')} | {f.get('vs_G', '-')} |")
    if record["fd"]:
        print(f"G: FD vs real {record['fd']['generator_vs_real']}, real vs real {record['fd']['real_vs_real']}")
    print(f"\nwrote {args.out} ({record['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
