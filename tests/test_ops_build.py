"""The build system: real CUDA compile check, caching, locking, and the one-time fallback."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import MappingProxyType

import pytest
import torch

import stylegan_ops
from stylegan_ops import _build

# A minimal Python extension (no torch headers: compiles in about a second) used to exercise the
# build machinery for real without paying for a torch extension build.
TINY_SOURCE = textwrap.dedent(
    """
    #include <Python.h>
    #define SGO_CAT2(a, b) a##b
    #define SGO_CAT(a, b) SGO_CAT2(a, b)
    #define SGO_STR2(x) #x
    #define SGO_STR(x) SGO_STR2(x)
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, SGO_STR(TORCH_EXTENSION_NAME), NULL, -1, NULL};
    PyMODINIT_FUNC SGO_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
    """
)


def _tiny_spec(tmp_path: Path, source: str = TINY_SOURCE, key: str = "tiny") -> _build.ExtensionSpec:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "tiny.cpp").write_text(source)
    return _build.ExtensionSpec(key=key, sources=("tiny.cpp",), ops=("bias_act",), cuda=False, source_dir=src)


@pytest.fixture
def fresh_loader():
    """Forget loaded extensions before and after the test, so it sees (and leaves) a clean state."""
    _build._load.cache_clear()
    yield
    _build._load.cache_clear()


def _nvcc() -> str:
    return shutil.which("nvcc") or ""


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is built without CUDA")
@pytest.mark.skipif(not _nvcc(), reason="nvcc is not on PATH")
def test_cuda_sources_compile():
    """Compile (and import) the CUDA extension for real. It cannot run without a GPU, but a
    compile error in a .cu file fails here. Cached in TORCH_EXTENSIONS_DIR (default: torch's cache),
    so a rerun with unchanged sources only checks that the build is up to date."""
    start = time.time()
    module = _build.compile_extension(_build.EXTENSIONS["cuda"])
    assert callable(module.bias_act) and callable(module.upfirdn2d)
    assert module.__name__.startswith("stylegan_ops_cuda_")
    print(f"CUDA extension built or found in {time.time() - start:.1f} s: {module.__file__}")


def test_cpu_build_is_cached_per_process():
    try:
        first = stylegan_ops.build("bias_act", "cpu")
    except _build.BuildError as exc:
        pytest.skip(f"no working C++ toolchain here: {exc}")
    assert stylegan_ops.build("bias_act", "cpu") is first
    name = first.__name__
    assert name.startswith("stylegan_ops_cpu_") and len(name.rsplit("_", 1)[1]) == 12


def test_build_rejects_unknown_combinations():
    with pytest.raises(ValueError):
        stylegan_ops.build("conv2d", "cpu")
    with pytest.raises(ValueError):
        stylegan_ops.build("bias_act", "tpu")


def test_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch, fresh_loader):
    """A real compile error: one warning with the cause and log, the reference runs, and later
    calls neither retry nor warn again."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    broken = _tiny_spec(tmp_path, "int main( { this is not C++ }\n", key="cpu")
    monkeypatch.setattr(_build, "EXTENSIONS", MappingProxyType({"cpu": broken, "cuda": _build.EXTENSIONS["cuda"]}))
    calls = []
    real_compile = _build.compile_extension
    monkeypatch.setattr(_build, "compile_extension", lambda spec, **kw: calls.append(spec.key) or real_compile(spec, **kw))

    x, b = torch.randn(2, 3, 4), torch.randn(3)
    want = stylegan_ops.bias_act(x, b, act="lrelu", impl="ref")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(stylegan_ops.bias_act(x, b, act="lrelu"), want)
        assert stylegan_ops.available_impls("cpu") == ["ref"]
        with pytest.raises(_build.BuildError) as info:
            stylegan_ops.bias_act(x, b, impl="cpu")  # explicit impl: an error, not a fallback
    assert calls == ["cpu"]
    build_warnings = [w for w in caught if issubclass(w.category, _build.BuildWarning)]
    assert len(build_warnings) == 1
    message = str(build_warnings[0].message)
    assert "\n" not in message and "error" in message.lower() and "build-error.log" in message
    assert info.value.log_path.exists() and "error" in info.value.log_path.read_text().lower()


def test_missing_toolchain_is_a_build_error(monkeypatch, fresh_loader):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(_build.BuildError, match="ninja"):
        _build.compile_extension(_build.EXTENSIONS["cpu"])


def test_digest_tracks_sources_and_flags(tmp_path, monkeypatch):
    spec = _tiny_spec(tmp_path)
    base = _build._digest(spec, [], [])
    assert len(base) == 12 and base == _build._digest(spec, [], [])
    assert _build._digest(spec, ["-gencode=arch=compute_90,code=sm_90"], []) != base
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _build._digest(spec, [], []) != base
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    (spec.source_dir / "tiny.cpp").write_text(TINY_SOURCE + "// changed\n")
    assert _build._digest(spec, [], []) != base


def test_arch_flags_leave_the_environment_alone(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    before = dict(os.environ)
    flags = _build._cuda_arch_flags()
    assert dict(os.environ) == before
    assert flags and all(f.startswith("-gencode=arch=compute_") for f in flags)
    if not torch.cuda.is_available():
        assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert _build._cuda_arch_flags() == []  # the user's list wins; torch applies it


def test_build_dir_honours_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    spec = _tiny_spec(tmp_path)
    module = _build.compile_extension(spec)
    assert Path(module.__file__).parent.parent == tmp_path / "cache"
    assert module.__name__.startswith("stylegan_ops_tiny_")


def test_stale_torch_lock_is_removed(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file; the next build must not wait forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    spec = _tiny_spec(tmp_path)
    name = f"stylegan_ops_tiny_{_build._digest(spec, [], list(_build._LD_FLAGS))}"
    (tmp_path / "cache" / name).mkdir(parents=True)
    (tmp_path / "cache" / name / "lock").write_text("")
    assert _build.compile_extension(spec).__name__ == name


def test_two_processes_building_at_once(tmp_path):
    """Concurrent builds of one extension in one cache both succeed and load the same binary."""
    spec = _tiny_spec(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from stylegan_ops import _build
        spec = _build.ExtensionSpec(key="tiny", sources=("tiny.cpp",), ops=(), cuda=False,
                                    source_dir=Path({str(spec.source_dir)!r}))
        print(_build.compile_extension(spec).__file__)
        """
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), PYTHONPATH=str(Path(__file__).parents[1]))
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).exists()


def test_first_error_line_prefers_the_compiler_message():
    log = "RuntimeError: Error building extension 'x': [1/2] c++ ...\nFAILED: x.o\nx.cpp:3:5: error: expected ';'\n"
    assert _build._first_error_line(log) == "x.cpp:3:5: error: expected ';'"


def test_impl_switch():
    x = torch.randn(2, 3)
    assert "ref" in stylegan_ops.available_impls("cpu")
    assert stylegan_ops.available_impls("cuda") == ["ref"] or torch.cuda.is_available()
    with pytest.raises(ValueError):
        stylegan_ops.bias_act(x, impl="gpu")
