"""``handsoff generate``, ``handsoff export``, ``handsoff run`` and ``handsoff demo``.

Registered through `handsoff.cli.STAGE_CLIS`; nothing heavy is imported until a command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from handsoff.defaults import DEFAULT_GENERATOR
from handsoff.utils.threads import add_threads_option

__all__ = ["register"]

GENERATE_DESCRIPTION = """\
Generate a labeled corpus: sample latents, synthesise images, label them with a trained
labeler, score their uncertainty, drop the most uncertain fraction and write HDF5 shards
with a manifest (the format of README 'Data formats').

--n counts generated samples: sample i (0 <= i < n) uses seed S+i, z =
np.random.RandomState(S+i).randn(z_dim), whatever the filter decides, so every sample is
reproducible from its seed and the settings. --filter F drops floor(F * m) of the m samples
of each shard (per shard, so that shards are independent and reproducible); the manifest
and report.json record how many were kept. --keep-all keeps every sample and stores the
filter's verdict in each shard's 'keep' dataset.

Rerunning the same command resumes: finished shards (checked by sha256) are skipped and the
others are made again, byte for byte the same (same device, --batch and --threads: floating-point
sums depend on the thread count, so report.json records all three under bytes_depend_on). A
folder holding a corpus made with other settings is refused, and so is a second run
writing into the same folder.
"""

GENERATE_EPILOG = """\
examples:
  handsoff generate --labeler runs/demo/labeler.safetensors --n 10000 --out corpus/
  handsoff generate --labeler L --n 2000 --out near/ --around runs/demo/latents.safetensors
  handsoff generate --labeler L --n 5000 --out rare/ --want-class ear --want-ratio 0.5
  torchrun --nproc-per-node 8 -m handsoff generate --labeler L --num-samples 1000000 --out big/ --device cuda

