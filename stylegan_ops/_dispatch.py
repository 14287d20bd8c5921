"""The ``impl`` switch: which implementation runs an op for tensors on a given device."""
from __future__ import annotations

from types import ModuleType
from typing import List, Literal, Optional, Tuple, Union

import torch

from . import _build

Impl = Literal["ref", "cuda", "cpu", "auto"]
IMPLS: Tuple[str, ...] = ("ref", "cuda", "cpu", "auto")

# For 'auto' on the CPU: ops whose C++ kernel beat the reference in benchmarks/ops.py on a 2-core
# machine (see benchmarks/results/ops-cpu.json). upfirdn2d has no CPU kernel: the reference, one
# depthwise conv2d on oneDNN, is the fast path there.
AUTO_CPU_OPS: Tuple[str, ...] = ("bias_act",)


def check_impl(impl: str) -> None:
    """Raise ValueError unless ``impl`` is one of 'ref', 'cuda', 'cpu', 'auto'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve(op: str, impl: str, device: torch.device) -> Tuple[str, Optional[ModuleType]]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    Returns:
        ('ref', None), or ('cpu' | 'cuda', the loaded extension).

    'auto' takes the compiled kernel for the device when it builds (a failed build warned once
    and is not retried) and 'ref' otherwise. An explicit 'cuda' or 'cpu' raises when the tensors
    are elsewhere or the build failed; 'cpu' for an op without a CPU kernel (upfirdn2d) runs the
    reference, which is the fast path there.

    Raises:
        ValueError: unknown ``impl``, or ``impl`` names another device than the tensors'.
        BuildError: an explicit ``impl`` whose extension failed to build.
    """
    check_impl(impl)
    if impl == "ref":
        return "ref", None
    if impl == "auto":
        kind = device.type
        if kind == "cpu" and op not in AUTO_CPU_OPS:
            return "ref", None
        if _build.extension_for(op, kind) is None:
            return "ref", None
        module = _build.try_load(kind)
        return (kind, module) if module is not None else ("ref", None)
    if device.type != impl:
        raise ValueError(f"impl={impl!r} needs tensors on a {impl} device, got {device}")
    if _build.extension_for(op, impl) is None:
        return "ref", None
    return impl, _build.build(op, impl)


def available_impls(device: Union[str, torch.device]) -> List[str]:
    """The implementations that can run for tensors on ``device`` here, 'ref' first.

    May trigger a build of the device's extension (once per process; cached on disk after).
    'cuda' is listed only where a GPU is visible, since CUDA kernels cannot run elsewhere.
    """
    device = torch.device(device)
    impls = ["ref"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return impls
    if device.type in _build.EXTENSIONS and _build.try_load(device.type) is not None:
        impls.append(device.type)
    return impls
