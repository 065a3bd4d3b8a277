"""Each training stage runs a few steps on a tiny batch and its loss goes down (issue 8).

Losses are compared on a fixed evaluation draw (same clips, noise levels and noise before and after
training), so a decrease is the stage learning, not a luckier random draw.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.audio_encoder import AudioEncoderConfig, Wav2VecAudioEncoder
from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.scheduler import FlowMatchScheduler
from models.training import synthetic as syn
from models.training.data import build_latent_dataset, to_pixels
from models.training.recipe import adamw
from models.training.stages import (
    FlowMatchingStage,
    SelfForcingDMDStage,
    VAEStage,
    VAEStreamStage,
    audio_features,
    block_ref_times,
    draw_batch,
    flow_matching_loss,
    inflated_init_,
    make_sink,
    reconstruction_losses,
    rollout,
    sample_sigma,
)
from models.vae import VAEConfig, WanVAE

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _speech(seconds: float = 4.0) -> list[np.ndarray]:
    """A syllable-like test signal: 5 Hz bursts of a 220 Hz tone (independent of the corpus)."""
    t = np.arange(int(seconds * syn.SAMPLE_RATE)) / syn.SAMPLE_RATE
    return [(0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 2.5 * t) > 0)).astype(np.float32)]


@pytest.fixture(scope="module")
def tiny_latents():
    """Two 2-block clips encoded by a (random, default-init) tiny VAE, plus the audio encoder."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny()).eval()
    data = syn.SyntheticDataset(_speech(), [0, 1], num_frames=1 + 2 * 12, seed=3, epoch_size=2)
    dit_cfg = DiTConfig.tiny()
    latents = build_latent_dataset(vae, data, num_clips=2, blocks=2, motion_frames=dit_cfg.motion_frames,
                                   block_samples=AudioEncoderConfig.tiny().block_samples, progress=False)
    return latents


def _contexts(cfg: DiTConfig) -> torch.Tensor:
    return torch.randn(2, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(0))


def test_vae_stage_reconstruction_improves():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny())
    data = syn.SyntheticDataset(_speech(), [5], num_frames=5, seed=1, epoch_size=1)   # one clip, every step
    x = to_pixels(data[0].frames[:1])                                                 # its first frame

    def recon_l1() -> float:
        with torch.no_grad():
            mu = vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]
            return (vae.decoder(vae.conv2(mu)) - x).abs().mean().item()

    before = recon_l1()
    stage = VAEStage(vae, data, torch.optim.Adam(vae.parameters(), lr=2e-3), batch=1, image_batch=2,
                     image_steps=30, lr_after_warmup=5e-4)
    metrics, lrs = [], []
    for step in range(40):
        metrics.append(stage(step, torch.Generator().manual_seed(step)))
        lrs.append(stage.optimizer.param_groups[0]["lr"])
    assert lrs[29] == 2e-3 and lrs[30] == 5e-4                                      # lowered after the warm-up
    assert [m["images"] for m in metrics[28:32]] == [1.0, 1.0, 1.0, 0.0]          # warm-up, then alternating
    assert metrics[31]["motion"] > 0.0                                              # clip steps see motion
    assert recon_l1() < 0.9 * before


