#!/bin/sh
# Configures and builds into build/ (or build-asan/ with --sanitize).
set -eu
cd "$(dirname "$0")/.."
dir=build
extra=""
if [ "${1:-}" = "--sanitize" ]; then
  dir=build-asan
  extra="-DTOLLGATE_SANITIZE=ON"
fi
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $extra
fi
cmake --build "$dir" -j "$(nproc)"
