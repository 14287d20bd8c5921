"""Issue 19's GPU check in one time-boxed run: CUDA correctness, speed ratios, labeling at paper scale, generation.

Run it through ``benchmarks/gpu_check.sh`` (which picks the Python, links the carried test vectors and
keeps a log), or directly::

    python benchmarks/gpu_check.py --out DIR                          # on a GPU: the whole check
    python benchmarks/gpu_check.py --out /tmp/gc --device cpu --quick   # a smoke run of every part on a CPU
    python benchmarks/gpu_check.py --out DIR --only labeler,generate    # rerun some parts

Parts, in order (each in its own process and process group, killed at its time box; a part that fails,
crashes or runs out of time is recorded as such and the next one runs):

``env``          versions, GPU, nvcc, packages, source digest
``build``        compile the device's stylegan_ops extension (on CUDA the CPU one too, in parallel, for
                 pytest's CPU cases); a failed build makes the later parts use the reference path only
``correctness``  TF32 off: every bias_act activation and the upfirdn2d configurations StyleGAN2 uses,
                 compiled against the reference: forward, first and second derivatives, float32 and float16;
                 the whole generator on the test vectors (../shared/testvectors/stylegan or
                 .gpu/testvectors/stylegan), compiled ops against reference ops and against the expected images
``pytest``       ``pytest tests/test_ops_*.py tests/test_generator.py -q -rs`` with TF32 off (junit parsed)
``ops``          benchmarks/ops.py's cases, compiled against reference, side by side
``generator``    a whole config-f generator forward (channel_base 32768, channel_max 512, float16 on the top 4
                 resolutions) at 256 and 1024, batch 16, compiled against reference ops (benchmarks/generator.py)
``train``        GAN training steps at 256 (config-f G and D, batch 16, path-length and lazy R1 regularisation
                 as configured), compiled ops against the reference path, interleaved step by step
``labeler``      random-init config-f generator at 256 (labels 256) and 1024 (labels 512), the official
                 ensemble (10 members, hidden 256, 32) with the heads domain's seg, keypoint and depth outputs:
                 factorised against naive labeling (time, peak GPU memory, agreement), ``label_ws`` against
                 the generator alone
``generate``     ``handsoff generate`` at 256 with that generator and labeler: end-to-end samples/s and the
                 share of its time spent writing shards (benchmarks/generate.py's in-memory figures beside it)

Results, in ``--out`` (at most 7 files, as the device machine returns at most 8): ``correctness-S.json``,
``ops-S.json``, ``generator-S.json``, ``labeler-S.json``, ``generate-S.json`` and the summary
``gpu-check-S.json`` (S = ``cuda``, or ``cpu-quick`` etc.); gpu_check.sh adds ``gpu-check.log``. ops- and
generator- files keep the schema of benchmarks/ops.py and generator.py. Exit status: 0 when every part ran
and passed, 1 when a part failed or ran out of time (the results are written either way), 2 on bad input.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VECTOR_DIRS = (ROOT.parent / "shared" / "testvectors" / "stylegan", ROOT / ".gpu" / "testvectors" / "stylegan")
NVLABS_FILES = ("nvlabs_sg2ada_64_G_ema.safetensors", "nvlabs_sg2ada_64_expected.npz")
ROSINALITY_FILES = ("rosinality_64.pt", "rosinality_64_expected.npz")

RESERVE_S = 8.0  # kept back from the budget for writing the results
MIN_PART_S = 8.0  # a part is not started with less time than this
DEFAULT_BUDGET_S = {"cuda": 450.0, "cpu": 600.0}

# Tolerances of the op comparisons: |compiled - reference| <= tol + tol * |reference|, elementwise
# (torch.testing's rule with rtol = atol = tol); float32 as tests/test_ops_*.py, float16 as their
# low-precision tests.
OP_TOL = {"float32": 1e-4, "float16": 1e-2}
GEN_ATOL = 1e-3  # the whole generator against the test vectors (tests/test_generator.py's ATOL)
GEN_FP16_REL = 0.01  # float16 generator outputs within 1% of the image's range (tests/test_generator.py)
GRAD_REL = 1e-3  # generator gradients, compiled against reference, relative to the largest gradient


@dataclass(frozen=True)
class Part:
    """One part of the check: its name, time box (seconds), output file kind and description."""

    name: str
    cap_s: float
    output: Optional[str]
    what: str


PARTS: Tuple[Part, ...] = (
    Part("env", 60, None, "versions, GPU, compiler, packages"),
    Part("build", 300, None, "compile the stylegan_ops extension(s)"),
    Part("correctness", 90, "correctness", "ops and whole generator, compiled vs reference, TF32 off"),
    Part("pytest", 150, "correctness", "pytest tests/test_ops_*.py tests/test_generator.py, TF32 off"),
    Part("ops", 75, "ops", "op speed, compiled vs reference"),
    Part("generator", 60, "generator", "config-f generator forward speed at 256 and 1024"),
    Part("train", 90, "generator", "GAN training step at 256, compiled vs reference"),
    Part("labeler", 110, "labeler", "labeling at paper scale: factorised vs naive, labeled vs generator-only"),
    Part("generate", 110, "generate", "handsoff generate end to end at 256"),
)
# Self-test parts (not run unless named in --only): a part that raises and one that hangs.
HIDDEN: Dict[str, Part] = {"_fail": Part("_fail", 30, None, "self-test: raises"),
                           "_sleep": Part("_sleep", 3600, None, "self-test: hangs")}
OUTPUT_KINDS = ("correctness", "ops", "generator", "labeler", "generate")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"gpu_check: error: {message}\n")
        raise SystemExit(2)


def _fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    sys.stderr.write(f"gpu_check: error: {message}\n")
    raise SystemExit(2)


# =====================================================================================================
# small helpers (standard library only: the driver never imports torch)

def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value: Any) -> Any:
    """json.dumps default: numpy scalars and arrays, paths, tuples."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value: Any) -> Any:
    """NaN and infinities as strings, so that the files are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (temporary file + rename)."""
    text = json.dumps(_clean(json.loads(json.dumps(data, default=_jsonable))), indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Any]:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def _writable_dir_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot take the results (created if missing), or None when it can."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the output folder {path} ({err.strerror or err})"
    if not path.is_dir():
        return f"the output path {path} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gpu-check-probe-"):
            pass
    except OSError as err:
        return f"cannot write to the output folder {path} ({err.strerror or err})"
    return None


def source_digest() -> str:
    """sha256 (16 hex digits) of handsoff/, stylegan_ops/ and benchmarks/ sources: which code ran."""
    h = hashlib.sha256()
    for folder in ("handsoff", "stylegan_ops", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".cu", ".cpp", ".h", ".cuh", ".sh") and path.is_file():
                h.update(str(path.relative_to(ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


# =====================================================================================================
# the driver

@dataclass
class Settings:
    """The driver's resolved options."""

    out: Path
    device: str
    quick: bool
    budget_s: float
    parts: List[Part]
    caps: Dict[str, float]
    no_build: bool
    keep_work: bool
    python: str

    @property
    def suffix(self) -> str:
        """Output file suffix: 'cuda', or 'cpu-quick' and the like."""
        return self.device + ("-quick" if self.quick else "")


def _parse_caps(items: Sequence[str], known: Sequence[str]) -> Dict[str, float]:
    caps: Dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in known:
            _fail(f"--cap {item!r}: unknown part {name!r} (parts: {', '.join(known)})")
        try:
            caps[name] = float(value)
        except ValueError:
            _fail(f"--cap {item!r}: {value!r} is not a number of seconds")
        if not caps[name] > 0:
            _fail(f"--cap {item!r}: the time box must be positive")
    return caps


def _select_parts(only: Optional[str], skip: Optional[str]) -> List[Part]:
    by_name = {p.name: p for p in PARTS}
    known = list(by_name) + list(HIDDEN)

    def names(text: str, option: str) -> List[str]:
        out = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in out if n not in known]
        if bad:
            _fail(f"{option}: unknown part(s) {', '.join(bad)} (parts: {', '.join(p.name for p in PARTS)})")
        if not out:
            _fail(f"{option}: no part named")
        return out

    chosen = names(only, "--only") if only else [p.name for p in PARTS]
    if skip:
        dropped = set(names(skip, "--skip"))
        chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        _fail("no part left to run")
    order = [p.name for p in PARTS] + list(HIDDEN)
    return [by_name.get(n) or HIDDEN[n] for n in sorted(set(chosen), key=order.index)]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = _Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="parts: " + ", ".join(p.name for p in PARTS))
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON results (default: $OUT)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default: cuda)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few repeats: a smoke test of every part (for a CPU), not a measurement")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts together (default: 450 on cuda, 600 on cpu); parts are cut to "
                        "fit and skipped when it is spent")
    p.add_argument("--only", default=None, help="comma-separated parts to run (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated parts to leave out")
    p.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                   help="override a part's time box (repeatable)")
    p.add_argument("--no-build", action="store_true",
                   help="never compile: every part uses the extensions already cached, else the reference path")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder (generated models, corpus)")
    # internal: one part in a child process
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ext", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        p.error(f"--budget must be positive, got {args.budget}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    out = args.out if args.out is not None else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is None:
        _fail("no output folder: pass --out DIR or set OUT")
    problem = _writable_dir_problem(out)
    if problem:
        _fail(problem)
    parts = _select_parts(args.only, args.skip)
    caps = {p.name: p.cap_s for p in PARTS}
    caps.update({n: h.cap_s for n, h in HIDDEN.items()})
    caps.update(_parse_caps(args.cap, list(caps)))
    budget = args.budget if args.budget is not None else DEFAULT_BUDGET_S[args.device]
    return Settings(out=out.resolve(), device=args.device, quick=args.quick, budget_s=budget, parts=parts,
                    caps=caps, no_build=args.no_build, keep_work=args.keep_work, python=sys.executable)


