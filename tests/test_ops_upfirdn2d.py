"""upfirdn2d and its helpers: the reference against a naive computation, every impl against the
reference, and derivatives to second order."""
import pytest
import torch
import torch.nn.functional as F

from stylegan_ops import available_impls, build, downsample2d, filter2d, setup_filter, upfirdn2d, upsample2d

ALL = [("ref", "cpu"), ("cpu", "cpu"), ("cuda", "cuda")]


def _require(impl: str, device: str) -> torch.device:
    """Skip unless ``impl`` can run on ``device`` here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl not in available_impls(device):
        pytest.skip(f"impl {impl!r} is not available on {device} here (build failed or no compiler)")
    return torch.device(device)


def _naive_upfirdn2d(x, f, up=(1, 1), down=(1, 1), pad=(0, 0, 0, 0), flip_filter=False, gain=1.0):
    """The definition, step by step, with explicit indexing and one multiply-add per tap."""
    (ux, uy), (dx, dy), (px0, px1, py0, py1) = up, down, pad
    n, c, h, w = x.shape
    f = f.double() if f.ndim == 2 else torch.outer(f.double(), f.double())
    xu = torch.zeros(n, c, h * uy, w * ux, dtype=torch.float64)
    xu[:, :, ::uy, ::ux] = x.double()
    hp, wp = h * uy + py0 + py1, w * ux + px0 + px1
    xp = torch.zeros(n, c, hp, wp, dtype=torch.float64)
    for i in range(hp):
        for j in range(wp):
            si, sj = i - py0, j - px0
            if 0 <= si < h * uy and 0 <= sj < w * ux:
                xp[:, :, i, j] = xu[:, :, si, sj]
    fh, fw = f.shape
    # Convolution: y[i, j] = sum f[t, s] * xp[i + fh - 1 - t, j + fw - 1 - s]; correlation if flipped.
    oh, ow = hp - fh + 1, wp - fw + 1
    y = torch.zeros(n, c, oh, ow, dtype=torch.float64)
    for t in range(fh):
        for s in range(fw):
            ti, sj = (t, s) if flip_filter else (fh - 1 - t, fw - 1 - s)
            y += f[t, s] * xp[:, :, ti : ti + oh, sj : sj + ow]
    return (y * gain)[:, :, ::dy, ::dx]


CASES = [
    # up, down, padding, separable
    (1, 1, 0, False),
    (2, 1, [2, 1, 2, 1], False),
    (1, 2, [1, 1, 1, 1], True),
    (4, 1, [3, 2, 1, 4], True),
    (1, 4, [2, 1, 0, 3], False),
    (2, 2, [1, 2, 2, 1], False),
    ([2, 1], [1, 2], [1, 0, 0, 1], False),
    (2, 1, [-1, 2, 1, -2], False),  # crop on one side, pad on the other
    (1, 1, [-2, -1, -1, -3], True),
    (4, 2, [-3, 1, 2, -1], False),
]


def _case_args(up, down, padding):
    def pair(v):
        return tuple(v) if isinstance(v, list) else (v, v)

    pad = tuple(padding) if isinstance(padding, list) else (padding,) * 4
    return pair(up), pair(down), pad


def _filter(separable, taps=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    f = torch.rand([taps] if separable else [taps, taps - 1], generator=g) + 0.1  # non-square, asymmetric
    return f.to(dtype)


@pytest.mark.parametrize("flip_filter", [False, True])
@pytest.mark.parametrize("up,down,padding,separable", CASES)
def test_reference_matches_naive(up, down, padding, separable, flip_filter):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    f = _filter(separable)
    up_, down_, pad = _case_args(up, down, padding)
    want = _naive_upfirdn2d(x, f, up_, down_, pad, flip_filter, gain=1.7)
    got = upfirdn2d(x, f.double(), up=up, down=down, padding=padding, flip_filter=flip_filter, gain=1.7, impl="ref")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("up,down,padding,separable", CASES)
def test_impl_matches_reference_to_second_order(impl, device, up, down, padding, separable):
    dev = _require(impl, device)
    x = torch.randn(2, 3, 9, 10, device=dev, requires_grad=True)
    f = _filter(separable).to(dev)
    kw = dict(up=up, down=down, padding=padding, flip_filter=True, gain=0.8)

    def grads(impl_):
        y = upfirdn2d(x, f, impl=impl_, **kw)
        # upfirdn2d is linear: its gradient depends on the upstream gradient w alone, so the
        # second derivative (as R1 regularisation takes it) is the one with respect to w.
        w = torch.linspace(-1, 1, y.numel(), device=dev).reshape(y.shape).requires_grad_()
        (gx,) = torch.autograd.grad((y * w).sum(), x, create_graph=True)
        (ggw,) = torch.autograd.grad((gx**2).sum(), w)
        return y, gx, ggw

    for got, want in zip(grads(impl), grads("ref")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl,device", ALL)
@pytest.mark.parametrize("up,down,padding,separable", CASES[1:8:2])
def test_gradcheck_and_gradgradcheck(impl, device, up, down, padding, separable):
    dev = _require(impl, device)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, device=dev, requires_grad=True)
    f = _filter(separable, taps=3).to(dev)
    fn = lambda x: upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.3, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    # Fast mode (random projections of the Jacobian): the full one is minutes for upsampling cases.
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


TILING_CASES = [
    # up, down, padding, taps: more than one tile per plane, tiles cut by the image border, and
    # filters large enough that the tile shrinks to fit its buffer.
    (1, 1, [3, 2, 1, 2], 4),
    (2, 1, [2, 1, 2, 1], 4),
    (1, 2, [1, 1, 1, 1], 4),
    (4, 4, [5, 6, 6, 5], 12),
    (1, 4, [-3, 5, 2, 0], 12),
    ([3, 2], [2, 3], [-2, 4, 3, -1], 7),
    (1, 1, [15, 16, 16, 15], 32),
]


@pytest.mark.parametrize("max_tile,max_bytes", [(None, None), ("cuda", "cuda"), (1, 1 << 20), (3, 1 << 20), (64, 8192)])
@pytest.mark.parametrize("up,down,padding,taps", TILING_CASES)
def test_tile_algorithm_on_cpu(up, down, padding, taps, max_tile, max_bytes):
    """The CUDA kernel runs the same tile code (upfirdn2d_tile.h) as the CPU kernel: run that code
    here with the CUDA kernel's tile limits and with extreme ones, against the reference."""
    _require("cpu", "cpu")
    kernel = build("upfirdn2d", "cpu")
    tile = kernel.cuda_max_tile if max_tile == "cuda" else max_tile
    nbytes = kernel.cuda_max_buffer_bytes if max_bytes == "cuda" else max_bytes
    x = torch.randn(2, 3, 70, 45)
    g = torch.Generator().manual_seed(taps)
    f = torch.rand(taps, taps - 1, generator=g) if taps < 32 else torch.rand(taps, generator=g)
    up_, down_, pad = _case_args(up, down, padding)
    want = upfirdn2d(x, f, up=up, down=down, padding=padding, gain=1.5, impl="ref")
    args = (x, f, up_[0], up_[1], down_[0], down_[1], *pad, False, 1.5)
    got = kernel.upfirdn2d(*args) if tile is None else kernel.upfirdn2d(*args, max_tile=tile, max_buffer_bytes=nbytes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl,device", ALL)
def test_filters_beyond_the_kernel_limit_use_the_reference(impl, device):
    dev = _require(impl, device)
    x = torch.randn(1, 2, 40, 40, device=dev)
    for taps in (32, 33):
        f = torch.rand(taps, device=dev)
        want = _naive_upfirdn2d(x.cpu(), f.cpu(), pad=(taps // 2,) * 4).float().to(dev)
        torch.testing.assert_close(upfirdn2d(x, f, padding=taps // 2, impl=impl), want, rtol=1e-4, atol=1e-4)


def test_reference_filter_gradient():
    """The reference path is differentiable in the filter too (the kernels treat f as constant)."""
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    f = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: upfirdn2d(x, f, up=2, padding=1, impl="auto"), (f,), fast_mode=True)


@pytest.mark.parametrize("impl,device", ALL)
def test_upsample2d_is_zero_insertion_then_blur(impl, device):
    dev = _require(impl, device)
    x = torch.randn(2, 3, 4, 5, device=dev)
    f = setup_filter([1, 3, 3, 1], device=dev)
    y = upsample2d(x, f, impl=impl)
    assert y.shape == (2, 3, 8, 10)
    # Directly: zeros between samples, then a 'same' convolution with 4 * f (4: keeps the mean);
    # the 4-tap filter centred on an even grid pads 2 before and 1 after.
    z = torch.zeros(2, 3, 8, 10, device=dev)
    z[:, :, ::2, ::2] = x
    want = F.conv2d(F.pad(z, [2, 1, 2, 1]), (4 * f).flip([0, 1])[None, None].repeat(3, 1, 1, 1), groups=3)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # A constant image stays constant away from the border.
    ones = upsample2d(torch.ones(1, 1, 6, 6, device=dev), f, impl=impl)
    torch.testing.assert_close(ones[:, :, 2:-2, 2:-2], torch.ones(1, 1, 8, 8, device=dev))


@pytest.mark.parametrize("impl,device", ALL)
def test_downsample2d_is_blur_then_subsample(impl, device):
    dev = _require(impl, device)
    x = torch.randn(2, 3, 8, 6, device=dev)
    f = setup_filter([1, 3, 3, 1], device=dev)
    y = downsample2d(x, f, impl=impl)
    assert y.shape == (2, 3, 4, 3)
    want = F.conv2d(F.pad(x, [1, 1, 1, 1]), f.flip([0, 1])[None, None].repeat(3, 1, 1, 1), groups=3)[:, :, ::2, ::2]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert downsample2d(x, f, down=[2, 1], padding=[0, 1], impl=impl).shape == (2, 3, 10, 3)


@pytest.mark.parametrize("impl,device", ALL)
def test_filter2d_keeps_size_and_applies_filter(impl, device):
    dev = _require(impl, device)
    x = torch.randn(2, 3, 7, 6, device=dev)
    torch.testing.assert_close(filter2d(x, None, impl=impl), x)
    f = torch.rand(3, 4, device=dev)
    y = filter2d(x, f, impl=impl)
    assert y.shape == x.shape
    want = _naive_upfirdn2d(x.cpu(), f.cpu(), pad=(2, 1, 1, 1)).float().to(dev)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert filter2d(x, f, padding=[1, 2, 0, -1], impl=impl).shape == (2, 3, 6, 9)
    # Separable filter == its outer product.
    s = setup_filter([1, 2, 1], device=dev, separable=True)
    torch.testing.assert_close(filter2d(x, s, impl=impl), filter2d(x, torch.outer(s, s), impl=impl))


def test_setup_filter():
    f = setup_filter([1, 3, 3, 1])
    assert f.shape == (4, 4) and f.dtype == torch.float32
    torch.testing.assert_close(f.sum(), torch.tensor(1.0))
    torch.testing.assert_close(f, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)
    assert setup_filter([1] * 8).shape == (8,)  # long 1-D filters stay separable by default
    assert setup_filter([1, 2], separable=True).shape == (2,)
    torch.testing.assert_close(setup_filter([1, 3], gain=4, separable=True), torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(setup_filter([1, 3], gain=4, separable=False).sum(), torch.tensor(4.0))
    torch.testing.assert_close(setup_filter([[1, 2], [3, 4]], flip_filter=True, normalize=False), torch.tensor([[4.0, 3], [2, 1]]))
    assert setup_filter(None).shape == (1, 1)
    original = torch.tensor([1.0, 2.0, 1.0])
    setup_filter(original, separable=True)
    torch.testing.assert_close(original, torch.tensor([1.0, 2.0, 1.0]))  # not modified in place


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference_close_to_float32(dtype):
    x = torch.randn(2, 3, 8, 8)
    f = setup_filter([1, 3, 3, 1])
    want = upsample2d(x, f, impl="ref")
    try:
        got = upsample2d(x.to(dtype), f, impl="ref")
    except RuntimeError as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{dtype} conv2d not supported on this CPU build: {exc}")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cuda_close_to_float32(dtype):
    dev = _require("cuda", "cuda")
    x = torch.randn(2, 3, 16, 16, device=dev)
    f = setup_filter([1, 3, 3, 1], device=dev)
    for op in (upsample2d, downsample2d, filter2d):
        want = op(x, f, impl="ref")
        got = op(x.to(dtype), f, impl="cuda")
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_channels_last_and_noncontiguous_inputs():
    for impl, device in ALL:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        if impl not in available_impls(device):
            continue
        x = torch.randn(2, 3, 6, 5, device=device)
        f = setup_filter([1, 2, 1], device=device)
        want = upsample2d(x, f, impl="ref")
        torch.testing.assert_close(upsample2d(x.to(memory_format=torch.channels_last), f, impl=impl), want)
        torch.testing.assert_close(upsample2d(x.transpose(2, 3).contiguous().transpose(2, 3), f, impl=impl), want)


def test_invalid_arguments():
    x = torch.randn(1, 2, 4, 4)
    f = setup_filter([1, 3, 3, 1])
    with pytest.raises(ValueError, match="4-D"):
        upfirdn2d(x[0], f)
    with pytest.raises(ValueError, match="padding"):
        upfirdn2d(x, f, padding=[1, 2, 3])
    with pytest.raises(ValueError, match="up"):
        upfirdn2d(x, f, up=0)
    with pytest.raises(ValueError, match="smaller than"):
        upfirdn2d(x, f, padding=-1)
    with pytest.raises(ValueError, match="impl"):
        upfirdn2d(x, f, impl="fast")
    with pytest.raises(ValueError, match="f must"):
        upfirdn2d(x, torch.ones(1, 1, 1))
