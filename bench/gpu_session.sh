#!/usr/bin/env bash
# The GPU checks of one lent-device session, in two parts that each fit one call.
#
#   bash bench/gpu_session.sh checks OUT [TOY_SECONDS]   # GPU tests + kernel benchmarks (+ toy UNet training meanwhile)
#   bash bench/gpu_session.sh tests OUT                  # the GPU tests alone (per-test timeout, durations)
#   bash bench/gpu_session.sh stages OUT                 # SD 1.5 stage/edit and attention benchmarks
#
# Run from the repository root on a CUDA machine. Expects diffusers/xformers either installed or
# as wheels in .whl/ (the device machine has no package index: fetch them here with
# `bash bench/fetch_wheels.sh` and carry .whl). Writes at most a few files to OUT:
# log.txt, *.json (pytest-benchmark), toy_train.txt and toy_unet.tar.
set -u
part=${1:?checks or stages}
out=${2:?output folder}
toy_seconds=${3:-180}
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$log" 2>&1 || echo "wheel install failed" >>"$log"
    export PYTHONPATH=/tmp/site
fi
if ls .whl/cudart12/*.whl >/dev/null 2>&1; then
    # xformers 0.0.35 is built for CUDA 12.8 (bench/fetch_wheels.sh): its libcudart.so.12 beside the image's CUDA 13
    python3 - .whl/cudart12/*.whl >>"$log" 2>&1 <<'EOF'
import sys, zipfile
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall("/tmp/cudart12", [n for n in archive.namelist() if "/lib/" in n])
EOF
    export LD_LIBRARY_PATH="/tmp/cudart12/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# the package without installing it: kernels/ and export/ are fastdrag.kernels and fastdrag.export
[ -e fastdrag/kernels ] || ln -s ../kernels fastdrag/kernels
[ -e fastdrag/export ] || ln -s ../export fastdrag/export
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -m fastdrag.cli info
    python3 -c "import torch, xformers.ops as x; q = torch.randn(1, 64, 8, 40, device='cuda', dtype=torch.half); \
print('xformers attention ok', float((x.memory_efficient_attention(q, q, q) - torch.nn.functional.scaled_dot_product_attention(\
q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)).transpose(1, 2)).abs().max()))"
} >>"$log" 2>&1

run_gpu_tests() {
    # One pytest per file, so a hang in one file (a GPU kernel that never returns cannot be
    # interrupted by a signal) still leaves the other files' failure reports in the log.
    for file in tests/test_gpu.py tests/test_attention.py tests/test_kernels_triton.py; do
        timeout 150 python3 -m pytest -v -rfs --tb=short --timeout 100 --timeout-method thread -p no:cacheprovider \
            "$file" >>"$log" 2>&1
        echo "$file exit $?" >>"$log"
    done
}

case "$part" in
checks)
    # toy UNet training (GPU) while the tests run; the tests only check numbers, so sharing the GPU is harmless.
    # The lever for *moved* this tries (bench/RESULTS.md, sixth session): D continued on 256 px scenes, where a
    # drag spans twice the feature pixels; judge it with `fastdrag toy eval --world-size 256`.
    (timeout $((toy_seconds + 120)) python3 -m fastdrag.cli toy train --out /tmp/toy --vae-from toy --unet-from toy \
        --scene-size 256 --unet-batch 32 --scenes 20000 --seed 2 --time-budget "$toy_seconds" --quiet \
        >"$out/toy_train.txt" 2>&1; echo "toy train exit $?" >>"$out/toy_train.txt") &
    toy=$!
    run_gpu_tests
    wait $toy
    python3 - /tmp/toy/unet-checkpoint.pt >>"$out/toy_train.txt" 2>&1 <<'EOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
print("unet steps", state["step"], "of", state["total"])
EOF
    tar -C /tmp/toy -cf "$out/toy_unet.tar" unet.safetensors unet.json 2>>"$log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider bench/test_kernels.py --benchmark-only \
        --benchmark-json "$out/bench_kernels.json" >>"$log" 2>&1
    echo "kernel benchmarks exit $?" >>"$log"
    ;;
tests)
    run_gpu_tests
    ;;
stages)
    # three pytest runs, each with its own JSON: a hang or a timeout loses one group, not all
    for group in "steps:bench/test_stages.py:not edit:200" "edits:bench/test_stages.py:edit:240" \
                 "attention:bench/test_attention.py::90"; do
        IFS=: read -r name file select seconds <<<"$group"
        timeout "$seconds" python3 -m pytest -q -p no:cacheprovider "$file" ${select:+-k "$select"} --benchmark-only \
            --model sd15 --benchmark-json "$out/bench_$name.json" >>"$log" 2>&1
        echo "stage benchmarks ($name) exit $?" >>"$log"
    done
    ;;
esac
nvidia-smi --query-gpu=memory.used --format=csv >>"$log" 2>&1
