"""The public API as a type checker sees it: the wheel ships `py.typed`, so a user's program that calls
fastdrag as the README does type-checks, and one that misuses it gets the checker's error, which it
would not if the names it imports were `Any` (a lazily imported `DragEditor`, a decorator that hides
a method's signature). Two checkers, each as its users run it: mypy, and pyright (VS Code's Pylance)."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Libraries the checker does not read (their names are Any to it): the heavy ones, whose own types
# would cost a minute of checking and are not fastdrag's. numpy and PIL are read: users pass their types.
UNREAD = ("torch", "diffusers", "transformers", "peft", "onnx", "onnxruntime", "onnxscript", "safetensors",
          "triton", "tqdm", "xformers", "huggingface_hub", "tensorrt", "kernels", "accelerate", "tokenizers")

IMPORTS = '''
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image

from fastdrag import (ConfigError, DragConfig, DragEditor, EditCancelled, EditConfig, EditResult, FastDragError,
                      InputError, LoraConfig)
from fastdrag.cache_usage import CacheEntry, parse_size, prune
from fastdrag.export import Manifest, load_manifest
from fastdrag.export.manifest import manifest_schema
from fastdrag.export.refit import initializer_arrays, load_refit_maps, load_refit_weights, refit_arrays
from fastdrag.export.runtime import load_denoiser
from fastdrag.export.tensorrt import Engine, TensorRTRefitError
from fastdrag.kernels import masked_l1, motion_supervision_loss, track_points
from fastdrag.serve import serve
'''

# each checker checks it in its strict mode (pyright: no parameter or result of what it calls may be of unknown type)
PROGRAM = "# pyright: strict\n" + IMPORTS + '''

def on_step(stage: str, done: int, total: int) -> None:
    if done > 3:
        raise EditCancelled("request 7")


def service(folder: Path) -> None:
    editor = DragEditor.from_pretrained("tiny", device="cpu", dtype="fp32", progress=False)
    editor = DragEditor.from_pretrained(folder / "sd15", device="cuda", dtype="fp16", config=EditConfig(),
                                        cache_dir=folder / "cache", fused_unet_kernels=True)
    editor = DragEditor.from_pretrained(folder / "model.safetensors", single_file_config=folder / "config")
    seconds: Dict[str, float] = editor.warm_up()
    seconds = editor.warm_up(size=(512, 512), drag_steps=10)
    seconds = editor.preload("cat.png", "a photo of a cat", on_step=on_step)
    result: EditResult = editor.edit("cat.png", "a photo of a cat", [((120, 200), (160, 190))], mask="mask.png",
                                     on_step=on_step)
    result = editor.edit(Image.open(folder / "cat.png"), "a cat", np.array([[[120.5, 200], [160, 190]]]),
                         mask=np.ones((512, 512)), drag_steps=40, seed=7)
    result = editor.edit(np.zeros((64, 64, 3), np.uint8), "a cat", [((1.5, 2), (3, 4)), ((9, 9), (20, 9))])
    result.image.save(folder / "out.png")
    handles: List[Tuple[float, float]] = result.handles
    timings: Dict[str, float] = result.timings
    steps: int = result.drag_steps
    key, cached = editor.train_lora("cat.png", "a cat")
    manifest: Manifest = editor.export("cat.png", "a cat", folder / "export", fmt="onnx", fp16=True, drag_points=2)
    written: Path = editor.refit_weights("dog.png", "a dog", manifest.folder, folder / "dog.safetensors")
    editor.sdpa_priority = "flash"
    editor.release_cached_memory = True
    settings: Dict[str, Any] = result.config.to_dict()
    current: EditConfig = editor.config
    cache_folder = editor.cache.directory
    embeddings = editor.text_embeddings("a cat")
    schema: Dict[str, object] = manifest_schema()
    editor.release()
    config: EditConfig = EditConfig().replace(drag_steps=40, lora_steps=60)
    stages: Tuple[LoraConfig, DragConfig] = (config.lora, config.drag)
    removed: List[CacheEntry] = prune(folder / "cache", parse_size("20GB"))
    weights, text, metadata = load_refit_weights(written)
    targets, maps = load_refit_maps(load_manifest(folder / "export").folder / "refit.json")
    arrays = refit_arrays(maps["unet_inversion"], weights)
    onnx_path = folder / "export" / "unet_inversion.onnx"
    kept = initializer_arrays(onnx_path, ["a"])
    denoiser = load_denoiser("onnxruntime", manifest, overrides={"unet_inversion": arrays}, device="cpu")
    try:
        engine = Engine(folder / "export" / "unet_inversion.plan")
        engine.refit(arrays, unchanged=lambda names: initializer_arrays(onnx_path, names))
        names: List[str] = denoiser.graph_names + list(engine.inputs) + list(engine.outputs)
        print(names, engine.inputs["latents"][0])
    except TensorRTRefitError as error:
        print(error)
    failed: int = serve(editor, sys.stdin, sys.stdout, defaults={"drag_steps": 40}, prune_to=parse_size("20GB"))
    print(seconds, handles, timings, steps, key, cached, stages, removed, text, metadata, targets, arrays, kept)
    print(settings, current, cache_folder, embeddings.shape, schema, denoiser.fixed_batch, failed)
    print(masked_l1, motion_supervision_loss, track_points)


try:
    service(Path("work"))
except (EditCancelled, InputError, ConfigError, FastDragError) as error:
    print(error)
'''

# Each line a misuse, and the error (a part of its message) each checker gives it.
MISUSES = {
    'editor.edit("cat.png", 7, [((1, 2), (3, 4))])': {
        "mypy": 'Argument 2 to "edit" of "DragEditor" has incompatible type "int"; expected "str"',
        "pyright": 'Argument of type "Literal[7]" cannot be assigned to parameter "prompt" of type "str" in function "edit"'},
    'editor.edit("cat.png", "a cat", [(1, 2)])': {
        "mypy": 'List item 0 has incompatible type "tuple[int, int]"; expected "tuple[tuple[float, float], tuple[float, float]]"',
        "pyright": 'cannot be assigned to parameter "points" of type "Points" in function "edit"'},
    'editor.edit("cat.png", "a cat", [((1, 2), (3, 4))]).handle': {
        "mypy": '"EditResult" has no attribute "handle"',
        "pyright": 'Cannot access attribute "handle" for class "EditResult"'},
    'editor.preload("cat.png")': {
        "mypy": 'Missing positional argument "prompt" in call to "preload" of "DragEditor"',
        "pyright": 'Argument missing for parameter "prompt"'},
    'editor.warm_up(size=512)': {
        "mypy": 'Argument "size" to "warm_up" of "DragEditor" has incompatible type "int"',
        "pyright": 'cannot be assigned to parameter "size" of type "Tuple[int, int] | None" in function "warm_up"'},
    'editor.export("cat.png", "a cat", "out").folder.mkdirs()': {
        "mypy": '"Path" has no attribute "mkdirs"',
        "pyright": 'Cannot access attribute "mkdirs" for class "Path"'},
    'DragEditor.from_pretrained("tiny", progress="no")': {
        "mypy": 'Argument "progress" to "from_pretrained" of "DragEditor" has incompatible type "str"; expected "bool"',
        "pyright": 'cannot be assigned to parameter "progress" of type "bool" in function "from_pretrained"'},
    'Engine(Path("unet.plan")).refit({}, unchanged=Path("unet.onnx"))': {
        "mypy": 'Argument "unchanged" to "refit" of "Engine" has incompatible type "Path"',
        "pyright": 'Argument of type "Path" cannot be assigned to parameter "unchanged"'},
    'serve(editor, Path("requests.jsonl"), sys.stdout)': {
        "mypy": 'Argument 2 to "serve" has incompatible type "Path"; expected "IO[str]"',
        "pyright": 'Argument of type "Path" cannot be assigned to parameter "requests" of type "IO[str]" in function "serve"'},
    'prune(Path("cache"), "20GB")': {
        "mypy": 'Argument 2 to "prune" has incompatible type "str"; expected "int"',
        "pyright": 'cannot be assigned to parameter "max_bytes" of type "int" in function "prune"'},
}

MISUSE_SETUP = IMPORTS + 'editor = DragEditor.from_pretrained("tiny")\n'


def package_tree(into: Path) -> Path:
    """fastdrag laid out as its wheel installs it (setup.py's package_dir: `kernels/` and `export/` are
    `fastdrag.kernels` and `fastdrag.export`), made of links to the checkout."""
    package = into / "fastdrag"
    package.mkdir(parents=True)
    for entry in (ROOT / "fastdrag").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("kernels", "export"):
        (package / name).symlink_to(ROOT / name)
    return into


# A checker's errors: (file name, line, message) each
Errors = List[Tuple[str, int, str]]


def mypy_errors(folder: Path, site: Path) -> Tuple[subprocess.CompletedProcess, Errors]:
    """Run mypy on the two programs; its output lines are `file:line: error: message`."""
    pytest.importorskip("mypy", reason="mypy is not installed (the test extras have it)")
    config = folder / "mypy.ini"
    config.write_text(textwrap.dedent(f"""\
        [mypy]
        mypy_path = {site}
        follow_imports = silent
        cache_dir = {folder / "cache"}
        [mypy-{",".join(name + ".*" for name in UNREAD)}]
        follow_imports = skip
        ignore_missing_imports = True
        """))
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--no-error-summary",
                          "--hide-error-context", "--strict", "program.py", "misuses.py"], capture_output=True, text=True, cwd=folder)
    return run, [(name, int(line), message) for name, line, message
                 in re.findall(r"^(\w+\.py):(\d+): error: (.*)$", run.stdout, re.MULTILINE)]


def pyright_errors(folder: Path, site: Path) -> Tuple[subprocess.CompletedProcess, Errors]:
    """Run pyright (the checker of VS Code's Pylance) on the two programs; it reports in JSON. It reads
    the installed libraries' types (it does so in seconds)."""
    pytest.importorskip("pyright", reason="pyright is not installed (the test extras have it)")
    config = folder / "pyrightconfig.json"
    config.write_text(json.dumps({"extraPaths": [str(site)], "pythonVersion": "%d.%d" % sys.version_info[:2],
                                  "typeCheckingMode": "standard", "include": ["program.py", "misuses.py"]}))
    # --outputjson also keeps the wrapper from asking PyPI for a newer release
    run = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
                          "--project", str(config)], capture_output=True, text=True, cwd=folder)
    try:
        found = json.loads(run.stdout)["generalDiagnostics"]
    except json.JSONDecodeError:
        return run, []  # pyright itself failed: the caller shows what it said
    return run, [(Path(entry["file"]).name, entry["range"]["start"]["line"] + 1, entry["message"].replace("\n", " "))
                 for entry in found if entry["severity"] == "error"]


