#!/usr/bin/env bash
# The GPU checks of a lent-device session, as named groups run in order within one deadline.
#
#   bash bench/gpu_session.sh GROUPS OUT [SECONDS]
#
# GROUPS is a comma-separated list of these, run in the order given:
#   kernel-tests     tests/test_kernels_triton.py: Triton vs references (decides the CUDA default, #3)
#   gpu-tests        tests/test_gpu.py: no host sync in the drag loop, CUDA graphs, an fp16 edit
#   attention-tests  tests/test_attention.py: SDPA and xformers reference-attention processors
#   parallel-tests   the three test groups above at once (tests.txt), and beside them the toy quality
#                    benchmark on the fast and the reference path with their paired comparison
#                    (toy_quality.txt): correctness only, so they may share the GPU and save minutes
#   kernel-bench     bench/test_kernels.py: fused vs reference at the SD shape (the >= 10x target)
#   stage-bench      bench/test_stages.py -k "not edit" --model sd15: one step of each stage
#   edit-bench       bench/test_stages.py -k edit --model sd15: first and repeated edit (the 3 s / 1 s / 8 GB targets;
#                    with its FLOP counts it did not fit 240 s on an H200)
#   edit-timing      bench/edit_timing.py on SD 1.5: the same targets, for two variants, each in its own process
#                    (the defaults, the LoRA run unmerged, FASTDRAG_HALF_NORMS=1; TIMING_VARIANTS overrides them, e.g.
#                    `nchw:channels_last=false`; compiled UNet blocks, `compiled:compile_blocks=true`, did not
#                    finish compiling in 205 s on the H100)
#   memory-origins   bench/memory_origins.py on SD 1.5: the segments the process reserves after warm_up() and an edit,
#                    each with its pool and the code that reserved it, in the log
#   attention-bench  bench/test_attention.py --model sd15 (with the SDPA backends at SD 1.5's attention calls,
#                    forward and backward, under each sdpa_priority: ATTENTION_K="sdpa_priority" runs those alone)
#   profile          bench/profile_stages.py on SD 1.5: each stage's kernel time by kind (convolution, matmul,
#                    attention, normalisation, layout copies, ...), in the log
#   toy              starts the toy UNet's 256-px training in the background (TOY_SECONDS, default 180);
#                    name it before test groups only: benchmarks wait for it to finish
# or an alias for several: all (the test and benchmark groups one by one: no toy, parallel-tests or edit-timing), tests (the three test
# groups), checks (toy + tests + kernel-bench), stages (the three SD 1.5 benchmark groups),
# lease (parallel-tests, profile, edit-timing: the kernel, step and attention benchmarks were measured on
# 2026-11-26 and are left out to fit one call).
# E.g. `bash bench/gpu_session.sh lease "$OUT" 540`. Benchmarks run with FASTDRAG_KERNELS=triton
# unless it is set: the fast path is what they are for.
#
# SECONDS (default 540) bounds the whole run: each group gets its own limit or what is left, and a
# group that cannot get 30 s is skipped with a line in the log. Run from the repository root on a
# CUDA machine. Expects diffusers/xformers installed or as wheels in .whl/ (the device machine has
# no package index: fetch them here with `bash bench/fetch_wheels.sh` and carry .whl). Writes to
# OUT: log.txt, tests.txt, toy_quality.txt, edit_timing.json, bench_*.json (pytest-benchmark), and for the
# toy group toy_train.txt and toy_unet.tar. parallel-tests' toy cases, toy paths and test files are
# TOY_CASES (default 4), TOY_PATHS (default "fast half reference"; "fused" adds the fast path with
# --fused-unet-kernels) and TEST_FILES (default "kernels_triton gpu attention"); TEST_K a -k filter to every test
# file (e.g. "not compiled_blocks": that test does not finish compiling beside the others); TOY_ARGS adds options to
# the fast path's toy runs. PROFILE_ARGS adds options to the profile group, BENCH_K a -k filter to kernel-bench,
# ATTENTION_K one to attention-bench.
set -u
groups=${1:?groups, e.g. all}
out=${2:?output folder}
deadline=$((SECONDS + ${3:-540}))
toy_seconds=${TOY_SECONDS:-180}
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
# the package without installing it (the device machine): kernels/ and export/ are fastdrag.kernels and
# fastdrag.export; an installed checkout (pip install -e .) already maps them
# (checked from / : a warm machine keeps the links from an earlier call, and a script run from bench/ does not
# see the working directory)
# (a folder holding only a link to fastdrag/ goes on the path, not the root: the root's kernels/ would shadow
# Hugging Face's `kernels` package, which transformers >= 5.2x requires)
if ! (cd / && python3 -c "import fastdrag.kernels, fastdrag.export" 2>/dev/null); then
    [ -e fastdrag/kernels ] || ln -s ../kernels fastdrag/kernels
    [ -e fastdrag/export ] || ln -s ../export fastdrag/export
    mkdir -p /tmp/fastdrag-path && ln -sfn "$PWD/fastdrag" /tmp/fastdrag-path/fastdrag
    export PYTHONPATH="/tmp/fastdrag-path${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    python3 -m fastdrag.cli info
    python3 -c "import torch, xformers.ops as x; q = torch.randn(1, 64, 8, 40, device='cuda', dtype=torch.half); \
print('xformers attention ok', float((x.memory_efficient_attention(q, q, q) - torch.nn.functional.scaled_dot_product_attention(\
q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)).transpose(1, 2)).abs().max()))"
} >>"$log" 2>&1

