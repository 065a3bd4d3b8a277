"""The sequential runner: live audio equals the whole file; checkpoints (+ LoRA) load through the normal path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.inputs import load_audio, load_image
from models.liveavatar import LiveAvatarConfig, build_models, save_checkpoint
from pipeline_stages.sequential import SessionSpec, generate_blocks

pytestmark = pytest.mark.unit



@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    return build_models(LiveAvatarConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def inputs(examples):
    image = load_image(str(examples / "kitchen_grandmother.jpg"), 50_000_000)
    pcm = load_audio(str(examples / "kitchen_grandmother.wav"), 60)[: 7680 * 5 + 1234]
    return image, pcm


def test_live_chunks_equal_the_whole_file(models, inputs):
    image, pcm = inputs
    spec = SessionSpec(image, "an old woman in a kitchen", seed=11)
    whole = generate_blocks(models, spec, pcm)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5000, size=200)
    runner_blocks = []
    from pipeline_stages.sequential import SequentialRunner

    runner = SequentialRunner(models, package=False)
    runner.start_session(spec)
    pos = 0
    for n in sizes:
        runner_blocks += runner.push_audio(pcm[pos:pos + n])
        pos += n
        if pos >= len(pcm):
            break
    runner_blocks += runner.finish()
    assert len(whole) == len(runner_blocks) == 6          # 5 full blocks + 1 zero-padded partial block
    # exact: the audio stage cuts the same 7,680-sample blocks whatever the chunking, and both runs
    # then execute the same per-block code on tensors of the same shapes, in one process
    for a, b in zip(whole, runner_blocks):
        assert a.block_index == b.block_index
        assert torch.equal(a.latent, b.latent)
        assert torch.equal(a.frames, b.frames)
        assert a.frames.shape == (12, 64, 64, 3) and a.frames.dtype == torch.uint8
        assert np.array_equal(a.audio, b.audio)


def test_checkpoint_and_lora_load_through_the_normal_path(models, inputs, tmp_path):
    image, pcm = inputs
    ckpt = save_checkpoint(models, tmp_path / "ckpt", max_shard_bytes=200_000)
    assert len(list(ckpt.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    # a PEFT LoRA on every q/k/v/o/ffn.0/ffn.2 Linear, random A and B
    g = torch.Generator().manual_seed(3)
    rank, alpha = 4, 8.0
    base = {k: v.clone() for k, v in models.dit.state_dict().items()}
    lora, expected = {}, {}
    for key, w in base.items():
        module = key[: -len(".weight")]
        if key.endswith(".weight") and w.ndim == 2 and module.split(".", 2)[-1] in (
                "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2") or (
                key.endswith(".weight") and module.rsplit(".", 1)[-1] in ("q", "k", "v", "o")
                and module.startswith("audio_injector.injector.")):
            a = torch.randn(rank, w.shape[1], generator=g) * 0.1
            b = torch.randn(w.shape[0], rank, generator=g) * 0.1
            lora[f"base_model.model.{module}.lora_A.default.weight"] = a
            lora[f"base_model.model.{module}.lora_B.default.weight"] = b
            expected[key] = (w.double() + (alpha / rank) * (b.double() @ a.double())).float()
    assert len(expected) >= 4 * 10            # every block's 10 targets at least
    lora_file = tmp_path / "liveavatar.safetensors"
    save_file(lora, str(lora_file))
    (tmp_path / "adapter_config.json").write_text(f'{{"r": {rank}, "lora_alpha": {alpha}}}')

    loaded = build_models(LiveAvatarConfig.load(ckpt), checkpoint=ckpt, lora=lora_file)
    assert not loaded.random_weights
    state = loaded.dit.state_dict()
    for key, w in base.items():
        want = expected.get(key, w)
        torch.testing.assert_close(state[key], want, rtol=0, atol=1e-6)
    # the merged model generates what an in-memory merge generates
    merged = build_models(LiveAvatarConfig.tiny(), seed=0)
    with torch.no_grad():
        for key, w in expected.items():
            merged.dit.state_dict()[key].copy_(w)
    spec = SessionSpec(image, "", seed=4)
    a = generate_blocks(loaded, spec, pcm[:7680 * 2])
    b = generate_blocks(merged, spec, pcm[:7680 * 2])
    for x, y in zip(a, b):
        torch.testing.assert_close(x.latent, y.latent, rtol=1e-5, atol=1e-5)
