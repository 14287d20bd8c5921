"""stylegan_ops: fast StyleGAN2 ops with a pure-PyTorch reference beside compiled kernels.

Ops: :func:`bias_act` (bias + activation + gain + clamp) and :func:`upfirdn2d` (upsample, pad,
FIR-filter, downsample) with its helpers :func:`filter2d`, :func:`upsample2d`,
:func:`downsample2d` and :func:`setup_filter`. Semantics follow NVlabs stylegan2-ada-pytorch
(``torch_utils/ops``); the code here is written independently.

Every op takes ``impl``:

* ``'ref'``: plain PyTorch; runs anywhere, differentiable to any order.
* ``'cuda'``: the CUDA kernels (tensors on a GPU); raises if they cannot be built.
* ``'cpu'``: the C++ CPU kernels (tensors on the CPU); raises if they cannot be built.
* ``'auto'`` (default): on CUDA the CUDA kernels; on the CPU the C++ kernel where
  benchmarks/ops.py measured it faster than the reference (bias_act with relu or lrelu), else
  the reference. A failed build warns once, is not retried in the process, and leaves 'auto'
  on the reference.

Calls a kernel does not cover (other dtypes; upfirdn2d with filters over 32 taps per axis or a
filter that needs a gradient) run on the reference path whatever ``impl`` says. First and second
derivatives are supported on every impl (R1 regularisation needs the second). The CPU upfirdn2d
kernel runs the CUDA kernel's tile code, which is how the tests check that code on machines
without a GPU.

Kernels compile with ninja on first use, never at import (see :mod:`stylegan_ops._build`);
:func:`build` compiles one explicitly and :func:`available_impls` says what runs where.
"""
from ._build import BuildError, BuildWarning, build
from ._dispatch import Impl, available_impls
from ._bias_act import bias_act
from ._upfirdn2d import downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

__all__ = [
    "Impl",
    "available_impls",
    "bias_act",
    "build",
    "BuildError",
    "BuildWarning",
    "downsample2d",
    "filter2d",
    "setup_filter",
    "upfirdn2d",
    "upsample2d",
]
