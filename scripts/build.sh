#!/bin/sh
# Configures and builds into build/ (or build-asan/ with --sanitize).
set -eu
cd "$(dirname "$0")/.."
dir=build
extra=""
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  # The sanitizer build leaves out nvcc: no machine here runs its output.
  extra="-DTOLLGATE_SANITIZE=ON -DTOLLGATE_CUDA=OFF"
fi
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $extra
fi
cmake --build "$dir" -j "$(nproc)"
