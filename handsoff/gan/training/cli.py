"""Command-line arguments of ``handsoff train-gan`` (the lead's cli.py wires these in)."""
from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Optional

from handsoff.errors import HandsoffError
from handsoff.utils.threads import add_threads_option

from .config import TrainConfig

__all__ = ["add_train_gan_args", "train_gan_from_args", "config_from_args", "parse_duration",
           "TRAIN_GAN_DESCRIPTION", "TRAIN_GAN_EPILOG"]

TRAIN_GAN_DESCRIPTION = """\
Train a StyleGAN2 generator (residual discriminator, non-saturating loss, lazy R1,
EMA generator) on a folder of images or on a built-in domain (only its images).

RUN_DIR gets config.json, snapshot-KKKKKK.pt (full training state), G_ema-latest.safetensors
(the generator the other commands use), G_ema-best.safetensors, samples-KKKKKK.png,
log.jsonl and a quality figure per snapshot: FID when Inception weights are already on
disk, else FD-<domain>-seg (Frechet distance in a small segmentation CNN's features).
Rerunning the same command into the same --out continues from the last snapshot exactly
as an uninterrupted run would. Several GPUs: torchrun --nproc_per_node=K -m handsoff.gan.train ...
"""

TRAIN_GAN_EPILOG = """examples:
  # built-in domain, 64x64, small network, stops after 8 minutes; rerun to continue
  handsoff train-gan --domain heads --resolution 64 --out runs/heads64 --channel-base 16384 --channel-max 256 \\
      --batch 64 --kimg 3000 --time-limit 8m
  # a folder of images (DIR/images/ of a labeled set, or any folder of .png/.jpg)
  handsoff train-gan --data my_faces/ --resolution 128 --out runs/faces128 --xflip
"""


def parse_duration(text: str) -> float:
    """``"90s"``, ``"8m"``, ``"1.5h"`` or a plain number of minutes -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read duration {text!r} (use e.g. 90s, 8m, 1.5h)")
    value = float(m.group(1))
    return value * {"s": 1, "m": 60, "h": 3600, "": 60}[m.group(2)]


def _optional_float(text: str) -> Optional[float]:
    return None if text.lower() in ("none", "off") else float(text)


# (argument, TrainConfig field(s), type, help) for options that map 1:1 onto TrainConfig
_CONFIG_ARGS = [
    ("--resolution", "resolution", int, "image size, a power of two >= 16 (default: 64)"),
    ("--batch", "batch", int, "global batch size, split over torchrun processes (default: 64)"),
    ("--kimg", "total_kimg", float, "train until D has seen this many thousand images (default: 10000)"),
    ("--lr-g", "lr_g", float, "generator Adam learning rate (default: 0.0025)"),
    ("--lr-d", "lr_d", float, "discriminator Adam learning rate (default: 0.0025)"),
    ("--r1-gamma", "r1_gamma", float, "R1 weight (default: 0.0002 * resolution^2 / batch, NVlabs' heuristic)"),
    ("--r1-interval", "r1_interval", int, "lazy R1 every N steps (default: 16)"),
    ("--pl-weight", "pl_weight", float, "path-length regularisation weight; 0 = off (default: 0; NVlabs uses 2)"),
    ("--pl-interval", "pl_interval", int, "lazy path-length regularisation every N steps (default: 4)"),
    ("--ema-kimg", "ema_kimg", float, "G_ema half-life in kimg (default: 10 * batch / 32)"),
    ("--ema-rampup", "ema_rampup", _optional_float, "EMA ramp-up ratio, or 'none' (default: 0.05)"),
    ("--style-mixing", "style_mixing_prob", float, "style-mixing probability (default: 0.9)"),
    ("--num-fp16-res", "num_fp16_res", int, "float16 in this many top resolutions on CUDA (default: 4)"),
    ("--conv-clamp", "conv_clamp", _optional_float, "clamp conv outputs to +-this, or 'none' (default: 256)"),
    ("--z-dim", "z_dim", int, "latent z size (default: 512)"),
    ("--w-dim", "w_dim", int, "latent w size (default: 512)"),
    ("--mapping-layers", "mapping_layers", int, "mapping network depth (default: 8)"),
    ("--g-channel-base", "g_channel_base", int, "G channels at resolution r: min(base / r, max) (default: 16384)"),
    ("--g-channel-max", "g_channel_max", int, "G channel cap (default: 512)"),
    ("--d-channel-base", "d_channel_base", int, "D channel base (default: 16384)"),
    ("--d-channel-max", "d_channel_max", int, "D channel cap (default: 512)"),
    ("--mbstd-group", "mbstd_group_size", int, "minibatch-stddev group size (default: 4)"),
    ("--seed", "seed", int, "random seed of initialisation, latents and data order (default: 0)"),
    ("--snapshot-kimg", "snapshot_kimg", float, "snapshot + quality figure every N kimg (default: 200)"),
    ("--sample-kimg", "sample_kimg", float, "sample grid every N kimg (default: 100)"),
    ("--tick-kimg", "tick_kimg", float, "log line every N kimg (default: 4)"),
    ("--keep-snapshots", "keep_snapshots", int, "keep only the newest N snapshots; 0 = all (default: 0)"),
    ("--fd-samples", "fd_samples", int, "images per side of the quality figure; 0 = off (default: 5000)"),
    ("--workers", "num_workers", int, "threads decoding --data images (default: 4)"),
    ("--domain-workers", "domain_workers", int, "processes rendering --domain images (default: one per core)"),
]


def add_train_gan_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train-gan`` options to ``parser`` (a subcommand parser); returns it."""
    src = parser.add_argument_group("data (one of)")
    x = src.add_mutually_exclusive_group()
    x.add_argument("--data", type=Path, metavar="DIR",
                   help="folder of training images: DIR/images/ of a labeled set, or any folder of .png/.jpg "
                        "(centre-cropped and resized to --resolution; labels are never used)")
    x.add_argument("--domain", metavar="NAME",
                   help="built-in domain to render a fixed training set from (e.g. heads); only its images are used")
    src.add_argument("--domain-images", type=int, default=None, metavar="N",
                     help="images to render from --domain, once, cached in RUN_DIR/cache (default: 50000)")
    src.add_argument("--domain-seed", type=int, default=None, metavar="S",
                     help="seed of the rendered --domain set (default: 0)")

    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, required=True, metavar="RUN_DIR",
                     help="run folder; rerunning into it continues from its last snapshot")
    run.add_argument("--resume", nargs="?", const=True, default="auto", metavar="SNAPSHOT",
                     help="continue from the newest snapshot in RUN_DIR (an error if there is none), or from "
                          "SNAPSHOT (default: continue when RUN_DIR has a snapshot, else start)")
    run.add_argument("--time-limit", type=parse_duration, default=None, metavar="DURATION",
                     help="wall-clock budget from start (setup and data rendering included), e.g. 8m, 90s, "
                          "1.5h (plain numbers are minutes): past it, write a snapshot after the current step "
                          "and exit; rerun the same command to continue")
    run.add_argument("--stop-at-kimg", type=float, default=None, metavar="K",
                     help="stop (with a snapshot) at K kimg, before --kimg; rerun without it to continue")
    run.add_argument("--init-generator", type=Path, default=None, metavar="FILE",
                     help="start G and G_ema of a fresh run from this generator file (same architecture); "
                          "D and the optimizers start anew; ignored when resuming. Measured on the shipped "
                          "generator: the fresh D stayed at chance for 8 kimg, so prefer resuming a snapshot "
                          "that has its D")
    run.add_argument("--state-file", type=Path, default=None, metavar="FILE",
                     help="also keep the newest snapshot in FILE (replaced at every snapshot) and resume from "
                          "it when RUN_DIR has none: a run that continues on another machine "
                          "(e.g. checkpoints/heads64/train_state.pt, committed)")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default: auto)")
    add_threads_option(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    net = parser.add_argument_group("training settings (a resumed run must keep the ones that change training)")
    for flag, field, typ, help_ in _CONFIG_ARGS:
        metavar = "N" if typ is int else "X"
        net.add_argument(flag, dest=f"cfg_{field}", type=typ, default=None, metavar=metavar, help=help_)
    net.add_argument("--channel-base", type=int, default=None, metavar="N",
                     help="set --g-channel-base and --d-channel-base together")
    net.add_argument("--channel-max", type=int, default=None, metavar="N",
                     help="set --g-channel-max and --d-channel-max together")
    net.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=None, dest="cfg_xflip",
                     help="random horizontal flips of the training images (default: off)")
    net.add_argument("--fp32", action="store_true", default=None,
                     help="no float16 on CUDA (default: float16 in the top --num-fp16-res resolutions)")
    net.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None, dest="cfg_allow_tf32",
                     help="allow TF32 matmuls/convolutions on Ampere+ GPUs (default: off, as NVlabs)")
    return parser


