"""Training data as tensors: pixel clips for the VAE, a cached latent dataset for the DiTs.

The synthetic renderer (:mod:`models.training.synthetic`) gives uint8 frames and 16 kHz speech;
this module turns them into what the networks eat, exactly as inference prepares its inputs:

- pixels ``[B, 3, T, H, W]`` in [-1, 1] (``x / 127.5 - 1``, like ``prepare_reference``);
- the reference latent = VAE encode of the reference image, the motion latents = VAE encode of the
  reference repeated ``motion_frames`` times (what :func:`pipeline_stages.sink.encode_sink` does);
- clip latents: encode ``1 + 4 * F`` frames and drop latent 0, so each kept latent covers 4 frames
  like a streamed block's latents after the decoder's warm-up;
- audio: the clip's PCM cut into ``block_samples`` blocks (one per 3-latent block), each encoded
  alone, like the streaming audio encoder.

:class:`LatentDataset` is computed once with the trained VAE and cached to one ``.pt`` file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.training import synthetic as syn
from models.vae import WanVAE


def to_pixels(frames: np.ndarray) -> Tensor:
    """uint8 ``[B, T, H, W, 3]`` (or ``[T, H, W, 3]``) -> float32 ``[B, 3, T, H, W]`` in [-1, 1]."""
    if frames.ndim == 4:
        frames = frames[None]
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [B, T, H, W, 3], got {frames.dtype} {frames.shape}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def to_uint8(video: Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, 3]``."""
    x = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


@dataclass(frozen=True)
class LatentDatasetSpec:
    """What a latent dataset holds (its cache key)."""

    num_clips: int
    blocks: int                  # 3-latent blocks per clip
    identities: tuple[int, ...]  # the identities clips are drawn from
    seed: int
    size: int
    vae_digest: str              # hash of the VAE weights that encoded it