def _kill_group(proc: "subprocess.Popen[str]") -> None:
    """End the process group we started for a part: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, cmd: List[str], timeout: float, env: Dict[str, str]) -> Dict[str, Any]:
    """Run one part's process in its own process group, echoing its output prefixed by ``[name]``.

    Returns ``{status: ok|failed|timeout, seconds, returncode, tail}``; never raises for the child's sake.
    """
    start = time.time()
    tail: "collections.deque[str]" = collections.deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True, errors="replace")
    except OSError as err:
        return {"status": "failed", "seconds": 0.0, "returncode": None, "error": f"could not start: {err}",
                "tail": []}

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[{name}] {line}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    else:
        # Children of the part (pytest workers, a build) end with it normally; make sure nothing lingers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(timeout=5.0)
    seconds = round(time.time() - start, 1)
    if timed_out:
        status = "timeout"
    else:
        status = "ok" if proc.returncode == 0 else "failed"
    result: Dict[str, Any] = {"status": status, "seconds": seconds, "returncode": proc.returncode,
                              "timeout_s": round(timeout, 1)}
    if status != "ok":
        result["tail"] = list(tail)[-25:]
        errors = [line for line in tail if "Error" in line or "error:" in line]
        result["error"] = (errors[-1] if errors else (tail[-1] if tail else "no output"))[:500] \
            if status == "failed" else f"ran past its time box of {timeout:.0f} s and was stopped"
    return result


def _child_env(s: Settings) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if s.device == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU run never touches a GPU
    return env


def drive(s: Settings) -> int:
    """Run every selected part within the budget, then write the result files and the summary."""
    started = time.time()
    deadline = started + s.budget_s
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    print(f"gpu check: device {s.device}{' (quick)' if s.quick else ''}, budget {s.budget_s:.0f} s, parts "
          f"{', '.join(p.name for p in s.parts)}; results in {s.out}; scratch in {work}", flush=True)
    statuses: Dict[str, Dict[str, Any]] = {}
    no_build = s.no_build
    blocked: Optional[str] = None  # why the torch parts cannot run at all (no GPU)
    for part in s.parts:
        remaining = deadline - time.time() - RESERVE_S
        timeout = min(s.caps[part.name], remaining)
        if blocked and part.name not in ("env",) and not part.name.startswith("_"):
            statuses[part.name] = {"status": "skipped", "reason": blocked}
            print(f"== {part.name}: skipped ({blocked})", flush=True)
            continue
        if part.name == "pytest" and s.device == "cuda" and no_build and not s.no_build:
            reason = "the CUDA extension did not build (see build); its tests would only retry the build"
            statuses[part.name] = {"status": "skipped", "reason": reason}
            print(f"== {part.name}: skipped ({reason})", flush=True)
            continue
        if remaining < MIN_PART_S:
            reason = f"out of time: {max(0.0, remaining):.0f} s left of the {s.budget_s:.0f} s budget"
            statuses[part.name] = {"status": "skipped", "reason": reason}
            print(f"== {part.name}: skipped ({reason})", flush=True)
            continue
        cmd = [s.python, str(Path(__file__).resolve()), "--part", part.name, "--work", str(work), "--device",
               s.device, "--deadline", f"{time.time() + timeout:.1f}"]
        cmd += ["--quick"] if s.quick else []
        cmd += ["--no-build"] if no_build else []
        print(f"== {part.name}: {part.what} (time box {timeout:.0f} s)", flush=True)
        status = run_child(part.name, cmd, timeout, _child_env(s))
        statuses[part.name] = status
        print(f"== {part.name}: {status['status']} in {status['seconds']:.0f} s", flush=True)
        if part.name == "env":
            env = read_json(work / "env.json") or {}
            if s.device == "cuda" and env.get("torch") and not env.get("cuda_available"):
                blocked = "no CUDA device visible to torch (see env)"
        if part.name == "build":
            built = (read_json(work / "build.json") or {}).get(s.device, {})
            if not built.get("ok"):
                no_build = True  # later parts: reference path only, no second attempt at a failing build
    wall = time.time() - started
    outputs = assemble(s, work, statuses, wall)
    if s.keep_work:
        print(f"scratch kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, st in statuses.items() if st["status"] in ("failed", "timeout")]
    print(f"gpu check finished in {time.time() - started:.0f} s; wrote {', '.join(outputs)} to {s.out}"
          + (f"; parts failed or stopped: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed or _any_check_failed(s.out / f"gpu-check-{s.suffix}.json") else 0


def _any_check_failed(summary_path: Path) -> bool:
    summary = read_json(summary_path) or {}
    return bool(summary.get("checks_failed"))


# =====================================================================================================
# assembling the result files

def assemble(s: Settings, work: Path, statuses: Dict[str, Dict[str, Any]], wall: float) -> List[str]:
    """Write the per-kind result files from the parts' fragments, then the summary; returns the names."""
    frag = {name: read_json(work / f"{name}.json") for name in
            ("env", "build", "correctness", "pytest", "ops", "generator", "train", "labeler", "generate")}
    env = frag["env"] or {}
    common = {"device": env.get("device_name") or s.device, "device_type": s.device, "quick": s.quick,
              "date": _now_iso(), "torch": env.get("torch"), "cuda": env.get("torch_cuda"),
              "source_digest": env.get("source_digest"), "git_commit": (env.get("git") or {}).get("commit"),
              "how_to_rerun": "bash benchmarks/gpu_check.sh OUT_DIR" + (" --device cpu" if s.device == "cpu" else "")
                              + (" --quick" if s.quick else "")}
    if s.quick:
        common["quick_note"] = "--quick: tiny sizes and few repeats; a smoke test of the script, not a measurement"
    written: List[str] = []

    def emit(kind: str, body: Optional[Dict[str, Any]], parts: Sequence[str]) -> None:
        if body is None:
            return
        record = {**common, **body, "parts": {p: _brief_status(statuses.get(p)) for p in parts}}
        name = f"{kind}-{s.suffix}.json"
        write_json(s.out / name, record)
        written.append(name)

    if frag["correctness"] or frag["pytest"]:
        emit("correctness", {"benchmark": "CUDA correctness: compiled ops and generator against the reference, "
                                          "TF32 off", **(frag["correctness"] or {}), "pytest": frag["pytest"]},
             ("correctness", "pytest"))
    emit("ops", frag["ops"], ("ops",))
    if frag["generator"] or frag["train"]:
        body = dict(frag["generator"] or {"benchmark": "generator_forward", "results": []})
        body["training_step"] = frag["train"]
        emit("generator", body, ("generator", "train"))
    emit("labeler", frag["labeler"], ("labeler",))
    emit("generate", frag["generate"], ("generate",))

    headline, checks_failed = _headline(frag)
    summary = {**common, "benchmark": "gpu check (issue 19): summary", "budget_s": s.budget_s,
               "wall_s": round(wall, 1), "load_average_end": _load_average(),
               "parts": {name: statuses.get(name, {"status": "not selected"}) for name in
                         [p.name for p in PARTS] + [n for n in HIDDEN if n in statuses]},
               "env": env, "build": frag["build"], "headline": headline, "checks_failed": checks_failed,
               "files": written + [f"gpu-check-{s.suffix}.json"]}
    write_json(s.out / f"gpu-check-{s.suffix}.json", summary)
    written.append(f"gpu-check-{s.suffix}.json")
    print("headline: " + json.dumps(_clean(headline), default=_jsonable), flush=True)
    return written


