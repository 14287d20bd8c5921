"""pytest plugin for the GPU check (``-p _tf32_off``): TF32 off for every CUDA test.

cuDNN convolutions default to TF32 on Ampere and later GPUs, which moves float32 results by
about 1e-3; the correctness tests compare against float32 references, so the GPU check runs
them with TF32 off (the same legacy flags the tests themselves use, so the two never mix
with torch's newer ``fp32_precision`` switches). ``NVIDIA_TF32_OVERRIDE=0`` in the
environment (set by benchmarks/gpu_check.py) turns it off in the libraries as well.
"""
from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:  # noqa: ARG001 - pytest's hook signature
    """Turn TF32 off in cuBLAS matmuls and cuDNN convolutions before any test runs."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
