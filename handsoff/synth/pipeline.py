"""``handsoff run CONFIG``: the whole pipeline from one TOML file, stage by stage, resumable.

::

    out = "runs/faces"                 # every output goes here
    generator = "ffhq256.safetensors"  # default: the shipped built-in-domain generator
    device = "auto"
    threads = 1                        # torch CPU threads (default: 1, see handsoff.utils.threads)

    [labeled]                          # the few labeled images: a labeled-set folder ...
    path = "my_labeled_faces"
    # [labeled.render]                 # ... or rendered from a built-in domain
    # domain = "heads"
    # n = 16
    # seed = 0
    # size = 64

    [encoder]                          # a given encoder ...
    path = "encoder.safetensors"
    # steps = 2000                     # ... or fit one: fit_encoder's settings
    # lpips_steps = 500                #     (steps, lpips_steps, batch, lpips_net, seed, ...)
    # use_labeled_images = true        #     and show it the labeled images in stage 2

    [invert]                           # invert_images' settings: refine_steps, batch, seed
    refine_steps = 100

    [tune]                             # optional: pivotal tuning (tune_generator's settings: steps,
    steps = 100                        # lr, batch, locality_weight, ...); without the table, no tuning

    [labeler]                          # fit_labeler's settings: tasks, ensemble, hidden, steps, ...
    ensemble = 10

    [generate]                         # handsoff generate's settings (n, seed, truncation, filter,
    n = 10000                          # shard_size, keep_all, want_class, ...) and batch
    filter = 0.1

Relative paths are relative to the config file's folder. Stages and their outputs in ``out``:
``render`` -> ``labeled/`` (with ``[labeled.render]``), ``fit-encoder`` ->
``encoder.safetensors`` (without ``[encoder] path``), ``invert`` -> ``latents.safetensors``,
``tune`` (with ``[tune]``) -> ``tuned/`` (G' and the latents re-stamped for it:
`handsoff.invert.tune.tune_folder`), ``fit-labeler`` -> ``labeler.safetensors``, ``generate`` ->
``shards/`` (shards, manifest.json, preview.png, report.json). With ``[tune]``, fit-labeler and
generate use the tuned generator and its latents. Each output gets a stamp file
(`handsoff.synth.stages`): a rerun skips every stage whose inputs and settings are unchanged,
and a generate stage interrupted midway resumes. ``out/run.json`` records what ran and how
long each stage took (wall and CPU seconds).
"""
from __future__ import annotations

import inspect
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from handsoff.defaults import DEFAULT_GENERATOR
from handsoff.errors import HandsoffError
from handsoff.utils.threads import DEFAULT_THREADS
from handsoff.synth.stages import Stage, run_stages
from handsoff.utils.io import PathLike, atomic_write_bytes

__all__ = ["PipelineConfig", "load_config", "config_from_dict", "build_stages", "run_pipeline", "dump_toml",
           "RUN_RECORD"]

RUN_RECORD = "run.json"
_TOP_KEYS = {"out", "generator", "device", "threads", "labeled", "encoder", "invert", "tune", "labeler", "generate"}


@dataclass
class PipelineConfig:
    """A parsed pipeline config (see the module docstring); paths are absolute or CWD-relative.

    Attributes:
        out: output folder.
        generator: generator checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ...
        threads: torch CPU threads for the run (default `DEFAULT_THREADS`, 1: fastest on a shared CPU;
            None: leave torch's setting as it is).
        labeled: a labeled-set folder (None when ``render`` is given).
        render: built-in-domain render settings: ``domain``, ``n``, ``seed``, ``size``.
        encoder: a given encoder file (None: fit one with ``fit_encoder``).
        fit_encoder: `handsoff.invert.train.fit_encoder` keyword arguments (plus
            ``use_labeled_images``).
        invert: `handsoff.invert.invert.invert_images` keyword arguments.
        tune: `handsoff.invert.tune.tune_generator` keyword arguments; None = no tuning stage.
        labeler: `handsoff.label.train.fit_labeler` keyword arguments.
        generate: `GenerateSettings` fields plus ``batch``.
        source: the file the config was read from (for messages).
    """

    out: Path
    generator: Path = DEFAULT_GENERATOR
    device: str = "auto"
    threads: Optional[int] = DEFAULT_THREADS
    labeled: Optional[Path] = None
    render: Optional[dict[str, Any]] = None
    encoder: Optional[Path] = None
    fit_encoder: dict[str, Any] = field(default_factory=dict)
    invert: dict[str, Any] = field(default_factory=dict)
    tune: Optional[dict[str, Any]] = None
    labeler: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    source: str = "<config>"


