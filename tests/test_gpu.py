"""Checks only a CUDA GPU can make: the compiled kernels in the real loop, no host sync, half precision."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def cuda_tiny():
    from fastdrag.models import build_tiny

    return build_tiny().to("cuda", torch.float16)


def test_drag_loop_never_syncs_with_the_host(cuda_tiny, picture, monkeypatch):
    from fastdrag.config import DragConfig
    from fastdrag.ddim import DdimSchedule
    from fastdrag.drag import drag
    from fastdrag.inputs import prepare_inputs

    inputs = prepare_inputs(picture.image, picture.points, picture.mask)
    schedule = DdimSchedule.from_scheduler(cuda_tiny.scheduler, 50, 35)
    z_t = torch.randn(1, 4, 8, 8, device="cuda")
    text = torch.randn(1, 77, 32, device="cuda", dtype=torch.float16)
    handles, targets, mask = inputs.handles.cuda(), inputs.targets.cuda(), inputs.mask.cuda()
    monkeypatch.setenv("FASTDRAG_SYNC_DEBUG", "error")  # any sync inside the loop raises
    result = drag(cuda_tiny.unet, z_t, schedule.drag_timestep, text, handles, targets, mask, schedule,
                  DragConfig(drag_steps=12), inputs.sup_res, progress=False)
    assert result.latent.dtype == torch.float32 and torch.isfinite(result.latent).all()
    assert result.handles.is_cuda


def test_edit_in_half_precision(picture, tmp_path):
    from fastdrag import DragEditor

    editor = DragEditor.from_pretrained("tiny", device="cuda", dtype="fp16", cache_dir=tmp_path, progress=False)
    result = editor.edit(picture.image, picture.prompt, picture.points, mask=picture.mask,
                         lora_steps=4, num_inference_steps=10, drag_steps=6)
    assert result.image.size == picture.image.size
    assert all(p.dtype == torch.float32 for n, p in editor.components.unet.named_parameters() if "lora_" in n)
