"""Checkpoint formats: NVlabs pickles (read without executing them), rosinality .pt,
NVlabs state-dict safetensors, our safetensors format, and every kind of bad input.

The NVlabs pickles used here are built by `_NvlabsPickler` below: it writes the byte
stream that stylegan2-ada-pytorch's `training_loop` writes (`pickle.dump` of
`{training_set_kwargs, G, D, G_ema, augment_pipe}`, every network reduced through
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, tensors as torch pickles
them), from the weights of the NVlabs test vector, without any NVlabs code.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import re
import types
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from handsoff.errors import CheckpointError, HandsoffError
from handsoff.gan import checkpoints as ckpt
from handsoff.gan.config import GeneratorConfig

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "stylegan"
NVLABS_ST = VECTORS / "nvlabs_sg2ada_64_G_ema.safetensors"
NVLABS_NPZ = VECTORS / "nvlabs_sg2ada_64_expected.npz"
ROSINALITY_PT = VECTORS / "rosinality_64.pt"
ROSINALITY_NPZ = VECTORS / "rosinality_64_expected.npz"
TOL = 1e-3

needs_nvlabs = pytest.mark.skipif(not (NVLABS_ST.exists() and NVLABS_NPZ.exists()),
                                  reason=f"NVlabs test vectors not found under {VECTORS}")
needs_rosinality = pytest.mark.skipif(not (ROSINALITY_PT.exists() and ROSINALITY_NPZ.exists()),
                                      reason=f"rosinality test vectors not found under {VECTORS}")


# ============================================================================ fake NVlabs pickles
def _stub(module: str, name: str) -> Callable[..., Any]:
    """A function that pickles as the global ``module.name`` (it must never be called)."""
    def stub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"stub for {module}.{name} called")
    stub.__qualname__ = stub.__name__ = name
    return stub


class _EasyDict(dict):
    """Pickles as ``dnnlib.util.EasyDict``."""


class _TFNetwork:
    """Pickles as ``dnnlib.tflib.network.Network`` with the state a TF-era network saves."""

    def __init__(self, name: str, static_kwargs: Dict[str, Any], components: Dict[str, "_TFNetwork"],
                 variables: Dict[str, np.ndarray]) -> None:
        self.state = dict(version=4, name=name, static_kwargs=static_kwargs, components=components,
                          build_module_src=FAKE_MODULE_SRC, build_func_name="G_main",
                          variables=list(variables.items()))

    def __getstate__(self) -> Dict[str, Any]:
        return self.state


_RECONSTRUCT = _stub("torch_utils.persistence", "_reconstruct_persistent_obj")
_NUMPY1_SCALAR = _stub("numpy.core.multiarray", "scalar")
_NUMPY1_ARRAY = _stub("numpy.core.multiarray", "_reconstruct")
_FAKE_GLOBALS: Dict[Any, Tuple[str, str]] = {
    _RECONSTRUCT: ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    _NUMPY1_SCALAR: ("numpy.core.multiarray", "scalar"),
    _NUMPY1_ARRAY: ("numpy.core.multiarray", "_reconstruct"),
    _EasyDict: ("dnnlib.util", "EasyDict"),
    _TFNetwork: ("dnnlib.tflib.network", "Network"),
}
FAKE_MODULE_SRC = "import os\nos.system('echo module_src was executed')\n"


class _NvlabsPickler(pickle._Pickler):  # the pure-Python pickler lets us name globals
    """Pickles `nn.Module`s the way NVlabs' ``persistence`` decorator does and stub
    functions/classes under their NVlabs names; everything else (tensors, numpy) as usual.

    The persisted class name is the module's Python class name (see `_module_class`).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, protocol: int, numpy1_names: bool = False) -> None:
        super().__init__(file, protocol=protocol)
        self.numpy1_names = numpy1_names

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, nn.Module):
            meta = dict(type="class", version=6, module_src=FAKE_MODULE_SRC,
                        class_name=type(obj).__name__, state=obj.__dict__)
            return _RECONSTRUCT, (meta,)
        if self.numpy1_names and isinstance(obj, np.generic):
            return _NUMPY1_SCALAR, (obj.dtype, obj.tobytes())
        if self.numpy1_names and type(obj) is np.ndarray:
            _, args, state = obj.__reduce__()
            return _NUMPY1_ARRAY, args, state
        return NotImplemented

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        fake = _FAKE_GLOBALS.get(obj) if isinstance(obj, (types.FunctionType, type)) else None
        if fake is None:
            return super().save_global(obj, name)
        module, qualname = fake
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)

    def save_type(self, obj: type) -> None:
        if obj in _FAKE_GLOBALS:
            return self.save_global(obj)
        return super().save_type(obj)

    dispatch[types.FunctionType] = save_global
    dispatch[type] = save_type