def test_inflated_init_lets_the_tiny_vae_fit_colours_that_the_default_init_cannot():
    """Eight constant colours, 100 Adam steps: with PyTorch's default conv init the tiny VAE's RMSNorms
    wash the colour out (its outputs collapse to a couple of values); with inflated_init_ it fits them."""
    x = (torch.rand(8, 3, 1, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1).expand(8, 3, 1, 16, 16)

    def fit(init) -> float:
        torch.manual_seed(0)
        vae = init(WanVAE(VAEConfig.tiny()))
        opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
        for _ in range(100):
            recon = vae.decoder(vae.conv2(vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]))
            loss = (recon - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    he, default = fit(inflated_init_), fit(lambda vae: vae)
    assert he < 0.02 and he < 0.2 * default, (he, default)
    vae = inflated_init_(WanVAE(VAEConfig.tiny()))
    assert all(torch.count_nonzero(block.proj.weight) == 0 for block in vae.modules() if hasattr(block, "to_qkv"))


def test_inflated_init_codes_a_static_video_like_its_first_frame():
    """At init the video VAE is the image VAE applied frame by frame: every latent of a still clip equals
    the first frame's latent, and every decoded frame equals the first decoded frame."""
    torch.manual_seed(0)
    vae = inflated_init_(WanVAE(VAEConfig.tiny())).eval()
    frame = syn.sample_clip(3, _speech(1.0)[0], 1, seed=0).frames                   # [1, 64, 64, 3]
    still = to_pixels(np.repeat(frame, 17, axis=0))                                  # [1, 3, 17, 64, 64]
    with torch.no_grad():
        z = vae.encode(still)                                                         # [1, 16, 5, 8, 8]
        torch.testing.assert_close(z, z[:, :, :1].expand_as(z), rtol=1e-5, atol=1e-5)
        video = vae.decode(z)
        torch.testing.assert_close(video, video[:, :, :1].expand_as(video), rtol=1e-5, atol=1e-5)
        moving = to_pixels(syn.sample_clip(3, _speech(1.0)[0], 17, seed=0).frames)   # a real clip is not
        assert not torch.allclose(vae.encode(moving)[:, :, 1:], z[:, :, 1:], atol=1e-3)


def test_vae_stream_stage_reconstructs_through_the_streaming_caches():
    """The graded chunks after a prefix equal the same frames of one-shot encode + decode of the whole clip
    (without latent noise): the stage trains exactly the state that streaming runs in."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny()).eval()
    data = syn.SyntheticDataset(_speech(), [5], num_frames=1 + 4 * 5, seed=1, epoch_size=1)
    stage = VAEStreamStage(vae, data, torch.optim.Adam(vae.parameters()), batch=1, chunks=2, max_prefix=3,
                           crop=16, latent_noise=0.0)
    x = to_pixels(data[0].frames[:, 8:24, 16:32])                                   # [1, 3, 21, 16, 16]
    with torch.no_grad():
        full = vae.decoder(vae.conv2(vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]))
        for prefix in (0, 3):
            clip = x[:, :, :1 + 4 * (prefix + 2)]
            recon, target = stage.reconstruct(clip, prefix, torch.Generator().manual_seed(0))
            start = 1 + 4 * prefix if prefix else 0
            assert torch.equal(target, clip[:, :, start:])
            torch.testing.assert_close(recon, full[:, :, start:clip.shape[2]], rtol=1e-4, atol=1e-5)


def test_vae_stream_stage_loss_decreases_and_checks_its_clips():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny())
    data = syn.SyntheticDataset(_speech(), [5], num_frames=1 + 4 * 3, seed=1, epoch_size=1)   # one clip
    stage = VAEStreamStage(vae, data, torch.optim.Adam(vae.parameters(), lr=2e-3), batch=1, chunks=1,
                           max_prefix=2, crop=16, latent_noise=0.0)
    x = to_pixels(data[0].frames[:, 24:40, 24:40])

    def stream_l1() -> float:      # the last chunk after a 2-chunk prefix (fixed crop, no noise)
        with torch.no_grad():
            recon, target = stage.reconstruct(x, 2, torch.Generator())
            return (recon - target).abs().mean().item()

    before = stream_l1()
    metrics = [stage(step, torch.Generator().manual_seed(step)) for step in range(40)]
    assert {m["prefix"] for m in metrics} == {0.0, 1.0, 2.0}
    assert stream_l1() < 0.9 * before
    with pytest.raises(ValueError, match="shorter than"):
        VAEStreamStage(vae, data, stage.optimizer, batch=1, chunks=2, max_prefix=2)
    with pytest.raises(ValueError, match="crop 12"):
        VAEStreamStage(vae, data, stage.optimizer, batch=1, chunks=1, max_prefix=2, crop=12)


def _mouth_mse64(recon: torch.Tensor, x: torch.Tensor, mask: np.ndarray) -> float:
    """float64 reference: mean squared error over the masked pixels (all 3 channels)."""
    err = (recon.detach().double().numpy() - x.double().numpy()) ** 2                     # [B, 3, T, H, W]
    m = np.broadcast_to(mask[:, None].astype(np.float64), err.shape)
    return float((err * m).sum() / m.sum())


def test_mouth_loss_is_the_error_inside_the_mouth_mask_of_the_frames_and_crops_trained():
    """Both VAE stages grade the mouth with the mask of exactly the frames and crop windows they train:
    their reported mouth term equals a float64 recomputation from syn.mouth_mask, and it enters the loss
    with mouth_weight."""
    g = torch.Generator().manual_seed(0)
    recon, x = torch.randn(2, 3, 3, 8, 8, generator=g), torch.randn(2, 3, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 3, 8, 8, generator=g) < 0.2).float()
    mse, _, _, mouth = reconstruction_losses(recon, x, mask)
    assert mouth.item() == pytest.approx(_mouth_mse64(recon, x, mask.numpy()), rel=1e-5)
    assert mouth.item() != pytest.approx(mse.item(), rel=1e-2)
    assert reconstruction_losses(recon, x)[3].item() == 0.0

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny())
    frozen = torch.optim.SGD(vae.parameters(), lr=0.0)                         # the reported loss is pre-step
    data = syn.SyntheticDataset(_speech(), [5, 6], num_frames=1 + 4 * 3, seed=1, epoch_size=4)
    faces = {i: syn.face_params(i) for i in (5, 6)}
    # 1. VAEStage, warm-up (single frames, no latent noise)
    stage = VAEStage(vae, data, frozen, batch=1, image_batch=3, image_steps=10, mouth_weight=2.0)
    out = stage(0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, len(data), (3,), generator=gen).tolist()
    pick = torch.randint(0, data.num_frames, (3,), generator=gen).tolist()
    samples = [data[i] for i in idx]
    x = to_pixels(np.stack([s.frames[k:k + 1] for s, k in zip(samples, pick, strict=True)]))
    with torch.no_grad():
        recon = vae.decoder(vae.conv2(vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]))
    mask = np.stack([syn.mouth_mask(faces[s.identity], s.motion)[k:k + 1] for s, k in zip(samples, pick, strict=True)])
    assert out["mouth"] == pytest.approx(_mouth_mse64(recon, x, mask), rel=1e-4)
    assert out["loss"] == pytest.approx(out["mse"] + 2.0 * out["mouth"], rel=1e-5)
    # 2. VAEStreamStage (random prefix and crop windows)
    stream = VAEStreamStage(vae, data, frozen, batch=2, chunks=1, max_prefix=2, crop=32, latent_noise=0.0,
                            mouth_weight=3.0)
    graded = 0
    for seed in range(6):
        out = stream(seed, torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(data), (2,), generator=gen).tolist()
        prefix = int(torch.randint(0, 3, (1,), generator=gen))
        corners = torch.randint(0, 64 - 32 + 1, (2, 2), generator=gen).tolist()
        frames = 1 + 4 * (prefix + 1)
        samples = [data[i] for i in idx]
        x = to_pixels(np.stack([s.frames[:frames, r:r + 32, c:c + 32] for s, (r, c) in zip(samples, corners, strict=True)]))
        with torch.no_grad():
            recon, target = stream.reconstruct(x, prefix, torch.Generator())
        start = frames - target.shape[2]
        mask = np.stack([syn.mouth_mask(faces[s.identity], s.motion)[start:frames, r:r + 32, c:c + 32]
                         for s, (r, c) in zip(samples, corners, strict=True)])
        if mask.sum() == 0:
            assert out["mouth"] == 0.0
            continue
        assert out["mouth"] == pytest.approx(_mouth_mse64(recon, target, mask), rel=1e-4)
        assert out["loss"] == pytest.approx(out["mse"] + 0.1 * out["l1"] + out["motion"] + 3.0 * out["mouth"],
                                            rel=1e-5)
        graded += 1
    assert graded >= 2                                             # some crop windows hold part of a mouth


@pytest.mark.parametrize("causal", [False, True], ids=["teacher", "causal-student"])
def test_flow_matching_stage_loss_decreases(tiny_latents, causal):
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    dit = CausalWanS2V(cfg)
    audio = Wav2VecAudioEncoder.random(AudioEncoderConfig.tiny(), seed=0)
    contexts = _contexts(cfg)

    def eval_loss() -> float:
        g = torch.Generator().manual_seed(99)
        b = draw_batch(tiny_latents, contexts, 2, g)
        with torch.no_grad():
            feats = audio_features(audio, b.pcm)
            sigma = sample_sigma(2, 3.0, g)
            noise = torch.randn(b.x0.shape, generator=g)
            return flow_matching_loss(dit, b.x0, feats, b.context, b.ref, b.motion, sigma, noise, 0,
                                      block_ref_times(dit, 0, 2, 0, 0), causal).item()

    before = eval_loss()
    opt = adamw(list(dit.parameters()) + list(audio.parameters()), 2e-3)
    stage = FlowMatchingStage(dit, audio, tiny_latents, contexts, opt, batch=2, shift=3.0, causal=causal,
                              train_audio=not causal, seed=0, audio_dropout=0.0, max_frame_start=0)
    audio_before = [p.detach().clone() for p in audio.parameters()]
    for step in range(30):
        stage(step, torch.Generator().manual_seed(step % 3))      # 3 fixed draws: a tiny batch
    assert eval_loss() < 0.8 * before
    # the (built frozen) audio encoder trains exactly when train_audio is set
    moved = any(not torch.equal(a, p) for a, p in zip(audio_before, audio.parameters(), strict=True))
    assert moved == (not causal)


def test_dmd_critic_learns_and_student_moves_toward_its_target(tiny_latents):
    """The critic's flow-matching loss on student samples falls over a few steps, and one student step
    brings its rollout closer to the DMD regression target ``x - (x0_fake - x0_real) / norm``."""
    torch.manual_seed(0)
    cfg = DiTConfig.tiny()
    teacher = CausalWanS2V(cfg).requires_grad_(False)
    student, critic = CausalWanS2V(cfg), CausalWanS2V(cfg)
    student.load_state_dict(teacher.state_dict())
    critic.load_state_dict(teacher.state_dict())
    with torch.no_grad():                         # the critic starts off the teacher: a non-zero DMD gradient
        for p in critic.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    audio = Wav2VecAudioEncoder.random(AudioEncoderConfig.tiny(), seed=0).requires_grad_(False)
    contexts = _contexts(cfg)
    sched = FlowMatchScheduler()
    g_opt, c_opt = torch.optim.SGD(student.parameters(), lr=0.05), adamw(critic.parameters(), 2e-3)
    stage = SelfForcingDMDStage(student, teacher, critic, audio, tiny_latents, contexts, g_opt, c_opt, sched,
                                batch=2, shift=3.0, guidance=1.0)

    def student_sample(gen_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rollout of the stage's first draw and its DMD target (both without grad)."""
        g = torch.Generator().manual_seed(gen_seed)
        b = draw_batch(tiny_latents, contexts, 2, g)
        with torch.no_grad():
            feats = audio_features(audio, b.pcm)
            emb = student.embed_text(b.context)
            sink = make_sink(student, b.ref, b.motion, emb, grad=False)
            exit_step = int(torch.randint(0, sched.num_steps, (1,), generator=g))
            x = rollout(student, sched, feats, emb, sink, torch.randn(b.x0.shape, generator=g), exit_step,
                        lead_seed=0)
            sigma = sample_sigma(2, 3.0, g, *stage.sigma_range)
            x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x + sigma.view(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=g)
            real, fake = stage._scores(x_t, sigma, feats, b, block_ref_times(student, 0, 2, 0, 0))
            norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        return x, x - (fake - real) / norm

    x_before, target = student_sample(7)
    stage.critic_steps = 0
    stage(0, torch.Generator().manual_seed(7))     # same draw as student_sample(7), lead seed 0 (step 0)
    x_after, _ = student_sample(7)
    assert (x_after - target).square().mean() < (x_before - target).square().mean()

    stage.critic_steps = 1
    losses = [stage(s, torch.Generator().manual_seed(s % 2))["critic_loss"] for s in range(1, 21)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_quick_recipe_config_is_the_same_architecture():
    from models.training.recipe import TrainConfig

    full, quick = TrainConfig().model_config(), TrainConfig.quick().model_config()
    assert dataclasses.asdict(full) == dataclasses.asdict(quick)
    assert full.dit.dim == TrainConfig().dit_dim
    assert full.vae == dataclasses.replace(VAEConfig.tiny(), dim=TrainConfig().vae_dim)


def test_vae_dim_widens_only_the_vae():
    from models.training.recipe import TrainConfig

    base, wide = TrainConfig(vae_dim=8).model_config(), TrainConfig(vae_dim=12).model_config()
    assert base.vae == VAEConfig.tiny()         # 8: the tiny architecture's own width
    assert wide.vae == dataclasses.replace(VAEConfig.tiny(), dim=12) and wide.dit == base.dit
    narrow, wider = (sum(p.numel() for p in WanVAE(c.vae).parameters()) for c in (base, wide))
    assert 2.0 < wider / narrow < 2.4           # conv weights scale with the width squared


def test_decoder_distill_stage_moves_only_the_decoder_toward_the_teacher():
    """Stage 1c (v5): the narrow student keeps the teacher's encoder bit for bit (same latents, so the DiT
    needs no retraining), and its decoded frames move toward the teacher's on a fixed evaluation clip."""
    from models.training.stages import DecoderDistillStage, narrow_decoder_student

    torch.manual_seed(0)
    teacher = inflated_init_(WanVAE(VAEConfig.tiny())).eval()
    student = narrow_decoder_student(teacher, decoder_dim=4, seed=1)
    assert student.config.dec_dim == 4 and student.config.dim == teacher.config.dim
    data = syn.SyntheticDataset(_speech(), [5], num_frames=1 + 4 * 2, seed=1, epoch_size=1)
    opt = torch.optim.Adam(list(student.conv2.parameters()) + list(student.decoder.parameters()), lr=3e-3)
    stage = DecoderDistillStage(student, teacher, data, data, opt, batch=1, image_batch=2, image_steps=10,
                                stream_batch=1, chunks=1, max_prefix=1, crop=16, distill_weight=4.0,
                                edge_weight=0.5, sharp_weight=0.2, edge_from=20)
    x = to_pixels(data[0].frames)                                                    # [1, 3, 9, H, W]

    def to_teacher() -> float:
        with torch.no_grad():
            z = teacher.conv1(teacher.encoder(x))[:, :teacher.config.z_dim]
            return (student.decoder(student.conv2(z)) - teacher.decoder(teacher.conv2(z))).square().mean().item()

    encoder_before = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    before = to_teacher()
    metrics = [stage(step, torch.Generator().manual_seed(step)) for step in range(30)]
    assert {m["stream"] for m in metrics} == {0.0, 1.0}
    assert all(m["edge"] == 0 for m in metrics[:20]) and all(m["edge"] > 0 for m in metrics[20:])
    assert all(m["sharp"] == 0 for m in metrics[:20]) and all(m["sharp"] > 0 for m in metrics[20:])
    assert to_teacher() < 0.5 * before
    for name, value in student.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]) and torch.equal(value, teacher.encoder.state_dict()[name])
    with torch.no_grad():
        assert torch.equal(student.encode(x), teacher.encode(x))

    other = narrow_decoder_student(WanVAE(VAEConfig.tiny()), decoder_dim=4, seed=1)
    with pytest.raises(ValueError, match="encoder differs"):
        DecoderDistillStage(other, teacher, data, data, opt, batch=1, chunks=1, max_prefix=1, crop=16)


