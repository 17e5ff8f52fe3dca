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