def _brief_status(status: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if status is None:
        return {"status": "not selected"}
    return {k: v for k, v in status.items() if k != "tail"}


def _headline(frag: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """The key figures of every part, and the names of the checks that failed."""
    head: Dict[str, Any] = {}
    failed: List[str] = []
    corr = frag.get("correctness")
    if corr:
        cases = corr.get("ops_cases", [])
        bad = [c["name"] for c in cases if not c.get("pass")]
        head["ops_correctness"] = {"cases": len(cases), "passed": len(cases) - len(bad), "failed": bad[:20],
                                   "compiled_impl": corr.get("compiled_impl")}
        failed += [f"ops: {n}" for n in bad]
        vec = corr.get("generator_vectors") or {}
        head["generator_vectors"] = {k: {m: v.get(m) for m in ("pass", "max_abs_err") if m in v}
                                     for k, v in vec.get("checks", {}).items()}
        failed += [f"generator: {k}" for k, v in vec.get("checks", {}).items() if v.get("pass") is False]
    py = frag.get("pytest")
    if py:
        head["pytest"] = {**py.get("counts", {}), "cuda_cases": py.get("cuda_cases"),
                          "failed": [f["test"] for f in py.get("failures", [])][:20]}
        failed += [f"pytest: {f['test']}" for f in py.get("failures", [])]
    ops = frag.get("ops")
    if ops:
        ratios: Dict[str, List[float]] = collections.defaultdict(list)
        for c in ops.get("cases", []):
            if c.get("ratio"):
                ratios[f"{c['dtype']} {c['passes']}"].append(c["ratio"])
        head["ops_speed_ratio_geomean"] = {k: round(math.exp(statistics.fmean(math.log(r) for r in v)), 2)
                                           for k, v in ratios.items()}
    gen = frag.get("generator")
    if gen:
        head["generator_forward_ratio"] = {str(r["resolution"]): r.get("ratio") for r in gen.get("results", [])}
    train = frag.get("train")
    if train:
        head["training_step_ratio"] = train.get("ratio")
    lab = frag.get("labeler")
    if lab:
        head["labeler"] = {key: {"speedup": row.get("speedup"), "leaner": row.get("leaner"),
                                 "labeling_overhead": (row.get("throughput") or {}).get("labeling_overhead"),
                                 "goals_met": row.get("goals_met")} for key, row in lab.get("scales", {}).items()}
    gen2 = frag.get("generate")
    if gen2:
        cli = gen2.get("handsoff_generate") or {}
        head["generate"] = {"samples_per_s": cli.get("samples_per_s"),
                            "writer_busy_share": cli.get("writer_busy_share"),
                            "writing_on_critical_path_share": cli.get("writing_on_critical_path_share"),
                            "labeled_over_generator": gen2.get("labeled_over_generator")}
    return head, failed


# =====================================================================================================
# parts (each runs in its own process; torch is imported here, not in the driver)

def _save(work: Path, name: str, data: Any) -> None:
    write_json(work / f"{name}.json", data)


def _time_left(deadline: Optional[float]) -> float:
    return float("inf") if deadline is None else deadline - time.time()


def _setup_torch(args: argparse.Namespace) -> Any:
    """Import torch, apply --no-build, and return the device."""
    import torch

    if args.no_build:
        _disable_builds()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible to torch")
    return device


def _disable_builds() -> None:
    """--no-build (or a failed build earlier in the check): never compile; the ops use the reference path."""
    from stylegan_ops import _build

    def refuse(op: str, impl: str) -> Any:
        raise _build.BuildError("not built: the gpu check runs with --no-build or after a failed build")

    _build.try_load = lambda key: None  # type: ignore[assignment]
    _build.build = refuse  # type: ignore[assignment]


def compiled_impl(device: Any) -> Optional[str]:
    """The compiled impl for ``device`` ('cuda' or 'cpu') when its extension loads here, else None."""
    import stylegan_ops

    return device.type if device.type in stylegan_ops.available_impls(device) else None


def set_tf32(enabled: bool) -> Dict[str, bool]:
    """Set TF32 for matmuls and cuDNN (the legacy flags, as the tests use); returns the flags now set."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return tf32_flags()


def tf32_flags() -> Dict[str, bool]:
    import torch

    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def reference_ops() -> Iterator[None]:
    """Within the block, impl='auto' resolves to the reference path (explicit impls are unaffected)."""
    from stylegan_ops import _build

    saved = _build.try_load
    _build.try_load = lambda key: None  # type: ignore[assignment]
    try:
        yield
    finally:
        _build.try_load = saved  # type: ignore[assignment]


# ----------------------------------------------------------------------------------------------- env
def part_env(args: argparse.Namespace) -> None:
    info: Dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable,
                            "cpu_count": os.cpu_count(), "load_average": _load_average(),
                            "source_digest": source_digest(), "date": _now_iso()}
    info["git"] = _git_info()
    info["env_vars"] = {k: os.environ.get(k) for k in ("CUDA_HOME", "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST",
                                                       "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MAX_JOBS")}
    nvcc = shutil.which("nvcc")
    info["nvcc"] = {"path": nvcc, "version": _first_line_of([nvcc, "--version"], last=True) if nvcc else None}
    info["gcc"] = _first_line_of(["c++", "--version"]) if shutil.which("c++") else None
    info["nvidia_smi"] = (_first_line_of(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                          "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None)
    packages = {}
    for module in ("numpy", "safetensors", "h5py", "cv2", "sklearn", "tqdm", "PIL", "ninja", "pytest", "xdist",
                   "lpips"):
        try:
            mod = __import__(module)
            packages[module] = str(getattr(mod, "__version__", "?"))
        except Exception as err:  # noqa: BLE001 - any import failure means "missing" here
            packages[module] = None if isinstance(err, ImportError) else f"broken: {type(err).__name__}: {err}"
    info["packages"] = packages
    info["missing"] = [m for m, v in packages.items() if v is None and m not in ("xdist", "lpips")]
    _save(args.work, "env", info)  # what we have so far, should torch fail to import
    import torch

    info.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                 "cuda_available": torch.cuda.is_available(), "tf32_defaults": tf32_flags(),
                 "torch_threads": torch.get_num_threads()})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                     "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
                     "multiprocessors": props.multi_processor_count, "device_count": torch.cuda.device_count()})
    else:
        from _machine import device_name

        info["device_name"] = f"cpu: {device_name()}, {os.cpu_count()} cores"
    from torch.utils import cpp_extension

    info["cpp_extension"] = {"CUDA_HOME": cpp_extension.CUDA_HOME, "ninja": cpp_extension.is_ninja_available()}
    try:
        import handsoff.cli  # noqa: F401 - the import is the check
        import stylegan_ops  # noqa: F401

        info["handsoff_import"] = "ok"
    except Exception as err:  # noqa: BLE001 - recorded, and the part fails below
        info["handsoff_import"] = f"{type(err).__name__}: {err}"
    _save(args.work, "env", info)
    print(json.dumps({k: info.get(k) for k in ("python", "torch", "torch_cuda", "device_name", "nvcc", "missing",
                                               "handsoff_import")}, default=_jsonable))
    if info["handsoff_import"] != "ok":
        raise SystemExit(f"handsoff does not import: {info['handsoff_import']}")


def _git_info() -> Dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if commit.returncode != 0:
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "modified_files": len(dirty.stdout.splitlines())}


def _first_line_of(cmd: List[str], last: bool = False) -> Optional[str]:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as err:
        return f"failed: {err}"
    lines = [line.strip() for line in (done.stdout or done.stderr).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else None


# ----------------------------------------------------------------------------------------------- build
def part_build(args: argparse.Namespace) -> None:
    """Compile the device's extension here; on CUDA the CPU one at the same time in a child process."""
    result: Dict[str, Any] = {}
    child = None
    if args.device == "cuda" and not args.no_build:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "build-ext", "--ext", "cpu", "--work",
               str(args.work), "--device", "cpu"]
        child = subprocess.Popen(cmd, cwd=ROOT)  # same process group: stopped with this part
    if args.no_build:
        result[args.device] = {"ok": False, "skipped": "--no-build"}
        _save(args.work, "build", result)
        print("build skipped (--no-build): the parts use cached extensions only if already loaded, else the reference")
        return
    result[args.device] = _build_one(args.device)
    _save(args.work, "build", result)
    if child is not None:
        try:
            child.wait(timeout=max(1.0, _time_left(args.deadline) - 2))
        except subprocess.TimeoutExpired:
            child.kill()
        cpu = read_json(args.work / "build-cpu.json")
        result["cpu"] = cpu if cpu is not None else {"ok": False, "error": f"child exited {child.returncode}"}
        _save(args.work, "build", result)
    if not result[args.device].get("ok"):
        raise SystemExit(f"the {args.device} extension did not build: {result[args.device].get('error')}")


def part_build_ext(args: argparse.Namespace) -> None:
    _save(args.work, f"build-{args.ext}", _build_one(args.ext))


def _build_one(key: str) -> Dict[str, Any]:
    """Compile (or load from the cache) one stylegan_ops extension; the result, never an exception."""
    from stylegan_ops import _build

    start = time.time()
    print(f"building the {key} extension (cached builds load in seconds) ...", flush=True)
    try:
        module = _build.compile_extension(_build.EXTENSIONS[key])
    except _build.BuildError as err:
        log = None
        if err.log_path is not None and Path(err.log_path).exists():
            log = Path(err.log_path).read_text(errors="replace")[-3000:]
        print(f"{key} extension failed after {time.time() - start:.0f} s: {err.cause}", flush=True)
        return {"ok": False, "seconds": round(time.time() - start, 1), "error": err.cause, "log_tail": log}
    except Exception as err:  # noqa: BLE001 - recorded as the build's failure
        return {"ok": False, "seconds": round(time.time() - start, 1), "error": f"{type(err).__name__}: {err}"}
    seconds = round(time.time() - start, 1)
    print(f"{key} extension ready in {seconds} s: {module.__file__}", flush=True)
    return {"ok": True, "seconds": seconds, "module": Path(module.__file__).name,
            "cache": str(_build.build_root())}


# ----------------------------------------------------------------------------------------------- correctness
def _compare(got: Any, want: Any, tol: float) -> Dict[str, Any]:
    """Elementwise |got - want| <= tol + tol * |want|, NaN/inf in the same places; the worst figures."""
    import torch

    got, want = got.detach().double(), want.detach().double()
    same_nonfinite = bool(torch.equal(torch.isfinite(got), torch.isfinite(want)))
    mask = torch.isfinite(want) & torch.isfinite(got)
    diff = (got - want).abs()[mask]
    bound = (tol + tol * want.abs())[mask]
    max_err = float(diff.max()) if diff.numel() else 0.0
    mismatched = int((diff > bound).sum())
    scale = float(want.abs()[mask].max()) if diff.numel() else 0.0
    return {"max_abs_err": max_err, "ref_max_abs": scale, "mismatched": mismatched, "elements": int(want.numel()),
            "pass": same_nonfinite and mismatched == 0}


def _bias_act_derivatives(x: Any, b: Any, impl: str, act: str, clamp: Optional[float]) -> Dict[str, Any]:
    """y; its gradients for an upstream gradient w; the gradients of sum(gx^2) + sum(gb^2) for x, b, w."""
    import torch
    from stylegan_ops import bias_act

    y = bias_act(x, b, act=act, clamp=clamp, impl=impl)
    w = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).requires_grad_()
    gx, gb = torch.autograd.grad((y.float() * w).sum(), [x, b], create_graph=True)
    penalty = gx.float().square().sum() + gb.float().square().sum()
    ggx, ggb, ggw = torch.autograd.grad(penalty, [x, b, w], allow_unused=True, materialize_grads=True)
    return {"forward": y, "grad_x": gx, "grad_b": gb, "grad2_x": ggx, "grad2_b": ggb, "grad2_w": ggw}


