"""bench/profile_stages.py, the lease's breakdown of each stage's kernel time by kind: its kernel-name
classification, and a run on the tiny model here (operator time on the CPU) that covers every stage and
traces its copies."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from profile_stages import kind_of  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true>", "layout copy"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_nn", "matmul"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>", "normalisation"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<SiLU>>", "elementwise"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>", "optimizer"),
    ("_motion_loss_forward", "fastdrag Triton kernels"),
    ("_masked_l1_backward", "fastdrag Triton kernels"),
    ("_normalise", "fastdrag UNet kernels"),
    ("_input_gradient", "fastdrag UNet kernels"),
    ("_geglu_backward", "fastdrag UNet kernels"),
    ("triton_poi_fused_add_native_group_norm_silu_3", "fused by torch.compile"),
    ("triton_red_fused_native_group_norm_0", "fused by torch.compile"),
    ("aten::native_group_norm", "normalisation"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_names_are_classified(name, kind):
    assert kind_of(name) == kind


def test_every_stage_is_profiled(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, "bench/profile_stages.py", "--model", "tiny", "--size", "64", "--steps", "1",
                          "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["LoRA step (batch 4)", "inversion step", "drag iteration",
                            "denoising step (batch 2, K/V swap)"]
    for name, row in stages.items():
        assert f"== {name}:" in run.stdout
        assert row["wall_ms"] > 0 and row["device_ms"] > 0
        assert sum(row["by_kind_ms"].values()) == pytest.approx(row["device_ms"])
        assert row["by_kind_ms"].get("convolution", 0) > 0 and row["by_kind_ms"].get("attention", 0) > 0
        # calls counted per kind, for each kind timed (a kind with time ran at least once a step)
        assert set(row["count_by_kind"]) == set(row["by_kind_ms"]) and all(n >= 1 for n in row["count_by_kind"].values())
        assert f"{row['count_by_kind']['convolution']:6.0f} calls" in run.stdout
        # each copy traced to its operator chain, shapes and autograd node (or forward), and summed
        # over shapes by chain and node
        origins, mechanisms = row["copies_from"]["by_origin"], row["copies_from"]["by_mechanism"]
        assert origins and all(ms > 0 for _, ms in origins)
        assert all(origin.count(" | ") == 1 and "copy_ [" in origin for origin, _ in origins)
        assert all(key.count(" | ") == 1 and "[" not in key for key, _ in mechanisms)
        assert mechanisms[0][1] >= origins[0][1] and len(mechanisms) <= len(origins)
    lora_origins = [origin for origin, _ in stages["LoRA step (batch 4)"]["copies_from"]["by_origin"]]
    assert any("Backward" in origin.split(" | ")[1] for origin in lora_origins)
    assert any(origin.split(" | ")[1] == "forward" for origin in lora_origins)
    # the LoRA step and the drag iteration run forward and backward, the inversion and denoising steps
    # forward only (counted, not timed: comparing their times, and then the top copies' autograd nodes,
    # each failed once under two CI workers)
    backward = {name: row["backward_nodes_per_step"] for name, row in stages.items()}
    assert backward["LoRA step (batch 4)"] > 0 and backward["drag iteration"] > 0
    assert backward["inversion step"] == backward["denoising step (batch 2, K/V swap)"] == 0
