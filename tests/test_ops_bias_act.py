"""bias_act: every impl against the reference and against the formula, to second order."""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stylegan_ops import available_impls, bias_act
from stylegan_ops import _bias_act as bias_act_module
from stylegan_ops import build

ACTS = bias_act_module.ACTIVATIONS
COMPILED = [("cpu", "cpu"), ("cuda", "cuda")]
ALL = [("ref", "cpu")] + COMPILED


def _require(impl: str, device: str) -> torch.device:
    """Skip unless ``impl`` can run on ``device`` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl not in available_impls(device):
        pytest.skip(f"impl {impl!r} is not available on {device} here (build failed or no compiler)")
    return torch.device(device)


def _naive(x, b, dim, act, alpha, gain, clamp):
    """The formula, written out without bias_act's code."""
    shape = [1] * x.ndim
    shape[dim] = -1
    z = x + b.reshape(shape) if b is not None else x
    a = {
        "linear": lambda: z,
        "relu": lambda: torch.where(z > 0, z, torch.zeros_like(z)),
        "lrelu": lambda: torch.where(z > 0, z, z * alpha),
        "tanh": lambda: torch.tanh(z),
        "sigmoid": lambda: 1 / (1 + torch.exp(-z)),
        "elu": lambda: torch.where(z > 0, z, torch.exp(z) - 1),
        "selu": lambda: 1.0507009873554805 * torch.where(z > 0, z, 1.6732632423543772 * (torch.exp(z) - 1)),
        "softplus": lambda: torch.log1p(torch.exp(z)),
        "swish": lambda: z / (1 + torch.exp(-z)),
    }[act]()
    y = a * gain
    return y.clamp(-clamp, clamp) if clamp is not None else y


@pytest.mark.parametrize("act", ACTS)
def test_defaults_match_formula(act):
    x, b = torch.randn(2, 5, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    default_gain = math.sqrt(2) if act in ("relu", "lrelu") else 1.0
    expected = _naive(x, b, 1, act, 0.2, default_gain, None)
    torch.testing.assert_close(bias_act(x, b, act=act, impl="ref"), expected)


def _inputs(device, dtype, shape=(2, 5, 3, 4), dim=1, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(device, dtype).requires_grad_(requires_grad)
    b = torch.randn([shape[dim]], generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)
    return x, b


def _first_and_second_grads(x, b, **kw):
    """y, its gradients for an upstream gradient w, and the gradients of a function of those
    (what R1 regularisation does: differentiate a gradient norm), for x, b and w."""
    y = bias_act(x, b, **kw)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape).requires_grad_()
    gx, gb = torch.autograd.grad((y * w).sum(), [x, b], create_graph=True)
    second = torch.autograd.grad((gx**2).sum() + (gb**2).sum(), [x, b, w], allow_unused=True, materialize_grads=True)
    return (y, gx, gb) + second


@pytest.mark.parametrize("impl,device", COMPILED)
@pytest.mark.parametrize("clamp", [None, 0.7])
@pytest.mark.parametrize("act", ACTS)
def test_compiled_matches_ref_to_second_order(impl, device, act, clamp):
    dev = _require(impl, device)
    x, b = _inputs(dev, torch.float32)
    got = _first_and_second_grads(x, b, act=act, clamp=clamp, impl=impl)
    want = _first_and_second_grads(x, b, act=act, clamp=clamp, impl="ref")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("gain,alpha,clamp", [(None, None, None), (0.5, 0.1, 1.0), (-1.5, None, 0.9), (0.0, None, None)])
@pytest.mark.parametrize("dim,shape", [(1, (2, 3, 2, 2)), (0, (3, 4)), (-1, (2, 2, 3)), (2, (2, 2, 3, 2))])
@pytest.mark.parametrize("act", ["linear", "lrelu", "tanh", "swish"])
def test_gain_alpha_clamp_dim(impl, device, act, dim, shape, gain, alpha, clamp):
    dev = _require(impl, device)
    x, b = _inputs(dev, torch.float64, shape=shape, dim=dim % len(shape))
    spec_gain = gain if gain is not None else (math.sqrt(2) if act == "lrelu" else 1.0)
    expected = _naive(x, b, dim % len(shape), act, 0.2 if alpha is None else alpha, spec_gain, clamp)
    got = bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp, impl=impl)
    torch.testing.assert_close(got, expected)
    torch.autograd.gradcheck(lambda x, b: bias_act(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp, impl=impl), (x, b))


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_and_gradgradcheck(impl, device, act, clamp):
    dev = _require(impl, device)
    x, b = _inputs(dev, torch.float64, shape=(2, 3, 2, 3))
    fn = lambda x, b: bias_act(x, b, act=act, clamp=clamp, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    assert torch.autograd.gradgradcheck(fn, (x, b))


@pytest.mark.parametrize("impl,device", COMPILED)
@pytest.mark.parametrize("save", ["x", "y"])
@pytest.mark.parametrize("act", [a for a in ACTS if a != "swish"])
def test_both_derivative_formulas(impl, device, act, save):
    """The derivative from the saved x and from the saved y: both must be right where defined."""
    dev = _require(impl, device)
    kernel = build("bias_act", impl)
    x, b = _inputs(dev, torch.float64, shape=(2, 3, 2, 3))
    for gain, clamp in [(1.3, -1.0), (0.9, 0.6)]:
        fn_cls = bias_act_module._compiled_function(kernel, 1, act, 0.2, gain, clamp, save)
        assert torch.autograd.gradgradcheck(fn_cls.apply, (x, b))


@pytest.mark.parametrize("impl,device", COMPILED)
def test_third_derivative_is_refused(impl, device):
    dev = _require(impl, device)
    x, b = _inputs(dev, torch.float64)
    y = bias_act(x, b, act="tanh", impl=impl)
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ggx.sum(), x)


