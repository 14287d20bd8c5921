"""Loss curves of a training run: a JSON log and a PNG plot (drawn with PIL; matplotlib is not a dependency)."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from handsoff.utils.io import PathLike, atomic_path, atomic_write_bytes

__all__ = ["write_loss_log", "plot_loss_curves"]

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
_SIZE = (720, 400)
_MARGIN = (60, 20, 20, 40)  # left, top, right, bottom


def write_loss_log(path: PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write ``records`` (one dict per logged step: ``step``, ``stage``, loss values) as JSON, atomically."""
    atomic_write_bytes(path, (json.dumps({"records": list(records)}, indent=1) + "\n").encode())


_SKIP = ("step", "stage", "lr", "stage_step")


def _series(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """``{(stage, loss name): [(global step, value), ...]}`` for every positive finite value."""
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in _SKIP or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value) and value > 0:
                out.setdefault((str(r["stage"]), key), []).append((float(r["step"]), float(value)))
    return out


def plot_loss_curves(path: PathLike, records: Sequence[Mapping[str, Any]], title: str = "") -> None:
    """Plot every loss of ``records`` against the global step (log10 y axis) to a PNG, atomically.

    One colour per loss name; stages are separated by a vertical line and named above the plot.
    """
    series = _series(records)
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    x0, y0, x1, y1 = left, top, _SIZE[0] - right, _SIZE[1] - bottom
    draw.rectangle([x0, y0, x1, y1], outline="black")
    if series:
        xs = np.array([x for pts in series.values() for x, _ in pts])
        ys = np.log10([y for pts in series.values() for _, y in pts])
        xmin, xmax = float(xs.min()), float(max(xs.max(), xs.min() + 1))
        ymin, ymax = math.floor(float(ys.min())), math.ceil(float(ys.max()) + 1e-9)
        ymax = max(ymax, ymin + 1)

        def to_px(x: float, y: float) -> tuple[float, float]:
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
                    y1 - (math.log10(y) - ymin) / (ymax - ymin) * (y1 - y0))

        for e in range(ymin, ymax + 1):
            _, py = to_px(xmin, 10.0 ** e)
            draw.line([x0, py, x1, py], fill=(225, 225, 225))
            draw.text((4, py - 6), f"1e{e}", fill="black")
        draw.text((x0, y1 + 6), f"{xmin:g}", fill="black")
        draw.text((x1 - 60, y1 + 6), f"{xmax:g} steps", fill="black")
        stages = list(dict.fromkeys(stage for stage, _ in series))
        for stage in stages:  # a boundary line before every stage but the first, the name above
            first = min(x for (st, _), pts in series.items() if st == stage for x, _ in pts)
            px, _ = to_px(first, 1.0)
            if stage != stages[0]:
                draw.line([px, y0, px, y1], fill=(160, 160, 160))
            draw.text((px + 4, y0 + 2), f"stage: {stage}", fill=(90, 90, 90))
        names = list(dict.fromkeys(name for _, name in series))
        colors = {name: _COLORS[i % len(_COLORS)] for i, name in enumerate(names)}
        for (_, name), pts in series.items():
            if len(pts) > 1:
                draw.line([to_px(x, y) for x, y in pts], fill=colors[name], width=2)
            else:
                px, py = to_px(*pts[0])
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colors[name])
        for i, name in enumerate(names):  # the legend, in the bottom margin
            draw.text((x0 + 120 + 80 * i, y1 + 20), name, fill=colors[name])
    draw.text((x0 + (x1 - x0) // 2 - 3 * len(title), 4), title, fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
