#!/usr/bin/env bash
# Build fastdrag_edit with CMake against the installed onnxruntime Python package's library.
#
#   bash export/cpp/build.sh [BUILD_DIR] [PREFIX]   (default: export/cpp/build; the program is BUILD_DIR/fastdrag_edit)
#
# With PREFIX, the build is then installed there (`cmake --install`): PREFIX/bin/fastdrag_edit, the library,
# the headers, ONNX Runtime's headers and library, and the CMake package `find_package(fastdrag_export)` finds.
#
# Headers: $ONNXRUNTIME_INCLUDE_DIR, else export/cpp/onnxruntime-headers (fetch_onnxruntime_headers.sh
# puts them there), else /usr/include/onnxruntime. Library: $ONNXRUNTIME_LIBRARY, else the Python
# package's capi/libonnxruntime.so.*, linked through BUILD_DIR/onnxruntime-lib/libonnxruntime.so.1
# (the name the program looks for at run time). Needs a C++17 compiler, CMake and nlohmann-json
# (Debian: apt-get install g++ cmake nlohmann-json3-dev). The Python is $PYTHON, default python3.
# Exit status 3: a prerequisite is missing (the message names it); 1: the build itself failed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
missing() { echo "build.sh: $1" >&2; exit 3; }
command -v cmake > /dev/null || missing "no cmake (Debian: apt-get install cmake)"
command -v c++ > /dev/null || missing "no C++ compiler (Debian: apt-get install g++)"
echo '#include <nlohmann/json.hpp>' | c++ -std=c++17 -E -x c++ - > /dev/null 2>&1 \
  || missing "no nlohmann-json headers (Debian: apt-get install nlohmann-json3-dev)"
build="$(mkdir -p "${1:-$here/build}" && cd "${1:-$here/build}" && pwd)"
include="${ONNXRUNTIME_INCLUDE_DIR:-}"
if [ -z "$include" ]; then
  for candidate in "$here/onnxruntime-headers" /usr/include/onnxruntime; do
    if [ -f "$candidate/onnxruntime_cxx_api.h" ]; then include="$candidate"; break; fi
  done
fi
[ -n "$include" ] || missing "no ONNX Runtime headers: run bash $here/fetch_onnxruntime_headers.sh, or set ONNXRUNTIME_INCLUDE_DIR"
library="${ONNXRUNTIME_LIBRARY:-}"
if [ -z "$library" ]; then
  library="$("${PYTHON:-python3}" -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[-1])' 2> /dev/null)" \
    || missing "no ONNX Runtime library: pip install onnxruntime (with \$PYTHON, default python3), or set ONNXRUNTIME_LIBRARY"
  mkdir -p "$build/onnxruntime-lib"
  ln -sf "$library" "$build/onnxruntime-lib/libonnxruntime.so.1"
  library="$build/onnxruntime-lib/libonnxruntime.so.1"
fi
cmake -S "$here" -B "$build" -DONNXRUNTIME_INCLUDE_DIR="$include" -DONNXRUNTIME_LIBRARY="$library" > "$build/configure.log"
cmake --build "$build" -j 2 > "$build/build.log" || { cat "$build/build.log" >&2; exit 1; }
if [ -n "${2:-}" ]; then
  cmake --install "$build" --prefix "$2" > "$build/install.log" || { cat "$build/install.log" >&2; exit 1; }
  echo "$(cd "$2" && pwd)/bin/fastdrag_edit"
else
  echo "$build/fastdrag_edit"
fi
