"""The benchmark's default schedule and choices, importable without torch (``handsoff --help`` stays fast)."""
from __future__ import annotations

__all__ = ["DEFAULT_STEPS", "DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_BASE", "MODELS", "TASK_NAMES"]

# One schedule for every training set, measured on the heads domain at 64x64 (benchmarks/README.md):
# at 1,000 steps of 16 the oracle (10,000 real images) and the 16-image baseline differ clearly
# on every task, and one training takes about 2 minutes of one CPU core.
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 16
DEFAULT_LR = 5e-3
#: UNet width at full resolution (doubling per level): measured 3.7x the training speed of
#: DeepLabV3-MobileNetV3 per CPU-second at 64x64 (benchmarks/downstream.py).
DEFAULT_BASE = 8

MODELS = ("unet", "deeplabv3")
TASK_NAMES = ("seg", "keypoints", "depth")
