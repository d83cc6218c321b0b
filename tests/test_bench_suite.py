"""The benchmark suite (`bench/`) run as pytest-benchmark's users also run one: `--benchmark-disable` runs
each benchmark once, untimed, as a plain test (a quick check, in a CI of theirs, that the suite works). A
few of its benchmarks run so here, among them the stage benchmarks, whose shared recorder reads the
timing, which such a run does not have."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = "vae_encode or vae_decode or inversion_step or drag_iteration or loss_and_tracking"


def run_untimed(*args: str) -> subprocess.CompletedProcess:
    """`pytest ARGS --benchmark-disable` on the benchmark suite, from the checkout's root."""
    return subprocess.run([sys.executable, "-m", "pytest", *args, "--benchmark-disable", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_benchmarks_run_untimed_under_benchmark_disable():
    run = run_untimed("bench/test_stages.py", "bench/test_kernels.py", "-q", "-k", QUICK)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 4, run.stdout[-2000:]


def test_an_image_side_the_editor_cannot_work_at_is_a_usage_error():
    """`--size 0` ran at the model's own size, a negative one failed in the stage benchmarks' setup, and one
    under 64 px was worked at 64 px (the least working size): each is now refused before anything runs."""
    for side in ("0", "63"):
        run = run_untimed("bench/test_stages.py", "--size", side)
        assert run.returncode == 4, run.stdout[-2000:]  # pytest's usage error
        assert f"argument --size: the image side must be at least 64 px, got {side}" in run.stderr
