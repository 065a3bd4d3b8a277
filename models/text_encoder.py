"""umT5 text encoder (encoder only), with the Wan T5 checkpoint's state-dict layout.

Live Avatar encodes the session prompt once with the umT5-XXL encoder
(``models_t5_umt5-xxl-enc-bf16.pth``, tokenizer ``google/umt5-xxl``, 512 tokens); the DiT then
zero-pads the trimmed context back to 512 tokens (reference notes §1.3).

Architecture (T5 v1.1 / umT5 encoder):
    token embedding -> N x [RMSNorm -> self-attention (+ per-layer relative position bias)
    -> residual -> RMSNorm -> gated-GELU FFN -> residual] -> RMSNorm

- T5 attention has **no** 1/sqrt(d) scaling and no biases; padded keys are masked out.
- umT5 gives **every layer its own** relative position bias table (32 buckets x heads); T5 v1.1
  shares one. Only the per-layer variant is implemented here.
- FFN: ``fc2(fc1(x) * gelu_tanh(gate(x)))``.
- RMSNorm: ``w * x / sqrt(mean(x^2) + eps)``, computed in fp32.

State-dict keys (assumed Wan ``T5Encoder`` layout; 1 + 24 * 10 + 1 = 242 tensors, 5.681 B parameters
at real size):

    token_embedding.weight                         [vocab, dim]
    blocks.{i}.norm1.weight                        [dim]
    blocks.{i}.attn.{q,k,v,o}.weight               [dim_attn, dim] ([dim, dim_attn] for o)
    blocks.{i}.norm2.weight                        [dim]
    blocks.{i}.ffn.gate.0.weight                   [ffn_dim, dim]
    blocks.{i}.ffn.fc1.weight                      [ffn_dim, dim]
    blocks.{i}.ffn.fc2.weight                      [dim, ffn_dim]
    blocks.{i}.pos_embedding.embedding.weight      [num_buckets, num_heads]
    norm.weight                                    [dim]

Because the relative position bias depends only on ``key - query`` and padded keys are masked,
the output at real token positions does not depend on how much padding follows.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BYTE_OFFSET = 3  # byte tokenizer: ids 0, 1, 2 = pad, eos, unk (the umT5 special-token ids)
BYTE_VOCAB_SIZE = BYTE_OFFSET + 256


class TextEncoderError(ValueError):
    """Raised for bad text-encoder inputs, configs, tokenizer folders or checkpoints."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder configuration. Defaults are umT5-XXL as used by Wan2.2 / Live Avatar.

    Attributes:
        vocab_size: token embedding rows (256384 for umT5).
        dim: model width.
        dim_attn: total attention width (num_heads * head_dim).
        ffn_dim: gated FFN hidden width.
        num_heads: attention heads.
        num_layers: encoder blocks.
        num_buckets: relative position buckets (half per direction).
        max_distance: distance at which the log-spaced buckets saturate.
        text_len: tokens per prompt after padding / truncation.
        eps: RMSNorm epsilon.
        pad_id: padding token id (mask 0).
        eos_id: end-of-sequence id appended by the tokenizer.
    """

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    text_len: int = 512
    eps: float = 1e-6
    pad_id: int = 0
    eos_id: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "dim_attn", "ffn_dim", "num_heads", "num_layers", "text_len"):
            if getattr(self, name) < 1:
                raise TextEncoderError(f"TextEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim_attn % self.num_heads:
            raise TextEncoderError(f"dim_attn {self.dim_attn} not divisible by num_heads {self.num_heads}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise TextEncoderError(f"num_buckets must be an even number >= 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise TextEncoderError(f"max_distance {self.max_distance} must exceed num_buckets // 4")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    @classmethod
    def tiny(cls) -> TextEncoderConfig:
        """CPU test preset. The vocab covers the byte tokenizer (3 specials + 256 bytes)."""
        return cls(vocab_size=BYTE_VOCAB_SIZE, dim=32, dim_attn=32, ffn_dim=64, num_heads=4, num_layers=2,
                   num_buckets=32, max_distance=128, text_len=64)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class T5RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).type_as(x)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel = key_pos - query_pos`` (integer tensor, any shape).

    Half the buckets are for keys after the query. Within each half, distances below
    ``num_buckets // 4`` get their own bucket; larger distances are log-spaced up to
    ``max_distance`` and saturate in the last bucket.
    """
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    is_small = dist < exact
    # log-spaced buckets for exact <= dist; clamp dist to >= 1 so log() stays finite (masked anyway)
    log_ratio = torch.log(dist.clamp_min(1).float() / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (half - exact)).long()
    large = large.clamp_max(half - 1)
    return bucket + torch.where(is_small, dist, large)


