"""bench/edit_timing.py, the lease's check of the edit-time targets, works here on the tiny model: its
variants, its first and repeated edits (the repeats hit the LoRA and inversion caches) and its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from edit_timing import StageGrowth, parse_variant, reserved_by_pool  # noqa: E402


def test_variants_parse():
    assert parse_variant("plain") == ("plain", {})
    assert parse_variant("x:cuda_graphs=false,drag_steps=3,lr=0.5,name=abc") == (
        "x", {"cuda_graphs": False, "drag_steps": 3, "lr": 0.5, "name": "abc"})
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        parse_variant("x:cuda_graphs")


def test_reserved_memory_is_split_into_the_default_pool_and_graph_pools():
    gib = 2**30
    segments = [dict(total_size=2 * gib, allocated_size=gib, segment_pool_id=(0, 0)),
                dict(total_size=gib, allocated_size=0, segment_pool_id=(0, 0)),
                dict(total_size=3 * gib, allocated_size=gib // 2, segment_pool_id=(0, 4)),
                dict(total_size=gib, allocated_size=gib, segment_pool_id=(7, 0))]
    assert reserved_by_pool(segments) == {"default_reserved_GiB": 3.0, "default_allocated_GiB": 1.0,
                                          "graph_pools_reserved_GiB": 4.0, "graph_pools_allocated_GiB": 1.5}


def test_stage_growth_names_the_stages_that_raised_the_high_water_mark():
    gib = 2**30
    mark = [5 * gib]

    class Editor:
        def _timed(self, timings, name, fn, *args, **kwargs):
            timings[name] = 1.0
            return fn(*args, **kwargs)

    def grow(by):
        mark[0] += by
        return by

    editor = Editor()
    growth = StageGrowth(editor, lambda: mark[0])
    timings = {}
    assert editor._timed(timings, "lora", grow, 2 * gib) == 2 * gib and timings == {"lora": 1.0}
    editor._timed(timings, "drag", grow, 0)
    editor._timed(timings, "lora", grow, gib // 2)  # a stage timed twice adds up
    with pytest.raises(ZeroDivisionError):  # a failing stage still counts what it reserved
        editor._timed(timings, "denoise", lambda: (grow(gib), 1 / 0))
    assert growth.take() == {"lora_grew_GiB": 2.5, "drag_grew_GiB": 0.0, "denoise_grew_GiB": 1.0}
    assert growth.take() == {}


def test_first_and_repeated_edits_are_timed(tmp_path):
    quick = "lora_steps=2,drag_steps=2,num_inference_steps=5"
    out = tmp_path / "timing.json"
    subprocess.run([sys.executable, "bench/edit_timing.py", "--model", "tiny", "--size", "64", "--repeats", "1",
                    "--variant", f"a:preload=true,{quick}", "--variant", f"b:release_cached_memory=true,channels_last=true,mask=false,half_norms=true,fused_unet_kernels=true,graph_warmup=1,cudnn_benchmark=true,sdpa_priority=flash,keep_source_kv=true,{quick}", "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["edit"]) for r in rows] == [
        ("", "load"), ("a", "warm_up()"), ("a", "first"), ("a", "new"), ("a", "repeated"), ("a", "preload"), ("a", "preloaded"),
        ("b", "warm_up()"), ("b", "first"), ("b", "new"), ("b", "repeated")]
    for row in rows[1:]:
        assert row["total_s"] > 0 and row["lora_s"] >= 0
        if row["edit"] == "warm_up()":
            assert row["drag_s"] > 0 and row["drag_steps"] is None
            continue
        if row["edit"] == "preload":  # a new image's LoRA and inversion, no drag
            assert row["lora_s"] > 0 and row["inversion_s"] > 0 and "drag_s" not in row and row["drag_steps"] is None
            continue
        assert row["drag_steps"] <= 2
        assert (row["kept_kv_GB"] > 0) == (row["variant"] == "b")  # b keeps the source keys and values
        if row["edit"] in ("repeated", "preloaded"):
            assert row["lora_s"] < 0.05 and row["inversion_s"] < 0.05  # from the caches
        else:
            assert row["lora_s"] > 0 and row["inversion_s"] > 0  # a new LoRA key: trained and inverted


def test_memory_origins_name_the_code_that_reserved_each_segment():
    from memory_origins import segment_origins, totals_by_origin

    mib = 2**20
    frames = lambda *names: [dict(filename=f"/x/site-packages/{n.split(':')[0]}", line=int(n.split(':')[1]),
                                  name="f") for n in names]
    snapshot = {
        "segments": [dict(address=100, total_size=64 * mib, allocated_size=mib, stream=0, segment_pool_id=(0, 0)),
                     dict(address=200, total_size=512 * mib, allocated_size=0, stream=7, segment_pool_id=(0, 3)),
                     dict(address=300, total_size=32 * mib, allocated_size=32 * mib, stream=0,
                          segment_pool_id=(0, 0))],
        "device_traces": [[
            dict(action="segment_alloc", addr=100, frames=frames("torch/nn/x.py:1", "diffusers/vae.py:5",
                                                                  "fastdrag/vae.py:9", "fastdrag/editor.py:3")),
            dict(action="alloc", addr=100, frames=frames("fastdrag/other.py:1")),
            dict(action="segment_alloc", addr=200, frames=frames("fastdrag/old.py:1")),
            dict(action="segment_free", addr=200, frames=[]),
            dict(action="segment_alloc", addr=200, frames=frames("fastdrag/lora.py:7")),  # the latest counts
        ]],
    }
    rows = segment_origins(snapshot, depth=2)
    assert [(r["pool"], r["reserved_MiB"], r["allocated_MiB"], r["origin"]) for r in rows] == [
        ("graph", 512.0, 0.0, "fastdrag/lora.py:7 f"),
        ("default", 64.0, 1.0, "diffusers/vae.py:5 f < fastdrag/vae.py:9 f"),
        ("default", 32.0, 32.0, "?")]  # no history for it: reserved before recording began
    rows.append(dict(rows[1]))
    totals = totals_by_origin(rows)
    assert (totals[0]["pool"], totals[0]["reserved_MiB"]) == ("graph", 512.0)
    assert (totals[1]["reserved_MiB"], totals[1]["allocated_MiB"], totals[1]["segments"]) == (128.0, 2.0, 2)
