"""bench/timing_table.py: RESULTS.md's whole-edit table from edit_timing.json rows, checked against a lease's files."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from timing_table import table, variant_row  # noqa: E402

LEASE = ROOT / "bench" / "results" / "h100-2026-11-27-session16"


def test_the_table_gives_the_rows_of_the_sixteenth_sessions_h100_lease():
    rows = json.loads((LEASE / "first-call" / "edit_timing.json").read_text())
    lines = table([("1", rows)]).splitlines()
    assert lines[0].startswith("| call: variant | first new image") and len(lines) == 2 + 3  # defaults, no-keep, warm1
    # as bench/RESULTS.md gives them (the first edit, the next new image, the mean of two repeats)
    assert ("| 1: defaults | 6.96 (4.48 / 0.26 / 1.62 / 0.42) | 2.94 / 8.18 | 6.83 (4.46 / 0.26 / 1.60 / 0.41) "
            "| 2.94 / 8.18 | 2.13 | 2.94 / 8.18 |") in lines
    assert ("| 1: no-keep | 7.55 (5.16 / 0.26 / 1.60 / 0.42) | 6.59 / 9.31 | 7.52 (5.15 / 0.26 / 1.59 / 0.41) "
            "| 6.65 / 13.74 | 2.08 | 3.04 / 9.38 |") in lines


def test_a_variant_cut_off_before_its_edits_gets_dashes():
    rows = [{"variant": "slow", "edit": "warm_up()", "total_s": 60.0},
            {"variant": "slow", "edit": "first", "total_s": 7.0, "lora_s": 4.0, "inversion_s": 0.3, "drag_s": 2.0,
             "denoise_s": 0.5, "peak_GiB": 3.0, "reserved_GiB": None}]
    assert variant_row("slow", rows) == "| slow | 7.00 (4.00 / 0.30 / 2.00 / 0.50) | 3.00 / — | — | — | — | — |"


def test_the_command_line_labels_each_file():
    done = subprocess.run([sys.executable, "bench/timing_table.py", f"2={LEASE / 'second-call' / 'edit_timing.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| 2: defaults | 6.86 (4.44 / 0.26 / 1.60 / 0.42) |" in done.stdout and "| 2: release |" in done.stdout
