"""The three training stages, each one ``step_fn`` for :func:`models.training.loop.run_stage`.

1. :class:`VAEStage`: the tiny Wan VAE as an autoencoder of rendered frames and short clips, then
   :class:`VAEStreamStage`: the same VAE in the streaming steady state (long cache-filling prefixes,
   truncated backprop through the causal caches).
2. :class:`FlowMatchingStage`: a DiT trained with flow matching on cached latents, with audio
   injection and the reference + motion sink. ``causal=False`` is the bidirectional teacher (every
   noisy frame sees every other); ``causal=True`` is the block-causal warm start of the student.
   The audio encoder (wav2vec2) can be trained with it.
3. :class:`SelfForcingDMDStage`: the causal 4-step student rolls out block by block with its own
   KV caches and timestep forcing (the inference code path, :meth:`LiveAvatarGenerator.denoise_step`'s
   math), one randomly chosen denoising step per rollout carrying gradients. The frozen teacher is
   the real score, a trainable critic (initialised from the teacher) is the fake score; the student
   follows the DMD gradient ``x0_fake - x0_real`` and the critic learns flow matching on the
   student's samples.

Conventions (those of :mod:`models.scheduler`): ``x_sigma = (1 - sigma) x0 + sigma * noise``, the
model predicts ``v = noise - x0`` at timestep ``t = 1000 * sigma``, so ``x0 = x_sigma - sigma * v``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.audio_encoder import Wav2VecAudioEncoder, encode_blocks_batch
from models.dit import CausalWanS2V, draw_sink_lead
from models.kv_cache import KVCache, SinkCache
from models.scheduler import FlowMatchScheduler, shift_sigma
from models.training import synthetic as syn
from models.training.data import LatentDataset, sample_indices, to_pixels
from models.vae import WanVAE

# ---------------------------------------------------------------------------------------------
# 1. VAE
# ---------------------------------------------------------------------------------------------


def reconstruction_losses(recon: Tensor, x: Tensor, mouth: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MSE, L1, L1 of frame differences (the moving parts: mouth, eyes; 0 for single frames), and
    the MSE inside the mouth mask ``mouth`` [B, T, H, W] (0 without one) between ``recon`` and
    ``x`` [B, 3, T, H, W].

    The mouth covers about 4 % of a frame, so in the frame means its error is a small part of the
    loss; the mouth term is the mean over the mouth's pixels alone."""
    mse = (recon - x).square().mean()
    l1 = (recon - x).abs().mean()
    motion = torch.zeros(())
    if x.shape[2] > 1:
        motion = ((recon[:, :, 1:] - recon[:, :, :-1]) - (x[:, :, 1:] - x[:, :, :-1])).abs().mean()
    mouth_mse = torch.zeros(())
    if mouth is not None:
        m = mouth.unsqueeze(1)                                                     # [B, 1, T, H, W]
        mouth_mse = ((recon - x).square() * m).sum() / (m.sum() * x.shape[1]).clamp_min(1.0)
    return mse, l1, motion, mouth_mse