# ---------------------------------------------------------------------------------------------
# Reading and writing configs

def _table(data: Mapping[str, Any], key: str, source: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise HandsoffError(f"{source}: [{key}] must be a table")
    return dict(value)


def _threads(value: Any, source: str) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HandsoffError(f"{source}: 'threads' must be a positive integer (got {value!r})")
    return value


def config_from_dict(data: Mapping[str, Any], base: Path = Path("."), source: str = "<config>") -> PipelineConfig:
    """A `PipelineConfig` from parsed TOML; relative paths are taken relative to ``base``."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise HandsoffError(f"{source}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    if "out" not in data:
        raise HandsoffError(f"{source}: needs 'out', the output folder")

    def path(value: Any) -> Path:
        return (base / str(value)) if not Path(str(value)).is_absolute() else Path(str(value))

    labeled = _table(data, "labeled", source)
    render = labeled.pop("render", None)
    labeled_path = labeled.pop("path", None)
    if labeled or (render is None) == (labeled_path is None):
        raise HandsoffError(f"{source}: [labeled] needs exactly one of 'path' (a labeled-set folder) or "
                            f"[labeled.render] (domain, n, seed, size)")
    if render is not None and not isinstance(render, dict):
        raise HandsoffError(f"{source}: [labeled.render] must be a table")
    encoder = _table(data, "encoder", source)
    encoder_path = encoder.pop("path", None)
    if encoder_path is not None and encoder:
        raise HandsoffError(f"{source}: [encoder] has 'path' and fitting settings ({', '.join(sorted(encoder))}); "
                            f"give one or the other")
    return PipelineConfig(
        out=path(data["out"]), generator=path(data.get("generator", DEFAULT_GENERATOR)),
        device=str(data.get("device", "auto")), threads=_threads(data.get("threads", DEFAULT_THREADS), source),
        labeled=None if labeled_path is None else path(labeled_path),
        render=render, encoder=None if encoder_path is None else path(encoder_path), fit_encoder=encoder,
        invert=_table(data, "invert", source), tune=_table(data, "tune", source) if "tune" in data else None,
        labeler=_table(data, "labeler", source),
        generate=_table(data, "generate", source), source=source)


def load_config(path: PathLike) -> PipelineConfig:
    """Read a TOML pipeline config; relative paths in it are relative to its folder."""
    p = Path(path)
    if p.suffix.lower() not in (".toml", ""):
        raise HandsoffError(f"{p}: pipeline configs are TOML files (.toml)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise HandsoffError(f"{p}: cannot read ({err.strerror or err})") from None
    except tomllib.TOMLDecodeError as err:
        raise HandsoffError(f"{p}: not valid TOML ({err})") from None
    return config_from_dict(data, p.resolve().parent, str(p))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML text of nested dicts of strings, numbers, booleans and lists (None values are left out)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    parts = ["\n".join(scalars)] if scalars else []
    for key, value in data.items():
        if isinstance(value, dict):
            parts.append(f"[{prefix}{key}]\n" + dump_toml(value, f"{prefix}{key}.").rstrip("\n"))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The stages

def _kwargs(func: Callable[..., Any], settings: Mapping[str, Any], section: str, source: str,
            reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """``settings`` checked against ``func``'s keyword parameters (a typo is an error, not ignored)."""
    params = inspect.signature(func).parameters
    allowed = sorted(k for k, p in params.items()
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in reserved)
    for key in settings:
        if key not in allowed:
            raise HandsoffError(f"{source}: [{section}] has no setting {key!r} (known: {', '.join(allowed)})")
    return dict(settings)


class _Models:
    """Loads each generator once, on first use, on the configured device."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self._loaded: dict[Path, Any] = {}

    @property
    def device(self) -> Any:
        from handsoff.utils.runtime import resolve_device

        return resolve_device(self.config.device)

    @property
    def G(self) -> Any:
        """The configured generator."""
        return self.load(self.config.generator)

    def load(self, path: Path) -> Any:
        """The generator of ``path`` (a tuned one is loaded only after the stage that writes it ran)."""
        if path not in self._loaded:
            from handsoff.gan.checkpoints import load_generator

            self._loaded[path] = load_generator(path, device=self.device)
        return self._loaded[path]


@dataclass(frozen=True)
class _Paths:
    labeled: Path
    encoder: Path
    latents: Path
    tuned: Path
    labeler: Path
    shards: Path
    generator: Path  # what fit-labeler and generate use: G, or G' with [tune]
    labeler_latents: Path  # the latents that belong to it

    @staticmethod
    def of(config: PipelineConfig) -> "_Paths":
        from handsoff.invert.tune import TUNED_GENERATOR, TUNED_LATENTS

        out = config.out
        tuned, latents = out / "tuned", out / "latents.safetensors"
        return _Paths(labeled=config.labeled or out / "labeled", encoder=config.encoder or out / "encoder.safetensors",
                      latents=latents, tuned=tuned, labeler=out / "labeler.safetensors", shards=out / "shards",
                      generator=tuned / TUNED_GENERATOR if config.tune is not None else config.generator,
                      labeler_latents=tuned / TUNED_LATENTS if config.tune is not None else latents)


def _render_stage(config: PipelineConfig, paths: _Paths, progress: bool) -> Stage:
    render = {"domain": "heads", "seed": 0, **(config.render or {})}
    unknown = sorted(set(render) - {"domain", "n", "seed", "size"})
    if unknown or "n" not in render or "size" not in render:
        raise HandsoffError(f"{config.source}: [labeled.render] takes domain, n, seed and size (n and size needed)")

    def run() -> None:
        from handsoff.data.labeled_set import render_to_folder
        from handsoff.domains import get_domain

        render_to_folder(get_domain(render["domain"]), int(render["n"]), int(render["seed"]), int(render["size"]),
                         paths.labeled, overwrite=True, progress=progress)

    return Stage("render", paths.labeled, run, settings=render)


def _fit_encoder_stage(config: PipelineConfig, paths: _Paths, models: _Models, progress: bool) -> Stage:
    from handsoff.invert.train import fit_encoder

    settings = dict(config.fit_encoder)
    use_images = bool(settings.pop("use_labeled_images", False))
    kwargs = _kwargs(fit_encoder, settings, "encoder", config.source,
                     reserved=("G", "images", "device", "progress", "log_path", "lpips", "checkpoint_path"))

    def run() -> None:
        from handsoff.data.images import read_image_folder
        from handsoff.invert.encoder import save_encoder

        images = read_image_folder(paths.labeled, resolution=models.G.img_resolution)[1] if use_images else None
        checkpoint = config.out / ".encoder-checkpoint.pt"
        encoder = fit_encoder(models.G, images=images, device=models.device, progress=progress,
                              log_path=config.out / "encoder-log.json", checkpoint_path=checkpoint, **kwargs)
        save_encoder(paths.encoder, encoder, models.G)
        checkpoint.unlink(missing_ok=True)

    inputs = {"generator": config.generator, **({"labeled": paths.labeled} if use_images else {})}
    return Stage("fit-encoder", paths.encoder, run, inputs=inputs,
                 settings={**kwargs, "use_labeled_images": use_images})


def _invert_stage(config: PipelineConfig, paths: _Paths, models: _Models, progress: bool) -> Stage:
    from handsoff.invert.invert import invert_images

    kwargs = _kwargs(invert_images, config.invert, "invert", config.source,
                     reserved=("G", "encoder", "images", "lpips", "progress"))

    def run() -> None:
        from handsoff.data.images import read_image_folder
        from handsoff.gan.digest import generator_digest
        from handsoff.invert.encoder import load_encoder
        from handsoff.invert.latents import Latents, save_latents

        G = models.G
        names, images = read_image_folder(paths.labeled, resolution=G.img_resolution)
        encoder = load_encoder(paths.encoder, G=G, device=models.device)
        result = invert_images(G, encoder, images, progress=progress, **kwargs)
        extra = {"lpips": [round(float(x), 5) for x in result.lpips], "psnr": [round(float(x), 3) for x in result.psnr]}
        save_latents(paths.latents, Latents(result.ws, names, generator_digest(G), extra))

    return Stage("invert", paths.latents, run, settings=kwargs,
                 inputs={"generator": config.generator, "encoder": paths.encoder, "labeled": paths.labeled})


def _tune_stage(config: PipelineConfig, paths: _Paths, models: _Models, progress: bool) -> Stage:
    from handsoff.invert.tune import TUNED_GENERATOR, TUNED_LATENTS, tune_folder, tune_generator

    kwargs = _kwargs(tune_generator, config.tune or {}, "tune", config.source,
                     reserved=("G", "ws", "images", "lpips", "progress", "callback"))

    def run() -> None:
        tune_folder(config.generator, paths.latents, paths.labeled, paths.tuned, device=models.device,
                    overwrite=True, progress=progress, command=f"handsoff run {config.source}", **kwargs)

    def done() -> bool:
        return (paths.tuned / TUNED_GENERATOR).is_file() and (paths.tuned / TUNED_LATENTS).is_file()

    return Stage("tune", paths.tuned, run, settings=kwargs, done=done,
                 inputs={"generator": config.generator, "latents": paths.latents, "labeled": paths.labeled})


def _fit_labeler_stage(config: PipelineConfig, paths: _Paths, models: _Models, progress: bool) -> Stage:
    from handsoff.label.train import fit_labeler

    kwargs = _kwargs(fit_labeler, config.labeler, "labeler", config.source,
                     reserved=("G", "ws", "labels", "device", "progress", "callback"))

    def run() -> None:
        from handsoff.data.labeled_set import read_labeled_set
        from handsoff.gan.digest import generator_digest
        from handsoff.invert.latents import load_latents
        from handsoff.label.io import save_labeler

        G = models.load(paths.generator)
        labels = read_labeled_set(paths.labeled)
        latents = load_latents(paths.labeler_latents, expect_digest=generator_digest(G),
                               expect_shape=(G.num_ws, G.w_dim))
        ws = latents.select(labels.names, paths.labeler_latents).to(models.device)
        labeler = fit_labeler(G, ws, labels, device=models.device, progress=progress, **kwargs)
        save_labeler(paths.labeler, labeler, G,
                     extra={"labeled": str(paths.labeled), "latents": str(paths.labeler_latents)})

    return Stage("fit-labeler", paths.labeler, run, settings=kwargs,
                 inputs={"generator": paths.generator, "latents": paths.labeler_latents, "labeled": paths.labeled})


def _generate_stage(config: PipelineConfig, paths: _Paths, progress: bool) -> Stage:
    from handsoff.data.shards import read_manifest
    from handsoff.synth.settings import GenerateSettings

    settings_dict = dict(config.generate)
    batch = int(settings_dict.pop("batch", 16))
    if "n" not in settings_dict:
        raise HandsoffError(f"{config.source}: [generate] needs n, the number of samples to generate")
    settings = GenerateSettings(**_kwargs(GenerateSettings, settings_dict, "generate", config.source))

    def run() -> None:
        from handsoff.synth.generation import generate

        generate(paths.labeler, paths.shards, settings, generator=paths.generator, batch=batch,
                 device=config.device, progress=progress)

    def done() -> bool:
        manifest = read_manifest(paths.shards) if (paths.shards / "manifest.json").exists() else None
        return manifest is not None and manifest.complete

    return Stage("generate", paths.shards, run, inputs={"generator": paths.generator, "labeler": paths.labeler},
                 settings={**settings.to_dict(), "batch": batch}, done=done)


def build_stages(config: PipelineConfig, progress: bool = True) -> list[Stage]:
    """The stages of ``config``, in order (`handsoff.synth.stages.run_stages` runs them)."""
    paths = _Paths.of(config)
    models = _Models(config)
    stages = []
    if config.render is not None:
        stages.append(_render_stage(config, paths, progress))
    if config.encoder is None:
        stages.append(_fit_encoder_stage(config, paths, models, progress))
    stages.append(_invert_stage(config, paths, models, progress))
    if config.tune is not None:
        stages.append(_tune_stage(config, paths, models, progress))
    stages += [_fit_labeler_stage(config, paths, models, progress), _generate_stage(config, paths, progress)]
    return stages


def run_pipeline(config: PipelineConfig, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stages of ``config`` that are not up to date; returns (and writes to
    ``out/run.json``) what ran and each stage's wall time in seconds."""
    import torch

    config.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    stages = build_stages(config, progress)
    start, cpu_start = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        for stage in stages:
            began = time.perf_counter()
            if run_stages([stage], log):
                timings[stage.name] = round(time.perf_counter() - began, 2)
    finally:
        torch.set_num_threads(threads)
    record = {"config": config.source, "ran": list(timings),
              "skipped": [s.name for s in stages if s.name not in timings],
              "seconds": timings, "total_seconds": round(time.perf_counter() - start, 2),
              "cpu_seconds": round(time.process_time() - cpu_start, 2), "threads": config.threads,
              "outputs": {s.name: str(s.output) for s in stages}}
    atomic_write_bytes(config.out / RUN_RECORD, (json.dumps(record, indent=1) + "\n").encode())
    log(f"pipeline done in {record['total_seconds']:.0f} s: ran {', '.join(record['ran']) or 'nothing'}"
        f"{'; skipped ' + ', '.join(record['skipped']) if record['skipped'] else ''}")
    return record
