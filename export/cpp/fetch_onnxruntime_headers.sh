#!/usr/bin/env bash
# Put ONNX Runtime's C and C++ API headers in export/cpp/onnxruntime-headers (or $1).
#
# The onnxruntime Python package ships the library (capi/libonnxruntime.so.*) but no headers. Debian
# packages them (libonnxruntime-dev, from Debian 13 "trixie" on); this downloads that package with apt
# into a private folder, without installing it or adding an apt source to the system, and unpacks
# its include folder. The headers are ONNX Runtime 1.21's: ONNX Runtime's C API is versioned and a
# program built with older headers runs on a newer library (it asks for API version 21).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/onnxruntime-headers}"
if [ -f "$dest/onnxruntime_cxx_api.h" ]; then
  echo "ONNX Runtime headers already in $dest"
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_options=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1
             -o APT::Sandbox::User=root)
apt-get "${apt_options[@]}" -qq update
(cd "$work" && apt-get "${apt_options[@]}" -qq download libonnxruntime-dev)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$work/unpacked"
mkdir -p "$dest"
cp -r "$work/unpacked/usr/include/onnxruntime/." "$dest/"
echo "ONNX Runtime headers ($(ls "$work"/libonnxruntime-dev_*.deb | xargs -n1 basename)) in $dest"
