"""What every benchmark records about the machine it ran on."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def device_name(device: torch.device = torch.device("cpu")) -> str:
    """The GPU's name for a CUDA device, else the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none): other work skews timings."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []
