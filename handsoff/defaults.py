"""Where the shipped default models live (the top-level ``checkpoints/`` folder)."""
from __future__ import annotations

from pathlib import Path

CHECKPOINTS_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_GENERATOR = CHECKPOINTS_DIR / "heads64" / "generator.safetensors"
