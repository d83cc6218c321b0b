import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdrag import DragEditor
from fastdrag.config import LoraConfig
from fastdrag.lora import (LoraTrainer, adapter_state, install_adapter, lora_loss, lora_parameters, run_trainer,
                           train_lora)
from fastdrag.vae import encode_posterior, encode_prompt


def fixed_batch_loss(tiny, posterior, text):
    """The fine-tuning loss on one fixed draw of samples, noise and timesteps."""
    generator = torch.Generator().manual_seed(99)
    latents = (posterior.mean + posterior.std * torch.randn((8, *posterior.mean.shape[1:]), generator=generator)) * tiny.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    with torch.no_grad():
        return lora_loss(tiny.unet, latents, noise, timesteps, text.expand(8, -1, -1),
                         tiny.scheduler.alphas_cumprod).item()


def test_lora_lowers_the_loss_and_changes_only_lora_weights(tiny, picture):
    posterior = encode_posterior(tiny.vae, picture.image)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    install_adapter(tiny.unet, LoraConfig(), seed=0)
    frozen = {n: p.detach().clone() for n, p in tiny.unet.named_parameters() if "lora_" not in n}
    before = fixed_batch_loss(tiny, posterior, text)
    losses = train_lora(tiny.unet, tiny.scheduler, posterior, text, tiny.scaling_factor,
                        LoraConfig(lora_steps=20), seed=0, progress=False)
    after = fixed_batch_loss(tiny, posterior, text)
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert after < before * 0.97, (before, after)
    for name, param in tiny.unet.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    assert any(p.abs().sum() > 0 for n, p in adapter_state(tiny.unet).items() if "lora_B" in n)
    assert not any(p.requires_grad for p in tiny.unet.parameters())


def test_adapter_is_reset_per_image_and_starts_as_identity(tiny):
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    config = LoraConfig(lora_rank=4)
    install_adapter(tiny.unet, config, seed=0)
    with torch.no_grad():
        for p in lora_parameters(tiny.unet):
            p.add_(0.1)
        trained = tiny.unet(x, 10, text).sample
        install_adapter(tiny.unet, config, seed=0)
        fresh = tiny.unet(x, 10, text).sample
        tiny.unet.disable_adapters()
        base = tiny.unet(x, 10, text).sample
        tiny.unet.enable_adapters()
    assert not torch.allclose(trained, fresh)
    torch.testing.assert_close(fresh, base)
    assert all(p.dtype == torch.float32 for p in lora_parameters(tiny.unet))
    assert lora_parameters(tiny.unet)[0].shape[0] == 4 or lora_parameters(tiny.unet)[0].shape[1] == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_same_seed_gives_the_same_adapter_on_a_fresh_or_a_used_model(dtype):
    from fastdrag.models import build_tiny

    config = LoraConfig(lora_rank=4)
    fresh_model, used_model = build_tiny().unet.to(dtype), build_tiny().unet.to(dtype)
    install_adapter(used_model, config, seed=1)
    torch.manual_seed(123)  # the global generator's state must not matter either
    install_adapter(used_model, config, seed=7)
    install_adapter(fresh_model, config, seed=7)
    fresh, used = adapter_state(fresh_model), adapter_state(used_model)
    assert fresh.keys() == used.keys()
    for name in fresh:
        assert torch.equal(fresh[name], used[name]), name
        assert fresh[name].dtype == torch.float32, name
    assert any(v.abs().sum() > 0 for k, v in fresh.items() if "lora_A" in k)


def test_a_used_adapter_is_reinstalled_frozen_and_lean_and_a_half_cast_one_back_in_fp32():
    """Re-installing the same adapter re-initialises its layers in place: weights a trainer set training
    are frozen again, the rest of the UNet stays frozen, its LoRA layers keep the lean forward, and
    weights cast to half precision (a user's `.half()`) come back to fp32 masters."""
    from fastdrag.lean_blocks import install_lean_blocks, lean_counts
    from fastdrag.models import build_tiny

    unet = build_tiny().unet
    install_lean_blocks(unet)
    config = LoraConfig(lora_rank=4)
    install_adapter(unet, config, seed=1)
    lean = lean_counts(unet)["lora"]
    assert lean > 0
    for param in lora_parameters(unet):
        param.requires_grad_(True)
    lora_parameters(unet)[0].data = lora_parameters(unet)[0].data.half()
    install_adapter(unet, config, seed=1)
    assert not any(p.requires_grad for p in unet.parameters())
    assert lean_counts(unet)["lora"] == lean
    assert all(p.dtype == torch.float32 for p in lora_parameters(unet))


