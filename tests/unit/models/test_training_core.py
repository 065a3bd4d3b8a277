"""Training building blocks that need no synthetic data: the loop's exact resume, the differentiable
audio batch, the bidirectional mask, the sink-free attention, and the Self-Forcing rollout against
the inference generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.audio_encoder import AudioEncoderConfig, Wav2VecAudioEncoder, encode_blocks_batch
from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.generator import GenerationOptions, LiveAvatarGenerator
from models.liveavatar import _seeded_init
from models.scheduler import FlowMatchScheduler
from models.training.loop import TrainingError, run_stage
from models.training.stages import SelfForcingDMDStage, make_sink, rollout

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ---- the loop ---------------------------------------------------------------------------------

def _linear_stage(model: nn.Linear, opt: torch.optim.Optimizer):
    target = torch.arange(12, dtype=torch.float32).view(3, 4) / 6.0

    def step(i: int, gen: torch.Generator) -> dict[str, float]:
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x @ target.T).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}
    return step


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt


def test_run_stage_resume_is_exact_and_loss_decreases(tmp_path):
    # one uninterrupted run of 12 steps
    m1, o1 = _fresh()
    r1 = run_stage("lin", 24, _linear_stage(m1, o1), {"m": m1}, {"o": o1}, tmp_path / "a", seed=7, save_every=4,
                   progress=False)
    # 6 steps, then a new process-like restart (fresh objects) that resumes to 12
    m2, o2 = _fresh()
    run_stage("lin", 12, _linear_stage(m2, o2), {"m": m2}, {"o": o2}, tmp_path / "b", seed=7, save_every=4,
              progress=False)
    m3, o3 = _fresh(seed=123)             # different init: must be overwritten by the checkpoint
    r3 = run_stage("lin", 24, _linear_stage(m3, o3), {"m": m3}, {"o": o3}, tmp_path / "b", seed=7, save_every=4,
                   progress=False)
    assert r3.resumed_from == 12
    # exact: the checkpoint restores weights and optimizer state bit for bit, and every step runs the
    # same ops on the same batch shapes in one process (one thread count, one kernel dispatch)
    for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r3.history]
    assert r1.mean("loss", last=3) < 0.5 * r1.mean("loss", first=3)


def test_run_stage_rejects_a_checkpoint_of_another_stage(tmp_path):
    m, o = _fresh()
    run_stage("lin", 2, _linear_stage(m, o), {"m": m}, {"o": o}, tmp_path, seed=0, progress=False)
    other = nn.Linear(5, 3)
    with pytest.raises(TrainingError, match="does not match"):
        run_stage("lin", 4, _linear_stage(m, o), {"m": other}, {"o": o}, tmp_path, seed=0, progress=False)
    with pytest.raises(TrainingError, match="does not hold"):
        run_stage("lin", 4, _linear_stage(m, o), {"x": m}, {"o": o}, tmp_path, seed=0, progress=False)


def test_run_stage_stops_on_nan(tmp_path):
    m, o = _fresh()
    with pytest.raises(TrainingError, match="non-finite"):
        run_stage("nan", 3, lambda i, g: {"loss": float("nan")}, {"m": m}, {"o": o}, tmp_path, seed=0,
                  progress=False)


# ---- audio --------------------------------------------------------------------------------------

def test_encode_blocks_batch_matches_the_streaming_block_encoder():
    cfg = AudioEncoderConfig.tiny()
    enc = Wav2VecAudioEncoder.random(cfg, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(3, cfg.block_samples, generator=g) * torch.tensor([[0.1], [1.0], [0.01]])
    batched = encode_blocks_batch(enc, blocks)                               # [3, L, C, 12]
    for i in range(3):
        torch.testing.assert_close(batched[i], enc.encode_block(blocks[i]), rtol=1e-4, atol=1e-5)
    blocks.requires_grad_(True)
    encode_blocks_batch(enc, blocks).sum().backward()
    assert blocks.grad is not None and blocks.grad.abs().sum() > 0


# ---- DiT switches used by training and the ablation --------------------------------------------

def _dit(seed: int = 0, **kw) -> CausalWanS2V:
    dit = CausalWanS2V(DiTConfig.tiny(**kw))
    _seeded_init(dit, seed)
    # the zero-initialised output paths would make every comparison trivially equal
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in dit.parameters():
            if p.ndim == 1 and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return dit.eval()


def _cond(dit: CausalWanS2V, b: int = 1, seed: int = 0):
    cfg, g = dit.config, torch.Generator().manual_seed(seed)
    ref = torch.randn(b, cfg.in_dim, 1, 8, 8, generator=g)
    motion = torch.randn(b, cfg.in_dim, cfg.motion_latent_frames, 8, 8, generator=g)
    text = torch.randn(b, 5, cfg.text_dim, generator=g)
    return ref, motion, text


def test_bidirectional_mask_lets_block0_see_block1():
    dit = _dit()
    cfg = dit.config
    ref, motion, text = _cond(dit)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, 6, 8, 8, generator=g)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 24, generator=g)
    x2 = x.clone()
    x2[:, :, 3:] += 1.0                                               # change block 1 only
    with torch.no_grad():
        emb = dit.embed_text(text)
        sink = make_sink(dit, ref, motion, emb, grad=False)
        outs = {c: [dit.forward_full(v, 500.0, audio, emb, sink, ref_time=40, causal=c)[:, :, :3] for v in (x, x2)]
                for c in (True, False)}
    torch.testing.assert_close(outs[True][0], outs[True][1])              # causal: block 0 blind to block 1
    assert (outs[False][0] - outs[False][1]).abs().max() > 1e-4           # bidirectional: it sees it


def test_no_sink_option_ignores_the_reference():
    dit = _dit()
    gen = LiveAvatarGenerator(dit, FlowMatchScheduler())
    _, motion, text = _cond(dit)
    audio = torch.randn(1, dit.config.num_audio_layers, dit.config.audio_dim, 12,
                        generator=torch.Generator().manual_seed(2))
    outs = {}
    for use_sink in (True, False):
        for k, ref_seed in enumerate((5, 6)):
            ref = torch.randn(1, dit.config.in_dim, 1, 8, 8, generator=torch.Generator().manual_seed(ref_seed))
            s = gen.start(ref, motion, text, seed=0, options=GenerationOptions(sink=use_sink))
            outs[use_sink, k] = gen.step_block(s, audio).latent
    torch.testing.assert_close(outs[False, 0], outs[False, 1])
    assert (outs[True, 0] - outs[True, 1]).abs().max() > 1e-4


# ---- Self-Forcing rollout = inference --------------------------------------------------------

def test_rollout_with_last_exit_step_reproduces_inference():
    """The training rollout (exit at the last step) must give exactly what the streaming generator
    gives for the same noise, conditioning and sink leads: the student trains on its inference path."""
    dit = _dit(seed=4)
    cfg = dit.config
    sched = FlowMatchScheduler()
    ref, motion, text = _cond(dit, seed=9)
    blocks = 3
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, cfg.in_dim, blocks * cfg.frames_per_block, 8, 8, generator=g)
    audio = torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 12 * blocks, generator=g)
    with torch.no_grad():
        emb = dit.embed_text(text)
        sink = make_sink(dit, ref, motion, emb, grad=False)
        trained = rollout(dit, sched, audio, emb, sink, noise, exit_step=sched.num_steps - 1, lead_seed=11)
    gen = LiveAvatarGenerator(dit, sched)
    session = gen.start(ref, motion, text, seed=11, options=GenerationOptions(reanchor=False))
    fpb = cfg.frames_per_block
    inferred = torch.cat([gen.step_block(session, audio[..., 12 * k:12 * (k + 1)],
                                         noise=noise[:, :, k * fpb:(k + 1) * fpb]).latent for k in range(blocks)], 2)
    torch.testing.assert_close(trained, inferred, rtol=1e-5, atol=1e-5)


def test_dmd_gradient_vanishes_when_critic_equals_teacher_and_moves_otherwise():
    """DMD pushes the student along x0_fake - x0_real: zero when the fake score is the real one."""
    from models.training.data import LatentDataset, LatentDatasetSpec

    torch.manual_seed(0)
    student, teacher = _dit(seed=1), _dit(seed=2)
    cfg = student.config
    enc = Wav2VecAudioEncoder.random(AudioEncoderConfig.tiny(), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    n, blocks = 2, 2
    data = LatentDataset(
        spec=LatentDatasetSpec(num_clips=n, blocks=blocks, identities=(0,), seed=0, size=64, vae_digest="x"),
        latents=torch.randn(n, cfg.in_dim, 3 * blocks, 8, 8, generator=g),
        pcm=torch.randn(n, blocks, enc.config.block_samples, generator=g) * 0.1,
        clip_identity=torch.zeros(n, dtype=torch.long), ref_latents=torch.randn(1, cfg.in_dim, 1, 8, 8, generator=g),
        motion_latents=torch.randn(1, cfg.in_dim, cfg.motion_latent_frames, 8, 8, generator=g), identity_index={0: 0})
    contexts = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    results = {}
    for same in (True, False):
        s = _dit(seed=1)
        critic = _dit(seed=2) if same else _dit(seed=3)
        before = [p.detach().clone() for p in s.parameters()]
        stage = SelfForcingDMDStage(s, teacher, critic, enc, data, contexts,
                                    torch.optim.SGD(s.parameters(), lr=1.0), torch.optim.SGD(critic.parameters(), lr=0.0),
                                    FlowMatchScheduler(), batch=2, shift=3.0, guidance=1.0)
        out = stage(0, torch.Generator().manual_seed(5))
        moved = max((a - p).abs().max().item() for a, p in zip(before, s.parameters(), strict=True))
        results[same] = (out, moved)
    assert results[True][0]["g_loss"] == 0.0 and results[True][1] == 0.0
    assert results[False][0]["g_loss"] > 0.0 and results[False][1] > 0.0
    assert student is not None
