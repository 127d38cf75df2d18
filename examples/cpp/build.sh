#!/usr/bin/env bash
# Build the C++ example into examples/cpp/build (git-ignored):
#   1. assemble the ONNX Runtime SDK folder (setup_ort_sdk.sh; skipped with a message if the
#      headers cannot be had: the libtorch executable is still built),
#   2. configure with CMake against that SDK and the torch wheel's libtorch,
#   3. build. Prints the paths of the executables it built.
# Environment: PYTHON (default python), LATKIT_CPP_BUILD (build folder), ORT_ROOT (use an
# existing ONNX Runtime release instead of the assembled SDK), JOBS (default 2).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${LATKIT_CPP_BUILD:-$here/build}"
python="${PYTHON:-python}"
mkdir -p "$build"

for tool in cmake c++; do
    if ! command -v "$tool" >/dev/null; then
        echo "build.sh: $tool not found" >&2
        exit 3
    fi
done

if [[ -z "${ORT_ROOT:-}" ]]; then
    if ORT_ROOT="$(LATKIT_CPP_BUILD="$build" PYTHON="$python" "$here/setup_ort_sdk.sh" 2>"$build/ort-sdk.log" | tail -n 1)"; then
        :
    else
        echo "build.sh: ONNX Runtime SDK unavailable ($(tail -n 1 "$build/ort-sdk.log")); building libtorch only" >&2
        ORT_ROOT="$build/no-ort"
    fi
fi

torch_prefix="$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)"

cmake -S "$here" -B "$build/cmake" -DCMAKE_BUILD_TYPE=Release \
      -DORT_ROOT="$ORT_ROOT" -DCMAKE_PREFIX_PATH="$torch_prefix" >"$build/cmake-configure.log" 2>&1 \
    || { cat "$build/cmake-configure.log" >&2; exit 1; }
grep -E "latkit:" "$build/cmake-configure.log" >&2 || true
cmake --build "$build/cmake" -j "${JOBS:-2}" >"$build/cmake-build.log" 2>&1 \
    || { tail -n 40 "$build/cmake-build.log" >&2; exit 1; }

for exe in latkit_predict_ort latkit_predict_ts; do
    if [[ -x "$build/cmake/$exe" ]]; then
        echo "$build/cmake/$exe"
    fi
done
