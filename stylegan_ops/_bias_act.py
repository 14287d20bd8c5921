"""bias_act: fused bias + activation + gain + clamp, with first and second derivatives.

    y = clamp(act(x + b broadcast along dim) * gain, -clamp, clamp)

The reference path is plain PyTorch. The compiled paths ('cpu', 'cuda') run one element-wise
kernel per pass instead of up to five, for the forward pass and for both derivatives, which is
what R1 regularisation (a gradient penalty, hence double backward) needs.
"""
from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from types import MappingProxyType, ModuleType
from typing import Callable, List, Mapping, Optional

import torch
import torch.nn.functional as F

from ._dispatch import Impl, resolve

__all__ = ["bias_act", "ACTIVATIONS"]


@dataclass(frozen=True)
class _Activation:
    """One activation function.

    Attributes:
        ref: the reference implementation, ``ref(x, alpha)``.
        def_alpha: default ``alpha`` (only lrelu uses alpha).
        def_gain: default ``gain``: sqrt(2) for relu/lrelu keeps the activation variance (He init).
        code: the activation's index in the kernels (``sgo::Act`` in csrc/bias_act_math.h).
        grad_from_y: the derivative can be computed from the output alone (the activation is
            invertible on the branch its output identifies), so backward can keep y instead of x.
    """

    ref: Callable[[torch.Tensor, float], torch.Tensor]
    def_alpha: float
    def_gain: float
    code: int
    grad_from_y: bool


_SQRT2 = math.sqrt(2)

# Defaults and names as in NVlabs stylegan2-ada-pytorch (torch_utils/ops/bias_act.py).
_ACTIVATIONS: Mapping[str, _Activation] = MappingProxyType(
    {
        "linear": _Activation(lambda x, alpha: x, 0.0, 1.0, 0, True),
        "relu": _Activation(lambda x, alpha: F.relu(x), 0.0, _SQRT2, 1, True),
        "lrelu": _Activation(lambda x, alpha: F.leaky_relu(x, alpha), 0.2, _SQRT2, 2, True),
        "tanh": _Activation(lambda x, alpha: torch.tanh(x), 0.0, 1.0, 3, True),
        "sigmoid": _Activation(lambda x, alpha: torch.sigmoid(x), 0.0, 1.0, 4, True),
        "elu": _Activation(lambda x, alpha: F.elu(x), 0.0, 1.0, 5, True),
        "selu": _Activation(lambda x, alpha: F.selu(x), 0.0, 1.0, 6, True),
        "softplus": _Activation(lambda x, alpha: F.softplus(x), 0.0, 1.0, 7, True),
        "swish": _Activation(lambda x, alpha: torch.sigmoid(x) * x, 0.0, 1.0, 8, False),
    }
)
ACTIVATIONS = tuple(_ACTIVATIONS)

# Tensor types the kernels take; anything else runs on the reference path.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Activations for which impl='auto' takes the CPU kernel: those where it clearly beat the
# reference in benchmarks/ops.py (2-core CPU: lrelu 3.6-7x, relu 1.8-3x). 'linear' ties (the
# reference is a single add) and swish varied between 0.75x and 1.2x; the rest spend their time in
# exp/tanh, which the kernel calls from libm one element at a time while the reference uses
# torch's SIMD versions, and lose (0.2-0.85x). 'auto' keeps those on the reference; impl='cpu'
# still runs the kernel.
_AUTO_CPU_ACTS = frozenset({"relu", "lrelu"})


class _Mode(enum.IntEnum):
    """Kernel modes (``sgo::Mode`` in csrc/bias_act_math.h)."""

    FORWARD = 0
    GRAD_Z = 1  # derivative, from the saved x
    GRAD2_Z = 2  # second derivative, from the saved x
    GRAD_Y = 3  # derivative, from the saved y
    GRAD2_Y = 4  # second derivative, from the saved y


