"""Per-stage benchmarks and the whole edit, each with its FLOP count and achieved TFLOP/s.

    pytest bench/test_stages.py --benchmark-only [--model tiny|sd15|sd21] [--size 512] [--device cuda] [--dtype fp16]
        [--fused-unet-kernels]

Stages: one LoRA step (batch 4), one inversion step, one drag iteration, one reference-controlled
denoising step (batch 2) and a repeated edit's (batch 1, the source branch's keys and values kept),
VAE encode and decode; then a first edit (LoRA trained) and a repeated edit of the same image (LoRA
from the cache) at the default steps.
"""
import itertools
from typing import Tuple

import pytest
import torch

from fastdrag import DragEditor
from fastdrag.config import EditConfig, LoraConfig
from fastdrag.ddim import DdimSchedule, ddim_inversion_step, ddim_step
from fastdrag.demo import demo_case
from fastdrag.denoiser import TorchDenoiser
from fastdrag.drag import DragLoop
from fastdrag.inputs import prepare_inputs
from fastdrag.lora import LoraTrainer, merged_adapter
from fastdrag.source_kv import SourceKV
from fastdrag.vae import decode, encode_posterior, encode_prompt
from flop_count import count_flops


@pytest.fixture(scope="module")
def setup(request, device, dtype, tmp_path_factory):
    model = {"tiny": "tiny", "sd15": "sd15-random", "sd21": "sd21-random"}[request.config.getoption("--model")]
    editor = DragEditor.from_pretrained(model, device=device, dtype=dtype, cache_dir=tmp_path_factory.mktemp("lora"),
                                        progress=False,
                                        fused_unet_kernels=request.config.getoption("--fused-unet-kernels"))
    size = request.config.getoption("--size") or editor.components.vae.config.sample_size  # the model's own
    case = demo_case(size)
    inputs = prepare_inputs(case.image, case.points, case.mask)
    c = editor.components
    text = encode_prompt(c.tokenizer, c.text_encoder, case.prompt)
    posterior = encode_posterior(c.vae, inputs.image)
    schedule = DdimSchedule.from_scheduler(c.scheduler, 50, 35)
    z0 = (posterior.mean * c.scaling_factor).float()
    return editor, case, inputs, text, posterior, schedule, z0


GRAPHS = [pytest.param(False, id="eager"), pytest.param(True, id="cuda-graphs")]


def denoisers(editor: DragEditor, graphs: bool) -> Tuple[TorchDenoiser, TorchDenoiser]:
    """The timed denoiser (with CUDA graphs or not) and an eager one for the FLOP count; the scheduler says
    what the UNet outputs (sd21's velocity is converted to noise, as in an edit)."""
    unet, scheduler = editor.components.unet, editor.components.scheduler
    return TorchDenoiser(unet, cuda_graphs=graphs, scheduler=scheduler), TorchDenoiser(unet, scheduler=scheduler)


def needs_cuda_for(graphs, device):
    if graphs and device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA GPU (none here)")


_counted_flops = {}  # by `flops_key`: the eager and CUDA-graph variants of a benchmark do the same work
# (and the terms of the edits' counts: "edit steps", "repeated edit", "drag step")


