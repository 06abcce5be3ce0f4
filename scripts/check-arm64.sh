#!/bin/sh
# Cross-compiles the local engine (kernels/, local_engine/) for arm64 (Graviton,
# Docker on Apple silicon) into build-arm64/, warnings as errors: the x86
# kernels and the CPUID code must stay behind their guards, and the portable
# kernels must build and resolve every engine symbol on their own. Installs
# Debian's g++-aarch64-linux-gnu when it is missing. Compiles only: it runs
# nothing.
#   scripts/check-arm64.sh
set -eu
cd "$(dirname "$0")/.."
cxx=aarch64-linux-gnu-g++
nm=aarch64-linux-gnu-nm
dir=build-arm64

if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "check-arm64: installing g++-aarch64-linux-gnu" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q g++-aarch64-linux-gnu >/dev/null
fi

cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTOLLGATE_ENGINE_ONLY=ON \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS=-Werror >/dev/null
cmake --build "$dir" -j "$(nproc)" --target tollgate_local_engine

# The libraries are static, so nothing has linked them yet: every engine
# symbol they use (a kernel the dispatcher calls, say) must be defined in one.
libs=$(find "$dir" -name 'libtollgate_*.a')
$nm --defined-only $libs 2>/dev/null | awk 'NF == 3 && $2 != "U" { print $3 }' | sort -u >"$dir/defined.txt"
$nm --undefined-only $libs 2>/dev/null | awk '$1 == "U" { print $2 }' | grep 8tollgate | sort -u >"$dir/used.txt" || true
missing=$(comm -23 "$dir/used.txt" "$dir/defined.txt")
if [ -n "$missing" ]; then
  echo "check-arm64: engine symbols used but not built for arm64:" >&2
  echo "$missing" | c++filt >&2
  exit 1
fi
if find "$dir" -name 'cpu_ops_avx*.o' -o -name 'cpu_ops_amx*.o' | grep -q .; then
  echo "check-arm64: x86 kernels were built for arm64" >&2
  exit 1
fi
echo "check-arm64: the engine builds for arm64 with the portable kernels"
