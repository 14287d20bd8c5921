"""Quality study: does a HandsOff corpus train better downstream models than the labeled images it came from?

On the built-in 'heads' domain with the shipped generator and encoder, for each number of
labeled images (16 and 50) and each of 3 random draws of them, it trains the same
downstream model (`handsoff.bench`, one fixed schedule) on:

* ``baseline``: the labeled images alone, augmented;
* ``baseline-pretrained``: the same, the UNet's encoder starting from ImageNet VGG16 weights
  (``handsoff bench --pretrained vgg16``): the papers' transfer-learning baseline;
* ``handsoff``: 10,000 generated images labeled by a labeler fit on those images
  (render -> invert -> fit_labeler -> generate), unfiltered;
* ``handsoff-filtered``: the same corpus without its 10% most uncertain samples;
* ``handsoff+labeled`` / ``handsoff-filtered+labeled``: that corpus mixed with the labeled
  images, which are a fixed ``--mix`` share (0.5) of every batch (``handsoff bench --mix``);
* ``pretrain-finetune`` / ``pretrain-finetune-filtered``: trained on that corpus, then
  fine-tuned on the labeled images (``handsoff bench --finetune``);
* ablations, each a corpus made like ``handsoff`` with one stage changed:
  ``no-lpips`` (an encoder fitted here without the LPIPS fine-tune, ``--encoder-steps``
  supervised steps), ``no-refine``
  (encoder codes without per-image refinement), ``w-space`` (W instead of W+),
  ``last-layers`` (labeler on the last two feature maps only);
* ``oracle``: 10,000 real rendered labeled images (augmented), trained with one seed per draw;

(ablations run on the first draw of 16 labeled images unless ``--ablation-sizes 16 50`` /
``--ablation-draws 3``: each costs a 10,000-image corpus per draw, the study's most expensive
stage on a CPU; they are reported as paired differences from ``handsoff`` on the same draws)

and scores every model on 1,000 held-out rendered test images (a seed no stage sees), for
every task of the domain (seg, keypoints, depth). Within a draw every arm uses the same
training seed, so arms are compared pair-wise on equal terms.

The claim tested, per task: handsoff beats the baseline and closes at least half of the
baseline-to-oracle gap, ``(handsoff - baseline) / (oracle - baseline) >= 0.5`` on the task's
primary metric (mIoU, PCK@0.05, depth RMSE), at every number of labeled images. When it fails,
the diagnostics say where: inversion LPIPS/PSNR of the labeled and of held-out real images,
the labeler's accuracy on held-out real images (labeler applied to their inversions), and the
generator's Fréchet distance against the floor of two real sets.

With ``--jobs J`` the work is split into groups that share nothing but the rendered sets and
the shipped encoder (a draw's corpus with the trainings on it; a baseline; an oracle), run in
J processes, so that one process generates while another trains.

Every intermediate artefact (rendered sets, encoders, latents, labelers, corpora, each
training's result) is cached under ``--work``, named by a digest of the settings it depends
on (a training also by the digests of the training code and of its corpus's manifest), so a
rerun skips finished work and a changed setting redoes only what depends on it. Changes to
upstream code (encoder, labeler, engine) are not tracked: delete the work folder after them.

    python benchmarks/quality.py --jobs 2            # the full study (estimated 21 core-hours: about 11 hours
                                                     # on an idle 2-core CPU since issue 17's model and arms)
    python benchmarks/quality.py --rereport benchmarks/results/quality-cpu.json   # re-judge, run nothing
    python benchmarks/quality.py --quick             # under 15 minutes: 16 images, 1 draw, 1,000 generated
    python benchmarks/quality.py --arms baseline oracle   # the arms that need no generator stage
    python benchmarks/quality.py --pretrained vgg16      # every arm from the ImageNet encoder
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from handsoff.bench.data import filter_by_uncertainty  # noqa: E402
from handsoff.bench.tasks import TASKS  # noqa: E402
from handsoff.bench.defaults import DEFAULT_PRETRAINED_BLOCKS, FINETUNE_STEPS_FRACTION, PRETRAINED  # noqa: E402
from handsoff.bench.train import (DEFAULT_BASE, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, mix_shares,  # noqa: E402
                                  train_and_score)
from handsoff.data.folder_dataset import LabeledFolderDataset  # noqa: E402
from handsoff.data.labeled_set import LabeledSet, read_labeled_set, render_to_folder  # noqa: E402
from handsoff.defaults import CHECKPOINTS_DIR, DEFAULT_GENERATOR  # noqa: E402
from handsoff.domains import get_domain  # noqa: E402
from handsoff.errors import HandsoffError  # noqa: E402
from handsoff.utils.io import atomic_path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DEFAULT_ENCODER = CHECKPOINTS_DIR / "heads64" / "encoder.safetensors"
DOMAIN = "heads"
SIZE = 64

#: Render seeds: the test set's is used by nothing else.
SEEDS = {"test": 7001, "oracle": 7002, "heldout": 7003, "labeled": 7100, "generate": 1_000_000}

#: Arms that combine the main corpus with the labeled images, the way users train on a corpus.
COMBINED_ARMS = ("handsoff+labeled", "handsoff-filtered+labeled", "pretrain-finetune", "pretrain-finetune-filtered")
GENERATED_ARMS = ("handsoff", "handsoff-filtered", *COMBINED_ARMS, "no-lpips", "no-refine", "w-space",
                  "last-layers")
ARMS = ("baseline", "baseline-pretrained", *GENERATED_ARMS, "oracle")
#: The encoder of the transfer-learning baseline (``baseline-pretrained``).
TRANSFER_ENCODER = "vgg16"
HEADLINE_ARMS = ("handsoff-filtered", "handsoff")


@dataclass(frozen=True)
class Pipeline:
    """How one corpus is made from the labeled images: which encoder, refinement, latent space, layers."""

    encoder: str = "main"  # 'main' (shipped, LPIPS fine-tuned) or 'no-lpips'
    refine: bool = True
    w_only: bool = False
    last_layers: bool = False


PIPELINES = {
    "main": Pipeline(),
    "no-lpips": Pipeline(encoder="no-lpips"),
    "no-refine": Pipeline(refine=False),
    "w-space": Pipeline(w_only=True),
    "last-layers": Pipeline(last_layers=True),
}
ARM_PIPELINE = {"handsoff": "main", "handsoff-filtered": "main", "no-lpips": "no-lpips", "no-refine": "no-refine",
                "w-space": "w-space", "last-layers": "last-layers", **{arm: "main" for arm in COMBINED_ARMS}}
#: Arms trained on the corpus without its most uncertain samples.
FILTERED_ARMS = ("handsoff-filtered", "handsoff-filtered+labeled", "pretrain-finetune-filtered")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the study's numbers (recorded in the results file).

    The full profile's costs are chosen to fit a few hours on a 2-core CPU with ``--jobs 2``.
    Measured there with one thread: inversion 15.6 s per image at 100 refinement steps, a
    1,000-step labeler fit 162 s with ten members, generation 8.1 samples/s with ten members
    (25 with three), downstream training 0.14 s per step. The full HandsOff setting (ten
    members, 100 refinement steps, 1,000 downstream steps) would take about 8.5 core-hours
    here; three members, 50 refinement steps and 600 downstream steps took about 4.5 (the
    recorded full run: 2.3 core-hours of downstream training, 1.35 of generation, about one
    for the no-LPIPS encoder, the inversions and the labelers).

    The downstream model is the one `benchmarks/headroom.py` chose (issue 17): with the UNet
    of width 8 and 600 steps, 10,000 real images did not beat 50 labeled ones (seg mIoU 0.434
    vs 0.438) nor learn eye, nose or mouth; width 16 and 1,200 steps is the cheapest measured
    configuration where they do (``results/headroom-cpu.json``). It costs about 4x per
    training (0.25 CPU-s per step against 0.125), and the combined and pretrained arms add
    trainings: the study no longer fits 2.5 hours on 2 cores (see benchmarks/README.md).
    """

    sizes: tuple[int, ...] = (16, 50)
    ablation_sizes: tuple[int, ...] = (16,)
    ablation_draws: int = 1
    draws: int = 3
    arms: tuple[str, ...] = ARMS
    tasks: tuple[str, ...] = ("seg", "keypoints", "depth")
    n_generated: int = 10_000
    test_n: int = 1000
    oracle_n: int = 10_000
    heldout_n: int = 100
    steps: int = 1200
    batch: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    width: int = 16
    filter_quantile: float = 0.9
    refine_steps: int = 50
    labeler_steps: int = 1000
    ensemble: int = 3
    encoder_steps: int = 2000
    encoder_lpips_steps: int = 500
    truncation: float = 0.7
    fd_samples: int = 1000
    mix: float = 0.5
    finetune_steps: Optional[int] = None
    pretrained: Optional[str] = None
    pretrained_blocks: int = DEFAULT_PRETRAINED_BLOCKS

    def training(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch": self.batch, "lr": self.lr, "width": self.width,
                "pretrained": self.pretrained, "pretrained_blocks": self.pretrained_blocks}

    def finetuning_steps(self) -> int:
        """Steps of the pretrain-finetune arms' second stage (`handsoff.bench.train`'s default share)."""
        return self.finetune_steps or max(1, round(FINETUNE_STEPS_FRACTION * self.steps))


