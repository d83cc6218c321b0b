"""What the GPU memory a process reserves is made of, segment by segment, and which code reserved
it: the caching allocator's history is recorded over `warm_up()` and edits at the defaults, then each
segment still reserved is listed with its pool (default or CUDA-graph), what is allocated in it, and
the package and diffusers frames of the call that reserved it.

    python bench/memory_origins.py [--model sd15-random] [--size 512] [--edits 2] [--variant KEY=VALUE,...]

CUDA only (the allocator's history). The table is sorted by reserved size; the totals by origin follow.
"""
import argparse
import tempfile
from collections import defaultdict
from typing import Dict, List, Sequence

import torch

KEEP = ("fastdrag/", "kernels/", "diffusers/", "transformers/")


def _frame_text(frame: Dict) -> str:
    path = frame["filename"]
    for marker in KEEP:
        if marker in path:
            path = marker + path.split(marker, 1)[1]
            break
    return f"{path}:{frame['line']} {frame['name']}"


def origin(frames: Sequence[Dict], depth: int = 3) -> str:
    """The innermost `depth` frames of the package or diffusers (innermost first), or '?' without any."""
    kept = [_frame_text(f) for f in frames if any(marker in f["filename"] for marker in KEEP)]
    return " < ".join(kept[:depth]) or "?"


def segment_origins(snapshot: Dict, depth: int = 3) -> List[Dict]:
    """One row per reserved segment: pool, stream, MiB reserved and allocated, and the origin of the
    allocation that reserved it (the latest `segment_alloc` event at its address)."""
    reserved_by = {}
    for trace in snapshot.get("device_traces", []):
        for event in trace:
            if event["action"] == "segment_alloc":
                reserved_by[event["addr"]] = event.get("frames", [])
    rows = []
    for segment in snapshot["segments"]:
        pool = "default" if tuple(segment.get("segment_pool_id", (0, 0))) == (0, 0) else "graph"
        rows.append(dict(pool=pool, stream=segment["stream"], reserved_MiB=segment["total_size"] / 2**20,
                         allocated_MiB=segment["allocated_size"] / 2**20,
                         origin=origin(reserved_by.get(segment["address"], []), depth)))
    return sorted(rows, key=lambda row: -row["reserved_MiB"])


def totals_by_origin(rows: List[Dict]) -> List[Dict]:
    """Reserved and allocated MiB summed by (pool, origin), largest first."""
    sums: Dict = defaultdict(lambda: [0.0, 0.0, 0])
    for row in rows:
        entry = sums[row["pool"], row["origin"]]
        entry[0] += row["reserved_MiB"]
        entry[1] += row["allocated_MiB"]
        entry[2] += 1
    return [dict(pool=pool, origin=where, reserved_MiB=r, allocated_MiB=a, segments=n)
            for (pool, where), (r, a, n) in sorted(sums.items(), key=lambda item: -item[1][0])]


def markdown(rows: List[Dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from edit_timing import parse_variant

    from fastdrag import DragEditor
    from fastdrag.demo import demo_case

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--edits", type=int, default=2, help="edits of new images after warm_up()")
    parser.add_argument("--variant", default="", metavar="KEY=VALUE,...", help="edit settings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("memory_origins needs CUDA: it reads the CUDA caching allocator's history")
    _, settings = parse_variant(":" + args.variant)
    editor = DragEditor.from_pretrained(args.model, device="cuda", dtype=torch.float16,
                                        cache_dir=tempfile.mkdtemp(), progress=False)
    torch.cuda.memory._record_memory_history(max_entries=5_000_000)
    editor.warm_up((args.size, args.size), **settings)
    case = demo_case(args.size)
    for seed in range(1, args.edits + 1):
        editor.edit(case.image, case.prompt, case.points, mask=case.mask, seed=seed, **settings)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    rows = segment_origins(snapshot)
    print(f"reserved {torch.cuda.memory_reserved() / 2**30:.3f} GiB, high-water mark "
          f"{torch.cuda.max_memory_reserved() / 2**30:.3f} GiB, allocated {torch.cuda.memory_allocated() / 2**30:.3f} GiB")
    print("\n## by origin\n")
    print(markdown(totals_by_origin(rows), ["pool", "reserved_MiB", "allocated_MiB", "segments", "origin"]))
    print("\n## the 40 largest segments\n")
    print(markdown(rows[:40], ["pool", "stream", "reserved_MiB", "allocated_MiB", "origin"]))


if __name__ == "__main__":
    main()