def nvlabs_pickle_bytes(obj: Any, protocol: int = 4, numpy1_names: bool = False) -> bytes:
    buf = io.BytesIO()
    _NvlabsPickler(buf, protocol, numpy1_names).dump(obj)
    return buf.getvalue()


_MODULE_CLASSES: Dict[str, type] = {}
_BUFFERS = ("w_avg", "resample_filter", "noise_const", "p")


def _module_class(name: str) -> type:
    """An empty nn.Module subclass called ``name`` (the persisted class name)."""
    if name not in _MODULE_CLASSES:
        _MODULE_CLASSES[name] = type(name, (nn.Module,), {})
    return _MODULE_CLASSES[name]


def _generator_class(path: str) -> str:
    rules = [(r"", "Generator"), (r"mapping", "MappingNetwork"), (r"synthesis", "SynthesisNetwork"),
             (r"synthesis\.b\d+", "SynthesisBlock"), (r"synthesis\.b\d+\.conv[01]", "SynthesisLayer"),
             (r"synthesis\.b\d+\.torgb", "ToRGBLayer"), (r".*input", "SynthesisInput")]
    return next((cls for pattern, cls in rules if re.fullmatch(pattern, path)), "FullyConnectedLayer")


def _discriminator_class(path: str) -> str:
    rules = [(r"", "Discriminator"), (r"b4", "DiscriminatorEpilogue"), (r"b\d+", "DiscriminatorBlock"),
             (r".*mbstd", "MinibatchStdLayer"), (r".*(fc|out)", "FullyConnectedLayer")]
    return next((cls for pattern, cls in rules if re.fullmatch(pattern, path)), "Conv2dLayer")


def build_module_tree(state: Dict[str, torch.Tensor], class_of: Callable[[str], str],
                      attributes: Optional[Dict[str, Any]] = None) -> nn.Module:
    """nn.Modules named like NVlabs' classes holding ``state`` as parameters/buffers,
    frozen and in eval mode as in an NVlabs snapshot."""
    root = _module_class(class_of(""))()
    for key, tensor in state.items():
        *parents, leaf = key.split(".")
        module, path = root, ""
        for part in parents:
            path = f"{path}.{part}" if path else part
            if part not in module._modules:
                module.add_module(part, _module_class(class_of(path))())
            module = module._modules[part]
        if leaf in _BUFFERS:
            module.register_buffer(leaf, tensor.clone())
        else:
            module.register_parameter(leaf, nn.Parameter(tensor.clone(), requires_grad=False))
    for name, value in (attributes or {}).items():
        setattr(root, name, value)
    return root.eval()


def nvlabs_init_kwargs_for_pickle(init_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The Generator's ``_init_kwargs`` as NVlabs' train.py leaves them: EasyDicts inside,
    and (as files carry now and then) a numpy integer where Python expects an int."""
    kwargs = dict(init_kwargs)
    kwargs["mapping_kwargs"] = _EasyDict(kwargs.get("mapping_kwargs", {}))
    kwargs["synthesis_kwargs"] = _EasyDict(kwargs.get("synthesis_kwargs", {}))
    kwargs["img_channels"] = np.int64(kwargs["img_channels"])
    return kwargs


def fake_discriminator() -> nn.Module:
    g = torch.Generator().manual_seed(1)
    state = {"b8.fromrgb.weight": torch.randn(8, 3, 1, 1, generator=g), "b8.fromrgb.bias": torch.zeros(8),
             "b8.conv0.weight": torch.randn(8, 8, 3, 3, generator=g), "b8.conv0.resample_filter": torch.ones(4, 4),
             "b4.fc.weight": torch.randn(8, 128, generator=g), "b4.out.weight": torch.randn(1, 8, generator=g)}
    return build_module_tree(state, _discriminator_class, {"_init_kwargs": _EasyDict(c_dim=0, img_resolution=8)})


def fake_augment_pipe() -> nn.Module:
    pipe = build_module_tree({"p": torch.tensor(0.25)}, lambda path: "AugmentPipe",
                             {"xflip": np.float64(1.0), "brightness_std": 0.2})
    return pipe


def nvlabs_snapshot(g_ema_state: Dict[str, torch.Tensor], init_kwargs: Dict[str, Any],
                    g_state: Optional[Dict[str, torch.Tensor]] = None,
                    class_of: Callable[[str], str] = _generator_class) -> Dict[str, Any]:
    """The dict stylegan2-ada-pytorch's training loop pickles into network-snapshot-*.pkl."""
    attributes = {"_init_args": (), "_init_kwargs": nvlabs_init_kwargs_for_pickle(init_kwargs),
                  "z_dim": init_kwargs["z_dim"], "c_dim": init_kwargs["c_dim"], "w_dim": init_kwargs["w_dim"]}
    return {
        "training_set_kwargs": dict(class_name="training.dataset.ImageFolderDataset", path="/data/faces64.zip",
                                    use_labels=False, max_size=np.int64(70000), xflip=False, resolution=64),
        "G": build_module_tree(g_state if g_state is not None else g_ema_state, class_of, attributes),
        "D": fake_discriminator(),
        "G_ema": build_module_tree(g_ema_state, class_of, attributes),
        "augment_pipe": fake_augment_pipe(),
    }


# ============================================================================ fixtures
def _read_nvlabs_vector() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(NVLABS_ST), "pt") as f:
        init_kwargs = json.loads(f.metadata()["init_kwargs"])
    return load_file(str(NVLABS_ST)), init_kwargs


