"""Just-in-time builds of the compiled kernels: cached on disk, locked, and failing over once.

Each extension is compiled by ninja through :func:`torch.utils.cpp_extension.load` on first use
(never at import). Its name carries a digest of everything that affects the binary (sources, torch
and Python versions, compiler flags, CUDA architectures), so a cached build is reused exactly when
it is valid, and stale builds can never be loaded by mistake. Builds live in
``$TORCH_EXTENSIONS_DIR`` (default: torch's extension cache, ``~/.cache/torch_extensions``).

A build that fails (no compiler, no nvcc, a compile error) warns once, with its cause on one line
and the path of the full log, and the ops use the reference implementation for the rest of the
process: the failure is remembered by the cached loader and never retried on every call.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

try:  # POSIX advisory locks; on other platforms torch's own lock file is the only guard.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CSRC = Path(__file__).resolve().parent / "csrc"

# Architectures compiled when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a CI machine
# compile-checking the sources): A100 and H100 machine code (sm_80 code also runs on the 8.6 / 8.9
# consumer cards), plus compute_90 PTX that newer GPUs compile on load.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0+PTX")


class BuildError(RuntimeError):
    """A compiled extension could not be built or loaded.

    Attributes:
        cause: one line saying why (the first compiler error, or the missing tool).
        log_path: the full build log, or None when the build never started.
    """

    def __init__(self, cause: str, log_path: Optional[Path] = None) -> None:
        self.cause = cause
        self.log_path = log_path
        super().__init__(cause if log_path is None else f"{cause} (full log: {log_path})")


class BuildWarning(UserWarning):
    """Issued once per extension and process when a build fails and the ops fall back to 'ref'."""


@dataclass(frozen=True)
class ExtensionSpec:
    """What one extension is made of.

    Attributes:
        key: short name: 'cpu' or 'cuda'; also the impl the extension serves.
        sources: files under ``source_dir`` that are compiled. Every header (.h, .cuh) there is
            part of the build's digest too.
        ops: the ops the extension provides.
        cuda: whether the extension has .cu sources (needs nvcc and a CUDA build of torch).
        source_dir: where the files are.
    """

    key: str
    sources: Tuple[str, ...]
    ops: Tuple[str, ...]
    cuda: bool
    source_dir: Path = CSRC


# One extension per device: a build costs minutes on a small machine, much of it fixed (torch's
# headers), so both ops share it. The bindings are a separate source so that torch/extension.h
# compiles in parallel with the kernels.
EXTENSIONS: Mapping[str, ExtensionSpec] = MappingProxyType(
    {
        "cpu": ExtensionSpec(
            key="cpu",
            sources=("cpu_ops.cpp", "bias_act_cpu.cpp", "upfirdn2d_cpu.cpp"),
            ops=("bias_act", "upfirdn2d"),
            cuda=False,
        ),
        "cuda": ExtensionSpec(
            key="cuda",
            sources=("cuda_ops.cpp", "bias_act.cu", "upfirdn2d.cu"),
            ops=("bias_act", "upfirdn2d"),
            cuda=True,
        ),
    }
)

# -O2 with -O3's vectoriser: as fast as -O3 here, at two thirds of its compile time.
# -fopenmp: at::parallel_for only spreads work over threads with OpenMP enabled.
# -fno-trapping-math: lets the compiler evaluate both sides of a select (lrelu's z * alpha) and so
# vectorise the loops; nothing here relies on floating-point traps.
_CXX_FLAGS = ("-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-fopenmp", "-fno-trapping-math")
_LD_FLAGS = ("-fopenmp",)
_NVCC_FLAGS = ("-O3",)


def extension_for(op: str, impl: str) -> Optional[ExtensionSpec]:
    """The extension that runs ``op`` for ``impl`` ('cpu' or 'cuda'), or None if there is none."""
    spec = EXTENSIONS.get(impl)
    return spec if spec is not None and op in spec.ops else None


def build(op: str, impl: str) -> ModuleType:
    """Build (or load from the cache) the extension behind ``op`` for ``impl`` and return it.

    Args:
        op: 'bias_act' or 'upfirdn2d'.
        impl: 'cpu' or 'cuda'.

    Raises:
        ValueError: no extension provides ``op`` for ``impl``.
        BuildError: the build failed, now or earlier in this process (failures are not retried).
    """
    spec = extension_for(op, impl)
    if spec is None:
        raise ValueError(f"stylegan_ops has no compiled {impl!r} kernel for {op!r}")
    result = _load(spec.key)
    if isinstance(result, BuildError):
        raise result
    return result


def try_load(key: str) -> Optional[ModuleType]:
    """The extension ``key`` ('cpu' or 'cuda'), or None if it failed to build (warned once)."""
    result = _load(key)
    return None if isinstance(result, BuildError) else result


@functools.lru_cache(maxsize=None)
def _load(key: str) -> Union[ModuleType, BuildError]:
    """Build/load once per process; a failure is returned (and cached) instead of raised."""
    try:
        return compile_extension(EXTENSIONS[key])
    except BuildError as exc:
        # One line that says everything (what failed, why, where the log is): the warning is
        # raised deep inside an op, so its source location tells the user nothing.
        warnings.warn(
            f"stylegan_ops: the {key!r} extension could not be built: {exc.cause}. "
            f"Using the reference implementation for the rest of this process."
            + (f" Full log: {exc.log_path}" if exc.log_path else ""),
            BuildWarning,
            stacklevel=2,
        )
        return exc


def compile_extension(spec: ExtensionSpec, verbose: bool = False) -> ModuleType:
    """Compile ``spec`` (or reuse its cached build) and import it. Not cached in memory.

    ``verbose`` streams the compiler's output to stdout (the error log then holds only the
    summary). Compiler flags assume GCC or Clang (Linux); elsewhere the build fails cleanly.

    Raises:
        BuildError: with a one-line cause and the path of the full log.
    """
    cpp_extension = _import_cpp_extension()
    _check_toolchain(spec, cpp_extension)
    cuda_flags = list(_NVCC_FLAGS) + _cuda_arch_flags() if spec.cuda else []
    ld_flags = list(_LD_FLAGS) + _cudart_link_flags(cpp_extension.CUDA_HOME) if spec.cuda else list(_LD_FLAGS)
    name = f"stylegan_ops_{spec.key}_{_digest(spec, cuda_flags, ld_flags)}"
    root = build_root()
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build-error.log"
    with _exclusive_lock(root / f"{name}.lock"):
        _remove_stale_torch_lock(build_dir)
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(spec.source_dir / s) for s in spec.sources],
                extra_cflags=list(_CXX_FLAGS),
                extra_cuda_cflags=cuda_flags,
                extra_ldflags=ld_flags,
                extra_include_paths=[str(spec.source_dir)],
                build_directory=str(build_dir),
                with_cuda=spec.cuda,
                verbose=verbose,
            )
        except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as exc:
            # torch raises RuntimeError for compile/link errors (with the compiler output in the
            # message), OSError for a missing compiler, ImportError for an unloadable binary,
            # ValueError for a TORCH_CUDA_ARCH_LIST it does not know.
            text = f"{type(exc).__name__}: {exc}"
            _write_atomically(log_path, text)
            raise BuildError(_first_error_line(text), log_path) from exc
        log_path.unlink(missing_ok=True)  # an earlier failure's log no longer applies
    return module


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's import-time notice that a CUDA toolkit but no CUDA runtime was found: that is
    the normal state of a CPU machine that compile-checks the CUDA kernels."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


_CPP_EXTENSION_FILTER = _NoCudaRuntimeNotice()


def _import_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported late: it probes compilers and CUDA on import."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_CPP_EXTENSION_FILTER)  # idempotent
    from torch.utils import cpp_extension

    return cpp_extension


def build_root() -> Path:
    """Where builds go: ``$TORCH_EXTENSIONS_DIR``, else torch's default extension cache."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return Path(_import_cpp_extension().get_default_build_root())