#: ``--quick``: a smoke run of every stage and every kind of arm, not a measurement: about 14
#: minutes on an idle 2-core CPU with one job (estimated from measured CPU seconds per step:
#: UNet-8 0.125, VGG16's first two blocks 0.69; the other stages took 300 s in the earlier quick
#: run). Hence 100 steps of the width-8 UNet, a two-block pretrained encoder (three cost 0.95 s
#: per step), and the combined arms without their filtered twins, which add no stage.
QUICK = Settings(sizes=(16,), ablation_sizes=(16,), ablation_draws=1, draws=1,
                 arms=("baseline", "baseline-pretrained", "handsoff", "handsoff-filtered", "handsoff+labeled",
                       "pretrain-finetune", "oracle"), n_generated=1000, test_n=300,
                 oracle_n=1000, heldout_n=32, steps=100, width=8, pretrained_blocks=2, refine_steps=20,
                 labeler_steps=300, ensemble=3, encoder_steps=300, encoder_lpips_steps=50, fd_samples=500)


def _key(**parts: Any) -> str:
    """Short digest of settings: names cached artefacts so a changed setting gets a new file."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _bench_code_digest() -> str:
    """Digest of the downstream training code: a changed model, loss or augmentation gets new runs."""
    import handsoff.bench
    import handsoff.data.folder_dataset as folder_dataset

    files = sorted(Path(handsoff.bench.__file__).parent.glob("*.py")) + [Path(folder_dataset.__file__)]
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:10]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` (numpy scalars and arrays, paths allowed) as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _cached_json(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    data = make()
    write_json(path, data)
    return data


def _say(message: str) -> None:
    print(f"[quality {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The study's artefacts, each made once and cached under the work folder

class Study:
    """Makes (or finds in ``work``) every artefact of the study, on first use."""

    def __init__(self, settings: Settings, work: Path, device: torch.device, encoder_path: Path,
                 generator_path: Path, progress: bool) -> None:
        self.s, self.work, self.device, self.progress = settings, work, device, progress
        self.encoder_path, self.generator_path = encoder_path, generator_path
        self.seconds: dict[str, float] = {}
        self.encoder_files: dict[str, str] = {}
        self._memo: dict[Any, Any] = {}
        work.mkdir(parents=True, exist_ok=True)
        ignore = work / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")  # the work folder never shows up in git

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 2)

    def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    # ----------------------------------------------------------------------- rendered sets
    def rendered(self, name: str, n: int, seed: int) -> Path:
        """Images 0..n-1 of the domain's sequence ``seed`` as a labeled-set folder."""
        path = self.work / "sets" / f"{name}-n{n}-s{seed}"
        if not path.is_dir():
            _say(f"render {name}: {n} images, seed {seed}")
            self._timed("render", lambda: render_to_folder(get_domain(DOMAIN), n, seed, SIZE, path,
                                                           progress=self.progress, workers=1))
        return path

    def labeled(self, n: int, draw: int) -> Path:
        """Draw ``draw`` of ``n`` labeled images (the draw of 16 is the first 16 of the draw of 50)."""
        return self.rendered("labeled", n, SEEDS["labeled"] + draw)

    def labeled_set(self, path: Path) -> LabeledSet:
        return self._once(("set", path), lambda: read_labeled_set(path))

    def test_set(self) -> LabeledSet:
        return self.labeled_set(self.rendered("test", self.s.test_n, SEEDS["test"]))

    # ----------------------------------------------------------------------- models
    def generator(self) -> torch.nn.Module:
        from handsoff.gan.checkpoints import load_generator

        return self._once("G", lambda: load_generator(self.generator_path, device=self.device))

    def generator_digest(self) -> str:
        from handsoff.gan.digest import generator_digest

        return self._once("G digest", lambda: generator_digest(self.generator()))

    def lpips(self) -> torch.nn.Module:
        from handsoff.invert.lpips import load_lpips

        return self._once("lpips", lambda: load_lpips("vgg", device=self.device))

    def encoder(self, kind: str) -> tuple[torch.nn.Module, str]:
        """The encoder and a digest naming it: 'main' (shipped) or 'no-lpips' (fitted here once)."""
        return self._once(("encoder", kind), lambda: self._load_encoder(kind))

    def _load_encoder(self, kind: str) -> tuple[torch.nn.Module, str]:
        from handsoff.invert.encoder import load_encoder
        from handsoff.utils.io import sha256_file

        if kind == "main" and self.encoder_path.is_file():
            path = self.encoder_path
        elif kind == "main":  # the shipped encoder is missing: fit one like it, smaller
            path = self._fitted_encoder("main", self.s.encoder_steps, self.s.encoder_lpips_steps)
        else:
            path = self._fitted_encoder("no-lpips", self.s.encoder_steps, 0)
        self.encoder_files[kind] = str(path)
        return load_encoder(path, G=self.generator(), device=self.device), sha256_file(path)[:16]

    def _fitted_encoder(self, name: str, steps: int, lpips_steps: int) -> Path:
        """An encoder fitted here (cached): ``steps`` supervised steps, then ``lpips_steps`` LPIPS steps."""
        key = _key(steps=steps, lpips_steps=lpips_steps, generator=self.generator_digest())
        path = self.work / "encoders" / f"{name}-{key}.safetensors"
        if not path.is_file():
            from handsoff.invert.encoder import save_encoder
            from handsoff.invert.train import fit_encoder

            G = self.generator()
            _say(f"fit encoder '{name}': {steps} supervised steps, {lpips_steps} LPIPS steps")
            encoder = self._timed("fit encoder", lambda: fit_encoder(
                G, steps=steps, lpips_steps=lpips_steps, seed=0, device=self.device, progress=self.progress,
                lpips=self.lpips() if lpips_steps else None))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_encoder(path, encoder, G)
        return path

    # ----------------------------------------------------------------------- latents, labelers, corpora
    def _latents_key(self, pipeline: Pipeline, images: Path) -> str:
        _, encoder_digest = self.encoder(pipeline.encoder)
        return _key(encoder=encoder_digest, refine=self.s.refine_steps if pipeline.refine else 0,
                    w_only=pipeline.w_only, images=images.name, generator=self.generator_digest())

    def latents(self, pipeline: Pipeline, images: Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """W+ codes of the folder's images under ``pipeline``'s inversion, and its LPIPS/PSNR."""
        from handsoff.invert.invert import invert_images
        from handsoff.invert.latents import Latents, load_latents, save_latents

        key = self._latents_key(pipeline, images)
        path = self.work / "latents" / f"{images.name}-{key}.safetensors"
        if not path.is_file():
            encoder, _ = self.encoder(pipeline.encoder)
            labeled = self.labeled_set(images)
            refine = self.s.refine_steps if pipeline.refine else 0
            _say(f"invert {images.name} ({len(labeled)} images, refine {refine}, "
                 f"{'W' if pipeline.w_only else 'W+'}, encoder {pipeline.encoder})")
            result = self._timed("invert", lambda: invert_images(
                self.generator(), encoder, np.stack(labeled.images), refine_steps=refine, lpips=self.lpips(),
                seed=0, progress=self.progress, w_only=pipeline.w_only))
            stats = {"lpips_mean": float(np.mean(result.lpips)), "psnr_mean": float(np.mean(result.psnr)),
                     "lpips": result.lpips.tolist(), "psnr": result.psnr.tolist()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_latents(path, Latents(result.ws, list(labeled.names), self.generator_digest(), stats))
        latents = load_latents(path)
        return latents.ws, latents.extra

    def labeler_path(self, pipeline: Pipeline, images: Path, seed: int) -> Path:
        """A labeler fit on the folder's images through ``pipeline`` (cached file)."""
        key = _key(latents=self._latents_key(pipeline, images), last_layers=pipeline.last_layers,
                   steps=self.s.labeler_steps, ensemble=self.s.ensemble, seed=seed)
        path = self.work / "labelers" / f"{images.name}-{key}.safetensors"
        if not path.is_file():
            from handsoff.label.io import save_labeler
            from handsoff.label.train import fit_labeler

            ws, _ = self.latents(pipeline, images)
            G = self.generator()
            layers = [-2, -1] if pipeline.last_layers else None
            _say(f"fit labeler on {images.name} ({'last two layers' if layers else 'all layers'}, "
                 f"{self.s.labeler_steps} steps, ensemble {self.s.ensemble})")
            labeler = self._timed("fit labeler", lambda: fit_labeler(
                G, ws.to(self.device), self.labeled_set(images), layers=layers, ensemble=self.s.ensemble,
                steps=self.s.labeler_steps, seed=seed, device=self.device, progress=self.progress))
            path.parent.mkdir(parents=True, exist_ok=True)
            save_labeler(path, labeler, G)
        return path

    def corpus(self, pipeline: Pipeline, images: Path, seed: int) -> Path:
        """``n_generated`` samples labeled by that labeler, unfiltered (filtering happens at training)."""
        from handsoff.synth.generation import generate
        from handsoff.synth.settings import GenerateSettings

        labeler = self.labeler_path(pipeline, images, seed)
        path = self.work / "corpora" / f"{labeler.stem}-n{self.s.n_generated}"
        if not (path / "manifest.json").is_file() or not _complete(path):
            _say(f"generate {self.s.n_generated} labeled samples into {path.name}")
            settings = GenerateSettings(n=self.s.n_generated, seed=SEEDS["generate"], truncation=self.s.truncation,
                                        filter=0.0)
            self._timed("generate", lambda: generate(labeler, path, settings, generator=self.generator_path,
                                                     device=str(self.device), progress=self.progress))
        return path

    # ----------------------------------------------------------------------- training sets and runs
    def train_set(self, arm: str, n: int, draw: int) -> torch.utils.data.Dataset:
        """The training set of ``arm`` for draw ``draw`` of ``n`` labeled images."""
        if arm == "baseline":
            return LabeledFolderDataset(self.labeled_set(self.labeled(n, draw)), augment=True)
        if arm == "oracle":
            oracle = self.rendered("oracle", self.s.oracle_n, SEEDS["oracle"])
            return LabeledFolderDataset(self.labeled_set(oracle), augment=True)
        from handsoff.data.shards import ShardDataset

        corpus = ShardDataset(self.corpus(PIPELINES[ARM_PIPELINE[arm]], self.labeled(n, draw), seed=draw))
        return filter_by_uncertainty(corpus, self.s.filter_quantile) if arm in FILTERED_ARMS else corpus

    def arm_training(self, arm: str, n: int, draw: int) -> dict[str, Any]:
        """``train_and_score``'s training arguments for ``arm``: its sets, and the mix, fine-tuning
        and pretrained encoder the arm stands for."""
        base = "baseline" if arm == "baseline-pretrained" else arm
        options: dict[str, Any] = {"train_sets": [self.train_set(base, n, draw)],
                                   "pretrained": TRANSFER_ENCODER if arm == "baseline-pretrained" and
                                   not self.s.pretrained else self.s.pretrained}
        if options["pretrained"]:
            from handsoff.bench.pretrained import find_weights

            find_weights(options["pretrained"])  # none: the arm is skipped, saying why, before any work
        if arm in COMBINED_ARMS:
            labeled = self.train_set("baseline", n, draw)
            if arm.endswith("+labeled"):
                options.update(train_sets=options["train_sets"] + [labeled], mix=self.s.mix)
            else:
                options.update(finetune=[labeled], finetune_steps=self.s.finetuning_steps())
        return options

    def run(self, arm: str, n: Optional[int], draw: int, task: str) -> dict[str, Any]:
        """Train and score one model (cached): ``arm`` on draw ``draw`` of ``n`` images (None for the oracle)."""
        tag = f"{arm}-n{n}-d{draw}-{task}" if n is not None else f"{arm}-d{draw}-{task}"
        data_key = {"arm": arm, "n": n, "draw": draw}
        if arm in GENERATED_ARMS:
            # The corpus's own manifest (shard digests) names it: a regenerated corpus gets new runs.
            from handsoff.utils.io import sha256_file

            corpus = self.corpus(PIPELINES[ARM_PIPELINE[arm]], self.labeled(n, draw), seed=draw)
            data_key.update(corpus=sha256_file(corpus / "manifest.json"),
                            quantile=self.s.filter_quantile if arm in FILTERED_ARMS else None)
            if arm in COMBINED_ARMS:
                data_key.update(mix=self.s.mix if arm.endswith("+labeled") else None,
                                finetune_steps=None if arm.endswith("+labeled") else self.s.finetuning_steps())
        elif arm == "oracle":
            data_key.update(oracle_n=self.s.oracle_n)
        elif arm == "baseline-pretrained":
            data_key.update(encoder=TRANSFER_ENCODER)
        key = _key(data=data_key, train=self.s.training(), test=self.s.test_n, code=_bench_code_digest())
        path = self.work / "runs" / f"{tag}-{key}.json"

        def make() -> dict[str, Any]:
            options = self.arm_training(arm, n if n is not None else self.s.sizes[0], draw)
            _say(f"train {tag}: {sum(len(d) for d in options['train_sets'])} samples, {self.s.steps} steps"
                 f"{f' + {self.s.finetuning_steps()} fine-tuning' if 'finetune' in options else ''}")
            return self._timed("downstream", lambda: train_and_score(
                test=self.test_set(), task=task, steps=self.s.steps, batch=self.s.batch, lr=self.s.lr, seed=draw,
                device=self.device, progress=self.progress, base=self.s.width,
                pretrained_blocks=self.s.pretrained_blocks, extra={"arm": arm, "labeled": n, "draw": draw},
                **options))
        return _cached_json(path, make)

    # ----------------------------------------------------------------------- diagnostics
    def diagnostics(self, n: int, draw: int) -> dict[str, Any]:
        """Inversion and labeler figures of the main pipeline for one draw (cached)."""
        pipeline, images = PIPELINES["main"], self.labeled(n, draw)
        heldout = self.rendered("heldout", self.s.heldout_n, SEEDS["heldout"])
        labeler = self.labeler_path(pipeline, images, seed=draw)
        path = self.work / "diagnostics" / f"{labeler.stem}-heldout{self.s.heldout_n}.json"

        def make() -> dict[str, Any]:
            from handsoff.label.evaluate import evaluate_labeler
            from handsoff.label.io import load_labeler

            G = self.generator()
            model = load_labeler(labeler, G=G, device=self.device)
            ws_train, inv_train = self.latents(pipeline, images)
            ws_held, inv_held = self.latents(pipeline, heldout)
            _say(f"evaluate the labeler of {images.name} on {heldout.name}")
            return {
                "inversion_labeled": {"lpips": inv_train["lpips_mean"], "psnr": inv_train["psnr_mean"]},
                "inversion_heldout": {"lpips": inv_held["lpips_mean"], "psnr": inv_held["psnr_mean"]},
                "labeler_on_labeled": evaluate_labeler(G, model, ws_train.to(self.device), self.labeled_set(images)),
                "labeler_on_heldout": evaluate_labeler(G, model, ws_held.to(self.device), self.labeled_set(heldout)),
            }
        return self._timed("diagnostics", lambda: _cached_json(path, make))

    def generator_fd(self) -> dict[str, Any]:
        """Fréchet distance of the generator's samples and, as its floor, of two disjoint real sets."""
        path = self.work / "diagnostics" / f"fd-{_key(generator=self.generator_digest(), n=self.s.fd_samples)}.json"

        def make() -> dict[str, Any]:
            from handsoff.gan.training.quality import (QualityEvaluator, feature_statistics,
                                                       frechet_distance_from_stats, get_feature_extractor,
                                                       user_cache_dir)

            # The user cache first: the same feature network as the GAN trainer's FD figures.
            extractor = get_feature_extractor(self.device, [user_cache_dir(), self.work / "fd-cache"])
            if extractor is None:
                return {"skipped": "no feature extractor"}
            n = self.s.fd_samples
            reals = np.stack(self.labeled_set(self.rendered("fd-real", 2 * n, SEEDS["heldout"] + 1)).images)
            evaluator = QualityEvaluator(extractor, reals[:n], n)
            value = evaluator.evaluate(self.generator())

            def stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                batches = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device).split(64)
                return feature_statistics(torch.cat([extractor(b).double().cpu() for b in batches]).numpy())
            with torch.no_grad():
                floor = frechet_distance_from_stats(*stats(reals[:n]), *stats(reals[n:]))
            return {"metric": value["metric"], "generator": value["value"], "real_vs_real": floor,
                    "ratio": value["value"] / floor if floor > 0 else None, "samples": n,
                    "truncation": 1.0}
        return self._timed("fd", lambda: _cached_json(path, make))


def _complete(corpus: Path) -> bool:
    from handsoff.data.shards import read_manifest

    manifest = read_manifest(corpus)
    return manifest is not None and manifest.complete


# ---------------------------------------------------------------------------------------------
# Aggregation and the claim

def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return {"values": list(values), "mean": float(np.mean(vals)) if vals else None,
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}


def aggregate(runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """``table[task][arm][n]`` = mean/std over draws of the primary metric (and of every metric)."""
    table: dict[str, Any] = {}
    for task in settings.tasks:
        table[task] = {}
        for arm in settings.arms:
            for n in settings.sizes:
                picked = [r for r in runs if r["task"] == task and r["extra"]["arm"] == arm
                          and (arm == "oracle" or r["extra"]["labeled"] == n)]
                if not picked:
                    continue
                metric_names = [k for k, v in picked[0]["metrics"].items() if isinstance(v, float)]
                table[task].setdefault(arm, {})[str(n)] = {
                    "primary": _mean_std([r["primary_metric"]["value"] for r in picked]),
                    "metrics": {m: _mean_std([r["metrics"][m] for r in picked]) for m in metric_names},
                    "train_size": int(np.mean([r["train_size"] for r in picked])),
                    "supervised_fraction": _mean_of([r.get("supervised_fraction") for r in picked]),
                }
    return table


def claims(table: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Per task and headline arm: beats the baseline, and the share of the baseline-to-oracle gap closed."""
    out: dict[str, Any] = {}
    for task, arms in table.items():
        higher = TASKS[task].primary[1]
        out[task] = {"metric": TASKS[task].primary[0], "higher_is_better": higher}
        for arm in HEADLINE_ARMS:
            per_n, holds = {}, True
            for n in settings.sizes:
                cell = lambda a: (arms.get(a, {}).get(str(n)) or {}).get("primary", {}).get("mean")  # noqa: E731
                h, b, o = cell(arm), cell("baseline"), cell("oracle")
                if None in (h, b, o):
                    per_n[str(n)], holds = {"missing": [a for a, v in ((arm, h), ("baseline", b), ("oracle", o))
                                                        if v is None]}, False
                    continue
                beats = h > b if higher else h < b
                # With no gap (the baseline at or past the oracle) a share of it means nothing, and
                # the claim is beating the baseline alone.
                has_gap = o > b if higher else o < b
                closed = (h - b) / (o - b) if has_gap else None
                ok = bool(beats and (closed is None or closed >= 0.5))
                per_n[str(n)] = {"handsoff": h, "baseline": b, "oracle": o, "beats_baseline": bool(beats),
                                 "gap_closed": closed, "holds": ok}
                holds &= ok
            out[task][arm] = {"holds": holds, "by_labeled": per_n}
    return out


def _fmt(cell: Optional[dict[str, Any]]) -> str:
    if not cell or cell["primary"]["mean"] is None:
        return "-"
    mean, std = cell["primary"]["mean"], cell["primary"]["std"]
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def markdown(table: dict[str, Any], verdicts: dict[str, Any], settings: Settings) -> str:
    """The results as a markdown table (arms x tasks, one column per number of labeled images)."""
    header = ["arm"] + [f"{task} {TASKS[task].primary[0]}{'' if TASKS[task].primary[1] else ' (lower better)'}"
                        f" n={n}" for task in settings.tasks for n in settings.sizes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in settings.arms:
        cells = [_fmt(table.get(task, {}).get(arm, {}).get(str(n))) for task in settings.tasks for n in settings.sizes]
        if any(c != "-" for c in cells):
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    for task, verdict in verdicts.items():
        for arm in HEADLINE_ARMS:
            if arm not in verdict or arm not in settings.arms:
                continue
            parts = []
            for n, v in verdict[arm]["by_labeled"].items():
                if "missing" in v:
                    parts.append(f"n={n}: not measured ({', '.join(v['missing'])} missing)")
                else:
                    gap = ("no gap to close (the baseline reaches the oracle)" if v["gap_closed"] is None
                           else f"closes {v['gap_closed']:.0%} of the gap")
                    parts.append(f"n={n}: {'beats' if v['beats_baseline'] else 'does not beat'} the baseline, {gap}")
            lines.append(f"- **{task}**, {arm}: claim {'holds' if verdict[arm]['holds'] else 'does NOT hold'} "
                         f"({'; '.join(parts)})")
    return "\n".join(lines)


def ablation_deltas(runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """``deltas[task][arm][n]``: mean over the ablation's draws of (ablation - handsoff) on the same draw."""
    value = {(r["extra"]["arm"], r["extra"]["labeled"], r["extra"]["draw"], r["task"]): r["primary_metric"]["value"]
             for r in runs}
    out: dict[str, Any] = {}
    for (arm, n, draw, task), v in value.items():
        base = value.get(("handsoff", n, draw, task))
        if arm in ABLATION_ARMS and base is not None:
            out.setdefault(task, {}).setdefault(arm, {}).setdefault(str(n), []).append(v - base)
    return {task: {arm: {n: {"mean": float(np.mean(d)), "draws": len(d)} for n, d in by_n.items()}
                   for arm, by_n in arms.items()} for task, arms in out.items()}


def ablation_markdown(deltas: dict[str, Any], settings: Settings) -> str:
    """Ablations as paired differences from handsoff (same labeled images, same training seed)."""
    columns = [(task, str(n)) for task in settings.tasks for n in settings.ablation_sizes]
    header = ["ablation"] + [f"{t} {TASKS[t].primary[0]} n={n}" for t, n in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in ABLATION_ARMS:
        cells = [deltas.get(t, {}).get(arm, {}).get(n) for t, n in columns]
        if any(cells):
            lines.append(f"| {arm} | " + " | ".join("-" if c is None else f"{c['mean']:+.3f} ({c['draws']} draw"
                                                     f"{'s' if c['draws'] > 1 else ''})" for c in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def limits(diagnosis: Optional[dict[str, Any]], table: dict[str, Any], settings: Settings) -> list[str]:
    """What limits the corpus, in measured figures: generator FD, inversion, labeler on held-out real images.

    The labeler's score on inverted held-out real images is the quality of the labels a
    corpus can carry at best; when it is below what the baseline model reaches from the same
    labeled images, the corpus cannot beat the baseline whatever the downstream training.
    """
    if not diagnosis:
        return []
    lines = []
    fd = diagnosis.get("generator_fd") or {}
    if "generator" in fd:
        lines.append(f"- generator: {fd['metric']} {fd['generator']:.2f} against {fd['real_vs_real']:.2f} between "
                     f"two real sets ({fd['ratio']:.1f}x the floor)")
    draws = [d for d in diagnosis.get("by_draw", {}).values() if "error" not in d]
    if not draws:
        errors = {d["error"] for d in diagnosis.get("by_draw", {}).values() if "error" in d}
        return lines + [f"- inversion / labeler figures unavailable: {'; '.join(sorted(errors))}"]
    for where in ("labeled", "heldout"):
        lp = _mean_of([d[f"inversion_{where}"]["lpips"] for d in draws])
        ps = _mean_of([d[f"inversion_{where}"]["psnr"] for d in draws])
        lines.append(f"- inversion of the {'labeled' if where == 'labeled' else 'held-out real'} images: "
                     f"LPIPS {lp:.3f}, PSNR {ps:.1f} dB (mean over draws)")
    for task in settings.tasks:
        metric, higher = TASKS[task].primary
        train = _mean_of([(d["labeler_on_labeled"].get(task) or {}).get(metric) for d in draws])
        held = _mean_of([(d["labeler_on_heldout"].get(task) or {}).get(metric) for d in draws])
        if held is None:
            continue
        base = _mean_of([(table.get(task, {}).get("baseline", {}).get(str(n)) or {}).get("primary", {}).get("mean")
                         for n in settings.sizes])
        verdict = ""
        if base is not None:
            worse = held < base if higher else held > base
            verdict = (" - below the baseline model, so the labels limit the corpus" if worse else
                       " - at or above the baseline model")
        lines.append(f"- labeler, {task} {metric}: {held:.3f} on inverted held-out real images, "
                     f"{train:.3f} on its own labeled images; baseline model {_num(base)}{verdict}")
    lines += _lost_classes(draws) + _keypoint_coverage(table, settings)
    return lines


def _lost_classes(draws: list[dict[str, Any]]) -> list[str]:
    """Classes the labeler gets on its own labeled images but not on inverted held-out ones.

    A class that survives on the training inversions and vanishes on new ones points at the
    inversion (parts not where the real labels put them), not at the labeler's capacity.
    """
    per_class = lambda where, name: _mean_of([((d[f"labeler_{where}"].get("seg") or {}).get("per_class_iou")  # noqa: E731
                                               or {}).get(name) for d in draws])
    names = list(((draws[0]["labeler_on_labeled"].get("seg") or {}).get("per_class_iou") or {}))
    lost = [(name, per_class("on_labeled", name), per_class("on_heldout", name)) for name in names]
    lost = [(name, own, held) for name, own, held in lost if own is not None and held is not None
            and held < 0.1 and own >= 2 * held + 0.1]
    if not lost:
        return []
    return ["- seg classes lost on inverted held-out images (IoU on the labeler's own images -> held-out): "
            + ", ".join(f"{name} {own:.2f} -> {held:.2f}" for name, own, held in lost)]


def _keypoint_coverage(table: dict[str, Any], settings: Settings) -> list[str]:
    """How many corpus keypoints train as visible (confidence >= 0.5) against the real share of visible points."""
    arms = table.get("keypoints", {})
    fraction = lambda arm, n: (arms.get(arm, {}).get(str(n)) or {}).get("supervised_fraction")  # noqa: E731
    corpus = [(n, fraction("handsoff", n)) for n in settings.sizes if fraction("handsoff", n) is not None]
    real = _mean_of([fraction("baseline", n) for n in settings.sizes])
    if not corpus or real is None:
        return []
    shares = ", ".join(f"{f:.0%} at n={n}" for n, f in corpus)
    return [f"- keypoints trained as visible (confidence >= 0.5): {shares} of the corpus's points, "
            f"against {real:.0%} of the real labeled images' points"]


def _num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def report_text(runs: list[dict[str, Any]], table: dict[str, Any], verdicts: dict[str, Any],
                deltas: dict[str, Any], diagnosis: Optional[dict[str, Any]], settings: Settings) -> str:
    """The study's markdown: results table and claims, ablations, and what limits the corpus.

    ``runs`` are the trainings as recorded in the results file (``arm``, ``task``, ``warnings``).
    """
    text = markdown(table, verdicts, settings)
    if deltas:
        text += "\n\nAblations, as differences from handsoff on the same draws (primary metric):\n\n" + \
            ablation_markdown(deltas, settings)
    lines = limits(diagnosis, table, settings)
    empty = sorted({f"{r['arm']} {r['task']}" for r in runs if r.get("warnings")})
    if empty:
        lines.append(f"- trainings that carried no training signal (e.g. no keypoint with confidence >= 0.5): "
                     f"{', '.join(empty)}")
    if lines:
        text += "\n\nWhat limits it (measured):\n" + "\n".join(lines)
    return text


def _generation_seconds(study: Study) -> float:
    reports = (study.work / "corpora").glob("*/report.json")
    return round(sum(json.loads(p.read_text())["this_run"]["seconds"] for p in reports), 1)


def estimate(runs: list[dict[str, Any]], study: Study, target: Settings) -> dict[str, Any]:
    """The time ``target`` (e.g. the full study) would take on this machine, from this run's measured rates.

    Downstream training scales with steps and test images, at each arm's own measured cost
    per step (the pretrained encoder's steps cost several times the small UNet's; arms this
    run did not train are costed at the median step); generation with the corpus engine's
    measured samples/s (with this run's labeler ensemble: a larger ensemble labels more
    slowly, so the generation figure is then a lower bound). Inversion and labeler fitting
    are left out (minutes, against hours for these two).
    """
    if not runs:
        return {}
    rates: dict[str, list[float]] = {}
    for r in runs:
        steps = r["settings"]["steps"] + ((r["settings"].get("finetune") or {}).get("steps") or 0)
        rates.setdefault(r["extra"]["arm"], []).append(r["wall_time_s"]["train"] / steps)
    per_arm = {arm: float(np.median(v)) for arm, v in rates.items()}
    per_step = float(np.median([v for values in rates.values() for v in values]))
    per_test_image = float(np.median([r["wall_time_s"]["test"] / r["test"]["size"] for r in runs]))
    todo = cells(target)
    trainings = len(todo) * len(target.tasks)

    def cost(arm: str) -> float:
        steps = target.steps + (target.finetuning_steps() if arm.startswith("pretrain-finetune") else 0)
        return per_arm.get(arm, per_step) * steps + per_test_image * target.test_n
    train_s = len(target.tasks) * sum(cost(arm) for arm, _, _ in todo)
    rates = [json.loads(p.read_text())["samples_per_s"] for p in (study.work / "corpora").glob("*/report.json")]
    corpora = len({(ARM_PIPELINE[a], n, d) for a, n, d in todo if a in GENERATED_ARMS})
    gen_rate = float(np.median(rates)) if rates else None
    gen_s = corpora * target.n_generated / gen_rate if gen_rate else None
    return {"trainings": trainings, "seconds_per_step": round(per_step, 4),
            "seconds_per_step_by_arm": {arm: round(v, 4) for arm, v in per_arm.items()},
            "training_hours": round(train_s / 3600, 2),
            # The rates are this run's model's: a target with a wider UNet or a deeper encoder costs more.
            "measured_with_model": {"width": study.s.width, "pretrained_blocks": study.s.pretrained_blocks},
            "target_model": {"width": target.width, "pretrained_blocks": target.pretrained_blocks},
            "corpora": corpora, "generated_per_s": gen_rate, "measured_with_ensemble": study.s.ensemble,
            "target_ensemble": target.ensemble,
            "generation_hours": None if gen_s is None else round(gen_s / 3600, 2),
            "total_hours": None if gen_s is None else round((train_s + gen_s) / 3600, 2)}


# ---------------------------------------------------------------------------------------------
# Main

def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the quick profile, a smoke run (1 draw of 16, 1,000 generated, 100 steps, 7 arms)")
    p.add_argument("--sizes", type=int, nargs="+", help="numbers of labeled images (default: 16 50)")
    p.add_argument("--draws", type=int, help="random draws per number of labeled images (default: 3)")
    p.add_argument("--arms", nargs="+", choices=ARMS, help="arms to run (default: all)")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), help="tasks (default: all the domain has)")
    p.add_argument("--n-generated", type=int, help="generated samples per corpus (default: 10000)")
    p.add_argument("--steps", type=int, help="downstream optimizer steps (default: 1200, chosen by headroom.py; "
                                             f"`handsoff bench`'s is {DEFAULT_STEPS})")
    p.add_argument("--batch", type=int, help=f"downstream batch (default: {DEFAULT_BATCH})")
    p.add_argument("--width", type=int, help=f"downstream UNet width (default: 16, chosen by headroom.py; "
                                             f"`handsoff bench`'s is {DEFAULT_BASE})")
    p.add_argument("--refine-steps", type=int, help="per-image refinement of the main pipeline (default: 50)")
    p.add_argument("--labeler-steps", type=int, help="labeler training steps (default: 1000)")
    p.add_argument("--ensemble", type=int, help="labeler ensemble members (default: 3; HandsOff used 10, about 3x "
                                                "slower to generate with)")
    p.add_argument("--encoder-steps", type=int,
                   help="supervised steps of the encoders fitted here: the no-LPIPS ablation's, and the main one "
                        "when the shipped encoder is missing (default: 2000)")
    p.add_argument("--test-n", type=int, help="test images (default: 1000)")
    p.add_argument("--oracle-n", type=int, help="oracle training images (default: 10000)")
    p.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    p.add_argument("--encoder", type=Path, default=DEFAULT_ENCODER)
    p.add_argument("--jobs", type=int, default=1,
                   help="processes of --threads threads; each makes a group's corpus and trains on it, so "
                        "generation and training overlap (default: 1; 2 on an idle 2-core machine about halves "
                        "the study's time)")
    p.add_argument("--ablation-sizes", type=int, nargs="+",
                   help="numbers of labeled images the ablations run at (default: 16)")
    p.add_argument("--ablation-draws", type=int, help="draws the ablations run on (default: 1, the first)")
    p.add_argument("--mix", type=float, help="the labeled images' share of every batch in the +labeled arms "
                                             "(default: 0.5)")
    p.add_argument("--finetune-steps", type=int, help=f"fine-tuning steps of the pretrain-finetune arms (default: "
                                                      f"{FINETUNE_STEPS_FRACTION:g} x --steps)")
    p.add_argument("--pretrained", choices=PRETRAINED,
                   help=f"start every arm's UNet encoder from this ImageNet network (default: none; the "
                        f"baseline-pretrained arm always starts from {TRANSFER_ENCODER})")
    p.add_argument("--pretrained-blocks", type=int,
                   help=f"encoder blocks of the pretrained UNet (default: {DEFAULT_PRETRAINED_BLOCKS})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1; on a shared 2-core machine two threads ran 10x slower)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "quality",
                   help="cache of intermediate artefacts (default: benchmarks/work/quality)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/quality[-quick]-<device>.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rereport", type=Path, metavar="RESULT.json",
                   help="rewrite a recorded study's verdicts and text with this code's rules, reusing its "
                        "measurements (runs nothing)")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else Settings()
    overrides = {"sizes": tuple(args.sizes) if args.sizes else None, "draws": args.draws,
                 "arms": tuple(a for a in ARMS if a in args.arms) if args.arms else None,
                 "tasks": tuple(args.tasks) if args.tasks else None, "n_generated": args.n_generated,
                 "ablation_sizes": tuple(args.ablation_sizes) if args.ablation_sizes else None,
                 "ablation_draws": args.ablation_draws,
                 "steps": args.steps, "batch": args.batch, "width": args.width, "refine_steps": args.refine_steps,
                 "labeler_steps": args.labeler_steps, "ensemble": args.ensemble,
                 "encoder_steps": args.encoder_steps, "test_n": args.test_n, "oracle_n": args.oracle_n,
                 "mix": args.mix, "finetune_steps": args.finetune_steps, "pretrained": args.pretrained,
                 "pretrained_blocks": args.pretrained_blocks}
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


ABLATION_ARMS = ("no-lpips", "no-refine", "w-space", "last-layers")
_SKIPPABLE = (ImportError, AttributeError, FileNotFoundError, HandsoffError)


def cells(settings: Settings) -> list[tuple[str, Optional[int], int]]:
    """Every (arm, labeled images, draw) of the study; the oracle has no labeled images."""
    out: list[tuple[str, Optional[int], int]] = []
    for arm in settings.arms:
        ablation = arm in ABLATION_ARMS
        sizes = [None] if arm == "oracle" else settings.ablation_sizes if ablation else settings.sizes
        draws = min(settings.ablation_draws, settings.draws) if ablation else settings.draws
        out += [(arm, n, d) for n in sizes for d in range(draws)]
    return out


Unit = tuple[tuple[str, Optional[int], int], ...]


def units(todo: list[tuple[str, Optional[int], int]]) -> list[Unit]:
    """The cells grouped by the artefact they share, the costliest first.

    Cells of one group share a corpus (``handsoff`` and ``handsoff-filtered`` of a draw) or
    nothing at all, so groups can be made in separate processes without two of them writing
    the same file. Corpus groups go first: a group with a corpus costs an inversion, a labeler,
    a corpus and its trainings; the others cost their trainings only.
    """
    groups: dict[Any, list[tuple[str, Optional[int], int]]] = {}
    for arm, n, draw in todo:
        key = (ARM_PIPELINE[arm], n, draw) if arm in GENERATED_ARMS else (arm, n, draw)
        groups.setdefault(key, []).append((arm, n, draw))
    costly = [g for key, g in groups.items() if key[0] in PIPELINES]
    cheap = [g for key, g in groups.items() if key[0] not in PIPELINES]
    costly.sort(key=lambda g: -(g[0][1] or 0))  # more labeled images: a longer inversion
    return [tuple(g) for g in costly + cheap]


def _shared_artefacts(study: Study, todo: list[tuple[str, Optional[int], int]]) -> dict[str, str]:
    """Make, in this process, what several groups read: rendered sets and the main encoder.

    Returns the arms whose upstream stage is not available, with the reason: the study's own
    arms (baseline, oracle) still run.
    """
    study.test_set()
    for arm, n, draw in todo:
        if arm == "oracle":
            study.rendered("oracle", study.s.oracle_n, SEEDS["oracle"])
        else:
            study.labeled(n, draw)
    generated = sorted({arm for arm, _, _ in todo if arm in GENERATED_ARMS})
    if not generated:
        return {}
    try:
        study.encoder("main")
    except _SKIPPABLE as err:
        reason = f"{type(err).__name__}: {err}"
        _say(f"skip {', '.join(generated)}: {reason}")
        return {arm: reason for arm in generated}
    return {}


def run_unit(study: Study, unit: Unit) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, float]]:
    """Make one group's training sets and train every task on them.

    Returns the runs, the arms skipped (their upstream stage is unavailable) and the seconds
    spent per stage in this call.
    """
    before = dict(study.seconds)
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for arm, n, draw in unit:
        try:
            study.arm_training(arm, n if n is not None else study.s.sizes[0], draw)
        except _SKIPPABLE as err:
            skipped[arm] = f"{type(err).__name__}: {err}"
            _say(f"skip {arm}: {skipped[arm]}")
            continue
        runs += [study.run(arm, n, draw, task) for task in study.s.tasks]
    spent = {k: round(v - before.get(k, 0.0), 2) for k, v in study.seconds.items()}
    return runs, skipped, spent


_WORKER: dict[str, Study] = {}


def _worker_init(args: tuple[Any, ...], threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["study"] = Study(*args, progress=False)


def _worker_unit(unit: Unit) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, float]]:
    return run_unit(_WORKER["study"], unit)


def _worker_heldout() -> None:
    """The held-out images' inversion, which the diagnostics read (made here to overlap the groups)."""
    study = _WORKER["study"]
    study.latents(PIPELINES["main"], study.rendered("heldout", study.s.heldout_n, SEEDS["heldout"]))


def run_all(study: Study, todo: list[tuple[str, Optional[int], int]], jobs: int, threads: int
            ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every group of cells (cached work is read back), in ``jobs`` processes of ``threads`` threads.

    Worker processes are spawned (not forked: a forked OpenMP runtime can hang). Each makes
    its group's inversion, labeler and corpus and trains on them, so that generation and
    training overlap across processes; what several groups share is made here first.
    """
    skipped = _shared_artefacts(study, todo)
    groups = [u for u in (tuple(c for c in unit if c[0] not in skipped) for unit in units(todo)) if u]
    results = []
    if jobs <= 1:
        results = [run_unit(study, unit) for unit in groups]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        init = ((study.s, study.work, study.device, study.encoder_path, study.generator_path), threads)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=init) as pool:
            wants_heldout = any(arm in GENERATED_ARMS for arm, _, _ in todo) and not skipped
            heldout = pool.submit(_worker_heldout) if wants_heldout else None
            futures = [pool.submit(_worker_unit, unit) for unit in groups]
            results = [f.result() for f in futures]
            if heldout is not None:
                heldout.result()
    runs = []
    for unit_runs, unit_skipped, spent in results:
        runs += unit_runs
        skipped.update(unit_skipped)
        for stage, seconds in spent.items():
            study.seconds[stage] = round(study.seconds.get(stage, 0.0) + seconds, 2)
    return runs, skipped


def _claim_holds(verdicts: dict[str, Any]) -> dict[str, dict[str, bool]]:
    return {task: {arm: v[arm]["holds"] for arm in HEADLINE_ARMS if arm in v} for task, v in verdicts.items()}


def _diagnose(study: Study, settings: Settings, verdicts: dict[str, Any]) -> dict[str, Any]:
    """Measured figures that say what limits the corpus (run when a generated arm ran)."""
    figures: dict[str, Any] = {}
    try:
        figures["generator_fd"] = study.generator_fd() if settings.fd_samples else None
    except Exception as err:  # noqa: BLE001 - a diagnostic must not lose the study's results
        figures["generator_fd"] = {"error": f"{type(err).__name__}: {err}"}
    per_draw = {}
    for n in settings.sizes:
        for draw in range(settings.draws):
            try:
                per_draw[f"n{n}-d{draw}"] = study.diagnostics(n, draw)
            except Exception as err:  # noqa: BLE001
                per_draw[f"n{n}-d{draw}"] = {"error": f"{type(err).__name__}: {err}"}
    figures["by_draw"] = per_draw
    figures["claim_holds"] = _claim_holds(verdicts)
    return figures


def rereport(path: Path) -> str:
    """Re-derive a recorded study's verdicts and text with this code, keeping its measurements.

    For a change in how results are judged or written, not in how they are measured: the
    table, ablation differences and diagnostics are read back as recorded.
    """
    try:
        record = json.loads(path.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record["settings"].items()}
        settings = Settings(**fields)
        table, deltas, diagnosis = record["table"], record["ablations_vs_handsoff"], record["diagnosis"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HandsoffError(f"{path}: not a quality study results file ({type(err).__name__}: {err})") from err
    verdicts = claims(table, settings)
    record["claims"] = verdicts
    if diagnosis:
        diagnosis["claim_holds"] = _claim_holds(verdicts)
    record["markdown"] = report_text(record["runs"], table, verdicts, deltas, diagnosis, settings)
    record["rereported"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            "command": f"python benchmarks/quality.py --rereport {shlex.quote(str(path))}"}
    write_json(path, record)
    return record["markdown"]


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    if args.rereport:
        try:
            print(rereport(args.rereport))
        except HandsoffError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    settings = _settings(args)
    try:  # a bad share would otherwise stop the study at its first combined training
        mix_shares(2, settings.mix)
    except HandsoffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or RESULTS / f"quality{'-quick' if args.quick else ''}-{device.type}.json"
    study = Study(settings, args.work, device, args.encoder, args.generator, progress=not args.no_progress)
    started, load_before = time.perf_counter(), load_average()

    runs, skipped = run_all(study, cells(settings), args.jobs, args.threads)
    table = aggregate(runs, settings)
    verdicts = claims(table, settings)
    generated_ran = any(r["extra"]["arm"] in GENERATED_ARMS for r in runs)
    diagnosis = _diagnose(study, settings, verdicts) if generated_ran else None
    deltas = ablation_deltas(runs, settings)
    recorded_runs = [{"arm": r["extra"]["arm"], "labeled": r["extra"]["labeled"], "draw": r["extra"]["draw"],
                      "task": r["task"], "metrics": r["metrics"], "train_size": r["train_size"],
                      "supervised_fraction": r.get("supervised_fraction"), "warnings": r.get("warnings", []),
                      "wall_time_s": r["wall_time_s"]} for r in runs]
    text = report_text(recorded_runs, table, verdicts, deltas, diagnosis, settings)

    record = {
        "benchmark": "quality: downstream models trained on HandsOff corpora vs the labeled images vs real data",
        "device": f"{device.type}: {device_name(device)}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "profile": "quick" if args.quick else "full",
        "settings": asdict(settings), "seeds": SEEDS,
        "generator": str(args.generator), "encoders": study.encoder_files,
        "load_average": {"before": load_before, "after": load_average()},
        "wall_time_s": round(time.perf_counter() - started, 1), "stage_seconds": study.seconds,
        # What the results cost, including work cached by earlier invocations:
        "compute_seconds": {"downstream": round(sum(r["wall_time_s"]["total"] for r in runs), 1),
                            "generate_every_corpus_in_work": _generation_seconds(study)},
        "skipped_arms": skipped,
        "full_study_estimate_one_job": estimate(runs, study, Settings()) if args.quick else None,
        "table": table, "ablations_vs_handsoff": deltas, "claims": verdicts, "diagnosis": diagnosis, "markdown": text,
        "runs": recorded_runs,
        "how_to_rerun": " ".join(["python benchmarks/quality.py",
                                  *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
    }
    write_json(out, record)
    print()
    print(text)
    if skipped:
        print("\nskipped arms: " + "; ".join(f"{a} ({why})" for a, why in skipped.items()))
    print(f"\nwrote {out} ({record['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
