"""PNG plots drawn with Pillow (no plotting library needed): the confusion matrix."""

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
