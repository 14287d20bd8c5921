"""Agreement filtering (issue 15, lever 4), the combined arms and self-training (issue 17, goals 2 and 4).

On the levers' setting (`levers.py`: draw 0 of 16 labeled heads, the default pipeline's corpus
of 2,000 generated images, row ``+flow``; UNet-8, 600 steps, batch 16; 300 test renders), a
*teacher* is the baseline model itself: trained on the 16 labeled images alone (training seed
0), one per task. Its predictions on the corpus images and on 2,000 unlabeled real renders
(the first 2,000 of the oracle set, seed 7002: what the generator was trained on, which a user
has without labels) give every arm below (`handsoff.bench.relabel`):

* ``baseline``: the 16 labeled images alone;
* ``corpus``: the handsoff corpus alone; ``corpus+labeled``: mixed with the labeled images, which
  are half of every batch (``mix=0.5``);
* ``agree50``: the half of the corpus whose labels agree most with the teacher's predictions
  (`keep_most_agreeing`), alone and ``+labeled``;
* ``js50+labeled``: the half with the lowest JS uncertainty (the pipeline's own ``--filter``),
  and ``agree50+js+labeled``: both filters (agreement ranks within the JS half) - the
  comparison the lever asks for;
* ``selftrain-generated+labeled``: the corpus images with the teacher's labels (pseudo-labels)
  instead of handsoff's, mixed with the labeled images - what a user could do with the
  generator alone, no labeler;
* ``selftrain-real+labeled``: the same on the 2,000 unlabeled real renders - what a user could do
  without any generator. handsoff is only worth its pipeline where it beats both.

The arms of `SEED_ARMS` are trained with every one of ``--seeds`` (default 0 1 2; the teacher is
always seed 0), seed by seed, then the other arms with the first seed; the record gives every
seed's score and mean ± sd per arm and task. Everything is cached
under ``--work`` (default ``benchmarks/work/agreement``); the results file is rewritten after
every training, so what finished is recorded if the run is stopped. ``--deadline HH:MM`` skips
trainings that would end past it. It reads the levers' cache (corpus, study sets): run
``levers.py --rows +flow`` first where that is missing.

    OMP_NUM_THREADS=1 python benchmarks/agreement.py --deadline 21:00
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import levers as levers_module  # noqa: E402  (the levers' corpus and cached sets)
import quality  # noqa: E402
from _machine import device_name, load_average  # noqa: E402
from handsoff.bench.data import filter_by_uncertainty, open_train_set  # noqa: E402
from handsoff.bench.relabel import Relabeled, agreement_scores, keep_most_agreeing, predict_dataset  # noqa: E402
from handsoff.bench.tasks import TASKS  # noqa: E402
from handsoff.bench.train import train_and_score  # noqa: E402
from handsoff.data.shards import ShardDataset  # noqa: E402

ROW = "+flow"  # the default pipeline's corpus (refine 50, flow label transfer, no tuning)
KEEP = 0.5
MIX = 0.5
UNLABELED_N = 2000
#: The arms compared at every training seed, run first (seed by seed).
SEED_ARMS = ("baseline", "corpus+labeled", "selftrain-generated+labeled", "agree50+labeled", "selftrain-real+labeled")
#: Then these, at the first seed only.
ARMS = (*SEED_ARMS, "agree50", "js50+labeled", "agree50+js+labeled", "corpus")
GUESS_TRAIN_S = 250.0


def _say(message: str) -> None:
    print(f"[agreement {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


class Arms:
    """Builds each arm's training sets (teacher predictions cached) and runs its trainings (cached)."""

    def __init__(self, settings: quality.Settings, work: Path, quality_work: Path, levers_work: Path,
                 deadline: Optional[float], progress: bool) -> None:
        self.s, self.work, self.deadline, self.progress = settings, work, deadline, progress
        work.mkdir(parents=True, exist_ok=True)
        if not (work / ".gitignore").exists():
            (work / ".gitignore").write_text("*\n")
        self.levers = levers_module.Levers(settings, levers_work, quality_work, None, progress)
        self.base = self.levers.base
        row = next(r for r in levers_module.ROWS if r.name == ROW)
        self.corpus_path = levers_work / f"corpus-{self.levers.labeler_key(row)}-n{settings.n_generated}"
        if not (self.corpus_path / "manifest.json").is_file():
            raise SystemExit(f"{self.corpus_path}: missing; run `python benchmarks/levers.py --rows {ROW}` first")
        self.corpus = ShardDataset(self.corpus_path)
        oracle = self.base.rendered("oracle", settings.oracle_n, quality.SEEDS["oracle"])
        self.unlabeled = Subset(open_train_set(oracle, augment=False), list(range(UNLABELED_N)))
        self.seconds: list[float] = []
        self.skipped: list[str] = []
        self._predictions: dict[tuple[str, str], np.ndarray] = {}

    def labeled(self) -> Dataset:
        return open_train_set(self.levers.labeled_dir)

    def _train(self, what: str, make: Callable[[], Any]) -> Any:
        expected = max(self.seconds) if self.seconds else GUESS_TRAIN_S
        if self.deadline is not None and time.time() + expected > self.deadline:
            self.skipped.append(what)
            return None
        _say(f"{what} (about {expected:.0f} s)")
        start = time.perf_counter()
        out = make()
        self.seconds.append(time.perf_counter() - start)
        return out

    def _fit(self, train_sets: list[Dataset], task: str, seed: int, arm: str, **options: Any) -> Any:
        return train_and_score(train_sets, test=self.base.test_set(), task=task, steps=self.s.steps,
                               batch=self.s.batch, lr=self.s.lr, seed=seed, progress=self.progress,
                               base=self.s.width, extra={"arm": arm, "labeled": levers_module.LABELED_N,
                                                         "draw": levers_module.DRAW}, **options)

    def teacher_predictions(self, task: str, what: str) -> Optional[np.ndarray]:
        """The teacher's predictions on the corpus (``what='corpus'``) or the unlabeled renders (cached)."""
        key = (task, what)
        if key not in self._predictions:
            path = self.work / f"teacher-{task}-{what}.npy"
            if not path.is_file():
                made = self._train(f"teacher {task}: train on the 16 labeled images (seed 0)",
                                   lambda: self._fit([self.labeled()], task, 0, "baseline", return_model=True))
                if made is None:
                    return None
                result, model = made
                quality.write_json(self.work / f"run-baseline-{task}-s0.json", result)
                for name, data in (("corpus", self.corpus), ("real", self.unlabeled)):
                    np.save(self.work / f"teacher-{task}-{name}.npy", predict_dataset(model, task, data))
            self._predictions[key] = np.load(path)
        return self._predictions[key]

    def train_sets(self, arm: str, task: str) -> Optional[tuple[list[Dataset], dict[str, Any]]]:
        """The arm's training sets and options, or None where the teacher could not be trained in time."""
        plus = arm.endswith("+labeled")
        extra = ([self.labeled()], {"mix": MIX}) if plus else ([], {})
        if arm == "baseline":
            return [self.labeled()], {}
        if arm in ("corpus", "corpus+labeled"):
            return [self.corpus, *extra[0]], extra[1]
        if arm == "js50+labeled":
            return [filter_by_uncertainty(self.corpus, KEEP), *extra[0]], extra[1]
        if arm.startswith("selftrain"):
            what = "corpus" if "generated" in arm else "real"
            predictions = self.teacher_predictions(task, what)
            if predictions is None:
                return None
            data = self.corpus if what == "corpus" else self.unlabeled
            return [Relabeled(data, task, predictions), *extra[0]], extra[1]
        predictions = self.teacher_predictions(task, "corpus")
        if predictions is None:
            return None
        scores = agreement_scores(self.corpus, task, predictions)
        if "+js" in arm:
            js = filter_by_uncertainty(self.corpus, KEEP)
            kept = keep_most_agreeing(js, scores[js.indices], KEEP)
            subset = Subset(self.corpus, [js.indices[i] for i in kept.indices])
        else:
            subset = keep_most_agreeing(self.corpus, scores, KEEP)
        return [subset, *extra[0]], extra[1]

    def run(self, arm: str, task: str, seed: int) -> Optional[dict[str, Any]]:
        """One training of ``arm`` (cached), or None where it was skipped for the deadline."""
        path = self.work / f"run-{arm}-{task}-s{seed}.json"
        if not path.is_file():
            if arm == "baseline" and seed == 0:
                self.teacher_predictions(task, "corpus")  # trains (and records) the teacher
                return json.loads(path.read_text()) if path.is_file() else None
            made = self.train_sets(arm, task)
            if made is None:
                return None
            sets, options = made
            result = self._train(f"{arm} {task} seed {seed}", lambda: self._fit(sets, task, seed, arm, **options))
            if result is None:
                return None
            quality.write_json(path, result)
        return json.loads(path.read_text())


