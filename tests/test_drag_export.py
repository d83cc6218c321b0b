"""The drag iteration's exported graph (`unet_drag`): against PyTorch's drag step and drag loop, its
refit with another LoRA, the standalone protocol a C++ service follows, and `export/cpp/fastdrag_edit`,
that protocol in C++."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from standalone_loader import standalone_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")

ROOT = Path(__file__).resolve().parents[1]
POINTS = 2
# The exports' schedule: 7 inversion and denoising steps (10 at the default strength 0.7) instead of the default
# 35. The protocol is the same at any count, and each of the many edits here (the standalone script's, the C++
# program's, the editor's) runs 7 UNet steps of each kind where it ran 35.
INFERENCE_STEPS = 10
# The exports' first swapped denoising step: the first three attend without the swap (the default swaps from
# step 0), so every loop here that reads the manifest runs both kinds of step. The graphs do not depend on it.
START_STEP = 3


def relative_error(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def session(model):
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def pixels(image) -> np.ndarray:
    """A PIL image as the (1, 3, H, W) float32 array in [-1, 1] the exported graphs take."""
    from fastdrag.vae import image_to_tensor

    return image_to_tensor(image, "cpu", torch.float32).numpy()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """An export of the demo picture with the drag graph for two point pairs and the kept keys and values'
    graph (`unet_kept`, for the C++ program's `serve`), at the editor's settings (INFERENCE_STEPS, START_STEP),
    and its merged UNet."""
    from fastdrag.errors import ConfigError
    from fastdrag.export.drag_graph import check_drag_graph_torch

    try:
        check_drag_graph_torch()
    except ConfigError as exc:  # a torch that cannot trace the drag graph: the export would refuse it
        pytest.skip(str(exc))
    from fastdrag import DragEditor
    from fastdrag.config import EditConfig
    from fastdrag.demo import demo_case
    from fastdrag.export import merged_unet

    folder = tmp_path_factory.mktemp("drag-export")
    config = EditConfig().replace(num_inference_steps=INFERENCE_STEPS, start_step=START_STEP)
    editor = DragEditor(tiny, torch.device("cpu"), torch.float32, config, cache_dir=folder / "cache", progress=False)
    case = demo_case()
    steps, passes = [], []
    from torch.onnx._internal.exporter import _fx_passes

    decompose = _fx_passes.decompose_with_registry
    _fx_passes.decompose_with_registry = lambda program, registry: passes.append(1) or decompose(program, registry)
    try:
        manifest = editor.export(case.image, case.prompt, folder / "out", lora_steps=2, drag_points=POINTS,
                                 keep_source_kv=True, on_step=lambda stage, done, total: steps.append((stage, done, total)))
    finally:
        _fx_passes.decompose_with_registry = decompose
    # the drag graph, decomposed as it is traced, skips the exporter's decomposition pass (tests/test_export.py)
    assert len(passes) == 5
    # the drag graph is one more graph written (`graph_count` counts the others: 5 with unet_kept)
    assert [step for step in steps if step[0] == "export"] == [("export", done, 6) for done in range(7)]
    assert manifest.data["reference_control"] == {"start_layer": 10, "start_step": START_STEP}
    assert manifest.data["source_kv"]["steps"] == 7 - START_STEP  # the swapped steps' keys and values only
    return editor, manifest, merged_unet(tiny.unet)


def drag_case(manifest, seed, border=False):
    """A latent, handles, targets and a random editable mask. `border`: handles on the map's border, whose
    motion supervision patches leave the map; else inside it, where tracking meets no structural tie (the
    4x upsampled feature map repeats its border rows and columns, so a window over them compares equal
    features, and rounding alone picks among them)."""
    generator = torch.Generator().manual_seed(seed)
    shape = manifest.data["latent_shape"]
    height, width = manifest.data["drag"]["supervision_size"]
    if border:
        handles = torch.tensor([[0.0, 5.0], [height - 1.0, width - 2.0]])
        targets = torch.tensor([[4.0, 9.0], [height - 6.0, width - 1.0]])
    else:
        handles = torch.tensor([[8.0, 10.0], [20.0, 17.0]])
        targets = torch.tensor([[12.0, 16.0], [16.0, 22.0]])
    mask = (torch.rand(1, 1, *shape[2:], generator=generator) > 0.3).float()
    return torch.randn(*shape, generator=generator), handles, targets, mask


def graph_feed(manifest, latent, handles, targets, mask, tracking, features, x_prev0):
    from fastdrag.export.manifest import read_tensor

    text = read_tensor(manifest.folder, manifest.data["artifacts"]["text_embedding"])
    return {"latents": latent.numpy(), "text_embeddings": np.array(text, np.float32), "handles": handles.numpy(),
            "targets": targets.numpy(), "handle_features": features.numpy(), "x_prev0": x_prev0.numpy(),
            "mask": mask.numpy(), "tracking": np.array([tracking], np.float32)}


def eager_step(unet, manifest, editor):
    from fastdrag.config import DragConfig
    from fastdrag.export.drag_graph import drag_step

    schedule = editor._schedule(editor.config)  # the exports' schedule
    assert len(manifest.data["schedule"]["denoise"]) == len(schedule.denoise_timesteps) == 7
    return drag_step(unet, schedule, manifest.data["drag"]["timestep"], DragConfig(),
                     tuple(manifest.data["drag"]["supervision_size"]))


def test_the_drag_graph_computes_pytorchs_drag_iteration(exported):
    """Gradient, tracking, loss, x_prev and the handles' features under ONNX Runtime are PyTorch's, with a
    mask: handles on the border whose patches leave the map (tracking off), and handles inside it with
    tracking on."""
    editor, manifest, merged = exported
    spec = manifest.data["artifacts"]["unet_drag"]
    assert [t["name"] for t in spec["inputs"]][:3] == ["latents", "text_embeddings", "handles"]
    assert spec["inputs"][2]["shape"] == [POINTS, 2] and all(t["dtype"] == "float32" for t in spec["inputs"])
    graph = session(manifest.path("unet_drag"))
    step = eager_step(merged, manifest, editor)
    for border, tracking in ((True, 0.0), (False, 1.0)):
        latent, handles, targets, mask = drag_case(manifest, 1, border)
        generator = torch.Generator().manual_seed(2)
        features = torch.randn(spec["inputs"][4]["shape"], generator=generator)
        x_prev0 = latent + 0.1 * torch.randn(latent.shape, generator=generator)
        feed = graph_feed(manifest, latent, handles, targets, mask, tracking, features, x_prev0)
        outputs = dict(zip([o["name"] for o in spec["outputs"]], graph.run(None, feed), strict=True))
        text = torch.from_numpy(feed["text_embeddings"])
        expected = step(latent, text, handles, targets, features, x_prev0, mask, torch.full((1,), tracking))
        names = ("grad", "tracked_handles", "loss", "x_prev", "handle_features_now")
        for name, want in zip(names, expected, strict=True):
            assert np.isfinite(outputs[name]).all(), name
            assert relative_error(outputs[name], want) < 1e-5, (name, border)
        assert np.abs(outputs["grad"]).max() > 0
        # random features: tracking moves the handles, and only with tracking on
        assert np.array_equal(outputs["tracked_handles"], handles.numpy()) == (not tracking)


def test_the_standalone_drag_loop_is_pytorchs_drag(exported):
    """`export/standalone.py`'s `drag` (the manifest's protocol in numpy) gives what `fastdrag.drag.drag`
    gives: the anchors' run, an Adam step, then a tracking step, also for fewer pairs than the graph
    takes. Longer loops part by rounding alone, as
    PyTorch's own loop does from a latent changed by 1e-7 (a drag's Adam steps amplify a near-zero
    gradient's rounding to a full step)."""
    from fastdrag.config import DragConfig
    from fastdrag.drag import drag

    editor, manifest, merged = exported
    standalone = standalone_module()
    latent, handles, targets, mask = drag_case(manifest, 3)
    text = torch.from_numpy(standalone.Export(manifest.folder).text().copy())
    schedule = editor._schedule(editor.config)  # the exports' schedule
    protocol = manifest.data["drag"]
    sup_res = tuple(protocol["supervision_size"])
    for latent_mask in (mask, None):
        expected = drag(merged, latent, protocol["timestep"], text, handles, targets, latent_mask, schedule,
                        DragConfig(drag_steps=2), sup_res, progress=False)
        result, final_handles, steps = standalone.drag(manifest.folder, latent.numpy(), handles.numpy(), targets.numpy(),
                                                       None if latent_mask is None else latent_mask.numpy(), steps=2)
        assert steps == expected.steps == 2
        np.testing.assert_array_equal(final_handles, expected.handles.numpy())
        assert np.abs(result - expected.latent.numpy()).max() < 1e-5
        assert np.abs(result - latent.numpy()).max() > 1e-3  # it moved
    # every handle already within reach: both stop at the first iteration, the latent as it was
    near = handles + torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = drag(merged, latent, protocol["timestep"], text, handles, near, mask, schedule, DragConfig(), sup_res,
                    progress=False)
    result, _, steps = standalone.drag(manifest.folder, latent.numpy(), handles.numpy(), near.numpy(), mask.numpy())
    assert steps == expected.steps == 1
    np.testing.assert_array_equal(result, latent.numpy())
    # fewer pairs than the graph takes: the rest padded, each a handle on its target, adds nothing
    expected = drag(merged, latent, protocol["timestep"], text, handles[1:], targets[1:], mask, schedule,
                    DragConfig(drag_steps=2), sup_res, progress=False)
    result, final_handles, steps = standalone.drag(manifest.folder, latent.numpy(), handles[1:].numpy(),
                                                   targets[1:].numpy(), mask.numpy(), steps=2)
    assert steps == expected.steps == 2 and final_handles.shape == (1, 2)
    np.testing.assert_array_equal(final_handles, expected.handles.numpy())
    assert np.abs(result - expected.latent.numpy()).max() < 1e-5
    three = torch.cat([handles, handles[:1]])
    with pytest.raises(ValueError, match="1 to 2 point pairs"):
        standalone.drag(manifest.folder, latent.numpy(), three.numpy(), three.numpy())


