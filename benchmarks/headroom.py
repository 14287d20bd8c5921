"""Headroom of the quality study's downstream benchmark: can perfect data beat the labeled images at all?

A benchmark where 10,000 real images cannot beat 50 labeled ones measures the schedule, not the
data (issue 17). For each downstream configuration (model, width, optimizer steps) this trains,
on the quality study's rendered sets (`quality.Study`, same seeds, same test images):

* the ``oracle``: 10,000 real rendered labeled images (augmented), ``--oracle-draws`` seeds;
* the ``baseline``: 16 and 50 labeled images (augmented), ``--draws`` draws each;

and prints the headroom check per task: the oracle beats each baseline by at least ``--min-sd``
(3) standard deviations of the baseline's draws on the task's primary metric, and for
segmentation it learns the small parts (IoU >= 0.3 on eye, nose and mouth). The curve (every
configuration's scores, per-class IoU and CPU cost per step) goes to
``benchmarks/results/headroom-cpu.json`` together with the checks.

Each training's result is cached under ``--work`` (by configuration, arm, draw, task and test
size): rerunning with more configurations, draws or tasks trains only what is new. The cache
does not track the training code: delete ``benchmarks/work/headroom`` after changing it.

    python benchmarks/headroom.py --configs unet-8@600 unet-16@1200 --tasks seg --draws 2 --test-n 300
    python benchmarks/headroom.py --configs unet-16@1200 --arms oracle     # the oracle first: learns the parts?

A configuration is ``MODEL-WIDTH@STEPS``: ``unet-16@1200`` is the UNet of width 16 trained for
1,200 steps; ``vgg16-8@600`` the UNet with an ImageNet VGG16 encoder (`handsoff bench
--pretrained vgg16`) and a decoder of width 8. Run it with one thread (``OMP_NUM_THREADS=1``):
the CPU seconds it records are this process's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from quality import DEFAULT_ENCODER, Settings, Study, write_json  # noqa: E402
from handsoff.bench.defaults import PRETRAINED  # noqa: E402
from handsoff.bench.tasks import TASKS  # noqa: E402
from handsoff.bench.train import train_and_score  # noqa: E402
from handsoff.defaults import DEFAULT_GENERATOR  # noqa: E402
from handsoff.errors import HandsoffError  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: The parts a user labels for, which the oracle must learn (IoU at least MIN_PART_IOU each).
SMALL_PARTS = ("eye", "nose", "mouth")
MIN_PART_IOU = 0.3
MIN_SD = 3.0
SIZES = (16, 50)


@dataclass(frozen=True)
class Config:
    """One downstream configuration: a UNet (from scratch or on a pretrained encoder), its width and steps."""

    model: str  # 'unet' or a pretrained encoder name ('vgg16', ...)
    width: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.width}@{self.steps}"

    @property
    def pretrained(self) -> Optional[str]:
        return None if self.model == "unet" else self.model


def parse_config(text: str) -> Config:
    """``MODEL-WIDTH@STEPS`` (``unet-16@1200``, ``vgg16-8@600``) as a `Config`.

    Raises:
        HandsoffError: malformed, or an unknown model (one line naming it).
    """
    match = re.fullmatch(r"([a-z0-9_]+)-(\d+)@(\d+)", text)
    if not match:
        raise HandsoffError(f"--configs {text!r}: expected MODEL-WIDTH@STEPS, e.g. unet-16@1200 or vgg16-8@600")
    model, width, steps = match.group(1), int(match.group(2)), int(match.group(3))
    if model != "unet" and model not in PRETRAINED:
        raise HandsoffError(f"--configs {text!r}: model must be unet or one of {', '.join(PRETRAINED)}")
    if width < 1 or steps < 1:
        raise HandsoffError(f"--configs {text!r}: width and steps must be at least 1")
    return Config(model, width, steps)


# ---------------------------------------------------------------------------------------------
# The check (pure functions of the recorded scores: tested without training anything)

def cell_stats(values: Sequence[float]) -> dict[str, Any]:
    """Values (NaN and None dropped), mean and sample sd (None under two values) of one arm's draws."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    return {"values": vals, "mean": float(np.mean(vals)) if vals else None,
            "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}


def margin_in_sd(oracle: float, baseline: dict[str, Any], higher_is_better: bool) -> Optional[float]:
    """How many of the baseline draws' standard deviations the oracle is better by (None: under 2 draws).

    A baseline with no spread at all gives +inf when the oracle is better, -inf when worse.
    """
    sd, mean = baseline.get("sd"), baseline.get("mean")
    if sd is None or mean is None:
        return None
    gain = (oracle - mean) if higher_is_better else (mean - oracle)
    if sd == 0:
        return math.inf if gain > 0 else -math.inf if gain < 0 else 0.0
    return gain / sd