def test_a_cached_adapter_loads_in_one_copy_as_peft_would_load_it(monkeypatch):
    """`load_adapter_state` copies a state with exactly the adapter's keys straight into its weights
    (no peft call); a state that does not fit goes through peft, which names the keys."""
    import fastdrag.lora as lora_module
    from fastdrag.lora import load_adapter_state
    from fastdrag.models import build_tiny

    unet = build_tiny().unet
    config = LoraConfig(lora_rank=4)
    install_adapter(unet, config, seed=1)
    generator = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in adapter_state(unet).items()}
    install_adapter(unet, config, seed=2)
    peft_load = lora_module.set_peft_model_state_dict
    monkeypatch.setattr(lora_module, "set_peft_model_state_dict", lambda *a, **k: pytest.fail("peft was called"))
    load_adapter_state(unet, {k: v.half() for k, v in state.items()})  # a half state: cast to the fp32 masters
    loaded = adapter_state(unet)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].half().float()) for k in state)
    load_adapter_state(unet, state)
    assert all(torch.equal(adapter_state(unet)[k], state[k]) for k in state)
    monkeypatch.setattr(lora_module, "set_peft_model_state_dict", peft_load)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_adapter_state(unet, {**state, "up_blocks.9.attn1.to_q.lora_A.weight": torch.zeros(4, 32)})


def test_lora_key_changes_with_everything_that_determines_the_adapter():
    from PIL import Image

    from fastdrag.lora import lora_key

    pixels = np.random.default_rng(3).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    base = dict(model_identity="builtin:tiny:seed=0", image=image, prompt="a ball", config=LoraConfig(), seed=42,
                precision=torch.float32)
    key = lora_key(**base)
    assert key == lora_key(**{**base, "image": Image.fromarray(pixels.copy())})  # content, not identity
    changed_pixels = pixels.copy()
    changed_pixels[5, 7, 1] ^= 1
    for change in (dict(model_identity="builtin:tiny:seed=1"), dict(image=Image.fromarray(changed_pixels)),
                   dict(prompt="a ball "), dict(config=LoraConfig(lora_steps=79)), dict(seed=43),
                   dict(precision=torch.float16)):
        assert lora_key(**{**base, **change}) != key, change


def test_cache_hit_skips_training_and_gives_the_same_adapter(editor, picture, monkeypatch):
    key, cached = editor.train_lora(picture.image, picture.prompt, lora_steps=3)
    assert not cached and editor.cache.path(key).is_file()
    first = {k: v.clone() for k, v in adapter_state(editor.components.unet).items()}

    def no_training(*args, **kwargs):
        raise AssertionError("training ran although the adapter was cached")

    monkeypatch.setattr("fastdrag.editor.run_trainer", no_training)
    install_adapter(editor.components.unet, LoraConfig(lora_steps=3), seed=7)  # scramble what is loaded
    restarted = DragEditor(editor.components, editor.device, editor.dtype, cache_dir=editor.cache.directory, progress=False)
    key_again, cached = restarted.train_lora(picture.image, picture.prompt, lora_steps=3)
    assert key_again == key and cached
    second = adapter_state(editor.components.unet)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # a different prompt is a different identity
    with pytest.raises(AssertionError, match="training ran"):
        restarted.train_lora(picture.image, picture.prompt + " at dusk", lora_steps=3)


def test_restarted_trainer_trains_another_image_like_a_fresh_one(tiny, picture, monkeypatch):
    """`LoraTrainer.restart` (what an editor does with the trainer it keeps, so that a CUDA graph
    replays from the first step) against a fresh trainer on the same image: the same losses and
    adapter bit for bit; `fits` refuses what another graph would compute."""
    from PIL import Image

    posterior = encode_posterior(tiny.vae, picture.image)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    other = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    other_posterior = encode_posterior(tiny.vae, other)
    other_text = encode_prompt(tiny.tokenizer, tiny.text_encoder, "another prompt")
    trainer = LoraTrainer(tiny.unet, tiny.scheduler, posterior, text, tiny.scaling_factor, LoraConfig(lora_steps=3), seed=1)
    first = run_trainer(trainer, 3, progress=False, keep_graph=True)
    longer = LoraConfig(lora_steps=5)  # the number of steps is not part of a graph
    assert trainer.fits(tiny.unet, other_posterior, other_text, longer)
    trainer.restart(other_posterior, other_text, seed=2)
    restarted = run_trainer(trainer, 5, progress=False, keep_graph=True)
    restarted_state = {k: v.clone() for k, v in adapter_state(tiny.unet).items()}
    fresh = train_lora(tiny.unet, tiny.scheduler, other_posterior, other_text, tiny.scaling_factor, longer, seed=2,
                       progress=False)
    assert restarted == fresh and restarted != first[:3] + restarted[3:]
    assert all(torch.equal(v, adapter_state(tiny.unet)[k]) for k, v in restarted_state.items())
    assert not any(p.requires_grad for p in tiny.unet.parameters())  # finished: frozen again

    small = encode_posterior(tiny.vae, picture.image.resize((32, 32)))
    assert not trainer.fits(tiny.unet, small, other_text, longer)
    assert not trainer.fits(tiny.unet, other_posterior, other_text, LoraConfig(lora_lr=1e-3))
    monkeypatch.setenv("FASTDRAG_HALF_NORMS", "1")  # the norms a captured step runs in
    assert not trainer.fits(tiny.unet, other_posterior, other_text, longer)
    monkeypatch.delenv("FASTDRAG_HALF_NORMS")
    assert trainer.fits(tiny.unet, other_posterior, other_text, longer)
    install_adapter(tiny.unet, LoraConfig(lora_rank=8), seed=0)  # a new adapter: other tensors
    assert not trainer.fits(tiny.unet, other_posterior, other_text, LoraConfig(lora_rank=8))
    install_adapter(tiny.unet, LoraConfig(), seed=0)