@pytest.mark.parametrize("impl,device", ALL)
def test_without_bias_and_layouts(impl, device):
    dev = _require(impl, device)
    x = torch.randn(2, 4, 3, 5, device=dev)
    torch.testing.assert_close(bias_act(x, act="lrelu", impl=impl), F.leaky_relu(x, 0.2) * math.sqrt(2))
    for t in (x[0, 0, 0], x[0, 0, 0, 0]):  # without a bias, dim is ignored: 1-D and 0-D inputs work
        torch.testing.assert_close(bias_act(t, act="lrelu", impl=impl), F.leaky_relu(t, 0.2) * math.sqrt(2))
    b = torch.randn(4, device=dev)
    want = bias_act(x, b, act="lrelu", impl="ref")
    cl = x.to(memory_format=torch.channels_last)
    got = bias_act(cl, b, act="lrelu", impl=impl)
    torch.testing.assert_close(got, want)
    if impl != "ref":
        assert got.is_contiguous(memory_format=torch.channels_last)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, ::2]  # neither dense nor contiguous
    torch.testing.assert_close(bias_act(strided, b, act="lrelu", impl=impl), want[:, :, ::2])
    # Upstream gradients of another layout (e.g. expanded ones from .sum()) are handled too.
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(bias_act(xr, b, act="lrelu", clamp=0.5, impl=impl).sum(), xr)
    (gr,) = torch.autograd.grad(bias_act(xr, b, act="lrelu", clamp=0.5, impl="ref").sum(), xr)
    torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_close_to_float32(impl, device, dtype):
    dev = _require(impl, device)
    x, b = _inputs(dev, torch.float32, requires_grad=False)
    want = bias_act(x, b, act="lrelu", clamp=2.0, impl="ref")
    try:
        got = bias_act(x.to(dtype), b.to(dtype), act="lrelu", clamp=2.0, impl=impl)
    except RuntimeError as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{dtype} not supported by this torch on {device}: {exc}")
    assert got.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["linear", "lrelu", "tanh"])
def test_low_precision_gradient_is_zero_where_clamped(impl, device, dtype, act):
    """A clamp that low precision cannot store exactly (0.8): clamped elements pass no gradient.
    The compiled Y-mode backward once compared the rounded stored y with the unrounded bound."""
    dev = _require(impl, device)
    x = (torch.linspace(-3, 3, 600, device=dev).reshape(2, 3, 100)).to(dtype).requires_grad_(True)
    b = torch.zeros(3, device=dev, dtype=dtype)
    try:
        y = bias_act(x, b, act=act, clamp=0.8, impl=impl)
    except RuntimeError as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{dtype} not supported by this torch on {device}: {exc}")
    (dx,) = torch.autograd.grad(y.float().sum(), x)
    inside = bias_act(x.detach().float(), b.float(), act=act, impl="ref").abs() < 0.79
    outside = bias_act(x.detach().float(), b.float(), act=act, impl="ref").abs() > 0.81
    assert (dx[outside] == 0).all(), f"{int((dx[outside] != 0).sum())} clamped elements passed a gradient"
    assert (dx[inside] != 0).all()


def test_float16_bias_is_cast_to_x_dtype():
    x, b = torch.randn(2, 3, 4, dtype=torch.float16), torch.randn(3, dtype=torch.float32)
    assert bias_act(x, b, impl="ref").dtype == torch.float16


def test_invalid_arguments():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="act"):
        bias_act(x, act="gelu")
    with pytest.raises(ValueError, match="impl"):
        bias_act(x, impl="triton")
    with pytest.raises(ValueError, match="b must have shape"):
        bias_act(x, torch.randn(4))
    with pytest.raises(ValueError, match="clamp"):
        bias_act(x, clamp=-1)
    with pytest.raises(ValueError, match="dim"):
        bias_act(x, torch.randn(3), dim=3)
    with pytest.raises(ValueError, match="cuda"):
        bias_act(x, impl="cuda")


CHANNEL_WALKER_CHECK = r"""
#include <cstdio>
#include <random>
#include "bias_act_math.h"
int main() {
  std::mt19937_64 rng(7);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  for (int t = 0; t < 20000; ++t) {
    const int64_t inner = pick(1, t % 3 == 0 ? 4 : (int64_t(1) << (t % 24))), channels = pick(1, t % 2 ? 3 : 4096);
    const int64_t stride = pick(1, int64_t(1) << 24);
    int64_t i = pick(0, int64_t(1) << 40);
    sgo::ChannelWalker w(i, stride, inner, channels);
    for (int k = 0; k < 64; ++k, i += stride, w.advance()) {
      if (w.channel != (i / inner) % channels) { std::printf("mismatch at i=%lld\n", (long long)i); return 1; }
    }
  }
  std::printf("ok\n");
  return 0;
}
"""


def test_channel_walker_matches_division(tmp_path):
    """The CUDA bias_act kernel finds each element's bias channel by additions (ChannelWalker, in
    csrc/bias_act_math.h); check that against the division it replaces, on the CPU."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    csrc = Path(bias_act_module.__file__).parent / "csrc"
    (tmp_path / "walker.cpp").write_text(CHANNEL_WALKER_CHECK)
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{csrc}", str(tmp_path / "walker.cpp"), "-o", str(tmp_path / "walker")], check=True)
    result = subprocess.run([str(tmp_path / "walker")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout
