"""``handsoff demo``: the built-in domain end to end, as a predefined pipeline config.

16 labeled images of the 'heads' domain (seed 0, 64x64) -> inverted with the shipped encoder and
50 refinement steps -> a labeler fitted on them, their labels moved onto the reconstructions by
optical flow (`fit_labeler`'s default) -> 1,000 generated labeled images from the shipped generator.
Refinement and flow were chosen by `benchmarks/levers.py`: encoder only, the demo's former
setting, was worse on every task.
The labeler is `fit_labeler`'s default, the paper's faces setting (ten members, hidden 256, 32).
The demo runs torch on one CPU thread by default, as every long command does
(`handsoff.utils.threads`); the whole demo took 3 min 45 s on one thread of this project's
shared 2-core machine (load 2 to 4).
The config is written to ``DIR/demo.toml`` and run by `handsoff.synth.pipeline.run_pipeline`
(the same code path as ``handsoff run DIR/demo.toml``), so a rerun skips finished stages.

Pivotal tuning (the ``tune`` stage, `handsoff.invert.tune`) is one setting, ``tune_steps``
(``handsoff demo --tune-steps N``, 0 = none); `DEMO_TUNE_STEPS` is its default (None: no tuning).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from handsoff.defaults import CHECKPOINTS_DIR, DEFAULT_GENERATOR
from handsoff.errors import HandsoffError
from handsoff.synth.pipeline import dump_toml, load_config, run_pipeline
from handsoff.utils.io import PathLike, atomic_write_bytes
from handsoff.utils.threads import DEFAULT_THREADS

__all__ = ["DEMO_ENCODER", "DEMO_TUNE_STEPS", "demo_config", "run_demo"]

DEMO_ENCODER = CHECKPOINTS_DIR / "heads64" / "encoder.safetensors"
DEMO_CONFIG_NAME = "demo.toml"
#: Per-image refinement steps of the demo's inversion (about 2 minutes for 16 images on one thread).
DEMO_REFINE_STEPS = 50
#: Pivotal-tuning steps of the demo; None leaves the stage out (the generator is used as shipped).
DEMO_TUNE_STEPS: Optional[int] = None


def demo_config(out: Path, device: str = "auto", n: int = 1000,
                tune_steps: Optional[int] = DEMO_TUNE_STEPS, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """The demo's pipeline config (as parsed TOML), writing into ``out``; ``tune_steps`` (None or 0:
    none) adds a ``[tune]`` stage with that many steps (its other settings: `tune_generator`'s defaults)."""
    config = {
        "out": str(out.resolve()),
        "generator": str(DEFAULT_GENERATOR),
        "device": device,
        "threads": threads,
        "labeled": {"render": {"domain": "heads", "n": 16, "seed": 0, "size": 64}},
        "encoder": {"path": str(DEMO_ENCODER)},
        "invert": {"refine_steps": DEMO_REFINE_STEPS},
        "labeler": {"seed": 0},
        "generate": {"n": n, "seed": 0, "truncation": 0.7, "filter": 0.1, "shard_size": 250, "batch": 16},
    }
    if tune_steps:
        config["tune"] = {"steps": int(tune_steps), "seed": 0}
    return config


def run_demo(out: PathLike, device: str = "auto", n: int = 1000, progress: bool = True,
             tune_steps: Optional[int] = DEMO_TUNE_STEPS, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """Write ``out/demo.toml`` and run it; returns the run record (see `run_pipeline`).

    Leaves ``out/labeler.safetensors``, ``out/shards/`` (shards, manifest.json, preview.png,
    report.json), ``out/preview.png`` and ``out/report.json`` (copies of the run's, where a user
    looks first), ``out/labeled/``, ``out/latents.safetensors`` and ``out/run.json``; with
    ``tune_steps``, also ``out/tuned/`` (the tuned generator the labeler and corpus use).
    """
    out = Path(out)
    for needed in (DEFAULT_GENERATOR, DEMO_ENCODER):
        if not needed.is_file():
            raise HandsoffError(f"{needed}: the demo needs this shipped checkpoint (missing from this checkout)")
    config_path = out / DEMO_CONFIG_NAME
    atomic_write_bytes(config_path, dump_toml(demo_config(out, device, n, tune_steps, threads)).encode())
    record = run_pipeline(load_config(config_path), progress=progress)
    shards = out / "shards"
    for name in ("preview.png", "report.json"):
        atomic_write_bytes(out / name, (shards / name).read_bytes())
    print(f"labeler: {out / 'labeler.safetensors'}\ncorpus:  {shards}\npreview: {out / 'preview.png'}\n"
          f"report:  {out / 'report.json'}")
    return record
