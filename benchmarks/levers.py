"""Label alignment levers of issue 15, lever by lever, down to the downstream model.

On the quality study's draw 0 of 16 labeled heads (seed 7100, 64 px, the study's cache under
``benchmarks/work/quality`` supplies the rendered sets and the inversions), each row makes the
labeler one way and measures:

* reconstruction LPIPS-VGG / PSNR of the 16 labeled images (by G, or by G' where tuned);
* the labeler on held-out real images through their reconstructions (the study's "labeler on
  held-out" limit): seg mIoU, PCK@0.05 / @0.1, depth RMSE. Held-out codes are the row's
  inversion of the held-out renders under G; a tuned row draws those same codes with G'
  (G' is tuned on the 16 labeled images only);
* downstream: a corpus of ``--n-generated`` images (unfiltered) labeled by that labeler (and drawn
  by G' where tuned), one UNet training per task with the study's schedule (600 steps, batch
  16, width 8, training seed 0), scored on the study's test renders (seed 7001), next to the
  baseline model trained on the 16 labeled images alone with the same settings and test set
  (`quality.Study.run`).

Rows (``ROWS``, the most informative first): the pipeline as the study runs it (refine 50),
+ flow label transfer (`fit_labeler(transfer_labels="flow")`), + pivotal tuning
(`handsoff.invert.tune.tune_generator`, its defaults: 300 steps) with and without flow, the
encoder alone (refine 0, as ``handsoff demo`` runs) with and without flow, refine 150 with and
without flow. Labelers: the study's full-profile setting (3 members, 1,000 steps, seed 0).
Order of work: tuning, labelers and held-out scores of the rows whose inversions the study has
cached (refine 0 and 50); the baseline; each of those rows' corpus and trainings in row order;
then the rows that need new inversions (refine 150), each whole.

Every artefact (tuned generators, labelers, held-out scores, corpora, trainings) is cached under
``--work`` (default ``benchmarks/work/levers``, ignored by git), so a rerun skips finished work;
the results file is rewritten after every finished step, so what finished is recorded if the
run is stopped. ``--deadline HH:MM`` (machine time) skips steps whose measured (or guessed) cost
would end past it. Upstream code is not tracked: delete the work folder after changing it.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/levers.py --deadline 17:50
    python benchmarks/levers.py --rows pipeline +flow --n-generated 200 --steps 20 --test-n 32 \\
        --work /tmp/levers --out /tmp/levers.json                          # a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402  (the study's settings, seeds, cached sets and latents, baseline runs)
from _machine import device_name, load_average  # noqa: E402
from handsoff.bench.tasks import TASKS  # noqa: E402
from handsoff.bench.train import train_and_score  # noqa: E402
from handsoff.gan.checkpoints import load_generator, save_generator  # noqa: E402
from handsoff.invert.tune import TUNE_STEPS, tune_generator  # noqa: E402
from handsoff.label.evaluate import evaluate_labeler  # noqa: E402
from handsoff.label.io import load_labeler, save_labeler  # noqa: E402
from handsoff.label.train import fit_labeler  # noqa: E402

DRAW = 0
LABELED_N = 16
TRAINING_SEED = 0  # the study's seed for draw 0


@dataclass(frozen=True)
class Row:
    """One way of making the labeler: refinement steps of the inversion, pivotal tuning steps, flow transfer."""

    name: str
    refine: int
    tune_steps: int = 0
    flow: bool = False


ROWS = (
    Row("pipeline", 50),
    Row("+flow", 50, flow=True),
    Row("+tune+flow", 50, TUNE_STEPS, True),
    Row("+tune", 50, TUNE_STEPS),
    Row("encoder-only", 0),
    Row("encoder-only+flow", 0, flow=True),
    Row("refine150", 150),
    Row("refine150+flow", 150, flow=True),
)
#: First guesses of a step's wall seconds on the loaded 2-core machine, replaced by measured ones.
GUESS_S = {"tune": 700.0, "labeler": 200.0, "invert": 900.0, "generate": 250.0, "train": 250.0}


def _say(message: str) -> None:
    print(f"[levers {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


def _digest(**parts: Any) -> str:
    """Short digest of the settings an artefact depends on (its cache name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


class OutOfTime(Exception):
    """A step would end past the deadline."""


class Levers:
    """Makes (or finds in ``work``) each row's artefacts and keeps the results record up to date."""

    def __init__(self, settings: quality.Settings, work: Path, quality_work: Path, deadline: Optional[float],
                 progress: bool) -> None:
        self.s, self.work, self.deadline, self.progress = settings, work, deadline, progress
        self.quality_work = quality_work
        self.device = torch.device("cpu")
        self.studies: dict[int, quality.Study] = {}
        self.base = self.study(settings.refine_steps)
        self.labeled_dir = self.base.labeled(LABELED_N, DRAW)
        self.heldout_dir = self.base.rendered("heldout", settings.heldout_n, quality.SEEDS["heldout"])
        self.labels, self.heldout = self.base.labeled_set(self.labeled_dir), self.base.labeled_set(self.heldout_dir)
        self.rates: dict[str, list[float]] = {}
        self.skipped: list[str] = []
        work.mkdir(parents=True, exist_ok=True)
        if not (work / ".gitignore").exists():
            (work / ".gitignore").write_text("*\n")  # the work folder never shows up in git

    # ----------------------------------------------------------------------- time keeping
    def _timed(self, kind: str, what: str, make: Callable[[], Any]) -> Any:
        """Run ``make`` unless its expected cost ends past the deadline; record its wall seconds."""
        seconds = self.rates.get(kind)
        expected = max(seconds) if seconds else GUESS_S[kind]
        if self.deadline is not None and time.time() + expected > self.deadline:
            self.skipped.append(what)
            raise OutOfTime(f"{what}: about {expected:.0f} s, past the deadline")
        _say(f"{what} (about {expected:.0f} s)")
        start = time.perf_counter()
        out = make()
        self.rates.setdefault(kind, []).append(time.perf_counter() - start)
        return out

    # ----------------------------------------------------------------------- inputs
    def study(self, refine: int) -> quality.Study:
        """The quality study at ``refine`` refinement steps (its cache: sets, latents, baseline runs)."""
        if refine not in self.studies:
            self.studies[refine] = quality.Study(replace(self.s, refine_steps=refine), self.quality_work,
                                                 self.device, quality.DEFAULT_ENCODER, quality.DEFAULT_GENERATOR,
                                                 progress=self.progress)
        return self.studies[refine]

    def latents(self, row: Row, images: Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """The row's inversion of a folder under G (cached by the study), and its LPIPS/PSNR."""
        pipeline = quality.PIPELINES["main" if row.refine else "no-refine"]
        study = self.study(row.refine or self.s.refine_steps)
        if row.refine in (0, self.s.refine_steps):  # the study's, already in its cache
            return study.latents(pipeline, images)
        return self._timed("invert", f"{row.name}: invert {images.name} (refine {row.refine})",
                           lambda: study.latents(pipeline, images))

    def generator(self, row: Row) -> tuple[torch.nn.Module, Path, Optional[dict[str, Any]]]:
        """G, or G' tuned on the 16 labeled images at the row's pivots (cached): the module, its file, its figures."""
        G = self.base.generator()
        if not row.tune_steps:
            return G, quality.DEFAULT_GENERATOR, None
        ws, _ = self.latents(row, self.labeled_dir)
        key = _digest(refine=row.refine, steps=row.tune_steps, seed=0, labeled=self.labeled_dir.name,
                      generator=self.base.generator_digest())
        path, report = self.work / f"tuned-{key}.safetensors", self.work / f"tuned-{key}.json"
        if not (path.is_file() and report.is_file()):
            def tune() -> None:
                result = tune_generator(G, ws, np.stack(self.labels.images), steps=row.tune_steps,
                                        lpips=self.base.lpips(), seed=0, progress=self.progress)
                save_generator(result.generator, path, extra_metadata={"tune_settings": result.settings})
                quality.write_json(report, {**result.summary(), "seconds": round(result.seconds, 1),
                                     "settings": result.settings})
            self._timed("tune", f"{row.name}: tune G ({row.tune_steps} steps)", tune)
        return load_generator(path, device=self.device), path, json.loads(report.read_text())

    # ----------------------------------------------------------------------- the row's artefacts
    def labeler_key(self, row: Row) -> str:
        return _digest(row=asdict(row), labeled=self.labeled_dir.name, steps=self.s.labeler_steps,
                       ensemble=self.s.ensemble, seed=DRAW, generator=self.base.generator_digest())

    def labeler(self, row: Row, G: torch.nn.Module) -> Path:
        """The row's labeler file (cached)."""
        path = self.work / f"labeler-{self.labeler_key(row)}.safetensors"
        if not path.is_file():
            ws, _ = self.latents(row, self.labeled_dir)
            transfer = {"transfer_labels": "flow"} if row.flow else {}
            self._timed("labeler", f"{row.name}: fit labeler ({self.s.labeler_steps} steps, {self.s.ensemble} members)",
                        lambda: save_labeler(path, fit_labeler(G, ws, self.labels, ensemble=self.s.ensemble,
                                                               steps=self.s.labeler_steps, seed=DRAW,
                                                               device=self.device, progress=self.progress,
                                                               **transfer), G))
        return path

    def on_heldout(self, row: Row, G: torch.nn.Module, labeler: Path) -> dict[str, Any]:
        """The labeler on the held-out renders through their reconstructions (cached)."""
        path = self.work / f"heldout-{self.labeler_key(row)}-{self.heldout_dir.name}.json"
        if not path.is_file():
            ws, inv = self.latents(row, self.heldout_dir)
            scores = evaluate_labeler(G, load_labeler(labeler, G=G, device=self.device), ws, self.heldout)
            quality.write_json(path, {"seg_miou": scores["seg"]["miou"], "seg_per_class_iou": scores["seg"]["per_class_iou"],
                               "pck@0.05": scores["keypoints"]["pck@0.05"], "pck@0.1": scores["keypoints"]["pck@0.1"],
                               "depth_rmse": scores["depth"]["rmse"],
                               "heldout_reconstruction_by_G": {"lpips": inv["lpips_mean"], "psnr": inv["psnr_mean"]}})
        return json.loads(path.read_text())

    def corpus(self, row: Row, labeler: Path, generator: Path) -> Path:
        """``n_generated`` samples of the row's generator labeled by its labeler, unfiltered (cached; resumes)."""
        from handsoff.data.shards import read_manifest
        from handsoff.synth.generation import generate
        from handsoff.synth.settings import GenerateSettings

        path = self.work / f"corpus-{self.labeler_key(row)}-n{self.s.n_generated}"
        manifest = read_manifest(path) if (path / "manifest.json").is_file() else None
        if manifest is None or not manifest.complete:
            settings = GenerateSettings(n=self.s.n_generated, seed=quality.SEEDS["generate"],
                                        truncation=self.s.truncation, filter=0.0)
            self._timed("generate", f"{row.name}: generate {self.s.n_generated} labeled samples",
                        lambda: generate(labeler, path, settings, generator=generator, device="cpu",
                                         progress=self.progress))
        return path

    def downstream(self, row: Row, corpus: Path, task: str) -> dict[str, Any]:
        """One downstream training on the corpus, scored on the test set (cached)."""
        from handsoff.data.shards import ShardDataset
        from handsoff.utils.io import sha256_file

        key = _digest(corpus=sha256_file(corpus / "manifest.json"), train=self.s.training(), test=self.s.test_n,
                      seed=TRAINING_SEED)
        path = self.work / f"run-{self.labeler_key(row)}-{task}-{key}.json"
        if not path.is_file():
            result = self._timed("train", f"{row.name}: train {task} ({self.s.steps} steps)", lambda: train_and_score(
                [ShardDataset(corpus)], test=self.base.test_set(), task=task, steps=self.s.steps, batch=self.s.batch,
                lr=self.s.lr, seed=TRAINING_SEED, device=self.device, progress=self.progress, base=self.s.width,
                extra={"row": row.name, "labeled": LABELED_N, "draw": DRAW}))
            quality.write_json(path, result)
        return json.loads(path.read_text())

    def baseline(self, task: str) -> dict[str, Any]:
        """The baseline model (16 labeled images alone), through the study's cached run (`quality.Study.run`)."""
        return self._timed("train", f"baseline: train {task} (or read it from the study's cache)",
                           lambda: self.base.run("baseline", LABELED_N, DRAW, task))


def _primary(run: dict[str, Any]) -> dict[str, Any]:
    return {"primary": run["primary_metric"], "metrics": {k: v for k, v in run["metrics"].items()
                                                          if isinstance(v, (int, float))},
            "supervised_fraction": run.get("supervised_fraction"), "wall_s": run.get("wall_time_s")}


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(record: dict[str, Any]) -> str:
    """The table: reconstruction, labeler on held-out, downstream per task (baseline first)."""
    tasks = record["settings"]["tasks"]
    header = ["row", "labeled LPIPS / PSNR", "labeler held-out seg / PCK@0.05 / depth RMSE",
              *[f"downstream {t} {TASKS[t].primary[0]}" for t in tasks]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = record["baseline"]
    lines.append("| baseline (16 labeled alone) | - | - | " + " | ".join(
        _fmt((base.get(t) or {}).get("primary", {}).get("value")) for t in tasks) + " |")
    for name, row in record["rows"].items():
        rec, held = row.get("reconstruction") or {}, row.get("labeler_on_heldout") or {}
        lines.append(f"| {name} | {_fmt(rec.get('lpips'))} / {_fmt(rec.get('psnr'), 2)} | "
                     f"{_fmt(held.get('seg_miou'))} / {_fmt(held.get('pck@0.05'))} / {_fmt(held.get('depth_rmse'))} | "
                     + " | ".join(_fmt(((row.get("downstream") or {}).get(t) or {}).get("primary", {}).get("value"))
                                  for t in tasks) + " |")
    return "\n".join(lines)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=[r.name for r in ROWS], default=[r.name for r in ROWS],
                   help="rows, run in the order of ROWS (default: all)")
    p.add_argument("--n-generated", type=int, default=2000, help="generated images per corpus (default: 2000; "
                   "the study: 10000)")
    p.add_argument("--test-n", type=int, default=300, help="test renders (default: 300; the study: 1000)")
    p.add_argument("--heldout-n", type=int, default=32, help="held-out renders (default: 32; the study: 100)")
    p.add_argument("--steps", type=int, help="downstream steps (default: the study's, 600)")
    p.add_argument("--labeler-steps", type=int, help="labeler steps (default: the study's, 1000)")
    p.add_argument("--deadline", help="HH:MM machine time: steps that would end past it are skipped")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "levers")
    p.add_argument("--quality-work", type=Path, default=Path(__file__).parent / "work" / "quality",
                   help="the quality study's cache (default: benchmarks/work/quality)")
    p.add_argument("--out", type=Path, default=quality.RESULTS / "levers-cpu.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _deadline(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    hour, minute = map(int, text.split(":"))
    now = datetime.datetime.now()
    return now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), load_average()
    settings = replace(quality.Settings(), sizes=(LABELED_N,), test_n=args.test_n, heldout_n=args.heldout_n,
                       n_generated=args.n_generated, steps=args.steps or quality.Settings().steps,
                       labeler_steps=args.labeler_steps or quality.Settings().labeler_steps)
    levers = Levers(settings, args.work, args.quality_work, _deadline(args.deadline), not args.no_progress)
    rows = [r for r in ROWS if r.name in args.rows]
    record: dict[str, Any] = {
        "benchmark": "label alignment levers (issue 15): reconstruction, labeler on held-out real images and "
                     "downstream models per lever, 16 labeled heads (quality study draw 0)",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores (shared with a GAN training at nice 10 and other "
                  f"jobs; this ran at nice 5)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "settings": {"labeled": f"{levers.labeled_dir.name} (draw {DRAW})", "heldout": levers.heldout_dir.name,
                     "test": f"test-n{settings.test_n}-s{quality.SEEDS['test']}", "tasks": list(settings.tasks),
                     "n_generated": settings.n_generated, "generate_seed": quality.SEEDS["generate"],
                     "truncation": settings.truncation, "filter": 0.0, "labeler_steps": settings.labeler_steps,
                     "ensemble": settings.ensemble, "labeler_seed": DRAW, "training": settings.training(),
                     "training_seed": TRAINING_SEED, "rows": [asdict(r) for r in rows]},
        "baseline": {}, "rows": {},
    }

    def save() -> None:
        record.update(load_average={"before": load_before, "now": load_average()},
                      wall_time_s=round(time.perf_counter() - started, 1),
                      cpu_time_s=round(time.process_time() - cpu_started, 1),
                      step_seconds={k: [round(v, 1) for v in vs] for k, vs in levers.rates.items()},
                      skipped_past_deadline=levers.skipped,
                      how_to_rerun=" ".join(["python benchmarks/levers.py",
                                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)]))
        record["markdown"] = markdown(record)
        quality.write_json(args.out, record)

    made: dict[str, tuple[Path, Path]] = {}

    def upstream(row: Row) -> None:
        entry = record["rows"].setdefault(row.name, asdict(row))
        try:
            G, gen_path, tuned = levers.generator(row)
            _, inv = levers.latents(row, levers.labeled_dir)
            entry["reconstruction"] = ({"lpips": tuned["lpips_after"], "psnr": tuned["psnr_after"], "by": "G'"}
                                       if tuned else {"lpips": inv["lpips_mean"], "psnr": inv["psnr_mean"], "by": "G"})
            if tuned:
                entry["tune"] = tuned
            labeler = levers.labeler(row, G)
            entry["labeler_on_heldout"] = levers.on_heldout(row, G, labeler)
            made[row.name] = (gen_path, labeler)
        except OutOfTime as stop:
            _say(f"skipped: {stop}")
        save()

    def downstream(row: Row) -> None:
        if row.name not in made:
            return
        gen_path, labeler = made[row.name]
        entry = record["rows"][row.name]
        try:
            corpus = levers.corpus(row, labeler, gen_path)
            entry["corpus"] = str(corpus)
            for task in settings.tasks:
                entry.setdefault("downstream", {})[task] = _primary(levers.downstream(row, corpus, task))
                save()
        except OutOfTime as stop:
            _say(f"skipped: {stop}")
        save()

    # Upstream of the rows whose inversions the study has cached first (cheap next to the trainings),
    # then the baseline, then corpora and trainings row by row, then the rows that need new inversions:
    # an early stop leaves whole columns rather than ragged rows.
    cheap = [r for r in rows if r.refine in (0, settings.refine_steps)]
    for row in cheap:
        upstream(row)
    for task in settings.tasks:
        try:
            record["baseline"][task] = _primary(levers.baseline(task))
        except OutOfTime as stop:
            _say(f"skipped: {stop}")
        save()
    for row in cheap:
        downstream(row)
    for row in rows:
        if row not in cheap:
            upstream(row)
            downstream(row)
    save()
    print(record["markdown"])
    print(f"\nwrote {args.out} ({record['wall_time_s']:.0f} s wall, {record['cpu_time_s']:.0f} s CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