def config_from_args(args: argparse.Namespace, stored: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """TrainConfig from explicit options over the run's stored config (if any) over the defaults."""
    base = TrainConfig.from_dict(stored["train"]).to_dict() if stored and "train" in stored else {}
    explicit: Dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            explicit[f.name] = v
    if getattr(args, "channel_base", None) is not None:
        explicit.setdefault("g_channel_base", args.channel_base)
        explicit.setdefault("d_channel_base", args.channel_base)
    if getattr(args, "channel_max", None) is not None:
        explicit.setdefault("g_channel_max", args.channel_max)
        explicit.setdefault("d_channel_max", args.channel_max)
    if getattr(args, "fp32", None):
        explicit["mixed_precision"] = False
    merged = {**base, **explicit}
    try:
        return TrainConfig.from_dict(merged)
    except (TypeError, ValueError) as err:
        raise HandsoffError(f"train-gan: {err}") from err


def train_gan_from_args(args: argparse.Namespace) -> Path:
    """Run ``handsoff train-gan`` from parsed arguments; returns the G_ema-latest path."""
    from .data import DataSource
    from .loop import _load_stored_config, train_gan

    stored = _load_stored_config(args.out)
    if args.data is not None:
        source = DataSource.folder(args.data)
    elif args.domain is not None:
        source = DataSource.from_domain(args.domain, args.domain_images or 50000, args.domain_seed or 0)
    elif stored is not None and "data" in stored:
        d = stored["data"]
        if d.get("kind") == "folder":
            source = DataSource.folder(d["path"])
        elif d.get("kind") == "domain":
            source = DataSource.from_domain(d["domain"], d["count"], d["seed"])
        else:
            raise HandsoffError(f"{args.out}: was trained on in-memory data; it cannot be resumed from the command line")
    else:
        raise HandsoffError("train-gan: give --data DIR or --domain NAME")
    if stored is not None and args.domain is not None and args.domain_images is None and \
            stored.get("data", {}).get("kind") == "domain":
        source = DataSource.from_domain(args.domain, stored["data"]["count"],
                                        args.domain_seed if args.domain_seed is not None else stored["data"]["seed"])
    config = config_from_args(args, stored)
    resume = args.resume
    if isinstance(resume, str) and resume != "auto":
        resume = Path(resume)
    return train_gan(config, args.out, source, resume=resume, device=args.device, time_limit=args.time_limit,
                     stop_at_kimg=args.stop_at_kimg, progress=not args.no_progress,
                     init_generator=args.init_generator, state_file=args.state_file)


def build_standalone_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="handsoff train-gan", description=TRAIN_GAN_DESCRIPTION, epilog=TRAIN_GAN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_train_gan_args(p)


def main(argv=None) -> int:
    """``python -m handsoff.gan.train ...`` (same options as ``handsoff train-gan``)."""
    import sys

    args = build_standalone_parser().parse_args(argv)
    try:
        train_gan_from_args(args)
    except HandsoffError as err:
        print(f"handsoff train-gan: error: {err}", file=sys.stderr)
        return 2
    return 0
