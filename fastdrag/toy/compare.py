"""Paired comparison of two quality reports on the same drag cases (e.g. two toy checkpoints).

Means of 64 cases differ by ≈ 0.05 in *moved* from sampling alone (its standard error over the
cases), but two models scored on the same cases differ far less from case to case, so an
adopt/reject decision should rest on the mean per-case difference and its standard error.

Two edits that differ only by rounding (another kernel, another GPU) score the same on most cases, but
a drag can take another path where point tracking nearly ties, and such a case's scores jump (on an
H100, 2 of 16 cases moved by 0.12 and 0.32 under the fused UNet kernels, the other 14 by at most 0.04).
`changed_cases` counts those jumps and which way they went, with a sign test: a few jumps, all one
way, are still what chance gives as often as not.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

from ..errors import InputError
from ..jsonfile import read_json
from .world import SIZE

MEASURES = ("moved", "tracked", "md", "area_ratio", "if_psnr")
SCALE_FREE = ("moved", "tracked", "area_ratio", "if_psnr")  # comparable across world sizes; MD is in pixels


@dataclass
class PairedDifference:
    measure: str
    base: float            # mean over the shared cases
    new: float
    difference: float      # mean of (new - base) per case
    standard_error: float  # of that mean
    cases: int


def load_report(path: Union[str, Path]) -> Dict:
    """A `quality.json` written by `fastdrag toy eval` (or the folder holding one)."""
    file = Path(path)
    if file.is_dir():
        file = file / "quality.json"
    report = read_json(file, "quality report", hint=" (write one with `fastdrag toy eval --out DIR`)")
    if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
        raise InputError(f"{file} is not a quality report: it has no list of cases")
    return report


def world_size(report: Dict) -> int:
    """The side in px at which the report's cases were rendered (reports before the option: 128)."""
    return int(report.get("world_size", SIZE))


def size_note(base: Dict, new: Dict) -> str:
    """The line saying why MD is missing when the reports' world sizes differ ('' when they agree)."""
    sizes = world_size(base), world_size(new)
    if sizes[0] == sizes[1]:
        return ""
    return f"world sizes differ ({sizes[0]} vs {sizes[1]} px): MD, in pixels, is left out; the other measures are scale-free"


def _value(case: Dict, measure: str) -> float:
    value = case.get("tracked") if measure == "tracked" else case.get("edit", {}).get(measure)
    return float("nan") if value is None else float(value)


@dataclass
class ChangedCases:
    measure: str
    threshold: float
    higher: int    # cases whose score rose by more than `threshold`
    lower: int     # ... fell by more than it
    cases: int     # cases both reports scored
    p_value: float  # two-sided sign test of higher against lower (1 when none changed)


def _shared_cases(base: Dict, new: Dict) -> List[tuple]:
    """(base case, new case) for each case both reports scored, checked to be the same case."""
    if base.get("seed") != new.get("seed"):
        raise InputError(f"the reports scored different cases: case seed {base.get('seed')} vs {new.get('seed')}")
    base_cases = {case["index"]: case for case in base["cases"]}
    shared = [(base_cases[case["index"]], case) for case in new["cases"] if case["index"] in base_cases]
    for old, fresh in shared:
        if old["prompt"] != fresh["prompt"]:
            raise InputError(f"case {old['index']} differs between the reports ({old['prompt']!r} vs "
                             f"{fresh['prompt']!r}): they were made by different versions of the toy world")
    if len(shared) < 2:
        raise InputError(f"the reports share {len(shared)} case(s); a paired comparison needs at least 2")
    return shared


def paired_differences(base: Dict, new: Dict) -> List[PairedDifference]:
    """Per measure: the mean of each report over the cases both scored, and the mean paired difference.
    Reports of the same cases at different world sizes compare on the scale-free measures only."""
    shared = _shared_cases(base, new)
    differences = []
    for measure in MEASURES if world_size(base) == world_size(new) else SCALE_FREE:
        pairs = [(_value(old, measure), _value(fresh, measure)) for old, fresh in shared]
        pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
        if len(pairs) < 2:
            continue  # e.g. 'tracked' is missing from reports written before it existed
        deltas = [b - a for a, b in pairs]
        differences.append(PairedDifference(measure, statistics.fmean(a for a, _ in pairs),
                                            statistics.fmean(b for _, b in pairs), statistics.fmean(deltas),
                                            statistics.stdev(deltas) / math.sqrt(len(deltas)), len(pairs)))
    return differences


def sign_test(higher: int, lower: int) -> float:
    """Two-sided p-value of `higher` against `lower` under equal chances of each (exact binomial)."""
    count = higher + lower
    if count == 0:
        return 1.0
    tail = sum(math.comb(count, k) for k in range(min(higher, lower) + 1)) / 2 ** count
    return min(1.0, 2 * tail)


def changed_cases(base: Dict, new: Dict, measure: str = "moved", threshold: float = 0.05) -> ChangedCases:
    """How many shared cases' `measure` moved by more than `threshold` each way, and the sign test of that."""
    pairs = [(_value(old, measure), _value(fresh, measure)) for old, fresh in _shared_cases(base, new)]
    deltas = [b - a for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    higher, lower = sum(d > threshold for d in deltas), sum(d < -threshold for d in deltas)
    return ChangedCases(measure, threshold, higher, lower, len(deltas), sign_test(higher, lower))


def changed_line(changed: ChangedCases) -> str:
    """One sentence for a report: which cases jumped, and whether the jumps lean one way."""
    return (f"cases whose {changed.measure} changed by more than {changed.threshold:g}: "
            f"{changed.higher + changed.lower} of {changed.cases} ({changed.higher} higher, {changed.lower} lower; "
            f"sign test p = {changed.p_value:.2f})")


def markdown(differences: List[PairedDifference], base_name: str, new_name: str, note: str = "") -> str:
    lines = [f"| measure | {base_name} | {new_name} | paired difference ± standard error | cases |",
             "| --- | --- | --- | --- | --- |"]
    for d in differences:
        lines.append(f"| {d.measure} | {d.base:.3f} | {d.new:.3f} | {d.difference:+.3f} ± {d.standard_error:.3f} | {d.cases} |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"
