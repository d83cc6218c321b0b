#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels a lent GPU machine lacks, into .whl/
# (git-ignored; name it in the device call's `carry`). bench/gpu_session.sh installs them there.
#
#   bash bench/fetch_wheels.sh
#
# The device image has torch 2.11+cu130 but no diffusers or xformers. xformers 0.0.35 is built
# for CUDA 12.8 (its _C.so needs libcudart.so.12 and, for torch, only the stable C ABI), so the
# CUDA 12 runtime travels too, in .whl/cudart12/: gpu_session.sh unpacks its library and puts it
# on LD_LIBRARY_PATH rather than installing it over the image's CUDA 13 `nvidia` packages.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$@"
}
mkdir -p .whl/cudart12
download .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 xformers==0.0.35
download .whl/cudart12 nvidia-cuda-runtime-cu12==12.8.90
ls -l .whl .whl/cudart12
