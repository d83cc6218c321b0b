"""Export: merge, ONNX graphs under ONNX Runtime, manifest, standalone loop, refit map, bad input."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")

from fastdrag.attention import reference_control
from fastdrag.errors import InputError, OutputExistsError

FAST = dict(lora_steps=4, num_inference_steps=10, inversion_strength=0.7, drag_steps=6)  # conftest.py's `fast`


def ort_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_adapter(unet, seed):
    """Give `unet` an adapter with random (not freshly initialised, so not zero) LoRA weights."""
    from fastdrag.config import LoraConfig
    from fastdrag.lora import install_adapter, lora_parameters

    install_adapter(unet, LoraConfig(), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return generator


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """The export the demo picture's first edit on ONNX Runtime writes into its editor's cache (the plain
    UNet graphs: no kept keys and values, no drag graph, no VAE graphs; `editor.export`'s exports, with the
    VAE's, are tests/test_drag_export.py's), and the merged UNet it came from, for comparisons. The edit's
    result and steps are kept in FIRST_EDIT."""
    from fastdrag import DragEditor
    from fastdrag.demo import demo_case
    from fastdrag.export import load_manifest, merged_unet

    folder = tmp_path_factory.mktemp("export")
    editor = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=folder / "cache", progress=False)
    case = demo_case()
    steps = []
    FIRST_EDIT["result"] = editor.edit(case.image, case.prompt, case.points, mask=case.mask, backend="onnxruntime",
                                       seed=1, on_step=lambda *step: steps.append(step), **FAST)
    FIRST_EDIT["steps"] = steps
    (export,) = (editor.cache.directory / "exports").iterdir()
    return editor, load_manifest(export), merged_unet(tiny.unet), case


FIRST_EDIT = {}  # the fixture's edit: its result, and what it reported to `on_step`


def test_an_export_reports_each_graph_it_writes_after_the_lora(exported):
    """Writing the graphs takes minutes at SD 1.5: an export reports one "export" step per graph, after the
    LoRA's steps and before the exported denoiser's inversion. A backend's export writes the two UNet graphs
    alone (the editor encodes and decodes in PyTorch), and its manifest says so."""
    steps = FIRST_EDIT["steps"]
    stages = [stage for stage, _, _ in steps]
    assert stages[0] == "lora" and stages.index("lora") < stages.index("export") < stages.index("inversion")
    export = [(done, total) for stage, done, total in steps if stage == "export"]
    manifest = exported[1]
    assert export == [(done, 2) for done in range(3)] and sorted(manifest.graphs) == ["unet_inversion", "unet_reference"]
    assert manifest.data["vae_graphs"] is False and manifest.data["precision"] == {"unet": "fp32"}
    assert sorted(path.name for path in manifest.folder.iterdir()) == [
        "manifest.json", "refit.json", "text_embedding.bin", "unet_inversion.onnx", "unet_reference.onnx"]
    assert {"inversion", "drag", "denoise"} <= set(stages)  # the exported denoiser's stages report as PyTorch's do


def test_merge_equals_unmerged(tiny):
    from fastdrag.config import LoraConfig
    from fastdrag.export import merged_unet
    from fastdrag.lora import install_adapter, lora_parameters

    install_adapter(tiny.unet, LoraConfig(), seed=1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in lora_parameters(tiny.unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        merged = merged_unet(tiny.unet)
        x, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
        with_adapter = tiny.unet(x, 400, text).sample
        tiny.unet.disable_adapters()
        base = tiny.unet(x, 400, text).sample
        tiny.unet.enable_adapters()
        tiny.unet.requires_grad_(False)
        torch.testing.assert_close(merged(x, 400, text).sample, with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapter, base, atol=1e-3)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_graphs_match_torch(exported):
    """The UNet graphs against the merged UNet (the VAE graphs: tests/test_drag_export.py)."""
    editor, manifest, merged, _ = exported
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    t = np.array([421.0], dtype=np.float32)
    with torch.no_grad():
        plain = merged(latents[:1], 421, text[:1]).sample
        with reference_control(merged, manifest.data["reference_control"]["start_layer"], "sdpa"):
            swapped = merged(latents, 421, text).sample
    (eps1,) = ort_session(manifest.path("unet_inversion")).run(None, {"latents": latents[:1].numpy(), "timestep": t, "text_embeddings": text[:1].numpy()})
    (eps2,) = ort_session(manifest.path("unet_reference")).run(None, {"latents": latents.numpy(), "timestep": t, "text_embeddings": text.numpy()})
    assert relative_error(eps1, plain) < 1e-4
    assert relative_error(eps2, swapped) < 1e-4
    # the batch-2 graph differs from the batch-1 graph exactly as the K/V swap does:
    (eps_edit_alone,) = ort_session(manifest.path("unet_inversion")).run(None, {"latents": latents[1:].numpy(), "timestep": t, "text_embeddings": text[1:].numpy()})
    assert relative_error(eps2[:1], eps1) < 1e-4            # the source branch is plain attention
    assert relative_error(eps2[1:], eps_edit_alone) > 1e-3   # the edited branch attends to the source


def test_guided_inversion_and_denoising_run_on_the_exported_graphs_as_two_calls(exported):
    """`guidance_scale` on the exported backend: each step's two halves as two calls of the fixed-batch
    graphs give what one batched PyTorch call on the merged UNet gives (`fastdrag.guidance`)."""
    from fastdrag.config import DenoiseConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.denoise import denoise_pair
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.export.runtime import OnnxRuntimeDenoiser
    from fastdrag.inversion import invert

    editor, manifest, merged, case = exported
    generator = torch.Generator().manual_seed(8)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text, uncond = editor.text_embeddings(case.prompt), editor.text_embeddings("")
    schedule = DdimSchedule.from_scheduler(editor.components.scheduler, 10, 7)
    config = DenoiseConfig(start_layer=manifest.data["reference_control"]["start_layer"], attention_backend="sdpa")
    guided = dict(progress=False, unconditional=uncond, guidance_scale=3.0)
    results = []
    for denoiser in (OnnxRuntimeDenoiser(manifest), TorchDenoiser(merged)):
        with torch.no_grad():
            z_t = invert(denoiser, latents, text, schedule, **guided)
            pair = denoise_pair(denoiser, z_t, z_t + 0.1, text, schedule, config, **guided)
        results.append((z_t, pair))
    (ort_z, ort_pair), (torch_z, torch_pair) = results
    assert relative_error(ort_z.numpy(), torch_z) < 1e-4 and relative_error(ort_pair.numpy(), torch_pair) < 1e-4


def test_manifest_round_trip(exported):
    from fastdrag.export import load_manifest
    from fastdrag.vae import encode_prompt

    editor, manifest, _, case = exported
    again = load_manifest(manifest.folder)
    assert again.data == json.loads((manifest.folder / "manifest.json").read_text())
    assert again.data["schema_version"] == 1 and again.image_size == (64, 64)
    assert again.data["schedule"]["drag_timestep"] == 601 and len(again.data["schedule"]["denoise"]) == 7
    assert again.data["lora"]["key"] and again.data["opset"] >= 17
    assert again.data["model"]["prediction_type"] == "epsilon"  # a v-model's: tests/test_prediction_type.py
    import fastdrag

    assert again.data["fastdrag_version"] == fastdrag.__version__
    from fastdrag.export.manifest import schema_problems

    assert schema_problems(again.data) == []  # the published contract (export/manifest.schema.json)
    spec = again.graphs["unet_reference"]
    assert [t.name for t in spec.inputs] == ["latents", "timestep", "text_embeddings"] and spec.inputs[0].shape == (2, 4, 8, 8)
    # without keep_source_kv (tests/test_drag_export.py's exports have it): the noise alone, no kept graph
    assert [t.name for t in spec.outputs] == ["eps"] and "unet_kept" not in again.graphs and "source_kv" not in again.data
    text = encode_prompt(editor.components.tokenizer, editor.components.text_encoder, case.prompt)
    np.testing.assert_array_equal(again.text_embedding(), text.numpy())
    first = again.data["schedule"]["inversion"][0]
    assert first["t"] == 1 and first["alpha_from"] == pytest.approx(again.data["schedule"]["final_alpha_cumprod"])


def test_refit_map_covers_every_lora_weight_and_refits_to_another_image(exported):
    """Replacing the mapped initializers with another LoRA's merged weights gives that LoRA's model."""
    import onnx
    from onnx import numpy_helper

    from fastdrag.export import merged_unet
    from fastdrag.export.refit import refit_arrays, refit_map, target_weights

    editor, manifest, merged, _ = exported
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    model = onnx.load(str(manifest.path("unet_inversion")))
    mapping = refit_map(model, merged, targets)
    assert len(mapping) == len(target_weights(merged, targets)) == 16 * 2 * 4
    assert all(mapping.values())

    unet = editor.components.unet
    generator = random_adapter(unet, 9)
    other = merged_unet(unet)
    arrays = refit_arrays(mapping, other)
    for initializer in model.graph.initializer:
        if initializer.name in arrays:
            initializer.CopyFrom(numpy_helper.from_array(arrays[initializer.name], initializer.name))
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    (eps,) = session.run(None, {"latents": x.numpy(), "timestep": np.array([300.0], np.float32), "text_embeddings": text.numpy()})
    with torch.no_grad():
        assert relative_error(eps, other(x, 300, text).sample) < 1e-4
        assert relative_error(eps, merged(x, 300, text).sample) > 1e-3


def test_bad_export_input(exported, tmp_path):
    from fastdrag.export import ManifestError, load_manifest

    editor, manifest, _, case = exported
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        editor.export(case.image, case.prompt, manifest.folder, **FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    data = json.loads((manifest.folder / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ManifestError, match="schema version 99; this fastdrag reads version 1"):
        load_manifest(broken)
    with pytest.raises(ManifestError, match="are for 64x64 images, not 128x64"):
        manifest.check_size(128, 64)
    with pytest.raises(ManifestError, match="lacks artifact files"):
        (broken / "manifest.json").write_text(json.dumps(data))
        load_manifest(broken)
    with pytest.raises(InputError, match="LoRA key 'feedbeef' is not in the cache"):
        editor.merged_unet_for("feedbeef")
    with pytest.raises(ManifestError, match="no manifest.json in .*nowhere: not an export folder"):
        load_manifest(tmp_path / "nowhere")
    # a service's loops (export/standalone.py; the C++ program: tests/test_drag_export.py) need the VAE graphs
    from standalone_loader import standalone_module

    with pytest.raises(ValueError, match=r"export\d+/cache/exports/shared-\w+-64x64-L10-onnx-fp32 holds only the UNet "
                                         r"graphs of an editor's backend \(vae_graphs: false\), not the VAE graphs a "
                                         r"service encodes and decodes with: write its export with `fastdrag export`"):
        standalone_module().Export(manifest.folder)
    # a manifest whose graphs take another latent than its image's size makes
    wrong = json.loads(json.dumps(data))
    wrong["latent_shape"] = [1, 4, 8, 16]
    manifest.data, kept = wrong, manifest.data
    try:
        with pytest.raises(ManifestError, match=r"unet_inversion.latents has shape \[1, 4, 8, 8\], which does not match "
                                                r"the latent shape \[1, 4, 8, 16\] of a 64x64 image"):
            manifest.check_size(64, 64)
    finally:
        manifest.data = kept
    from safetensors.numpy import save_file

    from fastdrag.export.refit import load_refit_weights

    save_file({"w": np.ones(3, np.float32)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other.safetensors is not a fastdrag refit-weights file \(format 'pt'\)"):
        load_refit_weights(tmp_path / "other.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT tests need the tensorrt package and a CUDA GPU (neither is installable/available here)")
def test_tensorrt_build_run_and_refit(exported, tmp_path):
    from fastdrag.export.refit import refit_arrays, refit_map
    from fastdrag.export.tensorrt import BuildSettings, Engine, build_engine
    import onnx

    editor, manifest, merged, _ = exported
    settings = BuildSettings(fp16=False)
    path = build_engine(manifest.path("unet_inversion"), tmp_path / "unet.plan", settings)
    assert (tmp_path / settings.timing_cache).is_file()
    engine = Engine(path)
    x, text = torch.randn(1, 4, 8, 8, device="cuda"), torch.randn(1, 77, 32, device="cuda")
    out = engine.infer({"latents": x, "timestep": torch.tensor([300.0], device="cuda"), "text_embeddings": text})["eps"]
    with torch.no_grad():
        expected = merged.cuda()(x, 300, text).sample
    assert relative_error(out.cpu(), expected.cpu()) < 1e-3
    # refitted with another LoRA's merged weights (what an editor's TensorRT backend does for a new image)
    from fastdrag.export import merged_unet
    from fastdrag.export.refit import initializer_arrays, merged_target_weights

    targets = ("to_q", "to_k", "to_v", "to_out.0")
    mapping = refit_map(onnx.load(str(manifest.path("unet_inversion"))), merged.cpu(), targets)
    unet = editor.components.unet
    random_adapter(unet, 12)
    other = merged_unet(unet).cuda()
    engine.refit(refit_arrays(mapping, merged_target_weights(unet, targets)),
                 unchanged=lambda names: initializer_arrays(manifest.path("unet_inversion"), names))
    out = engine.infer({"latents": x, "timestep": torch.tensor([300.0], device="cuda"), "text_embeddings": text})["eps"]
    with torch.no_grad():
        expected = other(x, 300, text).sample
    assert relative_error(out.cpu(), expected.cpu()) < 1e-3


def test_export_writes_where_each_lora_weight_lives_in_both_unet_graphs(exported):
    from fastdrag.export.refit import load_refit_maps, merged_target_weights, target_weights

    editor, manifest, merged, _ = exported
    refit = dict(manifest.data["refit"])
    how = refit.pop("how")
    assert "fastdrag refit" in how and "text_embedding" in how and "transposed" in how
    assert refit == {"file": "refit.json", "targets": ["to_q", "to_k", "to_v", "to_out.0"],
                     "graphs": ["unet_inversion", "unet_reference"]}
    targets, maps = load_refit_maps(manifest.folder / "refit.json")
    expected = set(target_weights(merged, targets))
    assert set(maps) == {"unet_inversion", "unet_reference"}
    assert all(set(mapping) == expected and all(mapping.values()) for mapping in maps.values())
    from fastdrag.export import merged_unet

    unet = editor.components.unet
    random_adapter(unet, 11)
    weights = merged_target_weights(unet, targets)  # the adapter merged, the UNet not copied
    merged_params = dict(merged_unet(unet).named_parameters())
    assert set(weights) == expected and all(torch.equal(weights[n], merged_params[n]) for n in weights)
    assert not torch.equal(weights[min(weights)], dict(merged.named_parameters())[min(weights)])


def test_onnxruntime_edits_match_torch_and_reuse_one_export_for_the_image_and_new_ones(exported, monkeypatch):
    """An edit on ONNX Runtime (the fixture's) exports the denoiser once (into the cache) and makes PyTorch's
    edit; the same image again reuses that export, and so does a second image (here: another LoRA seed), its
    merged weights passed to ONNX Runtime as initializer overrides: no second export, and PyTorch's edit again."""
    from fastdrag.denoiser import TorchDenoiser

    editor, manifest_of_export, _, picture = exported
    first = FIRST_EDIT["result"]
    assert "export" in first.timings and not first.lora_cached
    editor.release()  # other tests gave the shared UNet other adapters: load the picture's from the cache again
    on_torch = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=1, **FAST)
    assert on_torch.lora_cached
    difference = np.abs(np.asarray(on_torch.image, dtype=np.int16) - np.asarray(first.image, dtype=np.int16))
    assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())
    assert on_torch.handles == first.handles
    manifest = manifest_of_export.folder / "manifest.json"
    os.utime(manifest, (1, 1))
    from fastdrag.export import runtime

    load, marked = runtime.load_denoiser, []
    monkeypatch.setattr(runtime, "load_denoiser", lambda *args, **kwargs: marked.append(manifest.stat().st_mtime)
                        or load(*args, **kwargs))
    again = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, backend="onnxruntime",
                        seed=1, **FAST)
    assert "export" in again.timings and again.timings["export"] < first.timings["export"] / 5  # reused, not re-exported
    # marked as used, for `fastdrag cache --prune-to`, before its graphs load (a prune elsewhere then passes it over)
    assert len(marked) == 1 and marked[0] > 1
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(first.image))

    second = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, backend="onnxruntime",
                         seed=2, **FAST)
    exports = list((editor.cache.directory / "exports").iterdir())
    assert len(exports) == 1 and second.timings["export"] < first.timings["export"] / 5
    (_, refitted), = [value for (_, key), value in editor._graph_denoisers.items() if key == second.lora_key]
    (_, baked), = [value for (_, key), value in editor._graph_denoisers.items() if key == first.lora_key]
    on_torch = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask, seed=2, **FAST)
    difference = np.abs(np.asarray(on_torch.image, dtype=np.int16) - np.asarray(second.image, dtype=np.int16))
    assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())
    assert on_torch.handles == second.handles

    reference = TorchDenoiser(editor.components.unet)  # the UNet holds seed 2's LoRA now
    generator = torch.Generator().manual_seed(4)
    pair, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        expected = reference(pair[:1], 421, text)
        assert relative_error(refitted(pair[:1], 421, text), expected) < 1e-4
        assert relative_error(baked(pair[:1], 421, text), expected) > 1e-3  # the overrides are what changed it
        with reference.reference_control(10, "sdpa"), refitted.reference_control(10):
            assert relative_error(refitted(pair, 421, text.expand(2, -1, -1)),
                                  reference(pair, 421, text.expand(2, -1, -1))) < 1e-4


