"""StyleGAN2 GAN training: configuration, data, training loop, quality figure, command line.

The public entry points are re-exported by `handsoff.gan.train`.
"""
from .cli import add_train_gan_args, train_gan_from_args
from .config import RUN_CONTROL_FIELDS, TrainConfig
from .data import DataOrder, DataSource, ImageStore, load_images
from .loop import GANTrainer, build_networks, find_snapshots, train_gan
from .quality import QualityEvaluator, frechet_distance, frechet_distance_from_stats, get_feature_extractor

__all__ = [
    "TrainConfig", "RUN_CONTROL_FIELDS", "train_gan", "add_train_gan_args", "train_gan_from_args",
    "DataSource", "DataOrder", "ImageStore", "load_images", "GANTrainer", "build_networks", "find_snapshots",
    "frechet_distance", "frechet_distance_from_stats", "get_feature_extractor", "QualityEvaluator",
]
