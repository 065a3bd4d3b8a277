"""Two small CNN probes trained on the synthetic talking-face domain: the harness's SyncNet and Dino-S.

- :class:`MouthProbe` reads one frame and regresses what the renderer drew: mouth opening (0..1),
  head offset dx, dy (pixels) and eye openness (0..1). Its mouth output, correlated with the audio
  envelope, is the lip-sync metric; its head and mouth outputs give the motion-dynamics metric.
- :class:`IdentityEncoder` maps one frame to a unit embedding. It is trained as a cosine classifier
  over the *training* identities (``0 .. train_ids - 1``) on frames with random mouth, pose and
  blinks, so it learns what stays fixed within an identity. At evaluation the identity similarity
  of a frame is the cosine of its embedding with the reference image's; held-out identities
  (``train_ids .. num_ids - 1``) are used to check that it generalises.

Training data is rendered on the fly by :func:`models.training.synthetic.render_frame` from
per-step random draws (uniform mouth, head offsets, blinks, identities), with light blur and pixel
noise so the probes also read the softer frames a generator decodes. Both stages run through
:func:`models.training.loop.run_stage` (progress bar, checkpoints, exact resume).

Shipped weights live in :data:`PROBES_DIR` (``config.json`` + ``probes.safetensors``, 1.6 MB; the
held-out scores are in the safetensors metadata); to rebuild them (about 3 minutes on one CPU
thread)::

    python -m models.quality.probes --out models/checkpoints/quality-probes

On the 200 held-out identities the shipped pair scores: mouth R^2 0.935 (Pearson 0.968), head dx /
dy R^2 0.95 / 0.90, blink R^2 0.87; identity cosine to the own reference 0.938 vs 0.003 to other
identities' references, and 100 % identification among the 200.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import unknown_fields
from models.quality.metrics import HEAD_DX, HEAD_DY, MOTION_COLUMNS, MOUTH, pearson

PROBES_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "quality-probes"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "probes.safetensors"
MOUTH_STAGE = "mouth-probe"
IDENTITY_STAGE = "identity-probe"
#: The seed offset of held-out scoring draws (kept away from every training step's seed).
HELDOUT_SEED_OFFSET = 1_000_003


class ProbeError(ValueError):
    """Probe weights or settings that cannot be used (missing files, wrong keys, bad config)."""


@dataclass(frozen=True)
class ProbeConfig:
    """Sizes and training settings of both probes.

    Attributes:
        size: the square frame size the probes read (frames of other sizes are resized).
        widths: channel width of each stride-2 stage (the feature map ends at ``size / 2**len(widths)``).
        mouth_hidden: width of the mouth probe's hidden layer.
        mouth_tap_stage, mouth_tap_channels: the mouth probe also reads the output of this stage
            (1-based), squeezed to this many channels.
        embed_dim: identity embedding size.
        logit_scale: cosine-classifier temperature (logits = scale * cos).
        train_ids / num_ids: identities ``0 .. train_ids - 1`` train, ``train_ids .. num_ids - 1`` are held out.
        max_shift_px: training head offsets are drawn from U[-max_shift_px, max_shift_px] (x and y).
        blink_fraction: fraction of training frames with a random eye openness U[0, 1] (others open).
        blur_prob: probability that a training frame is blurred (3x3 binomial) before the noise.
        noise_std: std of the Gaussian pixel noise added to training frames (in [-1, 1] units).
        mouth_steps, identity_steps, batch, lr, weight_decay: optimisation (AdamW, cosine decay).
        seed: the training seed.
    """

    size: int = 64
    widths: tuple[int, ...] = (16, 32, 48, 64)
    mouth_hidden: int = 64
    mouth_tap_stage: int = 2
    mouth_tap_channels: int = 4
    embed_dim: int = 32
    logit_scale: float = 16.0
    train_ids: int = 800
    num_ids: int = 1000
    max_shift_px: float = 3.0
    blink_fraction: float = 0.3
    blur_prob: float = 0.5
    noise_std: float = 0.03
    mouth_steps: int = 1500
    identity_steps: int = 400
    batch: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 2 ** len(self.widths) or self.size % 2 ** len(self.widths):
            raise ProbeError(f"size {self.size} must be a positive multiple of 2**len(widths) = {2 ** len(self.widths)}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ProbeError(f"widths must be positive, got {self.widths}")
        if not 1 <= self.train_ids < self.num_ids:
            raise ProbeError(f"need 1 <= train_ids < num_ids, got {self.train_ids}, {self.num_ids}")
        if not 1 <= self.mouth_tap_stage <= len(self.widths):
            raise ProbeError(f"mouth_tap_stage must be in 1..{len(self.widths)}, got {self.mouth_tap_stage}")
        for name in ("mouth_hidden", "mouth_tap_channels", "embed_dim", "batch"):
            if getattr(self, name) < 1:
                raise ProbeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.mouth_steps, self.identity_steps) < 0 or self.lr <= 0 or self.max_shift_px <= 0:
            raise ProbeError("steps must be >= 0, lr > 0 and max_shift_px > 0")

    @classmethod
    def tiny(cls) -> ProbeConfig:
        """A seconds-long configuration for tests (weak probes)."""
        return cls(widths=(8, 16, 16, 16), mouth_hidden=16, embed_dim=8, mouth_steps=4, identity_steps=4, batch=8)

    @property
    def feature_size(self) -> int:
        return self.size // 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ProbeConfig:
        unknown = unknown_fields(cls, raw)
        if unknown:
            raise ProbeError(f"unknown keys in the probe config: {unknown}")
        raw = dict(raw)
        if "widths" in raw:
            raw["widths"] = tuple(int(w) for w in raw["widths"])
        return cls(**raw)


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------


class _Trunk(nn.Module):
    """``[B, 3, S, S] -> [B, widths[-1], S / 2**n, S / 2**n]``: per stage a stride-2 conv then a
    stride-1 conv, each followed by BatchNorm and SiLU. (BatchNorm trained clearly better than
    GroupNorm here: held-out mouth R^2 0.93 vs 0.90 at the default steps; in eval mode it uses its
    running statistics, so a frame's outputs do not depend on the rest of its batch.)"""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        stages: list[nn.Module] = []
        c_in = 3
        for w in config.widths:
            stages.append(nn.Sequential(nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.SiLU(),
                                        nn.Conv2d(w, w, 3, stride=1, padding=1), nn.BatchNorm2d(w), nn.SiLU()))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.out_features = c_in * config.feature_size ** 2

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every stage's output: ``[B, widths[i], S / 2**(i+1), S / 2**(i+1)]`` for stage i."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class MouthProbe(nn.Module):
    """Frame ``[B, 3, S, S]`` in [-1, 1] -> ``[B, 4]`` = (mouth 0..1, head dx px, head dy px, blink 0..1).

    The head reads the last stage's features and, squeezed to ``mouth_tap_channels`` by a 1x1 conv,
    the features after stage ``mouth_tap_stage`` (a finer grid: a fully open mouth is only 6 px
    tall at 64x64; this tap raised held-out mouth R^2 from 0.93 to 0.94 and made the read-out
    less shrunk toward the mean on hard faces). It regresses normalised targets (offsets divided
    by ``max_shift_px``); :attr:`scale` maps them back to pixels, so ``forward`` answers in the
    renderer's units.
    """

    def __init__(self, config: ProbeConfig):
        super().__init__()
        # 1. trunk  2. fine-grid tap  3. head
        self.trunk = _Trunk(config)
        self.tap_stage = config.mouth_tap_stage
        self.tap = nn.Conv2d(config.widths[self.tap_stage - 1], config.mouth_tap_channels, 1)
        tap_side = config.size // 2 ** self.tap_stage
        features = self.trunk.out_features + config.mouth_tap_channels * tap_side ** 2
        self.head = nn.Sequential(nn.Linear(features, config.mouth_hidden), nn.SiLU(),
                                  nn.Linear(config.mouth_hidden, len(MOTION_COLUMNS)))
        scale = torch.ones(len(MOTION_COLUMNS))
        scale[[HEAD_DX, HEAD_DY]] = config.max_shift_px
        self.register_buffer("scale", scale, persistent=False)

    def forward_normalized(self, x: Tensor) -> Tensor:
        outs = self.trunk(x)                                      # per stage [B, C_i, S_i, S_i]
        fine = self.tap(outs[self.tap_stage - 1]).flatten(1)      # [B, tap_channels * S_tap**2]
        return self.head(torch.cat([fine, outs[-1].flatten(1)], dim=1))   # -> [B, 4] (offsets / max_shift_px)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_normalized(x) * self.scale


class IdentityEncoder(nn.Module):
    """Frame ``[B, 3, S, S]`` in [-1, 1] -> unit embedding ``[B, D]``; trained with a cosine
    classifier (:attr:`classifier` rows are normalised class centres; used only in training)."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        # 1. trunk  2. projection  3. training-only classifier
        self.trunk = _Trunk(config)
        self.proj = nn.Linear(self.trunk.out_features, config.embed_dim)
        self.classifier = nn.Parameter(torch.randn(config.train_ids, config.embed_dim) * config.embed_dim ** -0.5)
        self.logit_scale = config.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.trunk(x)[-1].flatten(1)), dim=-1)   # [B, 3, S, S] -> [B, D], unit norm

    def logits(self, emb: Tensor) -> Tensor:
        return self.logit_scale * emb @ F.normalize(self.classifier, dim=-1).T   # [B, D] -> [B, train_ids]


# ---------------------------------------------------------------------------------------------
# frames in
# ---------------------------------------------------------------------------------------------


def to_probe_size(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, size, size, 3]``: unchanged when already that size, else
    resized with Pillow (bilinear) to cover ``size x size`` with the aspect kept, then center-cropped
    (the geometry :func:`models.inputs.prepare_reference` uses)."""
    from PIL import Image

    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ProbeError(f"frames must be uint8 RGB [N, H, W, 3], got {arr.dtype} {arr.shape}")
    n, h, w, _ = arr.shape
    if (h, w) == (size, size):
        return arr
    scale = max(size / h, size / w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (rh - size) // 2, (rw - size) // 2
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(arr[i]).resize((rw, rh), Image.BILINEAR)
        out[i] = np.asarray(img)[top:top + size, left:left + size]
    return out


def to_input(frames: np.ndarray) -> Tensor:
    """uint8 ``[N, S, S, 3]`` -> float32 ``[N, 3, S, S]`` in [-1, 1] (``x / 127.5 - 1``)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(127.5).sub_(1.0)
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class Probes:
    """The trained pair, in eval mode, with batched numpy-in / numpy-out helpers."""

    config: ProbeConfig
    mouth: MouthProbe
    identity: IdentityEncoder
    batch: int = 256                       # frames per forward pass at evaluation

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        """Any-size uint8 ``[N, H, W, 3]`` (or one ``[H, W, 3]``) -> ``[N, S, S, 3]`` at the probe size."""
        arr = np.asarray(frames)
        return to_probe_size(arr[None] if arr.ndim == 3 else arr, self.config.size)

    @torch.no_grad()
    def _run(self, net: nn.Module, frames: np.ndarray) -> np.ndarray:
        f = self.prepare(frames)
        outs = [net(to_input(f[i:i + self.batch])).numpy() for i in range(0, f.shape[0], self.batch)]
        return np.concatenate(outs).astype(np.float64)

    def motion(self, frames: np.ndarray) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 -> ``[N, 4]`` float64, columns :data:`MOTION_COLUMNS`."""
        return self._run(self.mouth, frames)

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """``[N, H, W, 3]`` uint8 -> unit embeddings ``[N, D]`` float64."""
        return self._run(self.identity, frames)


# ---------------------------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _face(identity: int):
    from models.training.synthetic import face_params

    return face_params(identity)


def _blur(x: Tensor) -> Tensor:
    """3x3 binomial blur of ``[B, 3, S, S]`` (edges replicated)."""
    k1 = torch.tensor([1.0, 2.0, 1.0])
    k = (k1[:, None] * k1[None, :] / 16.0).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)


@dataclass(frozen=True)
class RenderedBatch:
    frames: Tensor          # [B, 3, S, S] in [-1, 1], augmented
    targets: Tensor         # [B, 4] mouth, dx / max_shift, dy / max_shift, blink
    ids: Tensor             # [B] identities


def render_batch(config: ProbeConfig, ids: Tensor, gen: torch.Generator, augment: bool = True) -> RenderedBatch:
    """Render one frame per identity in ``ids`` with random mouth / pose / blink drawn from ``gen``.

    1. Draw mouth ~ U[0, 1], dx, dy ~ U[-max_shift_px, max_shift_px], blink = U[0, 1] for a
       ``blink_fraction`` of frames, else 1 (open).
    2. Render with the synthetic renderer.
    3. Augment: blur a ``blur_prob`` share of frames, add N(0, noise_std) pixel noise.
    """
    from models.training.synthetic import render_frame

    b = ids.shape[0]
    # 1. draws
    mouth = torch.rand(b, generator=gen, dtype=torch.float64)
    shift = (torch.rand(b, 2, generator=gen, dtype=torch.float64) * 2 - 1) * config.max_shift_px
    blinking = torch.rand(b, generator=gen, dtype=torch.float64) < config.blink_fraction
    blink = torch.where(blinking, torch.rand(b, generator=gen, dtype=torch.float64), torch.ones(b, dtype=torch.float64))
    blur = torch.rand(b, generator=gen) < config.blur_prob
    noise = torch.randn(b, 3, config.size, config.size, generator=gen) * config.noise_std
    # 2. render
    frames = np.stack([render_frame(_face(int(i)), float(m), float(dx), float(dy), float(bl), size=config.size)
                       for i, m, (dx, dy), bl in zip(ids.tolist(), mouth, shift, blink)])   # [B, S, S, 3]
    x = to_input(frames)
    # 3. augment
    if augment:
        x = torch.where(blur[:, None, None, None], _blur(x), x) + noise
    targets = torch.stack([mouth, shift[:, 0] / config.max_shift_px, shift[:, 1] / config.max_shift_px, blink],
                          dim=1).float()
    return RenderedBatch(frames=x, targets=targets, ids=ids)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def _cosine_lr(config: ProbeConfig, total: int):
    return lambda step: config.lr * 0.5 * (1.0 + np.cos(np.pi * min(step, total) / max(total, 1)))


def _stage(name: str, index: int, net: nn.Module, total: int, config: ProbeConfig, loss_fn, out_dir: Path,
           progress: bool, save_every: int) -> None:
    from models.training.loop import run_stage

    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    lr_at = _cosine_lr(config, total)

    def step_fn(step: int, gen: torch.Generator) -> dict[str, float]:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids = torch.randint(0, config.train_ids, (config.batch,), generator=gen)
        batch = render_batch(config, ids, gen)
        loss, metrics = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), **metrics}

    run_stage(name, total, step_fn, {"net": net}, {"opt": opt}, out_dir, seed=2 * config.seed + index,
              save_every=save_every, progress=progress)


