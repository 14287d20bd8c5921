"""The ``handsoff`` command line: one subcommand per pipeline stage.

Errors the user can fix (a bad file, a bad argument) print one line naming the file and
the problem and exit with status 2; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from handsoff import __version__
from handsoff.defaults import DEFAULT_GENERATOR
from handsoff.errors import HandsoffError, Terminated
from handsoff.utils.threads import apply_threads

EXIT_USER_ERROR = 2


# --------------------------------------------------------------------------- sample
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="render a grid of generator samples to a PNG",
                       description="Sample images from a StyleGAN2 generator (NVlabs .pkl, rosinality .pt "
                                   "or handsoff .safetensors) and save them as one PNG grid. Seed s uses "
                                   "z = np.random.RandomState(s).randn(z_dim), as NVlabs' generate.py does.")
    p.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR,
                   help="generator checkpoint (default: the shipped built-in-domain generator)")
    p.add_argument("--seeds", default="0-15", help="seeds, e.g. 0-15 or 1,5,9-12 (default: 0-15)")
    p.add_argument("--truncation", type=float, default=0.7, help="truncation psi (default: 0.7; 1 = none)")
    p.add_argument("--noise-mode", choices=("const", "random", "none"), default="const",
                   help="per-layer noise: the stored constant, fresh random, or none (default: const)")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--cols", type=int, default=None, help="grid columns (default: square)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="output PNG (default: grid.png)")
    p.set_defaults(run=_run_sample)


def _run_sample(args: argparse.Namespace) -> None:
    from handsoff.gan.checkpoints import load_generator
    from handsoff.gan.sampling import generate_images
    from handsoff.utils.images import image_grid, save_png, to_uint8
    from handsoff.utils.runtime import parse_seeds, resolve_device

    seeds = parse_seeds(args.seeds)
    G = load_generator(args.generator, device=resolve_device(args.device))
    images = generate_images(G, seeds, truncation_psi=args.truncation, noise_mode=args.noise_mode,
                             batch_size=args.batch)
    save_png(args.out, image_grid(to_uint8(images), cols=args.cols))
    print(f"wrote {args.out} ({len(seeds)} samples, {G.img_resolution}x{G.img_resolution})")


# --------------------------------------------------------------------------- info / convert
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a generator checkpoint",
                       description="Print a checkpoint's format, resolution, num_ws, channels per "
                                   "resolution, parameter count and sha256, without running it.")
    p.add_argument("path", type=Path, help="generator checkpoint (.pkl, .pt or .safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from handsoff.gan.checkpoints import checkpoint_info

    info = checkpoint_info(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        print(f"{key:>16}: {value}")


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a generator checkpoint to handsoff .safetensors",
                       description="Read an NVlabs .pkl (safely: no code from the file runs), a rosinality "
                                   ".pt or a handsoff .safetensors and write handsoff's format: safetensors "
                                   "weights with the JSON config in the metadata.")
    p.add_argument("src", type=Path, help="source checkpoint")
    p.add_argument("-o", "--out", type=Path, required=True, help="destination .safetensors")
    p.add_argument("--which", choices=("G_ema", "G"), default="G_ema",
                   help="network to take from a training pickle (default: G_ema)")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    p.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from handsoff.gan.checkpoints import load_generator, save_generator

    if args.out.exists() and not args.force:
        raise HandsoffError(f"{args.out}: already exists (use --force to overwrite)")
    if args.out.suffix != ".safetensors":
        raise HandsoffError(f"{args.out}: the destination must end in .safetensors")
    G = load_generator(args.src, which=args.which)
    save_generator(G, args.out, extra_metadata={"converted_from": args.src.name})
    print(f"wrote {args.out}")


# --------------------------------------------------------------------------- render / train-gan
def _add_render(sub: argparse._SubParsersAction) -> None:
    from handsoff.domains import DEFAULT_DOMAIN, DOMAINS

    p = sub.add_parser("render", help="render a labeled set from a built-in domain",
                       description="Render N images of a built-in, procedurally rendered domain with exact "
                                   "labels (segmentation, keypoints with visibility, depth) into the labeled-set "
                                   "folder format: images/, seg/, depth/, keypoints.json, meta.json. Image i of "
                                   "seed S is the same however the run is chunked.")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="sequence seed (default: 0)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default: 64)")
    p.add_argument("--domain", choices=sorted(DOMAINS), default=DEFAULT_DOMAIN,
                   help=f"built-in domain (default: {DEFAULT_DOMAIN})")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    p.add_argument("--workers", type=int, default=1,
                   help="rendering processes, one torch thread each (default: 1; use one per core for big sets)")
    p.set_defaults(run=_run_render)


def _run_render(args: argparse.Namespace) -> None:
    from handsoff.data.labeled_set import render_to_folder
    from handsoff.domains import get_domain

    out = render_to_folder(get_domain(args.domain), args.n, args.seed, args.size, args.out,
                           overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {args.n} labeled images to {out}")


def _add_train_gan(sub: argparse._SubParsersAction) -> None:
    from handsoff.gan.training.cli import TRAIN_GAN_DESCRIPTION, TRAIN_GAN_EPILOG, add_train_gan_args

    p = sub.add_parser("train-gan", help="train a StyleGAN2 on a folder of images or a built-in domain",
                       description=TRAIN_GAN_DESCRIPTION, epilog=TRAIN_GAN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_gan_args(p)
    p.set_defaults(run=_run_train_gan)


def _run_train_gan(args: argparse.Namespace) -> None:
    from handsoff.gan.training.cli import train_gan_from_args

    print(f"generator: {train_gan_from_args(args)}")


# --------------------------------------------------------------------------- main
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_sample, _add_info, _add_convert, _add_render, _add_train_gan,
)


# Pipeline stages register their own subcommands: each module named here defines
# ``register(sub)`` and imports nothing heavy at module level (``handsoff --help`` stays fast).
STAGE_CLIS: tuple[str, ...] = (
    "handsoff.bench.cli",
    "handsoff.invert.cli",
    "handsoff.label.cli",
    "handsoff.synth.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="handsoff",
        description="handsoff: turn fewer than 50 labeled images into an unlimited labeled image corpus "
                    "with a StyleGAN2 (HandsOff, CVPR 2023).")
    parser.add_argument("--version", action="version", version=f"handsoff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    for module in STAGE_CLIS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; a torchrun rank ends here without interpreter finalization
    (`handsoff.utils.distributed.exit_without_finalizing`: gloo's workers may still be freeing work)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    status = _run(args)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):  # cheap test first: the module imports torch
        from handsoff.utils.distributed import exit_without_finalizing, under_torchrun

        if under_torchrun():
            exit_without_finalizing(status)
    return status


def _run(args: argparse.Namespace) -> int:
    try:
        # Every long command has --threads (default 1, see handsoff.utils.threads); set it before it runs.
        apply_threads(getattr(args, "threads", None))
        args.run(args)
    except HandsoffError as err:
        if args.debug:
            raise
        print(f"handsoff {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"handsoff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:  # torchrun stops the other ranks with SIGTERM when one fails
        print(f"handsoff {args.command}: terminated", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
