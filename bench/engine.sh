#!/usr/bin/env bash
# The local engine's decode speed on a generated ~100M-parameter llama model,
# F32 and Q8_0: single stream as a fraction of the measured memory-bandwidth
# ceiling, and aggregate tokens/s at 1, 4 and 16 concurrent streams.
#   ./bench/engine.sh            # needs build/tollgate and build/bench/tollgate_engine_bench
#   TOKENS=128 ./bench/engine.sh
#   LARGE=0 ./bench/engine.sh      # without the 1.1B-parameter Q8_0 case
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
TOKENS=${TOKENS:-64}
MODELS=${MODELS:-/tmp/tollgate-bench-models}
LARGE=${LARGE:-1}  # 0: skip the 1.1B-parameter Q8_0 case
for b in "$BUILD/tollgate" "$BUILD/bench/tollgate_engine_bench"; do
  [ -x "$b" ] || { echo "engine.sh: $b is missing: build first (./scripts/build.sh)" >&2; exit 1; }
done
mkdir -p "$MODELS"
cases="bench-100m:f32 bench-100m:q8_0"
# A 134M-parameter Q8_0 model (116 MB) fits a large L3 (300 MiB here): then
# single-stream decode is not bound by memory. TinyLlama-1.1B's shape in Q8_0
# (1.1 GB) is, as a real model is.
[ "$LARGE" = 1 ] && cases="$cases bench-1b:q8_0"
for c in $cases; do
  preset=${c%%:*} type=${c#*:}
  model="$MODELS/$preset-$type.gguf"
  [ -f "$model" ] || "$BUILD/tollgate" model init --preset "$preset" --type "$type" --out "$model" >/dev/null
  echo "== $preset $type"
  "$BUILD/bench/tollgate_engine_bench" "$model" "$TOKENS" 1 4 16
done