class _FakeTensorRT:
    """What `Engine.refit` uses of TensorRT: a refitter over a dict engine (name -> weights) whose build
    combined some weights with others (`partners`), which TensorRT then reports as missing."""

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.given = engine, {}

        def set_named_weights(self, name, weights):
            if name not in self.engine["weights"] or weights.shape != self.engine["weights"][name].shape:
                return False
            self.given[name] = weights
            return True

        def get_missing_weights(self):
            return [partner for name in self.given for partner in self.engine["partners"].get(name, ())
                    if partner not in self.given]

        def refit_cuda_engine(self):
            if self.get_missing_weights():
                return False
            self.engine["weights"].update(self.given)
            return True

    @staticmethod
    def Weights(array):
        return array


def test_a_tensorrt_refit_gives_back_the_weights_the_build_combined_and_names_what_it_cannot_set():
    """TensorRT refuses a refit that leaves out weights its build combined with the given ones: `Engine.refit`
    asks `unchanged` for exactly those (the ONNX graph's own values) and refits; without it, or for a weight
    the engine lacks or of another size, it raises `TensorRTRefitError` naming the weights, the engine as it was."""
    from fastdrag.export.tensorrt import Engine, TensorRTRefitError

    generator = np.random.default_rng(5)
    weights = {name: generator.standard_normal((3, 5)).astype(np.float32) for name in ("q", "k", "bias", "other")}
    built = {"weights": dict(weights), "partners": {"q": ("bias",)}}
    engine = object.__new__(Engine)  # no TensorRT here: the refitter is the fake's
    engine.trt, engine.engine, engine.logger = _FakeTensorRT, built, None
    new_q, new_k = weights["q"] + 1, weights["k"] - 1
    with pytest.raises(TensorRTRefitError, match="needs 1 weights the build combined with the given ones: bias"):
        engine.refit({"q": new_q, "k": new_k})
    assert all(built["weights"][name] is weights[name] for name in weights)
    asked = []
    engine.refit({"q": new_q, "k": new_k}, unchanged=lambda names: asked.append(names) or {n: weights[n] for n in names})
    assert asked == [["bias"]]
    np.testing.assert_array_equal(built["weights"]["q"], new_q)
    np.testing.assert_array_equal(built["weights"]["k"], new_k)
    assert built["weights"]["bias"] is weights["bias"] and built["weights"]["other"] is weights["other"]
    def from_graph(names):  # as `initializer_arrays` answers for a weight the graph does not hold
        raise KeyError(f"graph.onnx has no initializer named {names[0]}")

    with pytest.raises(TensorRTRefitError, match="needs weights the graph cannot give back: graph.onnx has no "
                                                 "initializer named bias"):
        engine.refit({"q": new_q}, unchanged=from_graph)
    with pytest.raises(TensorRTRefitError, match="no refittable weight named to_x"):
        engine.refit({"to_x": new_q})
    with pytest.raises(TensorRTRefitError, match="no refittable weight named k"):
        engine.refit({"k": new_k[:, :4]})  # another size