@pytest.fixture(scope="module", params=["mypy", "pyright"])
def checked(request, tmp_path_factory) -> dict:
    """A checker's errors, as `(line, message)`, for the program and for the misuses (an editor, then one
    misuse a line), checked in one run against the package tree, and the checker's name."""
    folder = tmp_path_factory.mktemp(request.param)
    site = package_tree(folder / "site")
    (folder / "program.py").write_text(PROGRAM)
    (folder / "misuses.py").write_text(MISUSE_SETUP + "\n".join(MISUSES) + "\n")
    run, found = {"mypy": mypy_errors, "pyright": pyright_errors}[request.param](folder, site)
    errors: dict = {"program.py": [], "misuses.py": [], "checker": request.param}
    for name, line, message in found:
        errors[name].append((line, message))
    # 0: no error; 1: errors; 2 or more: the checker itself failed
    assert run.returncode == (1 if found else 0), run.stdout + run.stderr
    return errors


def test_a_program_that_calls_the_api_as_the_readme_does_type_checks(checked):
    assert checked["program.py"] == []


def test_a_program_that_misuses_the_api_gets_the_checkers_errors(checked):
    """One error a line, the one named: the checker sees the editor's methods, the results' fields and the
    other modules' functions with their signatures."""
    first = MISUSE_SETUP.count("\n") + 1
    errors = checked["misuses.py"]
    assert [line for line, _ in errors] == list(range(first, first + len(MISUSES))), errors
    for (_, message), wanted in zip(errors, MISUSES.values(), strict=True):
        assert wanted[checked["checker"]] in message
