"""The whole-edit table of bench/RESULTS.md from `bench/edit_timing.py`'s JSON rows.

    python bench/timing_table.py [LABEL=]edit_timing.json ...

One row per variant: the first new image's seconds (total, and LoRA / inversion / drag / denoising),
the next new image's, the mean of the repeated edits', each with its GiB allocated at its peak and
reserved by the process (`peak_GiB` / `reserved_GiB`). Variants run with `preload=true` also get a row
in a second table: the preload's seconds and then the preloaded image's edit's. LABEL (e.g. `1` for a lease's first call)
prefixes the variant names of that file. A lease's log gets this table at the end of its
`edit-timing` group (bench/gpu_session.sh), so the numbers reach RESULTS.md without retyping.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HEADER = ("| call: variant | first new image: total (LoRA / inversion / drag / denoise) | alloc / res "
          "| next new image | alloc / res | repeated | alloc / res |")
STAGES = ("lora_s", "inversion_s", "drag_s", "denoise_s")
PRELOAD_HEADER = ("| call: variant | preload: total (LoRA / inversion) | its image's edit: total (drag / denoise) "
                  "| alloc / res |")


def _seconds(row: Dict) -> str:
    return f"{row['total_s']:.2f} ({' / '.join(f'{row[stage]:.2f}' for stage in STAGES)})"


def _memory(rows: Sequence[Dict]) -> str:
    if any(row.get("peak_GiB") is None for row in rows):
        return "—"
    reserved = [row.get("reserved_GiB") for row in rows]
    held = f"{max(reserved):.2f}" if None not in reserved else "—"
    return f"{max(row['peak_GiB'] for row in rows):.2f} / {held}"


def variant_row(label: str, rows: Sequence[Dict]) -> str:
    """The table row of one variant's edits (`first`, `new`, `repeated`); "—" where an edit is missing
    (a variant cut off by its time limit)."""
    by_edit: Dict[str, List[Dict]] = {}
    for row in rows:
        by_edit.setdefault(row["edit"], []).append(row)
    cells = [label]
    for edit in ("first", "new"):
        found = by_edit.get(edit)
        cells += [_seconds(found[0]), _memory(found[:1])] if found else ["—", "—"]
    repeated = by_edit.get("repeated")
    if repeated:
        mean = sum(row["total_s"] for row in repeated) / len(repeated)
        cells += [f"{mean:.2f}", _memory(repeated)]
    else:
        cells += ["—", "—"]
    return "| " + " | ".join(cells) + " |"


def preload_row(label: str, rows: Sequence[Dict]) -> Optional[str]:
    """The preload table's row of one variant (None without a `preload` row): the preload, then the edit of
    the image it preloaded ("—" if the variant was cut off before it)."""
    preload = next((row for row in rows if row["edit"] == "preload"), None)
    if preload is None:
        return None
    edited = next((row for row in rows if row["edit"] == "preloaded"), None)
    cells = [label, f"{preload['total_s']:.2f} ({preload['lora_s']:.2f} / {preload['inversion_s']:.2f})"]
    if edited is None:
        return "| " + " | ".join(cells + ["—", "—"]) + " |"
    cells += [f"{edited['total_s']:.2f} ({edited['drag_s']:.2f} / {edited['denoise_s']:.2f})", _memory([preload, edited])]
    return "| " + " | ".join(cells) + " |"


def table(files: Sequence[Tuple[Optional[str], Sequence[Dict]]]) -> str:
    """The markdown table of every variant in `files` ((label or None, rows) each), in file order, and the
    preload table of the variants that preloaded an image."""
    lines = [HEADER, "| " + " | ".join(["---"] * 7) + " |"]
    preloads = []
    for label, rows in files:
        variants: Dict[str, List[Dict]] = {}
        for row in rows:
            if row.get("variant"):  # the model's load has no variant
                variants.setdefault(row["variant"], []).append(row)
        for name, variant_rows in variants.items():
            shown = f"{label}: {name}" if label else name
            lines.append(variant_row(shown, variant_rows))
            preloaded = preload_row(shown, variant_rows)
            if preloaded:
                preloads.append(preloaded)
    if preloads:
        lines += ["", PRELOAD_HEADER, "| " + " | ".join(["---"] * 4) + " |", *preloads]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    files = []
    for arg in args:
        label, _, path = arg.rpartition("=") if "=" in arg else (None, "", arg)
        files.append((label or None, json.loads(Path(path).read_text())))
    print(table(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
