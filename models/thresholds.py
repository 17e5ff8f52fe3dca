"""Per-class thresholds for multi-label hashtags, calibrated on a validation set."""

from __future__ import annotations

import numpy as np


def calibrate_thresholds(
    probabilities: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    *,
    floor: float = 0.2,
    ceiling: float = 0.9,
) -> dict[str, float]:
    """For each class, the threshold on its probability that maximizes F1 (one-vs-rest).

    Clamped to [floor, ceiling] so that a class never seen in validation neither
    floods every result nor becomes unreachable.
    """
    grid = np.linspace(floor, ceiling, 29)
    thresholds = {}
    for index, name in enumerate(classes):
        positive = labels == index
        scores = probabilities[:, index]
        best, best_f1 = 0.5, -1.0
        for t in grid:
            predicted = scores >= t
            tp = float((predicted & positive).sum())
            precision = tp / max(predicted.sum(), 1)
            recall = tp / max(positive.sum(), 1)
            f1 = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
            if f1 > best_f1 + 1e-9:
                best, best_f1 = float(t), f1
        thresholds[name] = round(best, 3)
    return thresholds
