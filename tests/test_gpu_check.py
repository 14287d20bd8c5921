"""benchmarks/gpu_check.py (issue 19's GPU check) on the CPU: bad input, failing and hanging parts, one real part.

Never needs a GPU: everything runs with ``--device cpu``; the self-test parts (``_fail``, ``_sleep``) import
no torch, so only the last test pays for torch (about 10 s on a busy 2-core machine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [("--out", str(blocker / "sub")), (), ("--out", str(tmp_path), "--only", "nope"),
             ("--out", str(tmp_path), "--cap", "env=soon"), ("--out", str(tmp_path), "--budget", "0")]
    for args in cases:
        done = _run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "error" in done.stderr, (args, done.stderr)
    assert not list(tmp_path.glob("*.json"))


def test_failing_and_hanging_parts_are_recorded(tmp_path):
    start = time.time()
    done = _run("--out", str(tmp_path), "--device", "cpu", "--only", "_fail,_sleep", "--cap", "_sleep=2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert time.time() - start < 60
    summary = json.loads((tmp_path / "gpu-check-cpu.json").read_text())
    parts = summary["parts"]
    assert parts["_fail"]["status"] == "failed" and "on purpose" in parts["_fail"]["error"]
    assert parts["_sleep"]["status"] == "timeout"
    assert parts["env"]["status"] == "not selected"
    assert summary["files"] == ["gpu-check-cpu.json"]


def test_quick_correctness_part_on_the_cpu(tmp_path):
    """One real part, without compiling anything: it records that no compiled ops ran and checks the
    reference generator against the test vectors when they are there."""
    done = _run("--out", str(tmp_path), "--device", "cpu", "--quick", "--no-build", "--only", "correctness")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "correctness-cpu-quick.json").read_text())
    assert record["quick"] is True and record["compiled_impl"] is None and record["ops_cases"] == []
    assert record["tf32"] == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False}
    assert record["parts"]["correctness"]["status"] == "ok"
    checks = record["generator_vectors"].get("checks", {})
    if checks:  # ../shared/testvectors present
        assert checks["nvlabs synthesis fp32 ref vs expected"]["pass"] is True
    summary = json.loads((tmp_path / "gpu-check-cpu-quick.json").read_text())
    assert summary["checks_failed"] == [] and "correctness-cpu-quick.json" in summary["files"]
