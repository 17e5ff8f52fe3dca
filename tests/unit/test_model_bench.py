"""The model benchmark's table is built from real variants (no timing is asserted)."""

from __future__ import annotations

import pytest

from models.variant_bench import model_table

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


def test_accuracy_columns_come_from_the_digits_task() -> None:
    from models.variant_bench import print_model_table

    rows = model_table(
        input_size=32, batch_size=2, repeats=1, accuracy=True, epochs=3, finetune_epochs=1
    )
    print_model_table(rows)
    by_name = {row.name: row for row in rows}
    accuracy = {name: row.accuracy for name, row in by_name.items()}
    # Trained for real: far above chance (0.1); 3 epochs gave 0.84 in test_train.
    assert all(value is not None and value > 0.5 for value in accuracy.values()), accuracy
    # INT8 is scored on the same test images as FP32 and barely moves.
    assert abs(accuracy["dense INT8"] - accuracy["dense FP32"]) <= 0.03
    assert abs(accuracy["pruned INT8"] - accuracy["pruned FP32"]) <= 0.03
    # The timed networks are the trained ones: ten digits, the pruned one half as wide.
    assert by_name["pruned FP32"].params < 0.6 * by_name["dense FP32"].params
