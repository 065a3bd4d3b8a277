"""The whole recipe: synthetic data -> VAE -> teacher -> causal student -> Self-Forcing DMD -> checkpoint.

``train_all(TrainConfig(), out_dir)`` reproduces the shipped checkpoint from scratch (``liveavatar
train`` calls it). Every stage checkpoints under ``out_dir/<stage>/`` and resumes when rerun; the
latent dataset is cached in ``out_dir/latents.pt``; the final bundle is written with
:func:`models.liveavatar.save_checkpoint` (the format real checkpoints use: ``config.json`` + sharded
safetensors for the DiT, ``liveavatar.json`` + one safetensors file per other network).

Simplifications to fit 2 CPU cores (also listed in the README):

- 64x64 video of procedural faces; the DiT is 4 layers of width 128 (1.3 M parameters), the VAE the
  width-8 tiny Wan VAE; clips are 4 blocks (1.92 s).
- The audio encoder (tiny wav2vec2, no pre-training) stays at its seeded random weights unless
  ``train_audio_encoder`` trains it with the teacher (the shipped v2 did not); the text encoder stays at its seeded random weights and prompts are drawn from a fixed
  list, so the DiT learns to ignore them.
- The student starts from the teacher and gets a short block-causal flow-matching warm start before
  DMD (instead of CausVid's ODE-pair regression); the DMD critic takes one step per generator step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.liveavatar import LiveAvatarConfig, LiveAvatarModels, build_models, save_checkpoint
from models.scheduler import FlowMatchScheduler
from models.training import synthetic as syn
from models.training.data import (
    LatentDatasetSpec,
    build_latent_dataset,
    identities_split,
    load_latent_dataset,
    save_latent_dataset,
    vae_digest,
)
from models.training.loop import StageResult, run_stage
from models.training.stages import (
    DecoderDistillStage,
    FlowMatchingStage,
    SelfForcingDMDStage,
    VAEStage,
    VAEStreamStage,
    fit_latent_stats,
    inflated_init_,
    narrow_decoder_student,
)
from models.vae import WanVAE

#: Prompts drawn during training (the random text encoder gives each a different context).
PROMPTS = ("", "a person talking", "a cartoon face speaking to the camera", "someone telling a story",
           "news presenter", "a friendly avatar", "close-up of a face, talking", "video call")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the recipe. Defaults: what produced the shipped checkpoint."""

    seed: int = 0
    size: int = 64
    num_identities: int = 1000
    train_identities: int = 800        # identities [0, 800) train; [800, 1000) are held out for eval
    num_synth_speech: int = 200        # espeak-ng utterances (plus the real example speech)
    # 1. VAE
    vae_dim: int = 12                  # base width (the tiny architecture has 8; v1-v3 trained 8)
    vae_steps: int = 3000              # v1-v3: 1500
    vae_batch: int = 2                 # clips per clip step (image steps take 8 single frames)
    vae_frames: int = 5                # 1 + 4k frames per clip
    vae_long_frames: int = 9           # ... and from step vae_long_from on (two chunks)
    vae_long_from: int = 2200          # v1-v3: 1100
    vae_lr: float = 2e-3               # during the 600 single-frame warm-up steps
    vae_lr_clips: float = 5e-4         # after it
    vae_mouth_weight: float = 1.0      # weight of the MSE inside the mouth mask (both VAE stages; v1-v3: 0)
    # 1b. the VAE in the streaming steady state (long cache-filling prefixes, truncated backprop)
    vae_stream_steps: int = 800
    vae_stream_batch: int = 4
    vae_stream_chunks: int = 2         # 4-frame chunks graded per step
    vae_stream_prefix: int = 12        # prefix of 0..N chunks (48 frames: past the caches' effective reach)
    vae_stream_crop: int = 32          # random crops keep the long clips cheap
    vae_stream_lr: float = 2e-4
    stats_clips: int = 64              # clips for the latent mean/std fit
    # 1c. a narrower decoder distilled from the VAE's (v5): the encoder and latent space stay, so the
    # DiT is unchanged; the narrow decoder decodes a block in 0.38 s of one core instead of 0.56 s (AMD EPYC)
    decoder_dim: int = 8               # 0 = keep the VAE's own decoder (v1-v4)
    decoder_steps: int = 2400
    decoder_lr: float = 1e-3           # warm-up (single frames)
    decoder_lr_clips: float = 4e-4     # after it
    decoder_distill_weight: float = 1.0
    decoder_edge_weight: float = 0.5   # the Laplacian loss (edges where the truth's are), from step decoder_edge_from on
    decoder_edge_from: int = 1200
    decoder_sharp_weight: float = 0.2  # the Laplacian-energy match (as much edge as the truth), from the same step
    # latent dataset
    latent_clips: int = 640
    clip_blocks: int = 4               # 3-latent blocks per clip (1.92 s)
    dit_identities: int = 320          # the first N train identities make the DiT clips (encoding cost)
    # 2. DiT size (the tiny architecture, wider)
    dit_dim: int = 128
    dit_heads: int = 8
    dit_ffn: int = 256
    dit_layers: int = 4
    # 2a. bidirectional teacher (+ audio encoder)
    teacher_steps: int = 2500
    teacher_batch: int = 8
    teacher_lr: float = 5e-4
    # Train the audio encoder (wav2vec2) with the teacher. v1 and v2 kept it at its seeded random
    # weights (the encoder is built frozen and their recipe did not unfreeze it); training it (v3)
    # raised held-out sync from 0.31 to 0.42 (docs/training.md).
    train_audio_encoder: bool = True
    # 2b. causal warm start of the student
    causal_steps: int = 300
    causal_lr: float = 2e-4
    # 3. Self-Forcing DMD
    dmd_steps: int = 600
    dmd_batch: int = 4
    student_lr: float = 5e-5
    critic_lr: float = 2e-4
    guidance: float = 3.0              # audio CFG of the real score (v1-v3: 1.5)
    save_every: int = 100

    @classmethod
    def quick(cls) -> TrainConfig:
        """A few steps of everything on a handful of clips (tests, smoke runs)."""
        return cls(num_identities=12, train_identities=8, num_synth_speech=2, vae_steps=4, vae_batch=1, vae_long_from=2, vae_stream_steps=2,
                   vae_stream_batch=1, vae_stream_prefix=2, vae_stream_crop=16,
                   decoder_steps=4, stats_clips=4, latent_clips=4, dit_identities=4, teacher_steps=3, teacher_batch=2, causal_steps=2, dmd_steps=2,
                   dmd_batch=2, save_every=2)

    def model_config(self) -> LiveAvatarConfig:
        """The bundle trained here: the tiny architecture with a wider DiT (and VAE width ``vae_dim``)."""
        base = LiveAvatarConfig.tiny()
        dit = DiTConfig.tiny(dim=self.dit_dim, num_heads=self.dit_heads, ffn_dim=self.dit_ffn,
                             num_layers=self.dit_layers)
        return dataclasses.replace(base, dit=dit, vae=dataclasses.replace(base.vae, dim=self.vae_dim))

    @property
    def distills_decoder(self) -> bool:
        return self.decoder_dim > 0 and self.decoder_dim != self.vae_dim