toy_pid=""
start_toy() {
    # The lever for *moved* this tries (bench/RESULTS.md, sixth session): D continued on 256 px scenes, where a
    # drag spans twice the feature pixels; judge it with `fastdrag toy eval --world-size 256`. Tests only check
    # numbers, so sharing the GPU with them is harmless; benchmarks wait for it (finish_toy).
    (timeout $((toy_seconds + 120)) python3 -m fastdrag.cli toy train --out /tmp/toy --vae-from toy --unet-from toy \
        --scene-size 256 --unet-batch 32 --scenes 20000 --seed 2 --time-budget "$toy_seconds" --quiet \
        >"$out/toy_train.txt" 2>&1; echo "toy train exit $?" >>"$out/toy_train.txt") &
    toy_pid=$!
}
finish_toy() {
    [ -n "$toy_pid" ] || return 0
    wait "$toy_pid"
    toy_pid=""
    python3 - /tmp/toy/unet-checkpoint.pt >>"$out/toy_train.txt" 2>&1 <<'EOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
print("unet steps", state["step"], "of", state["total"])
EOF
    tar -C /tmp/toy -cf "$out/toy_unet.tar" unet.safetensors unet.json 2>>"$log"
}

# run NAME LIMIT CMD...: CMD under min(LIMIT, time left), its output in the log, its exit status after it
run() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS - 10))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "== $name skipped: $left s left" >>"$log"
        return
    fi
    echo "== $name (limit $limit s)" >>"$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "== $name exit $? after $((SECONDS - group_start)) s" >>"$log"
}

# one pytest per file, each test under a thread-method timeout: a hang (a GPU kernel that never returns
# cannot be interrupted by a signal) costs one file, not the session
test_file=(python3 -m pytest -v -rfsP --tb=short --durations=5 --timeout 100 --timeout-method thread -p no:cacheprovider
    ${TEST_K:+-k "$TEST_K"})
bench_file=(env "FASTDRAG_KERNELS=${FASTDRAG_KERNELS:-triton}" python3 -m pytest -q -p no:cacheprovider --benchmark-only)

