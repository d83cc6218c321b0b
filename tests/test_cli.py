import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastdrag.cli import main

FAST_ARGS = ["--lora-steps", "3", "--num-inference-steps", "10", "--drag-steps", "5", "--quiet"]


@pytest.fixture()
def image_file(tmp_path, picture):
    path = tmp_path / "in.png"
    picture.image.save(path)
    return path


def test_demo_writes_both_pictures(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--output", str(out), "--cache-dir", str(tmp_path / "c")] + FAST_ARGS) == 0
    for name in ("input", "edited", "side_by_side"):
        assert Image.open(out / f"{name}.png").size[0] >= 64
    side = Image.open(out / "side_by_side.png")
    assert side.size[0] > 2 * side.size[1]
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1  # the demo's LoRA went to --cache-dir
    # existing pictures are not replaced without --overwrite
    assert main(["demo", "--model", "tiny", "--output", str(out)] + FAST_ARGS) == 2
    assert main(["demo", "--model", "tiny", "--output", str(out), "--overwrite", "--cache-dir", str(tmp_path / "c")] + FAST_ARGS) == 0


def test_edit_end_to_end(tmp_path, image_file, picture, capsys):
    mask = tmp_path / "mask.png"
    Image.fromarray((picture.mask * 255).astype(np.uint8)).save(mask)
    output = tmp_path / "out.png"
    (h, t), = picture.points
    args = ["edit", str(image_file), "--prompt", picture.prompt, "--drag", f"{h[0]},{h[1]}:{t[0]},{t[1]}",
            "--mask", str(mask), "--output", str(output), "--cache-dir", str(tmp_path / "c"), "--seed", "3"] + FAST_ARGS
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(output) and len(summary["handles"]) == 1
    assert Image.open(output).size == picture.image.size
    before = output.read_bytes()
    assert main(args) == 2                      # no overwrite without --overwrite
    assert "exists" in capsys.readouterr().err
    assert output.read_bytes() == before
    assert main(args + ["--overwrite"]) == 0
    assert output.read_bytes() == before        # same seed, same bytes (LoRA from the cache)
    assert not list(tmp_path.glob(".out.png*"))  # no temporary files left behind


def _ctrl_c():
    raise KeyboardInterrupt


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # as a service manager (systemd, Docker, Kubernetes) stops a process


@pytest.mark.parametrize("stop, code, line", [(_ctrl_c, 130, "fastdrag: interrupted"), (_sigterm, 143, "fastdrag: terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_during_an_edit_exits_with_one_line_and_writes_nothing(tmp_path, image_file, picture, capsys, monkeypatch,
                                                                      request, stop, code, line):
    from fastdrag import drag

    monkeypatch.setattr(drag.DragLoop, "step", lambda self, index: stop())  # a stop during the drag

    def ignored(signum, frame):  # the test process's own, meanwhile: a command that sets none must not kill pytest
        pass

    handler = signal.signal(signal.SIGTERM, ignored)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, handler))
    (h, t), = picture.points
    assert main(["edit", str(image_file), "--prompt", picture.prompt, "--drag", f"{h[0]},{h[1]}:{t[0]},{t[1]}",
                 "--output", str(tmp_path / "out.png"), "--cache-dir", str(tmp_path / "c")] + FAST_ARGS) == code
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not list(tmp_path.glob("*out.png*"))
    assert signal.getsignal(signal.SIGTERM) is ignored  # the command's handler is gone with it


def test_sigterm_during_an_export_leaves_no_staged_graphs(tmp_path, image_file):
    """A stopped export removes its staging folder (gigabytes at SD 1.5) instead of leaving it beside the output."""
    command = [sys.executable, "-m", "fastdrag", "export", str(image_file), "--prompt", "x", "--model", "tiny",
               "--output", str(tmp_path / "exported"), "--cache-dir", str(tmp_path / "c"), "--lora-steps", "1",
               "--progress-json"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in process.stderr:  # the first graph is written: the staging folder holds it
            if line.startswith("{") and json.loads(line) == {"stage": "export", "done": 1, "total": 4}:
                break
        staged = [p.name for p in tmp_path.glob(".exported.*")]
        process.send_signal(signal.SIGTERM)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 143
    finally:
        process.kill()
    assert len(staged) == 1
    assert rest.strip().splitlines()[-1] == "fastdrag: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "in.png"]  # no output, nothing staged


def test_points_file_and_its_errors(tmp_path, image_file, capsys):
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"handles": [[10, 10], [30, 30]], "targets": [[20, 20]]}))
    assert main(["edit", str(image_file), "--prompt", "x", "--points", str(points)] + FAST_ARGS) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 handles but 1 targets" in err


