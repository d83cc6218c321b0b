"""Compile every Triton kernel of `fastdrag.kernels` for an NVIDIA GPU, on a machine without one.

Triton's interpreter, which runs the kernels in the CPU tests, accepts code its compiler rejects (a
kernel reading a plain Python float global, for one), so a kernel can pass every CPU test and fail
at its first launch on a GPU. Here the kernels' own wrappers run at SD 1.5's sizes, forward and
backward, with every launch turned into a compilation: a stand-in driver names the target GPU and
each launch compiles (Triton's warm-up path: its front end, LLVM, and the ptxas it ships) without
running, so the outputs hold no values. Each compiled variant reports its PTX's global loads and
stores by the bits a thread moves in one (are its reads vectorised?) and, from its cubin, the
registers and stack a thread takes (does it spill? how many warps fit on a multiprocessor?): a static
look, not a timing.

    python -m fastdrag.kernels.compile_check [--arch 90] [--json FILE]

Run it in a process of its own with `TRITON_INTERPRET` unset: under the interpreter `triton.jit`
makes interpreted functions, which cannot be compiled. To check another Triton release (a GPU
machine's), install it beside this one (`pip install --no-deps --target DIR triton==X`) and run with
`PYTHONPATH=DIR`. It changes Triton's active driver and its
launch while it runs and restores both after.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

DEFAULT_ARCH = 90  # H100 / H200


@dataclass
class CompiledVariant:
    """One compiled specialisation of a kernel: what it was compiled for and what its PTX moves."""

    kernel: str
    case: str
    signature: Dict[str, str]
    constants: Dict[str, str]
    widest_load_bits: int
    widest_store_bits: int
    load_widths: Dict[int, int]  # bits per thread -> global load instructions in the PTX
    store_widths: Dict[int, int]
    registers: Optional[int]  # per thread, from the cubin (None without cuobjdump)
    stack_bytes: Optional[int]  # per thread: > 0 means registers spill to local memory


@dataclass
class CheckReport:
    arch: int
    variants: List[CompiledVariant] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (case, error)

    def kernels(self) -> List[str]:
        return sorted({v.kernel for v in self.variants})


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names a target, owns no device, launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Optional[int] = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")
_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def ptx_access_widths(ptx: str) -> Dict[str, Dict[int, int]]:
    """{"ld": {bits: instructions}, "st": {...}}: the global loads and stores in PTX text by the bits
    each thread moves per instruction (16 = one fp16 element, 128 = eight)."""
    widths: Dict[str, Dict[int, int]] = {"ld": {}, "st": {}}
    for op, lanes, bits in _WIDTH.findall(ptx):
        width = int(lanes or 1) * int(bits)
        widths[op][width] = widths[op].get(width, 0) + 1
    return widths


def _param_name(fn, path: Tuple[int, ...]) -> str:
    """A constant's parameter name (Triton keys constants by argument position)."""
    return fn.arg_names[path[0]] + "".join(f"[{i}]" for i in path[1:])