def test_cuda_graph_switch_is_ignored_off_cuda(tiny, picture):
    posterior = encode_posterior(tiny.vae, picture.image)
    text = encode_prompt(tiny.tokenizer, tiny.text_encoder, picture.prompt)
    runs = []
    for cuda_graph in (False, True):
        losses = train_lora(tiny.unet, tiny.scheduler, posterior, text, tiny.scaling_factor, LoraConfig(lora_steps=4),
                            seed=2, progress=False, cuda_graph=cuda_graph)
        runs.append((losses, {k: v.clone() for k, v in adapter_state(tiny.unet).items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def _adapted_unet(seed: int = 3):
    """A tiny UNet with an adapter whose B is not zero, so the LoRA branch changes the output."""
    from fastdrag.models import build_tiny

    unet = build_tiny().unet
    install_adapter(unet, LoraConfig(), seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    inputs = torch.Generator().manual_seed(seed + 1)
    x, text = torch.randn(1, 4, 8, 8, generator=inputs), torch.randn(1, 77, 32, generator=inputs)
    return unet, lambda: unet(x, torch.tensor(500), encoder_hidden_states=text).sample


def test_merged_adapter_computes_the_adapted_unet_in_one_matmul_per_layer():
    from fastdrag.lora import lora_layers, merged_adapter

    unet, forward = _adapted_unet()
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        adapted = forward()
        with _adapters_off(unet):
            plain = forward()
        branch_calls = []
        hooks = [layer.lora_A["fastdrag"].register_forward_hook(lambda *a: branch_calls.append(1))
                 for layer in lora_layers(unet)]
        with merged_adapter(unet):
            merged = forward()
            with merged_adapter(unet):  # nested: no second merge
                nested = forward()
        for hook in hooks:
            hook.remove()
        after = forward()
    assert (adapted - plain).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert torch.equal(nested, merged) and not branch_calls  # the LoRA branch never ran
    assert torch.equal(after, adapted)  # on exit: the original weights, bit for bit, and the branch on
    assert all(torch.equal(p, weights[n]) for n, p in unet.named_parameters())


def _adapters_off(unet):
    import contextlib

    @contextlib.contextmanager
    def off():
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
    return off()


def test_merged_adapter_weights_are_the_exports_and_are_restored_on_error():
    from fastdrag.export.refit import merged_target_weights
    from fastdrag.lora import merged_adapter

    unet, _ = _adapted_unet(seed=5)
    targets = LoraConfig().lora_targets
    exported = merged_target_weights(unet, targets)
    names = {n.replace(".base_layer", ""): n for n, _ in unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    flags = lora_parameters(unet)
    flags[0].requires_grad_(True)  # a trainable flag survives the merge, as do frozen ones
    with pytest.raises(RuntimeError, match="inside"):
        with merged_adapter(unet):
            params = dict(unet.named_parameters())
            for name, value in exported.items():
                assert torch.equal(params[names[name]], value), name  # what ONNX Runtime and TensorRT run
            assert not any(p.requires_grad for p in lora_parameters(unet))
            raise RuntimeError("inside")
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert flags[0].requires_grad and not any(p.requires_grad for p in lora_parameters(unet)[1:])


def test_merged_adapter_leaves_a_unet_without_adapter_alone():
    from fastdrag.lora import merged_adapter
    from fastdrag.models import build_tiny

    unet = build_tiny().unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with merged_adapter(unet):
        assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
    assert not getattr(unet, "_fastdrag_merged", False)


def test_processes_sharing_a_cache_train_an_images_lora_once(tmp_path, picture):
    """An image preloaded on one server and edited on another that shares its cache: the second waits for
    the first's training of the LoRA and loads it, instead of training it too."""
    picture.image.save(tmp_path / "in.png")
    command = [sys.executable, "-m", "fastdrag", "lora", str(tmp_path / "in.png"), "--prompt", picture.prompt,
               "--cache-dir", str(tmp_path / "cache"), "--lora-steps", "40"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    states = sorted(out.split(":")[0].split(" ", 2)[2] for out, _ in results)
    assert states == ["found in the cache", "trained and cached"], results
    # (the second waits unless it reached the lock after the first had let go: either way it loads)
    assert sum("waiting for another process's training of the LoRA" in err for _, err in results) <= 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{results[0][0].split()[1]}.safetensors"]  # no lock left
