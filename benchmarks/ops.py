"""Time each stylegan_ops op on its compiled path against its reference path.

Runs on the GPU when one is present (else the CPU), forward and forward+backward, on typical
StyleGAN2 shapes. Reference and compiled runs are interleaved within each case (after a warm-up)
so that both see the same machine state; CUDA work is synchronised before every clock read.
Prints a table with ratio = ref_ms / compiled_ms (> 1: the kernel is faster) and writes JSON to
benchmarks/results/ops-<device>.json.

    python benchmarks/ops.py                       # all cases, on cuda if available
    python benchmarks/ops.py --device cpu --repeats 5

A whole generator forward, compiled against reference: benchmarks/generator.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import stylegan_ops  # noqa: E402
from _machine import device_name, load_average  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BIAS_ACT_SHAPES = [(8, 512, 32, 32), (8, 128, 256, 256)]
RESAMPLE_SHAPES = [(8, 512, 32, 32), (8, 128, 128, 128)]
OTHER_ACTS = ("relu", "tanh", "sigmoid", "elu", "selu", "softplus", "swish")


@dataclass
class Case:
    """One timed case; *_ms are medians over the repeats, ratio = ref_ms / compiled_ms."""

    op: str
    shape: List[int]
    dtype: str
    passes: str  # 'forward' or 'forward+backward'
    impl: str  # the compiled impl, or 'none' where the op has no kernel on this device
    ref_ms: float
    compiled_ms: Optional[float]
    ratio: Optional[float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median milliseconds per call of each function, calling them in turn every repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _op_calls(op: str, x: torch.Tensor, device: torch.device) -> Callable[[str], torch.Tensor]:
    """op name -> a function of impl running that op on x the way StyleGAN2 does."""
    f = stylegan_ops.setup_filter([1, 3, 3, 1], device=device)
    if op == "bias_act lrelu":
        b = torch.randn(x.shape[1], device=device, dtype=x.dtype)
        return lambda impl: stylegan_ops.bias_act(x, b, act="lrelu", clamp=256.0, impl=impl)
    if op.startswith("bias_act "):  # the other activations, with StyleGAN2's default gain
        b = torch.randn(x.shape[1], device=device, dtype=x.dtype)
        return lambda impl: stylegan_ops.bias_act(x, b, act=op.split()[1], impl=impl)
    if op == "upsample2d":
        return lambda impl: stylegan_ops.upsample2d(x, f, impl=impl)
    if op == "downsample2d":
        return lambda impl: stylegan_ops.downsample2d(x, f, impl=impl)
    if op == "filter2d":
        return lambda impl: stylegan_ops.filter2d(x, f, padding=1, impl=impl)
    raise ValueError(op)


def _with_backward(call: Callable[[str], torch.Tensor], x: torch.Tensor, impl: str) -> Callable[[], object]:
    """Forward, then backward with a fixed upstream gradient (made once, outside the timing)."""
    grad = torch.randn_like(call(impl))

    def run() -> object:
        x.grad = None
        call(impl).backward(grad)
        return x.grad

    return run


def bench_ops(device: torch.device, dtypes: List[torch.dtype], warmup: int, repeats: int) -> List[Case]:
    compiled = device.type if device.type in stylegan_ops.available_impls(device) else None
    plan = [(op, s) for op in ("bias_act lrelu", "bias_act linear") for s in BIAS_ACT_SHAPES]
    plan += [(op, s) for op in ("upsample2d", "downsample2d", "filter2d") for s in RESAMPLE_SHAPES]
    # Every other activation once, on the small shape: what decides bias_act's 'auto' on the CPU.
    plan += [(f"bias_act {a}", BIAS_ACT_SHAPES[0]) for a in OTHER_ACTS]
    cases: List[Case] = []
    for dtype in dtypes:
        for op, shape in plan:
            op_kernel = "bias_act" if op.startswith("bias_act") else "upfirdn2d"
            impl = compiled if compiled and stylegan_ops._build.extension_for(op_kernel, compiled) else None
            x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
            call = _op_calls(op, x, device)
            for passes in ("forward", "forward+backward"):
                impls = ["ref"] + ([impl] if impl else [])
                if passes == "forward":
                    fns = {i: (lambda i=i: call(i)) for i in impls}
                    with torch.no_grad():
                        ms = _time_interleaved(fns, device, warmup, repeats)
                else:
                    fns = {i: _with_backward(call, x, i) for i in impls}
                    ms = _time_interleaved(fns, device, warmup, repeats)
                comp = ms.get(impl) if impl else None
                case = Case(op, list(shape), str(dtype).replace("torch.", ""), passes, impl or "none", ms["ref"], comp,
                            ms["ref"] / comp if comp else None)
                cases.append(case)
                _print_row(case)
            del x, call
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return cases


def _print_row(c: Case) -> None:
    comp = f"{c.compiled_ms:10.3f}" if c.compiled_ms is not None else f"{'-':>10}"
    ratio = f"{c.ratio:7.2f}x" if c.ratio is not None else f"{'-':>8}"
    shape = "x".join(map(str, c.shape))
    print(f"{c.op:17} {shape:18} {c.dtype:8} {c.passes:17} {c.ref_ms:10.3f} {comp} {ratio}  {c.impl}", flush=True)


def _load_1m() -> Optional[float]:
    loads = load_average()
    return loads[0] if loads else None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/ops-<device>.json)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per impl and case (default: 50 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 10 on cuda, 1 on cpu)")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: float32,float16 on cuda, float32 on cpu)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    repeats = args.repeats or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32,float16" if on_gpu else "float32")).split(",")]
    out = args.out or RESULTS / f"ops-{device.type}.json"

    print(f"device: {device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"impls {stylegan_ops.available_impls(device)} | repeats {repeats}")
    print(f"{'op':17} {'shape':18} {'dtype':8} {'passes':17} {'ref ms':>10} {'kernel ms':>10} {'ratio':>8}  impl")
    load_start = _load_1m()
    cases = bench_ops(device, dtypes, warmup, repeats)
    report = {
        "device": device_name(device),
        # Other work on the machine skews the timings; the load averages say how much there was.
        "load_average_1m": {"start": load_start, "end": _load_1m()},
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "warmup": warmup,
        "ratio": "ref_ms / compiled_ms; > 1 means the compiled kernel is faster",
        "cases": [asdict(c) for c in cases],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