def measure(benchmark, synchronize, fn, name, count=None, flops_key=None, flops=None, **pedantic):
    """Count FLOPs of one call (of `count` where given: graph replays are invisible to the counter;
    once per `flops_key`, since counting a whole SD 1.5 edit takes longer than the edit; or, with
    `flops`, take them from `flops()` after the timing), then time it; record both, the achieved rate
    and, on CUDA, the peak memory of the timed calls."""
    if flops is None and (flops_key is None or flops_key not in _counted_flops):
        _counted_flops[flops_key] = count_flops(count or fn)
        synchronize()

    def run():
        fn()
        synchronize()

    benchmark.group = name
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if pedantic:
        benchmark.pedantic(run, **pedantic)
    else:
        benchmark(run)
    total = flops() if flops is not None else _counted_flops[flops_key]
    benchmark.extra_info["TFLOP"] = total / 1e12
    if benchmark.stats is not None:  # None under --benchmark-disable: each benchmark runs once, untimed
        benchmark.extra_info["TFLOP/s"] = total / 1e12 / benchmark.stats.stats.mean
    if cuda:
        benchmark.extra_info["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.parametrize("checkpointing", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("graphs", GRAPHS)
def test_lora_step(benchmark, setup, synchronize, device, graphs, checkpointing):
    """`recomputed`: with `lora_checkpointing`, its blocks run again in the backward (more FLOPs; on CUDA
    the `peak_GiB` column shows what it saves)."""
    needs_cuda_for(graphs, device)
    editor, _, _, text, posterior, _, _ = setup
    c = editor.components
    trainer = LoraTrainer(c.unet, c.scheduler, posterior, text, c.scaling_factor, LoraConfig(), seed=0,
                          cuda_graph=graphs, checkpointing=checkpointing)
    # graphed: untimed warm-up steps past the eager ones and the capture (the FLOPs are counted on an eager step)
    pedantic = dict(rounds=20, warmup_rounds=LoraTrainer.GRAPH_WARMUP + 1) if graphs else {}
    try:
        measure(benchmark, synchronize, trainer.step, "stage 1: LoRA step (batch 4)",
                flops_key=f"lora step{', checkpointed' if checkpointing else ''}", **pedantic)
    finally:
        trainer.finish()


@pytest.mark.parametrize("graphs", GRAPHS)
def test_inversion_step(benchmark, setup, synchronize, device, graphs):
    needs_cuda_for(graphs, device)
    editor, _, _, text, _, schedule, z0 = setup
    denoiser, eager = denoisers(editor, graphs)
    with merged_adapter(editor.components.unet):  # as an edit runs it (the LoRA step's adapter, if it ran)
        measure(benchmark, synchronize, lambda: ddim_inversion_step(schedule, z0, denoiser(z0, 341, text), 341),
                "stage 2: inversion step", count=lambda: eager(z0, 341, text))


@pytest.mark.parametrize("masked", [pytest.param(True, id="mask"), pytest.param(False, id="no-mask")])
@pytest.mark.parametrize("graphs", GRAPHS)
def test_drag_iteration(benchmark, setup, synchronize, device, graphs, masked):
    """With a mask the iteration needs eps (the mask term), so the whole UNet; without one the
    forward stops after the feature block."""
    needs_cuda_for(graphs, device)
    editor, _, inputs, text, _, schedule, z0 = setup
    far = inputs.targets.clone()
    far[:, 1] = inputs.sup_res[1] - 1  # keep the handle from arriving while timing
    mask = inputs.mask if masked else None

    def new_loop(cuda_graph):
        return DragLoop(editor.components.unet, z0, schedule.drag_timestep, text, inputs.handles, far, mask,
                        schedule, editor.config.drag, inputs.sup_res, check_every=10**9, cuda_graph=cuda_graph)

    with merged_adapter(editor.components.unet):
        loop, counted = new_loop(graphs), new_loop(False)
        for index in range(DragLoop.GRAPH_WARMUP + 1):  # past warm-up and capture
            loop.step(index)
        synchronize()
        measure(benchmark, synchronize, lambda: loop.step(5), "stage 3: drag iteration",
                count=lambda: counted.step(1), flops_key=("drag", masked))


@pytest.mark.parametrize("graphs", GRAPHS)
def test_denoising_step(benchmark, setup, synchronize, device, graphs):
    needs_cuda_for(graphs, device)
    editor, _, _, text, _, schedule, z0 = setup
    denoiser, eager = denoisers(editor, graphs)
    pair, text2 = torch.cat([z0, z0 + 0.1]), text.expand(2, -1, -1)
    start_layer = editor.config.denoise.start_layer
    with merged_adapter(editor.components.unet), denoiser.reference_control(start_layer), \
            eager.reference_control(start_layer):
        measure(benchmark, synchronize, lambda: ddim_step(schedule, pair, denoiser(pair, 341, text2), 341),
                "stage 4: denoising step (batch 2, K/V swap)", count=lambda: eager(pair, 341, text2))


@pytest.mark.parametrize("graphs", GRAPHS)
def test_denoising_step_with_kept_source(benchmark, setup, synchronize, device, graphs):
    """A repeated edit's denoising step with `keep_source_kv`: the edited branch alone (batch 1), its
    swapped layers reading the source branch's keys and values that a batch-2 step recorded; beside
    `test_denoising_step`'s batch 2 in the same run."""
    needs_cuda_for(graphs, device)
    editor, _, _, text, _, schedule, z0 = setup
    denoiser, eager = denoisers(editor, graphs)
    pair, edited = torch.cat([z0, z0 + 0.1]), z0 + 0.1
    start_layer, store = editor.config.denoise.start_layer, SourceKV()
    with merged_adapter(editor.components.unet):
        store.begin(pair, 1, start_layer, recording=True)
        store.set_step(0)
        with eager.reference_control(start_layer, source_kv=store):
            eager(pair, 341, text.expand(2, -1, -1))
        store.finish("benchmark")
        store.begin(edited, 1, start_layer, recording=False)
        store.set_step(0)
        with denoiser.reference_control(start_layer, source_kv=store), \
                eager.reference_control(start_layer, source_kv=store):
            measure(benchmark, synchronize, lambda: ddim_step(schedule, edited, denoiser(edited, 341, text), 341),
                    "stage 4: denoising step (batch 1, kept source K/V)", count=lambda: eager(edited, 341, text))


def test_vae_encode(benchmark, setup, synchronize):
    editor, _, inputs, *_ = setup
    measure(benchmark, synchronize, lambda: encode_posterior(editor.components.vae, inputs.image), "VAE encode")


def test_vae_decode(benchmark, setup, synchronize):
    editor, *_, z0 = setup
    measure(benchmark, synchronize, lambda: decode(editor.components.vae, z0, editor.components.scaling_factor), "VAE decode")


def record_stages(benchmark, result):
    """Seconds per stage of the last timed edit, beside the benchmark's own numbers."""
    for stage, seconds in result.timings.items():
        benchmark.extra_info[f"{stage}_s"] = round(seconds, 4)
    benchmark.extra_info["drag_steps_run"] = result.drag_steps


_first_edit_seeds = itertools.count(EditConfig().seed)  # across the variants: each edit a new image
_counting_seeds = itertools.count(10**6)  # the short counted edits' own images


def counted_edit(editor, case, **settings):
    """(FLOPs, result) of one eager edit of the case with `settings` under torch's FLOP counter."""
    results = []
    flops = count_flops(lambda: results.append(editor.edit(case.image, case.prompt, case.points, mask=case.mask,
                                                           cuda_graphs=False, **settings)))
    return flops, results[0]


def edit_step_flops(editor, case) -> Tuple[int, int, int]:
    """(c, l, d): an edit at the default settings but with `lora_steps` and `drag_steps` steps costs
    c + lora_steps·l + (drag_steps - 1)·d FLOPs, where `drag_steps` counts the iterations it ran.

    Every LoRA step does the same work, and so does every drag iteration after the first, so three
    short counted edits, of (1, 1), (2, 1) and (1, 2) steps, fix the three terms (the first two fix c
    and l where a repeated edit's count has fixed d: a drag iteration costs the same in both). Counting
    makes every operator a Python call (about 2.5 times an edit's time): three short edits cost less
    than one long one, and the drag's early stop (a tiny model's handles can arrive after 29 of 80
    iterations) is taken from each timed edit instead of from the counted one.
    """
    if "edit steps" not in _counted_flops:
        counts = {}
        for lora_steps, drag_steps in ((1, 1), (2, 1), (1, 2)):
            if drag_steps == 2 and "drag step" in _counted_flops:
                continue
            counts[lora_steps, drag_steps], result = counted_edit(editor, case, seed=next(_counting_seeds),
                                                                  lora_steps=lora_steps, drag_steps=drag_steps)
            assert result.drag_steps == drag_steps  # no early stop in these: the arithmetic holds
        if (1, 2) in counts:
            _counted_flops["drag step"] = counts[1, 2] - counts[1, 1]
        _counted_flops["edit steps"] = (counts[1, 1] - counts[2, 1] + counts[1, 1],  # c = count(1, 1) - l
                                        counts[2, 1] - counts[1, 1], _counted_flops["drag step"])
    return _counted_flops["edit steps"]


def repeated_edit_step_flops(editor, case, kept: bool) -> Tuple[int, int]:
    """(c, d): a repeated edit of the case (LoRA and inversion from the editor's caches; with `kept`, the
    source branch's keys and values too) at the default settings costs c + (drag_steps - 1)·d FLOPs.

    As in `edit_step_flops`: short counted repeated edits, of one and (where no count has fixed d yet)
    two drag iterations, fix both terms. Counting a whole repeated edit of the tiny model took 17 s on
    2 CPU cores, counting one of a single drag iteration 5 s.
    """
    if ("repeated edit", kept) not in _counted_flops:
        counts = {}
        for drag_steps in (1,) if "drag step" in _counted_flops else (1, 2):
            counts[drag_steps], result = counted_edit(editor, case, drag_steps=drag_steps, keep_source_kv=kept)
            # a repeated edit that ran every iteration: the arithmetic holds
            assert result.lora_cached and "vae_encode" not in result.timings and result.drag_steps == drag_steps
        if 2 in counts:
            _counted_flops["drag step"] = counts[2] - counts[1]
        _counted_flops["repeated edit", kept] = counts[1]
    return _counted_flops["repeated edit", kept], _counted_flops["drag step"]


def edit_rounds(device, rounds):
    """Timed rounds of a whole edit: one on the CPU, where the tiny model's edit at the default steps
    takes half a minute and the suite is a smoke test that must stay within five minutes."""
    return rounds if device.type == "cuda" else 1


@pytest.mark.parametrize("graphs", GRAPHS)
def test_first_edit(benchmark, setup, synchronize, device, graphs):
    needs_cuda_for(graphs, device)
    editor, case, *_ = setup
    # the setup editor's cache: the first edit of the module, at the default seed, leaves the adapter
    # that `test_repeated_edit` would otherwise train first
    fresh = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=editor.cache.directory,
                       progress=False)
    results = []

    def edit(cuda_graphs):  # a new seed for every edit: a new LoRA key, so stage 1 runs every time
        results.append(fresh.edit(case.image, case.prompt, case.points, mask=case.mask, seed=next(_first_edit_seeds),
                                  cuda_graphs=cuda_graphs))

    # the prompt's embeddings kept from the start, so that the counted edits and the timed ones all skip
    # its encoding (a new image with a known prompt; one CLIP forward, under 0.01 % of an SD 1.5 edit)
    fresh.text_embeddings(case.prompt)
    fixed, per_lora_step, per_drag_step = edit_step_flops(fresh, case)

    def flops():  # of the timed edits, each with the drag iterations it ran
        drag_steps = sum(result.drag_steps for result in results) / len(results)
        return fixed + EditConfig().lora.lora_steps * per_lora_step + (drag_steps - 1) * per_drag_step

    measure(benchmark, synchronize, lambda: edit(graphs), "edit at the defaults", flops=flops,
            rounds=edit_rounds(device, 2), iterations=1)
    record_stages(benchmark, results[-1])


