#!/usr/bin/env bash
# Assemble a small ONNX Runtime C++ SDK folder in examples/cpp/build/ort-sdk (git-ignored):
#   lib/      libonnxruntime.so(.1) -> the library shipped in the onnxruntime(-gpu) Python wheel
#   include/  the C/C++ API headers from Debian trixie's libonnxruntime-dev (.deb unpacked,
#             fetched with a private apt state; nothing is installed system-wide)
# An older header works with a newer library (the C API is versioned); not the reverse.
# Users with an official ONNX Runtime release skip this and pass -DORT_ROOT=/path/to/it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${LATKIT_CPP_BUILD:-$here/build}"
sdk="$build/ort-sdk"
python="${PYTHON:-python}"

mkdir -p "$sdk/lib" "$sdk/include"

# 1. The library from the installed wheel.
lib="$("$python" - <<'PY'
import pathlib, onnxruntime
capi = pathlib.Path(onnxruntime.__file__).parent / "capi"
libs = sorted(p for p in capi.glob("libonnxruntime.so*") if "providers" not in p.name)
print(libs[0] if libs else "")
PY
)"
if [[ -z "$lib" ]]; then
    echo "setup_ort_sdk: no libonnxruntime.so in the onnxruntime wheel" >&2
    exit 3
fi
ln -sf "$lib" "$sdk/lib/libonnxruntime.so.1"
ln -sf libonnxruntime.so.1 "$sdk/lib/libonnxruntime.so"

# 2. The headers, once.
if [[ ! -f "$sdk/include/onnxruntime_cxx_api.h" ]]; then
    if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
        echo "setup_ort_sdk: apt-get/dpkg-deb not available: cannot fetch the headers" >&2
        exit 3
    fi
    apt_root="$build/apt"
    mkdir -p "$apt_root/state/lists/partial" "$apt_root/cache/archives/partial" \
             "$apt_root/parts" "$apt_root/debs"
    : > "$apt_root/empty.list"
    # This machine's own Debian source, with the suite switched to trixie (bookworm has no
    # onnxruntime packages); no address is written into the project.
    src=""
    for f in /etc/apt/sources.list.d/*.sources; do
        if grep -q '^URIs:.*debian' "$f" 2>/dev/null; then src="$f"; break; fi
    done
    if [[ -z "$src" ]]; then
        echo "setup_ort_sdk: no Debian deb822 source in /etc/apt/sources.list.d" >&2
        exit 3
    fi
    awk 'BEGIN{RS=""; ORS="\n\n"} NR==1' "$src" \
        | sed -E 's/^Suites:.*/Suites: trixie/' > "$apt_root/parts/trixie.sources"
    apt_opts=(
        -o "Dir::State=$apt_root/state"
        -o "Dir::Cache=$apt_root/cache"
        -o "Dir::Etc::SourceList=$apt_root/empty.list"
        -o "Dir::Etc::SourceParts=$apt_root/parts"
        -o "Dir::State::status=$apt_root/state/status"
        -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root"
    )
    : > "$apt_root/state/status"
    apt-get -qq "${apt_opts[@]}" update
    (cd "$apt_root/debs" && apt-get -qq "${apt_opts[@]}" download libonnxruntime-dev)
    deb="$(ls "$apt_root"/debs/libonnxruntime-dev_*.deb | head -n 1)"
    dpkg-deb -x "$deb" "$apt_root/unpacked"
    cp -r "$apt_root/unpacked/usr/include/onnxruntime/." "$sdk/include/"
fi
echo "$sdk"
