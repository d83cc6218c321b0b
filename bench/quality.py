"""Edit quality on the toy world: DragBench-style measures against known ground truth.

    python bench/quality.py [--model toy] [--cases 16] [--out results/quality]      # or: fastdrag toy eval
    pytest bench/quality.py --benchmark-only                                        # as a benchmark (4 cases)

Reports, per case and on average, *moved*, *MD*, *area ratio* and *IF outside the mask* for the
published-default edit and for the no-drag baseline, with the time per stage; writes
`quality.json`, `quality.md` and `contact_sheet.png`.
"""
import argparse
import sys


def test_toy_quality(benchmark, device, dtype, tmp_path):
    from fastdrag import DragEditor
    from fastdrag.toy.quality import evaluate

    editor = DragEditor.from_pretrained("toy", device=device, dtype=dtype, cache_dir=tmp_path / "lora", progress=False)
    report = benchmark.pedantic(lambda: evaluate(editor, cases=4, out=tmp_path / "quality"), rounds=1, iterations=1)
    benchmark.extra_info.update(report["summary"])
    print(report["markdown"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/quality")
    parser.add_argument("--device", default=None)
    args, rest = parser.parse_known_args(argv)
    from fastdrag.cli import main as cli

    return cli(["toy", "eval", "--model", args.model, "--cases", str(args.cases), "--case-seed", str(args.seed),
                "--out", args.out] + (["--device", args.device] if args.device else []) + rest)


if __name__ == "__main__":
    sys.exit(main())