def train_probes(out_dir: str | Path, config: ProbeConfig = ProbeConfig(), progress: bool = True,
                 save_every: int = 200) -> Probes:
    """Train both probes (stages ``mouth-probe`` and ``identity-probe`` under ``out_dir``; a rerun
    resumes from their last checkpoints) and return them in eval mode.

    1. Mouth probe: MSE on (mouth, dx / max_shift, dy / max_shift, blink).
    2. Identity encoder: cross-entropy of the cosine classifier over the training identities.
    """
    out = Path(out_dir)
    with torch.random.fork_rng():                    # seeded initial weights, global RNG untouched
        torch.manual_seed(config.seed)
        mouth = MouthProbe(config)
        identity = IdentityEncoder(config)

    # 1. mouth probe
    def mouth_loss(b: RenderedBatch) -> tuple[Tensor, dict[str, float]]:
        err = (mouth.forward_normalized(b.frames) - b.targets) ** 2          # [B, 4]
        return err.mean(), {"mouth_mse": float(err[:, MOUTH].detach().mean())}

    _stage(MOUTH_STAGE, 0, mouth, config.mouth_steps, config, mouth_loss, out, progress, save_every)

    # 2. identity encoder
    def identity_loss(b: RenderedBatch) -> tuple[Tensor, dict[str, float]]:
        logits = identity.logits(identity(b.frames))                         # [B, train_ids]
        acc = (logits.argmax(-1) == b.ids).float().mean()
        return F.cross_entropy(logits, b.ids), {"acc": float(acc)}

    _stage(IDENTITY_STAGE, 1, identity, config.identity_steps, config, identity_loss, out, progress, save_every)
    return Probes(config, mouth.eval(), identity.eval())


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _shipped_state(probes: Probes) -> dict[str, Tensor]:
    """Every evaluation weight, prefixed ``mouth.`` / ``identity.`` (the training-only classifier is dropped)."""
    state = {f"mouth.{k}": v for k, v in probes.mouth.state_dict().items()}
    state.update({f"identity.{k}": v for k, v in probes.identity.state_dict().items() if k != "classifier"})
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}


