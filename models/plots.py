"""PNG plots drawn with Pillow (no plotting library needed): the confusion matrix, line
charts, grouped bar charts (on a log scale when the values span decades) and the
reliability diagram of a classifier's scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_matrix_png(matrix: np.ndarray, classes: list[str], path: Path, *, title: str) -> Path:
    """Rows: true class; columns: predicted. Cells shaded by the row's share, counts written."""
    n = len(classes)
    cell, left, top = 40, 110, 60
    image = Image.new("RGB", (left + n * cell + 20, top + n * cell + 90), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    draw.text((left, top - 20), "predicted ->  (rows: true class)", fill="gray")
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        draw.text((5, top + i * cell + 14), classes[i][:14], fill="black")
        draw.text(
            (left + i * cell + 4, top + n * cell + 6 + 12 * (i % 2)), classes[i][:6], fill="black"
        )
        for j in range(n):
            shade = int(255 * (1 - shares[i, j]))
            colour = (shade, shade, 255) if i == j else (255, shade, shade)
            x, y = left + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(220, 220, 220))
            if matrix[i, j]:
                text_colour = "white" if shares[i, j] > 0.6 else "black"
                draw.text((x + 6, y + 14), str(int(matrix[i, j])), fill=text_colour)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    draw.text(
        (10, top + n * cell + 40), f"accuracy {accuracy:.4f} on {matrix.sum()} images", fill="black"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def line_chart_png(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    *,
    title: str,
    x_label: str,
    y_label: str,
    notes: list[tuple[float, float, str]] = (),
) -> Path:
    """Lines of (x, y) points, one colour per series, with a legend; `notes` are text
    labels placed at (x, y). Axes span the data (y padded by 5% of its range)."""
    width, height, left, right, top, bottom = 680, 440, 70, 60, 70, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for line in series.values() for p in line]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_pad = 0.04 * ((max(xs) - min(xs)) or 1.0)
    x0, x1 = min(xs) - x_pad, max(xs) + x_pad
    pad = 0.05 * ((max(ys) - min(ys)) or 1.0)
    y0, y1 = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.text((10, 10), title, fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="gray")
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(x, y0)
        _, py = at(x0, y)
        draw.text((px - 12, height - bottom + 6), f"{x:.2f}", fill="black")
        draw.text((8, py - 6), f"{y:.1f}", fill="black")
        draw.line((left, py, width - right, py), fill=(235, 235, 235))
    draw.text(((width - len(x_label) * 6) / 2, height - 24), x_label, fill="black")
    draw.text((8, 30), y_label, fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for n, (name, line) in enumerate(series.items()):
        colour = colours[n % len(colours)]
        pixels = [at(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        # The legend sits above the plot, so it never hides a point.
        lx, ly = left + 170 * n, top - 22
        draw.line((lx, ly + 6, lx + 18, ly + 6), fill=colour, width=2)
        draw.text((lx + 24, ly), name, fill=colour)
    for x, y, text in notes:
        px, py = at(x, y)
        draw.text((px + 5, py - 16), text, fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _short(value: float) -> str:
    """A number for a label: 0.053, 8.6, 300, 1,060."""
    if value < 1:
        return f"{value:.2g}"
    if value < 100:
        return f"{value:.1f}".removesuffix(".0")
    return f"{value:,.0f}"


_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def bar_chart_png(
    groups: dict[str, dict[str, float]],
    path: Path,
    *,
    title: str,
    unit: str,
    log: bool = True,
) -> Path:
    """Horizontal bars: one group per key of `groups` (top to bottom), one bar per series
    within it (same colour in every group, with a legend), each labelled with its value.
    On a log axis when `log` (values at or below 0, or NaN, are left out)."""
    series = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    values = [
        v
        for bars in groups.values()
        for v in bars.values()
        if np.isfinite(v) and (v > 0 or not log)
    ]
    bar_h, gap, left, right, top = 14, 12, 110, 90, 70
    height = top + len(groups) * (len(series) * bar_h + gap) + 50
    width = 760
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")
    for n, name in enumerate(series):
        colour = _COLOURS[n % len(_COLOURS)]
        lx, ly = left + 160 * (n % 4), 30 + 14 * (n // 4)
        draw.rectangle((lx, ly + 2, lx + 14, ly + 10), fill=colour)
        draw.text((lx + 20, ly), name[:24], fill=colour)
    if not values:
        draw.text((left, top), "no data", fill="gray")
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        return path
    if log:
        lo = 10 ** np.floor(np.log10(min(values)))
        hi = 10 ** np.ceil(np.log10(max(values)))
        hi = hi * 10 if hi == lo else hi

        def x_of(v: float) -> float:
            return left + (np.log10(v) - np.log10(lo)) / (np.log10(hi) - np.log10(lo)) * (
                width - left - right
            )

        ticks = [lo * 10**k for k in range(int(round(np.log10(hi / lo))) + 1)]
    else:
        lo, hi = 0.0, max(values) * 1.05 or 1.0

        def x_of(v: float) -> float:
            return left + (v - lo) / (hi - lo) * (width - left - right)

        ticks = [hi * k / 4 for k in range(5)]
    bottom = height - 40
    for tick in ticks:
        x = x_of(tick)
        draw.line((x, top - 4, x, bottom), fill=(230, 230, 230))
        draw.text((x - 10, bottom + 4), _short(tick), fill="black")
    draw.text((left, bottom + 20), unit, fill="black")
    y = top
    for group, bars in groups.items():
        draw.text((8, y + (len(series) * bar_h) / 2 - 6), group[:16], fill="black")
        for n, name in enumerate(series):
            value = bars.get(name, float("nan"))
            if np.isfinite(value) and (value > 0 or not log):
                x = x_of(value)
                colour = _COLOURS[n % len(_COLOURS)]
                draw.rectangle((left, y + 1, max(left + 1, x), y + bar_h - 2), fill=colour)
                draw.text((x + 4, y + 1), _short(value), fill="black")
            y += bar_h
        y += gap
    draw.line((left, top - 4, left, bottom), fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def reliability_png(
    bins: list[tuple[float, float, int, float, float]], path: Path, *, title: str
) -> Path:
    """The reliability diagram of a classifier's top score: per bin (low, high, count,
    mean score, accuracy) a bar as high as the bin's accuracy, a marker at its mean
    score, and the diagonal a calibrated model would follow; counts under the bars."""
    size, left, top = 400, 60, 50
    image = Image.new("RGB", (left + size + 30, top + size + 70), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black")

    def at(x: float, y: float) -> tuple[float, float]:
        return left + x * size, top + (1 - y) * size

    draw.rectangle((*at(0, 1), *at(1, 0)), outline="gray")
    for k in range(6):
        v = k / 5
        draw.line((*at(0, v), *at(1, v)), fill=(235, 235, 235))
        draw.text((left - 30, at(0, v)[1] - 6), f"{v:.1f}", fill="black")
        draw.text((at(v, 0)[0] - 8, top + size + 22), f"{v:.1f}", fill="black")
    for low, high, count, confidence, accuracy in bins:
        if not count:
            continue
        x0, y0 = at(low, accuracy)
        x1, y1 = at(high, 0)
        draw.rectangle((x0 + 1, y0, x1 - 1, y1), fill=(31, 119, 180), outline="white")
        cx, cy = at(confidence, accuracy)
        draw.line((cx, cy - 5, cx, cy + 5), fill=(214, 39, 40), width=2)
        draw.text((x0 + 2, top + size + 4), str(count), fill="gray")
    draw.line((*at(0, 0), *at(1, 1)), fill=(120, 120, 120), width=1)
    draw.text(
        (left, top + size + 40), "top score (bins); bars: accuracy; red: mean score", fill="black"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
