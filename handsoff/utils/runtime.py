"""Parsing of user-facing run settings: seed ranges and devices."""
from __future__ import annotations

import re

import torch

from handsoff.errors import HandsoffError


def parse_seeds(text: str) -> list[int]:
    """Parse ``"0-15,20,30-32"`` into ``[0, ..., 15, 20, 30, 31, 32]`` (ranges are inclusive)."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise HandsoffError(f"seeds {text!r}: cannot read {part!r} (use e.g. 0-15,20)")
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        seeds.extend(range(first, last + 1))
    if any(s >= 2**32 for s in seeds):
        raise HandsoffError(f"seeds {text!r}: seeds must lie in [0, 2**32)")
    return seeds


def resolve_device(name: str = "auto") -> torch.device:
    """``'auto'`` -> the first CUDA device when there is one, else the CPU; others as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HandsoffError(f"device {name!r}: CUDA is not available on this machine")
    return device