def _summary(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    values = {seed: run["primary_metric"]["value"] for seed, run in sorted(runs.items())}
    array = np.array(list(values.values()))
    return {"by_seed": values, "mean": float(array.mean()), "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
            "n": len(array), "supervised_fraction": float(np.mean([r["supervised_fraction"] for r in runs.values()])),
            "train_size": next(iter(runs.values()))["train_size"]}


def markdown(record: dict[str, Any]) -> str:
    tasks = record["settings"]["tasks"]
    header = ["arm", *[f"{t} {TASKS[t].primary[0]} ({'higher' if TASKS[t].primary[1] else 'lower'} is better)"
                       for t in tasks]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, by_task in record["arms"].items():
        cells = []
        for t in tasks:
            s = by_task.get(t)
            if not s:
                cells.append("-")
            elif s["n"] > 1:
                cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f} (n={s['n']})")
            else:
                cells.append(f"{s['mean']:.3f} (n=1)")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: 0 1 2; "
                   "the seeds after the first only for SEED_ARMS)")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--steps", type=int, help="downstream steps (default: the study's, 600; fewer for a smoke run)")
    p.add_argument("--deadline", help="HH:MM machine time: trainings that would end past it are skipped")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "agreement")
    p.add_argument("--levers-work", type=Path, default=Path(__file__).parent / "work" / "levers")
    p.add_argument("--quality-work", type=Path, default=Path(__file__).parent / "work" / "quality")
    p.add_argument("--out", type=Path, default=quality.RESULTS / "agreement-cpu.json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), load_average()
    settings = replace(quality.Settings(), sizes=(levers_module.LABELED_N,), test_n=300, heldout_n=32,
                       n_generated=2000, steps=args.steps or quality.Settings().steps)
    arms = Arms(settings, args.work, args.quality_work, args.levers_work, levers_module._deadline(args.deadline),
                not args.no_progress)
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    record: dict[str, Any] = {
        "benchmark": "agreement filtering, combined arms and self-training on the levers' setting (issues 15 and "
                     "17): downstream models per arm, 16 labeled heads (quality study draw 0)",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores (shared with a GAN training at nice 10 and a "
                  f"test loop at nice 15)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {"labeled": f"{arms.levers.labeled_dir.name} (draw {levers_module.DRAW})",
                     "corpus": f"{arms.corpus_path.name} (levers row {ROW}: {len(arms.corpus)} images)",
                     "unlabeled_real": f"oracle-n{settings.oracle_n}-s{quality.SEEDS['oracle']}, first {UNLABELED_N}",
                     "test": f"test-n{settings.test_n}-s{quality.SEEDS['test']}", "tasks": args.tasks,
                     "keep": KEEP, "mix": MIX, "teacher": "the baseline model, training seed 0",
                     "training": settings.training(), "seeds": args.seeds},
        "arms": {},
    }

    def save() -> None:
        record["arms"] = {arm: {task: _summary(r) for task, r in by_task.items() if r}
                          for arm, by_task in runs.items()}
        record.update(load_average={"before": load_before, "now": load_average()},
                      wall_time_s=round(time.perf_counter() - started, 1),
                      cpu_time_s=round(time.process_time() - cpu_started, 1),
                      train_seconds=[round(s, 1) for s in arms.seconds], skipped_past_deadline=arms.skipped,
                      how_to_rerun=" ".join(["python benchmarks/agreement.py",
                                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)]))
        record["markdown"] = markdown(record)
        quality.write_json(args.out, record)

    # Every seed of the compared arms first, then the other arms at the first seed: a run cut short by
    # the deadline leaves spreads for the main comparison rather than single figures for every arm.
    order = [(arm, seed) for seed in args.seeds for arm in SEED_ARMS if arm in args.arms]
    order += [(arm, args.seeds[0]) for arm in ARMS if arm in args.arms and arm not in SEED_ARMS]
    for arm, seed in order:
        for task in args.tasks:
            result = arms.run(arm, task, seed)
            if result is not None:
                runs.setdefault(arm, {}).setdefault(task, {})[seed] = result
            save()
    save()
    print(record["markdown"])
    print(f"\nwrote {args.out} ({record['wall_time_s']:.0f} s wall, {record['cpu_time_s']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