def test_the_drag_graph_refits_to_another_lora(exported):
    """Its refit map covers every LoRA-target weight, and the mapped initializers replaced by another
    LoRA's merged weights give that LoRA's drag step."""
    import onnx
    from onnx import numpy_helper

    from fastdrag.config import LoraConfig
    from fastdrag.export import merged_unet
    from fastdrag.export.refit import load_refit_maps, refit_arrays
    from fastdrag.lora import install_adapter, lora_parameters

    editor, manifest, merged = exported
    assert "unet_drag" in manifest.data["refit"]["graphs"]
    _, maps = load_refit_maps(manifest.folder / "refit.json")
    assert len(maps["unet_drag"]) == 16 * 2 * 4 and all(maps["unet_drag"].values())
    unet = editor.components.unet
    editor.release()
    install_adapter(unet, LoraConfig(), seed=4)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    other = merged_unet(unet)
    editor.release()  # the editor's adapter is no longer the one it loaded
    model = onnx.load(str(manifest.path("unet_drag")))
    arrays = refit_arrays(maps["unet_drag"], other)
    for initializer in model.graph.initializer:
        if initializer.name in arrays:
            initializer.CopyFrom(numpy_helper.from_array(arrays[initializer.name], initializer.name))
    latent, handles, targets, mask = drag_case(manifest, 5)
    features = torch.randn(POINTS, manifest.data["artifacts"]["unet_drag"]["inputs"][4]["shape"][1], generator=generator)
    feed = graph_feed(manifest, latent, handles, targets, mask, 0.0, features, latent)
    (grad, *_rest) = session(model.SerializeToString()).run(None, feed)
    text = torch.from_numpy(feed["text_embeddings"])
    args = (latent, text, handles, targets, features, latent, mask, torch.zeros(1))
    assert relative_error(grad, eager_step(other, manifest, editor)(*args)[0]) < 1e-5
    assert relative_error(grad, eager_step(merged, manifest, editor)(*args)[0]) > 1e-3


def test_drag_graph_manifest_and_bad_input(exported, tmp_path):
    from fastdrag.errors import ConfigError
    from fastdrag.export.pipeline import export_loaded

    editor, manifest, _ = exported
    protocol = json.loads((manifest.folder / "manifest.json").read_text())["drag"]
    assert protocol["points"] == POINTS and protocol["steps"] == 80 and protocol["lr"] == 0.01
    assert protocol["timestep"] == manifest.data["schedule"]["drag_timestep"]
    assert protocol["supervision_size"] == [manifest.data["image"]["height"] // 2, manifest.data["image"]["width"] // 2]
    from fastdrag.export.manifest import schema_problems

    assert schema_problems(manifest.data) == [] and "refit" in manifest.data  # the drag and refit sections too
    before_the_field = {name: entry for name, entry in manifest.data.items() if name != "vae_graphs"}  # older exports
    assert schema_problems(before_the_field) == []
    without_encoder = {name: entry for name, entry in manifest.data["artifacts"].items() if name != "vae_encoder"}
    assert schema_problems({**before_the_field, "artifacts": without_encoder})  # a service's export needs its VAE graphs
    assert schema_problems({**manifest.data, "artifacts": without_encoder})
    for wrong in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="drag_points"):
            export_loaded(editor.components, "key", editor.config.lora, (64, 64), torch.zeros(1, 77, 32), editor.config,
                          tmp_path / "out", drag_points=wrong)
    assert not (tmp_path / "out").exists()


def test_building_the_exporters_decomposition_table_writes_nothing_to_the_terminal():
    """The drag graph's decompositions come from the ONNX exporter's registry, whose building logs a warning for
    each op set it skips (torchvision's four, where torchvision is not installed) through torch's own handler on
    stderr, past `--quiet`: it is built with the exporter's loggers quieted, as the graphs are exported."""
    import logging

    from fastdrag.export.drag_graph import onnx_exporter_decompositions

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: the exporter skips none of its op sets, and logs nothing to quiet")
    logged, handler = [], logging.Handler()
    handler.emit = logged.append
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addHandler(handler)
    try:
        assert onnx_exporter_decompositions.__wrapped__()  # (the cached table is built again)
    finally:
        registration.removeHandler(handler)
    assert [record.getMessage() for record in logged] == []