def test_initializer_arrays_reads_the_named_initializers_of_a_graph_with_external_data(tmp_path):
    """A refit's weights given back as they were come from the engine's ONNX graph: only the named
    initializers, also from a graph whose weights are external data (SD 1.5's: 1.6 GiB)."""
    import onnx
    from onnx import helper, numpy_helper

    from fastdrag.export.refit import initializer_arrays

    generator = np.random.default_rng(6)
    values = {f"w{i}": generator.standard_normal((40, 30)).astype(np.float32) for i in range(3)}
    node = helper.make_node("Sum", list(values), ["y"])
    graph = helper.make_graph([node], "sum", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, (40, 30))],
                              [numpy_helper.from_array(value, name) for name, value in values.items()])
    path = tmp_path / "graph.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="graph.onnx.data",
              size_threshold=0)
    assert (tmp_path / "graph.onnx.data").stat().st_size >= 3 * 40 * 30 * 4
    found = initializer_arrays(path, ["w2", "w0"])
    assert sorted(found) == ["w0", "w2"]
    np.testing.assert_array_equal(found["w0"], values["w0"])
    np.testing.assert_array_equal(found["w2"], values["w2"])
    with pytest.raises(KeyError, match=r"graph.onnx has no initializer named bias \(nor 1 others\)"):
        initializer_arrays(path, ["w1", "bias", "scale"])