@dataclass
class LatentDataset:
    """Clips as DiT training inputs (all on CPU, float32).

    latents [N, C, F, h, w] (F = 3 * blocks); pcm [N, blocks, block_samples] (16 kHz);
    clip_identity [N]; ref_latents [I, C, 1, h, w] and motion_latents [I, C, Fm, h, w] per identity,
    indexed through ``identity_index`` (identity -> row).
    """

    spec: LatentDatasetSpec
    latents: Tensor
    pcm: Tensor
    clip_identity: Tensor
    ref_latents: Tensor
    motion_latents: Tensor
    identity_index: dict[int, int]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def cond(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Reference and motion latents of clips ``idx`` [B] -> [B, C, 1, h, w], [B, C, Fm, h, w]."""
        rows = torch.tensor([self.identity_index[int(i)] for i in self.clip_identity[idx]], dtype=torch.long)
        return self.ref_latents[rows], self.motion_latents[rows]


def vae_digest(vae: WanVAE) -> str:
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    h.update(json.dumps(asdict(vae.config), sort_keys=True, default=list).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_reference(vae: WanVAE, reference: np.ndarray, motion_frames: int) -> tuple[Tensor, Tensor]:
    """uint8 [H, W, 3] -> ref latent [1, C, 1, h, w] and motion latents [1, C, Fm, h, w] (as encode_sink)."""
    video = to_pixels(reference[None])                                             # [1, 3, 1, H, W]
    ref = vae.encode(video)
    motion = vae.encode(video.expand(-1, -1, motion_frames, -1, -1).contiguous())
    return ref, motion


@torch.no_grad()
def build_latent_dataset(vae: WanVAE, dataset: syn.SyntheticDataset, num_clips: int, blocks: int,
                         motion_frames: int, block_samples: int, batch: int = 8,
                         progress: bool = True) -> LatentDataset:
    """Encode ``num_clips`` clips of ``dataset`` (which must render ``1 + 12 * blocks`` frames)."""
    stride = vae.config.stride[0]
    frames_needed = 1 + blocks * 3 * stride
    if dataset.num_frames != frames_needed:
        raise ValueError(f"the synthetic dataset renders {dataset.num_frames} frames; need {frames_needed}")
    if block_samples != 3 * stride * syn.SAMPLES_PER_FRAME:
        raise ValueError(f"block_samples {block_samples} != 12 frames of {syn.SAMPLES_PER_FRAME} samples")
    latents, pcm, ids = [], [], []
    refs: dict[int, tuple[Tensor, Tensor]] = {}
    it = range(0, num_clips, batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="latents", unit="batch", dynamic_ncols=True)
    for start in it:
        samples = [dataset[i] for i in range(start, min(num_clips, start + batch))]
        # 1. clip latents: encode 1 + 4F frames, drop latent 0      [b, C, 1 + F, h, w] -> [b, C, F, h, w]
        z = vae.encode(to_pixels(np.stack([s.frames for s in samples])))
        latents.append(z[:, :, 1:].float())
        for s in samples:
            # 2. the audio of frames 1..: one row per block          [blocks, block_samples]
            audio = s.pcm[syn.SAMPLES_PER_FRAME: syn.SAMPLES_PER_FRAME + blocks * block_samples]
            pcm.append(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).view(blocks, block_samples))
            ids.append(s.identity)
            # 3. the identity's sink latents (once per identity)
            if s.identity not in refs:
                refs[s.identity] = encode_reference(vae, s.reference, motion_frames)
    order = sorted(refs)
    spec = LatentDatasetSpec(num_clips=num_clips, blocks=blocks, identities=tuple(dataset.identities),
                             seed=dataset.seed, size=dataset.size, vae_digest=vae_digest(vae))
    return LatentDataset(spec=spec, latents=torch.cat(latents), pcm=torch.stack(pcm),
                         clip_identity=torch.tensor(ids, dtype=torch.long),
                         ref_latents=torch.cat([refs[i][0] for i in order]).float(),
                         motion_latents=torch.cat([refs[i][1] for i in order]).float(),
                         identity_index={i: k for k, i in enumerate(order)})


def save_latent_dataset(ds: LatentDataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"spec": asdict(ds.spec), "latents": ds.latents, "pcm": ds.pcm, "clip_identity": ds.clip_identity,
                "ref_latents": ds.ref_latents, "motion_latents": ds.motion_latents,
                "identity_index": ds.identity_index}, tmp)
    tmp.replace(path)


def load_latent_dataset(path: Path, expect: LatentDatasetSpec | None = None) -> LatentDataset | None:
    """The cached dataset at ``path``; None when missing or built with another spec (VAE, seed, ...)."""
    if not path.exists():
        return None
    raw = torch.load(path, map_location="cpu", weights_only=False)
    spec = LatentDatasetSpec(**{**raw["spec"], "identities": tuple(raw["spec"]["identities"])})
    if expect is not None and spec != expect:
        return None
    return LatentDataset(spec=spec, latents=raw["latents"], pcm=raw["pcm"], clip_identity=raw["clip_identity"],
                         ref_latents=raw["ref_latents"], motion_latents=raw["motion_latents"],
                         identity_index={int(k): int(v) for k, v in raw["identity_index"].items()})


def sample_indices(n: int, batch: int, gen: torch.Generator) -> Tensor:
    """``batch`` distinct-as-possible random indices in [0, n) from ``gen``."""
    if n < 1:
        raise ValueError("the dataset is empty")
    return torch.randperm(n, generator=gen)[:batch] if batch <= n else torch.randint(0, n, (batch,), generator=gen)


def identities_split(num_identities: int, train_identities: int) -> tuple[Sequence[int], Sequence[int]]:
    """Train identities [0, train) and held-out identities [train, num)."""
    if not 0 < train_identities < num_identities:
        raise ValueError(f"need 0 < train_identities ({train_identities}) < num_identities ({num_identities})")
    return range(train_identities), range(train_identities, num_identities)