@pytest.mark.parametrize("kept", [pytest.param(False, id="pair"), pytest.param(True, id="kept-kv")])
@pytest.mark.parametrize("graphs", GRAPHS)
def test_repeated_edit(benchmark, setup, synchronize, device, graphs, kept):
    """A repeated edit (LoRA and inversion cached); `kept-kv`: with `keep_source_kv`, its denoising runs
    the edited branch alone with the source branch's kept keys and values."""
    needs_cuda_for(graphs, device)
    editor, case, *_ = setup
    results = []

    def edit(cuda_graphs):
        results.append(editor.edit(case.image, case.prompt, case.points, mask=case.mask, cuda_graphs=cuda_graphs,
                                   keep_source_kv=kept))

    edit(graphs)  # trains and caches the LoRA unless the first-edit benchmark did (and inverts the image)
    fixed, per_drag_step = repeated_edit_step_flops(editor, case, kept)

    def flops():  # of the timed edits, each with the drag iterations it ran
        drag_steps = sum(result.drag_steps for result in results[1:]) / len(results[1:])
        return fixed + (drag_steps - 1) * per_drag_step

    measure(benchmark, synchronize, lambda: edit(graphs), "edit at the defaults", flops=flops,
            rounds=edit_rounds(device, 3), iterations=1)
    record_stages(benchmark, results[-1])