def adamw(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def prompt_contexts(models: LiveAvatarModels) -> torch.Tensor:
    """Text-encoder outputs of :data:`PROMPTS`, zero padded to text_len: [P, text_len, text_dim]."""
    text_len = models.config.dit.text_len
    rows = []
    with torch.no_grad():
        for p in PROMPTS:
            c = models.text.encode_prompt(p)[:text_len].float()                   # [L, text_dim]
            rows.append(F.pad(c, (0, 0, 0, text_len - c.shape[0])))
    return torch.stack(rows)


@dataclass
class TrainReport:
    """What :func:`train_all` did: per-stage results and where the checkpoint went."""

    stages: dict[str, StageResult]
    checkpoint: Path
    seconds: float

    def summary(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "seconds": round(self.seconds, 1),
                "stages": {k: {"steps": r.steps, "resumed_from": r.resumed_from, "seconds": round(r.seconds, 1),
                               "first_loss": _first_last(r)[0], "last_loss": _first_last(r)[1]}
                           for k, r in self.stages.items()}}


def _first_last(r: StageResult) -> tuple[float | None, float | None]:
    key = "g_loss" if r.history and "g_loss" in r.history[0] else "loss"
    if not r.history:
        return None, None
    n = max(1, min(20, len(r.history) // 4))
    return round(r.mean(key, first=n), 5), round(r.mean(key, last=n), 5)


def train_all(cfg: TrainConfig, out_dir: str | Path, examples_dir: str | Path | None,
              checkpoint_dir: str | Path | None = None, progress: bool = True) -> TrainReport:
    """Run (or resume) every stage and write the checkpoint to ``checkpoint_dir`` (default out/checkpoint)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config()
    models = build_models(mcfg, seed=cfg.seed)
    train_ids, _ = identities_split(cfg.num_identities, cfg.train_identities)
    from models.training.speech import SpeechCorpus

    corpus = SpeechCorpus(out / "speech", Path(examples_dir) if examples_dir else None,
                          num_synth=cfg.num_synth_speech, seed=cfg.seed)
    speech = corpus.train_clips()
    results: dict[str, StageResult] = {}

    # 1. VAE (He init: see inflated_init_), then the latent statistics that normalise its latents for the DiT
    torch.manual_seed(cfg.seed)
    vae = inflated_init_(WanVAE(mcfg.vae)).train()
    vae_data = syn.SyntheticDataset(speech, train_ids, cfg.vae_frames, seed=cfg.seed + 11, size=cfg.size)
    vae_opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    long_data = syn.SyntheticDataset(speech, train_ids, cfg.vae_long_frames, seed=cfg.seed + 13, size=cfg.size)
    vae_stage = VAEStage(vae, vae_data, vae_opt, cfg.vae_batch, long_dataset=long_data, long_from=cfg.vae_long_from,
                         lr_after_warmup=cfg.vae_lr_clips, mouth_weight=cfg.vae_mouth_weight)
    results["vae"] = run_stage("vae", cfg.vae_steps, vae_stage,
                               {"vae": vae}, {"opt": vae_opt}, out, seed=cfg.seed + 1, save_every=cfg.save_every,
                               progress=progress)
    stream_frames = 1 + mcfg.vae.stride[0] * (cfg.vae_stream_prefix + cfg.vae_stream_chunks)
    stream_data = syn.SyntheticDataset(speech, train_ids, stream_frames, seed=cfg.seed + 14, size=cfg.size)
    stream_opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_stream_lr)
    stream_stage = VAEStreamStage(vae, stream_data, stream_opt, cfg.vae_stream_batch, chunks=cfg.vae_stream_chunks,
                                  max_prefix=cfg.vae_stream_prefix, crop=cfg.vae_stream_crop,
                                  mouth_weight=cfg.vae_mouth_weight)
    results["vae_stream"] = run_stage("vae_stream", cfg.vae_stream_steps, stream_stage, {"vae": vae},
                                      {"opt": stream_opt}, out, seed=cfg.seed + 5, save_every=cfg.save_every,
                                      progress=progress)
    mean, std = fit_latent_stats(vae, vae_data, cfg.stats_clips)
    vae_cfg = dataclasses.replace(mcfg.vae, latents_mean=tuple(mean), latents_std=tuple(std))
    mcfg = dataclasses.replace(mcfg, vae=vae_cfg)
    vae.config = vae_cfg
    vae.eval()
    # 1c. the narrower decoder (v5); the DiT stages below only see the (unchanged) encoder's latents
    decoded_by = vae
    if cfg.distills_decoder:
        decoded_by, results["decoder"] = distill_decoder(cfg, vae, speech, train_ids, out, progress)

    # latent dataset (cached; rebuilt when the VAE or the settings change)
    frames = 1 + cfg.clip_blocks * mcfg.dit.frames_per_block * mcfg.vae.stride[0]
    dit_ids = train_ids[:cfg.dit_identities]
    clip_data = syn.SyntheticDataset(speech, dit_ids, frames, seed=cfg.seed + 12, size=cfg.size)
    spec = LatentDatasetSpec(num_clips=cfg.latent_clips, blocks=cfg.clip_blocks, identities=tuple(dit_ids),
                             seed=cfg.seed + 12, size=cfg.size, vae_digest=vae_digest(vae))
    latents = load_latent_dataset(out / "latents.pt", spec)
    if latents is None:
        latents = build_latent_dataset(vae, clip_data, cfg.latent_clips, cfg.clip_blocks, mcfg.dit.motion_frames,
                                       mcfg.audio.block_samples, progress=progress)
        save_latent_dataset(latents, out / "latents.pt")
    contexts = prompt_contexts(models)
    shift = mcfg.scheduler.shift

    # 2a. bidirectional teacher, trained with the audio encoder
    teacher, audio = models.dit, models.audio
    t_opt = adamw(list(teacher.parameters()) + list(audio.parameters()), cfg.teacher_lr)
    results["teacher"] = run_stage(
        "teacher", cfg.teacher_steps,
        FlowMatchingStage(teacher, audio, latents, contexts, t_opt, cfg.teacher_batch, shift, causal=False,
                          train_audio=cfg.train_audio_encoder, seed=cfg.seed),
        {"dit": teacher, "audio": audio}, {"opt": t_opt}, out, seed=cfg.seed + 2, save_every=cfg.save_every,
        progress=progress)
    teacher.eval().requires_grad_(False)
    audio.eval().requires_grad_(False)

    # 2b. causal warm start of the student (block-causal flow matching from the teacher's weights)
    student = CausalWanS2V(mcfg.dit)
    student.load_state_dict(teacher.state_dict())
    s_opt = adamw(student.parameters(), cfg.causal_lr)
    results["causal"] = run_stage(
        "causal", cfg.causal_steps,
        FlowMatchingStage(student, audio, latents, contexts, s_opt, cfg.teacher_batch, shift, causal=True,
                          train_audio=False, seed=cfg.seed),
        {"student": student}, {"opt": s_opt}, out, seed=cfg.seed + 3, save_every=cfg.save_every, progress=progress)

    # 3. Self-Forcing DMD: student vs frozen teacher (real score) and a critic (fake score)
    critic = CausalWanS2V(mcfg.dit)
    critic.load_state_dict(teacher.state_dict())
    g_opt, c_opt = adamw(student.parameters(), cfg.student_lr), adamw(critic.parameters(), cfg.critic_lr)
    dmd = SelfForcingDMDStage(student, teacher, critic, audio, latents, contexts, g_opt, c_opt,
                              FlowMatchScheduler(mcfg.scheduler), cfg.dmd_batch, shift, guidance=cfg.guidance)
    results["dmd"] = run_stage("dmd", cfg.dmd_steps, dmd, {"student": student, "critic": critic},
                               {"g_opt": g_opt, "c_opt": c_opt}, out, seed=cfg.seed + 4,
                               save_every=cfg.save_every, progress=progress)

    # 4. the checkpoint: student + VAE + audio encoder + (random) text encoder
    student.eval()
    mcfg = dataclasses.replace(mcfg, vae=decoded_by.config)
    final = LiveAvatarModels(mcfg, student, decoded_by.eval(), audio, models.text, random_weights=False)
    ckpt = save_checkpoint(final, checkpoint_dir or out / "checkpoint")
    report = TrainReport(stages=results, checkpoint=Path(ckpt), seconds=time.perf_counter() - t0)
    (out / "train_report.json").write_text(json.dumps(report.summary(), indent=2))
    return report


def distill_decoder(cfg: TrainConfig, vae: WanVAE, speech, train_ids, out: Path,
                    progress: bool = True) -> tuple[WanVAE, StageResult]:
    """Stage 1c: a decoder of width ``cfg.decoder_dim`` distilled from ``vae``'s, on its encoder's
    latents (:class:`DecoderDistillStage`). Returns the new VAE (``vae``'s encoder, latent statistics
    and ``conv1``; the new ``conv2`` and decoder) and the stage's result."""
    vae.eval().requires_grad_(False)
    student = narrow_decoder_student(vae, cfg.decoder_dim, seed=cfg.seed + 15).train()
    clips = syn.SyntheticDataset(speech, train_ids, cfg.vae_long_frames, seed=cfg.seed + 16, size=cfg.size)
    stream_frames = 1 + vae.config.stride[0] * (cfg.vae_stream_prefix + cfg.vae_stream_chunks)
    stream = syn.SyntheticDataset(speech, train_ids, stream_frames, seed=cfg.seed + 17, size=cfg.size)
    params = list(student.conv2.parameters()) + list(student.decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.decoder_lr)
    stage = DecoderDistillStage(student, vae, clips, stream, opt, batch=cfg.vae_batch,
                                stream_batch=cfg.vae_stream_batch, chunks=cfg.vae_stream_chunks,
                                max_prefix=cfg.vae_stream_prefix, crop=cfg.vae_stream_crop,
                                mouth_weight=cfg.vae_mouth_weight, distill_weight=cfg.decoder_distill_weight,
                                image_steps=min(300, cfg.decoder_steps // 4), edge_weight=cfg.decoder_edge_weight,
                                sharp_weight=cfg.decoder_sharp_weight,
                                edge_from=min(cfg.decoder_edge_from, cfg.decoder_steps // 2))

    def step(i: int, gen: torch.Generator) -> dict[str, float]:
        lr = cfg.decoder_lr if i < stage.image_steps else cfg.decoder_lr_clips
        for group in opt.param_groups:
            group["lr"] = lr
        return stage(i, gen)

    result = run_stage("decoder", cfg.decoder_steps, step, {"student": student}, {"opt": opt}, out,
                       seed=cfg.seed + 6, save_every=cfg.save_every, progress=progress)
    return student.eval().requires_grad_(False), result


def train_decoder_from(cfg: TrainConfig, checkpoint: str | Path, out_dir: str | Path, examples_dir: str | Path | None,
                       checkpoint_dir: str | Path | None = None, progress: bool = True) -> TrainReport:
    """Stage 1c alone, on a trained bundle (``liveavatar train --decoder-from DIR``): the bundle with
    its VAE's decoder replaced by the distilled narrow one; everything else is copied unchanged.
    Gives the same decoder as :func:`train_all` does when ``checkpoint`` is that run's VAE."""
    if not cfg.distills_decoder:
        raise ValueError(f"decoder_dim={cfg.decoder_dim} distils nothing (vae_dim {cfg.vae_dim}); set decoder_dim")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = build_models(LiveAvatarConfig.load(checkpoint), checkpoint=checkpoint)
    if models.vae.config.decoder_dim not in (None, models.vae.config.dim):
        raise ValueError(f"{checkpoint}: its decoder is already narrowed (decoder_dim {models.vae.config.decoder_dim})")
    if models.vae.config.dim != cfg.vae_dim:
        raise ValueError(f"{checkpoint}: VAE width {models.vae.config.dim}, the recipe's vae_dim is {cfg.vae_dim}")
    train_ids, _ = identities_split(cfg.num_identities, cfg.train_identities)
    from models.training.speech import SpeechCorpus

    corpus = SpeechCorpus(out / "speech", Path(examples_dir) if examples_dir else None,
                          num_synth=cfg.num_synth_speech, seed=cfg.seed)
    vae, result = distill_decoder(cfg, models.vae.float(), corpus.train_clips(), train_ids, out, progress)
    mcfg = dataclasses.replace(models.config, vae=vae.config)
    final = LiveAvatarModels(mcfg, models.dit.eval(), vae, models.audio.eval(), models.text,
                             random_weights=False)
    ckpt = save_checkpoint(final, checkpoint_dir or out / "checkpoint")
    report = TrainReport(stages={"decoder": result}, checkpoint=Path(ckpt), seconds=time.perf_counter() - t0)
    (out / "train_report.json").write_text(json.dumps(report.summary(), indent=2))
    return report
