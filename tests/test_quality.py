"""Edit quality as a regression test: the published-default edit on the trained toy model moves
shapes, and every fast path scores the same as the PyTorch reference path.

Thresholds come from measurements of this model (see bench/RESULTS.md): on the cases used here
the reference edit moves the shape most of the way while the no-drag baseline does not move it.
"""
import pytest

from fastdrag.toy.model import WEIGHTS

pytestmark = pytest.mark.skipif(not (WEIGHTS / "unet.safetensors").is_file(),
                                reason="the toy model's weights are not in fastdrag/toy/weights")

CASES = 2
TOLERANCE = {"moved": 0.1, "area_ratio": 0.1, "if_psnr": 1.0}


@pytest.fixture(scope="module")
def toy_editor(tmp_path_factory):
    from fastdrag import DragEditor

    return DragEditor.from_pretrained("toy", device="cpu", cache_dir=tmp_path_factory.mktemp("toy-lora"), progress=False)


@pytest.fixture(scope="module")
def reference(toy_editor):
    from fastdrag.toy.quality import evaluate

    return evaluate(toy_editor, cases=CASES)


def test_default_edit_moves_shapes_well_beyond_the_baseline(reference):
    summary = reference["summary"]
    assert summary["edit_moved"] >= 0.5, summary
    assert summary["edit_moved"] >= summary["baseline_moved"] + 0.4, summary
    assert 0.6 <= summary["edit_area_ratio"] <= 1.5, summary


def _same_measures(report, reference):
    for case, expected in zip(report["cases"], reference["cases"]):
        for key, tolerance in TOLERANCE.items():
            assert abs(case["edit"][key] - expected["edit"][key]) <= tolerance, (key, case["edit"], expected["edit"])


def test_triton_kernels_score_the_same(toy_editor, reference, monkeypatch):
    from fastdrag.toy.quality import evaluate

    monkeypatch.setenv("FASTDRAG_FORCE_TRITON", "1")
    _same_measures(evaluate(toy_editor, cases=1), reference)


def test_onnxruntime_backend_scores_the_same(toy_editor, reference):
    from fastdrag.toy.quality import evaluate

    _same_measures(evaluate(toy_editor, cases=1, backend="onnxruntime"), reference)
