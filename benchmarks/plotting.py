"""A tiny line-chart writer on Pillow (the benchmarks need no plotting dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def line_chart(
    path: Path,
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    size: tuple[int, int] = (900, 560),
) -> Path:
    """Draw each series (label -> [(x, y), ...]) as a line and save a PNG."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 80, 20, 50, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    xmin, xmax = min(x for x, _ in points), max(x for x, _ in points)
    ymin, ymax = min(y for _, y in points), max(y for _, y in points)
    pad = (ymax - ymin) * 0.05 or 1.0
    ymin, ymax = ymin - pad, ymax + pad

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (width - left - right) * (x - xmin) / ((xmax - xmin) or 1),
                top + (height - top - bottom) * (1 - (y - ymin) / (ymax - ymin)))

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for y in _ticks(ymin, ymax):
        _, py = xy(xmin, y)
        d.line([left, py, width - right, py], fill=(225, 225, 225))
        d.text((8, py - 6), f"{y:.4g}", fill="black")
    for x in _ticks(xmin, xmax):
        px, _ = xy(x, ymin)
        d.line([px, height - bottom, px, height - bottom + 5], fill="black")
        d.text((px - 8, height - bottom + 8), f"{x:.4g}", fill="black")
    d.text((width // 2 - 40, height - 25), xlabel, fill="black")
    d.text((10, 10), title, fill="black")
    d.text((10, 28), ylabel, fill="black")
    for i, (label, values) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        if len(values) > 1:
            d.line([xy(x, y) for x, y in values], fill=color, width=2)
        if len(values) <= 40:  # sparse series (validation points) also get markers
            for x, y in values:
                px, py = xy(x, y)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        d.text((width - 260, top + 10 + 16 * i), label, fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def stacked_line_charts(path: Path, charts: Sequence[dict], **common) -> Path:
    """Several :func:`line_chart`\\ s stacked top to bottom in one PNG. Each entry of
    ``charts`` holds that chart's ``series`` and ``ylabel`` (and may override ``common``,
    e.g. ``xlabel``/``title``)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, chart in enumerate(charts):
        part = path.with_name(f"{path.stem}_part{i}.png")
        line_chart(part, **{**common, **chart})
        parts.append(Image.open(part).convert("RGB"))
        part.unlink()
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        canvas.paste(part, (0, y))
        y += part.height
    canvas.save(path)
    return path
