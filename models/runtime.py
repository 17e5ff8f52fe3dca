"""ONNX Runtime wrapper: loads a model from its manifest alone and scores batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infra.exceptions import ModelError
from models.manifest import Manifest
from models.presets import ServingPreset

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """A served model: the manifest, its preset and an InferenceSession."""

    def __init__(self, folder: Path, *, provider: str = "cpu", intra_op_threads: int = 0) -> None:

        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.preset = ServingPreset(
            input_size=self.manifest.input_size,
            resize_size=self.manifest.resize_size,
            mean=self.manifest.mean,
            std=self.manifest.std,
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        available = set(ort.get_available_providers())
        wanted = PROVIDERS[provider]
        providers = [p for p in wanted if p in available]
        if wanted[0] not in available:
            log.warning("%s is not available here; using %s", wanted[0], providers)
        try:
            self.session = ort.InferenceSession(
                str(self.manifest.model_path(self.folder)), options, providers=providers
            )
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {self.folder}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.providers = self.session.get_providers()
        self.input_dtype = (
            np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        )

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, classes), for a preprocessed NCHW batch."""
        (logits,) = self.session.run(None, {self.input_name: batch.astype(self.input_dtype)})
        return softmax(np.asarray(logits, dtype=np.float32))

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run once per batch size so the first real batch does not pay for allocation."""
        size = self.manifest.input_size
        for n in batch_sizes:
            self.probabilities(np.zeros((n, 3, size, size), dtype=np.float32))
