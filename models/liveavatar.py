"""The whole Live Avatar model set, built from one config: DiT, VAE, audio encoder, text encoder.

:class:`LiveAvatarConfig` bundles the per-network configs plus the output-size rule. Its defaults
are the real-size models; :meth:`LiveAvatarConfig.tiny` is the CPU configuration of the same
architecture that tests, CI and the embedded default run.

:func:`build_models` makes the modules:

- ``checkpoint=None``: seeded random weights (deterministic given ``seed``). This is the only option
  at real size without weights, and what the tiny configuration uses until a trained tiny checkpoint
  ships.
- ``checkpoint=DIR``: the official layout, loaded from local files only (nothing is fetched)::

      DIR/config.json, DIR/diffusion_pytorch_model*.safetensors(.index.json)   DiT (Wan2.2-S2V-14B)
      DIR/Wan2.1_VAE.pth                                                        VAE
      DIR/models_t5_umt5-xxl-enc-bf16.pth, DIR/google/umt5-xxl/                 text encoder + tokenizer
      DIR/wav2vec2-large-xlsr-53-english/                                       audio encoder (HF folder)

  plus ``lora=FILE`` (``liveavatar.safetensors``, PEFT format), merged into the DiT at load time.
  A tiny checkpoint directory may instead hold ``liveavatar.json`` (this bundle's config) and
  ``vae.safetensors``/``text_encoder.safetensors``/``audio_encoder.safetensors`` next to the DiT shards.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.audio_encoder import AudioEncoderConfig, Wav2VecAudioEncoder
from models.checkpoint import (
    CheckpointError,
    load_peft_lora,
    load_sharded_safetensors,
    load_state_dict_strict,
    load_torch_pth,
    merge_lora,
)
from models.checkpoints import SHIPPED_CHECKPOINT, SHIPPED_SPEC
from models.config import ConfigError, DiTConfig, unknown_fields
from models.dit import CausalWanS2V
from models.scheduler import SchedulerConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.vae import VAEConfig, WanVAE

BUNDLE_CONFIG_FILE = "liveavatar.json"
VAE_PTH = "Wan2.1_VAE.pth"
T5_PTH = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"


@dataclass(frozen=True)
class LiveAvatarConfig:
    """Every network's config plus the output-size rule. Defaults: the reference (14B) configuration."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    area: int = 720 * 400          # output H*W upper bound (the reference's --size)
    size_multiple: int = 64        # H and W are multiples of this
    fps: int = 25

    def __post_init__(self) -> None:
        if self.audio.hidden_size != self.dit.audio_dim or self.audio.num_states != self.dit.num_audio_layers:
            raise ConfigError(f"audio encoder gives {self.audio.num_states} x {self.audio.hidden_size} features but "
                              f"the DiT expects {self.dit.num_audio_layers} x {self.dit.audio_dim}")
        if self.text.dim != self.dit.text_dim:
            raise ConfigError(f"text encoder width {self.text.dim} != DiT text_dim {self.dit.text_dim}")
        if self.vae.z_dim != self.dit.in_dim:
            raise ConfigError(f"VAE z_dim {self.vae.z_dim} != DiT in_dim {self.dit.in_dim}")
        if self.audio.video_fps != self.fps or self.audio.block_frames != 4 * self.dit.frames_per_block:
            raise ConfigError("audio timing (fps, frames per block) does not match the DiT's blocks")
        spatial = self.vae.stride[1] * self.dit.patch_size[1] * 4   # FramePack 4x bucket on the latent grid
        if self.size_multiple % spatial:
            raise ConfigError(f"size_multiple {self.size_multiple} must be a multiple of {spatial}")

    @classmethod
    def reference(cls) -> LiveAvatarConfig:
        return cls()

    @classmethod
    def tiny(cls) -> LiveAvatarConfig:
        """CPU configuration of the same architecture: 64x64 video (latent 8x8), small widths."""
        dit = DiTConfig.tiny()
        text = dataclasses.replace(TextEncoderConfig.tiny(), text_len=dit.text_len)
        return cls(dit=dit, vae=VAEConfig.tiny(), audio=AudioEncoderConfig.tiny(), text=text,
                   scheduler=SchedulerConfig(), area=64 * 64, size_multiple=64)

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"dit": self.dit.to_dict(), "vae": dataclasses.asdict(self.vae),
                "audio": dataclasses.asdict(self.audio), "text": dataclasses.asdict(self.text),
                "scheduler": dataclasses.asdict(self.scheduler), "area": self.area,
                "size_multiple": self.size_multiple, "fps": self.fps}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LiveAvatarConfig:
        unknown = unknown_fields(cls, raw)
        if unknown:
            raise ConfigError(f"unknown keys in {BUNDLE_CONFIG_FILE}: {unknown}")
        kw: dict[str, Any] = {k: raw[k] for k in ("area", "size_multiple", "fps") if k in raw}
        if "dit" in raw:
            kw["dit"] = DiTConfig.from_json(raw["dit"])
        if "vae" in raw:
            kw["vae"] = VAEConfig.from_dict(raw["vae"])
        for name, klass in (("audio", AudioEncoderConfig), ("text", TextEncoderConfig), ("scheduler", SchedulerConfig)):
            if name in raw:
                kw[name] = _dataclass_from_dict(klass, raw[name], name)
        return cls(**kw)

    @classmethod
    def load(cls, spec: str | Path) -> LiveAvatarConfig:
        """``"tiny"``, ``"reference"``, ``"tiny-trained"`` (the shipped checkpoint's config), or a
        checkpoint directory.

        A directory with ``liveavatar.json`` gives the whole bundle; otherwise its ``config.json`` is
        the DiT config (official Wan2.2-S2V layout) and the other networks take their real-size defaults.
        """
        if str(spec) == "tiny":
            return cls.tiny()
        if str(spec) == "reference":
            return cls.reference()
        if str(spec) == SHIPPED_SPEC:
            if not (SHIPPED_CHECKPOINT / BUNDLE_CONFIG_FILE).exists():
                raise ConfigError(f"the shipped checkpoint is missing from {SHIPPED_CHECKPOINT}; rebuild it with "
                                  f"`liveavatar train --out runs/train --install`")
            return cls.from_dict(json.loads((SHIPPED_CHECKPOINT / BUNDLE_CONFIG_FILE).read_text()))
        path = Path(spec)
        if not path.is_dir():
            raise ConfigError(f"config must be 'tiny', 'reference', '{SHIPPED_SPEC}' or a checkpoint directory; "
                              f"{str(spec)!r} is none")
        if (path / BUNDLE_CONFIG_FILE).exists():
            return cls.from_dict(json.loads((path / BUNDLE_CONFIG_FILE).read_text()))
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} has neither {BUNDLE_CONFIG_FILE} nor config.json")
        return cls(dit=DiTConfig.from_json(path / "config.json"))


