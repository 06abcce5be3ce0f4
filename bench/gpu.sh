#!/usr/bin/env bash
# The CUDA device on a real NVIDIA GPU, for the day one is present (no machine
# here has one): builds with CUDA forced on, runs the kernel table and the
# whole-model tests on the device, then measures on generated 1.1B-parameter
# models (F16 and Q8_0) single-stream decode (as a fraction of the GPU's peak
# memory bandwidth, from cudaGetDeviceProperties), 16- and 64-stream aggregate
# decode, and prefill tokens/s, then decode again with CUDA graphs off.
# Exits non-zero when no GPU is found.
#   ./bench/gpu.sh
#   TOKENS=128 ./bench/gpu.sh
# Targets: single-stream decode >= 70% of peak bandwidth; 64 streams >= 20x one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build-gpu}
TOKENS=${TOKENS:-128}
MODELS=${MODELS:-/tmp/tollgate-bench-models}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU found (nvidia-smi is missing or lists no device)" >&2
  exit 1
fi
nvidia-smi -L

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTOLLGATE_CUDA=ON >/dev/null
cmake --build "$BUILD" --target tollgate tollgate_kernel_gpu_tests tollgate_engine_bench

# The kernel table and the whole-model tests on the device; exit 77 means it
# found no usable device after all: a failure here.
"$BUILD/tests/tollgate_kernel_gpu_tests" || { echo "gpu.sh: the kernel tests failed on the device (exit $?)" >&2; exit 1; }

mkdir -p "$MODELS"
for type in f16 q8_0; do
  model="$MODELS/bench-1b-$type.gguf"
  [ -f "$model" ] || "$BUILD/tollgate" model init --preset bench-1b --type "$type" --out "$model" >/dev/null
  echo "== bench-1b $type on the GPU"
  DEVICE=cuda "$BUILD/bench/tollgate_engine_bench" "$model" "$TOKENS" 1 16 64
  # The same decode without CUDA graphs: what launching ~15 kernels a layer costs.
  echo "== bench-1b $type on the GPU, graphs off"
  TOLLGATE_CUDA_GRAPHS=0 DEVICE=cuda "$BUILD/bench/tollgate_engine_bench" "$model" "$TOKENS" 1 16
done