@pytest.mark.parametrize("extra, words", [
    (["--drag", "10,10:100,20"], "outside the 64x64 image"),
    (["--drag", "10,10"], "not of the form HX,HY:TX,TY"),
    (["--drag", "10,10:20,20", "--mask", "/no/mask.png"], "mask file /no/mask.png does not exist"),
    (["--drag", "10,10:20,20", "--model", "/no/model"], "not found"),
    (["--drag", "10,10:20,20", "--start-layer", "99"], "start_layer 99 is past"),
    (["--drag", "10,10:20,20", "--drag-lr", "0"], "lora_lr and drag_lr must be > 0"),
])
def test_cli_bad_input_is_one_line(image_file, tmp_path, capsys, extra, words):
    code = main(["edit", str(image_file), "--prompt", "x", "--cache-dir", str(tmp_path / "c"),
                 "--output", str(tmp_path / "o.png")] + extra + FAST_ARGS)
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_toy_counts_below_one_are_refused(capsys):
    for argv in (["toy", "eval", "--cases", "0"], ["toy", "train", "--out", "x", "--unet-batch", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err


def test_console_script_info_runs():
    done = subprocess.run([sys.executable, "-m", "fastdrag.cli", "info"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("torch", "triton", "xformers", "onnxruntime", "tensorrt"):
        assert name in done.stdout
    assert "WARNING" not in done.stderr  # no xformers noise at import
    assert "--compile-blocks: " in done.stdout  # usable, or why not
    assert "--fused-unet-kernels: the stock operators would run (device cpu" in done.stdout or torch.cuda.is_available()
    assert ("--sdpa-priority: SDPA at SD's head size 40 here runs FlashAttention (default), FlashAttention (flash), "
            "FlashAttention (cudnn), FlashAttention (efficient)" in done.stdout or torch.cuda.is_available())


def test_info_says_why_compile_blocks_is_not_usable(monkeypatch, capsys):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("No working C++ compiler found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert main(["info"]) == 0
    assert "--compile-blocks: not usable: compile_blocks on the cpu needs a C++ compiler" in capsys.readouterr().out


def test_info_reports_the_kernels_that_dispatch_would_run(monkeypatch):
    pytest.importorskip("triton")
    from fastdrag import kernels
    from fastdrag.backends import triton_status

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda_tensor = SimpleNamespace(is_cuda=True, dtype=torch.float16)
    for choice in (None, "triton", "reference"):
        if choice is None:
            monkeypatch.delenv("FASTDRAG_KERNELS", raising=False)
        else:
            monkeypatch.setenv("FASTDRAG_KERNELS", choice)
        status = triton_status()
        assert status.usable == kernels.uses_triton(cuda_tensor) == (choice != "reference"), choice
        assert ("Triton" in status.reason) == status.usable and ("reference" in status.reason)
    monkeypatch.setenv("FASTDRAG_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTDRAG_KERNELS must be reference or triton"):
        triton_status()


def test_lora_command_trains_then_finds_the_cache(image_file, tmp_path, capsys):
    args = ["lora", str(image_file), "--prompt", "a ball", "--cache-dir", str(tmp_path / "c"), "--lora-steps", "2", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "trained and cached" in first
    assert main(args) == 0
    assert "found in the cache" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1


def test_the_prediction_type_option_trains_the_lora_of_that_kind(image_file, tmp_path, capsys):
    """A v-model's LoRA trains against the velocity: another adapter, under another key, than the
    same weights read as a noise predictor (tests/test_prediction_type.py checks the stages)."""
    args = ["lora", str(image_file), "--prompt", "a ball", "--cache-dir", str(tmp_path / "c"), "--lora-steps", "2",
            "--quiet"]
    assert main(args) == 0
    assert main(args + ["--prediction-type", "v_prediction"]) == 0
    first, second = [line.split()[1] for line in capsys.readouterr().out.splitlines()]
    assert first != second
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2
    with pytest.raises(SystemExit):  # argparse's usage error names the choices
        main(args + ["--prediction-type", "velocity"])


def test_toy_train_time_budget_sets_the_step_count_unless_capped():
    from fastdrag.cli import BUDGETED_STEP_CAP, build_parser, train_config
    from fastdrag.toy.train import TrainConfig

    parse = build_parser().parse_args
    assert train_config(parse(["toy", "train", "--out", "x"])).unet_steps == TrainConfig().unet_steps
    budgeted = train_config(parse(["toy", "train", "--out", "x", "--time-budget", "600"]))
    assert budgeted.unet_steps == BUDGETED_STEP_CAP and budgeted.unet_time_budget_s == 600
    capped = train_config(parse(["toy", "train", "--out", "x", "--time-budget", "600", "--unet-steps", "300"]))
    assert capped.unet_steps == 300
    decoder = train_config(parse(["toy", "train", "--out", "x", "--vae-from", "toy", "--decoder-steps", "600",
                                  "--colour-weight", "4", "--seed", "5"]))
    assert (decoder.decoder_steps_on_reuse, decoder.colour_weight, decoder.seed) == (600, 4.0, 5)
    assert train_config(parse(["toy", "train", "--out", "x"])).colour_weight == TrainConfig().colour_weight


@pytest.mark.parametrize("flag, expected", [([], {"channels_last": None, "compile_blocks": False, "fused_unet_kernels": False,
                                                  "frozen_conv": None, "sdpa_priority": "default"}),
                                            (["--channels-last"], {"channels_last": True, "compile_blocks": False}),
                                            (["--no-channels-last"], {"channels_last": False, "compile_blocks": False}),
                                            (["--compile-blocks"], {"channels_last": None, "compile_blocks": True}),
                                            (["--fused-unet-kernels"], {"fused_unet_kernels": True}),
                                            (["--no-frozen-conv"], {"frozen_conv": False}),
                                            (["--frozen-conv"], {"frozen_conv": True}),
                                            (["--sdpa-priority", "cudnn"], {"sdpa_priority": "cudnn"})])
def test_model_options_reach_the_loader(image_file, tmp_path, monkeypatch, flag, expected):
    from fastdrag import DragEditor

    seen = {}
    real = DragEditor.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **{**kwargs, "compile_blocks": False})  # what reaches the loader is the point

    monkeypatch.setattr(DragEditor, "from_pretrained", classmethod(recording))
    args = ["lora", str(image_file), "--prompt", "a ball", "--cache-dir", str(tmp_path / "c"), "--lora-steps", "1",
            "--quiet"] + flag
    assert main(args) == 0
    assert {key: seen[key] for key in expected} == expected and seen["cache_dir"] == str(tmp_path / "c")


def test_the_sdpa_priority_choices_are_the_packages():
    from fastdrag.attention import SDPA_PRIORITIES
    from fastdrag.cli import build_parser

    edit = build_parser()._subparsers._group_actions[0].choices["edit"]
    action = next(a for a in edit._actions if a.dest == "sdpa_priority")
    assert list(action.choices) == list(SDPA_PRIORITIES)


def test_an_output_format_pil_cannot_write_is_refused_before_the_edit(image_file, tmp_path, capsys, monkeypatch):
    import fastdrag.cli as cli

    def no_edit(args):
        raise AssertionError("the model was loaded for an output that cannot be written")
    monkeypatch.setattr(cli, "_editor", no_edit)
    code = main(["edit", str(image_file), "--prompt", "x", "--drag", "10,10:20,20",
                 "--output", str(tmp_path / "o.xyz")] + FAST_ARGS)
    err = capsys.readouterr().err
    assert code == 2 and "cannot write .xyz images" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.xyz").exists()


def test_an_output_folder_that_cannot_be_made_is_named_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for command in (["toy", "eval", "--cases", "1", "--out", str(blocker / "eval")],
                    ["toy", "train", "--out", str(blocker / "train"), "--vae-steps", "1", "--unet-steps", "1"],
                    ["demo", "--model", "tiny", "--output", str(blocker / "demo")]):
        assert main(command + ["--quiet"]) == 2, command
        assert f"cannot write {blocker}/" in capsys.readouterr().err


def test_progress_json_reports_every_step_as_a_json_line_instead_of_bars(tmp_path, image_file, picture, capsys):
    (h, t), = picture.points
    args = ["edit", str(image_file), "--prompt", picture.prompt, "--drag", f"{h[0]},{h[1]}:{t[0]},{t[1]}",
            "--output", str(tmp_path / "out.png"), "--cache-dir", str(tmp_path / "c"), "--progress-json",
            "--lora-steps", "3", "--num-inference-steps", "10", "--drag-steps", "5"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    reports = [json.loads(line) for line in lines]
    stages = [report["stage"] for report in reports]
    assert sorted(set(stages), key=stages.index) == ["lora", "inversion", "drag", "denoise"]
    lora = [(r["done"], r["total"]) for r in reports if r["stage"] == "lora"]
    assert lora == [(done, 3) for done in range(4)]
    assert main(["lora", str(image_file), "--prompt", "another prompt", "--cache-dir", str(tmp_path / "c"),
                 "--progress-json", "--lora-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert [json.loads(line) for line in err.splitlines() if line.startswith("{")] == [
        {"stage": "lora", "done": done, "total": 2} for done in range(3)]
    assert "it/s" not in err  # no tqdm bar beside the JSON lines


def test_version(capsys):
    import fastdrag

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"fastdrag {fastdrag.__version__}"


def test_python_m_fastdrag_is_the_command():
    import subprocess
    import sys

    import fastdrag

    run = subprocess.run([sys.executable, "-m", "fastdrag", "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"fastdrag {fastdrag.__version__}", run.stderr[-500:]
    missing = subprocess.run([sys.executable, "-m", "fastdrag", "edit", "no-such.png", "--prompt", "x", "--drag",
                              "1,1:2,2"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no-such.png" in missing.stderr


def test_running_out_of_memory_is_one_line_naming_what_to_change(tmp_path, capsys, monkeypatch):
    """An out-of-memory error in the LoRA stage: status 3 and one line with the editor's advice, no traceback;
    other runtime errors are not swallowed."""
    import torch

    from fastdrag.lora import LoraTrainer

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(LoraTrainer, "step", out_of_memory)
    out = tmp_path / "demo"
    code = main(["demo", "--model", "tiny", "--output", str(out), "--cache-dir", str(tmp_path / "c")] + FAST_ARGS)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and not (out / "edited.png").exists()
    assert err[-1].startswith("fastdrag: error: out of memory: the LoRA stage ran out of memory")
    assert "--lora-checkpointing true" in err[-1] and "Traceback" not in "\n".join(err)

    def broken(self):
        raise RuntimeError("something else")

    monkeypatch.setattr(LoraTrainer, "step", broken)
    with pytest.raises(RuntimeError, match="something else"):
        main(["demo", "--model", "tiny", "--output", str(out), "--cache-dir", str(tmp_path / "c")] + FAST_ARGS)