def headroom_check(cells: dict[str, Any], task: str, *, min_sd: float = MIN_SD, parts: Sequence[str] = SMALL_PARTS,
                   min_part_iou: float = MIN_PART_IOU) -> dict[str, Any]:
    """Whether one configuration has headroom on ``task``.

    Args:
        cells: ``{"oracle": stats, "baseline-16": stats, "baseline-50": stats}``, each stats as
            `cell_stats` returns plus, for seg, ``per_class_iou`` (mean over draws).
        task: the task (its primary metric's direction decides "better").

    Returns:
        ``{"holds": bool, "by_labeled": {n: {"margin_sd", "holds"}}, "parts": {...}}``: ``holds``
        is False when anything is missing (a baseline with fewer than 2 draws has no sd).
    """
    higher = TASKS[task].primary[1]
    oracle = (cells.get("oracle") or {}).get("mean")
    out: dict[str, Any] = {"metric": TASKS[task].primary[0], "by_labeled": {}}
    holds = oracle is not None
    for n in SIZES:
        base = cells.get(f"baseline-{n}")
        if oracle is None or not base:
            out["by_labeled"][str(n)] = {"margin_sd": None, "holds": False, "missing": True}
            holds = False
            continue
        margin = margin_in_sd(oracle, base, higher)
        ok = margin is not None and margin >= min_sd
        out["by_labeled"][str(n)] = {"margin_sd": margin, "holds": ok, "oracle": oracle, "baseline": base["mean"],
                                     "baseline_sd": base["sd"], "baseline_draws": len(base["values"])}
        holds &= ok
    if task == "seg":
        ious = (cells.get("oracle") or {}).get("per_class_iou") or {}
        part = {name: ious.get(name) for name in parts}
        parts_ok = all(v is not None and v >= min_part_iou for v in part.values())
        out["parts"] = {"oracle_iou": part, "min_iou": min_part_iou, "holds": parts_ok}
        holds &= parts_ok
    out["holds"] = bool(holds)
    return out


