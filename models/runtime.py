"""ONNX Runtime wrapper: loads a model from its manifest alone and scores batches.

Used as ONNX Runtime's authors recommend for throughput:

- I/O binding (`BoundRunner`): inputs are bound where they already lie (a preallocated
  host buffer the decoders wrote into, or a CUDA tensor), outputs go to a preallocated
  host buffer; no per-batch allocation or copy on our side, on the CPU too;
- the CUDA execution provider with its recommended options (exhaustive cuDNN algorithm
  search, the largest cuDNN workspace, copies in the default stream, an arena that grows
  only as asked);
- TensorRT with an engine and timing cache on disk, an optimisation profile for every
  batch size up to the largest, and FP16 or INT8 engines when asked.

No silent CPU fallback: ONNX Runtime lists the CUDA and TensorRT providers whether or not
their libraries and a GPU are there, and quietly runs a session on the CPU when they
cannot start. A classifier asked for CUDA or TensorRT checks the providers its session
really got and raises `ModelError` otherwise, unless `allow_fallback`. The CUDA and cuDNN
libraries come from the pip wheels the pinned torch depends on (`onnxruntime.preload_dlls`),
so no system CUDA is needed. The provider and precision really used are `provider` and
`precision`, recorded on every result.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from infra.exceptions import ModelError
from infra.settings import Settings
from models.manifest import Manifest
from models.presets import ServingPreset

log = logging.getLogger(__name__)

#: Our provider names and ONNX Runtime's.
EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SHORT_NAMES = {long: short for short, long in EXECUTION_PROVIDERS.items()}
PRECISIONS = ("model", "fp16", "int8")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cuda_options(device_id: int) -> dict[str, str]:
    """The CUDA execution provider's options recommended for throughput (ONNX Runtime docs)."""
    return {
        "device_id": str(device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
    }


def tensorrt_options(
    *,
    device_id: int,
    input_name: str,
    input_size: int,
    max_batch: int,
    cache_dir: Path,
    precision: str,
) -> dict[str, str]:
    """TensorRT options: engine and timing caches, one profile for batches 1..max_batch."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    shape = f"3x{input_size}x{input_size}"
    return {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": str(4 << 30),
        # An INT8 engine keeps the layers TensorRT cannot quantize in FP16, not FP32.
        "trt_fp16_enable": str(precision in ("fp16", "int8")),
        "trt_int8_enable": str(precision == "int8"),
        "trt_profile_min_shapes": f"{input_name}:1x{shape}",
        "trt_profile_opt_shapes": f"{input_name}:{max_batch}x{shape}",
        "trt_profile_max_shapes": f"{input_name}:{max_batch}x{shape}",
    }


def preload_gpu_libraries(provider: str) -> None:
    """Load CUDA and cuDNN from the pip wheels (torch's), and TensorRT's from its wheel."""
    if provider == "cpu":
        return
    ort.preload_dlls()
    if provider == "tensorrt":
        # The TensorRT provider dlopens libnvinfer by name; the tensorrt-cu13 wheel puts
        # it in site-packages, where the loader does not look unless it is loaded first.
        spec = importlib.util.find_spec("tensorrt_libs")
        if spec is None or not spec.submodule_search_locations:
            return
        folder = Path(next(iter(spec.submodule_search_locations)))
        for pattern in ("libnvinfer.so.*", "libnvinfer_plugin.so.*", "libnvonnxparser.so.*"):
            for library in sorted(folder.glob(pattern)):
                try:
                    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
                except OSError as exc:
                    log.warning("cannot load %s: %s", library, exc)


def _input_name(path: Path) -> str:
    import onnx  # only for TensorRT's profile shapes: a CPU/CUDA consumer need not load it

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


class OnnxClassifier:
    """A served model: the manifest, its preset and an InferenceSession on the provider asked.

    `provider` and `precision` are what the session really runs (after any allowed
    fallback); `max_batch` sizes TensorRT's profile and the preallocated buffers.
    """

    def __init__(
        self,
        folder: Path,
        *,
        provider: str = "cpu",
        precision: str = "model",
        intra_op_threads: int = 0,
        allow_fallback: bool = False,
        max_batch: int = 32,
        cache_dir: Path | None = None,
        spin: bool = True,
        device_id: int = 0,
    ) -> None:

        if provider not in EXECUTION_PROVIDERS:
            raise ModelError(
                f"unknown provider {provider!r}; known: {', '.join(EXECUTION_PROVIDERS)}"
            )
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        self.preset = ServingPreset(
            input_size=self.manifest.input_size,
            resize_size=self.manifest.resize_size,
            mean=self.manifest.mean,
            std=self.manifest.std,
        )
        self.max_batch = max_batch
        self.device_id = device_id
        model_path = self.manifest.model_path(self.folder)
        asked = self._precision_asked(provider, precision)

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if not spin:
            # In a pipeline the decode threads share the cores: idle ONNX Runtime workers
            # must sleep, not spin.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        preload_gpu_libraries(provider)
        providers: list = ["CPUExecutionProvider"]
        if provider in ("cuda", "tensorrt"):
            providers.insert(0, ("CUDAExecutionProvider", cuda_options(device_id)))
        if provider == "tensorrt":
            trt = tensorrt_options(
                device_id=device_id,
                input_name=_input_name(model_path),
                input_size=self.manifest.input_size,
                max_batch=max_batch,
                cache_dir=Path(cache_dir or self.folder / "trt-cache"),
                precision=asked,
            )
            providers.insert(0, ("TensorrtExecutionProvider", trt))
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {self.folder}: {exc}") from exc
        self.providers = self.session.get_providers()
        running = _SHORT_NAMES.get(self.providers[0], self.providers[0])
        if running != provider:
            message = (
                f"asked for the {provider} provider ({EXECUTION_PROVIDERS[provider]}), but "
                f"ONNX Runtime runs this session on {self.providers}: its libraries or a GPU "
                "are missing here (ONNX Runtime lists GPU providers whether or not they can "
                "start)"
            )
            if not allow_fallback:
                raise ModelError(
                    f"{message}. Fix the installation, or set TAGSTREAM_ORT_ALLOW_FALLBACK=true "
                    f"to run on {running} anyway"
                )
            log.warning("%s; running on %s as allowed", message, running)
            asked = self.manifest.precision  # TensorRT's precision options no longer apply
        self.provider = running
        self.precision = asked
        first_input = self.session.get_inputs()[0]
        self.input_name = first_input.name
        self.output_name = self.session.get_outputs()[0].name
        self.input_dtype = np.float16 if "float16" in first_input.type else np.float32
        self.output_dtype = (
            np.float16 if "float16" in self.session.get_outputs()[0].type else np.float32
        )

    @classmethod
    def from_settings(cls, folder: Path, settings: Settings, **overrides: Any) -> OnnxClassifier:
        """The classifier an inference consumer with `settings` serves: provider, precision,
        fallback, threads and batch size from the settings; TensorRT engines cached under
        the data folder. Serving shares its cores with decoding, so idle ONNX Runtime
        threads sleep instead of spinning."""
        options: dict[str, Any] = {
            "provider": settings.ort_provider,
            "precision": settings.ort_precision,
            "allow_fallback": settings.ort_allow_fallback,
            "intra_op_threads": settings.ort_intra_op_threads,
            "max_batch": settings.batch_max_size,
            "cache_dir": settings.data_dir / "tensorrt-cache",
            "spin": False,
        }
        return cls(folder, **(options | overrides))

    def _precision_asked(self, provider: str, precision: str) -> str:
        if precision == "model":
            return self.manifest.precision
        if provider != "tensorrt":
            raise ModelError(
                f"precision {precision} is a TensorRT build option; with {provider}, serve a "
                f"model exported in {precision} instead"
            )
        if precision == "int8" and self.manifest.precision != "int8":
            raise ModelError(
                "TensorRT INT8 needs a calibrated (QDQ) INT8 model; this one is "
                f"{self.manifest.precision}: export it with --precision int8"
            )
        return precision

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.manifest.input_size
        return (3, size, size)

    def input_buffer(self, rows: int | None = None) -> np.ndarray:
        """A preallocated host batch, (rows, 3, H, W) in the model's input type."""
        return np.zeros((rows or self.max_batch, *self.input_shape), dtype=self.input_dtype)

    def runner(self) -> BoundRunner:
        """An I/O-bound runner for one thread."""
        return BoundRunner(self)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, classes), for a preprocessed NCHW batch."""
        (logits,) = self.session.run(None, {self.input_name: batch.astype(self.input_dtype)})
        return softmax(np.asarray(logits, dtype=np.float32))

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run once per batch size so the first real batch does not pay for allocation."""
        runner = self.runner()
        for n in batch_sizes:
            runner.run(self.input_buffer(n))


class BoundRunner:
    """One thread's I/O binding: the input bound where it lies, the output preallocated.

    Not thread-safe (one binding); make one per thread that runs the model.
    """

    def __init__(self, classifier: OnnxClassifier) -> None:
        self.classifier = classifier
        self.binding = classifier.session.io_binding()
        classes = len(classifier.classes)
        self.output = np.empty((classifier.max_batch, classes), dtype=classifier.output_dtype)

    def _run(self, rows: int) -> np.ndarray:
        c = self.classifier
        if rows > len(self.output):
            self.output = np.empty((rows, self.output.shape[1]), dtype=self.output.dtype)
        self.binding.bind_output(
            c.output_name,
            "cpu",
            0,
            self.output.dtype,
            [rows, self.output.shape[1]],
            self.output.ctypes.data,
        )
        c.session.run_with_iobinding(self.binding)
        return softmax(self.output[:rows].astype(np.float32, copy=False))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (a new array) for a host batch, bound without a copy.

        `batch` must be C-contiguous in the model's input type: a leading slice of an
        `input_buffer` is."""
        c = self.classifier
        if batch.dtype != c.input_dtype or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=c.input_dtype)
        self.binding.bind_input(
            c.input_name, "cpu", 0, batch.dtype, list(batch.shape), batch.ctypes.data
        )
        return self._run(len(batch))

    def run_device(self, data_ptr: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """Probabilities for a batch already on the classifier's CUDA device (a tensor's
        `data_ptr()`): ONNX Runtime reads it there, nothing is copied back to the host."""
        c = self.classifier
        self.binding.bind_input(c.input_name, "cuda", c.device_id, dtype, list(shape), data_ptr)
        return self._run(shape[0])
