"""Soak test: run the same tests many times in a row and count the failures.

A random abort (``terminate called without an active exception`` in one torchrun rank) was
seen once in CI under load and never again; this is the loop that looks for it. Each run is a
fresh ``pytest`` process on a snapshot of one commit (``git archive``), so editing the working
tree while the loop runs changes nothing it tests. Every run records its exit status, wall
time and the load average; a failing run keeps its whole output (with ``PYTHONFAULTHANDLER=1``,
a crashing rank prints every Python thread's stack) in the work folder, with the core file
where the kernel writes one into the working folder (``core_pattern`` ``core``).

The record, ``benchmarks/results/soak-cpu.json``, is rewritten after every run, so a loop cut
short by the end of a session still leaves its count; rerunning the same command continues it
(the runs already recorded for the same commit and tests count).

    python benchmarks/soak.py --runs 200                  # the distributed and crash tests
    python benchmarks/soak.py --runs 20 tests/test_x.py   # any tests
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import device_name, load_average  # noqa: E402
from quality import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TESTS = ("tests/test_synth_dist.py", "tests/test_synth_crash.py")
RESULT = ROOT / "benchmarks" / "results" / "soak-cpu.json"
WORK = ROOT / "benchmarks" / "work" / "soak"


def _commit(ref: str) -> str:
    return subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def _snapshot(commit: str, into: Path) -> None:
    """Extract ``commit``'s tracked files into ``into``."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as handle:
        handle.write(archive)
        handle.seek(0)
        with tarfile.open(fileobj=handle) as tar:
            tar.extractall(into, filter="data")


def _previous() -> dict[str, Any]:
    """The record so far: ``{"commits": {sha: {"tests": [...], "runs": [...]}, ...}}``."""
    if not RESULT.is_file():
        return {"commits": {}}
    data = json.loads(RESULT.read_text(encoding="utf-8"))
    return {"commits": data.get("commits", {})}


def _summary(tests: list[str], runs: list[dict[str, Any]]) -> dict[str, Any]:
    failures = [r["run"] for r in runs if r["returncode"] != 0]
    seconds = [r["seconds"] for r in runs]
    return {"tests": tests, "runs_done": len(runs), "failures": len(failures), "failed_runs": failures,
            "seconds_per_run": {"min": min(seconds), "max": max(seconds), "mean": round(sum(seconds) / len(seconds), 1)},
            "runs": runs}


def _allow_core_dumps() -> None:
    """In the test process (and so its children): write core files, for ``gdb -batch -ex bt``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", nargs="*", default=list(DEFAULT_TESTS), help="pytest paths, relative to the repository")
    parser.add_argument("--runs", type=int, default=200, help="runs in all, counting those already recorded (default 200)")
    parser.add_argument("--commit", default="HEAD", help="the commit whose tests run (default HEAD)")
    parser.add_argument("--stop-on-failure", action="store_true", help="stop at the first failing run")
    args = parser.parse_args(argv)

    commit = _commit(args.commit)
    tests = list(args.tests)
    record = _previous()
    entry = record["commits"].get(commit, {})
    runs = list(entry.get("runs", [])) if entry.get("tests") == tests else []
    tree = WORK / f"tree-{commit[:10]}"
    if not tree.is_dir():
        tree.mkdir(parents=True)
        _snapshot(commit, tree)
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.time()
    while len(runs) < args.runs:
        index = len(runs)
        t0 = time.time()
        load_before = load_average()
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=tree, env=env, capture_output=True, text=True, preexec_fn=_allow_core_dumps)
        this_run = {"run": index, "returncode": done.returncode, "seconds": round(time.time() - t0, 1),
                  "load_average_before": load_before,
                  "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        if done.returncode != 0:
            log = WORK / f"failure-{commit[:10]}-{index:04d}.log"
            log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr, encoding="utf-8")
            this_run["log"] = str(log.relative_to(ROOT))
            for core in tree.glob("core*"):  # a crashed process's core (kernel core_pattern "core")
                kept = WORK / f"failure-{commit[:10]}-{index:04d}.{core.name}"
                shutil.move(str(core), kept)
                this_run.setdefault("cores", []).append(str(kept.relative_to(ROOT)))
            this_run["tail"] = (done.stdout + done.stderr)[-2000:]
        runs.append(this_run)
        record["commits"][commit] = _summary(tests, runs)
        failures = record["commits"][commit]["failed_runs"]
        write_json(RESULT, {
            "benchmark": "soak: the same tests run again and again, failures counted per commit",
            "device": device_name(), "date": datetime.date.today().isoformat(), "latest_commit": commit,
            "wall_time_s_this_call": round(time.time() - started, 1),
            "how_to_rerun": "python benchmarks/soak.py --runs %d %s" % (args.runs, " ".join(tests)),
            "commits": record["commits"],
        })
        print(f"[soak] run {index + 1}/{args.runs}: rc {done.returncode} in {this_run['seconds']} s, "
              f"load {load_before}; failures so far {len(failures)}", flush=True)
        if failures and args.stop_on_failure:
            break
    return 1 if any(r["returncode"] != 0 for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
