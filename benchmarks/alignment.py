"""Label alignment through inversion: how much of a real image's labels its inversion keeps.

HandsOff gives each labeled image's labels to the generator's rendition of it (its
inversion) and trains the labeler on that pair, so a part the inversion draws elsewhere
teaches the labeler a wrong label. This measures the loss without any labeler: one
downstream model, trained on 10,000 real rendered images (the quality study's oracle), scores
the held-out real images and, with the same weights, their inversions, both against the real
images' labels. The share it keeps (inverted / real; real / inverted for RMSE) is near 1 when
the inversions keep every part in place, so that what the quality study loses lies with the
labeler; far below 1 the inversion, and the generator behind it, limits the corpus. It is
measured for the encoder alone and after per-image refinement.

An inversion is also blurrier than the real image, and the model never saw blur, so the share
is a lower bound on how well the parts stay in place.

Uses the quality study's settings and cache (``benchmarks/work/quality``): rendered sets and
latents made here serve the study and the other way round.

    python benchmarks/alignment.py                       # refine 0 and 50 steps, 600 training steps
    python benchmarks/alignment.py --refine-steps 0 50 200
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (the study's settings, seeds and cached artefacts)
from _machine import device_name, load_average  # noqa: E402
from handsoff.bench.tasks import TASKS  # noqa: E402
from handsoff.bench.train import train_and_score  # noqa: E402
from handsoff.data.labeled_set import LabeledSet  # noqa: E402
from handsoff.invert.invert import reconstruct  # noqa: E402


def inverted_set(study: quality.Study, folder: Path) -> tuple[LabeledSet, dict[str, float]]:
    """The folder's labeled set with every image replaced by its inversion (``study``'s refinement steps)."""
    ws, stats = study.latents(quality.PIPELINES["main"], folder)
    images = reconstruct(study.generator(), ws)  # the images the recorded LPIPS / PSNR were measured on
    kept = {"lpips": stats["lpips_mean"], "psnr": stats["psnr_mean"]}
    return replace(study.labeled_set(folder), images=list(images)), kept


def kept_share(real: float, inverted: float, higher_is_better: bool) -> Optional[float]:
    """How much of the real images' score the inversions keep (1 = all of it)."""
    if higher_is_better:
        return inverted / real if real > 0 else None
    return real / inverted if inverted > 0 else None


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refine-steps", type=int, nargs="+", default=[0, 50],
                   help="per-image refinement steps to compare (default: 0 50; the study uses 50)")
    p.add_argument("--steps", type=int, help="the oracle model's training steps (default: the study's, 600)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), help="tasks (default: all the domain has)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "quality",
                   help="the quality study's cache (default: benchmarks/work/quality)")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/alignment-<device>.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = quality.Settings()
    settings = replace(settings, steps=args.steps or settings.steps, tasks=tuple(args.tasks or settings.tasks))
    device = torch.device(args.device)
    out = args.out or quality.RESULTS / f"alignment-{device.type}.json"
    started, load_before = time.perf_counter(), load_average()

    def study(refine_steps: int) -> quality.Study:
        return quality.Study(replace(settings, refine_steps=refine_steps), args.work, device, quality.DEFAULT_ENCODER,
                             quality.DEFAULT_GENERATOR, progress=not args.no_progress)

    base = study(settings.refine_steps)
    heldout = base.rendered("heldout", settings.heldout_n, quality.SEEDS["heldout"])
    inversions = {f"refine {r}": inverted_set(study(r), heldout) for r in args.refine_steps}
    oracle = base.train_set("oracle", settings.sizes[0], 0)

    tasks: dict[str, Any] = {}
    for task in settings.tasks:
        metric, higher = TASKS[task].primary
        quality._say(f"train the oracle model for {task} ({len(oracle)} images, {settings.steps} steps)")
        result = train_and_score([oracle], base.labeled_set(heldout), task, steps=settings.steps,
                                 batch=settings.batch, lr=settings.lr, seed=0, device=device,
                                 progress=not args.no_progress, base=settings.width,
                                 also_test={name: labeled for name, (labeled, _) in inversions.items()})
        real = result["metrics"][metric]
        tasks[task] = {"metric": metric, "higher_is_better": higher, "real": result["metrics"],
                       "inverted": result["metrics_on"],
                       "kept": {name: kept_share(real, m[metric], higher) for name, m in result["metrics_on"].items()},
                       "train_seconds": result["wall_time_s"]["train"]}

    record = {
        "benchmark": "alignment: the oracle model on held-out real images vs on their inversions",
        "device": f"{device.type}: {device_name(device)}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {**{k: v for k, v in asdict(settings).items()
                        if k in ("oracle_n", "heldout_n", "steps", "batch", "lr", "width", "tasks")},
                     "refine_steps": args.refine_steps, "seeds": quality.SEEDS},
        "inversion": {name: stats for name, (_, stats) in inversions.items()},
        "tasks": tasks,
        "load_average": {"before": load_before, "after": load_average()},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "how_to_rerun": " ".join(["python benchmarks/alignment.py",
                                  *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    }
    quality.write_json(out, record)
    print(f"\n| task | real images | " + " | ".join(f"inversions, {n}" for n in inversions) + " |")
    print("|---|---|" + "---|" * len(inversions))
    for task, t in tasks.items():
        cells = [f"{t['inverted'][n][t['metric']]:.3f} (keeps "
                 f"{'-' if t['kept'][n] is None else format(t['kept'][n], '.0%')})" for n in inversions]
        print(f"| {task} {t['metric']} | {t['real'][t['metric']]:.3f} | " + " | ".join(cells) + " |")
    print(f"\nwrote {out} ({record['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