def _upfirdn_derivatives(x: Any, impl: str, call: Callable[[Any, str], Any]) -> Dict[str, Any]:
    """y; the gradient for x under an upstream gradient w; the gradient of sum(gx^2) for w (the op is linear)."""
    import torch

    y = call(x, impl)
    w = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).requires_grad_()
    (gx,) = torch.autograd.grad((y.float() * w).sum(), [x], create_graph=True)
    (ggw,) = torch.autograd.grad(gx.float().square().sum(), [w])
    return {"forward": y, "grad_x": gx, "grad2_w": ggw}


def _op_cases(device: Any, quick: bool) -> List[Tuple[str, str, Callable[..., Dict[str, Any]]]]:
    """(name, family, run(dtype, impl) -> outputs) for every compared op configuration."""
    import torch
    import stylegan_ops
    from stylegan_ops import _bias_act

    ba_shape = (2, 8, 4, 4) if quick else (8, 512, 16, 16)
    up_shape = (2, 4, 8, 8) if quick else (8, 256, 32, 32)
    cases: List[Tuple[str, str, Callable[..., Dict[str, Any]]]] = []

    def inputs(shape: Tuple[int, ...], dtype: Any, seed: int, bias: bool) -> Tuple[Any, Any]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g) * 2).to(device, dtype).requires_grad_()
        b = torch.randn(shape[1], generator=g).to(device, dtype).requires_grad_() if bias else None
        return x, b

    for i, act in enumerate(_bias_act.ACTIVATIONS):
        for clamp in (None, 0.8):
            def run(dtype: Any, impl: str, act: str = act, clamp: Optional[float] = clamp, seed: int = i) -> Dict:
                x, b = inputs(ba_shape, dtype, seed, True)
                return _bias_act_derivatives(x, b, impl, act, clamp)
            cases.append((f"bias_act {act} clamp={clamp}", "bias_act", run))

    f = stylegan_ops.setup_filter([1, 3, 3, 1], device=device)
    g = torch.Generator().manual_seed(7)
    f_odd = (torch.rand(5, 4, generator=g) + 0.1).to(device)  # non-separable, asymmetric
    ups: List[Tuple[str, Callable[[Any, str], Any]]] = [
        ("upsample2d", lambda x, impl: stylegan_ops.upsample2d(x, f, impl=impl)),
        ("downsample2d", lambda x, impl: stylegan_ops.downsample2d(x, f, impl=impl)),
        ("filter2d pad=1", lambda x, impl: stylegan_ops.filter2d(x, f, padding=1, impl=impl)),
        ("upfirdn2d up=2 pad=[2,1,2,1] gain=4", lambda x, impl: stylegan_ops.upfirdn2d(
            x, f, up=2, padding=[2, 1, 2, 1], gain=4, impl=impl)),
        ("upfirdn2d 5x4 down=4 pad=[2,1,0,3]", lambda x, impl: stylegan_ops.upfirdn2d(
            x, f_odd, down=4, padding=[2, 1, 0, 3], impl=impl)),
        ("upfirdn2d 5x4 up=4 down=2 pad=[-3,1,2,-1] flip", lambda x, impl: stylegan_ops.upfirdn2d(
            x, f_odd, up=4, down=2, padding=[-3, 1, 2, -1], flip_filter=True, gain=0.8, impl=impl)),
    ]
    for j, (name, call) in enumerate(ups):
        def run(dtype: Any, impl: str, call: Callable = call, seed: int = 100 + j) -> Dict[str, Any]:
            x, _ = inputs(up_shape, dtype, seed, False)
            return _upfirdn_derivatives(x, impl, call)
        cases.append((name, "upfirdn2d", run))
    return cases


