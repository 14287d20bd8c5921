"""A format-independent fingerprint of a generator's weights.

Encoders, latents and labelers are only valid for the generator they were made with. They
record `generator_digest(G)` and check it on load, so a latents file made for one generator
is refused for another even when both have the same shapes. The digest depends on the
weights only, not on the file format they came from (NVlabs .pkl, rosinality .pt and our
.safetensors of the same network give the same digest).
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["generator_digest"]


@torch.no_grad()
def generator_digest(G: torch.nn.Module) -> str:
    """Hex sha256 (first 16 characters) of every state-dict entry: name, shape and float32 bytes.

    Args:
        G: a `handsoff.gan.networks.Generator` (any module works; its state dict is hashed
            in sorted-name order).
    """
    digest = hashlib.sha256()
    state = G.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