class T5RelativeBias(nn.Module):
    """Per-layer learned bias ``[num_buckets, num_heads]`` indexed by relative position bucket."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        # 1. relative positions key - query  [L, L]
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]
        # 2. buckets -> bias  [L, L] -> [L, L, H] -> [1, H, L, L]
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_distance))
        return bias.permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head self-attention without scaling or biases (T5 convention)."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], bias [B or 1, H, L, L] (position bias + key mask) -> [B, L, D]."""
        b, n, _ = x.shape
        # 1. projections  [B, L, D] -> [B, H, L, Dh]
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).view(b, n, self.num_heads, -1).transpose(1, 2)
        # 2. unscaled attention with additive bias, softmax in fp32
        logits = torch.matmul(q, k.transpose(-1, -2)).float() + bias  # [B, H, L, L]
        attn = logits.softmax(dim=-1).type_as(v)
        out = torch.matmul(attn, v)  # [B, H, L, Dh]
        # 3. merge heads and project  [B, H, L, Dh] -> [B, L, D]
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5GatedFFN(nn.Module):
    """Gated-GELU feed-forward: ``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, ffn_dim, bias=False)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))  # [B, L, D] -> [B, L, F] -> [B, L, D]


class T5EncoderBlock(nn.Module):
    """Pre-norm encoder block with its own relative position bias (umT5)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim, config.eps)
        self.attn = T5Attention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5RMSNorm(config.dim, config.eps)
        self.ffn = T5GatedFFN(config.dim, config.ffn_dim)
        self.pos_embedding = T5RelativeBias(config.num_buckets, config.num_heads, config.max_distance)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], mask_bias [B, 1, 1, L] (0 for tokens, -inf-like for padding) -> [B, L, D]."""
        bias = self.pos_embedding(x.shape[1]).float() + mask_bias  # [B, H, L, L]
        x = x + self.attn(self.norm1(x), bias)
        x = x + self.ffn(self.norm2(x))
        return x


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack. ``forward(token_ids, mask) -> [B, L, dim]`` (full padded length)."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        cfg = self.config
        # 1. token embedding
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        # 2. encoder blocks (each with its own relative position bias)
        self.blocks = nn.ModuleList([T5EncoderBlock(cfg) for _ in range(cfg.num_layers)])
        # 3. final norm
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """token_ids [B, L] long, mask [B, L] (1 = token, 0 = padding) -> hidden [B, L, dim]."""
        _check_ids_and_mask(token_ids, mask, self.config)
        # 1. token embedding  [B, L] -> [B, L, D]
        x = self.token_embedding(token_ids)
        # additive key mask  [B, L] -> [B, 1, 1, L]
        mask_bias = torch.zeros(mask.shape, dtype=torch.float32, device=x.device)
        mask_bias = mask_bias.masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
        # 2. blocks
        for block in self.blocks:
            x = block(x, mask_bias)
        # 3. final norm
        return self.norm(x)

    @torch.no_grad()
    def encode(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode and trim to the true length: ``[B, L_pad, D] -> [B, max_i len_i, D]``.

        Rows shorter than the longest prompt are zeroed past their own length, so zero-padding the
        result back to ``text_len`` (as the DiT does) equals trimming each prompt then padding it.
        """
        hidden = self.forward(token_ids, mask)  # [B, L, D]
        lengths = (mask != 0).sum(dim=1)  # [B]
        keep = int(lengths.max())
        hidden = hidden[:, :keep] * (mask[:, :keep] != 0).unsqueeze(-1).to(hidden.dtype)
        return hidden


