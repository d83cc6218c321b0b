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


def test_a_preloading_variant_gets_a_row_in_the_preload_table():
    stages = {"lora_s": 0.0, "inversion_s": 0.0, "drag_s": 1.5, "denoise_s": 0.4}
    rows = [{"variant": "defaults", "edit": "first", "total_s": 6.3, **stages, "lora_s": 4.0, "peak_GiB": 2.7,
             "reserved_GiB": 6.1},
            {"variant": "defaults", "edit": "preload", "total_s": 4.4, "lora_s": 4.1, "inversion_s": 0.26,
             "peak_GiB": 2.5, "reserved_GiB": 6.0},
            {"variant": "defaults", "edit": "preloaded", "total_s": 2.0, **stages, "peak_GiB": 2.6, "reserved_GiB": 6.1},
            {"variant": "plain", "edit": "first", "total_s": 6.2, **stages, "peak_GiB": 2.7, "reserved_GiB": 6.1}]
    lines = table([("1", rows)]).splitlines()
    assert len(lines) == 2 + 2 + 1 + 2 + 1  # the main table, a blank line, the preload table with one row
    assert lines[5].startswith("| call: variant | preload: total (LoRA / inversion) |")
    assert lines[-1] == "| 1: defaults | 4.40 (4.10 / 0.26) | 2.00 (1.50 / 0.40) | 2.60 / 6.10 |"
    cut_off = [row for row in rows if row["edit"] != "preloaded"]
    assert table([(None, cut_off)]).splitlines()[-1] == "| defaults | 4.40 (4.10 / 0.26) | — | — |"