def mouth_masks(samples: list[syn.ClipSample], frames: slice = slice(None), rows: list[slice] | None = None,
                cols: list[slice] | None = None) -> Tensor:
    """The samples' mouth masks, cut like their frames: float32 [B, T, H, W]."""
    out = []
    for k, s in enumerate(samples):
        m = s.mouth[frames]
        if rows is not None and cols is not None:
            m = m[:, rows[k], cols[k]]
        out.append(m)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def inflated_init_(vae: WanVAE) -> WanVAE:
    """Initialise ``vae`` as a frame-by-frame image autoencoder ("inflation"), in place.

    1. Every convolution gets He init (Kaiming normal, ReLU gain, fan-in of the taps that see the
       current frame). At the tiny width (8-32 channels) PyTorch's default conv init (3-6x smaller)
       leaves the residual branches too weak for the colour to survive the VAE's channel RMSNorms:
       the network cannot even fit 8 constant colours and sits on a grey plateau for ~1,500 steps.
    2. Temporal taps that look into the past start at zero, so each causal 3x3x3 conv is a per-frame
       3x3 conv; the temporal downsamplers start by keeping the latest frame of each pair, the
       upsamplers by repeating each frame (identity weights).
    So at step 0 a streamed chunk, whatever is in the caches, is coded like the single first frame,
    and training a clip does not first wreck what image steps taught: the shared weights start
    consistent and the past taps learn only the motion. (Without step 2, the first clip steps after
    an image warm-up throw the image error from 0.15 back to 0.39: ``bench/vae_recipe_bench.py``.)
    The attention output projections stay zero (each attention block starts as the identity);
    other biases keep their default init.
    """
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, nn.Conv2d) and not name.endswith(".proj"):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.Conv3d):
                w = module.weight                                                  # [out, in, kt, kh, kw]
                now = torch.empty_like(w[:, :, -1])
                if name.endswith("time_conv"):                                     # (3,1,1) resampler
                    out, inp = w.shape[:2]
                    now = torch.eye(inp).repeat(out // inp, 1).view(out, inp, 1, 1)
                    module.bias.zero_()                    # the first frame bypasses it: no offset
                else:
                    nn.init.kaiming_normal_(now, nonlinearity="relu")
                w.zero_()
                w[:, :, -1] = now
    return vae


@dataclass
class VAEStage:
    """One step of the VAE as a plain autoencoder with latent noise.

    The first ``image_steps`` steps reconstruct ``image_batch`` single frames with MSE alone (the
    first-frame path, cheap: the appearance is learnt here; this narrow network otherwise sits on a
    grey plateau for a long time). After that, even steps keep doing that and odd steps
    reconstruct ``batch`` clips of ``dataset.num_frames`` (1 + 4k) frames (the temporal
    down/up-sampling path that streaming uses). From step ``long_from`` on, clip steps use
    ``long_dataset`` (longer clips): only a clip of two or more 4-frame chunks shows the decoder the
    steady state that streaming runs in (a chunk decoded with the previous chunk in its caches).
    Loss = MSE + 0.1 * L1 + ``motion_weight`` * L1 of frame differences (moving parts: mouth, eyes).
    No gradient clipping: with it this narrow network sits for ~1000 steps on a grey plateau.
    ``lr_after_warmup`` lowers Adam's learning rate when the clip steps, the latent noise and the
    extra loss terms start: at the warm-up's rate that switch throws the image error from 0.10 back
    to 0.26 (the past temporal taps have no gradient history in Adam); at a quarter of it the error
    keeps falling (``bench/vae_recipe_bench.py``).
    The latent is the posterior mean plus Gaussian noise of ``latent_noise`` times its (detached)
    std, so the decoder tolerates the DiT's small errors; there is no KL term (a simplification:
    the latent scale is fixed afterwards by :func:`fit_latent_stats`).
    """

    vae: WanVAE
    dataset: syn.SyntheticDataset       # clips of 1 + 4k frames
    optimizer: torch.optim.Optimizer
    batch: int
    image_batch: int = 8
    image_steps: int = 600
    long_dataset: syn.SyntheticDataset | None = None
    long_from: int = 0
    latent_noise: float = 0.05
    motion_weight: float = 1.0
    lr_after_warmup: float | None = None
    mouth_weight: float = 0.0

    def __call__(self, step: int, gen: torch.Generator) -> dict[str, float]:
        warmup = step < self.image_steps
        if not warmup and self.lr_after_warmup is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_after_warmup
        images = warmup or step % 2 == 0
        n = self.image_batch if images else self.batch
        idx = torch.randint(0, len(self.dataset), (n,), generator=gen).tolist()
        if images:   # one random frame of each clip                                [B, 1, H, W, 3]
            pick = torch.randint(0, self.dataset.num_frames, (n,), generator=gen).tolist()
            samples = [self.dataset.get(i, slice(k, k + 1)) for i, k in zip(idx, pick, strict=True)]
            x = to_pixels(np.stack([s.frames for s in samples]))
            mouth = mouth_masks(samples)                                         # [B, 1, H, W]
        else:
            data = self.long_dataset if self.long_dataset is not None and step >= self.long_from else self.dataset
            samples = [data[i] for i in idx]
            x = to_pixels(np.stack([s.frames for s in samples]))                 # [B, 3, T, H, W]
            mouth = mouth_masks(samples)                                         # [B, T, H, W]
        vae = self.vae
        # 1. posterior mean plus relative noise                                    [B, z, n, h, w]
        mu = vae.conv1(vae.encoder(x))[:, :vae.config.z_dim]
        noise = 0.0 if warmup else self.latent_noise
        z = mu + noise * mu.detach().std() * torch.randn(mu.shape, generator=gen)
        # 2. decode the raw latent (no normalisation: the stats are fitted after training)
        recon = vae.decoder(vae.conv2(z))                                        # [B, 3, T, H, W]
        # 3. losses
        mse, l1, motion, mouth_mse = reconstruction_losses(recon, x, mouth)
        loss = mse if warmup else mse + 0.1 * l1 + self.motion_weight * motion
        loss = loss + self.mouth_weight * mouth_mse
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "motion": motion.item(),
                "mouth": mouth_mse.item(), "images": float(images)}


