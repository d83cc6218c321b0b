"""bench/gpu_session.sh, the script a lent GPU session runs: its groups, aliases and deadline work here too
(on the CPU every GPU test skips), so a broken script is found before the rare lease it is for."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_session(groups: str, out: Path, seconds: int, **variables: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", **variables}
    subprocess.run(["bash", "bench/gpu_session.sh", groups, str(out), str(seconds)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=seconds + 60)
    return (out / "log.txt").read_text()


def test_groups_run_in_order_unknown_ones_are_named_and_test_k_filters_the_tests(tmp_path):
    """TEST_K reaches pytest's -k: the tests it does not match are deselected (a filter that matches
    nothing would leave pytest nothing to run, exit 5)."""
    log = run_session("gpu-tests,no-such-group", tmp_path, 300, TEST_K="test_edit_in_half_precision")
    assert "groups: gpu-tests no-such-group;" in log
    assert "== gpu-tests (limit 200 s)" in log  # its own limit: far from the deadline
    assert "== gpu-tests exit 0" in log  # pytest ran tests/test_gpu.py and every test skipped
    assert re.search(r"=+ 1 skipped, \d+ deselected", log), log[-3000:]  # the one test TEST_K names
    assert "unknown group no-such-group" in log
    assert log.index("== gpu-tests exit") < log.index("unknown group")


def test_aliases_expand_and_the_deadline_skips_what_does_not_fit(tmp_path):
    log = run_session("stages,toy-less,lease", tmp_path, 5)
    assert "groups: stage-bench edit-bench attention-bench toy-less parallel-tests profile edit-timing;" in log
    assert "== parallel-tests skipped:" in log
    for group in ("stage-bench", "edit-bench", "attention-bench", "edit-timing defaults", "edit-timing unmerged", "edit-timing half-norms",
                  "profile"):  # edit-timing: a process per variant
        assert f"== {group} skipped:" in log
    assert not (tmp_path / "bench_steps.json").exists() and not (tmp_path / "edit_timing.json").exists()