def bias_act(
    x: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    dim: int = 1,
    act: str = "linear",
    alpha: Optional[float] = None,
    gain: Optional[float] = None,
    clamp: Optional[float] = None,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Add a bias, apply an activation, scale, and clamp, in one fused pass where compiled.

    ``y = clamp(act(x + b) * gain, -clamp, clamp)``, b broadcast along ``dim``.

    Args:
        x: input of any shape and floating dtype; float16 / bfloat16 / float32 / float64 run on the
            kernels (which accumulate in float32, float64 for float64), other dtypes on 'ref'.
        b: bias of shape ``[x.shape[dim]]``, or None for no bias. Cast to ``x.dtype``.
        dim: the dimension of ``x`` that ``b`` runs along (negative counts from the end).
        act: one of 'linear', 'relu', 'lrelu', 'tanh', 'sigmoid', 'elu', 'selu', 'softplus',
            'swish'.
        alpha: slope of lrelu for negative inputs (default 0.2); the other activations ignore it.
        gain: output scale; default sqrt(2) for relu and lrelu, 1 otherwise.
        clamp: clamp the output to [-clamp, clamp] (>= 0), or None for no clamping.
        impl: 'ref', 'cuda', 'cpu' or 'auto' (see ``stylegan_ops`` for the rules).

    Returns:
        A tensor of ``x``'s shape and dtype (and, on the kernels, its memory format).

    Both derivatives (for x and b) are supported to second order on every impl.
    """
    spec = _activation(act)
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    if clamp is not None and not clamp >= 0:
        raise ValueError(f"clamp must be >= 0 or None, got {clamp}")
    clamp = float(clamp) if clamp is not None else -1.0  # -1: no clamp, as the kernels expect
    dim = _normalize_dim(dim, x.ndim, has_bias=b is not None)
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"b must have shape [{x.shape[dim]}] (x.shape[{dim}]), got {list(b.shape)}")
        b = b.to(x.dtype)
    if impl == "auto" and x.device.type == "cpu" and act not in _AUTO_CPU_ACTS:
        kernel = None  # decided before resolve(), which would build the extension for nothing
    else:
        kernel = resolve("bias_act", impl, x.device)
    if kernel is not None and x.dtype in _KERNEL_DTYPES:
        b_arg = b if b is not None else x.new_empty([0])
        return _compiled_function(kernel, dim, act, alpha, gain, clamp).apply(x, b_arg)
    return _bias_act_ref(x, b, dim, spec, alpha, gain, clamp)


def _activation(act: str) -> _Activation:
    try:
        return _ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}") from None


def _normalize_dim(dim: int, ndim: int, has_bias: bool) -> int:
    if not has_bias:
        return 0  # unused without a bias, so any value is accepted (as in NVlabs)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} out of range for a {ndim}-D x")
    return dim % ndim


def _bias_act_ref(
    x: torch.Tensor,
    b: Optional[torch.Tensor],
    dim: int,
    spec: _Activation,
    alpha: float,
    gain: float,
    clamp: float,
) -> torch.Tensor:
    """Plain PyTorch: autograd provides every derivative."""
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.ref(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def _reduce_to_bias(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``g`` over every dim but ``dim``: the gradient of a bias broadcast along ``dim``."""
    others: List[int] = [i for i in range(g.ndim) if i != dim]
    return g.sum(dim=others) if others else g


def _saved_reference(act: str, alpha: float, gain: float, clamp: float) -> str:
    """What backward needs: 'none' (constant derivative), 'y' (the output) or 'x' (the input).

    'y' is preferred: the next layer keeps y for its own backward anyway, so saving it costs no
    memory, whereas saving x keeps a tensor alive that nothing else needs. It needs an activation
    whose output identifies its derivative, and gain != 0 (a = y / gain).
    """
    if act == "linear" and clamp < 0:
        return "none"
    if _ACTIVATIONS[act].grad_from_y and gain != 0 and not (act == "lrelu" and alpha < 0):
        return "y"
    return "x"


@functools.lru_cache(maxsize=None)
def _compiled_function(
    kernel: ModuleType,
    dim: int,
    act: str,
    alpha: float,
    gain: float,
    clamp: float,
    save: Optional[str] = None,
) -> type:
    """An autograd Function specialised to one configuration, cached per configuration.

    ``apply(x, b)`` with b of shape [x.shape[dim]] or empty. ``save`` overrides the choice of
    :func:`_saved_reference` (tests use it to exercise both derivative formulas).
    """
    code = _ACTIVATIONS[act].code
    save = save or _saved_reference(act, alpha, gain, clamp)
    grad_mode, grad2_mode = (_Mode.GRAD_Y, _Mode.GRAD2_Y) if save == "y" else (_Mode.GRAD_Z, _Mode.GRAD2_Z)

    def run(v: torch.Tensor, b: torch.Tensor, r: torch.Tensor, mode: _Mode) -> torch.Tensor:
        bound = clamp
        if mode in (_Mode.GRAD_Y, _Mode.GRAD2_Y) and clamp >= 0 and r.dtype != torch.float32:
            # The Y modes tell clamped elements by comparing the stored y with the bound. y was
            # clamped in float and then rounded to its storage type, so the bound must be rounded
            # the same way: 0.8 is stored as 0.7998 in float16, which would read as inside 0.8 and
            # let the gradient of a clamped element through.
            bound = float(torch.tensor(clamp, dtype=r.dtype))
        return kernel.bias_act(v, b, r, dim, code, int(mode), alpha, gain, bound)

    class BiasActGrad2(torch.autograd.Function):
        """``dy * d(dy/dz)/dr``: the second derivative. Differentiating it further is refused,
        loudly: without this node a third derivative would silently miss this term."""

        @staticmethod
        def forward(ctx, v: torch.Tensor, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return run(v, b, r, grad2_mode)

        @staticmethod
        def backward(ctx, grad: torch.Tensor):
            raise RuntimeError(
                "bias_act: the compiled kernels support derivatives up to the second; use impl='ref' for higher orders"
            )

    class BiasActGrad(torch.autograd.Function):
        """``dx = dy * dy/dz`` with dy/dz evaluated from the saved ``r`` (x, with bias b, or y).

        Its backward (the second derivative of bias_act) runs the same kernel again.
        """

        @staticmethod
        def forward(ctx, dy: torch.Tensor, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(dy, r, b)
            return run(dy, b, r, grad_mode)

        @staticmethod
        def backward(ctx, ddx: torch.Tensor):
            dy, r, b = ctx.saved_tensors
            d_dy = d_r = d_b = None
            if ctx.needs_input_grad[0]:
                d_dy = BiasActGrad.apply(ddx, r, b)  # linear in dy: the same function
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                d_r = BiasActGrad2.apply(ddx * dy, r, b)
                if ctx.needs_input_grad[2] and b.numel() > 0:
                    d_b = _reduce_to_bias(d_r, dim)
            return d_dy, d_r, d_b

    class BiasAct(torch.autograd.Function):
        """``y = clamp(act(x + b) * gain)``; keeps y, x or nothing for backward (see ``save``)."""

        @staticmethod
        def forward(ctx, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            y = run(x, b, x.new_empty([0]), _Mode.FORWARD)
            if save == "x":
                ctx.save_for_backward(x, b)
            elif save == "y":
                ctx.save_for_backward(y, x.new_empty([0]))  # the Y formulas need no bias
            ctx.has_bias = b.numel() > 0
            return y

        @staticmethod
        def backward(ctx, dy: torch.Tensor):
            if save == "none":
                dx = dy * gain if gain != 1 else dy
            else:
                r, b = ctx.saved_tensors
                dx = BiasActGrad.apply(dy, r, b)
            db = _reduce_to_bias(dx, dim) if ctx.needs_input_grad[1] and ctx.has_bias else None
            return dx, db

    BiasAct.__name__ = BiasAct.__qualname__ = f"BiasAct_{act}"
    return BiasAct