def cheapest_with_headroom(table: dict[str, Any], checks: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The configuration with headroom on every task measured for it, at the lowest CPU cost per training."""
    best = None
    for name, tasks in checks.items():
        if not tasks or not all(c["holds"] for c in tasks.values()):
            continue
        config = parse_config(name)
        rates = [cell["cpu_seconds_per_step"] for cells in table[name].values() for cell in cells.values()
                 if cell.get("cpu_seconds_per_step")]
        cost = float(np.median(rates)) * config.steps if rates else math.inf
        if best is None or cost < best["cpu_seconds_per_training"]:
            best = {"config": name, "tasks": sorted(tasks), "cpu_seconds_per_training": round(cost, 1)}
    return best


def check_lines(name: str, checks: dict[str, Any]) -> list[str]:
    """The check as printed: one line per task."""
    lines = []
    for task, c in checks.items():
        parts = []
        for n, v in c["by_labeled"].items():
            if v.get("missing"):
                parts.append(f"n={n}: not measured")
            elif v["margin_sd"] is None:
                parts.append(f"n={n}: oracle {v['oracle']:.3f} vs {v['baseline']:.3f} (1 draw, no sd)")
            else:
                parts.append(f"n={n}: oracle {v['oracle']:.3f} vs {v['baseline']:.3f} ± {v['baseline_sd']:.3f} "
                             f"= {v['margin_sd']:+.1f} sd")
        if "parts" in c:
            ious = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in c["parts"]["oracle_iou"].items())
            parts.append(f"oracle parts: {ious}")
        lines.append(f"- {name} {task} {c['metric']}: headroom {'YES' if c['holds'] else 'no'} ({'; '.join(parts)})")
    return lines


# ---------------------------------------------------------------------------------------------
# Measuring

def run_cell(study: Study, config: Config, arm: str, n: Optional[int], draw: int, task: str,
             work: Path, progress: bool) -> dict[str, Any]:
    """Train and score one model (cached under ``work``); adds ``cpu_seconds`` of the training."""
    tag = f"{config.name}-{arm}{'' if n is None else f'-n{n}'}-d{draw}-{task}-t{study.s.test_n}-o{study.s.oracle_n}"
    path = work / "runs" / f"{tag}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    data = study.train_set(arm, n if n is not None else SIZES[0], draw)
    print(f"[headroom {datetime.datetime.now():%H:%M:%S}] train {tag}: {len(data)} samples", flush=True)
    cpu = time.process_time()
    result = train_and_score([data], study.test_set(), task, steps=config.steps, batch=study.s.batch,
                             lr=study.s.lr, seed=draw, base=config.width, pretrained=config.pretrained,
                             progress=progress, extra={"arm": arm, "labeled": n, "draw": draw, "config": config.name})
    result["cpu_seconds"] = round(time.process_time() - cpu, 1)
    write_json(path, result)
    return result


def summarize_cells(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Scores of one configuration and task, per arm: primary metric stats, per-class IoU, CPU cost."""
    cells: dict[str, Any] = {}
    for key in sorted({(r["extra"]["arm"], r["extra"]["labeled"]) for r in runs}, key=str):
        picked = [r for r in runs if (r["extra"]["arm"], r["extra"]["labeled"]) == key]
        name = key[0] if key[1] is None else f"{key[0]}-{key[1]}"
        cell = cell_stats([r["primary_metric"]["value"] for r in picked])
        per_class = [r["metrics"].get("per_class_iou") for r in picked if r["metrics"].get("per_class_iou")]
        if per_class:
            cell["per_class_iou"] = {c: cell_stats([p[c] for p in per_class if p.get(c) is not None])["mean"]
                                     for c in per_class[0]}
        cpu = [r["cpu_seconds"] / r["settings"]["steps"] for r in picked if "cpu_seconds" in r]
        cell["cpu_seconds_per_step"] = round(float(np.median(cpu)), 4) if cpu else None
        cells[name] = cell
    return cells


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["unet-8@600"], metavar="MODEL-WIDTH@STEPS",
                   help="downstream configurations (default: unet-8@600, the study's before issue 17)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=["seg"], help="tasks (default: seg)")
    p.add_argument("--arms", nargs="+", choices=("oracle", "baseline"), default=["oracle", "baseline"])
    p.add_argument("--draws", type=int, default=2, help="baseline draws per number of labeled images (default: 2)")
    p.add_argument("--oracle-draws", type=int, default=1, help="oracle seeds (default: 1)")
    p.add_argument("--test-n", type=int, default=300, help="test images (default: 300; the study's 1,000 start "
                                                            "with the same 300)")
    p.add_argument("--oracle-n", type=int, default=10_000, help="oracle training images (default: 10000)")
    p.add_argument("--min-sd", type=float, default=MIN_SD, help="required margin in baseline sds (default: 3)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    p.add_argument("--out", type=Path, default=RESULTS / "headroom-cpu.json")
    p.add_argument("--note", action="append", default=[], help="a line recorded in the results (what was cut)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except HandsoffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    settings = replace(Settings(), test_n=args.test_n, oracle_n=args.oracle_n, tasks=tuple(args.tasks))
    # The quality study's work folder holds the rendered sets: the same images, rendered once.
    study = Study(settings, args.work / "quality", torch.device("cpu"), DEFAULT_ENCODER, DEFAULT_GENERATOR,
                  progress=not args.no_progress)
    work = args.work / "headroom"
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if not (work / ".gitignore").exists():
        (work / ".gitignore").write_text("*\n")  # the cache never shows up in git
    previous = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    started, load_before = time.perf_counter(), load_average()
    try:
        for config in configs:
            for task in args.tasks:
                # The oracle, then the baseline of 50 first: the closest to the oracle, it decides first.
                todo = ([("oracle", None, d) for d in range(args.oracle_draws)] if "oracle" in args.arms else []) + \
                       ([("baseline", n, d) for n in reversed(SIZES) for d in range(args.draws)]
                        if "baseline" in args.arms else [])
                for arm, n, draw in todo:
                    run_cell(study, config, arm, n, draw, task, work, not args.no_progress)
    except HandsoffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # The curve holds every cached training of this test and oracle size, so a run that adds
    # one configuration keeps the others.
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted((work / "runs").glob(f"*-t{args.test_n}-o{args.oracle_n}.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        runs.setdefault(run["extra"]["config"], {}).setdefault(run["task"], []).append(run)
    table = {name: {task: summarize_cells(task_runs) for task, task_runs in tasks.items()}
             for name, tasks in runs.items()}
    checks = {name: {task: headroom_check(cells, task, min_sd=args.min_sd) for task, cells in tasks.items()}
              for name, tasks in table.items()}
    lines = [line for name in table for line in check_lines(name, checks[name])]
    chosen = cheapest_with_headroom(table, checks)
    lines.append(f"cheapest configuration with headroom: {chosen['config']} ({', '.join(chosen['tasks'])}; "
                 f"{chosen['cpu_seconds_per_training']:.0f} CPU-s per training)" if chosen else
                 "no configuration measured has headroom")
    record = {
        "benchmark": "headroom: the oracle (10,000 real images) against 16 and 50 labeled images, per downstream "
                     "configuration",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {"test_n": args.test_n, "oracle_n": args.oracle_n, "batch": settings.batch, "lr": settings.lr,
                     "min_sd": args.min_sd, "small_parts": list(SMALL_PARTS), "min_part_iou": MIN_PART_IOU},
        "load_average": {"before": load_before, "after": load_average()},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "notes": previous.get("notes", []) + [n for n in args.note if n not in previous.get("notes", [])],
        "curve": table, "checks": checks, "chosen": chosen, "check_text": lines,
        "how_to_rerun": " ".join(["python benchmarks/headroom.py",
                                  *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    }
    write_json(args.out, record)
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
