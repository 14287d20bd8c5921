"""GAN trainer: ``handsoff train-gan`` (the implementation lives in `handsoff.gan.training`).

    from handsoff.gan.train import TrainConfig, train_gan
    cfg = TrainConfig(resolution=64, batch=64, total_kimg=3000, g_channel_max=256, d_channel_max=256)
    train_gan(cfg, "runs/heads64", "domain:heads")          # -> runs/heads64/G_ema-latest.safetensors

``python -m handsoff.gan.train --help`` runs the same command line as ``handsoff train-gan``.
"""
from .training import (  # noqa: F401
    DataSource,
    GANTrainer,
    TrainConfig,
    add_train_gan_args,
    find_snapshots,
    frechet_distance,
    train_gan,
    train_gan_from_args,
)
from .training.cli import TRAIN_GAN_DESCRIPTION, TRAIN_GAN_EPILOG, main

__all__ = ["TrainConfig", "train_gan", "add_train_gan_args", "train_gan_from_args", "DataSource", "GANTrainer",
           "find_snapshots", "frechet_distance", "TRAIN_GAN_DESCRIPTION", "TRAIN_GAN_EPILOG", "main"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