# correctness checks that may share the GPU, at once: the three test files, and the toy quality
# benchmark (TOY_CASES cases, default 4) on the fast path (the defaults: fp16, CUDA graphs, Triton,
# xformers), on the reference path (fp32, eager, reference kernels, SDPA) and on the fast path with
# FASTDRAG_HALF_NORMS=1, then their paired comparisons. PARALLEL_SECONDS (default 210) bounds them:
# the reference path took 21 s a case on an H100 and did not finish 6 cases in 180 s beside the
# tests. Outputs: tests.txt, toy_quality.txt under OUT (the device brings back 8 files at most);
# summaries in the log.
parallel_tests() {
    local left=$((deadline - SECONDS - 10)) limit=${PARALLEL_SECONDS:-210} file pids=() parts=()
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 30 ]; then
        echo "== parallel-tests skipped: $left s left" >>"$log"
        return
    fi
    echo "== parallel-tests (limit $limit s)" >>"$log"
    # six processes share 16 cores: at torch's default of one thread per core, CPU-side work (a test's
    # CPU model, the host side of eager loops) oversubscribed them and a CPU test hit its timeout
    local -x OMP_NUM_THREADS=3
    for file in ${TEST_FILES:-kernels_triton gpu attention}; do
        (timeout "$limit" "${test_file[@]}" "tests/test_$file.py" >"$out/tests_$file.txt" 2>&1
            echo "== tests/test_$file.py exit $?" >>"$out/tests_$file.txt") &
        pids+=($!)
    done
    rm -rf /tmp/toy-fast /tmp/toy-reference /tmp/toy-half /tmp/toy-fused /tmp/lora-fast /tmp/lora-reference \
        /tmp/lora-half /tmp/lora-fused
    # each path trains its own LoRA; TOY_PATHS (default "fast half reference") names the paths run
    local paths=" ${TOY_PATHS:-fast half reference} "
    # shellcheck disable=SC2086  # TOY_ARGS: extra options of the fast path's run, e.g. "--cuda-graph-vae true"
    [[ "$paths" == *" fast "* ]] && (timeout "$limit" python3 -m fastdrag.cli toy eval --cases "${TOY_CASES:-4}" --quiet --cache-dir /tmp/lora-fast \
        --out /tmp/toy-fast ${TOY_ARGS:-} >"$out/toy_fast.txt" 2>&1
        echo "== toy eval, fast path, exit $?" >>"$out/toy_fast.txt") &
    pids+=($!)
    [[ "$paths" == *" half "* ]] && (FASTDRAG_HALF_NORMS=1 timeout "$limit" python3 -m fastdrag.cli toy eval --cases "${TOY_CASES:-4}" --quiet \
        --cache-dir /tmp/lora-half --out /tmp/toy-half >"$out/toy_half.txt" 2>&1
        echo "== toy eval, fast path with FASTDRAG_HALF_NORMS=1, exit $?" >>"$out/toy_half.txt") &
    pids+=($!)
    # shellcheck disable=SC2086
    [[ "$paths" == *" fused "* ]] && (timeout "$limit" python3 -m fastdrag.cli toy eval --cases "${TOY_CASES:-4}" --quiet \
        --cache-dir /tmp/lora-fused --out /tmp/toy-fused --fused-unet-kernels ${TOY_ARGS:-} >"$out/toy_fused.txt" 2>&1
        echo "== toy eval, fast path with --fused-unet-kernels, exit $?" >>"$out/toy_fused.txt") &
    pids+=($!)
    [[ "$paths" == *" reference "* ]] && (FASTDRAG_KERNELS=reference timeout "$limit" python3 -m fastdrag.cli toy eval --cases "${TOY_CASES:-4}" --quiet \
        --dtype fp32 --cuda-graphs false --attention-backend sdpa --cache-dir /tmp/lora-reference \
        --out /tmp/toy-reference >"$out/toy_reference.txt" 2>&1
        echo "== toy eval, reference path, exit $?" >>"$out/toy_reference.txt") &
    pids+=($!)
    wait "${pids[@]}"
    for file in ${TEST_FILES:-kernels_triton gpu attention}; do
        tail -n 2 "$out/tests_$file.txt" >>"$log"
        parts+=("$out/tests_$file.txt")
    done
    cat "${parts[@]}" >"$out/tests.txt" && rm -f "${parts[@]}"
    {
        cat "$out/toy_fast.txt" "$out/toy_reference.txt" "$out/toy_half.txt" "$out/toy_fused.txt"
        echo "== fast path against the reference path, paired:"
        python3 -m fastdrag.cli toy compare /tmp/toy-reference /tmp/toy-fast
        echo "== fast path with half-precision norms against the fast path, paired:"
        python3 -m fastdrag.cli toy compare /tmp/toy-fast /tmp/toy-half
        echo "== fast path with fused UNet kernels against the fast path, paired:"
        python3 -m fastdrag.cli toy compare /tmp/toy-fast /tmp/toy-fused
        echo "== fast path against the shipped CPU results (bench/results/toy), paired:"
        python3 -m fastdrag.cli toy compare bench/results/toy /tmp/toy-fast
    } >"$out/toy_quality.txt" 2>&1
    rm -f "$out/toy_fast.txt" "$out/toy_reference.txt" "$out/toy_half.txt" "$out/toy_fused.txt"
    grep "^== toy eval" "$out/toy_quality.txt" >>"$log"
    echo "== parallel-tests done after $((SECONDS - group_start)) s" >>"$log"
}