def default_checkpoint(spec: str | Path, checkpoint: str | Path | None = None) -> str | None:
    """The weights a (config spec, checkpoint) pair means: ``checkpoint`` when given, the shipped
    checkpoint for ``"tiny-trained"``, the directory itself when the spec is a bundle written by
    training (it has ``liveavatar.json`` and the weights beside it), else None (seeded random weights)."""
    if checkpoint is not None:
        return str(checkpoint)
    if str(spec) == SHIPPED_SPEC:
        return str(SHIPPED_CHECKPOINT)
    if str(spec) not in ("tiny", "reference") and (Path(spec) / BUNDLE_CONFIG_FILE).is_file():
        return str(spec)
    return None


def _dataclass_from_dict(klass, raw: dict[str, Any], what: str):
    unknown = unknown_fields(klass, raw)
    if unknown:
        raise ConfigError(f"unknown keys in the {what} config: {unknown}")
    return klass(**raw)


@dataclass
class LiveAvatarModels:
    """The built networks, in eval mode, on one device."""

    config: LiveAvatarConfig
    dit: CausalWanS2V | None          # None when not built (a process that runs no denoise stage)
    vae: WanVAE | None
    audio: Wav2VecAudioEncoder | None
    text: TextEncoder | None
    random_weights: bool            # True when no checkpoint was loaded (say so to users)
    lora_report: Any = None


