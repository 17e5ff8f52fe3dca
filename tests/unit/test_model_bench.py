"""The model benchmark's table is built from real variants (no timing is asserted)."""

from __future__ import annotations

import pytest

from models.bench import model_table

pytestmark = pytest.mark.slow


def test_table_has_the_four_variants_and_pruning_shrinks_them() -> None:
    rows = {row.name: row for row in model_table(input_size=32, batch_size=2, repeats=1)}
    assert list(rows) == ["dense FP32", "dense INT8", "pruned FP32", "pruned INT8"]
    assert rows["pruned FP32"].params < 0.6 * rows["dense FP32"].params
    assert rows["pruned FP32"].macs < 0.6 * rows["dense FP32"].macs
    assert rows["pruned FP32"].onnx_bytes < rows["dense FP32"].onnx_bytes
    assert rows["dense INT8"].onnx_bytes < 0.35 * rows["dense FP32"].onnx_bytes
    assert rows["pruned INT8"].onnx_bytes < rows["pruned FP32"].onnx_bytes
    assert all(row.images_per_s > 0 for row in rows.values())
