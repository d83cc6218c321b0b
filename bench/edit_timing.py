"""Seconds of a first edit (LoRA trained) and of repeated edits (LoRA cached), stage by stage, and the
peak GPU memory, outside the benchmark harness: `python bench/edit_timing.py [--model sd15-random]
[--repeats 2] [--cuda-graphs] [--json FILE]`. A quick check of the performance targets; the
pytest-benchmark suite (`bench/test_stages.py`) is the full measure.
"""
import argparse
import json
import tempfile
import time

import torch

from fastdrag import DragEditor
from fastdrag.demo import demo_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    editor = DragEditor.from_pretrained(args.model, device=device, dtype=dtype, cache_dir=tempfile.mkdtemp(),
                                        progress=False)
    rows = [{"edit": "load", "total_s": time.perf_counter() - start}]
    case = demo_case(args.size)
    for index in range(1 + 1 + args.repeats):  # a warm-up first edit (new seed), a first edit, repeats
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = editor.edit(case.image, case.prompt, case.points, mask=case.mask, seed=min(index, 1),
                             cuda_graphs=args.cuda_graphs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"edit": ["warm-up first", "first", *["repeated"] * args.repeats][index],
               "total_s": time.perf_counter() - start, **{f"{k}_s": v for k, v in result.timings.items()},
               "drag_steps": result.drag_steps}
        if device.type == "cuda":
            row["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