def _check_ids_and_mask(token_ids: torch.Tensor, mask: torch.Tensor, cfg: TextEncoderConfig) -> None:
    if token_ids.dim() != 2:
        raise TextEncoderError(f"token_ids must be [B, L], got shape {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise TextEncoderError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if mask.shape != token_ids.shape:
        raise TextEncoderError(f"mask shape {tuple(mask.shape)} != token_ids shape {tuple(token_ids.shape)}")
    if token_ids.device.type != "meta" and token_ids.numel():
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise TextEncoderError(f"token id out of range [0, {cfg.vocab_size}): min {lo}, max {hi}")
        if bool(((mask != 0).sum(dim=1) == 0).any()):
            raise TextEncoderError("every row of mask needs at least one real token (all padding given)")


def init_random_weights(model: UMT5Encoder, seed: int) -> UMT5Encoder:
    """Deterministic random weights from ``seed`` (independent of the global torch RNG).

    Embeddings ~ N(0, 1), linear weights ~ N(0, 1 / fan_in), norms = 1, position biases ~ N(0, 0.5).
    Used for the tiny test model; real weights come from :meth:`TextEncoder.from_pretrained`.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # registration order is deterministic
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.fill_(1.0)
                continue
            if name == "token_embedding.weight":
                std = 1.0
            elif name.endswith("pos_embedding.embedding.weight"):
                std = 0.5
            else:
                std = param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Prompt normalisation before tokenizing: NFC, HTML entities unescaped, whitespace collapsed."""
    if not isinstance(text, str):
        raise TextEncoderError(f"prompt must be a str, got {type(text).__name__}")
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return _WHITESPACE.sub(" ", text).strip()


class ByteTokenizer:
    """Deterministic byte-level tokenizer for the tiny config (no files needed).

    UTF-8 byte ``b`` -> id ``b + 3``; an EOS (id 1) is appended; the sequence is truncated to
    ``text_len`` (keeping the EOS) and padded with id 0. Mirrors the umT5 tokenizer's conventions
    (pad 0, eos 1, EOS kept on truncation), not its vocabulary.
    """

    def __init__(self, text_len: int, pad_id: int = 0, eos_id: int = 1) -> None:
        self.text_len = text_len
        self.pad_id = pad_id
        self.eos_id = eos_id

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids [B, text_len] long, mask [B, text_len] long)."""
        ids = torch.full((len(texts), self.text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.long)
        for row, text in enumerate(texts):
            toks = [b + BYTE_OFFSET for b in clean_prompt(text).encode("utf-8")][: self.text_len - 1]
            toks.append(self.eos_id)
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[row, : len(toks)] = 1
        return ids, mask


class HFTokenizer:
    """A local Hugging Face tokenizer folder (e.g. ``google/umt5-xxl``), never fetched from the hub."""

    def __init__(self, folder: str | Path, text_len: int) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise TextEncoderError(f"tokenizer folder not found: {folder}")
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise TextEncoderError(f"cannot load tokenizer from {folder}: {exc}") from exc
        self.text_len = text_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> (ids [B, text_len] long, mask [B, text_len] long), padded to ``text_len``."""
        enc = self._tok(
            [clean_prompt(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()


# ---------------------------------------------------------------------------------------------
# Session-level wrapper
# ---------------------------------------------------------------------------------------------


class TextEncoder:
    """Tokenizer + umT5 encoder. ``encode_prompt(text) -> [L, dim]`` is called once per session."""

    def __init__(self, model: UMT5Encoder, tokenizer: ByteTokenizer | HFTokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def config(self) -> TextEncoderConfig:
        return self.model.config

    @classmethod
    def random(cls, config: TextEncoderConfig | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> TextEncoder:
        """Random weights from ``seed`` with the byte tokenizer (tiny config by default)."""
        config = config or TextEncoderConfig.tiny()
        if config.vocab_size < BYTE_VOCAB_SIZE:
            raise TextEncoderError(f"vocab_size {config.vocab_size} < {BYTE_VOCAB_SIZE} needed by the byte tokenizer")
        model = init_random_weights(UMT5Encoder(config), seed).to(dtype)
        return cls(model, ByteTokenizer(config.text_len, config.pad_id, config.eos_id))

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, tokenizer_dir: str | Path | None,
                        config: TextEncoderConfig | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
        """Load the Wan umT5 encoder ``.pth`` state dict and a local tokenizer folder.

        The module is built on the meta device and the checkpoint tensors are assigned directly, so
        no random 5.7 B-parameter init is ever allocated. Key names and shapes must match exactly.
        ``tokenizer_dir=None`` uses the byte tokenizer (tiny checkpoints only).
        """
        config = config or TextEncoderConfig()
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise TextEncoderError(f"text encoder checkpoint not found: {checkpoint}")
        if tokenizer_dir is None:
            if config.vocab_size < BYTE_VOCAB_SIZE:
                raise TextEncoderError(f"vocab_size {config.vocab_size} too small for the byte tokenizer")
            tokenizer = ByteTokenizer(config.text_len, config.pad_id, config.eos_id)
        else:
            tokenizer = HFTokenizer(tokenizer_dir, config.text_len)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise TextEncoderError(f"cannot read text encoder checkpoint {checkpoint}: {exc}") from exc
        with torch.device("meta"):
            model = UMT5Encoder(config)
        check_state_dict(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model.to(device=device, dtype=dtype), tokenizer)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts)

    @torch.no_grad()
    def encode_prompt(self, text: str) -> torch.Tensor:
        """One prompt -> context ``[L, dim]`` trimmed to its true token count (EOS included)."""
        ids, mask = self.tokenizer([text])  # [1, text_len]
        device = self.model.token_embedding.weight.device
        return self.model.encode(ids.to(device), mask.to(device))[0]  # [L, D]


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fail loudly (TextEncoderError) on missing / unexpected keys or shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: checkpoint {got[k]} vs model {expected[k]})")
        raise TextEncoderError("text encoder state dict does not match: " + "; ".join(parts))