def _perturbed(state: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def nvlabs_vector() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if not (NVLABS_ST.exists() and NVLABS_NPZ.exists()):
        pytest.skip(f"NVlabs test vectors not found under {VECTORS}")
    return _read_nvlabs_vector()


@pytest.fixture(scope="module")
def nvlabs_pkl(nvlabs_vector, tmp_path_factory) -> Path:
    """A fake network-snapshot .pkl: G_ema = the test vector, G = a perturbed copy."""
    state, init_kwargs = nvlabs_vector
    path = tmp_path_factory.mktemp("pkl") / "network-snapshot-000100.pkl"
    path.write_bytes(nvlabs_pickle_bytes(nvlabs_snapshot(state, init_kwargs, g_state=_perturbed(state, 7))))
    return path


@pytest.fixture(scope="module")
def pkl_generator(nvlabs_pkl: Path) -> nn.Module:
    return ckpt.load_generator(nvlabs_pkl)


def _run(G: nn.Module, z: np.ndarray, psi: float) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ws = G.mapping(torch.from_numpy(z), None, truncation_psi=psi)
        return ws, G.synthesis(ws, noise_mode="const", force_fp32=True)


def _max_err(a: torch.Tensor, b: np.ndarray) -> float:
    return float((a - torch.from_numpy(b)).abs().max())


def _assert_one_line_error(exc: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(exc.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ============================================================================ errors
def test_checkpoint_error_is_one_line_and_names_the_file() -> None:
    err = CheckpointError("checkpoints/x.pkl", "truncated file (pickle data ended early)")
    assert str(err) == "checkpoints/x.pkl: truncated file (pickle data ended early)"
    assert isinstance(err, HandsoffError)
    assert str(CheckpointError(Path("a.pt"), "two\nlines")) == "a.pt: two lines"
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.path == "checkpoints/x.pkl"


# ============================================================================ NVlabs pickles
@needs_nvlabs
def test_fake_pickle_has_the_nvlabs_byte_layout(nvlabs_pkl: Path) -> None:
    from handsoff.gan.safe_pickle import RestrictedUnpickler

    globals_seen = set()

    class Recording(RestrictedUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            globals_seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(nvlabs_pkl, "rb") as f:
        Recording(f).load()
    assert {"torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes", "collections.OrderedDict",
            "dnnlib.util.EasyDict", "numpy._core.multiarray.scalar", "numpy.dtype"} <= globals_seen
    assert ckpt.detect_format(nvlabs_pkl) == "nvlabs-pkl"


@needs_nvlabs
def test_nvlabs_pkl_reproduces_the_nvlabs_test_vectors(pkl_generator: nn.Module) -> None:
    expected = np.load(NVLABS_NPZ)
    G = pkl_generator
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    with torch.no_grad():
        ws1 = G.mapping(torch.from_numpy(expected["z"]), None, truncation_psi=1.0)
    ws, img = _run(G, expected["z"], 0.7)
    assert _max_err(ws1, expected["ws_psi1"]) <= TOL
    assert _max_err(ws, expected["ws_psi07"]) <= TOL
    assert _max_err(img, expected["img_psi07_noiseconst"]) <= TOL


@needs_nvlabs
def test_nvlabs_pkl_selects_G_or_G_ema(nvlabs_pkl: Path, nvlabs_vector) -> None:
    state, _ = nvlabs_vector
    config, g_ema, fmt = ckpt.load_generator_state(nvlabs_pkl)
    _, g, _ = ckpt.load_generator_state(nvlabs_pkl, which="G")
    assert fmt == "nvlabs-pkl" and config.img_resolution == 64 and config.channels(64) == 64
    assert set(g_ema) == set(state)
    assert all(torch.equal(g_ema[k], state[k]) for k in state)
    assert all(torch.equal(g[k], v) for k, v in _perturbed(state, 7).items())
    with pytest.raises(ValueError, match="which"):
        ckpt.load_generator_state(nvlabs_pkl, which="D")


@needs_nvlabs
@pytest.mark.parametrize("protocol,numpy1_names", [(2, True), (3, False), (5, True)])
def test_nvlabs_pkl_other_protocols_and_numpy1_names(nvlabs_vector, tmp_path: Path, protocol: int,
                                                     numpy1_names: bool) -> None:
    state, init_kwargs = nvlabs_vector
    path = tmp_path / "net.pkl"
    path.write_bytes(nvlabs_pickle_bytes(nvlabs_snapshot(state, init_kwargs), protocol, numpy1_names))
    _, loaded, fmt = ckpt.load_generator_state(path)
    assert fmt == "nvlabs-pkl"
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@needs_nvlabs
def test_nvlabs_pkl_missing_network_and_wrong_classes(nvlabs_vector, tmp_path: Path) -> None:
    state, init_kwargs = nvlabs_vector
    snapshot = nvlabs_snapshot(state, init_kwargs)
    cases = {
        "no_g_ema.pkl": ({k: v for k, v in snapshot.items() if k != "G_ema"}, "no 'G_ema' network"),
        "d_as_g.pkl": ({**snapshot, "G_ema": snapshot["D"]}, "'Discriminator', not a Generator"),
        "int_as_g.pkl": ({**snapshot, "G_ema": 3}, "'G_ema' is not an NVlabs network (found a int)"),
    }
    for name, (obj, fragment) in cases.items():
        path = tmp_path / name
        path.write_bytes(nvlabs_pickle_bytes(obj))
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator(path)
        _assert_one_line_error(exc, path, fragment)


@needs_nvlabs
def test_stylegan3_pickles_are_refused(nvlabs_vector, tmp_path: Path) -> None:
    state, init_kwargs = nvlabs_vector
    sg3_state = {"synthesis.input.affine.weight": torch.zeros(4, 512), "synthesis.L0_36_512.weight": torch.zeros(1),
                 "mapping.fc0.weight": state["mapping.fc0.weight"]}
    sg3_kwargs = {**init_kwargs, "conv_kernel": 1, "use_radial_filters": True}
    path = tmp_path / "stylegan3-r-ffhq.pkl"
    path.write_bytes(nvlabs_pickle_bytes(nvlabs_snapshot(sg3_state, sg3_kwargs)))
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator_state(path)
    _assert_one_line_error(exc, path, "StyleGAN3", "stylegan3-r")


# ============================================================================ malicious pickles
class _Exploit:
    """Pickles as a call of ``func(*args)``, like a hostile checkpoint would."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Tuple[Any, ...]:
        return self.func, self.args


def _exploits(marker: Path) -> Dict[str, _Exploit]:
    import builtins
    import subprocess

    command = f"touch {marker}"
    return {
        "os.system": _Exploit(os.system, command),
        "builtins.eval": _Exploit(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "builtins.exec": _Exploit(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Exploit(subprocess.Popen, ["touch", str(marker)]),
        "builtins.__import__": _Exploit(__import__, "antigravity"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                                  "builtins.__import__"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_before_anything_runs(tmp_path: Path, kind: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": _exploits(marker)[kind]}, protocol=protocol))
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator(path)
    _assert_one_line_error(exc, path, "refuses to load global", "never executes code")
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        ckpt.checkpoint_info(path)
    assert not marker.exists()


@needs_nvlabs
def test_malicious_global_inside_a_real_looking_snapshot(nvlabs_vector, tmp_path: Path) -> None:
    state, init_kwargs = nvlabs_vector
    marker = tmp_path / "pwned"
    snapshot = nvlabs_snapshot(state, init_kwargs)
    snapshot["augment_pipe"].evil = _Exploit(os.system, f"touch {marker}")
    path = tmp_path / "trojan.pkl"
    path.write_bytes(nvlabs_pickle_bytes(snapshot))
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator_state(path)
    _assert_one_line_error(exc, path, f"refuses to load global '{os.system.__module__}.system'")
    assert not marker.exists()


def test_malicious_torch_save_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": _Exploit(os.system, f"touch {marker}")}, path)
    assert ckpt.detect_format(path) == "rosinality-pt"
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator(path)
    _assert_one_line_error(exc, path, "refuses to load global", "system")
    assert not marker.exists()


def test_module_src_in_a_pickle_is_never_executed(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from handsoff.gan.safe_pickle import PersistentRecord, loads

    module = build_module_tree({"w": torch.ones(2)}, lambda path: "Generator")
    record = loads(nvlabs_pickle_bytes({"G_ema": module}))["G_ema"]
    assert isinstance(record, PersistentRecord) and record.class_name == "Generator"
    assert "module_src was executed" not in capfd.readouterr().out


# ============================================================================ other bad input
def test_missing_path_directory_and_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    cases = {tmp_path / "nope.pkl": "no such file", tmp_path: "is a directory", empty: "empty file"}
    for path, fragment in cases.items():
        for call in (ckpt.detect_format, ckpt.load_generator, ckpt.checkpoint_info):
            with pytest.raises(CheckpointError) as exc:
                call(path)
            _assert_one_line_error(exc, path, fragment)


@pytest.mark.parametrize("obj,fragment", [({"a": 1, "b": 2}, "no 'G_ema' network"),
                                          ([1, 2, 3], "pickle holds a list, not an NVlabs network snapshot"),
                                          (collections.OrderedDict(G_ema={"x": 1}), "'G_ema' is not an NVlabs network (found a dict)")])
def test_pickle_of_another_kind(tmp_path: Path, obj: Any, fragment: str) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator_state(path)
    _assert_one_line_error(exc, path, fragment)


@needs_nvlabs
def test_truncated_pickle(nvlabs_pkl: Path, tmp_path: Path) -> None:
    data = nvlabs_pkl.read_bytes()
    for fraction in (0.001, 0.5, 0.999):
        path = tmp_path / f"cut{fraction}.pkl"
        path.write_bytes(data[:int(len(data) * fraction)])
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator_state(path)
        _assert_one_line_error(exc, path, "truncated file")


def test_unrecognised_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pkl"
    path.write_text("hello, I am not a network\n")
    with pytest.raises(CheckpointError) as exc:
        ckpt.detect_format(path)
    _assert_one_line_error(exc, path, "unrecognised file format")


# ============================================================================ rosinality
@needs_rosinality
def test_rosinality_reproduces_its_test_vector() -> None:
    expected = np.load(ROSINALITY_NPZ)
    assert ckpt.detect_format(ROSINALITY_PT) == "rosinality-pt"
    G = ckpt.load_generator(ROSINALITY_PT)
    assert dict((r, G.config.channels(r)) for r in (4, 8, 16, 32, 64)) == {4: 128, 8: 128, 16: 128, 32: 96, 64: 64}
    assert G.config.mapping_layers == 8 and G.config.conv_clamp is None
    assert torch.equal(G.mapping.w_avg, torch.from_numpy(expected["latent_avg"]).reshape(-1))
    _, img = _run(G, expected["z"], 0.7)
    assert _max_err(img, expected["img"]) <= TOL


@needs_rosinality
def test_rosinality_without_latent_avg_and_bad_variants(tmp_path: Path) -> None:
    data = torch.load(ROSINALITY_PT, weights_only=True)
    g_ema, latent_avg = data["g_ema"], data["latent_avg"]

    no_avg = tmp_path / "no_avg.pt"
    torch.save({"g_ema": g_ema}, no_avg)
    with pytest.warns(UserWarning, match="latent_avg"):
        _, state, _ = ckpt.load_generator_state(no_avg)
    assert state["mapping.w_avg"].shape == (512,) and state["mapping.w_avg"].abs().sum() > 0

    cases = {
        "missing.pt": ({"g_ema": {k: v for k, v in g_ema.items() if k != "convs.3.activate.bias"},
                        "latent_avg": latent_avg}, "lacks keys 'convs.3.activate.bias'"),
        "extra.pt": ({"g_ema": {**g_ema, "convs.3.surprise": torch.zeros(1)}, "latent_avg": latent_avg},
                     "unexpected keys 'convs.3.surprise'"),
        "shape.pt": ({"g_ema": {**g_ema, "convs.1.activate.bias": torch.zeros(7)}, "latent_avg": latent_avg},
                     "synthesis.b8.conv1.bias (7,) (expected (128,))"),
        "list.pt": ([1, 2], "holds a list"),
        "other_dict.pt": ({"model": g_ema}, "no 'g_ema' generator"),
    }
    for name, (obj, fragment) in cases.items():
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator_state(path)
        _assert_one_line_error(exc, path, fragment)
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator_state(ROSINALITY_PT, which="G")
    _assert_one_line_error(exc, ROSINALITY_PT, "no 'g' generator")


@needs_rosinality
def test_rosinality_g_selection_and_truncated_zip(tmp_path: Path) -> None:
    data = torch.load(ROSINALITY_PT, weights_only=True)
    g = {k: v * 2 for k, v in data["g_ema"].items()}
    path = tmp_path / "both.pt"  # the layout of rosinality's training checkpoints
    torch.save({"g": g, "d": {"convs.0.0.weight": torch.zeros(1)}, "g_ema": data["g_ema"],
                "latent_avg": data["latent_avg"], "args": argparse.Namespace(size=64, n_mlp=8)}, path)
    _, state_g, _ = ckpt.load_generator_state(path, which="G")
    _, state_ema, _ = ckpt.load_generator_state(path)
    assert torch.equal(state_g["synthesis.b4.const"], 2 * state_ema["synthesis.b4.const"])
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator_state(cut)
    _assert_one_line_error(exc, cut, "truncated or corrupt")


# ============================================================================ safetensors
@needs_nvlabs
def test_nvlabs_state_safetensors_loads_the_test_vector(nvlabs_vector) -> None:
    """The file's own tensors, unchanged (the image check runs on the .pkl made from them)."""
    state, _ = nvlabs_vector
    expected = np.load(NVLABS_NPZ)
    assert ckpt.detect_format(NVLABS_ST) == "nvlabs-state-safetensors"
    G = ckpt.load_generator(NVLABS_ST)
    loaded = G.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        ws = G.mapping(torch.from_numpy(expected["z"]), None, truncation_psi=0.7)
    assert _max_err(ws, expected["ws_psi07"]) <= TOL
    with pytest.raises(CheckpointError) as exc:
        ckpt.load_generator(NVLABS_ST, which="G")
    _assert_one_line_error(exc, NVLABS_ST, "single generator")


@needs_nvlabs
def test_save_load_round_trip_is_bitwise(pkl_generator: nn.Module, tmp_path: Path) -> None:
    G = pkl_generator
    out = tmp_path / "models" / "g.safetensors"
    ckpt.save_generator(G, out, extra_metadata={"source": "unit test", "seeds": [1, 2]})
    assert [p.name for p in out.parent.iterdir()] == ["g.safetensors"]  # no temporary left behind
    assert ckpt.detect_format(out) == "handsoff-safetensors"
    G2 = ckpt.load_generator(out)
    assert G2.config == G.config
    a, b = G.state_dict(), G2.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "handsoff.generator" and meta["format_version"] == "1"
    assert GeneratorConfig.from_dict(json.loads(meta["config"])) == G.config
    assert meta["source"] == "unit test" and json.loads(meta["seeds"]) == [1, 2]
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save_generator(G, out, extra_metadata={"config": "{}"})


@needs_rosinality
def test_save_keeps_an_explicit_channel_table(tmp_path: Path) -> None:
    G = ckpt.load_generator(ROSINALITY_PT)
    out = tmp_path / "r.safetensors"
    ckpt.save_generator(G, out)
    info = ckpt.checkpoint_info(out)
    assert info["channels"] == {4: 128, 8: 128, 16: 128, 32: 96, 64: 64}
    assert ckpt.load_generator(out).config == G.config


def _write_handsoff_file(path: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@needs_nvlabs
def test_bad_safetensors_files(nvlabs_vector, tmp_path: Path) -> None:
    state, init_kwargs = nvlabs_vector
    config = GeneratorConfig.from_nvlabs_init_kwargs(init_kwargs)
    good_meta = {"format": "handsoff.generator", "format_version": "1", "config": json.dumps(config.to_dict())}
    bad_config = dict(config.to_dict(), config_version=99)
    wrong_shape = dict(state, **{"synthesis.b8.conv0.weight": torch.zeros(3, 3, 3, 3)})
    cases = {
        "version.safetensors": (state, dict(good_meta, format_version="2"), "unsupported handsoff.generator format_version '2'"),
        "config_version.safetensors": (state, dict(good_meta, config=json.dumps(bad_config)), "bad generator config"),
        "config_json.safetensors": (state, dict(good_meta, config="{not json"), "not valid JSON"),
        "unknown.safetensors": (state, {"format": "someone.else"}, "unknown safetensors format 'someone.else'"),
        "bare.safetensors": (state, {}, "without generator metadata"),
        "missing.safetensors": ({k: v for k, v in state.items() if not k.startswith("synthesis.b64.torgb")},
                                good_meta, "missing tensors 'synthesis.b64.torgb"),
        "extra.safetensors": (dict(state, **{"synthesis.b64.extra": torch.zeros(1)}), good_meta,
                              "unexpected tensors 'synthesis.b64.extra'"),
        "shape.safetensors": (wrong_shape, good_meta, "wrong tensor shapes: synthesis.b8.conv0.weight (3, 3, 3, 3)"),
        "nvlabs_kwargs.safetensors": (state, {"init_kwargs": json.dumps({**init_kwargs, "img_resolution": 48})},
                                      "unsupported generator settings"),
    }
    for name, (tensors, metadata, fragment) in cases.items():
        path = _write_handsoff_file(tmp_path / name, tensors, metadata)
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator(path)
        _assert_one_line_error(exc, path, fragment)

    whole = _write_handsoff_file(tmp_path / "whole.safetensors", state, good_meta)
    for cut_at, fragment in ((whole.stat().st_size - 100, "tensor data ended early"), (200, "header ended early")):
        cut = tmp_path / f"cut{cut_at}.safetensors"
        cut.write_bytes(whole.read_bytes()[:cut_at])
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator(cut)
        _assert_one_line_error(exc, cut, "truncated file", fragment)


# ============================================================================ checkpoint_info
@needs_nvlabs
def test_checkpoint_info(nvlabs_pkl: Path, pkl_generator: nn.Module) -> None:
    import hashlib

    info = ckpt.checkpoint_info(nvlabs_pkl)
    assert info["format"] == "nvlabs-pkl"
    assert (info["resolution"], info["num_ws"], info["z_dim"], info["w_dim"]) == (64, 10, 512, 512)
    assert info["channels"] == {4: 128, 8: 128, 16: 128, 32: 128, 64: 64}
    assert info["sha256"] == hashlib.sha256(nvlabs_pkl.read_bytes()).hexdigest()
    G = pkl_generator
    assert info["num_params"] == sum(p.numel() for p in G.parameters())
    assert GeneratorConfig.from_dict(info["config"]) == G.config
    json.dumps(info)  # plain data only


# ============================================================================ TF-era pickles
def _tf_layer(prefix: str, state: Dict[str, torch.Tensor], flip: bool) -> Dict[str, np.ndarray]:
    """The TF variables of one NVlabs layer (the inverse of the converter's layout changes)."""
    weight = state[f"{prefix}.weight"].numpy().transpose(2, 3, 1, 0)
    out = {"weight": weight[::-1, ::-1] if flip else weight, "bias": state[f"{prefix}.bias"].numpy(),
           "mod_weight": state[f"{prefix}.affine.weight"].numpy().T,
           "mod_bias": state[f"{prefix}.affine.bias"].numpy() - 1}
    if f"{prefix}.noise_strength" in state:
        out["noise_strength"] = state[f"{prefix}.noise_strength"].numpy()
    return out


def tf_generator_variables(state: Dict[str, torch.Tensor], resolution: int) -> Dict[str, Dict[str, np.ndarray]]:
    """``{'G': ..., 'mapping': ..., 'synthesis': ...}`` variables of a TF StyleGAN2 G."""
    mapping = {}
    for i in range(8):
        mapping[f"Dense{i}/weight"] = state[f"mapping.fc{i}.weight"].numpy().T
        mapping[f"Dense{i}/bias"] = state[f"mapping.fc{i}.bias"].numpy()
    synthesis = {"lod": np.float32(0), "4x4/Const/const": state["synthesis.b4.const"].numpy()[None]}
    layers = {"4x4/Conv": ("synthesis.b4.conv1", False, 0), "4x4/ToRGB": ("synthesis.b4.torgb", False, None)}
    res, log2 = 8, 3
    while res <= resolution:
        layers[f"{res}x{res}/Conv0_up"] = (f"synthesis.b{res}.conv0", True, 2 * log2 - 5)
        layers[f"{res}x{res}/Conv1"] = (f"synthesis.b{res}.conv1", False, 2 * log2 - 4)
        layers[f"{res}x{res}/ToRGB"] = (f"synthesis.b{res}.torgb", False, None)
        res, log2 = res * 2, log2 + 1
    for scope, (prefix, flip, noise) in layers.items():
        synthesis.update({f"{scope}/{k}": v for k, v in _tf_layer(prefix, state, flip).items()})
        if noise is not None:
            synthesis[f"noise{noise}"] = state[f"{prefix}.noise_const"].numpy()[None, None]
    return {"G": {"dlatent_avg": state["mapping.w_avg"].numpy()}, "mapping": mapping, "synthesis": synthesis}


def tf_generator(state: Dict[str, torch.Tensor], init_kwargs: Dict[str, Any]) -> _TFNetwork:
    synthesis_kwargs = init_kwargs["synthesis_kwargs"]
    static_kwargs = dict(num_channels=3, resolution=init_kwargs["img_resolution"], label_size=0,
                         fmap_base=synthesis_kwargs["channel_base"] // 2, fmap_max=synthesis_kwargs["channel_max"],
                         conv_clamp=synthesis_kwargs["conv_clamp"], num_fp16_res=synthesis_kwargs["num_fp16_res"],
                         architecture="skip", truncation_psi=0.5)
    variables = tf_generator_variables(state, init_kwargs["img_resolution"])
    components = {name: _TFNetwork(f"G_{name}", static_kwargs, {}, variables[name])
                  for name in ("mapping", "synthesis")}
    return _TFNetwork("G", static_kwargs, components, variables["G"])


@pytest.fixture(scope="module")
def tf_pkl(nvlabs_vector, tmp_path_factory) -> Path:
    """A TF-era ``(G, D, Gs)`` pickle (protocol 3, numpy-1 names) of the NVlabs test vector."""
    state, init_kwargs = nvlabs_vector
    D = _TFNetwork("D", {"resolution": 64}, {}, {"4x4/Dense0/weight": np.zeros((4, 4), np.float32)})
    data = (tf_generator(_perturbed(state, 3), init_kwargs), D, tf_generator(state, init_kwargs))
    path = tmp_path_factory.mktemp("tf") / "stylegan2-tf.pkl"
    path.write_bytes(nvlabs_pickle_bytes(data, protocol=3, numpy1_names=True))
    return path


@needs_nvlabs
def test_tf_pickle_converts_to_the_nvlabs_network(tf_pkl: Path, nvlabs_vector) -> None:
    """Self-consistency: the fake TF pickle is built by inverting the documented layout
    changes, so this checks the reading and plumbing, not the TF conventions themselves.
    The converted tensors equal the NVlabs test vector's, so the images would too."""
    state, init_kwargs = nvlabs_vector
    assert ckpt.detect_format(tf_pkl) == "nvlabs-tf-pkl"
    config, loaded, _ = ckpt.load_generator_state(tf_pkl)
    assert config == GeneratorConfig.from_nvlabs_init_kwargs(init_kwargs)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    _, g, _ = ckpt.load_generator_state(tf_pkl, which="G")
    assert torch.equal(g["mapping.fc0.bias"], _perturbed(state, 3)["mapping.fc0.bias"])


@needs_nvlabs
def test_tf_pickle_problems(nvlabs_vector, tmp_path: Path) -> None:
    state, init_kwargs = nvlabs_vector
    orig = tf_generator(state, init_kwargs)
    orig.state["static_kwargs"] = dict(orig.state["static_kwargs"], architecture="resnet")
    lacking = tf_generator(state, init_kwargs)
    synthesis = lacking.state["components"]["synthesis"]
    synthesis.state["variables"] = [(k, v) for k, v in synthesis.state["variables"] if k != "noise3"]
    cases = {"resnet.pkl": ((orig, orig, orig), "architecture='resnet' is not supported"),
             "lacking.pkl": ((lacking, lacking, lacking), "lacks variables 'synthesis/noise3'"),
             "pair.pkl": ((orig, orig), "expected a tuple (G, D, Gs)")}
    for name, (data, fragment) in cases.items():
        path = tmp_path / name
        path.write_bytes(nvlabs_pickle_bytes(data, protocol=4))
        with pytest.raises(CheckpointError) as exc:
            ckpt.load_generator_state(path)
        _assert_one_line_error(exc, path, fragment)


# ============================================================================ detection by content
@needs_nvlabs
@needs_rosinality
def test_format_is_detected_by_content_not_name(nvlabs_pkl: Path, tmp_path: Path) -> None:
    renamed = {"snapshot.safetensors": (nvlabs_pkl, "nvlabs-pkl"), "weights.pkl": (ROSINALITY_PT, "rosinality-pt"),
               "model.pt": (NVLABS_ST, "nvlabs-state-safetensors")}
    for name, (source, fmt) in renamed.items():
        path = tmp_path / name
        path.write_bytes(source.read_bytes())
        assert ckpt.detect_format(path) == fmt
    legacy = tmp_path / "legacy.pt"  # torch.save before the zip format (torch < 1.6)
    torch.save(torch.load(ROSINALITY_PT, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert ckpt.detect_format(legacy) == "rosinality-pt"
    assert ckpt.load_generator_state(legacy)[0] == ckpt.load_generator_state(ROSINALITY_PT)[0]