def test_a_drag_graph_on_a_torch_that_cannot_trace_it_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    """torch 2.10 and 2.11 stop inside the drag iteration's backward under make_fx with a message about
    data-dependent control flow: the export says which torch it needs instead, before writing anything."""
    from fastdrag.config import EditConfig
    from fastdrag.errors import ConfigError, OutputExistsError
    from fastdrag.export import export_loaded

    config = EditConfig()
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(ConfigError, match=r"needs torch 2\.12 or later.*this is torch 2\.11\.0\+cu130"):
        export_loaded(tiny, "key", config.lora, (64, 64), torch.zeros(1, 77, 32), config, tmp_path / "out", drag_points=1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("a user's file")
    monkeypatch.setattr(torch, "__version__", "2.12.1+cu130")  # the oldest that traced it
    with pytest.raises(OutputExistsError):  # past the check, to the next one
        export_loaded(tiny, "key", config.lora, (64, 64), torch.zeros(1, 77, 32), config, tmp_path / "out", drag_points=1)


def test_the_vae_graphs_compute_the_vae(exported):
    """`editor.export` writes the VAE graphs a service encodes and decodes with (an editor's backend writes none:
    tests/test_export.py): each gives the PyTorch VAE's output on a random input."""
    editor, manifest, _ = exported
    vae = editor.components.vae
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        decoded, mean = vae.decode(latents).sample, vae.encode(image).latent_dist.mean
    (pixels_out,) = session(manifest.path("vae_decoder")).run(None, {"latents": latents.numpy()})
    (encoded,) = session(manifest.path("vae_encoder")).run(None, {"image": image.numpy()})
    assert relative_error(pixels_out, decoded) < 1e-4 and relative_error(encoded, mean) < 1e-4
    assert manifest.data["vae_graphs"] is True and manifest.data["precision"] == {"unet": "fp32", "vae": "fp32"}


def test_the_standalone_script_inverts_the_image_as_pytorch_does(exported, tmp_path):
    """`python export/standalone.py EXPORT IMAGE OUT` (the encoder graph, then the inversion graph along
    `schedule.inversion`) writes PyTorch's z_t of the merged UNet."""
    from fastdrag.demo import demo_case
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.inversion import invert
    from fastdrag.vae import encode_posterior

    editor, manifest, merged = exported
    case = demo_case()
    np.save(tmp_path / "image.npy", pixels(case.image))
    done = subprocess.run([sys.executable, str(ROOT / "export" / "standalone.py"), str(manifest.folder),
                           str(tmp_path / "image.npy"), str(tmp_path / "zt.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    z0 = encode_posterior(editor.components.vae, case.image).mean * editor.components.scaling_factor
    expected = invert(TorchDenoiser(merged), z0, torch.from_numpy(manifest.text_embedding().copy()),
                      editor._schedule(editor.config), progress=False)
    assert relative_error(np.load(tmp_path / "zt.npy"), expected) < 1e-4


def test_the_kept_graph_gives_the_reference_graphs_edited_row(exported):
    """`keep_source_kv`: the reference graph also gives each swapped layer's source keys and values, those
    PyTorch records in the same step, beside its noise; `unet_kept` with them and the edited latent alone
    gives the pair's edited row. The kept graph's refit map leaves out the weights only the source branch uses."""
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.export.refit import load_refit_maps
    from fastdrag.source_kv import SourceKV

    _, manifest, merged = exported
    names = manifest.data["source_kv"]["tensors"]
    assert names == [f"source_{kind}_{i}" for i in range(6) for kind in ("key", "value")]
    reference, kept = manifest.graphs["unet_reference"], manifest.graphs["unet_kept"]
    assert [t.name for t in reference.outputs] == ["eps", *names]
    assert [t.name for t in kept.inputs] == ["latents", "timestep", "text_embeddings", *names]
    assert kept.inputs[0].shape == (1, 4, 8, 8) and kept.outputs[0].shape == (1, 4, 8, 8)

    generator = torch.Generator().manual_seed(6)
    pair, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    t = np.array([341.0], dtype=np.float32)
    eps, *kv = session(manifest.path("unet_reference")).run(
        None, {"latents": pair.numpy(), "timestep": t, "text_embeddings": text.expand(2, -1, -1).numpy()})
    store = SourceKV()  # PyTorch's recording of the same step: its noise and the keys and values, layer by layer
    store.begin(pair, 1, 10, recording=True)
    store.set_step(0)
    denoiser = TorchDenoiser(merged)
    with torch.no_grad(), denoiser.reference_control(10, "sdpa", source_kv=store):
        expected = denoiser(pair, 341, text.expand(2, -1, -1))
    assert relative_error(eps, expected) < 1e-4  # the outputs added, the same reference step
    recorded = [tensor[0].numpy() for pair_of in store.slots.values() for tensor in pair_of]
    assert len(recorded) == len(kv) and all(relative_error(a, b) < 1e-4 for a, b in zip(kv, recorded, strict=True))

    kept_session = session(manifest.path("unet_kept"))
    run_kept = lambda latents: kept_session.run(
        None, {"latents": latents, "timestep": t, "text_embeddings": text.numpy(), **dict(zip(names, kv, strict=True))})[0]
    assert relative_error(run_kept(pair[1:].numpy()), eps[1:]) < 1e-5
    assert relative_error(run_kept(pair[:1].numpy()), eps[1:]) > 1e-3  # the latent input matters

    _, maps = load_refit_maps(manifest.folder / "refit.json")
    assert sorted(maps) == ["unet_drag", "unet_inversion", "unet_kept", "unet_reference"]
    unused = [name for name, entries in maps["unet_kept"].items() if not entries]
    assert len(unused) == 12 and all(".attn1.to_k." in n or ".attn1.to_v." in n for n in unused)  # blocks 10-15
    assert all(maps["unet_reference"][name] for name in unused)  # the reference graph projects them


def test_standalone_loops_keep_the_swapped_steps_keys_and_values_and_denoise_as_pytorch_does(exported, tmp_path):
    """`export/standalone.py`'s `denoise`, the model of a C++ service: the pair's loop runs the first START_STEP
    steps on the batch-1 graph and the rest on the swapping one, as PyTorch's `denoise_pair` and the ONNX
    Runtime backend do, and keeps each swapped step's keys and values; the edited latent alone with them ends
    where the pair's edited row does. Swapped from step 0 (the default), it is PyTorch's pair again."""
    from fastdrag.config import DenoiseConfig
    from fastdrag.denoise import denoise_pair
    from fastdrag.denoiser import TorchDenoiser
    from fastdrag.export.runtime import OnnxRuntimeDenoiser

    editor, manifest, merged = exported
    standalone = standalone_module()
    generator = torch.Generator().manual_seed(9)
    source, edited = (torch.randn(1, 4, 8, 8, generator=generator) for _ in range(2))
    pair, kept = standalone.denoise(manifest.folder, source.numpy(), edited.numpy())
    assert len(kept) == 7 - START_STEP and list(kept[0]) == manifest.data["source_kv"]["tensors"]
    alone, _ = standalone.denoise(manifest.folder, source.numpy(), edited.numpy(), kept=kept)
    assert alone.shape == (1, 4, 8, 8) and relative_error(alone, pair[1:]) < 1e-4
    schedule = editor._schedule(editor.config)  # the exports' schedule
    text = torch.from_numpy(manifest.text_embedding().copy())
    on_torch = TorchDenoiser(merged)
    config = DenoiseConfig(start_step=START_STEP)
    expected = denoise_pair(on_torch, source, edited, text, schedule, config, progress=False)
    assert relative_error(pair, expected) < 1e-4
    with torch.no_grad():
        on_runtime = denoise_pair(OnnxRuntimeDenoiser(manifest), source, edited, text, schedule, config, progress=False)
    assert relative_error(on_runtime.numpy(), expected) < 1e-4
    swapped_throughout = denoise_pair(on_torch, source, edited, text, schedule, DenoiseConfig(), progress=False)
    assert relative_error(pair[1:], swapped_throughout[1:]) > 1e-3  # the three plain steps made a difference
    throughout, kept = standalone.denoise(swapped_from_step_0(manifest, tmp_path / "swapped"), source.numpy(),
                                          edited.numpy())
    assert len(kept) == 7 and relative_error(throughout, swapped_throughout) < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT tests need the tensorrt package and a CUDA GPU (neither is installable/available here)")
def test_tensorrt_engines_keep_the_source_keys_and_values(exported, tmp_path):
    """The kept graph's engine beside the reference graph's (built from the export's ONNX graphs): a pair's
    step records the keys and values, and the edited latent alone with them gives the pair's edited row."""
    from fastdrag.export.tensorrt import BuildSettings, Engine, build_engine

    _, manifest, _ = exported
    settings = BuildSettings(fp16=False)
    engines = {name: Engine(build_engine(manifest.path(name), tmp_path / f"{name}.plan", settings))
               for name in ("unet_reference", "unet_kept")}
    names = manifest.data["source_kv"]["tensors"]
    pair, text = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(1, 77, 32, device="cuda")
    t = torch.tensor([341.0], device="cuda")
    outputs = {name: out.clone() for name, out in engines["unet_reference"].infer(
        {"latents": pair, "timestep": t, "text_embeddings": text.expand(2, -1, -1).contiguous()}).items()}
    kept = engines["unet_kept"].infer({"latents": pair[1:].contiguous(), "timestep": t, "text_embeddings": text,
                                       **{name: outputs[name] for name in names}})["eps"]
    assert relative_error(kept.cpu(), outputs["eps"][1:].cpu()) < 1e-3


def test_a_whole_edit_from_the_export_folder_alone_is_the_editors_edit(exported):
    """`export/standalone.py`'s `edit` (invert, drag on `unet_drag`, denoise the pair, decode: what a C++
    service runs) gives the editor's edit of the same picture, points, mask and settings (two drag steps:
    longer drags part by rounding alone, see above)."""
    from fastdrag.demo import demo_case

    editor, _, _ = exported
    case = demo_case()
    points = list(case.points) + [((40.0, 20.0), (44.0, 26.0))]
    editor.release()  # other tests gave the shared UNet other adapters: load the picture's from the cache again
    result = editor.edit(case.image, case.prompt, points, mask=case.mask, lora_steps=2, drag_steps=2)
    assert result.drag_steps == 2
    image = pixels(case.image)
    edited = standalone_module().edit(exported[1].folder, image, points, case.mask, drag_steps=2)
    edited_pixels = ((np.clip(edited[0], -1, 1).transpose(1, 2, 0) + 1.0) * 127.5).round()
    expected = np.asarray(result.image, np.float32)
    assert np.abs(edited_pixels - expected).mean() < 0.5 and np.abs(edited_pixels - expected).max() <= 4
    assert np.abs(expected - (image[0].transpose(1, 2, 0) + 1.0) * 127.5).mean() > 2  # the edit changed the picture


def test_the_standalone_edit_runs_without_the_python_stack(exported, tmp_path):
    """`python export/standalone.py edit ...` (numpy and ONNX Runtime alone: the script asserts that no
    fastdrag, torch, diffusers or transformers module was imported) writes the edit `edit` makes in
    process, at the manifest's settings (80 drag steps)."""
    from fastdrag.demo import demo_case

    _, manifest, _ = exported
    case = demo_case()
    image = pixels(case.image)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", np.asarray(case.mask))
    (tmp_path / "points.json").write_text(json.dumps(pairs_json(case.points)))
    done = subprocess.run([sys.executable, str(ROOT / "export" / "standalone.py"), "edit", str(manifest.folder),
                           str(tmp_path / "image.npy"), str(tmp_path / "points.json"), str(tmp_path / "out.npy"),
                           str(tmp_path / "mask.npy")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    edited = np.load(tmp_path / "out.npy")
    assert edited.shape == image.shape and np.isfinite(edited).all()
    expected = standalone_module().edit(manifest.folder, image, case.points, np.asarray(case.mask))
    np.testing.assert_array_equal(edited, expected)


def test_the_standalone_script_writes_its_output_whole_or_not_at_all(tmp_path):
    """`save_array`, the script's writer: what `np.save` writes, at the name `np.save` gives it (`.npy` added
    where missing); a save that fails half way (here an element that refuses to be pickled, after the
    header is written) leaves the old file as it was and no temporary file."""
    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("this element cannot be saved")

    save_array = standalone_module().save_array
    old = np.random.default_rng(0).standard_normal((1, 3, 5, 7)).astype(np.float32)
    assert save_array(tmp_path / "out.npy", old) == tmp_path / "out.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), old)
    assert save_array(tmp_path / "edited", old[0]) == tmp_path / "edited.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "edited.npy"), old[0])
    with pytest.raises(RuntimeError, match="cannot be saved"):
        save_array(tmp_path / "out.npy", np.array([np.zeros(3), Unsaveable()], dtype=object))
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), old)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["edited.npy", "out.npy"]


def mirrored_case():
    """The demo picture mirrored left to right, its points and mask with it: another image of the export's size."""
    from PIL import Image

    from fastdrag.demo import demo_case

    case = demo_case()
    width = case.image.size[0]
    image = Image.fromarray(np.ascontiguousarray(np.asarray(case.image)[:, ::-1]))
    points = [((width - hx, hy), (width - tx, ty)) for (hx, hy), (tx, ty) in case.points]
    return image, "a mirrored picture", points, np.ascontiguousarray(np.asarray(case.mask)[:, ::-1])


SECOND = [((22.4, 25.6), (30.0, 40.0)), ((40.0, 20.0), (44.0, 26.0))]  # a repeated edit's points: both drag slots


def pairs_json(points) -> list:
    """Drag pairs as points files and serve requests give them: [[[hx, hy], [tx, ty]], ...]."""
    return [[list(handle), list(target)] for handle, target in points]


def save_serve_images(tmp_path: Path):
    """The demo case and its mirror image, saved as serve's requests name them (image.npy, mirrored.npy, mask.npy);
    returns (the demo case, the mirrored image, its points)."""
    from fastdrag.demo import demo_case

    case = demo_case()
    mirrored, _, mirrored_points, _ = mirrored_case()
    np.save(tmp_path / "image.npy", pixels(case.image))
    np.save(tmp_path / "mirrored.npy", pixels(mirrored))
    np.save(tmp_path / "mask.npy", np.asarray(case.mask, np.float32))
    return case, mirrored, mirrored_points


REFIT_SETTINGS = dict(lora_steps=3, lora_lr=0.02)  # a LoRA far enough from the export's to tell them apart


def test_another_image_runs_on_the_export_from_its_refit_weights(exported, tmp_path):
    """`fastdrag refit` writes an image's merged LoRA-target weights and text embeddings for an export made
    from another image; the standalone protocol with that file computes the image's own UNet (and not the
    export's) and makes the editor's edit of it."""
    from fastdrag.cli import main
    from fastdrag.export.refit import load_refit_maps, load_refit_weights

    editor, manifest, _ = exported
    image, prompt, points, mask = mirrored_case()
    editor.release()
    image.save(tmp_path / "mirrored.png")
    path = tmp_path / "mirrored.safetensors"
    assert main(["refit", str(tmp_path / "mirrored.png"), "--prompt", prompt, "--export", str(manifest.folder),
                 "--output", str(path), "--cache-dir", str(editor.cache.directory), "--quiet",
                 "--lora-steps", str(REFIT_SETTINGS["lora_steps"]), "--lora-lr", str(REFIT_SETTINGS["lora_lr"])]) == 0
    weights, text, metadata = load_refit_weights(path)
    _, maps = load_refit_maps(manifest.folder / "refit.json")
    assert set(weights) == set(maps["unet_inversion"]) and metadata["prompt"] == prompt
    assert metadata["model"] == manifest.data["model"]["identity"] and metadata["lora_key"] != manifest.data["lora"]["key"]
    np.testing.assert_array_equal(text, editor.text_embeddings(prompt).numpy())
    calls = []  # a LoRA not yet cached (another seed) trains, and reports its steps
    editor.refit_weights(image, prompt, manifest.folder, tmp_path / "seed5.safetensors", seed=5,
                         on_step=lambda *call: calls.append(call), **REFIT_SETTINGS)
    assert calls == [("lora", done, REFIT_SETTINGS["lora_steps"]) for done in range(REFIT_SETTINGS["lora_steps"] + 1)]
    assert load_refit_weights(tmp_path / "seed5.safetensors")[2]["lora_key"] != metadata["lora_key"]

    key, cached = editor.train_lora(image, prompt, **REFIT_SETTINGS)  # the CLI cached it: the editor loads it
    assert cached and key == metadata["lora_key"]
    standalone = standalone_module()
    refitted, own = standalone.Export(manifest.folder, refit=path), standalone.Export(manifest.folder)
    generator = torch.Generator().manual_seed(11)
    latent = torch.randn(*manifest.data["latent_shape"], generator=generator)
    timestep = manifest.data["schedule"]["drag_timestep"]
    feed = {"latents": latent.numpy(), "timestep": np.array([timestep], np.float32), "text_embeddings": text}
    with torch.no_grad():
        expected = editor.components.unet(latent, timestep, encoder_hidden_states=torch.from_numpy(text)).sample
    assert relative_error(refitted.session("unet_inversion").run(None, feed)[0], expected) < 1e-5
    assert relative_error(own.session("unet_inversion").run(None, feed)[0], expected) > 1e-3

    editor.release()
    result = editor.edit(image, prompt, points, mask=mask, drag_steps=2, **REFIT_SETTINGS)
    pixels_in = pixels(image)
    edited = standalone.edit(refitted, pixels_in, points, mask, drag_steps=2)
    edited_pixels = ((np.clip(edited[0], -1, 1).transpose(1, 2, 0) + 1.0) * 127.5).round()
    reference = np.asarray(result.image, np.float32)
    assert np.abs(edited_pixels - reference).mean() < 0.5 and np.abs(edited_pixels - reference).max() <= 4

    np.save(tmp_path / "image.npy", pixels_in)  # the command line, in a process without the Python stack
    done = subprocess.run([sys.executable, str(ROOT / "export" / "standalone.py"), str(manifest.folder),
                           str(tmp_path / "image.npy"), str(tmp_path / "z_t.npy"), "--refit", str(path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "z_t.npy"), standalone.invert(refitted, pixels_in))


def test_refit_weights_refuse_an_export_they_cannot_serve(exported, tmp_path):
    import shutil

    from fastdrag.errors import InputError, OutputExistsError
    from fastdrag.export.refit import save_refit_weights

    editor, manifest, _ = exported
    image, prompt, _, _ = mirrored_case()
    out = tmp_path / "w.safetensors"
    with pytest.raises(InputError, match="works at 128x128, but .* take 64x64: pass size=\\(64, 64\\)"):
        editor.refit_weights(image.resize((128, 128)), prompt, manifest.folder, out, **REFIT_SETTINGS)
    with pytest.raises(InputError, match="can be refitted for LoRA targets"):
        editor.refit_weights(image, prompt, manifest.folder, out, lora_targets=("to_q",), **REFIT_SETTINGS)
    other_model = tmp_path / "other-model"
    shutil.copytree(manifest.folder, other_model)
    data = json.loads((other_model / "manifest.json").read_text())
    data["model"]["identity"] = "someone/else"
    (other_model / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="exported from model 'someone/else'"):
        editor.refit_weights(image, prompt, other_model, out, **REFIT_SETTINGS)
    assert not out.exists()
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        editor.refit_weights(image, prompt, manifest.folder, out, **REFIT_SETTINGS)
    save_refit_weights(out, {}, torch.zeros(1, 77, 32), {"model": "someone/else", "width": "64", "height": "64"})
    with pytest.raises(ValueError, match="holds weights of model 'someone/else'"):
        standalone_module().Export(manifest.folder, refit=out)
    save_refit_weights(out, {}, torch.zeros(1, 77, 32), {"model": manifest.data["model"]["identity"], "width": "128",
                                                         "height": "64"})
    with pytest.raises(ValueError, match="is for 128x64 images; .* take 64x64"):
        standalone_module().Export(manifest.folder, refit=out)
    editor.release()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="TensorRT tests need the tensorrt package and a CUDA GPU (neither is installable/available here)")
def test_tensorrt_drag_engine_gives_the_onnx_graphs_gradient(exported, tmp_path):
    """The drag graph's engine, built as the export builds it (fp32: fp16 off), gives ONNX Runtime's
    gradient and tracking."""
    from fastdrag.export.tensorrt import BuildSettings, Engine, build_engine

    _, manifest, _ = exported
    engine = Engine(build_engine(manifest.path("unet_drag"), tmp_path / "unet_drag.plan", BuildSettings(fp16=False)))
    latent, handles, targets, mask = drag_case(manifest, 6)
    features = torch.randn(POINTS, manifest.data["artifacts"]["unet_drag"]["inputs"][4]["shape"][1])
    feed = graph_feed(manifest, latent, handles, targets, mask, 1.0, features, latent + 0.05)
    expected = dict(zip([o["name"] for o in manifest.data["artifacts"]["unet_drag"]["outputs"]],
                        session(manifest.path("unet_drag")).run(None, feed), strict=True))
    outputs = engine.infer({name: torch.from_numpy(value).cuda() for name, value in feed.items()})
    assert relative_error(outputs["grad"].cpu(), expected["grad"]) < 1e-3
    np.testing.assert_array_equal(outputs["tracked_handles"].cpu().numpy(), expected["tracked_handles"])


def test_the_export_command_takes_a_count_of_drag_points(capsys):
    from fastdrag.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["export", "a.png", "--prompt", "p", "--output", "o"]).drag_points == 0
    assert parse(["export", "a.png", "--prompt", "p", "--output", "o", "--drag-points", "3"]).drag_points == 3
    with pytest.raises(SystemExit) as exit_info:
        parse(["export", "a.png", "--prompt", "p", "--output", "o", "--drag-points", "-1"])
    assert exit_info.value.code == 2 and "must be at least 0" in capsys.readouterr().err


# ---- export/cpp/fastdrag_edit: the same protocol in C++ with ONNX Runtime's C++ API ----

REQUIRE_CPP = os.environ.get("FASTDRAG_REQUIRE_CPP") == "1"  # .ci/run installs the toolchain and sets it


@pytest.fixture(scope="module")
def cpp_program(tmp_path_factory):
    """`export/cpp/fastdrag_edit` built by `export/cpp/build.sh` against the onnxruntime wheel's library.
    Skipped, with build.sh's reason, where a prerequisite is missing (a compiler, CMake, nlohmann-json,
    ONNX Runtime's headers: `bash export/cpp/fetch_onnxruntime_headers.sh`); with FASTDRAG_REQUIRE_CPP=1
    that is a failure. A build that fails with everything there always fails."""
    build = tmp_path_factory.mktemp("cpp-build")
    done = subprocess.run(["bash", str(ROOT / "export" / "cpp" / "build.sh"), str(build)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    if done.returncode == 3 and not REQUIRE_CPP:
        pytest.skip(f"the C++ example cannot be built here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


def run_cpp(program: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=900)


def test_the_cpp_program_edits_as_the_standalone_script_does(cpp_program, exported, tmp_path):
    """The C++ program, from the export folder alone, writes `export/standalone.py`'s edit bit for bit: two
    point pairs (every slot of the drag graph) and a mask at the manifest's 80 drag steps; one pair, no mask
    and `--drag-steps 3`; and the inversion alone, on one thread."""
    from fastdrag.demo import demo_case

    _, manifest, _ = exported
    standalone = standalone_module()
    case = demo_case()
    points = list(case.points) + [((40.0, 20.0), (44.0, 26.0))]
    image = pixels(case.image)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", np.asarray(case.mask, np.float64))
    (tmp_path / "points.json").write_text(json.dumps(pairs_json(points)))
    done = run_cpp(cpp_program, "edit", manifest.folder, tmp_path / "image.npy", tmp_path / "points.json",
                   tmp_path / "out.npy", tmp_path / "mask.npy")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split()[0] for line in done.stderr.splitlines()] == ["invert", "drag", "denoise", "decode"]
    edited = np.load(tmp_path / "out.npy")
    assert edited.dtype == np.float32 and edited.shape == image.shape and np.isfinite(edited).all()
    np.testing.assert_array_equal(edited, standalone.edit(manifest.folder, image, points, np.asarray(case.mask)))
    assert np.abs(edited - image).mean() > 2 / 127.5  # the edit changed the picture
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.npy", "mask.npy", "out.npy", "points.json"]

    (tmp_path / "one.json").write_text(json.dumps(pairs_json(case.points)))
    done = run_cpp(cpp_program, "edit", manifest.folder, tmp_path / "image.npy", tmp_path / "one.json",
                   tmp_path / "short.npy", "--drag-steps", "3", "--progress-json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "drag" in done.stderr and "(3 iterations)" in done.stderr
    steps = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    inverted, denoised = len(manifest.data["schedule"]["inversion"]), len(manifest.data["schedule"]["denoise"])
    assert steps == ([{"stage": "invert", "done": n, "total": inverted} for n in range(inverted + 1)]
                     + [{"stage": "drag", "done": n, "total": 3} for n in range(4)]
                     + [{"stage": "denoise", "done": n, "total": denoised} for n in range(denoised + 1)])
    short = np.load(tmp_path / "short.npy")
    np.testing.assert_array_equal(short, standalone.edit(manifest.folder, image, case.points, None, drag_steps=3))
    assert np.abs(short - edited).max() > 0.01

    done = run_cpp(cpp_program, "invert", manifest.folder, tmp_path / "image.npy", tmp_path / "z_t.npy",
                   "--quiet", "--threads", "1", "--provider", "cpu")
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    z_t = np.load(tmp_path / "z_t.npy")
    assert z_t.shape == tuple(manifest.data["latent_shape"])
    np.testing.assert_array_equal(z_t, standalone.invert(manifest.folder, image))


def test_the_cpp_program_runs_another_image_from_its_refit_weights(cpp_program, exported, tmp_path):
    """With `--refit` (a `fastdrag refit` file of another image) the C++ program puts that image's weights in
    place of the graphs' initializers and its text embeddings in place of the export's, as the standalone
    script does: the same edit and inversion bit for bit, and not the edit with the export's own weights. So does
    `serve` with a request's `"refit"`, which changes the weights it runs on from one request to the next."""
    editor, manifest, _ = exported
    standalone = standalone_module()
    image, prompt, points, mask = mirrored_case()
    path = tmp_path / "mirrored.safetensors"
    editor.refit_weights(image, prompt, manifest.folder, path, **REFIT_SETTINGS)
    editor.release()
    np.save(tmp_path / "image.npy", pixels(image))
    np.save(tmp_path / "mask.npy", (np.asarray(mask) > 0.5).astype(np.uint8) * 255)  # uint8 masks read as numpy does
    (tmp_path / "points.json").write_text(json.dumps(pairs_json(points)))
    done = run_cpp(cpp_program, "edit", manifest.folder, tmp_path / "image.npy", tmp_path / "points.json",
                   tmp_path / "out.npy", tmp_path / "mask.npy", "--refit", path, "--drag-steps", "4", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    edited = np.load(tmp_path / "out.npy")
    refitted = standalone.Export(manifest.folder, refit=path)
    np.testing.assert_array_equal(edited, standalone.edit(refitted, pixels(image), points, mask, drag_steps=4))
    own = standalone.edit(manifest.folder, pixels(image), points, mask, drag_steps=4)
    assert np.abs(edited - own).mean() > 0.01

    done = run_cpp(cpp_program, "invert", manifest.folder, tmp_path / "image.npy", tmp_path / "z_t.npy", "--refit", path)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "z_t.npy"), standalone.invert(refitted, pixels(image)))

    # serve: a request's "refit" (null: the export's own weights) replaces the weights the server runs on, and
    # with them the kept inversion; one it cannot read is answered and keeps the current weights
    edit = lambda ident, **more: {"id": ident, "image": str(tmp_path / "image.npy"), "points": pairs_json(points),
                                  "out": str(tmp_path / f"{ident}.npy"), "mask": str(tmp_path / "mask.npy"), "drag_steps": 4, **more}
    server = subprocess.Popen([str(cpp_program), "serve", str(manifest.folder), "--refit", str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(request):
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        answers = [ask(edit(1)), ask(edit(2, refit=str(path))), ask(edit(3, refit=str(tmp_path / "missing.safetensors"))),
                   ask(edit(4)), ask(edit(5, refit=None)), ask(edit(6, refit=str(path)))]
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))  # the file written again: read again
        answers.append(ask(edit(7, refit=str(path))))
        server.stdin.close()
        assert server.wait(timeout=60) == 0, server.stderr.read()[-3000:]
    finally:
        server.kill()
    assert [answer.get("kept", {}).get("inversion") for answer in answers] == [False, True, None, True, False, False, False]
    assert answers[2]["error"] == f"cannot read {tmp_path / 'missing.safetensors'}"
    for ident in (1, 2, 4, 6, 7):  # the command's --refit, or the request's (the same file)
        np.testing.assert_array_equal(np.load(tmp_path / f"{ident}.npy"), edited)
    np.testing.assert_array_equal(np.load(tmp_path / "5.npy"), own)


def test_the_cpp_program_refuses_bad_input_in_one_line(cpp_program, exported, tmp_path):
    """Each bad input or unusable export: exit status 2, one line on stderr that names the problem, no output file."""
    import shutil

    from fastdrag.demo import demo_case
    from fastdrag.export.refit import save_refit_weights

    _, manifest, _ = exported
    case = demo_case()
    folder = manifest.folder
    np.save(tmp_path / "image.npy", pixels(case.image))
    np.save(tmp_path / "small.npy", pixels(case.image.resize((32, 32))))
    np.save(tmp_path / "ints.npy", np.zeros((1, 3, 64, 64), np.int64))
    np.save(tmp_path / "mask32.npy", np.ones((32, 32), np.float32))
    good = tmp_path / "good.json"
    good.write_text(json.dumps([[[20, 20], [30, 24]]]))
    bad_points = {"outside": ([[[64.5, 10], [60, 12]]], r"handle \[64\.5,10\] of drag pair 0 is outside the 64x64 image"),
                  "same": ([[[10, 10], [10.0, 10.0]]], "drag pair 0 has its handle equal to its target"),
                  "three": ([[[1, 1], [2, 2]]] * 3, r"give 1 to 2 \[\[hx, hy\], \[tx, ty\]\] pairs"),
                  "none": ([], "give 1 to 2"),
                  "flat": ([[1, 2, 3, 4]], r"drag pair 0 is not a \(handle, target\) pair of \(x, y\) points"),
                  "text": ([[["a", 1], [2, 2]]], r"drag pair 0 is not a \(handle, target\) pair")}
    no_drag = tmp_path / "no-drag"
    no_drag.mkdir()
    data = dict(manifest.data)
    data.pop("drag")
    (no_drag / "manifest.json").write_text(json.dumps(data))
    shutil.copy(folder / "text_embedding.bin", no_drag)
    unet_only = tmp_path / "unet-only"  # as an editor's backend writes its export: no VAE graphs
    unet_only.mkdir()
    data = {**manifest.data, "vae_graphs": False,
            "artifacts": {name: entry for name, entry in manifest.data["artifacts"].items() if not name.startswith("vae_")}}
    (unet_only / "manifest.json").write_text(json.dumps(data))
    shutil.copy(folder / "text_embedding.bin", unet_only)
    other = tmp_path / "other.safetensors"
    save_refit_weights(other, {}, torch.zeros(1, 77, 32), {"model": "someone/else", "width": "64", "height": "64"})
    runs = [(["edit", folder, "image.npy", "missing.json"], "cannot read .*missing.json"),
            (["edit", folder, "small.npy", good], r"small.npy has shape \(1, 3, 32, 32\); this export takes \(1, 3, 64, 64\)"),
            (["edit", folder, "ints.npy", good], "holds <i8 values"),
            (["edit", folder, "image.npy", good, "out.npy", "mask32.npy"], r"the mask must be \(64, 64\)"),
            (["edit", tmp_path / "nowhere", "image.npy", good], "no manifest.json in .*nowhere: not an export folder"),
            (["edit", no_drag, "image.npy", good], "has no drag graph: export with --drag-points N"),
            (["edit", folder, "image.npy", good, "out.npy", "--refit", other], "holds weights of model someone/else"),
            (["edit", folder, "image.npy", good, "out.npy", "--drag-steps", "x"], "--drag-steps takes a whole number"),
            (["edit", folder, "image.npy", good, "out.npy", "--fast"], "unknown option --fast"),
            (["edit", folder, "image.npy", good, "out.npy", "--provider", "gpu"], r"unknown provider gpu: cpu, cuda or cuda:N \(GPU N\)"),
            (["edit", folder, "image.npy", good, "out.npy", "--provider", "cuda:"], "unknown provider cuda:: cpu, cuda or"),
            (["edit", folder, "image.npy", good, "out.npy", "--provider", "cuda:-1"], "unknown provider cuda:-1: cpu, cuda or"),
            (["serve", no_drag], "has no drag graph"),
            (["serve", unet_only], r"unet-only holds only the UNet graphs of an editor's backend \(vae_graphs: false\), "
                                   r"not the VAE graphs a service encodes and decodes with: write its export with `fastdrag export`"),
            (["invert", folder, "image.npy"], "usage: fastdrag_edit edit EXPORT_DIR")]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # the library the program links
        runs += [(["edit", folder, "image.npy", good, "out.npy", "--provider", provider],
                  rf"provider {provider}: this ONNX Runtime library \(1\.\d+\.\d+\) has no CUDAExecutionProvider, only "
                  r".*CPUExecutionProvider; link a GPU build's library") for provider in ("cuda", "cuda:1")]
    for name, (pairs, _) in bad_points.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(pairs))
    runs += [(["edit", folder, "image.npy", tmp_path / f"{name}.json"], message) for name, (_, message) in bad_points.items()]
    for args, message in runs:
        if args[0] == "edit" and len(args) == 4:
            args = args + ["out.npy"]
        args = [tmp_path / arg if isinstance(arg, str) and arg.endswith(".npy") else arg for arg in args]
        done = run_cpp(cpp_program, *args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[0].startswith("fastdrag_edit: error: ") and re.search(message, done.stderr), (message, done.stderr)
        assert len(lines) == (4 if message.startswith("usage") else 1), done.stderr
        assert not (tmp_path / "out.npy").exists()


def test_the_cpp_program_names_fastdrags_version_the_schema_it_reads_and_its_onnx_runtime(cpp_program):
    """`fastdrag_edit --version` (what a service logs of what it runs) names fastdrag's version, the manifest
    schema version the C++ code reads and the ONNX Runtime library it runs on; the CMake package's version
    (CMakeLists.txt's project, which `find_package(fastdrag_export 0.1)` checks) is fastdrag's too."""
    import onnxruntime

    from fastdrag import __version__
    from fastdrag.export.manifest import SCHEMA_VERSION

    done = run_cpp(cpp_program, "--version")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == (f"fastdrag_edit {__version__} (manifest schema version {SCHEMA_VERSION}, "
                           f"ONNX Runtime {onnxruntime.__version__})\n")
    cmake = (ROOT / "export" / "cpp" / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(fastdrag_edit VERSION (\S+) ", cmake, re.M)[1] == __version__


def test_the_cpp_program_names_an_onnx_runtime_library_older_than_its_headers(cpp_program, tmp_path):
    """Run on an ONNX Runtime library older than the headers it was built with (the onnxruntime wheel 1.19,
    which setup.py admits for the Python side, under 1.21's headers): exit status 1 and one line that names
    the library's version and the one it needs, where it crashed with a segmentation fault. A stand-in
    library, compiled here, answers as an old one does: its version, and no API table for the headers'."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler for the stand-in ONNX Runtime library")
    source = tmp_path / "old_onnxruntime.c"
    source.write_text("""
        #include <stddef.h>
        typedef struct OrtApiBase {
          const void* (*GetApi)(unsigned int version);
          const char* (*GetVersionString)(void);
        } OrtApiBase;
        static const void* no_api(unsigned int version) { (void)version; return NULL; }
        static const char* version_string(void) { return "1.19.0"; }
        static const OrtApiBase base = {no_api, version_string};
        const OrtApiBase* OrtGetApiBase(void) { return &base; }
    """)
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(cpp_program)], capture_output=True, text=True)
    node = re.search(r"OrtGetApiBase@+(\S+)", symbols.stdout)  # the symbol version the program asks for
    script = tmp_path / "versions.map"
    script.write_text(f"{node[1] if node else 'VERS_1.0'} {{ global: OrtGetApiBase; local: *; }};\n")
    library = tmp_path / "lib" / "libonnxruntime.so.1"
    library.parent.mkdir()
    subprocess.run([compiler, "-shared", "-fPIC", "-x", "c", str(source), "-o", str(library),
                    f"-Wl,--version-script={script}", "-Wl,-soname,libonnxruntime.so.1"], check=True, timeout=120)
    done = subprocess.run([str(cpp_program), "edit", str(tmp_path), "image.npy", "points.json", "out.npy"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LD_LIBRARY_PATH": str(library.parent)})
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert re.fullmatch(r"fastdrag_edit: this ONNX Runtime library \(1\.19\.0\) lacks C API version (\d+), which "
                        r"fastdrag_export was built with: run with ONNX Runtime 1\.\1 or later, or build against "
                        r"older headers\n", done.stderr), done.stderr
    assert not (tmp_path / "out.npy").exists()


def to_supervision(points, data) -> np.ndarray:
    """Image (x, y) points as the drag graph's (row, col) at the supervision size (manifest `data`'s `drag.how`)."""
    xy = np.asarray(points, np.float64)
    (sup_h, sup_w), image = data["drag"]["supervision_size"], data["image"]
    return np.stack([np.round(xy[:, 1] * sup_h / image["height"]), np.round(xy[:, 0] * sup_w / image["width"])], -1).astype(np.float32)


def kept_edit(folder, image, points, drag_steps):
    """The standalone protocol's repeated edit of `image` with its source keys and values kept: the drag on its
    z_t, then the edited latent alone through `unet_kept` with the keys and values a pair's denoising recorded."""
    standalone = standalone_module()
    export = standalone.Export(folder)
    z_t = standalone.invert(export, image)
    _, kept = standalone.denoise(export, z_t, z_t)  # the source row's keys and values: the edited row does not reach them
    assert len(kept) == export.manifest["source_kv"]["steps"]
    edited, _, _ = standalone.drag(export, z_t, to_supervision([h for h, _ in points], export.manifest),
                                   to_supervision([t for _, t in points], export.manifest), None, drag_steps)
    alone, _ = standalone.denoise(export, z_t, edited, kept=kept)
    return standalone.decode(export, alone)


def test_the_cpp_program_serves_edits_reusing_an_images_inversion_and_source_keys_and_values(cpp_program, exported, tmp_path):
    """`fastdrag_edit serve`: JSON requests on stdin, one JSON answer a line on stdout. An image's first edit is
    the standalone edit bit for bit and keeps the source branch's keys and values; its next edit reuses the
    inversion and denoises the edited latent alone through `unet_kept`, as the standalone protocol's
    `denoise(kept=...)` does, bit for bit (and within 1e-3 of the pair's edited row); bad requests are answered
    with an error and serving goes on; another image, preloaded (`"op": "preload"`), is inverted ahead of its
    edit, which keeps that inversion and is the standalone edit bit for bit."""
    _, manifest, _ = exported
    folder, standalone = manifest.folder, standalone_module()
    case, mirrored, mirrored_points = save_serve_images(tmp_path)
    image = pixels(case.image)
    requests = [{"image": str(tmp_path / "image.npy"), "points": pairs_json(case.points), "out": str(tmp_path / "one.npy"),
                 "mask": str(tmp_path / "mask.npy")},
                {"image": str(tmp_path / "image.npy"), "points": pairs_json(SECOND), "out": str(tmp_path / "two.npy"),
                 "drag_steps": 3},
                {"image": str(tmp_path / "image.npy"), "points": [[[99, 1], [2, 2]]], "out": str(tmp_path / "bad.npy")},
                {"points": pairs_json(SECOND)},
                {"op": "preload", "image": str(tmp_path / "mirrored.npy"), "id": "ahead"},
                {"op": "preload", "image": str(tmp_path / "mirrored.npy"), "points": pairs_json(SECOND), "id": 6},
                {"op": "undo", "image": str(tmp_path / "mirrored.npy")},
                {"image": str(tmp_path / "mirrored.npy"), "points": pairs_json(mirrored_points), "out": str(tmp_path / "three.npy"),
                 "drag_steps": 3},
                {"image": str(tmp_path / "image.npy"), "points": pairs_json(SECOND), "out": str(tmp_path / "typo.npy"), "drag_step": 3,
                 "Mask": "m.npy"}]
    lines = [json.dumps(request) for request in requests]
    lines.insert(3, "not json")
    done = subprocess.run([str(cpp_program), "serve", str(folder)], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == 10, done.stdout

    assert answers[0]["kept"] == {"inversion": False, "source_kv": False} and answers[0]["drag_iterations"] > 3
    assert set(answers[0]["seconds"]) == {"invert", "drag", "denoise", "decode"}
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), standalone.edit(folder, image, case.points, np.asarray(case.mask)))

    assert answers[1]["kept"] == {"inversion": True, "source_kv": True} and answers[1]["drag_iterations"] == 3
    two = np.load(tmp_path / "two.npy")
    np.testing.assert_array_equal(two, kept_edit(folder, image, SECOND, 3))
    paired = standalone.edit(folder, image, SECOND, None, drag_steps=3)
    assert np.abs(two - paired).max() < 1e-3  # (equal in the run I measured: the kept graph is the pair's edited row)

    assert re.search(r"handle \[99,1\] of drag pair 0 is outside the 64x64 image", answers[2]["error"])
    assert "not one serve takes" in answers[3]["error"]
    assert "a request is a JSON object with" in answers[4]["error"]
    assert not (tmp_path / "bad.npy").exists()
    # another image, preloaded (inverted ahead of its edit): its edit keeps that inversion, and is the standalone edit
    assert answers[5]["preloaded"] == str(tmp_path / "mirrored.npy") and answers[5]["kept"] == {"inversion": False}
    assert answers[5]["id"] == "ahead" and answers[6]["id"] == 6 and "id" not in answers[7]  # a request's id comes back
    assert answers[5]["seconds"]["invert"] > 0
    assert answers[6]["error"].startswith('a preload request is {"op": "preload", "image": "IMAGE.npy"} (and "id", "deadline_s", "refit") and nothing else')
    assert answers[7]["error"] == '"op" is "edit" (the default), "preload" or "release", not "undo"'
    assert answers[8]["kept"] == {"inversion": True, "source_kv": False}
    np.testing.assert_array_equal(np.load(tmp_path / "three.npy"),
                                  standalone.edit(folder, pixels(mirrored), mirrored_points, None, drag_steps=3))
    assert answers[9]["error"] == ('unknown request key(s) "Mask", "drag_step"; an edit request takes image, points, out, mask, '
                                   'drag_steps, deadline_s, refit and id')
    assert not (tmp_path / "typo.npy").exists()


def swapped_from_step_0(manifest, folder: Path) -> Path:
    """A copy of `manifest`'s export (its files linked) whose manifest swaps from the first denoising step, the
    default: the graphs do not depend on the start step, the manifest's `reference_control` and `source_kv` do."""
    folder.mkdir()
    for path in manifest.folder.iterdir():
        if path.name != "manifest.json":
            (folder / path.name).symlink_to(path)
    data = json.loads((manifest.folder / "manifest.json").read_text())
    data["reference_control"]["start_step"] = 0
    data["source_kv"]["steps"] = len(data["schedule"]["denoise"])
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_the_cpp_program_denoises_an_export_swapped_from_its_first_step_as_the_standalone_script_does(cpp_program,
                                                                                                    exported, tmp_path):
    """The other tests' export runs its first START_STEP denoising steps on the batch-1 graph; at the default
    start step 0 the C++ program's first edit swaps in every step, and its repeated edit keeps the source keys
    and values of all 7, each bit for bit the standalone protocol's."""
    _, manifest, _ = exported
    folder = swapped_from_step_0(manifest, tmp_path / "swapped-throughout")
    standalone = standalone_module()
    case, _, _ = save_serve_images(tmp_path)
    image = pixels(case.image)
    requests = [{"image": str(tmp_path / "image.npy"), "points": pairs_json(points), "out": str(tmp_path / name),
                 "drag_steps": 3} for points, name in ((case.points, "one.npy"), (SECOND, "two.npy"))]
    done = subprocess.run([str(cpp_program), "serve", str(folder)], input="".join(json.dumps(r) + "\n" for r in requests),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = [json.loads(line) for line in done.stdout.splitlines()]
    assert first["kept"] == {"inversion": False, "source_kv": False} and second["kept"] == {"inversion": True, "source_kv": True}
    one = np.load(tmp_path / "one.npy")
    np.testing.assert_array_equal(one, standalone.edit(folder, image, case.points, None, drag_steps=3))
    np.testing.assert_array_equal(np.load(tmp_path / "two.npy"), kept_edit(folder, image, SECOND, 3))
    plain_first = standalone.edit(manifest.folder, image, case.points, None, drag_steps=3)
    assert np.abs(one - plain_first).max() > 1e-3  # the three plain steps make a difference


def test_the_cpp_program_stops_served_requests_at_a_cancel_line_or_their_deadline_and_keeps_nothing_of_them(
        cpp_program, exported, tmp_path):
    """`fastdrag_edit serve --progress-json`: a cancel line stops its request while it runs (here in the
    denoising, once the progress lines show a step of it) or before it starts (waiting behind another), and a
    request past its `deadline_s` stops at its next step (here in an inversion); each is answered `cancelled:
    ...` with its id. Nothing of a stopped stage is kept: the image's next edit keeps the inversion but not
    the half-recorded source keys and values, and is the standalone edit bit for bit; a stopped inversion of
    another image leaves the last one's inversion and keys and values in place (the edit after it reuses both,
    as the kept protocol does). Progress lines carry the request's id; a cancel line finds no later request."""
    _, manifest, _ = exported
    folder, standalone = manifest.folder, standalone_module()
    case, mirrored, mirrored_points = save_serve_images(tmp_path)
    image = pixels(case.image)
    edit = lambda ident, name, points, **more: json.dumps({"id": ident, "image": str(tmp_path / name), "points": pairs_json(points),
                                                           "out": str(tmp_path / f"{ident}.npy"), "drag_steps": 3, **more})
    denoised = len(manifest.data["schedule"]["denoise"])
    server = subprocess.Popen([str(cpp_program), "serve", str(folder), "--progress-json"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server.stdin.write(edit("a", "image.npy", case.points, mask=str(tmp_path / "mask.npy")) + "\n")
        server.stdin.flush()
        progress = []
        for line in server.stderr:  # until a step of the denoising (which records the keys and values) ran
            progress.append(json.loads(line))
            if progress[-1]["stage"] == "denoise" and progress[-1]["done"] == 1:
                break
        server.stdin.write(json.dumps({"op": "cancel", "id": "a"}) + "\n")
        lines = [edit("b", "image.npy", case.points, mask=str(tmp_path / "mask.npy")),
                 edit("c", "mirrored.npy", mirrored_points, deadline_s=0.02),
                 edit("d", "image.npy", SECOND), edit("e", "image.npy", SECOND), json.dumps({"op": "cancel", "id": "e"}),
                 json.dumps({"op": "cancel", "id": "a"}), json.dumps({"op": "cancel", "id": 7}), edit("a", "image.npy", SECOND)]
        answers, errors = server.communicate("\n".join(lines) + "\n", timeout=900)
    finally:
        server.kill()
    assert server.returncode == 0, errors[-3000:]
    answers = [json.loads(line) for line in answers.splitlines()]
    assert [answer["id"] for answer in answers] == ["a", "b", "c", "d", "e", "a"]
    stopped = re.fullmatch(rf"cancelled: by a cancel request, in the denoise stage at step (\d+) of {denoised}", answers[0]["error"])
    assert stopped and int(stopped[1]) < denoised, answers[0]  # (a step or two after the one the test saw)
    inverted = len(manifest.data["schedule"]["inversion"])
    assert progress == ([{"id": "a", "stage": "invert", "done": n, "total": inverted} for n in range(inverted + 1)]
                        + [{"id": "a", "stage": "drag", "done": n, "total": 3} for n in range(4)]
                        + [{"id": "a", "stage": "denoise", "done": n, "total": denoised} for n in range(2)])
    # the image's next edit: the inversion kept, the keys and values recorded again in full
    assert answers[1]["kept"] == {"inversion": True, "source_kv": False}
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"),
                                  standalone.edit(folder, image, case.points, np.asarray(case.mask), drag_steps=3))
    assert re.fullmatch(rf"cancelled: past its deadline of 0.02 s, in the invert stage at step \d+ of {inverted}",
                        answers[2]["error"]), answers[2]
    assert answers[3]["kept"] == {"inversion": True, "source_kv": True}
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), kept_edit(folder, image, SECOND, 3))
    assert answers[4]["error"] == "cancelled: by a cancel request, before it ran"
    assert "fastdrag_edit: cancel of id 7: no request of that id is waiting or running" in errors.splitlines()
    assert answers[5]["kept"] == {"inversion": True, "source_kv": True} and (tmp_path / "a.npy").exists()
    assert not any((tmp_path / f"{name}.npy").exists() for name in "ce")


def test_the_cpp_program_answers_a_served_request_that_onnx_runtime_fails_and_serves_the_next(cpp_program, exported, tmp_path):
    """A request that fails in ONNX Runtime (here the decoder's graph is not ONNX, found when the first edit
    loads it) is answered with ONNX Runtime's message and logged, nothing is written, and serving goes on: the
    next request, a preload of the same image, finds the inversion that the failed edit finished."""
    from fastdrag.demo import demo_case

    _, manifest, _ = exported
    broken = tmp_path / "export"
    broken.mkdir()
    for path in Path(manifest.folder).iterdir():
        (broken / path.name).symlink_to(path)
    (broken / "vae_decoder.onnx").unlink()
    (broken / "vae_decoder.onnx").write_text("not a graph")
    np.save(tmp_path / "image.npy", pixels(demo_case().image))
    lines = [{"id": 1, "image": str(tmp_path / "image.npy"), "points": [[[20, 20], [26, 24]]], "out": str(tmp_path / "out.npy"),
              "drag_steps": 2}, {"id": 2, "op": "preload", "image": str(tmp_path / "image.npy")}]
    done = subprocess.run([str(cpp_program), "serve", str(broken)], input="\n".join(map(json.dumps, lines)) + "\n",
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    failed, preloaded = map(json.loads, done.stdout.splitlines())
    assert failed["id"] == 1 and failed["error"].startswith(f"ONNX Runtime: Load model from {broken / 'vae_decoder.onnx'} failed")
    assert f"fastdrag_edit: request 1 failed: {failed['error']}" in done.stderr.splitlines()
    assert not (tmp_path / "out.npy").exists()
    assert preloaded == {"id": 2, "preloaded": str(tmp_path / "image.npy"), "kept": {"inversion": True},
                         "seconds": preloaded["seconds"]}


def test_the_cpp_program_warms_up_before_serving_and_releases_what_it_keeps(cpp_program, exported, tmp_path):
    """`serve --warm-up` runs `Editor::warm_up()` (every session made and run once, on a mid-grey image) before the
    first request and says so on stderr; it keeps nothing: a first request for that same grey image inverts it
    anew and is the standalone edit bit for bit. `{"op": "release"}` (`Editor::release`) frees the sessions and
    the kept image: the edit after it inverts again and is still the standalone edit bit for bit, where the one
    before it kept the inversion. `--warm-up` is serve's alone."""
    _, manifest, _ = exported
    image = np.zeros([1, 3, manifest.data["image"]["height"], manifest.data["image"]["width"]], np.float32)
    np.save(tmp_path / "grey.npy", image)
    points = [((10.0, 12.0), (16.0, 12.0))]
    edit = lambda name: {"image": str(tmp_path / "grey.npy"), "points": pairs_json(points), "out": str(tmp_path / name), "drag_steps": 2}
    lines = [edit("one.npy"), edit("two.npy"), {"op": "release", "id": 3}, {"op": "release", "image": "a.npy"}, edit("four.npy")]
    done = subprocess.run([str(cpp_program), "serve", str(manifest.folder), "--warm-up"], input="\n".join(map(json.dumps, lines)) + "\n",
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.fullmatch(r"warm-up \d+\.\d{3} s", done.stderr.strip()), done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [answer.get("kept") for answer in answers] == [{"inversion": False, "source_kv": False}, {"inversion": True, "source_kv": True},
                                                          None, None, {"inversion": False, "source_kv": False}]
    assert answers[2] == {"id": 3, "released": True}
    assert answers[3] == {"error": 'a release request is {"op": "release"} (and "id") and nothing else'}
    expected = standalone_module().edit(manifest.folder, image, points, None, drag_steps=2)
    for name in ("one.npy", "four.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / name), expected)
    refused = run_cpp(cpp_program, "invert", manifest.folder, tmp_path / "grey.npy", tmp_path / "z_t.npy", "--warm-up")
    assert refused.returncode == 2 and refused.stderr == "fastdrag_edit: error: --warm-up is serve's: an edit or inversion runs once\n"


def test_the_cpp_program_stops_serving_with_one_line_when_its_answers_cannot_be_delivered(cpp_program, exported):
    """A client that closed its end of stdout gets no answers: `fastdrag_edit serve` says so in one line and exits 1,
    as `fastdrag serve` does (before, SIGPIPE killed it without a word)."""
    _, manifest, _ = exported
    server = subprocess.Popen([str(cpp_program), "serve", str(manifest.folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    server.stdout.close()  # the reader goes away before the first answer
    _, errors = server.communicate("not json\n", timeout=300)
    assert (server.returncode, errors) == (1, "fastdrag_edit: error: the reader of the answers (stdout) went away; stopped serving\n")


def stopped(process: subprocess.Popen, signal_number: int, after) -> tuple:
    """Send `signal_number` to `process` once `after(line)` is true of one of its stderr lines (a JSON progress line,
    parsed; the others are passed over); returns (its exit status, the stderr lines after the signal, its stdout)."""
    for line in process.stderr:
        if line.startswith("{") and after(json.loads(line)):
            break
    process.send_signal(signal_number)
    output, errors = process.communicate(timeout=120)
    return process.returncode, errors.splitlines(), output


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_the_cpp_program_stops_at_sigterm_or_ctrl_c_with_one_line_and_writes_nothing(cpp_program, exported, tmp_path,
                                                                                     signal_number):
    """SIGTERM (systemd, Docker, Kubernetes) or Ctrl-C's SIGINT stops `fastdrag_edit` at its next step: an edit
    exits 143 or 130 with one line, `fastdrag_edit: terminated` or `interrupted`, and writes nothing (no output,
    no temporary file beside it); `serve` stops the request it runs, unanswered, after answering the ones before
    it, and an idle `serve` (stdin open, no request) stops as soon. (Before, the signal killed the program.)"""
    _, manifest, _ = exported
    case, _, _ = save_serve_images(tmp_path)
    code, last_line = 128 + signal_number, "fastdrag_edit: " + ("terminated" if signal_number == signal.SIGTERM else "interrupted")
    (tmp_path / "points.json").write_text(json.dumps(pairs_json(case.points)))
    out = tmp_path / "out" / "edited.npy"
    out.parent.mkdir()
    edit = subprocess.Popen([str(cpp_program), "edit", str(manifest.folder), str(tmp_path / "image.npy"), str(tmp_path / "points.json"),
                             str(out), "--progress-json"], stderr=subprocess.PIPE, text=True)
    try:  # stopped in its drag, with its drag and denoising steps ahead of it
        status, after, _ = stopped(edit, signal_number, lambda step: step["stage"] == "drag" and step["done"] == 1)
    finally:
        edit.kill()
    assert status == code and after[-1] == last_line and all(line.startswith("{") for line in after[:-1]), after
    assert list(out.parent.iterdir()) == []

    request = lambda name, steps: json.dumps({"id": name, "image": str(tmp_path / "image.npy"), "points": pairs_json(case.points),
                                              "out": str(out.parent / f"{name}.npy"), "drag_steps": steps})
    server = subprocess.Popen([str(cpp_program), "serve", str(manifest.folder), "--progress-json"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # the second request stopped in its drag; the third never starts
        server.stdin.write("\n".join([request("first", 1), request("second", 80), request("third", 1)]) + "\n")
        server.stdin.flush()
        status, after, answers = stopped(server, signal_number, lambda step: step.get("id") == "second" and step["stage"] == "drag"
                                         and step["done"] == 1)
    finally:
        server.kill()
    assert status == code and after[-1] == last_line, after
    assert [json.loads(line)["id"] for line in answers.splitlines()] == ["first"]
    assert sorted(path.name for path in out.parent.iterdir()) == ["first.npy"]

    idle = subprocess.Popen([str(cpp_program), "serve", str(manifest.folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:  # answered a release, then waiting for a line on the open stdin
        idle.stdin.write(json.dumps({"op": "release"}) + "\n")
        idle.stdin.flush()
        assert json.loads(idle.stdout.readline()) == {"released": True}
        idle.send_signal(signal_number)
        idle.wait(timeout=60)  # (stdin still open)
        output, errors = idle.stdout.read(), idle.stderr.read()
    finally:
        idle.kill()
        idle.stdin.close()
    assert (idle.returncode, output, errors) == (code, "", last_line + "\n")


SERVICE_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(service LANGUAGES CXX)
find_package(fastdrag_export 0.1 CONFIG REQUIRED)
add_executable(service service.cpp)
target_link_libraries(service PRIVATE fastdrag::fastdrag_export)
"""


def installed_and_moved(cpp_program: Path, tmp_path: Path) -> Path:
    """The C++ build installed into a folder by `build.sh BUILD_DIR PREFIX` (`cmake --install`, the build being
    up to date), then that folder moved, as a service's image copies it."""
    installed = subprocess.run(["bash", str(ROOT / "export" / "cpp" / "build.sh"), str(cpp_program.parent),
                                str(tmp_path / "installed")], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "PYTHON": sys.executable})
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert installed.stdout.splitlines()[-1] == str(tmp_path / "installed" / "bin" / "fastdrag_edit")
    return (tmp_path / "installed").rename(tmp_path / "moved")


def build_cmake_project(folder: Path, *definitions: str) -> None:
    configured = subprocess.run(["cmake", "-S", str(folder), "-B", str(folder / "build"), *definitions],
                                capture_output=True, text=True, timeout=600)
    assert configured.returncode == 0, configured.stderr[-3000:]
    built = subprocess.run(["cmake", "--build", str(folder / "build"), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]

# A service of its own that embeds the library: a warm-up stopped by its on_step in the drag; an edit stopped by its
# on_step in the denoising, then the edit; a call from a running call's callback; two threads sharing the Editor.
SERVICE_CPP = """#include "fastdrag_export.hpp"

#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

static fastdrag::Tensor read_image(const fastdrag::Editor& editor, const char* path) {
  const nlohmann::json& size = editor.manifest()["image"];
  fastdrag::Tensor image{{1, 3, size["height"].get<int64_t>(), size["width"].get<int64_t>()}, {}};
  image.data.resize(fastdrag::element_count(image.shape));
  std::ifstream(path, std::ios::binary).read(reinterpret_cast<char*>(image.data.data()), 4 * image.data.size());
  return image;
}

static void write_image(const fastdrag::Tensor& image, const std::string& path) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(image.data.data()), 4 * image.data.size());
}

int main(int argc, char** argv) {
  if (argc != 6) return 2;  // service EXPORT_DIR IMAGE.f32 OTHER.f32 POINTS_JSON OUT_DIR (raw float32 images)
  fastdrag::Editor editor(argv[1]);
  const fastdrag::Tensor image = read_image(editor, argv[2]), other = read_image(editor, argv[3]);
  const fastdrag::Points points = editor.points(nlohmann::json::parse(argv[4]), "the points");
  const std::string out = argv[5];
  struct Stop {};
  std::string warm_up_steps;
  try {
    editor.warm_up([&](const std::string& stage, int done, int) {
      warm_up_steps += stage + " " + std::to_string(done) + ",";
      if (stage == "drag" && done == 1) throw Stop{};
    });
    return 1;
  } catch (const Stop&) {
  }
  std::printf("%s\\n", warm_up_steps.c_str());
  try {
    editor.edit(image, points, {}, 3, true, {}, [](const std::string& stage, int done, int) {
      if (stage == "denoise" && done == 2) throw Stop{};
    });
    return 1;
  } catch (const Stop&) {
  }
  const fastdrag::Edited edited = editor.edit(image, points, {}, 3);
  std::printf("%d %d\\n", edited.kept_inversion, edited.kept_source_kv);
  write_image(edited.image, out + "/edited.f32");
  try {
    editor.invert(other, [&](const std::string&, int done, int) {
      if (done == 1) editor.preload(image);
    });
    return 1;
  } catch (const std::logic_error& error) {
    std::printf("%s\\n", error.what());
  }
  fastdrag::Edited first, second;
  std::thread one([&] { first = editor.edit(image, points, {}, 3); });
  std::thread two([&] { second = editor.edit(other, points, {}, 3); });
  one.join();
  two.join();
  std::printf("%d %d %d\\n", first.kept_inversion, first.kept_source_kv, second.kept_inversion);
  write_image(first.image, out + "/first.f32");
  write_image(second.image, out + "/second.f32");
  return 0;
}
"""


def test_a_cpp_service_of_its_own_builds_on_the_installed_library_stops_an_edit_from_its_on_step_and_shares_the_editor(
        cpp_program, exported, tmp_path):
    """The C++ build installed (`build.sh BUILD_DIR PREFIX`) and the folder moved elsewhere holds the program,
    the library, the headers, ONNX Runtime's library, providers and headers, and a CMake package naming none of
    the folders it came from or went to. The moved program runs (its run path is its own folder's) and inverts
    as standalone.py does. A CMake project of a service's own takes the library with
    `find_package(fastdrag_export)` from the moved folder alone (README, "A C++ service"). Its `warm_up`'s
    `on_step` is told the grey edit's steps, and throws in its drag: the warm-up stops there. Its `on_step`
    throws in the denoising of the image's first edit: the edit stops there, and the next edit keeps the
    finished inversion but not the half-recorded keys and
    values (`kept_source_kv` false) and is the standalone edit bit for bit. A call from a running call's
    callback is refused with `std::logic_error`. Two threads' edits of two images on one Editor take turns:
    each is the edit the Editor makes of it in either order (the first image's, after its last edit, through
    the kept keys and values if it went first)."""
    from fastdrag.demo import demo_case

    _, manifest, _ = exported
    standalone, folder = standalone_module(), manifest.folder
    image, other = pixels(demo_case().image), pixels(mirrored_case()[0])
    moved = installed_and_moved(cpp_program, tmp_path)
    runtime = moved / "lib" / "libonnxruntime.so.1"
    assert runtime.is_file() and not runtime.is_symlink()
    beside = (cpp_program.parent / "onnxruntime-lib" / "libonnxruntime.so.1").resolve().parent
    providers = sorted(path.name for path in beside.glob("libonnxruntime_providers_*.so"))  # (the wheel has one)
    assert providers and all((moved / "lib" / name).is_file() for name in providers)
    for header in ("fastdrag_export.hpp", "onnxruntime/onnxruntime_cxx_api.h"):
        assert (moved / "include" / header).is_file(), header
    package = sorted((moved / "lib" / "cmake" / "fastdrag_export").glob("*.cmake"))
    assert {path.name for path in package} >= {"fastdrag_exportConfig.cmake", "fastdrag_exportConfigVersion.cmake"}
    for path in package:
        for folder_named in (tmp_path, cpp_program.parent, ROOT):
            assert str(folder_named) not in path.read_text(), (path.name, folder_named)
    np.save(tmp_path / "image.npy", image)
    inverted = run_cpp(moved / "bin" / "fastdrag_edit", "invert", folder, tmp_path / "image.npy", tmp_path / "z_t.npy", "--quiet")
    assert inverted.returncode == 0, inverted.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "z_t.npy"), standalone.invert(folder, image))

    service = tmp_path / "service"
    service.mkdir()
    (service / "CMakeLists.txt").write_text(SERVICE_CMAKE)
    (service / "service.cpp").write_text(SERVICE_CPP)
    build_cmake_project(service, f"-DCMAKE_PREFIX_PATH={moved}")
    image.tofile(tmp_path / "image.f32")
    other.tofile(tmp_path / "other.f32")
    points = demo_case().points
    done = run_cpp(service / "build" / "service", folder, tmp_path / "image.f32", tmp_path / "other.f32",
                   json.dumps(pairs_json(points)), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    warm_up_steps, stopped, refused, turns = done.stdout.splitlines()
    inversion_steps = len(manifest.data["schedule"]["inversion"])
    assert warm_up_steps == "".join(f"invert {n}," for n in range(inversion_steps + 1)) + "drag 0,drag 1,"
    assert stopped == "1 0"  # the inversion kept, the stopped denoising's keys and values not
    load = lambda name: np.fromfile(tmp_path / f"{name}.f32", np.float32).reshape(image.shape)
    np.testing.assert_array_equal(load("edited"), standalone.edit(folder, image, points, None, drag_steps=3))
    assert refused == "an Editor call from a callback of its running call: return from the callback first"
    first_kept, first_kept_kv, second_kept = map(int, turns.split())
    assert second_kept == 0 and first_kept == first_kept_kv  # (kept both if it went first, else neither)
    expected = kept_edit(folder, image, points, 3) if first_kept else standalone.edit(folder, image, points, None, drag_steps=3)
    np.testing.assert_array_equal(load("first"), expected)
    np.testing.assert_array_equal(load("second"), standalone.edit(folder, other, points, None, drag_steps=3))


def test_a_cpp_project_takes_the_library_from_the_source_tree_with_add_subdirectory(cpp_program, exported, tmp_path):
    """Without installing: a CMake project's `add_subdirectory(export/cpp)` (given ONNX Runtime's headers and
    library as build.sh found them) builds the library and links it as `fastdrag::fastdrag_export`, the
    installed package's name."""
    _, manifest, _ = exported
    cache = (cpp_program.parent / "CMakeCache.txt").read_text()
    found = {key: re.search(rf"^{key}:\w+=(.*)$", cache, re.M)[1] for key in ("ONNXRUNTIME_INCLUDE_DIR", "ONNXRUNTIME_LIBRARY")}
    (tmp_path / "CMakeLists.txt").write_text(SOURCE_TREE_CMAKE.format(library=ROOT / "export" / "cpp"))
    (tmp_path / "main.cpp").write_text(SOURCE_TREE_CPP)
    build_cmake_project(tmp_path, *(f"-D{key}={value}" for key, value in found.items()))
    done = run_cpp(tmp_path / "build" / "main", manifest.folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == manifest.data["image"]


SOURCE_TREE_CMAKE = """cmake_minimum_required(VERSION 3.18)
project(main LANGUAGES CXX)
add_subdirectory({library} fastdrag_export EXCLUDE_FROM_ALL)
add_executable(main main.cpp)
target_link_libraries(main PRIVATE fastdrag::fastdrag_export)
"""

SOURCE_TREE_CPP = """#include "fastdrag_export.hpp"

#include <cstdio>

int main(int, char** argv) {
  const fastdrag::Editor editor(argv[1]);
  std::printf("%s\\n", editor.manifest()["image"].dump().c_str());
  return 0;
}
"""


@pytest.fixture(scope="module")
def exported_fp16(exported, tmp_path_factory):
    """The demo picture's export in fp16, with the drag graph for two point pairs and the kept graph."""
    from fastdrag.demo import demo_case
    from fastdrag.export import export_loaded

    editor, _, _ = exported
    text = editor.text_embeddings(demo_case().prompt)
    return export_loaded(editor.components, "k", editor.config.lora, (64, 64), text,
                         editor.config.replace(keep_source_kv=True), tmp_path_factory.mktemp("fp16") / "out",
                         fp16=True, drag_points=POINTS)


def test_an_fp16_export_has_fp16_unet_graphs_beside_an_fp32_drag_graph_and_vae(exported_fp16):
    """fp16 UNet graphs (inputs, outputs, kept keys and values, weights); the drag graph in fp32 (its
    gradient would underflow in fp16) and SD's VAE in fp32 (force_upcast)."""
    import onnx
    from onnx import numpy_helper

    graphs = exported_fp16.graphs
    assert graphs["unet_inversion"].inputs[0].dtype == "float16" and graphs["unet_reference"].outputs[0].dtype == "float16"
    assert graphs["unet_kept"].inputs[-1].dtype == "float16"  # a source key or value
    assert graphs["unet_drag"].inputs[0].dtype == "float32" and graphs["unet_drag"].outputs[0].dtype == "float32"
    assert graphs["vae_decoder"].inputs[0].dtype == "float32"
    assert exported_fp16.data["precision"] == {"unet": "fp16", "vae": "fp32"}
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(exported_fp16.path("unet_inversion"))).graph.initializer]
    large = [w for w in weights if w.size >= 256 and w.dtype.kind == "f"]
    assert large and all(w.dtype == np.float16 for w in large)
    drag_weights = [numpy_helper.to_array(i) for i in onnx.load(str(exported_fp16.path("unet_drag"))).graph.initializer]
    assert any(w.size >= 256 for w in drag_weights) and all(w.dtype != np.float16 for w in drag_weights)


def test_the_cpp_program_edits_an_fp16_export_as_the_standalone_script_does(cpp_program, exported_fp16, tmp_path):
    """On an fp16 export (fp16 UNet graphs, fp32 drag graph and VAE) the C++ program's edit is the standalone
    script's bit for bit: its float64 latents go to the fp16 inputs in one rounding, as numpy's astype does
    (through float32 they would differ by up to 3e-5 in a run I measured). `serve`'s repeated edit, with the
    source keys and values kept in fp16 as the graph gives them, is the standalone kept protocol's bit for bit."""
    from fastdrag.demo import demo_case

    half = exported_fp16
    case = demo_case()
    image = pixels(case.image)
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "mask.npy", np.asarray(case.mask))
    (tmp_path / "points.json").write_text(json.dumps(pairs_json(case.points)))
    done = run_cpp(cpp_program, "edit", half.folder, tmp_path / "image.npy", tmp_path / "points.json", tmp_path / "out.npy",
                   tmp_path / "mask.npy", "--drag-steps", "5", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    edited = np.load(tmp_path / "out.npy")
    assert np.isfinite(edited).all()
    np.testing.assert_array_equal(edited, standalone_module().edit(half.folder, image, case.points, np.asarray(case.mask),
                                                                   drag_steps=5))

    requests = [{"image": str(tmp_path / "image.npy"), "points": pairs_json(points), "out": str(tmp_path / name),
                 "drag_steps": 3} for name, points in (("one.npy", case.points), ("two.npy", SECOND))]
    done = subprocess.run([str(cpp_program), "serve", str(half.folder)], input="\n".join(map(json.dumps, requests)) + "\n",
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(line)["kept"]["source_kv"] for line in done.stdout.splitlines()] == [False, True]
    np.testing.assert_array_equal(np.load(tmp_path / "two.npy"), kept_edit(half.folder, image, SECOND, 3))