class _FakeEngine:
    """Stands in for `fastdrag.export.tensorrt.Engine` where there is no TensorRT (tests below): the "plan"
    file names the ONNX graph it was built from, which runs under ONNX Runtime; a refit gives a new session
    the weights as initializer overrides, by ONNX initializer name as TensorRT's refit takes them."""

    refuse = False  # every refit raises TensorRTRefitError
    loaded = []

    def __init__(self, path):
        self.graph = Path(path).parent / Path(path).read_text()
        self.refitted, self.given_back = {}, {}
        self.session = ort_session(self.graph)
        dtypes = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
        self.inputs = {i.name: (tuple(i.shape), dtypes[i.type]) for i in self.session.get_inputs()}
        _FakeEngine.loaded.append(self)

    def infer(self, feed):
        names = [output.name for output in self.session.get_outputs()]
        arrays = self.session.run(None, {name: tensor.numpy() for name, tensor in feed.items()})
        return {name: torch.from_numpy(array) for name, array in zip(names, arrays, strict=True)}

    def refit(self, arrays, unchanged=None):
        import onnxruntime as ort

        from fastdrag.export.tensorrt import TensorRTRefitError

        if _FakeEngine.refuse:
            raise TensorRTRefitError("the build combined them with others")
        self.given_back = unchanged([min(arrays)])  # as TensorRT asks for a combined weight's partners
        options = ort.SessionOptions()
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in arrays.values()]
        for name, value in zip(arrays, self.values, strict=True):
            options.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        self.refitted = arrays