--around LATENTS: sample i starts from the W+ code of image i % N of the latents file; its
fine layers (--mix-from on, default num_ws // 2) are replaced by the truncated w of seed
S+i plus Gaussian noise of std --mix-noise, so layout (and labels) follow the image while
colour and texture vary.
--want-class NAME: indices i with floor((i+1)*R) > floor(i*R) (R = --want-ratio) must
show at least --want-pixels pixels of NAME; up to --want-tries candidate latents are tried
(retry seeds are hashed from S, i and the attempt), the last is kept. report.json records
the acceptance rate. Several processes: shards are split over torchrun ranks; each writes
its own, rank 0 merges the manifest.
"""

RUN_DESCRIPTION = """\
Run the pipeline from one TOML file: [labeled] (a labeled-set folder, or [labeled.render]
from a built-in domain), [encoder] (a given encoder file, or fit-encoder settings),
[invert], [tune] (optional pivotal tuning: `handsoff tune`'s settings; fit-labeler and generate
then use the tuned generator), [labeler] (fit-labeler settings) and [generate] (generate
settings and batch), plus out, generator and device at the top. Stages: render, fit-encoder,
invert, tune, fit-labeler, generate; each writes OUTPUT.stamp.json with its input digests and settings,
and a rerun skips every stage whose output exists with unchanged inputs (an interrupted
generate stage resumes). Relative paths are relative to the config file. `handsoff demo
--out DIR` writes and runs such a config (DIR/demo.toml).
"""


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a labeled corpus (HDF5 shards) with a trained labeler",
                       description=GENERATE_DESCRIPTION, epilog=GENERATE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labeler", type=Path, required=True, help="labeler file (handsoff fit-labeler)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, required=True,
                   help="samples to generate, before filtering (under torchrun write --num-samples: torchrun "
                        "takes --n for an abbreviation of its own options)")
    p.add_argument("--out", type=Path, required=True, help="corpus folder (resumed when it holds this corpus)")
    p.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR,
                   help="generator checkpoint (default: the shipped built-in-domain generator)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed S+i (default: 0)")
    p.add_argument("--truncation", type=float, default=0.7, help="truncation psi (default: 0.7)")
    p.add_argument("--filter", type=float, default=0.1,
                   help="fraction of each shard dropped as most uncertain (default: 0.1)")
    p.add_argument("--keep-all", action="store_true", help="keep every sample; store the filter's verdict instead")
    p.add_argument("--batch", type=int, default=16, help="latents per forward pass (default: 16)")
    p.add_argument("--shard-size", type=int, default=1000, help="generated samples per shard (default: 1000)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    add_threads_option(p)
    p.add_argument("--noise-mode", choices=("const", "random", "none"), default="const",
                   help="synthesis noise (default: const, reproducible)")
    p.add_argument("--store-ws", action="store_true", help="store each sample's W+ code in the shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    var = p.add_argument_group("labeled variations")
    var.add_argument("--around", type=Path, default=None, metavar="LATENTS",
                     help="latents file (handsoff invert): generate variations of these images")
    var.add_argument("--mix-from", type=int, default=None, metavar="L",
                     help="with --around: first style-mixed W+ layer (default: num_ws // 2)")
    var.add_argument("--mix-noise", type=float, default=0.05, help="with --around: noise std (default: 0.05)")
    var.add_argument("--want-class", default=None, metavar="NAME", help="oversample samples showing this class")
    var.add_argument("--want-pixels", type=int, default=16, help="pixels of the class that count (default: 16)")
    var.add_argument("--want-ratio", type=float, default=0.5,
                     help="fraction of samples that must show the class (default: 0.5)")
    var.add_argument("--want-tries", type=int, default=8, help="candidates per such sample (default: 8)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> None:
    from handsoff.synth.generation import generate
    from handsoff.synth.settings import GenerateSettings

    settings = GenerateSettings(
        n=args.n, seed=args.seed, truncation=args.truncation, filter=args.filter, keep_all=args.keep_all,
        shard_size=args.shard_size, noise_mode=args.noise_mode, store_ws=args.store_ws, mix_from=args.mix_from,
        mix_noise=args.mix_noise, want_class=args.want_class, want_pixels=args.want_pixels,
        want_ratio=args.want_ratio, want_tries=args.want_tries)
    result = generate(args.labeler, args.out, settings, generator=args.generator, batch=args.batch,
                      device=args.device, around=args.around, progress=not args.no_progress)
    if result.report:
        r = result.report
        print(f"wrote {result.out}: {r['kept']} of {r['generated']} samples kept in {r['shards']['finished']} "
              f"shards ({r['this_run']['generated']} generated now, {r['samples_per_s']} samples/s)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a generated corpus to the labeled-set folder format",
                       description="Write every finished shard of a corpus as one labeled-set folder (images/, "
                                   "seg/, depth/, keypoints.json, meta.json). Names are i{index}_s{seed}; keypoints "
                                   "are visible when their confidence is >= --min-confidence and they lie inside "
                                   "the image.")
    p.add_argument("corpus", type=Path, help="corpus folder (with manifest.json)")
    p.add_argument("--format", choices=("folder",), default="folder", help="output format (default: folder)")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="keypoint confidence from which a keypoint is visible (default: 0.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> None:
    from handsoff.synth.export import export_folder

    out = export_folder(args.corpus, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                        min_confidence=args.min_confidence)
    print(f"wrote {out}")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the whole pipeline from one TOML config",
                       description=RUN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="pipeline config (.toml)")
    p.add_argument("--device", default=None, help="override the config's device")
    add_threads_option(p, default=None, help_text="override the config's torch CPU threads (its 'threads'; "
                                                  "default 1, see handsoff generate --help)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_run)


def _run_run(args: argparse.Namespace) -> None:
    from handsoff.synth.pipeline import load_config, run_pipeline

    config = load_config(args.config)
    if args.device is not None:
        config.device = args.device
    if args.threads is not None:
        config.threads = args.threads
    run_pipeline(config, progress=not args.no_progress)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the built-in domain end to end: 16 labeled images -> 1,000 generated",
                       description="Render 16 labeled images of the built-in domain, invert them with the shipped "
                                   "encoder, fit a labeler and generate 1,000 labeled images with the shipped "
                                   "generator: DIR/labeler.safetensors, DIR/shards/ (shards + manifest.json), "
                                   "DIR/preview.png and DIR/report.json. A predefined 'handsoff run' config (written to "
                                   "DIR/demo.toml); rerunning skips finished stages.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--n", type=int, default=1000, help="samples to generate (default: 1000)")
    add_threads_option(p)
    p.add_argument("--tune-steps", type=int, default=None,
                   help="pivotal-tuning steps: tune the generator on the 16 images first, into DIR/tuned/ "
                        "(`handsoff tune`); 0 = no tuning (default: handsoff.synth.demo.DEMO_TUNE_STEPS, "
                        "now no tuning)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from handsoff.synth.demo import run_demo

    tune = {} if args.tune_steps is None else {"tune_steps": args.tune_steps}  # None: the demo's default
    run_demo(args.out, device=args.device, n=args.n, progress=not args.no_progress, threads=args.threads, **tune)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the synth subcommands to the ``handsoff`` parser."""
    for add in (_add_generate, _add_export, _add_run, _add_demo):
        add(sub)