@dataclass
class VAEStreamStage:
    """The VAE in the streaming steady state: truncated backprop through the causal caches.

    Streaming encodes and decodes chunk after chunk for hours, so every layer's temporal cache
    holds real history. Clips of a few chunks never show that state: a VAE trained on them drifts
    from about the sixth chunk on (the colours invert). Each step here:

    1. draws ``batch`` clips, a prefix length ``p`` in ``[0, max_prefix]`` chunks (4 frames each)
       and a random ``crop`` x ``crop`` window (the temporal behaviour is what is learnt; crops make
       long clips cheap);
    2. without gradients, encodes the first ``1 + 4p`` frames and decodes their (noised) latents,
       which fills the encoder's and the decoder's caches exactly as streaming does;
    3. with gradients, encodes and decodes the next ``chunks`` chunks through those caches, and takes
       the reconstruction loss on them alone (for ``p = 0`` this is an ordinary short clip).
    ``dataset.num_frames`` must be at least ``1 + 4 * (max_prefix + chunks)``.
    """

    vae: WanVAE
    dataset: syn.SyntheticDataset
    optimizer: torch.optim.Optimizer
    batch: int
    chunks: int = 2
    max_prefix: int = 12
    crop: int = 32
    latent_noise: float = 0.05
    motion_weight: float = 1.0
    mouth_weight: float = 0.0

    def __post_init__(self) -> None:
        st = self.vae.config.stride[0]
        if self.dataset.num_frames < 1 + st * (self.max_prefix + self.chunks):
            raise ValueError(f"VAEStreamStage: clips of {self.dataset.num_frames} frames are shorter than "
                             f"1 + {st} * (max_prefix + chunks) = {1 + st * (self.max_prefix + self.chunks)}")
        if self.crop % self.vae.config.stride[1] or not 0 < self.crop <= self.dataset.size:
            raise ValueError(f"VAEStreamStage: crop {self.crop} must be a multiple of {self.vae.config.stride[1]} "
                             f"in (0, {self.dataset.size}]")

    def _noised(self, mu: Tensor, gen: torch.Generator) -> Tensor:
        return mu + self.latent_noise * mu.detach().std() * torch.randn(mu.shape, generator=gen)

    def reconstruct(self, x: Tensor, prefix: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Steps 2-3 for a clip ``x`` [B, 3, 1 + 4(prefix + chunks), H, W]: (reconstruction, target) of
        the frames after the first ``prefix`` chunks, both [B, 3, T', H, W]."""
        vae, st, z_dim = self.vae, self.vae.config.stride[0], self.vae.config.z_dim
        enc_caches: list = [None] * vae.num_encoder_caches
        dec_caches: list = [None] * vae.num_decoder_caches
        split = 1 + st * prefix if prefix else 0
        # 2. fill the caches with the prefix
        if prefix:
            with torch.no_grad():
                mu = vae.conv1(vae.encoder(x[:, :, :split], enc_caches, True))[:, :z_dim]
                vae.decoder(vae.conv2(self._noised(mu, gen)), dec_caches, True)
        # 3. the graded chunks, through the filled caches
        target = x[:, :, split:]
        mu = vae.conv1(vae.encoder(target, enc_caches, prefix == 0))[:, :z_dim]
        return vae.decoder(vae.conv2(self._noised(mu, gen)), dec_caches, prefix == 0), target

    def __call__(self, step: int, gen: torch.Generator) -> dict[str, float]:
        st = self.vae.config.stride[0]
        # 1. clips, prefix length, crop windows                                      [B, 3, T, c, c]
        idx = torch.randint(0, len(self.dataset), (self.batch,), generator=gen).tolist()
        prefix = int(torch.randint(0, self.max_prefix + 1, (1,), generator=gen))
        frames = 1 + st * (prefix + self.chunks)
        corners = torch.randint(0, self.dataset.size - self.crop + 1, (self.batch, 2), generator=gen).tolist()
        samples = [self.dataset.get(i, slice(0, frames)) for i in idx]             # only the frames used
        rows = [slice(r, r + self.crop) for r, _ in corners]
        cols = [slice(c, c + self.crop) for _, c in corners]
        x = to_pixels(np.stack([s.frames[:, r, c] for s, r, c in zip(samples, rows, cols, strict=True)]))
        recon, target = self.reconstruct(x, prefix, gen)
        split = frames - target.shape[2]
        mouth = mouth_masks(samples, slice(split, frames), rows, cols)             # [B, T', c, c]
        mse, l1, motion, mouth_mse = reconstruction_losses(recon, target, mouth)
        loss = mse + 0.1 * l1 + self.motion_weight * motion + self.mouth_weight * mouth_mse
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "motion": motion.item(),
                "mouth": mouth_mse.item(), "prefix": float(prefix)}


@dataclass
class DecoderDistillStage:
    """A narrower decoder for a trained VAE: distilled from its decoder, on its encoder's latents.

    The encoder (and ``conv1``) of ``student`` are copies of ``teacher``'s and stay frozen, so the
    latent space, its statistics and the DiT trained on it do not change; only ``student.conv2`` and
    ``student.decoder`` (of width ``decoder_dim``) learn. Each step decodes the same noised latent
    with both decoders and grades the student against the ground-truth frames (the VAE losses,
    mouth-weighted) plus ``distill_weight`` times the MSE to the teacher's frames (whole frame and
    inside the mouth). Three kinds of step, like the VAE stages that trained the teacher:

    - the first ``image_steps``: ``image_batch`` single frames (the first-frame path);
    - then even steps: ``batch`` whole clips of ``dataset.num_frames`` frames from an empty cache;
    - odd steps: the streaming steady state of :class:`VAEStreamStage` (a cache-filling prefix of
      0..``max_prefix`` chunks without gradients, then ``chunks`` graded chunks, ``crop`` x ``crop``).
    """

    student: WanVAE
    teacher: WanVAE
    dataset: syn.SyntheticDataset          # whole clips (1 + 4k frames)
    stream_dataset: syn.SyntheticDataset   # at least 1 + 4 (max_prefix + chunks) frames
    optimizer: torch.optim.Optimizer
    batch: int = 2
    image_batch: int = 8
    image_steps: int = 300
    stream_batch: int = 4
    chunks: int = 2
    max_prefix: int = 12
    crop: int = 32
    latent_noise: float = 0.05
    motion_weight: float = 1.0
    mouth_weight: float = 1.0
    distill_weight: float = 1.0
    edge_weight: float = 0.0               # from step ``edge_from``: the MSE of the frames' Laplacians to the truth's
    edge_from: int = 0
    sharp_weight: float = 0.0              # from step ``edge_from``: the frames' Laplacian energy matched to the truth's

    def __post_init__(self) -> None:
        st = self.student.config.stride[0]
        if self.stream_dataset.num_frames < 1 + st * (self.max_prefix + self.chunks):
            raise ValueError(f"DecoderDistillStage: stream clips of {self.stream_dataset.num_frames} frames are "
                             f"shorter than 1 + {st} * (max_prefix + chunks)")
        for a, b in ((self.student.encoder, self.teacher.encoder), (self.student.conv1, self.teacher.conv1)):
            for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
                if not torch.equal(p, q):
                    raise ValueError(f"DecoderDistillStage: the student's encoder differs from the teacher's ({name})")
        self.student.encoder.requires_grad_(False)
        self.student.conv1.requires_grad_(False)
        self.teacher.eval().requires_grad_(False)

    def _latent(self, x: Tensor, caches: list | None, first: bool, gen: torch.Generator, noise: float) -> Tensor:
        mu = self.teacher.conv1(self.teacher.encoder(x, caches, first))[:, :self.teacher.config.z_dim]
        return mu + noise * mu.std() * torch.randn(mu.shape, generator=gen)        # [B, z, n, h, w]

    def _clips(self, data: syn.SyntheticDataset, n: int, frames: slice, gen: torch.Generator,
               crop: int | None = None) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(data), (n,), generator=gen).tolist()
        samples = [data.get(i, frames) for i in idx]
        if crop is None:
            rows = cols = None
            x = to_pixels(np.stack([s.frames for s in samples]))                   # [B, 3, T, H, W]
        else:
            corners = torch.randint(0, data.size - crop + 1, (n, 2), generator=gen).tolist()
            rows = [slice(r, r + crop) for r, _ in corners]
            cols = [slice(c, c + crop) for _, c in corners]
            x = to_pixels(np.stack([s.frames[:, r, c] for s, r, c in zip(samples, rows, cols, strict=True)]))
        return x, mouth_masks(samples, slice(None), rows, cols)                    # ..., [B, T, H, W]

    def __call__(self, step: int, gen: torch.Generator) -> dict[str, float]:
        student, teacher, st = self.student, self.teacher, self.student.config.stride[0]
        warmup = step < self.image_steps
        stream = not warmup and step % 2 == 1
        prefix = 0
        with torch.no_grad():
            if warmup:   # one random frame per clip                                   [B, 3, 1, H, W]
                k = int(torch.randint(0, self.dataset.num_frames, (1,), generator=gen))
                x, mouth = self._clips(self.dataset, self.image_batch, slice(k, k + 1), gen)
            elif not stream:
                x, mouth = self._clips(self.dataset, self.batch, slice(None), gen)
            else:
                prefix = int(torch.randint(0, self.max_prefix + 1, (1,), generator=gen))
                frames = 1 + st * (prefix + self.chunks)
                x, mouth = self._clips(self.stream_dataset, self.stream_batch, slice(0, frames), gen, self.crop)
            enc: list = [None] * teacher.num_encoder_caches
            dec_t: list = [None] * teacher.num_decoder_caches
            dec_s: list = [None] * student.num_decoder_caches
            split = 1 + st * prefix if prefix else 0
            noise = 0.0 if warmup else self.latent_noise
            if prefix:   # fill all three caches with the prefix, as streaming does
                z = self._latent(x[:, :, :split], enc, True, gen, noise)
                teacher.decoder(teacher.conv2(z), dec_t, True)
                student.decoder(student.conv2(z), dec_s, True)
            target, mouth = x[:, :, split:], mouth[:, split:]
            z = self._latent(target, enc, prefix == 0, gen, noise)
            ref = teacher.decoder(teacher.conv2(z), dec_t, prefix == 0)             # [B, 3, T', H, W]
        recon = student.decoder(student.conv2(z), dec_s, prefix == 0)
        mse, l1, motion, mouth_mse = reconstruction_losses(recon, target, mouth)
        d_mse, _, _, d_mouth = reconstruction_losses(recon, ref, mouth)
        loss = mse + 0.1 * l1 + self.motion_weight * motion + self.mouth_weight * mouth_mse
        loss = loss + self.distill_weight * (d_mse + self.mouth_weight * d_mouth)
        edge = torch.zeros(())
        if self.edge_weight and step >= self.edge_from:   # the distilled MSE alone blurs: keep the truth's edges
            edge = F.mse_loss(laplacian(recon), laplacian(target))
            loss = loss + self.edge_weight * edge
        sharp = torch.zeros(())
        if self.sharp_weight and step >= self.edge_from:   # MSE-type losses pull to the blurry mean: match the energy
            sharp = laplacian_energy_gap(recon, target)
            loss = loss + self.sharp_weight * sharp
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "mse": mse.item(), "mouth": mouth_mse.item(), "distill": d_mse.item(),
                "distill_mouth": d_mouth.item(), "edge": edge.item(), "sharp": sharp.item(), "prefix": float(prefix), "stream": float(stream)}


