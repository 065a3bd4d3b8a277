"""Configuration of the causal Wan2.2-S2V DiT (the Live Avatar generator).

`DiTConfig` is one frozen dataclass whose field names are the keys of the official
`Wan-AI/Wan2.2-S2V-14B/config.json` and whose DEFAULTS ARE THE REAL 14B MODEL.
`DiTConfig.tiny()` is a CPU-size model of the same architecture, used by the tests.

Besides the official keys, a few fields are our own. They name values that the
reference implementation hard-codes; every one is documented next to its default:

* `num_audio_layers`   wav2vec2 hidden states mixed by the audio adapter (25).
* `motion_frames`      pixel frames of motion history (73 -> 19 motion latents).
* `framepack_buckets`  latent frames per FramePack bucket, near to far (1, 2, 16).
* `vae_temporal_stride` pixel frames per latent frame (4, Wan2.1 VAE).
* `rope_theta`, `rope_fp16_factors`  RoPE base and factor quantisation (see models/rope.py).
* `frames_per_block`   latent frames per streaming block (3).
* `kv_cache_frames`    latent frames kept in the self-attention ring buffer (12).
* `sink_lead_min/max`  range of the rolling-sink lead, in latent frames (4..30).
* `ref_rope_time`      RoPE time index of the reference (sink) frame (30).
* `audio_norm_eps`     eps of the LayerNorm inside the audio AdaLN (1e-5, diffusers default).

`from_json` reads a `config.json` (keys starting with "_" are ignored, any other unknown
key is an error); `to_json` writes one back, extras included.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def unknown_fields(klass: type, keys: Iterable[Any], comments: bool = False) -> list[str]:
    """The sorted ``keys`` that are not fields of dataclass ``klass``; every config ``from_dict`` uses it.
    With ``comments=True`` keys starting with "_" (the official ``config.json``'s metadata) are skipped."""
    names = {f.name for f in dataclasses.fields(klass)}
    return sorted(str(k) for k in keys if k not in names and not (comments and str(k).startswith("_")))


class ModelInputError(ValueError):
    """A tensor or argument passed to a model has the wrong shape, type or range."""


# Keys of the official Wan2.2-S2V config.json (all of them are fields below).
OFFICIAL_KEYS = (
    "model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
    "out_dim", "num_heads", "num_layers", "window_size", "qk_norm", "cross_attn_norm", "eps",
    "cond_dim", "audio_dim", "num_audio_token", "enable_adain", "adain_mode",
    "audio_inject_layers", "zero_init", "zero_timestep", "enable_motioner", "add_last_motion",
    "enable_tsm", "trainable_token_pos_emb", "motion_token_num", "enable_framepack",
    "framepack_drop_mode",
)


@dataclass(frozen=True)
class DiTConfig:
    """Architecture (and streaming geometry) of the causal Wan2.2-S2V DiT.

    Defaults are the real Wan2.2-S2V-14B + Live Avatar settings (16.296 B parameters).
    """

    # ---- official config.json keys -------------------------------------------------
    model_type: str = "s2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)      # (t, h, w) of the patch Conv3d
    text_len: int = 512                                # umT5 tokens after zero padding
    in_dim: int = 16                                   # latent channels in
    dim: int = 5120                                    # hidden size
    ffn_dim: int = 13824
    freq_dim: int = 256                                # sinusoidal timestep embedding size
    text_dim: int = 4096                               # umT5-XXL hidden size
    out_dim: int = 16                                  # latent channels out (velocity)
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple[int, int] = (-1, -1)            # must be global attention
    qk_norm: bool = True                               # RMSNorm on q/k over the full dim
    cross_attn_norm: bool = True                       # norm3 = LayerNorm with affine
    eps: float = 1e-6
    cond_dim: int = 16                                 # pose latent channels (cond_encoder)
    audio_dim: int = 1024                              # wav2vec2 hidden size
    num_audio_token: int = 4                           # local audio tokens per latent frame
    enable_adain: bool = True                          # global audio vector drives an AdaLN
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    zero_init: bool = True                             # training-time init flag; no effect here
    zero_timestep: bool = True                         # cond tokens use the t=0 modulation
    enable_motioner: bool = False
    add_last_motion: bool = True                       # keep the nearest FramePack buckets
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024                       # only used by the (disabled) motioner
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"

    # ---- our own fields (values the reference hard-codes) -------------------------
    num_audio_layers: int = 25                         # wav2vec2 hidden states (24 layers + emb)
    motion_frames: int = 73                            # pixel frames of motion history
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)  # near -> far, latent frames
    vae_temporal_stride: int = 4                       # pixel frames per latent frame
    rope_theta: float = 10000.0
    rope_fp16_factors: bool = True                     # quantise cos/sin to fp16 like the reference
    frames_per_block: int = 3                          # latent frames per streaming block
    kv_cache_frames: int = 12                          # ring buffer length in latent frames
    sink_lead_min: int = 4                             # rolling sink lead, inclusive range
    sink_lead_max: int = 30
    ref_rope_time: int = 30                            # RoPE time of the reference frame
    audio_norm_eps: float = 1e-5                       # LayerNorm eps inside the audio AdaLN

    def __post_init__(self) -> None:
        _check_types(self)
        problems = []
        if self.model_type != "s2v":
            problems.append(f"model_type must be 's2v', got {self.model_type!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1 or self.patch_size[0] != 1:
            problems.append(f"patch_size must be (1, ph, pw) with positive ph, pw (one token frame per "
                            f"latent frame), got {self.patch_size}")
        if len(self.window_size) != 2 or tuple(self.window_size) != (-1, -1):
            problems.append(f"only global attention is supported: window_size must be (-1, -1), "
                            f"got {self.window_size}")
        if self.dim % self.num_heads:
            problems.append(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        elif self.head_dim % 2 or self.head_dim < 6:
            problems.append(f"head_dim {self.head_dim} must be even and >= 6 for the 3D RoPE")
        if self.dim % self.num_audio_token:
            problems.append(f"dim {self.dim} is not divisible by num_audio_token {self.num_audio_token}")
        layers = tuple(self.audio_inject_layers)
        if list(layers) != sorted(set(layers)) or any(i < 0 or i >= self.num_layers for i in layers):
            problems.append(f"audio_inject_layers must be sorted unique ints in [0, {self.num_layers}), "
                            f"got {layers}")
        for name, want in (("enable_motioner", False), ("enable_tsm", False),
                           ("trainable_token_pos_emb", False), ("enable_framepack", True),
                           ("enable_adain", True), ("zero_timestep", True)):
            if getattr(self, name) != want:
                problems.append(f"{name}={getattr(self, name)} is not supported (only {want})")
        if self.adain_mode != "attn_norm":
            problems.append(f"adain_mode {self.adain_mode!r} is not supported (only 'attn_norm')")
        if self.framepack_drop_mode not in ("padd", "drop"):
            problems.append(f"framepack_drop_mode must be 'padd' or 'drop', got {self.framepack_drop_mode!r}")
        b = tuple(self.framepack_buckets)
        if len(b) != 3 or min(b) < 1 or b[1] % 2 or b[2] % 4:
            problems.append(f"framepack_buckets must be 3 positive ints with b[1] % 2 == 0 and "
                            f"b[2] % 4 == 0 (compressions 1x, 2x, 4x), got {b}")
        elif sum(b) != self.motion_latent_frames:
            problems.append(f"sum(framepack_buckets)={sum(b)} must equal the motion latent count "
                            f"{self.motion_latent_frames} derived from motion_frames={self.motion_frames}")
        if self.motion_frames < 1 or (self.motion_frames - 1) % self.vae_temporal_stride:
            problems.append(f"motion_frames={self.motion_frames} must be 1 + k*vae_temporal_stride")
        if self.frames_per_block < 1 or self.kv_cache_frames < self.frames_per_block:
            problems.append(f"need 1 <= frames_per_block ({self.frames_per_block}) <= kv_cache_frames "
                            f"({self.kv_cache_frames})")
        if not 0 <= self.sink_lead_min <= self.sink_lead_max:
            problems.append(f"need 0 <= sink_lead_min ({self.sink_lead_min}) <= sink_lead_max "
                            f"({self.sink_lead_max})")
        for name in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                     "num_heads", "num_layers", "cond_dim", "audio_dim", "num_audio_token",
                     "num_audio_layers", "vae_temporal_stride"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.freq_dim % 2:
            problems.append(f"freq_dim must be even, got {self.freq_dim}")
        if problems:
            raise ConfigError("invalid DiTConfig: " + "; ".join(problems))

    # ---- derived sizes --------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames of the motion history: 73 pixel frames -> 19 latents (1 + 4k -> 1 + k)."""
        return (self.motion_frames - 1) // self.vae_temporal_stride + 1

    @property
    def kv_cache_blocks(self) -> int:
        return self.kv_cache_frames // self.frames_per_block

    def frame_seq_len(self, latent_hw: tuple[int, int]) -> int:
        """Tokens per latent frame for a latent grid (h, w): (h / ph) * (w / pw)."""
        h, w = self.check_latent_hw(latent_hw)
        return (h // self.patch_size[1]) * (w // self.patch_size[2])

    def check_latent_hw(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Validate a latent grid (h, w): multiples of the patch, and at least 4 patches wide so
        the FramePack 4x bucket has a token (coarser buckets floor, like the reference)."""
        if len(latent_hw) != 2:
            raise ModelInputError(f"latent grid must be (h, w), got {latent_hw}")
        h, w = int(latent_hw[0]), int(latent_hw[1])
        ph, pw = self.patch_size[1], self.patch_size[2]
        if h < 4 * ph or w < 4 * pw or h % ph or w % pw:
            raise ModelInputError(f"latent grid {h}x{w} must be multiples of the patch {ph}x{pw} "
                                  f"and at least {4 * ph}x{4 * pw} (FramePack 4x bucket)")
        return h, w

    # ---- presets & (de)serialisation -----------------------------------------------
    @classmethod
    def tiny(cls, **overrides: Any) -> DiTConfig:
        """A CPU-size model with the same architecture (about 0.62 M parameters)."""
        base = dict(dim=64, num_heads=4, num_layers=4, ffn_dim=128, freq_dim=32, text_dim=32,
                    text_len=16, audio_dim=32, num_audio_layers=5, audio_inject_layers=(0, 2),
                    motion_token_num=16)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_json(cls, source: str | Path | Mapping[str, Any]) -> DiTConfig:
        """Build from a config.json path (file, or a directory holding config.json) or a dict.

        Keys starting with "_" (e.g. `_class_name`, `_diffusers_version`) are ignored; any other
        key that is not a field raises ConfigError naming it. JSON lists become tuples.
        """
        if isinstance(source, Mapping):
            data = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"cannot read DiT config {path}: {exc}") from exc
            if not isinstance(data, dict):
                raise ConfigError(f"DiT config {path} must hold a JSON object")
        unknown = unknown_fields(cls, data, comments=True)
        if unknown:
            raise ConfigError(f"unknown DiT config key(s): {', '.join(unknown)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v)
                  for k, v in data.items() if not str(k).startswith("_")}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise (official keys and our extras); also write it to `path` when given."""
        text = json.dumps({"_class_name": "CausalWanS2V", **self.to_dict()}, indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text


def _check_types(cfg: DiTConfig) -> None:
    """Fail early with a named field when a JSON value has the wrong type."""
    bad = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        default = f.default
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        elif isinstance(default, tuple):
            ok = isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool)
                                                      for x in v)
            if ok and isinstance(v, list):
                object.__setattr__(cfg, f.name, tuple(v))
        else:  # pragma: no cover - every field has a typed default
            ok = True
        if not ok:
            bad.append(f"{f.name}={v!r} (expected {type(default).__name__})")
    if bad:
        raise ConfigError("DiTConfig field(s) with a wrong type: " + ", ".join(bad))