def nvidia_tool(name: str) -> Optional[Path]:
    """A binary that Triton's NVIDIA backend ships (`ptxas`, `cuobjdump`), or None without it."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return path if path.exists() else None


def cubin_resources(cubin: bytes) -> Tuple[Optional[int], Optional[int]]:
    """(registers, stack bytes) per thread of a cubin's kernel, read by the cuobjdump Triton ships;
    (None, None) without it."""
    cuobjdump = nvidia_tool("cuobjdump")
    if cuobjdump is None:
        return None, None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        listing = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
    found = _RESOURCES.search(listing)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


@contextlib.contextmanager
def compile_only(arch: int, record: Callable[[object, object], None]) -> Iterator[None]:
    """While inside, every Triton launch compiles for `sm_<arch>` and calls `record(fn, compiled)`
    instead of running. The functions' per-device caches are cleared on the way out, so nothing
    compiled for the stand-in target is launched later."""
    import triton.runtime.jit as jit
    from triton.runtime import driver

    if os.environ.get("TRITON_INTERPRET", "") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    touched = []
    real_run = jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        if self not in touched:
            touched.append(self)
        compiled = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        record(self, compiled)
        return compiled

    previous = driver._active  # None until something asks for the real driver, which needs a GPU
    driver.set_active(_CompileOnlyDriver(arch))
    jit.JITFunction.run = compile_instead
    try:
        yield
    finally:
        jit.JITFunction.run = real_run
        driver._active = previous
        for fn in touched:
            fn.device_caches.clear()


def all_cases() -> Dict[str, Callable[[], None]]:
    """What to compile: each wrapper at SD 1.5 / 512 px sizes, in the dtypes and layouts it meets."""
    from . import fused_geglu, fused_group_norm, fused_layer_norm, mask_term, motion_supervision, point_tracking

    def drag(dtype: torch.dtype) -> Callable[[], None]:
        def run() -> None:
            feat = torch.randn(1, 640, 64, 64, dtype=dtype, requires_grad=True)  # up_blocks[2] features
            handles = torch.tensor([[100.0, 120.0], [0.0, 255.0]])
            targets = torch.tensor([[110.0, 130.0], [5.0, 250.0]])
            loss = motion_supervision.motion_supervision_loss(feat, handles, targets, 1, (256, 256))
            loss.backward()
            anchors = point_tracking.point_features(feat.detach(), handles, (256, 256))
            point_tracking.track_points(feat.detach(), anchors, handles, 3, (256, 256))
            latent = torch.randn(1, 4, 64, 64, dtype=dtype, requires_grad=True)
            mask_term.masked_l1(latent, torch.randn(1, 4, 64, 64, dtype=dtype), torch.rand(64, 64, dtype=dtype)
                                ).backward()
        return run

    def group_norm(dtype: torch.dtype, channels_last: bool, affine_grads: bool) -> Callable[[], None]:
        def run() -> None:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            for channels, side in ((320, 64), (640, 32), (1280, 8)):
                x = torch.randn(4, channels, side, side, dtype=dtype).to(memory_format=layout).requires_grad_()
                weight = torch.randn(channels, dtype=dtype, requires_grad=affine_grads)
                bias = torch.randn(channels, dtype=dtype, requires_grad=affine_grads)
                for silu in (True, False):
                    fused_group_norm.group_norm(x, 32, weight, bias, 1e-5, silu).sum().backward()
        return run

    def layer_norm(dtype: torch.dtype, affine_grads: bool) -> Callable[[], None]:
        def run() -> None:
            for tokens, width in ((4096, 320), (1024, 640), (256, 1280)):  # a transformer block's tokens
                x = torch.randn(4, tokens, width, dtype=dtype, requires_grad=True)
                weight = torch.randn(width, dtype=dtype, requires_grad=affine_grads)
                bias = torch.randn(width, dtype=dtype, requires_grad=affine_grads)
                fused_layer_norm.layer_norm(x, weight, bias, 1e-5).sum().backward()
        return run

    def geglu(dtype: torch.dtype) -> Callable[[], None]:
        def run() -> None:
            x = torch.randn(4, 4096, 2560, dtype=dtype, requires_grad=True)
            fused_geglu.geglu(x).sum().backward()
        return run

    cases = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        cases[f"drag loop {name}"] = drag(dtype)
        cases[f"group norm {name} channels-last"] = group_norm(dtype, True, False)
        cases[f"layer norm {name}"] = layer_norm(dtype, False)
        cases[f"geglu {name}"] = geglu(dtype)
    cases["group norm fp16 NCHW, affine gradients"] = group_norm(torch.float16, False, True)
    cases["layer norm fp16, affine gradients"] = layer_norm(torch.float16, True)
    return cases


def check(arch: int = DEFAULT_ARCH, cases: Optional[Dict[str, Callable[[], None]]] = None) -> CheckReport:
    """Compile the kernels that each case launches (default: every wrapper, `all_cases()`) for
    `sm_<arch>`; a case that fails is recorded, not raised, so one report says all that does not compile."""
    report = CheckReport(arch)
    current = {"case": ""}

    def record(fn, compiled) -> None:
        src = compiled.src
        widths = ptx_access_widths(compiled.asm["ptx"])
        registers, stack = cubin_resources(compiled.asm["cubin"])
        report.variants.append(CompiledVariant(
            kernel=fn.__name__, case=current["case"],
            signature={k: str(v) for k, v in src.signature.items() if v != "constexpr"},
            constants={_param_name(fn, k): str(v) for k, v in src.constants.items()},
            widest_load_bits=max(widths["ld"], default=0), widest_store_bits=max(widths["st"], default=0),
            load_widths=widths["ld"], store_widths=widths["st"],
            registers=registers, stack_bytes=stack))

    with compile_only(arch, record):
        for name, run in (all_cases() if cases is None else cases).items():
            current["case"] = name
            try:
                run()
            except Exception as error:  # the report collects every failure
                report.failures.append((name, f"{type(error).__name__}: {error}"))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=DEFAULT_ARCH, help="compute capability, e.g. 80, 90, 100")
    parser.add_argument("--case", action="append", help="only this case (repeatable)")
    parser.add_argument("--json", help="write the report here as JSON")
    args = parser.parse_args(argv)
    cases = all_cases()
    unknown = sorted(set(args.case or []) - set(cases))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {sorted(cases)}")
    report = check(args.arch, {name: run for name, run in cases.items() if not args.case or name in args.case})
    seen = set()
    for v in report.variants:
        key = (v.kernel, tuple(sorted(v.signature.items())), tuple(sorted(v.constants.items())))
        if key in seen:
            continue
        seen.add(key)
        loads = " ".join(f"{n}x{bits}b" for bits, n in sorted(v.load_widths.items()))
        stores = " ".join(f"{n}x{bits}b" for bits, n in sorted(v.store_widths.items()))
        print(f"{v.kernel:22s} loads {loads or '-':18s} stores {stores or '-':12s} "
              f"registers {v.registers}, stack {v.stack_bytes} B; "
              f"{v.case}: {', '.join(f'{k}={c}' for k, c in v.constants.items())}")
    for case, error in report.failures:
        print(f"FAILED {case}:\n    " + "\n    ".join(error.splitlines()), file=sys.stderr)
    if args.json:
        from fastdrag.atomic import atomic_path
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"arch": report.arch, "variants": [asdict(v) for v in report.variants],
                                       "failures": report.failures}, indent=1))
    print(f"sm_{report.arch}: {len(report.kernels())} kernels, {len(seen)} variants compiled, "
          f"{len(report.failures)} cases failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