def laplacian(video: Tensor) -> Tensor:
    """The 2-D Laplacian of every frame and channel (zero padding): [B, C, T, H, W] -> the same shape."""
    b, c, t, h, w = video.shape
    kernel = video.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * t * c, 1, h, w)
    return F.conv2d(frames, kernel, padding=1).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def laplacian_energy_gap(recon: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """The squared log-ratio of the frames' Laplacian energies, per clip and frame, averaged:
    0 when ``recon`` has exactly ``target``'s edge energy whatever its edges' positions.
    [B, C, T, H, W] x2 -> scalar. Unlike an MSE it does not favour the blur of an uncertain mean."""
    e_r = laplacian(recon).pow(2).mean(dim=(1, 3, 4))                              # [B, T]
    e_t = laplacian(target).pow(2).mean(dim=(1, 3, 4))                             # [B, T]
    return (torch.log(e_r + eps) - torch.log(e_t + eps)).pow(2).mean()


def narrow_decoder_student(teacher: WanVAE, decoder_dim: int, seed: int) -> WanVAE:
    """A VAE with ``teacher``'s encoder (copied) and a fresh, inflation-initialised decoder of base
    width ``decoder_dim`` (:class:`DecoderDistillStage` trains it)."""
    cfg = dataclasses.replace(teacher.config, decoder_dim=decoder_dim)
    torch.manual_seed(seed)
    student = inflated_init_(WanVAE(cfg))
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    student.conv1.load_state_dict(teacher.conv1.state_dict())
    student.conv2.load_state_dict(teacher.conv2.state_dict())
    return student


@torch.no_grad()
def fit_latent_stats(vae: WanVAE, dataset: syn.SyntheticDataset, clips: int, batch: int = 8) -> tuple[list[float],
                                                                                                    list[float]]:
    """Per-channel mean and std of the raw posterior mean over ``clips`` clips (the VAE's
    ``latents_mean``/``latents_std``, so that normalised latents are ~N(0, 1) for the DiT)."""
    z_dim, sums, sq, count = vae.config.z_dim, 0.0, 0.0, 0
    for start in range(0, clips, batch):
        x = to_pixels(np.stack([dataset[i].frames for i in range(start, min(clips, start + batch))]))
        mu = vae.conv1(vae.encoder(x))[:, :z_dim].double()                     # [b, z, n, h, w]
        sums = sums + mu.sum(dim=(0, 2, 3, 4))
        sq = sq + mu.square().sum(dim=(0, 2, 3, 4))
        count += mu.numel() // z_dim
    mean = sums / count
    std = (sq / count - mean.square()).clamp_min(1e-8).sqrt()
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------------------------
# Shared DiT helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTBatch:
    """Conditioning (and, for flow matching, clean latents) of a batch of clips."""

    x0: Tensor          # [B, C, F, h, w] clean latents
    ref: Tensor         # [B, C, 1, h, w]
    motion: Tensor      # [B, C, Fm, h, w]
    pcm: Tensor         # [B, blocks, block_samples]
    context: Tensor     # [B, text_len, text_dim] text-encoder output, zero padded


def draw_batch(data: LatentDataset, contexts: Tensor, batch: int, gen: torch.Generator) -> DiTBatch:
    """Random clips of the latent dataset with a random prompt each (``contexts`` [P, text_len, text_dim])."""
    idx = sample_indices(len(data), batch, gen)
    ref, motion = data.cond(idx)
    prompts = torch.randint(0, contexts.shape[0], (len(idx),), generator=gen)
    return DiTBatch(x0=data.latents[idx], ref=ref, motion=motion, pcm=data.pcm[idx], context=contexts[prompts])


def audio_features(encoder: Wav2VecAudioEncoder, pcm: Tensor) -> Tensor:
    """[B, blocks, block_samples] -> [B, L, C, blocks * block_frames] (each block encoded alone)."""
    b, n, s = pcm.shape
    feats = encode_blocks_batch(encoder, pcm.reshape(b * n, s))                   # [B*n, L, C, 12]
    _, layers, c, f = feats.shape
    return feats.view(b, n, layers, c, f).permute(0, 2, 3, 1, 4).reshape(b, layers, c, n * f)


def sample_sigma(n: int, shift: float, gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Noise levels for training: uniform u in [lo, hi], shifted like the sampling schedule. [n]"""
    u = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.tensor([shift_sigma(float(v), shift) for v in u], dtype=torch.float32)


def block_ref_times(dit: CausalWanS2V, frame_start: int, blocks: int, seed: int, step: int) -> list[int]:
    """The rolling sink's ref RoPE time for each block of a clip starting at ``frame_start`` (seeded draw)."""
    fpb = dit.config.frames_per_block
    return [dit.sink_ref_time(frame_start + k * fpb, draw_sink_lead(seed, frame_start + k * fpb, step, dit.config))
            for k in range(blocks)]


def make_sink(dit: CausalWanS2V, ref: Tensor, motion: Tensor, text_emb: Tensor, grad: bool) -> SinkCache:
    """Prefill a sink for a batch; ``grad`` keeps the autograd graph (the cond path trains)."""
    sink = SinkCache.allocate(dit.config, ref.shape[0], tuple(ref.shape[-2:]), device=dit.device, dtype=dit.dtype)
    sink.keep_grad = grad
    if grad:
        dit.prefill_sink(ref, motion, text_emb, sink)
    else:
        with torch.no_grad():
            dit.prefill_sink(ref, motion, text_emb, sink)
    return sink


# ---------------------------------------------------------------------------------------------
# 2. Flow matching (teacher, causal warm start, DMD critic)
# ---------------------------------------------------------------------------------------------


def flow_matching_loss(dit: CausalWanS2V, x0: Tensor, audio: Tensor, context: Tensor, ref: Tensor, motion: Tensor,
                       sigma: Tensor, noise: Tensor, frame_start: int, ref_times: list[int], causal: bool) -> Tensor:
    """MSE between the predicted velocity and ``noise - x0`` at noise levels ``sigma`` [B]."""
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise                                             # [B, C, F, h, w]
    text_emb = dit.embed_text(context)
    sink = make_sink(dit, ref, motion, text_emb, grad=True)
    v = dit.forward_full(x_t, sigma * 1000.0, audio, text_emb, sink, ref_time=ref_times, frame_start=frame_start,
                         causal=causal)
    return F.mse_loss(v, noise - x0)


@dataclass
class FlowMatchingStage:
    """One flow-matching step of a DiT (and optionally the audio encoder) on the latent dataset.

    ``audio_dropout``: probability of zeroing a clip's audio features, so the teacher also learns the
    audio-free velocity that classifier-free guidance on audio needs. ``max_frame_start``: clips are
    placed at a random block-aligned start in [0, max_frame_start] (long streams see large positions).
    """

    dit: CausalWanS2V
    audio: Wav2VecAudioEncoder
    data: LatentDataset
    contexts: Tensor
    optimizer: torch.optim.Optimizer
    batch: int
    shift: float
    causal: bool
    train_audio: bool
    seed: int
    audio_dropout: float = 0.1
    max_frame_start: int = 192

    def __post_init__(self) -> None:
        # the encoder is built frozen (inference); training it needs its gradients back
        self.audio.requires_grad_(self.train_audio)

    def __call__(self, step: int, gen: torch.Generator) -> dict[str, float]:
        b = draw_batch(self.data, self.contexts, self.batch, gen)
        fpb = self.dit.config.frames_per_block
        n_blocks = b.x0.shape[2] // fpb
        # 1. audio features (with grad when the encoder trains), some dropped   [B, L, C, 4F]
        with torch.set_grad_enabled(self.train_audio):
            audio = audio_features(self.audio, b.pcm)
        keep = (torch.rand(audio.shape[0], generator=gen) >= self.audio_dropout).float().view(-1, 1, 1, 1)
        audio = audio * keep
        # 2. noise level, noise, placement in the stream
        sigma = sample_sigma(b.x0.shape[0], self.shift, gen)
        noise = torch.randn(b.x0.shape, generator=gen)
        frame_start = fpb * int(torch.randint(0, self.max_frame_start // fpb + 1, (1,), generator=gen))
        ref_times = block_ref_times(self.dit, frame_start, n_blocks, self.seed + step, 0)
        # 3. loss and update
        loss = flow_matching_loss(self.dit, b.x0, audio, b.context, b.ref, b.motion, sigma, noise, frame_start,
                                  ref_times, self.causal)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.optimizer.step()
        return {"loss": loss.item(), "grad_norm": float(gnorm)}


# ---------------------------------------------------------------------------------------------
# 3. Self-Forcing DMD
# ---------------------------------------------------------------------------------------------


def rollout(student: CausalWanS2V, scheduler: FlowMatchScheduler, audio: Tensor, text_emb: Tensor, sink: SinkCache,
            noise: Tensor, exit_step: int, lead_seed: int = 0) -> Tensor:
    """Student self-rollout of ``noise`` [B, C, F, h, w] (F = blocks * 3), block by block.

    Every block runs every denoising step with that step's own KV cache (timestep forcing, as at
    inference). Step ``exit_step`` runs with gradients; its x0 prediction ``x - sigma * v`` is the
    block's output. The other steps run without gradients and continue the Euler chain so that the
    later steps' caches hold what inference would put there. Returns [B, C, F, h, w] (with grad).
    """
    cfg = student.config
    fpb, steps = cfg.frames_per_block, scheduler.num_steps
    b, _, f, h, w = noise.shape
    kv = [KVCache.allocate(cfg, b, (h, w), device=student.device, dtype=student.dtype) for _ in range(steps)]
    outputs = []
    for k in range(f // fpb):
        x = noise[:, :, k * fpb:(k + 1) * fpb]
        frame_start = k * fpb
        block_audio = audio[..., 4 * frame_start: 4 * (frame_start + fpb)]
        out = None
        for i in range(steps):
            t = torch.full((b,), scheduler.timestep(i), dtype=torch.float32)
            ref_time = student.sink_ref_time(frame_start, draw_sink_lead(lead_seed, frame_start, i, cfg))
            with torch.set_grad_enabled(i == exit_step):
                v = student.forward_block(x, t, block_audio, text_emb, kv[i], sink, frame_start=frame_start,
                                          ref_time=ref_time)
            if i == exit_step:
                out = x - scheduler.sigmas[i] * v                                  # x0 prediction, with grad
            x = scheduler.step(x, v.detach(), i)
        outputs.append(out)
    return torch.cat(outputs, dim=2)


@dataclass
class SelfForcingDMDStage:
    """One generator step (DMD) and ``critic_steps`` critic steps (flow matching on student samples)."""

    student: CausalWanS2V
    teacher: CausalWanS2V
    critic: CausalWanS2V
    audio: Wav2VecAudioEncoder
    data: LatentDataset
    contexts: Tensor
    student_opt: torch.optim.Optimizer
    critic_opt: torch.optim.Optimizer
    scheduler: FlowMatchScheduler
    batch: int
    shift: float
    guidance: float = 1.5           # audio CFG of the real score (1 = none)
    critic_steps: int = 1
    sigma_range: tuple[float, float] = (0.02, 0.98)

    def _scores(self, x_t: Tensor, sigma: Tensor, audio: Tensor, b: DiTBatch, ref_times: list[int]
                ) -> tuple[Tensor, Tensor]:
        """x0 predictions of the real (teacher, audio-guided) and fake (critic) scores, no grad."""
        s = sigma.view(-1, 1, 1, 1, 1)
        with torch.no_grad():
            def x0_fn(dit: CausalWanS2V):
                """The network's x0 prediction as a function of the audio (text and sink computed once)."""
                text_emb = dit.embed_text(b.context)
                sink = make_sink(dit, b.ref, b.motion, text_emb, grad=False)

                def x0(feats: Tensor) -> Tensor:
                    v = dit.forward_full(x_t, sigma * 1000.0, feats, text_emb, sink, ref_time=ref_times,
                                         causal=False)
                    return x_t - s * v
                return x0
            teacher = x0_fn(self.teacher)
            real = teacher(audio)
            if self.guidance != 1.0:
                uncond = teacher(torch.zeros_like(audio))
                real = uncond + self.guidance * (real - uncond)
            fake = x0_fn(self.critic)(audio)
        return real, fake

    def __call__(self, step: int, gen: torch.Generator) -> dict[str, float]:
        b = draw_batch(self.data, self.contexts, self.batch, gen)
        cfg = self.student.config
        n_blocks = b.x0.shape[2] // cfg.frames_per_block
        with torch.no_grad():
            audio = audio_features(self.audio, b.pcm)                             # [B, L, C, 4F]
        ref_times = block_ref_times(self.student, 0, n_blocks, step, 0)
        # 1. student rollout with gradients through one denoising step
        exit_step = int(torch.randint(0, self.scheduler.num_steps, (1,), generator=gen))
        text_emb = self.student.embed_text(b.context)
        sink = make_sink(self.student, b.ref, b.motion, text_emb, grad=True)
        noise = torch.randn(b.x0.shape, generator=gen)
        x_gen = rollout(self.student, self.scheduler, audio, text_emb, sink, noise, exit_step, lead_seed=step)
        # 2. DMD: diffuse the sample, compare the real and fake x0 predictions
        sigma = sample_sigma(x_gen.shape[0], self.shift, gen, *self.sigma_range)
        s = sigma.view(-1, 1, 1, 1, 1)
        eps = torch.randn(x_gen.shape, generator=gen)
        x_t = (1.0 - s) * x_gen.detach() + s * eps
        real, fake = self._scores(x_t, sigma, audio, b, ref_times)
        norm = (x_gen.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        grad = (fake - real) / norm
        target = (x_gen - grad).detach()
        g_loss = 0.5 * F.mse_loss(x_gen, target)
        self.student_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.student_opt.step()
        # 3. critic: flow matching on the (detached) student samples
        c_loss = torch.zeros(())
        for _ in range(self.critic_steps):
            sig = sample_sigma(x_gen.shape[0], self.shift, gen)
            nz = torch.randn(x_gen.shape, generator=gen)
            c_loss = flow_matching_loss(self.critic, x_gen.detach(), audio, b.context, b.ref, b.motion, sig, nz, 0,
                                        ref_times, causal=False)
            self.critic_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 1.0)
            self.critic_opt.step()
        with torch.no_grad():
            dmd_gap = (fake - real).square().mean()
        return {"g_loss": g_loss.item(), "critic_loss": c_loss.item(), "dmd_gap": dmd_gap.item(),
                "g_grad_norm": float(g_norm), "exit_step": float(exit_step)}

