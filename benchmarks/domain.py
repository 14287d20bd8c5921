"""Throughput of the built-in 'heads' domain: labeled images per second on the CPU.

Counts complete labeled images (image, segmentation, depth, keypoints as numpy arrays) at
64, 128 and 256 pixels, three ways:

* ``threads=1``: one process, one torch thread;
* ``threads=T``: one process, T torch threads (intra-op parallelism);
* ``processes=P``: P worker processes with one torch thread each, results returned to this
  process (`handsoff.domains.parallel.render_chunks`; worker start-up is not timed).

Each figure is the best of ``--repeats`` runs (other programs on a shared machine only ever
slow a run down); the median is recorded too, with the load average, in the JSON.

    python benchmarks/domain.py                    # writes benchmarks/results/domain-cpu.json
    python benchmarks/domain.py --sizes 64 --n 1024 --repeats 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import device_name, load_average  # noqa: E402
from handsoff.domains import Domain, get_domain  # noqa: E402
from handsoff.domains.parallel import RenderPool, chunk_jobs  # noqa: E402

TARGET_64 = 500.0  # labeled images per second at 64x64 on a 2-core CPU


def timed(run: Callable[[], int], repeats: int) -> tuple[float, float]:
    """Best and median images per second of ``run`` (which returns how many it made)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return max(rates), statistics.median(rates)


def images_for(size: int, n64: int) -> int:
    """Fewer images at larger sizes, so that every size takes about as long."""
    return max(8, n64 * 64 * 64 // (size * size))


def in_process(domain: Domain, n: int, seed: int, size: int, threads: int, repeats: int) -> dict[str, float]:
    """Throughput of ``domain.render`` in this process on ``threads`` torch threads.

    With one thread the CPU time is recorded too: images per CPU-second hardly depend on
    what else runs on the machine, so they tell what one idle core would do.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu: list[float] = []

    def run() -> int:
        start = time.thread_time()
        made = len(domain.render(n, seed, size))
        cpu.append(made / (time.thread_time() - start))
        return made

    try:
        domain.render(1, seed, size)  # warm-up: noise textures, allocator
        best, median = timed(run, repeats)
    finally:
        torch.set_num_threads(previous)
    result = {"best": round(best, 1), "median": round(median, 1)}
    if threads == 1:
        result["per_cpu_second"] = round(max(cpu), 1)
    return result


def in_workers(domain: Domain, n: int, seed: int, size: int, workers: int, repeats: int) -> dict[str, float]:
    """Throughput of ``workers`` processes, batches returned here (worker start-up not timed)."""
    jobs = chunk_jobs(domain, n, seed, size, chunk=max(1, n // (4 * workers)))
    with RenderPool(domain, workers) as pool:
        list(pool.map(jobs[:workers]))  # start and warm up every worker
        best, median = timed(lambda: sum(len(b) for b in pool.map(jobs)), repeats)
    return {"best": round(best, 1), "median": round(median, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1024, help="images per run at 64x64 (fewer at larger sizes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for the multi-threaded run (default: all cores)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="worker processes for the multi-process run (default: all cores; 1 skips it)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "domain-cpu.json")
    args = parser.parse_args(argv)

    domain = get_domain("heads")
    results: dict[str, dict[str, dict[str, float]]] = {}
    load_before = load_average()
    for size in args.sizes:
        n = images_for(size, args.n)
        row = {f"threads={t}": in_process(domain, n, args.seed, size, t, args.repeats)
               for t in sorted({1, args.threads})}
        if args.processes > 1:
            row[f"processes={args.processes}"] = in_workers(domain, n, args.seed, size, args.processes, args.repeats)
        results[str(size)] = row
        print(f"size {size:4d} ({n} images/run): " + ", ".join(f"{k}: {v['best']:.0f} img/s" for k, v in row.items()),
              flush=True)

    best64 = max((v["best"] for v in results.get("64", {}).values()), default=None)
    per_core64 = results.get("64", {}).get("threads=1", {}).get("per_cpu_second")
    record = {
        "benchmark": "heads domain: labeled images (image, seg, depth, keypoints) per second",
        "device": f"cpu: {device_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": {"default": torch.get_num_threads(), "multi": args.threads, "processes": args.processes},
        "repeats": args.repeats,
        "images_per_run_at_64": images_for(64, args.n),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "img_per_s": results,
        "note": "best = wall-clock images/s (best run); per_cpu_second = images per second of CPU time of "
                "one thread, what one idle core does. The load averages show how busy the machine was.",
        "target_64": TARGET_64,
        "target_64_met": None if best64 is None else best64 >= TARGET_64,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    modes = sorted({k for row in results.values() for k in row}, key=lambda k: (k.split("=")[0] != "threads", k))
    print()
    print(f"{'size':>6} " + " ".join(f"{m:>14}" for m in modes) + "   (labeled img/s, best of "
          f"{args.repeats}; load {load_before} -> {record['load_average_after']})")
    for size, row in results.items():
        print(f"{size:>6} " + " ".join(f"{row[m]['best']:>14.0f}" if m in row else f"{'-':>14}" for m in modes))
    if per_core64 is not None:
        print(f"\none thread at 64x64: {per_core64:.0f} images per CPU-second (what one idle core does)")
    if best64 is not None:
        verdict = "met" if best64 >= TARGET_64 else "NOT met"
        print(f"target {TARGET_64:.0f} img/s at 64x64: {verdict} (best {best64:.0f} img/s measured)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
