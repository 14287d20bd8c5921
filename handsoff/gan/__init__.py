"""StyleGAN2 generator (NVlabs-compatible state dicts), its configuration and feature taps."""
from .config import GeneratorConfig
from .networks import (
    FullyConnectedLayer,
    Generator,
    MappingNetwork,
    SynthesisBlock,
    SynthesisLayer,
    SynthesisNetwork,
    ToRGBLayer,
)

__all__ = [
    "GeneratorConfig",
    "Generator",
    "MappingNetwork",
    "SynthesisNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "ToRGBLayer",
    "FullyConnectedLayer",
]
