"""The ``impl`` switch: which implementation runs an op for tensors on a given device."""
from __future__ import annotations

from types import ModuleType
from typing import List, Literal, Optional, Tuple, Union

import torch

from . import _build

Impl = Literal["ref", "cuda", "cpu", "auto"]
IMPLS: Tuple[str, ...] = ("ref", "cuda", "cpu", "auto")

# For 'auto' on the CPU: ops whose C++ kernel beat the reference in benchmarks/ops.py on a 2-core
# machine (benchmarks/results/ops-cpu.json; bias_act narrows it further per activation). The CPU
# upfirdn2d kernel, the CUDA kernel's algorithm run on the CPU so that tests can check it there,
# loses to the reference's strided depthwise conv2d for filtering, so 'auto' leaves it out.
AUTO_CPU_OPS: Tuple[str, ...] = ("bias_act",)


def check_impl(impl: str) -> None:
    """Raise ValueError unless ``impl`` is one of 'ref', 'cuda', 'cpu', 'auto'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def resolve(op: str, impl: str, device: torch.device) -> Optional[ModuleType]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    Returns:
        The loaded extension ('cpu' or 'cuda') to run, or None for the reference.

    'auto' takes the compiled kernel for the device when it builds (a failed build warned once
    and is not retried) and the op is in AUTO_CPU_OPS or on CUDA, else 'ref'. An explicit 'cuda'
    or 'cpu' raises when the tensors are elsewhere or the build failed.

    Raises:
        ValueError: unknown ``impl``, or ``impl`` names another device than the tensors'.
        BuildError: an explicit ``impl`` whose extension failed to build.
    """
    check_impl(impl)
    if impl == "ref":
        return None
    if impl == "auto":
        kind = device.type
        if (kind == "cpu" and op not in AUTO_CPU_OPS) or _build.extension_for(op, kind) is None:
            return None
        return _build.try_load(kind)
    if device.type != impl:
        raise ValueError(f"impl={impl!r} needs tensors on a {impl} device, got {device}")
    return _build.build(op, impl)


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