def test_laplacian_is_the_five_point_stencil_of_every_frame_and_channel():
    """The sharpness loss of stage 1c: a float64 numpy reference of the 5-point Laplacian (zero padding)."""
    from models.training.stages import laplacian

    x = torch.randn(2, 3, 4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = np.pad(x.numpy(), [(0, 0)] * 3 + [(1, 1), (1, 1)])
    ref = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * p[..., 1:-1, 1:-1]
    np.testing.assert_allclose(laplacian(x).numpy(), ref, rtol=0, atol=1e-12)


def test_laplacian_energy_gap_is_the_log_ratio_of_edge_energies_and_raises_a_blurred_frame():
    """The sharpness-matching loss of stage 1c: zero for equal edge energy wherever the edges are, the
    float64 squared log-ratio per clip and frame otherwise, and its gradient sharpens a blurred copy."""
    from models.training.stages import laplacian, laplacian_energy_gap

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8, generator=gen, dtype=torch.float64)
    assert laplacian_energy_gap(x, x).item() == 0.0
    assert laplacian_energy_gap(torch.roll(x, 3, dims=-1), x).item() < 0.05   # same texture, moved: ~no gap
    y = 0.5 * x
    e_y, e_x = (laplacian(y).numpy() ** 2).mean(axis=(1, 3, 4)), (laplacian(x).numpy() ** 2).mean(axis=(1, 3, 4))
    ref = ((np.log(e_y + 1e-8) - np.log(e_x + 1e-8)) ** 2).mean()
    np.testing.assert_allclose(laplacian_energy_gap(y, x).item(), ref, rtol=1e-12)

    blurred = ((x + torch.roll(x, 1, dims=-1) + torch.roll(x, 1, dims=-2)) / 3).requires_grad_(True)
    gap = laplacian_energy_gap(blurred, x)
    gap.backward()
    stepped = (blurred - 0.1 * blurred.grad).detach()
    energy = lambda v: laplacian(v).pow(2).mean().item()                         # noqa: E731
    assert energy(blurred) < energy(stepped) and laplacian_energy_gap(stepped, x).item() < gap.item()
