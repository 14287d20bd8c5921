"""Generation-engine throughput: labeled images/s against generator-only images/s.

Figures, all on one device, the same seeds and the same batch size:

* ``generator``: mapping + synthesis + conversion to uint8 (what any StyleGAN sampler does);
* ``labeled``: the same plus the hypercolumn labeler (labels and uncertainty), in memory;
* ``engine``: ``generate_corpus`` end to end: labeling, filtering, HDF5 shards and manifest
  written by the background writer (samples/s from its report, start-up excluded);
* ``processes``: ``handsoff generate`` in 1 process (``--threads`` torch threads) and under
  ``torchrun --nproc-per-node P`` (one thread per process on the CPU), from each run's report;
* ``writing``: `write_shard` alone on synthetic 1000-sample shards (MB/s and samples/s).

Without ``--labeler`` a labeler is made first with the demo pipeline (``handsoff demo``'s
stages, 16 rendered images) in ``--workdir``.

    python benchmarks/generate.py                                  # writes benchmarks/results/generate-cpu.json
    python benchmarks/generate.py --labeler runs/demo/labeler.safetensors --n 512 --batch 16
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _machine import device_name, load_average  # noqa: E402
from handsoff.data.shards import ShardRecords, write_shard  # noqa: E402
from handsoff.defaults import DEFAULT_GENERATOR  # noqa: E402
from handsoff.gan.checkpoints import load_generator  # noqa: E402
from handsoff.gan.sampling import z_from_seeds  # noqa: E402
from handsoff.synth.engine import generate_corpus  # noqa: E402
from handsoff.synth.labeling import load_labeling  # noqa: E402
from handsoff.synth.settings import GenerateSettings  # noqa: E402
from handsoff.utils.images import to_uint8  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(run: Callable[[], int], device: torch.device, repeats: int) -> dict[str, float]:
    """Best and median items/s of ``run`` (which returns how many it made)."""
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        count = run()
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    return {"best": round(max(rates), 2), "median": round(float(np.median(rates)), 2)}


def in_memory(G: torch.nn.Module, label_fn: Callable, n: int, batch: int, psi: float, device: torch.device,
              repeats: int) -> dict[str, dict[str, float]]:
    """Generator-only and labeled images/s over seeds 0..n-1."""
    chunks = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]

    @torch.no_grad()
    def generator_only() -> int:
        for seeds in chunks:
            ws = G.mapping(z_from_seeds(seeds, G.z_dim).to(device), truncation_psi=psi)
            to_uint8(G.synthesis(ws, noise_mode="const"))
        return n

    @torch.no_grad()
    def labeled() -> int:
        for seeds in chunks:
            label_fn(G.mapping(z_from_seeds(seeds, G.z_dim).to(device), truncation_psi=psi))
        return n

    generator_only(), labeled()  # warm-up: kernels, allocator
    return {"generator": rate(generator_only, device, repeats), "labeled": rate(labeled, device, repeats)}


def engine(G: torch.nn.Module, label_fn: Callable, info: Any, n: int, batch: int, repeats: int) -> dict[str, float]:
    """End-to-end samples/s of generate_corpus (fresh folder each repeat), from its report."""
    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            settings = GenerateSettings(n=n, shard_size=max(1, n // 4))
            result = generate_corpus(G, label_fn, info, Path(tmp) / "c", settings, batch=batch, progress=False,
                                     preview=False)
            rates.append(result.report["samples_per_s"])
    return {"best": max(rates), "median": round(float(np.median(rates)), 2)}


def processes(generator: Path, labeler: Path, n: int, batch: int, nproc: int, device: str,
              threads: int) -> dict[str, float]:
    """samples/s of `handsoff generate` in 1 process (``threads`` threads) and under torchrun with
    ``nproc`` processes (torchrun's default: one thread each), from the reports."""
    out: dict[str, float] = {}
    common = ["generate", "--labeler", str(labeler), "--generator", str(generator), "--num-samples", str(n),
              "--shard-size", str(max(1, n // (4 * nproc))), "--batch", str(batch), "--device", device, "--no-progress"]
    launchers = {"1": [sys.executable, "-m", "handsoff", *common, "--threads", str(threads)],
                 str(nproc): [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(nproc), "-m", "handsoff", *common]}
    for key, launcher in launchers.items():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([*launcher, "--out", str(Path(tmp) / "c")], capture_output=True, text=True,
                                  cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(launcher)} failed:\n{done.stderr[-2000:]}")
            out[key] = json.loads((Path(tmp) / "c" / "report.json").read_text())["samples_per_s"]
    return out


def writing(resolution: int, classes: int, keypoints: int, n: int = 1000, repeats: int = 3) -> dict[str, float]:
    """write_shard throughput on synthetic samples of the given size."""
    rng = np.random.default_rng(0)
    records = ShardRecords(
        images=rng.integers(0, 256, (n, resolution, resolution, 3), dtype=np.uint8),
        seeds=np.arange(n, dtype=np.int64), index=np.arange(n, dtype=np.int64),
        uncertainty=rng.random(n, dtype=np.float32), scores={"seg_js": rng.random(n, dtype=np.float32)},
        seg=rng.integers(0, classes, (n, resolution, resolution), dtype=np.uint8),
        depth=rng.random((n, resolution, resolution)).astype(np.float16),
        keypoints=rng.random((n, keypoints, 3)).astype(np.float32))
    times, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            start = time.perf_counter()
            path = write_shard(Path(tmp) / f"s{i}.h5", records, {"shard": i})
            times.append(time.perf_counter() - start)
            size = path.stat().st_size
    best = min(times)
    return {"samples_per_s": round(n / best), "MB_per_s": round(size / best / 1e6, 1), "shard_MB": round(size / 1e6, 2)}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def make_labeler(workdir: Path, device: str) -> Path:
    """A labeler from the demo pipeline's stages (generating only 16 samples)."""
    from handsoff.synth.demo import demo_config
    from handsoff.synth.pipeline import config_from_dict, run_pipeline

    config = demo_config(workdir, device=device, n=16)
    run_pipeline(config_from_dict(config, workdir, "benchmark demo config"), progress=False)
    return workdir / "labeler.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    parser.add_argument("--labeler", type=Path, default=None, help="labeler file (default: make one, see above)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to make the labeler (default: a temp dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=256, help="samples per measurement (default: 256)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--truncation", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="runs per in-process figure; the best counts")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes to compare with 1 (0 = skip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the in-process figures and of the 1-process run (default: all cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/generate-<cpu|cuda>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        labeler_path = args.labeler or make_labeler(args.workdir or Path(tmp) / "demo", args.device)
        G = load_generator(args.generator, device=device)
        label_fn, info = load_labeling(labeler_path, G, device)
        figures = in_memory(G, label_fn, args.n, args.batch, args.truncation, device, args.repeats)
        figures["engine"] = engine(G, label_fn, info, args.n, args.batch, args.repeats)
        scaling = processes(args.generator, labeler_path, args.n, args.batch, args.processes, args.device,
                            args.threads) if args.processes > 1 else {}
        labeler_meta = {"classes": len(info.classes), "keypoints": len(info.keypoint_names), "depth": info.depth,
                        "digest": info.digest}
    write = writing(G.img_resolution, max(2, len(info.classes)), max(1, len(info.keypoint_names)))

    gen, lab, eng = (figures[k]["best"] for k in ("generator", "labeled", "engine"))
    record = {
        "benchmark": "generation engine: labeled images/s vs generator-only images/s (same seeds, same batch)",
        "device": f"{device.type}: {device_name(device)}, {os.cpu_count()} cores",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generator": _shown(args.generator), "resolution": G.img_resolution, "labeler": labeler_meta,
        "n": args.n, "batch": args.batch, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "img_per_s": figures, "labeled_over_generator": round(lab / gen, 3), "engine_over_labeled": round(eng / lab, 3),
        "processes_img_per_s": scaling,
        "speedup_processes": round(scaling[str(args.processes)] / scaling["1"], 3) if scaling else None,
        "writing": write, "load_average_before": load_before, "load_average_after": load_average(),
        "note": "best of --repeats (other programs only ever slow a run down); processes: one run each, from the "
                "report's samples/s (start-up excluded); the single process uses torch_threads threads, torchrun "
                "gives each process one (OMP_NUM_THREADS=1).",
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"generate-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")

    print(f"\n{'what':<34}{'img/s':>10}   ({device.type}, {G.img_resolution}x{G.img_resolution}, batch {args.batch}, "
          f"{args.n} samples; load {load_before} -> {record['load_average_after']})")
    rows = [("generator only", gen), ("generator + labeler", lab), ("engine (label, filter, write)", eng)]
    rows += [(f"handsoff generate, {k} process(es)", v) for k, v in scaling.items()]
    for name, value in rows:
        print(f"{name:<34}{value:>10.1f}")
    speedup = f"; {args.processes} processes / 1: {record['speedup_processes']:.2f}x" if scaling else ""
    print(f"labeled / generator-only: {record['labeled_over_generator']:.2f}; engine / labeled: "
          f"{record['engine_over_labeled']:.2f}{speedup}")
    print(f"writing: {write['samples_per_s']} samples/s, {write['MB_per_s']} MB/s ({write['shard_MB']} MB shards)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