def _seeded_init(module: nn.Module, seed: int) -> None:
    """Deterministic random init of every parameter: N(0, 0.02) for weights, 0 for biases, 1 for norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif p.ndim == 1 or "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))


ALL_PARTS = frozenset({"dit", "vae", "audio", "text"})


def build_models(config: LiveAvatarConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, checkpoint: str | Path | None = None, lora: str | Path | None = None,
                 parts: frozenset[str] | set[str] = ALL_PARTS, accel=None) -> LiveAvatarModels:
    """Build the networks named in ``parts``; random seeded weights without ``checkpoint``, else load it
    (local files only). Every part has its own seed, so a process that builds only the DiT gets the same
    DiT as one that builds everything. ``accel`` (a ``models.accel.AccelOptions``) applies FP8 linears,
    torch.compile and CUDA graphs to the DiT once it holds its final weights (all off by default)."""
    models = _build_models(config, device, dtype, seed, checkpoint, lora, parts)
    if accel is not None and models.dit is not None:
        from models.accel import accelerate

        accelerate(models.dit, accel)
    return models


def _build_models(config: LiveAvatarConfig, device: str | torch.device, dtype: torch.dtype, seed: int,
                  checkpoint: str | Path | None, lora: str | Path | None,
                  parts: frozenset[str] | set[str]) -> LiveAvatarModels:
    device = torch.device(device)
    unknown = set(parts) - ALL_PARTS
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {sorted(ALL_PARTS)}")
    if checkpoint is None:
        if lora is not None:
            raise CheckpointError("a LoRA needs base weights: pass --checkpoint DIR too")
        dit = vae = audio = text = None
        if "dit" in parts:
            dit = CausalWanS2V(config.dit, dtype=torch.float32, device=device)
            _seeded_init(dit, seed)
            dit = dit.cast(dtype).eval()                  # FP32_MODULES stay fp32
        if "vae" in parts:
            vae = WanVAE(config.vae).to(device)
            _seeded_init(vae, seed + 1)
            vae = vae.eval()
        if "audio" in parts:
            audio = Wav2VecAudioEncoder.random(config.audio, seed=seed + 2).to(device).eval()
        if "text" in parts:
            text = TextEncoder.random(config.text, seed=seed + 3)
            text.model.to(device)
        return LiveAvatarModels(config, dit, vae, audio, text, random_weights=True)

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt}")
    dit = vae = audio = text = None
    lora_report = None
    if "dit" in parts:
        # build on meta, then assign the loaded tensors (no second copy of the weights)
        dit = CausalWanS2V(config.dit, dtype=dtype, device="meta")
        state = load_sharded_safetensors(ckpt, device="cpu")
        if lora is not None:
            lora_report = merge_lora(state, load_peft_lora(lora))
        load_state_dict_strict(dit, state, what="DiT", dtype=dtype, device=device)
        del state
        dit = dit.eval()
    if "vae" in parts:
        vae = WanVAE(config.vae)
        vae_file = ckpt / VAE_PTH if (ckpt / VAE_PTH).exists() else ckpt / "vae.safetensors"
        load_state_dict_strict(vae, _load_any(vae_file), what="VAE")
        vae = vae.to(device).eval()
    if "audio" in parts:
        if (ckpt / WAV2VEC_DIR).is_dir():
            audio = Wav2VecAudioEncoder.from_pretrained(ckpt / WAV2VEC_DIR, device=device)
        else:
            audio = Wav2VecAudioEncoder.random(config.audio, seed=0)
            load_state_dict_strict(audio, _load_any(ckpt / "audio_encoder.safetensors"), what="audio encoder")
            audio.to(device)
        audio = audio.eval()
    if "text" in parts:
        if (ckpt / T5_PTH).exists():
            text = TextEncoder.from_pretrained(ckpt / T5_PTH, ckpt / T5_TOKENIZER_DIR, config=config.text,
                                               device=device)
        else:
            text = TextEncoder.random(config.text, seed=0)
            load_state_dict_strict(text.model, _load_any(ckpt / "text_encoder.safetensors"), what="text encoder")
            text.model.to(device)
    return LiveAvatarModels(config, dit, vae, audio, text, random_weights=False, lora_report=lora_report)


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_sharded_safetensors(path)
    return load_torch_pth(path)


def save_checkpoint(models: LiveAvatarModels, directory: str | Path, max_shard_bytes: int = 8 * 2**20) -> Path:
    """Write a checkpoint directory that :func:`build_models` loads: the DiT in the official sharded
    layout (``config.json`` + ``diffusion_pytorch_model-*.safetensors`` + index), the bundle config
    (``liveavatar.json``) and the other networks as single safetensors files."""
    from safetensors.torch import save_file

    from models.checkpoint import save_sharded_safetensors

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    models.config.dit.to_json(out / "config.json")
    (out / BUNDLE_CONFIG_FILE).write_text(json.dumps(models.config.to_dict(), indent=2))
    save_sharded_safetensors({k: v.detach().cpu() for k, v in models.dit.state_dict().items()}, out,
                             max_shard_bytes=max_shard_bytes)
    for name, module in (("vae", models.vae), ("audio_encoder", models.audio), ("text_encoder", models.text.model)):
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(out / f"{name}.safetensors"))
    return out