# bench/edit_timing.py for each variant in a process of its own (one process for all of them let
# later variants' peak memory include what earlier ones left behind), merged into edit_timing.json.
# TIMING_VARIANTS (space-separated NAME:KEY=VALUE,...) overrides the list; a variant that compiles
# gets 240 s (its warm_up() pays the compilation), one with fused UNet kernels 150 s, the others 75 s.
edit_timing() {
    local variant limit parts=()
    for variant in ${TIMING_VARIANTS:-defaults unmerged:merge_lora=false half-norms:half_norms=true}; do
        limit=75
        [[ "$variant" != *compile_blocks=true* ]] || limit=240
        # the fused UNet kernels' Triton compilation (27 variants at SD 1.5) is paid in the first such process
        [[ "$variant" != *fused_* ]] || limit=150
        run "edit-timing ${variant%%:*}" "$limit" env "FASTDRAG_KERNELS=${FASTDRAG_KERNELS:-triton}" python3 \
            bench/edit_timing.py --variant "$variant" --json "$out/edit_timing_${variant%%:*}.json"
        parts+=("$out/edit_timing_${variant%%:*}.json")
    done
    python3 - "$out/edit_timing.json" "${parts[@]}" >>"$log" 2>&1 <<'EOF'
import json, os, sys
rows = []
for part in sys.argv[2:]:
    if os.path.exists(part):
        rows += json.load(open(part))
        os.remove(part)
if rows:
    json.dump(rows, open(sys.argv[1], "w"), indent=1)
EOF
    # the table of bench/RESULTS.md, from the rows just written
    [[ ! -s "$out/edit_timing.json" ]] || python3 bench/timing_table.py "$out/edit_timing.json" >>"$log" 2>&1
}

expand() {
    case "$1" in
    all) echo kernel-tests gpu-tests attention-tests kernel-bench stage-bench edit-bench attention-bench profile ;;
    tests) echo kernel-tests gpu-tests attention-tests ;;
    checks) echo toy kernel-tests gpu-tests attention-tests kernel-bench ;;
    stages) echo stage-bench edit-bench attention-bench ;;
    lease) echo parallel-tests profile edit-timing ;;
    *) echo "$1" ;;
    esac
}
IFS=, read -r -a listed <<<"$groups"
names=()
for name in "${listed[@]}"; do
    read -r -a expanded <<<"$(expand "$name")"
    names+=("${expanded[@]}")
done
echo "groups: ${names[*]}; $((deadline - SECONDS)) s" >>"$log"
for name in "${names[@]}"; do
    group_start=$SECONDS
    case "$name" in
    toy) start_toy ;;
    kernel-tests) run "$name" 240 "${test_file[@]}" tests/test_kernels_triton.py ;;
    gpu-tests) run "$name" 200 "${test_file[@]}" tests/test_gpu.py ;;
    attention-tests) run "$name" 120 "${test_file[@]}" tests/test_attention.py ;;
    parallel-tests) parallel_tests ;;
    *-bench | edit-timing | profile | memory-origins)
        finish_toy
        case "$name" in
        kernel-bench) run "$name" 200 "${bench_file[@]}" bench/test_kernels.py ${BENCH_K:+-k "$BENCH_K"} \
            --benchmark-json "$out/bench_kernels.json" ;;
        stage-bench) run "$name" 200 "${bench_file[@]}" bench/test_stages.py -k "not edit" --model sd15 \
            --benchmark-json "$out/bench_steps.json" ;;
        edit-bench) run "$name" 240 "${bench_file[@]}" bench/test_stages.py -k edit --model sd15 \
            --benchmark-json "$out/bench_edits.json" ;;
        attention-bench) run "$name" 90 "${bench_file[@]}" bench/test_attention.py --model sd15 \
            ${ATTENTION_K:+-k "$ATTENTION_K"} --benchmark-json "$out/bench_attention.json" ;;
        edit-timing) edit_timing ;;
        # shellcheck disable=SC2086  # PROFILE_ARGS: e.g. "--fused-unet-kernels"
        profile) run "$name" 100 python3 bench/profile_stages.py ${PROFILE_ARGS:-} ;;
        memory-origins) run "$name" 150 python3 bench/memory_origins.py --edits 1 ;;
        *) echo "unknown group $name" >>"$log" ;;
        esac
        ;;
    *) echo "unknown group $name" >>"$log" ;;
    esac
done
finish_toy
nvidia-smi --query-gpu=memory.used --format=csv >>"$log" 2>&1 || true