def part_correctness(args: argparse.Namespace) -> None:
    import torch

    device = _setup_torch(args)
    flags = set_tf32(False)
    compiled = compiled_impl(device)
    dtypes = ["float32", "float16"] if device.type == "cuda" else ["float32"]
    result: Dict[str, Any] = {"tf32": flags, "compiled_impl": compiled, "dtypes": dtypes,
                              "tolerance": {"ops": "|compiled - ref| <= tol + tol * |ref| elementwise, same "
                                                   "non-finite places", "ops_tol": OP_TOL,
                                            "generator_atol_fp32": GEN_ATOL,
                                            "generator_fp16_rel_to_range": GEN_FP16_REL,
                                            "generator_grad_rel": GRAD_REL},
                              "ops_cases": [], "generator_vectors": {}}
    if compiled is None:
        result["ops_note"] = f"no compiled {device.type} extension: op comparisons not run"
    else:
        for name, family, run in _op_cases(device, args.quick):
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                case: Dict[str, Any] = {"name": f"{name} {dtype_name}", "op": family, "dtype": dtype_name}
                try:
                    want = run(dtype, "ref")
                    got = run(dtype, compiled)
                    case["outputs"] = {k: _compare(got[k], want[k], OP_TOL[dtype_name]) for k in want}
                    case["pass"] = all(v["pass"] for v in case["outputs"].values())
                except Exception as err:  # noqa: BLE001 - recorded per case
                    case["pass"] = False
                    case["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                worst = max((v["max_abs_err"] for v in case.get("outputs", {}).values()), default=None)
                print(f"{case['name']:58} {'pass' if case['pass'] else 'FAIL'}  max abs err "
                      f"{worst if worst is not None else case.get('error')}", flush=True)
                result["ops_cases"].append(case)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _save(args.work, "correctness", result)
    result["generator_vectors"] = generator_vectors(device, compiled)
    _save(args.work, "correctness", result)
    bad = [c["name"] for c in result["ops_cases"] if not c["pass"]]
    bad += [k for k, v in result["generator_vectors"].get("checks", {}).items() if v.get("pass") is False]
    print(f"correctness: {len(result['ops_cases']) - len([c for c in result['ops_cases'] if not c['pass']])}/"
          f"{len(result['ops_cases'])} op cases pass; generator checks: "
          f"{json.dumps({k: v.get('pass') for k, v in result['generator_vectors'].get('checks', {}).items()})}")
    if bad:
        print(f"failed: {', '.join(bad)}")


def _vector_dir(files: Sequence[str]) -> Optional[Path]:
    for folder in VECTOR_DIRS:
        if all((folder / f).exists() for f in files):
            return folder
    return None


def generator_vectors(device: Any, compiled: Optional[str]) -> Dict[str, Any]:
    """The whole generator on the reference test vectors: each impl against the expected images and
    against each other (float32, TF32 off), float16 on CUDA, and gradients to second order."""
    import numpy as np
    import torch
    from handsoff.gan.checkpoints import load_generator

    out: Dict[str, Any] = {"checks": {}}
    folder = _vector_dir(NVLABS_FILES)
    if folder is None:
        out["note"] = f"test vectors not found in {', '.join(str(d) for d in VECTOR_DIRS)}"
        return out
    out["vectors"] = str(folder)
    impls = ["ref"] + ([compiled] if compiled else [])
    G = load_generator(folder / NVLABS_FILES[0], device=device)
    e = np.load(folder / NVLABS_FILES[1])
    ws = torch.from_numpy(e["ws_psi07"]).to(device)
    z = torch.from_numpy(e["z"]).to(device)
    expected = torch.from_numpy(e["img_psi07_noiseconst"]).to(device)
    expected_ws = torch.from_numpy(e["ws_psi07"]).to(device)
    checks = out["checks"]
    images: Dict[str, Any] = {}

    def err(a: Any, b: Any) -> float:
        return float((a.double() - b.double()).abs().max())

    with torch.no_grad():
        for impl in impls:
            images[impl] = G.synthesis(ws, noise_mode="const", force_fp32=True, impl=impl)
            e_img = err(images[impl], expected)
            checks[f"nvlabs synthesis fp32 {impl} vs expected"] = {"max_abs_err": e_img, "pass": e_img <= GEN_ATOL}
            e_map = err(G.mapping(z, truncation_psi=0.7, impl=impl), expected_ws)
            checks[f"nvlabs mapping {impl} vs expected"] = {"max_abs_err": e_map, "pass": e_map <= GEN_ATOL}
        if compiled:
            d = err(images[compiled], images["ref"])
            checks[f"nvlabs synthesis fp32 {compiled} vs ref"] = {"max_abs_err": d, "pass": d <= GEN_ATOL}
            _, f_ref = G.synthesis(ws, noise_mode="const", force_fp32=True, impl="ref", return_features=True)
            _, f_cmp = G.synthesis(ws, noise_mode="const", force_fp32=True, impl=compiled, return_features=True)
            d = max(err(a, b) for a, b in zip(f_cmp, f_ref))
            scale = max(float(a.abs().max()) for a in f_ref)
            checks[f"nvlabs features fp32 {compiled} vs ref"] = {"max_abs_err": d, "ref_max_abs": scale,
                                                                 "pass": d <= GEN_ATOL * max(1.0, scale)}
        if device.type == "cuda":  # float16 on the top 4 resolutions, as NVlabs runs it
            scale = float(expected.abs().max())
            half = {impl: G.synthesis(ws, noise_mode="const", impl=impl) for impl in impls}
            for impl, img in half.items():
                d = err(img, expected)
                checks[f"nvlabs synthesis fp16 {impl} vs expected fp32"] = {
                    "max_abs_err": d, "image_range": scale, "pass": d <= GEN_FP16_REL * scale}
            if compiled:
                d = err(half[compiled], half["ref"])
                checks[f"nvlabs synthesis fp16 {compiled} vs ref fp16"] = {
                    "max_abs_err": d, "image_range": scale, "pass": d <= GEN_FP16_REL * scale}
    if compiled:
        checks.update(_generator_gradients(G, ws, compiled))
    ros = _vector_dir(ROSINALITY_FILES)
    if ros is not None:
        Gr = load_generator(ros / ROSINALITY_FILES[0], device=device)
        er = np.load(ros / ROSINALITY_FILES[1])
        zr = torch.from_numpy(er["z"]).to(device)
        want = torch.from_numpy(er["img"]).to(device)
        with torch.no_grad():
            for impl in impls:
                d = err(Gr(zr, truncation_psi=0.7, noise_mode="const", force_fp32=True, impl=impl), want)
                checks[f"rosinality fp32 {impl} vs expected"] = {"max_abs_err": d, "pass": d <= GEN_ATOL}
    for name, c in checks.items():
        print(f"{name:58} {'pass' if c['pass'] else 'FAIL'}  max abs err {c['max_abs_err']:.3g}", flush=True)
    return out


def _generator_gradients(G: Any, ws: Any, compiled: str) -> Dict[str, Dict[str, Any]]:
    """Gradients through the whole synthesis network (float32), compiled against reference ops:
    d(mean img^2)/d ws, and the path-length penalty's weight gradients (a second derivative)."""
    import torch

    G.requires_grad_(True)
    names = [n for n, _ in G.synthesis.named_parameters() if n.endswith("conv1.weight") or n.endswith("torgb.weight")]
    noise_gen = torch.Generator(device=ws.device).manual_seed(0)
    noise = None
    grads: Dict[str, Dict[str, Any]] = {}
    for impl in ("ref", compiled):
        G.zero_grad(set_to_none=True)
        w = ws.detach().clone().requires_grad_()
        img = G.synthesis(w, noise_mode="const", force_fp32=True, impl=impl)
        (g_ws,) = torch.autograd.grad(img.square().mean(), w)
        w2 = ws.detach().clone().requires_grad_()
        img2 = G.synthesis(w2, noise_mode="const", force_fp32=True, impl=impl)
        if noise is None:
            noise = torch.randn(img2.shape, generator=noise_gen, device=ws.device) / math.sqrt(img2.shape[2] ** 2)
        (g,) = torch.autograd.grad((img2 * noise).sum(), w2, create_graph=True)
        g.square().sum(2).mean(1).sqrt().mean().backward()  # the path-length penalty's shape
        params = dict(G.synthesis.named_parameters())
        grads[impl] = {"ws": g_ws, **{n: params[n].grad.detach().clone() for n in names if params[n].grad is not None}}
    G.zero_grad(set_to_none=True)
    G.requires_grad_(False)
    out: Dict[str, Dict[str, Any]] = {}
    for key, label in (("ws", "d mean(img^2) / d ws"), ("params", "path-length penalty, d / d weights")):
        keys = ["ws"] if key == "ws" else [k for k in grads["ref"] if k != "ws"]
        missing = [k for k in keys if k not in grads[compiled]]
        if missing:
            out[f"nvlabs gradient {label} {compiled} vs ref"] = {"max_abs_err": float("nan"), "pass": False,
                                                                "missing": missing}
            continue
        d = max(float((grads[compiled][k] - grads["ref"][k]).abs().max()) for k in keys)
        scale = max(float(grads["ref"][k].abs().max()) for k in keys)
        out[f"nvlabs gradient {label} {compiled} vs ref"] = {"max_abs_err": d, "ref_max_abs": scale,
                                                            "pass": d <= GRAD_REL * scale}
    return out


# ----------------------------------------------------------------------------------------------- pytest
def part_pytest(args: argparse.Namespace) -> None:
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_ops_*.py"))
    tests.append("tests/test_generator.py")
    xml = args.work / "pytest-junit.xml"
    cmd = [sys.executable, "-m", "pytest", *tests, "-q", "-rs", "-p", "no:cacheprovider", "-p", "_tf32_off",
           f"--junitxml={xml}"]
    if args.quick:  # the CUDA cases only (they skip without a GPU), not the CUDA compile check
        cmd += ["-k", "cuda and not sources_compile"]
    workers = 0
    if args.device == "cuda":
        try:
            import xdist  # noqa: F401 - only whether pytest-xdist is there

            workers = min(8, os.cpu_count() or 1)
        except ImportError:
            workers = 0
    if workers > 1:
        cmd += ["-n", str(workers)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                  else []))
    env["NVIDIA_TF32_OVERRIDE"] = "0"
    if args.no_build:
        env["GPU_CHECK_NO_BUILD"] = "1"  # recorded only; the tests skip compiled cases whose build fails
    print(" ".join(cmd), flush=True)
    start = time.time()
    timeout = max(5.0, _time_left(args.deadline) - 5.0)
    result: Dict[str, Any] = {"command": " ".join(["pytest"] + cmd[3:]), "tf32": "off (NVIDIA_TF32_OVERRIDE=0 and "
                              "the legacy torch flags via -p _tf32_off)", "workers": workers}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout)
        result["returncode"] = done.returncode
    except subprocess.TimeoutExpired:
        result["returncode"] = None
        result["timed_out_after_s"] = round(timeout, 1)
    result["seconds"] = round(time.time() - start, 1)
    result.update(parse_junit(xml))
    _save(args.work, "pytest", result)
    if result.get("returncode") not in (0, 5):  # 5: nothing collected (a --quick selection may be empty)
        raise SystemExit(f"pytest: {result.get('counts')} (returncode {result.get('returncode')})")