def _check_toolchain(spec: ExtensionSpec, cpp_extension: ModuleType) -> None:
    """Fail fast, with a precise cause, where the build could not possibly succeed."""
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not on PATH (pip install ninja)")
    if spec.cuda:
        if torch.version.cuda is None:
            raise BuildError(f"this torch ({torch.__version__}) is built without CUDA")
        if cpp_extension.CUDA_HOME is None:
            raise BuildError("no CUDA toolkit found: nvcc is not on PATH and CUDA_HOME is unset")


def _cuda_arch_flags() -> list:
    """nvcc -gencode flags, or [] to let torch apply the user's TORCH_CUDA_ARCH_LIST.

    With TORCH_CUDA_ARCH_LIST unset, torch compiles for the visible GPUs, and with none visible it
    fails (IndexError in torch 2.x) instead of compiling anything. We then pass the architectures
    as explicit flags to this build alone, instead of setting TORCH_CUDA_ARCH_LIST in os.environ:
    that would outlive the build and silently change what every later build in the process (the
    user's own extensions included) compiles for. Torch adds no arch flags of its own when the
    flags it is given already name an architecture.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    if torch.cuda.is_available():
        archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs[-1] += "+PTX"
    else:
        archs = list(DEFAULT_CUDA_ARCHS)
    flags = []
    for arch in archs:
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _cudart_link_flags(cuda_home: Optional[str]) -> list:
    """An extra -L for libcudart when torch's CUDA_HOME does not hold it.

    When nvcc is found on PATH through a wrapper (``/usr/local/bin/nvcc`` calling the real
    toolkit), torch takes its parent as CUDA_HOME and links ``-L$CUDA_HOME/lib64 -lcudart``, which
    fails; the toolkit root is then usually the ``cuda`` link beside it.
    """
    if cuda_home is None or (Path(cuda_home) / "lib64" / "libcudart.so").exists():
        return []
    candidate = Path(cuda_home) / "cuda" / "lib64"
    return [f"-L{candidate}"] if (candidate / "libcudart.so").exists() else []


def _digest(spec: ExtensionSpec, cuda_flags: Sequence[str], ld_flags: Sequence[str]) -> str:
    """12 hex digits identifying the build: sources (and where), versions, flags, architectures, compiler."""
    h = hashlib.sha256()
    headers = [p.name for p in spec.source_dir.iterdir() if p.suffix in (".h", ".cuh")]
    for name in sorted(set(spec.sources) | set(headers)):
        h.update(name.encode())
        h.update((spec.source_dir / name).read_bytes())
    parts = [
        spec.key,
        str(spec.source_dir),  # the include path is part of the build command
        torch.__version__,
        str(torch.version.cuda),
        "%d.%d" % sys.version_info[:2],
        platform.machine(),
        repr(_CXX_FLAGS),
        repr(list(cuda_flags)),
        repr(list(ld_flags)),
        os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
        os.environ.get("CXX", ""),
    ]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` across processes (and threads) for the block.

    A kernel-level flock is released when its holder dies, unlike torch's lock *file*, which a
    process killed mid-build leaves behind, making every later build wait for it forever.
    """
    if fcntl is None:  # pragma: no cover - Windows: rely on torch's lock file alone
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_torch_lock(build_dir: Path) -> None:
    """Delete torch's build lock file left by a killed build.

    Every build of this directory runs under our flock, so while we hold it no live process can own
    torch's lock file: one that exists is stale, and torch would wait on it forever.
    """
    if fcntl is not None:
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so that a reader never sees a partial log."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


_ERROR_LINE = re.compile(r"(error|fatal|not found|no such file|undefined)", re.IGNORECASE)


def _first_error_line(text: str, limit: int = 300) -> str:
    """The most telling single line of a build log: the first one that reports an error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # The first line is torch's summary ("Error building extension 'x'"); prefer the compiler's.
    detailed = [line for line in lines[1:] if _ERROR_LINE.search(line)]
    best = detailed[0] if detailed else (lines[0] if lines else "unknown error")
    return best if len(best) <= limit else best[: limit - 3] + "..."
