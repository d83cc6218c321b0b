"""Every Triton kernel compiles for an H100 (sm_90) with Triton's own compiler, on this CPU.

The other kernel tests run Triton's interpreter, which accepts code the compiler rejects; these run
`fastdrag.kernels.compile_check` in a process without `TRITON_INTERPRET`, since under it `triton.jit`
makes functions that cannot be compiled.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastdrag.kernels.compile_check import nvidia_tool, ptx_access_widths

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"

needs_compiler = pytest.mark.skipif(
    nvidia_tool("ptxas") is None,
    reason="no triton with its NVIDIA backend's ptxas here: the kernels cannot be compiled for a GPU")


def _run(args, tmp_path, script=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "fastdrag.kernels.compile_check", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _jit_kernels_launched_by_wrappers():
    """Names of the `@triton.jit` functions whose name a module launches as `name[grid](...)`."""
    names = set()
    for path in KERNELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("_")):
                names.add(node.func.value.id)
    return names


def test_ptx_access_widths_count_global_accesses_by_vector_width_and_element_size():
    ptx = """
        ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
        ld.global.nc.v2.f32 { %f1, %f2 }, [ %rd3 ];
        st.global.b16 [ %rd4 + 0 ], { %rs2 };
        ld.shared.v4.b32 { %r5, %r6, %r7, %r8 }, [ %r9 ];
    """
    assert ptx_access_widths(ptx) == {"ld": {16: 1, 128: 1, 64: 1}, "st": {16: 1}}  # shared memory left out
    assert ptx_access_widths("st.global.v2.b32 [ %rd1 ], { %r1, %r2 };") == {"ld": {}, "st": {64: 1}}
    assert ptx_access_widths("mov.u32 %r1, 0;") == {"ld": {}, "st": {}}


@needs_compiler
def test_every_kernel_compiles_for_sm90(tmp_path):
    report_file = tmp_path / "report.json"
    cases = ["drag loop fp16", "group norm fp16 channels-last", "layer norm fp16", "geglu fp16"]
    result = _run([f"--case={case}" for case in cases] + ["--json", str(report_file)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_file.read_text())
    assert report["arch"] == 90 and report["failures"] == []
    compiled = {v["kernel"] for v in report["variants"]}
    launched = _jit_kernels_launched_by_wrappers()
    assert launched and launched <= compiled, f"launched but not compiled: {sorted(launched - compiled)}"
    # the elementwise kernels' reads and writes are vectorised: 16 bytes per thread
    widths = {(v["kernel"], v["widest_load_bits"], v["widest_store_bits"]) for v in report["variants"]}
    for kernel in ("_geglu_forward", "_geglu_backward", "_masked_l1_backward"):
        assert (kernel, 128, 128) in widths, sorted(widths)
    # no kernel spills registers to local memory (point tracking did, with 4 warps: 1016 B a thread)
    resources = [(v["kernel"], v["registers"], v["stack_bytes"]) for v in report["variants"]]
    if all(registers is not None for _, registers, _ in resources):
        assert all(0 < registers <= 255 and stack == 0 for _, registers, stack in resources), resources


@needs_compiler
def test_compile_check_reports_what_only_the_compiler_rejects(tmp_path):
    """A kernel that reads a plain float global runs under the interpreter but does not compile;
    the check names the case and the cause, and still compiles the good case beside it."""
    (tmp_path / "kernels_under_test.py").write_text(textwrap.dedent("""
        import torch
        import triton
        import triton.language as tl

        SCALE = 0.5
        GOOD_SCALE = tl.constexpr(0.5)

        @triton.jit
        def _scaled(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * SCALE, mask=offsets < n)

        @triton.jit
        def _scaled_constexpr(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n) * GOOD_SCALE, mask=offsets < n)

        def launch(kernel):
            x = torch.randn(1000)
            kernel[(4,)](x, torch.empty_like(x), x.numel(), BLOCK=256)
    """))
    script = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, ".")
        import kernels_under_test as k
        from fastdrag.kernels.compile_check import check
        report = check(90, {"plain global": lambda: k.launch(k._scaled),
                            "constexpr global": lambda: k.launch(k._scaled_constexpr)})
        print(json.dumps({"failures": report.failures, "kernels": report.kernels()}))
    """)
    result = _run([], tmp_path, script=script)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kernels"] == ["_scaled_constexpr"]
    [(case, error)] = report["failures"]
    assert case == "plain global" and "SCALE" in error and "global variable" in error


def test_compile_check_refuses_the_interpreter(monkeypatch):
    from fastdrag.kernels.compile_check import check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        check(90, {})