def parse_junit(path: Path) -> Dict[str, Any]:
    """Counts, failures (test and message) and skip reasons from a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {"junit": "missing (pytest did not finish)"}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"junit": f"unreadable: {err}"}
    counts = collections.Counter()
    cuda = collections.Counter()
    failures: List[Dict[str, str]] = []
    skips: "collections.Counter[str]" = collections.Counter()
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": test, "outcome": outcome, "message": (message[0] if message else "")[:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "").strip()[:200]] += 1
        counts[outcome] += 1
        if "cuda" in test.lower() or "gpu" in test.lower():
            cuda[outcome] += 1
    return {"counts": dict(counts), "cuda_cases": dict(cuda), "failures": failures,
            "skip_reasons": dict(skips.most_common(20))}


# ----------------------------------------------------------------------------------------------- ops speed
def part_ops(args: argparse.Namespace) -> None:
    import torch
    import ops as ops_bench  # benchmarks/ops.py
    from dataclasses import asdict
    from _machine import device_name

    device = _setup_torch(args)
    if args.quick:  # ops.py's plan, on tiny shapes
        ops_bench.BIAS_ACT_SHAPES = [(2, 8, 16, 16)]
        ops_bench.RESAMPLE_SHAPES = [(2, 8, 16, 16)]
        ops_bench.OTHER_ACTS = ("tanh",)
    repeats, warmup = (2, 1) if args.quick else (30, 5)
    dtypes = ["float32", "float16"] if device.type == "cuda" else ["float32"]
    record: Dict[str, Any] = {"benchmark": "stylegan_ops: compiled kernels against the reference path",
                              "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                              "cuda": torch.version.cuda, "date": _now_iso(), "repeats": repeats, "warmup": warmup,
                              "tf32": tf32_flags(), "impls": __import__("stylegan_ops").available_impls(device),
                              "ratio": "ref_ms / compiled_ms; > 1 means the compiled kernel is faster",
                              "load_average_1m": {"start": (_load_average() or [None])[0]}, "cases": []}
    for dtype in dtypes:
        cases = ops_bench.bench_ops(device, [getattr(torch, dtype)], warmup, repeats)
        record["cases"] += [asdict(c) for c in cases]
        record["load_average_1m"]["end"] = (_load_average() or [None])[0]
        _save(args.work, "ops", record)


# ----------------------------------------------------------------------------------------------- generator speed
def part_generator(args: argparse.Namespace) -> None:
    import torch
    from generator import time_forward  # benchmarks/generator.py
    from _machine import device_name
    from handsoff.gan.config import GeneratorConfig
    from handsoff.gan.networks import Generator

    device = _setup_torch(args)
    compiled = compiled_impl(device)
    if args.quick:
        sizes, base, cmax, batch, repeats, warmup = [32], 1024, 64, 2, 2, 1
    else:
        sizes, base, cmax, batch, repeats, warmup = [256, 1024], 32768, 512, 16, 10, 3
    record: Dict[str, Any] = {"benchmark": "generator_forward", "device": device_name(device),
                              "torch": torch.__version__, "date": _now_iso(), "channel_base": base,
                              "channel_max": cmax, "fp16_top_resolutions": 4 if device.type == "cuda" else 0,
                              "tf32": tf32_flags(), "repeats": repeats, "warmup": warmup,
                              "note": "median of --repeats synced G.synthesis calls (noise const, no grad), "
                                      "reference then compiled on the same random-init generator and ws",
                              "results": []}
    for res in sizes:
        if _time_left(args.deadline) < 10:
            record["stopped_early"] = f"out of time before {res}px"
            break
        torch.manual_seed(0)
        G = Generator(GeneratorConfig(img_resolution=res, channel_base=base, channel_max=cmax)).to(device).eval()
        with torch.no_grad():
            ws = G.mapping(torch.randn(batch, G.z_dim, device=device), truncation_psi=0.7)
        t_ref = time_forward(G, ws, "ref", repeats, warmup)
        row: Dict[str, Any] = {"resolution": res, "batch": batch, "impl": compiled or "none",
                               "ref_img_per_s": round(batch / t_ref, 2), "ref_ms": round(t_ref * 1e3, 2)}
        if compiled:
            t_fast = time_forward(G, ws, compiled, repeats, warmup)
            row.update({f"{compiled}_img_per_s": round(batch / t_fast, 2), f"{compiled}_ms": round(t_fast * 1e3, 2),
                        "ratio": round(t_ref / t_fast, 3)})
        else:
            row["ratio"] = None
        if device.type == "cuda":
            row["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        record["results"].append(row)
        print(json.dumps(row), flush=True)
        _save(args.work, "generator", record)
        del G, ws
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    _save(args.work, "generator", record)


# ----------------------------------------------------------------------------------------------- training step
def part_train(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from handsoff.gan.training.config import TrainConfig
    from handsoff.gan.training.loop import GANTrainer

    device = _setup_torch(args)
    compiled = compiled_impl(device)
    if args.quick:
        cfg = TrainConfig(resolution=16, batch=4, g_channel_base=512, g_channel_max=32, d_channel_base=512,
                          d_channel_max=32, z_dim=32, w_dim=32, mapping_layers=2, pl_weight=2.0, fd_samples=0,
                          num_workers=0)
        n_images, steps = 8, 2
    else:  # config-f at 256 (NVlabs 'stylegan2' config: path-length weight 2, lazy R1 every 16 steps)
        cfg = TrainConfig(resolution=256, batch=16, g_channel_base=32768, g_channel_max=512, d_channel_base=32768,
                          d_channel_max=512, pl_weight=2.0, fd_samples=0, num_workers=0)
        n_images, steps = 64, 16
    set_tf32(cfg.allow_tf32)  # as train_gan does
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, cfg.resolution, cfg.resolution, 3), dtype=np.uint8)
    impls = [("ref", reference_ops)] + ([(compiled, contextlib.nullcontext)] if compiled else [])
    trainers = {name: GANTrainer(cfg, images, device) for name, _ in impls}
    record: Dict[str, Any] = {"benchmark": "GAN training step, compiled ops against the reference path",
                              "resolution": cfg.resolution, "batch": cfg.batch,
                              "config": {k: getattr(cfg, k) for k in ("g_channel_base", "g_channel_max",
                                                                       "d_channel_base", "d_channel_max",
                                                                       "pl_weight", "pl_interval", "r1_interval",
                                                                       "mixed_precision", "num_fp16_res",
                                                                       "style_mixing_prob")},
                              "tf32": tf32_flags(), "impl": compiled or "none",
                              "note": "step 0 of each trainer is a warm-up (it has both regularisers); then "
                                      "steps 1..N alternate between the trainers, each synced and timed; "
                                      "PL runs on steps divisible by pl_interval, R1 on those divisible by "
                                      "r1_interval, so the mean over 16 steps is the training rate",
                              "warmup_s": {}, "step_s": {name: [] for name, _ in impls}}
    def timed_step(name: str, ctx: Callable[[], Any]) -> float:
        _sync(device)
        start = time.perf_counter()
        with ctx():
            trainers[name].train_step()
        _sync(device)
        return time.perf_counter() - start

    for name, ctx in impls:
        record["warmup_s"][name] = round(timed_step(name, ctx), 3)
    _save(args.work, "train", record)
    per_round = sum(record["warmup_s"].values())
    for i in range(steps):
        if _time_left(args.deadline) < per_round * 1.5 + 5:
            record["stopped_early"] = f"out of time after {i} timed steps"
            break
        round_start = time.perf_counter()
        for name, ctx in impls:
            record["step_s"][name].append(round(timed_step(name, ctx), 4))
        per_round = time.perf_counter() - round_start
        print(f"step {i + 1}: " + ", ".join(f"{n} {record['step_s'][n][-1]:.3f} s" for n, _ in impls), flush=True)
        _summarise_train(record, impls, cfg)
        _save(args.work, "train", record)
    record["stats_finite"] = {name: all(math.isfinite(v) for v in trainers[name].pop_stats().values())
                              for name, _ in impls}
    if device.type == "cuda":
        record["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
    _summarise_train(record, impls, cfg)
    _save(args.work, "train", record)
    print(json.dumps({k: record.get(k) for k in ("mean_step_s", "img_per_s", "ratio", "stats_finite")}))


def _summarise_train(record: Dict[str, Any], impls: Sequence[Tuple[str, Any]], cfg: Any) -> None:
    steps = record["step_s"]
    if not all(steps[name] for name, _ in impls):
        return
    record["timed_steps"] = len(steps[impls[0][0]])
    record["mean_step_s"] = {name: round(statistics.fmean(steps[name]), 4) for name, _ in impls}
    record["median_step_s"] = {name: round(statistics.median(steps[name]), 4) for name, _ in impls}
    record["img_per_s"] = {name: round(cfg.batch / record["mean_step_s"][name], 2) for name, _ in impls}
    record["ratio"] = (round(record["mean_step_s"]["ref"] / record["mean_step_s"][impls[1][0]], 3)
                       if len(impls) > 1 else None)


# ----------------------------------------------------------------------------------------------- labeler
def paper_generator(res: int, quick: bool, seed: int = 0) -> Any:
    """A random-init config-f generator (or a tiny one with ``quick``), eval mode, no gradients."""
    import torch
    from handsoff.gan.config import GeneratorConfig
    from handsoff.gan.networks import Generator

    torch.manual_seed(seed)
    if quick:
        config = GeneratorConfig(img_resolution=res, z_dim=64, w_dim=64, mapping_layers=2, channel_base=1024,
                                 channel_max=64)
    else:
        config = GeneratorConfig(img_resolution=res)  # config-f: channel_base 32768, channel_max 512, fp16 top 4
    return Generator(config).eval().requires_grad_(False)


def paper_labeler(G: Any, label_resolution: int) -> Any:
    """The official ensemble (10 members, hidden 256, 32) on every feature map, with the heads domain's
    outputs (11 classes, 10 keypoint heatmaps, depth), randomly initialised, eval mode."""
    from handsoff.domains import get_domain
    from handsoff.label.model import HypercolumnLabeler, LabelerConfig

    domain = get_domain("heads")
    shapes = tuple(G.feature_shapes())
    config = LabelerConfig(shapes, tuple(range(len(shapes))), label_resolution, hidden=(256, 32), ensemble=10,
                           classes=domain.classes, keypoint_names=domain.keypoint_names, depth=True)
    return HypercolumnLabeler(config, seed=0).eval().requires_grad_(False)


def _timed_call(call: Callable[[], Any], device: Any, repeats: int) -> Tuple[float, Optional[int], Any]:
    """(best seconds, peak extra bytes during a call, last result); one untimed warm-up call first.

    GPU: torch.cuda.max_memory_allocated over the calls minus what was allocated before them.
    CPU: the rise of the peak RSS during one call (benchmarks/labeler.py's peak_rise; approximate here, in a
    process that has run other work).
    """
    import torch

    result = call()
    _sync(device)
    peak: Optional[int] = None
    if device.type == "cuda":
        del result
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = call()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    if device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(device) - base)
    else:
        try:
            from labeler import peak_rise  # benchmarks/labeler.py

            peak = peak_rise(call)
        except OSError:
            peak = None
    return best, peak, result


def _agreement(a: Any, b: Any) -> Dict[str, Any]:
    """How far two LabelPredictions of the same images differ (factorised against naive)."""
    import numpy as np

    out: Dict[str, Any] = {"uncertainty_max_abs": float(np.abs(a.uncertainty - b.uncertainty).max())}
    if a.seg is not None:
        out["seg_equal_fraction"] = float((a.seg == b.seg).mean())
    if a.depth is not None:
        out["depth_max_abs"] = float(np.abs(a.depth - b.depth).max())
    if a.keypoints is not None:
        out["keypoints_max_abs"] = float(np.abs(a.keypoints - b.keypoints).max())
    return out


LABEL_GOALS = {"speedup": 20.0, "leaner": 50.0, "labeling_overhead": 0.5}


def part_labeler(args: argparse.Namespace) -> None:
    import torch
    from handsoff.label.infer import images_at, label_ws, synthesis_chunks
    from handsoff.label.model import BAND_ELEMENTS

    device = _setup_torch(args)
    compiled = compiled_impl(device)
    if args.quick:
        scales, repeats, bands = [(32, 32, 4), (64, 32, 2)], 1, [BAND_ELEMENTS, 1 << 22]
    else:
        scales, repeats, bands = [(256, 256, 16), (1024, 512, 4)], 3, [BAND_ELEMENTS, 1 << 24, 1 << 27]
    record: Dict[str, Any] = {
        "benchmark": "hypercolumn labeler at paper scale: factorised vs naive, labeling vs generating",
        "generator": "random-init config-f (channel_base 32768, channel_max 512, fp16 on the top 4 resolutions)"
                     if not args.quick else "tiny random-init generator (--quick)",
        "labeler": {"ensemble": 10, "hidden": [256, 32], "layers": "all", "outputs": "heads domain: 11 classes, "
                    "10 keypoint heatmaps, depth", "init": "random"},
        "ops_impl": compiled or "ref", "tf32": tf32_flags(), "repeats": repeats, "goals": LABEL_GOALS,
        "default_band_elements": BAND_ELEMENTS,
        "method": "inference per image (batch 1) from the same features; time: best of the repeats after a warm-up "
                  "call, synced; memory: " + ("peak torch.cuda.max_memory_allocated during the calls minus what was "
                  "allocated before them (features and models excluded)" if device.type == "cuda" else "rise of the "
                  "peak RSS during one call (benchmarks/labeler.py's peak_rise, in a process that ran other work: "
                  "approximate)") + "; speedup and leaner compare naive with "
                  "the factorised labeler at its default band (what label_ws and handsoff generate use); "
                  "throughput: label_ws (synthesis with features, uint8 images, labels) against G.synthesis "
                  "alone, same batch",
        "scales": {}}
    for res, label_res, batch in scales:
        key = f"{res}/{label_res}"
        if _time_left(args.deadline) < 15:
            record["stopped_early"] = f"out of time before {key}"
            break
        G = paper_generator(res, args.quick).to(device)
        labeler = paper_labeler(G, label_res).to(device)
        row: Dict[str, Any] = {"generator_resolution": res, "label_resolution": label_res,
                               "hypercolumn_channels": labeler.config.channels,
                               "naive_stack_bytes_per_image": 4 * label_res ** 2 * labeler.config.channels}
        record["scales"][key] = row
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            ws1 = G.mapping(torch.randn(1, G.z_dim, generator=gen).to(device), truncation_psi=0.7)
            features = G.synthesis(ws1, noise_mode="const", return_features=True)[1]
        variants: List[Tuple[str, Callable[[], Any]]] = [
            (f"factorised band={b}", (lambda b=b: labeler.predict(features, band_elements=b))) for b in bands]
        variants.append(("naive", lambda: labeler.predict_naive(features)))
        predictions: Dict[str, Any] = {}
        row["per_image"] = {}
        for name, call in variants:
            try:
                seconds, peak, pred = _timed_call(call, device, repeats)
                predictions[name] = pred
                row["per_image"][name] = {"seconds": round(seconds, 5), "peak_bytes": peak}
            except torch.cuda.OutOfMemoryError as err:
                row["per_image"][name] = {"error": f"out of memory: {str(err).splitlines()[0][:200]}"}
            except Exception as err:  # noqa: BLE001 - recorded per variant
                row["per_image"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"{key} {name}: {row['per_image'][name]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _save(args.work, "labeler", record)
        default = row["per_image"].get(f"factorised band={BAND_ELEMENTS}", {})
        naive = row["per_image"].get("naive", {})
        if "seconds" in default and "seconds" in naive:
            row["speedup"] = round(naive["seconds"] / default["seconds"], 2)
            if default.get("peak_bytes") and naive.get("peak_bytes") is not None:
                row["leaner"] = round(naive["peak_bytes"] / default["peak_bytes"], 1)
            fastest = min((v["seconds"], n) for n, v in row["per_image"].items() if "seconds" in v and n != "naive")
            row["fastest_factorised"] = {"variant": fastest[1], "speedup": round(naive["seconds"] / fastest[0], 2)}
        if "naive" in predictions:
            row["agreement_with_naive"] = {n: _agreement(p, predictions["naive"]) for n, p in predictions.items()
                                           if n != "naive"}
        del predictions, features
        # throughput: label_ws against the generator alone, same batch
        ws = G.mapping(torch.randn(batch, G.z_dim, generator=gen).to(device), truncation_psi=0.7)
        try:
            with torch.no_grad():
                t_gen, _, _ = _timed_call(lambda: G.synthesis(ws, noise_mode="const"), device, repeats)
            t_lab, peak_lab, _ = _timed_call(lambda: label_ws(G, labeler, ws), device, repeats)

            def label_big_band() -> Any:
                parts = []
                for _, images, feats in synthesis_chunks(G, ws):
                    parts.append((images_at(images, label_res), labeler.predict(feats, band_elements=bands[-1])))
                return parts

            t_big, _, _ = _timed_call(label_big_band, device, repeats)
            row["throughput"] = {"batch": batch, "generator_img_per_s": round(batch / t_gen, 2),
                                 "labeled_img_per_s": round(batch / t_lab, 2),
                                 "labeling_overhead": round(t_lab / t_gen - 1, 3),
                                 "label_ws_peak_bytes": peak_lab,
                                 f"labeled_img_per_s_band={bands[-1]}": round(batch / t_big, 2),
                                 f"labeling_overhead_band={bands[-1]}": round(t_big / t_gen - 1, 3)}
        except Exception as err:  # noqa: BLE001 - recorded
            row["throughput"] = {"batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        row["goals_met"] = {
            "speedup": row["speedup"] >= LABEL_GOALS["speedup"] if "speedup" in row else None,
            "leaner": row["leaner"] >= LABEL_GOALS["leaner"] if "leaner" in row else None,
            "labeling_overhead": (row["throughput"]["labeling_overhead"] <= LABEL_GOALS["labeling_overhead"]
                                  if "labeling_overhead" in row["throughput"] else None)}
        print(f"{key}: speedup {row.get('speedup')}, leaner {row.get('leaner')}, throughput {row['throughput']}",
              flush=True)
        _save(args.work, "labeler", record)
        del G, labeler, ws
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _save(args.work, "labeler", record)


# ----------------------------------------------------------------------------------------------- generate
def part_generate(args: argparse.Namespace) -> None:
    import torch
    import generate as gen_bench  # benchmarks/generate.py
    from _machine import device_name
    from handsoff.gan.checkpoints import load_generator, save_generator
    from handsoff.label.io import save_labeler
    from handsoff.synth.labeling import load_labeling

    device = _setup_torch(args)
    compiled = compiled_impl(device)
    res = 32 if args.quick else 256
    batch = 4 if args.quick else 16
    folder = args.work / "generate"
    folder.mkdir(parents=True, exist_ok=True)
    g_path, l_path = folder / "generator.safetensors", folder / "labeler.safetensors"
    G0 = paper_generator(res, args.quick)
    save_generator(G0, g_path)
    save_labeler(l_path, paper_labeler(G0, res), G0, extra={"note": "random init, for the gpu check"})
    del G0
    G = load_generator(g_path, device=device)  # what the command loads
    label_fn, info = load_labeling(l_path, G, device)
    record: Dict[str, Any] = {
        "benchmark": "handsoff generate end to end at 256 (config-f generator, official ensemble) vs in-memory "
                     "labeled and generator-only images/s",
        "device": f"{device.type}: {device_name(device)}", "date": _now_iso(), "torch": torch.__version__,
        "resolution": res, "batch": batch, "ops_impl": compiled or "ref", "tf32": tf32_flags(),
        "generator": "random-init config-f" if not args.quick else "tiny random-init (--quick)",
        "labeler": {"classes": len(info.classes), "keypoints": len(info.keypoint_names), "depth": info.depth,
                    "ensemble": 10, "hidden": [256, 32]}}
    n_mem = 2 * batch  # a first rate, to size the command's run (the labeler dominates: keep it short)
    figures = gen_bench.in_memory(G, label_fn, n_mem, batch, 0.7, device, 1 if args.quick else 2)
    record["img_per_s"] = figures
    record["n_in_memory"] = n_mem
    _save(args.work, "generate", record)
    labeled_rate = figures["labeled"]["best"]
    if args.quick:
        n = 4 * batch
    else:  # about 20 s of generation, whole batches, 4 shards, within the time left
        seconds = max(5.0, min(20.0, (_time_left(args.deadline) - 60) / 2))
        n = int(max(4 * batch, min(2048, labeled_rate * seconds)) // (4 * batch) * (4 * batch))
    corpus = folder / "corpus"
    timing = folder / "cli-timing.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--generate-cli", str(timing), "generate", "--labeler",
           str(l_path), "--generator", str(g_path), "--n", str(n), "--out", str(corpus), "--batch", str(batch),
           "--shard-size", str(n // 4), "--device", args.device, "--no-progress"]
    print(f"handsoff generate: {n} samples (in-memory labeled rate {labeled_rate} img/s)", flush=True)
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, timeout=max(5.0, _time_left(args.deadline) - 25))
        rc: Optional[int] = done.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.time() - start
    report = read_json(corpus / "report.json") or {}
    times = read_json(timing) or {}
    run = report.get("this_run", {})
    seconds = run.get("seconds") or 0
    cli: Dict[str, Any] = {"command": "handsoff " + " ".join(cmd[4:]).replace(str(folder), "<scratch>"),
                           "returncode": rc, "process_wall_s": round(wall, 2), "n": n,
                           "samples_per_s": report.get("samples_per_s"), "seconds": seconds,
                           "generated": report.get("generated"), "kept": report.get("kept"),
                           "shards": report.get("shards"), "writer": times}
    if seconds and times.get("writer_busy_s") is not None:
        cli["writer_busy_share"] = round(times["writer_busy_s"] / seconds, 3)
        blocked = times.get("producer_blocked_in_put_s", 0) + times.get("close_wait_s", 0)
        cli["writing_on_critical_path_share"] = round(blocked / seconds, 3)
    cli["note"] = ("samples_per_s and seconds: the command's report (generation and writing, start-up excluded); "
                   "writer_busy_share: time the writer thread spent filtering, writing and hashing shards "
                   "(_ShardSink) / seconds; it overlaps computing, so the share of the run that writing "
                   "actually cost is writing_on_critical_path_share: the generation loop waiting on the writer "
                   "(queue full) plus the wait for the last shard / seconds")
    record["handsoff_generate"] = cli
    if report.get("samples_per_s"):
        record["img_per_s"]["engine"] = {"best": report["samples_per_s"], "median": report["samples_per_s"]}
        gen = figures["generator"]["best"]
        record["labeled_over_generator"] = round(figures["labeled"]["best"] / gen, 3)
        record["engine_over_labeled"] = round(report["samples_per_s"] / figures["labeled"]["best"], 3)
    record["writing"] = gen_bench.writing(res, max(2, len(info.classes)), max(1, len(info.keypoint_names)),
                                          n=16 if args.quick else 256, repeats=1 if args.quick else 2)
    record["writing"]["where"] = str(folder.parent)
    _save(args.work, "generate", record)
    print(json.dumps({"img_per_s": record["img_per_s"], "handsoff_generate": {
        k: cli.get(k) for k in ("samples_per_s", "writer_busy_share", "writing_on_critical_path_share")}}))
    if rc != 0:
        raise SystemExit(f"handsoff generate exited with {rc}")


def generate_cli(timing_path: Path, argv: List[str]) -> int:
    """``handsoff generate`` (handsoff.cli.main) with the shard writer's time measured.

    Wraps, in this process only, the writer thread's per-shard work (`_ShardSink.__call__`) and the
    generation loop's waits on the writer (`BackgroundWriter.put` and `close`), then runs the command.
    """
    import handsoff.cli
    from handsoff.synth import engine, writer

    clock = {"writer_busy_s": 0.0, "producer_blocked_in_put_s": 0.0, "close_wait_s": 0.0, "shards": 0}

    def timed(owner: Any, attr: str, key: str) -> None:
        original = getattr(owner, attr)

        def wrapper(self: Any, *a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                clock[key] += time.perf_counter() - start
                if key == "writer_busy_s":
                    clock["shards"] += 1

        setattr(owner, attr, wrapper)

    try:
        timed(engine._ShardSink, "__call__", "writer_busy_s")
        timed(writer.BackgroundWriter, "put", "producer_blocked_in_put_s")
        timed(writer.BackgroundWriter, "close", "close_wait_s")
        clock["instrumented"] = True
    except AttributeError as err:  # the engine's internals moved: run it anyway, untimed
        clock["instrumented"] = f"no ({err})"
    start = time.perf_counter()
    rc = handsoff.cli.main(argv)
    clock["process_main_s"] = time.perf_counter() - start
    write_json(timing_path, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in clock.items()})
    return rc


# ----------------------------------------------------------------------------------------------- self-tests
def part_fail(args: argparse.Namespace) -> None:  # noqa: ARG001
    raise RuntimeError("self-test: this part fails on purpose")


def part_sleep(args: argparse.Namespace) -> None:  # noqa: ARG001
    print("self-test: sleeping until stopped", flush=True)
    time.sleep(3600)


PART_FUNCTIONS: Dict[str, Callable[[argparse.Namespace], None]] = {
    "env": part_env, "build": part_build, "build-ext": part_build_ext, "correctness": part_correctness,
    "pytest": part_pytest, "ops": part_ops, "generator": part_generator, "train": part_train,
    "labeler": part_labeler, "generate": part_generate, "_fail": part_fail, "_sleep": part_sleep}


def run_part(args: argparse.Namespace) -> int:
    """Child-process entry: run one part (its errors propagate: the driver records the exit status)."""
    if args.work is None:
        _fail("--part needs --work")
    if args.part not in PART_FUNCTIONS:
        _fail(f"unknown part {args.part!r}")
    if args.device == "cpu" and not args.part.startswith("_"):
        with contextlib.suppress(Exception):
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    PART_FUNCTIONS[args.part](args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--generate-cli"]:
        if len(argv) < 3:
            _fail("--generate-cli needs a timing file and the handsoff arguments")
        return generate_cli(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    return drive(settings_from(args))


if __name__ == "__main__":
    raise SystemExit(main())