def save_probes(probes: Probes, directory: str | Path, scores: dict[str, float] | None = None) -> Path:
    """Write ``directory/config.json`` and ``directory/probes.safetensors`` (``scores`` go in its metadata)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(json.dumps(probes.config.to_dict(), indent=2) + "\n")
    meta = {"heldout_scores": json.dumps(scores)} if scores else None
    save_file(_shipped_state(probes), str(d / WEIGHTS_FILE), metadata=meta)
    return d


def load_probes(directory: str | Path = PROBES_DIR) -> Probes:
    """Load probes saved by :func:`save_probes`; every key and shape must match the config."""
    from safetensors import safe_open

    d = Path(directory)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ProbeError(f"quality probes not found: {d / f} is missing (train them with "
                             f"`python -m models.quality.probes --out {d}`)")
    try:
        config = ProbeConfig.from_dict(json.loads((d / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ProbeError(f"{d / CONFIG_FILE} is not a valid probe config: {exc}") from exc
    mouth, identity = MouthProbe(config), IdentityEncoder(config)
    with safe_open(str(d / WEIGHTS_FILE), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for prefix, net, skip in (("mouth.", mouth, set()), ("identity.", identity, {"classifier"})):
        expected = {k: v for k, v in net.state_dict().items() if k not in skip}
        got = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(got) != set(expected):
            raise ProbeError(f"{d / WEIGHTS_FILE}: {prefix[:-1]} keys differ from the config: missing "
                             f"{sorted(set(expected) - set(got))}, unexpected {sorted(set(got) - set(expected))}")
        for k, v in expected.items():
            if tuple(got[k].shape) != tuple(v.shape):
                raise ProbeError(f"{d / WEIGHTS_FILE}: {prefix}{k} has shape {tuple(got[k].shape)}, "
                                 f"the config needs {tuple(v.shape)}")
        net.load_state_dict(got, strict=False)
    return Probes(config, mouth.eval(), identity.eval())


def heldout_scores(probes: Probes, frames_per_id: int = 4, seed: int = 0) -> dict[str, float]:
    """Scores on the held-out identities ``train_ids .. num_ids - 1`` (never seen in training).

    1. Render ``frames_per_id`` random frames per held-out identity (no augmentation) and each one's
       reference image.
    2. Mouth probe: R^2 and Pearson correlation of each output with the drawn truth.
    3. Identity: mean cosine of frames to their own reference ("same") and to every other held-out
       reference ("different"), and the share of frames whose own reference is the most similar
       of all held-out references (identification accuracy; chance = 1 / held-out count).
    """
    from models.training.synthetic import reference_image

    cfg = probes.config
    ids = torch.arange(cfg.train_ids, cfg.num_ids).repeat_interleave(frames_per_id)
    gen = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
    # 1. frames and references
    batch = render_batch(cfg, ids, gen, augment=False)
    frames = ((batch.frames.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    truth = batch.targets.double().numpy() * probes.mouth.scale.double().numpy()
    refs = np.stack([reference_image(_face(i), size=cfg.size) for i in range(cfg.train_ids, cfg.num_ids)])
    # 2. mouth probe
    pred = probes.motion(frames)
    scores: dict[str, float] = {}
    for col, name in enumerate(MOTION_COLUMNS):
        resid = float(((pred[:, col] - truth[:, col]) ** 2).sum())
        total = float(((truth[:, col] - truth[:, col].mean()) ** 2).sum())
        scores[f"{name}_r2"] = 1.0 - resid / total
        scores[f"{name}_corr"] = pearson(pred[:, col], truth[:, col])
    # 3. identity
    sim = probes.embed(frames) @ probes.embed(refs).T                      # [N frames, N ids]
    own = (ids - cfg.train_ids).numpy()
    same = sim[np.arange(sim.shape[0]), own]
    mask = np.ones_like(sim, dtype=bool)
    mask[np.arange(sim.shape[0]), own] = False
    scores["identity_same_mean"] = float(same.mean())
    scores["identity_different_mean"] = float(sim[mask].mean())
    scores["identity_top1"] = float((sim.argmax(axis=1) == own).mean())
    return scores


def main(argv: list[str] | None = None) -> int:
    """``python -m models.quality.probes --out DIR``: train at the default config, score, save."""
    p = argparse.ArgumentParser(description="train the quality-harness probes on the synthetic domain")
    p.add_argument("--out", default=str(PROBES_DIR), help="where config.json + probes.safetensors go")
    p.add_argument("--work-dir", default="out/train/quality-probes", help="stage checkpoints (resume)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped weights used 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    probes = train_probes(args.work_dir, ProbeConfig(), progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    scores = {**heldout_scores(probes), "train_seconds": round(seconds, 1)}
    save_probes(probes, args.out, scores)
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