@pytest.fixture()
def stand_in_tensorrt(monkeypatch):
    """TensorRT as the backend sees it, with `_FakeEngine`s for engines, built on an H100 by TensorRT 10.7.0
    (`plan_target`); returns the list of the graphs engines were built from, in order."""
    from fastdrag import backends
    from fastdrag.backends import BackendStatus
    from fastdrag.export import tensorrt

    builds = []

    def build_engine(onnx_path, engine_path, settings):  # the "plan" names its graph
        builds.append(onnx_path.name)
        engine_path.write_text(onnx_path.name)
        return engine_path

    monkeypatch.setattr(backends, "tensorrt_status", lambda: BackendStatus("tensorrt", "fake", True, "fake engines"))
    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt, "plan_target", lambda: dict(H100))
    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    monkeypatch.setattr(tensorrt, "Engine", _FakeEngine)
    monkeypatch.setattr(_FakeEngine, "loaded", [])
    return builds


H100 = {"tensorrt_version": "10.7.0", "compute_capability": "9.0", "device": "NVIDIA H100 80GB HBM3"}


def test_the_tensorrt_backend_refits_one_export_for_a_new_image_or_gives_it_its_own(tiny, tmp_path, stand_in_tensorrt,
                                                                                     monkeypatch, caplog):
    """With TensorRT, as with ONNX Runtime, a new image's LoRA runs on the first image's export: its merged
    weights are refitted into the loaded engines (no export, no engine build), and its edit is PyTorch's.
    Where the engines refuse the refit, the image gets an export and engines of its own, with a warning,
    and a later editor finds that export first. An editor on another kind of GPU (or TensorRT) builds its own.
    No TensorRT here: `_FakeEngine` stands in for the engines (`test_tensorrt_build_run_and_refit` refits a
    real one where TensorRT and a GPU are)."""
    from fastdrag import DragEditor
    from fastdrag.demo import demo_case
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.export import load_manifest, tensorrt
    from fastdrag.export.manifest import schema_problems
    from fastdrag.export.runtime import load_denoiser

    builds = stand_in_tensorrt
    editor = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "cache", progress=False)
    case = demo_case()
    settings = dict(mask=case.mask, backend="tensorrt", **FAST)
    first = editor.edit(case.image, case.prompt, case.points, seed=1, **settings)
    assert builds == ["unet_inversion.onnx", "unet_reference.onnx"] and not _FakeEngine.loaded[0].refitted
    second = editor.edit(case.image, case.prompt, case.points, seed=2, **settings)  # another LoRA
    (export,) = (editor.cache.directory / "exports").iterdir()
    assert export.name.startswith("shared-") and len(builds) == 2  # no export, no build
    assert second.timings["export"] < first.timings["export"] / 5
    engines = _FakeEngine.loaded[2:]
    assert [engine.graph.name for engine in engines] == ["unet_inversion.onnx", "unet_reference.onnx"]
    assert all(engine.refitted and set(engine.given_back) == {min(engine.refitted)} for engine in engines)
    for engine in engines:  # given back as the graph holds it
        name = min(engine.refitted)
        np.testing.assert_array_equal(engine.given_back[name], initializer_value(engine.graph, name))
    (_, refitted), = [value for (_, key), value in editor._graph_denoisers.items() if key == second.lora_key]
    editor.release()  # the second image's LoRA into the UNet again, from the cache
    on_torch = editor.edit(case.image, case.prompt, case.points, seed=2, mask=case.mask, **FAST)
    difference = np.abs(np.asarray(on_torch.image, dtype=np.int16) - np.asarray(second.image, dtype=np.int16))
    assert difference.mean() < 0.5 and difference.max() <= 8, (difference.mean(), difference.max())
    assert on_torch.handles == second.handles
    generator = torch.Generator().manual_seed(4)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        assert relative_error(refitted(latents, 421, text), TorchDenoiser(editor.components.unet)(latents, 421, text)) < 1e-4

    # a refit the engines refuse: this LoRA's own export and engines, which the next editor finds first
    monkeypatch.setattr(_FakeEngine, "refuse", True)
    with caplog.at_level("WARNING", logger="fastdrag"):
        third = editor.edit(case.image, case.prompt, case.points, seed=3, **settings)
    assert "could not be refitted with this image's LoRA (the build combined them with others)" in caplog.text
    assert len(builds) == 4 and (editor.cache.directory / "exports" / f"{third.lora_key}-{export.name.split('-', 2)[2]}").is_dir()
    fresh = DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "cache", progress=False)
    loaded = len(_FakeEngine.loaded)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastdrag"):
        again = fresh.edit(case.image, case.prompt, case.points, seed=3, **settings)
    assert len(builds) == 4 and len(_FakeEngine.loaded) == loaded + 2  # its own engines: no refit tried
    assert "refitted" not in caplog.text
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(third.image))

    # an engine loads only on the TensorRT version and the kind of GPU that built it: the manifest records
    # them, an editor on another kind of GPU sharing the cache builds engines of its own, and loading the
    # first's there is refused, naming both
    manifest = load_manifest(export)
    assert export.name.endswith("-tensorrt-fp32-trt10.7.0-sm90")
    for name in ("unet_inversion", "unet_reference"):
        assert manifest.data["engines"][name] == {"file": f"{name}.plan", "flags": ["FP16", "REFIT"], **H100,
                                                  "build_seconds": manifest.data["engines"][name]["build_seconds"]}
    assert schema_problems(manifest.data) == []
    a100 = {"tensorrt_version": "10.7.0", "compute_capability": "8.0", "device": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(tensorrt, "plan_target", lambda: dict(a100))
    DragEditor(tiny, torch.device("cpu"), torch.float32, cache_dir=tmp_path / "cache", progress=False).preload(
        case.image, case.prompt, seed=1, backend="tensorrt", **FAST)  # its inversion runs on the engines
    assert len(builds) == 6
    assert (export.parent / export.name.replace("-sm90", "-sm80")).is_dir()
    with pytest.raises(tensorrt.TensorRTEngineMismatch,
                       match=r"engines in .* were built by TensorRT 10.7.0 for compute capability 9.0 \(NVIDIA H100 80GB "
                             r"HBM3\); this is TensorRT 10.7.0 for compute capability 8.0 \(NVIDIA A100-SXM4-80GB\), and an "
                             r"engine loads only on the TensorRT version and the kind of GPU that built it"):
        load_denoiser("tensorrt", manifest)
    monkeypatch.setattr(tensorrt, "plan_target", lambda: {**H100, "tensorrt_version": "10.8.1"})  # an upgrade
    with pytest.raises(tensorrt.TensorRTEngineMismatch, match=r"this is TensorRT 10.8.1 for compute capability 9.0"):
        load_denoiser("tensorrt", manifest)


def test_an_engine_tensorrt_cannot_load_is_refused_naming_the_file_and_the_usual_reason(tmp_path, monkeypatch):
    """TensorRT answers a plan of another version or GPU kind with None (and a log line), not an exception."""
    from fastdrag.export import tensorrt

    class Refusing:
        __version__ = "10.8.1"

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return None

    monkeypatch.setattr(tensorrt, "require_tensorrt", lambda: Refusing)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    (tmp_path / "unet_inversion.plan").write_bytes(b"a plan of TensorRT 10.7.0")
    with pytest.raises(tensorrt.TensorRTEngineMismatch,
                       match=r"TensorRT 10.8.1 could not load the engine .*unet_inversion.plan on NVIDIA H100 80GB HBM3: "
                             r"an engine loads only on the TensorRT version and the kind of GPU that built it"):
        tensorrt.Engine(tmp_path / "unet_inversion.plan")


def test_processes_sharing_a_cache_export_the_graphs_once(tmp_path, picture):
    """Servers on two GPUs that share one cache start together: one exports the graphs (with TensorRT, minutes
    of engine builds), and the other waits for that export and loads it instead of making its own."""
    picture.image.save(tmp_path / "in.png")
    (handle, target), = picture.points

    def edit(output):
        return subprocess.Popen(
            [sys.executable, "-m", "fastdrag", "edit", str(tmp_path / "in.png"), "--prompt", picture.prompt, "--drag",
             f"{handle[0]},{handle[1]}:{target[0]},{target[1]}", "--output", str(tmp_path / output), "--backend",
             "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--lora-steps", "2", "--num-inference-steps", "10",
             "--drag-steps", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    processes = [edit("one.png"), edit("two.png")]
    logs = [process.communicate(timeout=600)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs
    assert sum(log.count("exporting the denoiser for backend onnxruntime") for log in logs) == 1, logs
    assert len(list((tmp_path / "cache" / "exports").glob("shared-*"))) == 1
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()


def initializer_value(path, name):
    import onnx
    from onnx import numpy_helper

    (initializer,) = [i for i in onnx.load(str(path)).graph.initializer if i.name == name]
    return numpy_helper.to_array(initializer)


def test_onnxruntime_repeated_edits_denoise_one_branch_with_kept_keys_and_values(editor, picture, fast, monkeypatch):
    """`keep_source_kv` on the ONNX Runtime backend: an export of its own with the kept graph, the
    repeated edit's denoising through it, and another image's LoRA refitted into all three UNet graphs."""
    from fastdrag import editor as editor_module
    from fastdrag.denoise import denoise_edited

    calls = []
    monkeypatch.setattr(editor_module, "denoise_edited",
                        lambda *args, **kwargs: calls.append(1) or denoise_edited(*args, **kwargs))
    moved = [((hx + 4, hy - 2), (tx - 3, ty)) for (hx, hy), (tx, ty) in picture.points]
    settings = dict(fast, mask=picture.mask, backend="onnxruntime", keep_source_kv=True)
    for seed in (1, 2):  # seed 2: the first seed's graphs, refitted with its LoRA weights
        editor.edit(picture.image, picture.prompt, picture.points, seed=seed, **settings)
        repeated = editor.edit(picture.image, picture.prompt, moved, seed=seed, **settings)
        on_torch = editor.edit(picture.image, picture.prompt, moved, mask=picture.mask, seed=seed, **fast)
        difference = np.abs(np.asarray(on_torch.image, dtype=np.int16) - np.asarray(repeated.image, dtype=np.int16))
        assert difference.mean() < 0.5 and difference.max() <= 8, (seed, difference.mean(), difference.max())
    assert calls == [1, 1]
    (folder,) = (editor.cache.directory / "exports").iterdir()
    assert folder.name.endswith("-kv")


def test_the_optimiser_runs_without_rules_that_scan_the_whole_graph():
    """A rewrite rule with several output nodes lists the whole graph at every node it is tried on
    (with them, optimising a tiny UNet graph took 20.7 s, without them 4.7 s, to the same graph): `export_onnx` optimises without them,
    and leaves onnxscript's rules as they were."""
    rewriter = pytest.importorskip("onnxscript.rewriter")
    from fastdrag.export.graphs import _single_output_rewrites

    before = rewriter._DEFAULT_REWRITE_RULES
    single = [rule for rule in before if rule._target_pattern.has_single_output_node]
    with _single_output_rewrites():
        assert list(rewriter._DEFAULT_REWRITE_RULES) == single and single
    assert rewriter._DEFAULT_REWRITE_RULES is before
    with pytest.raises(RuntimeError), _single_output_rewrites():
        raise RuntimeError("an export that fails")
    assert rewriter._DEFAULT_REWRITE_RULES is before


def test_a_graph_decomposed_before_export_skips_the_exporters_pass_or_is_exported_again_with_it(tmp_path, monkeypatch,
                                                                                                  caplog):
    """The drag graph comes out of `make_fx` functional and decomposed with the exporter's own table
    (`GraphJob.decomposed`), so the exporter's decomposition pass, a whole second trace, is skipped
    (tests/test_drag_export.py counts it for the drag export). A graph the exporter cannot translate
    without it (here an in-place add) is exported again with it, and says so."""
    from torch.onnx._internal.exporter import _fx_passes

    from fastdrag.export import graphs
    from fastdrag.export.graphs import GraphJob, GraphSpec, TensorSpec, export_onnx

    passes = []
    decompose = _fx_passes.decompose_with_registry

    def recorder(program, registry):  # each pass, with whether it ran under export_onnx's lock (process-wide patches)
        passes.append(graphs._EXPORTING.locked())
        return decompose(program, registry)

    monkeypatch.setattr(_fx_passes, "decompose_with_registry", recorder)

    class Doubled(torch.nn.Module):
        def __init__(self, in_place: bool):
            super().__init__()
            self.in_place = in_place

        def forward(self, x):
            y = x * 2
            return y.add_(1) if self.in_place else y + 1

    spec = GraphSpec("doubled", [TensorSpec("x", (2, 3), "float32")], [TensorSpec("y", (2, 3), "float32")])
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4))
    runs = {}
    with caplog.at_level("INFO", logger="fastdrag"):
        for name, in_place, decomposed in (("plain", False, False), ("functional", False, True), ("in-place", True, True)):
            passes.clear()
            export_onnx(GraphJob(spec, Doubled(in_place), (x,), decomposed=decomposed), tmp_path / f"{name}.onnx")
            (y,) = ort_session(tmp_path / f"{name}.onnx").run(None, {"x": x.numpy()})
            np.testing.assert_allclose(y, x.numpy() * 2 + 1, rtol=1e-6)
            runs[name] = passes[:]
    assert runs == {"plain": [True], "functional": [], "in-place": [True]} and not graphs._EXPORTING.locked()
    assert [r.getMessage() for r in caplog.records if "decompositions" in r.getMessage()] == [
        "doubled: the exporter could not translate it without its decompositions (ConversionError); exporting it "
        "again with them"]
    assert _fx_passes.decompose_with_registry is recorder  # put back after each export


def test_the_manifest_schema_refuses_what_a_service_could_not_read(exported):
    """The schema can fail: a missing section, an unknown dtype, a path out of the folder, a field it does
    not know (a change to the format must change the schema too, and a reader's version check)."""
    import copy

    from fastdrag.export.manifest import schema_problems

    _, manifest, _, _ = exported
    broken = {"no schedule": lambda d: d.pop("schedule"),
              "int8 latents": lambda d: d["artifacts"]["unet_inversion"]["inputs"][0].update(dtype="int8"),
              "file out of the folder": lambda d: d["artifacts"]["unet_reference"].update(file="../x.onnx"),
              # a backend's export (vae_graphs: false) claims no VAE: with the field true or left out, its graphs lack them
              "VAE graphs claimed": lambda d: d.update(vae_graphs=True),
              "VAE graphs not disclaimed": lambda d: d.pop("vae_graphs"),
              "a VAE graph it disclaims": lambda d: d["artifacts"].update(vae_decoder=d["artifacts"]["unet_inversion"]),
              "a VAE precision it disclaims": lambda d: d["precision"].update(vae="fp32"),
              "unknown field": lambda d: d.update(extra=1),
              "schema version 2": lambda d: d.update(schema_version=2)}
    for what, breaking in broken.items():
        data = copy.deepcopy(manifest.data)
        breaking(data)
        assert schema_problems(data), what



def test_onnxruntime_runs_the_graphs_on_the_gpu_their_inputs_live_on(exported, monkeypatch, caplog):
    """ONNX Runtime's CUDA provider runs on GPU 0 unless told its device: an editor on `cuda:1` would
    bind its inputs there for sessions on GPU 0. The providers follow the device (checked with a
    recording stand-in for the session: no GPU here); a CPU device keeps the graphs on the CPU."""
    import onnxruntime as ort

    from fastdrag.export.runtime import OnnxRuntimeDenoiser, session_providers

    _, manifest, _, _ = exported
    made = []

    class RecordingSession:
        def __init__(self, path, options, providers):
            made.append((Path(path).name, providers))

    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    OnnxRuntimeDenoiser(manifest, device="cuda:1")
    graphs = [name for name in ("unet_inversion", "unet_reference", "unet_kept") if name in manifest.data["artifacts"]]
    assert made == [(manifest.path(name).name, [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"])
                    for name in graphs]
    made.clear()
    OnnxRuntimeDenoiser(manifest, device=torch.device("cpu"))
    assert [providers for _, providers in made] == [["CPUExecutionProvider"]] * len(graphs)
    # a library without CUDA runs a GPU editor's graphs on the CPU (its inputs copied there and back), and says so
    with caplog.at_level("WARNING", logger="fastdrag"):
        assert session_providers("cuda:3", ["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert caplog.messages == ["this ONNX Runtime has no CUDA provider (only AzureExecutionProvider, CPUExecutionProvider): "
                               "the exported graphs of an editor on cuda:3 run on the CPU, its tensors copied there and "
                               "back every step; install onnxruntime-gpu in place of onnxruntime"]
    if not torch.cuda.is_available():  # no device given: torch's current GPU, or the CPU where torch has none
        assert session_providers(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def _scaling_graph(path, shape):
    """A small ONNX graph written to `path`: `x` (fp16) -> `doubled` (fp16, x + x) and `tripled` (fp32, 3 x);
    returns its GraphSpec."""
    import onnx
    from onnx import TensorProto, helper

    from fastdrag.export.graphs import GraphSpec, TensorSpec

    three = helper.make_tensor("three", TensorProto.FLOAT, [], [3.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["doubled"]), helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x32", "three"], ["tripled"])],
        "scaling", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, list(shape))],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT16, list(shape)),
         helper.make_tensor_value_info("tripled", TensorProto.FLOAT, list(shape))], [three])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return GraphSpec("scaling", [TensorSpec("x", shape, "float16")],
                     [TensorSpec("doubled", shape, "float16"), TensorSpec("tripled", shape, "float32")])


def test_bound_runs_wait_for_torch_before_the_session_runs_and_give_the_graphs_outputs(tmp_path, monkeypatch):
    """`run_bound` (the ONNX Runtime backend's run on CUDA tensors) binds the inputs cast to the graph's
    dtypes and fresh outputs by address, and waits for torch's queued work before the session runs:
    ONNX Runtime's CUDA stream does not wait for torch's. Run here on the CPU, where ONNX Runtime binds
    host memory the same way; the wait's effect on a GPU is tests/test_gpu.py's."""
    import onnxruntime as ort

    from fastdrag.export import runtime

    shape = (3, 7)
    spec = _scaling_graph(tmp_path / "scaling.onnx", shape)
    session = ort.InferenceSession(str(tmp_path / "scaling.onnx"), providers=["CPUExecutionProvider"])
    events = []
    monkeypatch.setattr(runtime, "wait_for_torch", lambda device: events.append(("wait", device)))
    real_run = session.run_with_iobinding
    monkeypatch.setattr(session, "run_with_iobinding", lambda binding: (events.append("run"), real_run(binding)))
    x = torch.randn(7, 3).T  # fp32 and not contiguous: cast and copied before it is bound
    outputs = runtime.run_bound(session, spec, {"x": x})
    assert events == [("wait", torch.device("cpu")), "run"]
    assert [(name, out.dtype, tuple(out.shape)) for name, out in outputs.items()] == [
        ("doubled", torch.float16, shape), ("tripled", torch.float32, shape)]
    torch.testing.assert_close(outputs["doubled"], x.half() + x.half(), rtol=0, atol=0)
    torch.testing.assert_close(outputs["tripled"], 3 * x.half().float(), rtol=0, atol=0)
