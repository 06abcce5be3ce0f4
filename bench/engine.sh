#!/usr/bin/env bash
# The local engine's decode speed on a generated ~100M-parameter llama model,
# F32 and Q8_0: single stream as a fraction of the measured memory-bandwidth
# ceiling, and aggregate tokens/s at 1, 4 and 16 concurrent streams.
#   ./bench/engine.sh            # needs build/tollgate and build/bench/tollgate_engine_bench
#   TOKENS=128 ./bench/engine.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build}
TOKENS=${TOKENS:-64}
MODELS=${MODELS:-/tmp/tollgate-bench-models}
for b in "$BUILD/tollgate" "$BUILD/bench/tollgate_engine_bench"; do
  [ -x "$b" ] || { echo "engine.sh: $b is missing: build first (./scripts/build.sh)" >&2; exit 1; }
done
mkdir -p "$MODELS"
for type in f32 q8_0; do
  model="$MODELS/bench-100m-$type.gguf"
  [ -f "$model" ] || "$BUILD/tollgate" model init --preset bench-100m --type "$type" --out "$model" >/dev/null
  echo "== $type"
  "$BUILD/bench/tollgate_engine_bench" "$model" "$TOKENS" 1 4 16
done
