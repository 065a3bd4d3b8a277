"""Checkpoint loading: sharded safetensors, torch ``.pth`` files, strict state-dict loading, PEFT LoRA merge.

Everything here is generic over ``nn.Module`` and plain ``dict[str, Tensor]`` state dicts, so it does not
depend on any particular network. Paths only: nothing here ever downloads from a hub.

The official Live Avatar files this module reads (``reference/liveavatar-method.md`` section 1.8):

- ``Wan2.2-S2V-14B/diffusion_pytorch_model-0000{1..4}-of-00004.safetensors`` plus
  ``diffusion_pytorch_model.safetensors.index.json`` (bf16, about 32.6 GB, 1260 keys)
  -> :func:`load_sharded_safetensors`;
- ``Wan2.1_VAE.pth`` and ``models_t5_umt5-xxl-enc-bf16.pth`` (plain torch state dicts) -> :func:`load_torch_pth`;
- ``LiveAvatar/liveavatar.safetensors``: a PEFT LoRA (r=128, alpha=64, targets q,k,v,o,ffn.0,ffn.2) that is
  merged into the base weights at load time -> :func:`load_peft_lora` then :func:`merge_lora`.

Typical real-size flow (one copy of the weights in memory at any time)::

    with torch.device("meta"):
        dit = CausalDiT(DiTConfig())                       # no memory
    sd = load_sharded_safetensors(ckpt_dir, dtype=torch.bfloat16)   # tensors read one at a time (mmap)
    report = merge_lora(sd, load_peft_lora(lora_file))     # in place, one layer at a time
    load_state_dict_strict(dit, sd, what="DiT", dtype=torch.bfloat16)  # assign=True: no second copy
    dit.to("cuda")

Every problem raises :class:`CheckpointError` (a ``ValueError``) whose message names the file, key(s) and
shapes involved.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

DEFAULT_SHARD_PREFIX = "diffusion_pytorch_model"
INDEX_SUFFIX = ".safetensors.index.json"
PEFT_PREFIX = "base_model.model."  # added by peft.get_peft_model to every key of the wrapped model
LORA_DEFAULT_RANK = 128  # liveavatar/configs/s2v_causal_sft.yaml
LORA_DEFAULT_ALPHA = 64.0  # -> scale alpha / r = 0.5
LORA_DEFAULT_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "ffn.0", "ffn.2")
_MAX_LISTED = 20  # how many names an error message lists per category before "... and N more"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------------


def _listing(names: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """'a, b, c' or 'a, b, ... (+N more)' for error messages."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _require_path(path: str | os.PathLike, what: str) -> Path:
    """Return ``Path(path)`` or raise naming it. Hub ids such as 'Quark-Vision/Live-Avatar' are not fetched."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{what} path does not exist: '{p}' (only local paths are accepted; download hub files first)"
        )
    return p


# ---------------------------------------------------------------------------------------------------------
# 1. Safetensors: single files and sharded (index.json + shards)
# ---------------------------------------------------------------------------------------------------------


def _read_index(index_path: Path) -> dict[str, list[str]]:
    """Parse ``*.safetensors.index.json`` -> {shard file name: [keys in index order]}."""
    duplicates: list[str] = []

    def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for k, v in pairs:
            if k in seen:
                duplicates.append(k)
            seen[k] = v
        return seen

    try:
        data = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_pairs)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read safetensors index '{index_path}': {exc}") from exc
    if duplicates:
        raise CheckpointError(
            f"safetensors index '{index_path}' lists {_plural(len(duplicates), 'duplicate key')}: "
            f"{_listing(duplicates)}"
        )
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"safetensors index '{index_path}' has no non-empty 'weight_map' object")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise CheckpointError(f"safetensors index '{index_path}': key '{key}' maps to invalid shard {shard!r}")
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"safetensors index '{index_path}': shard name {shard!r} leaves the folder")
        shards.setdefault(shard, []).append(key)
    return shards


def _resolve_layout(path: str | os.PathLike) -> dict[Path, list[str] | None]:
    """Map a folder, an index file or a single file to {shard path: expected keys (None = whatever it holds)}."""
    p = _require_path(path, "safetensors checkpoint")
    if p.is_dir():
        indexes = sorted(p.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            raise CheckpointError(
                f"folder '{p}' holds several safetensors indexes ({_listing([i.name for i in indexes])}); "
                "pass the index file to load"
            )
        if indexes:
            p = indexes[0]
        else:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                found = _listing([f.name for f in files]) if files else "none"
                raise CheckpointError(
                    f"folder '{p}' has no '*{INDEX_SUFFIX}' and not exactly one .safetensors file "
                    f"(found: {found}); pass the file to load"
                )
            return {files[0]: None}
    if p.name.endswith(INDEX_SUFFIX):
        shards = _read_index(p)
        missing = [name for name in shards if not (p.parent / name).is_file()]
        if missing:
            raise CheckpointError(
                f"safetensors index '{p}' refers to {_plural(len(missing), 'missing shard file')} "
                f"in '{p.parent}': {_listing(missing)}"
            )
        return {p.parent / name: keys for name, keys in shards.items()}
    if p.suffix == ".safetensors" and p.is_file():
        return {p: None}
    raise CheckpointError(f"'{p}' is neither a .safetensors file, a '*{INDEX_SUFFIX}' nor a folder holding them")


def _shard_keys(shard: Path) -> list[str]:
    """Key names from a shard's header (no tensor data is read)."""
    try:
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise CheckpointError(f"cannot read safetensors file '{shard}': {exc}") from exc


def _validate_layout(layout: dict[Path, list[str] | None]) -> None:
    """Check the index against the shard headers before any tensor is read (cheap, fails early)."""
    owner: dict[str, Path] = {}
    duplicates: list[str] = []
    absent: list[str] = []
    unlisted: list[str] = []
    for shard, listed in layout.items():
        present = _shard_keys(shard)
        for key in present:
            if key in owner:
                duplicates.append(f"{key} ({owner[key].name} and {shard.name})")
            else:
                owner[key] = shard
        if listed is not None:
            present_set, listed_set = set(present), set(listed)
            absent += [f"{k} (index says {shard.name})" for k in listed if k not in present_set]
            unlisted += [f"{k} (in {shard.name})" for k in present if k not in listed_set]
    problems = []
    if duplicates:
        problems.append(f"{_plural(len(duplicates), 'duplicate key')} in several shards: {_listing(duplicates)}")
    if absent:
        problems.append(f"{_plural(len(absent), 'key')} listed in the index but not in its shard: {_listing(absent)}")
    if unlisted:
        problems.append(
            f"{_plural(len(unlisted), 'key')} in a shard but not mapped to it by the index: {_listing(unlisted)}"
        )
    if problems:
        folder = next(iter(layout)).parent
        raise CheckpointError(f"inconsistent safetensors checkpoint in '{folder}': " + "; ".join(problems))


def iter_safetensors(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, tensor)`` one tensor at a time from a safetensors checkpoint.

    ``path`` is a folder (holding one ``*.safetensors.index.json`` or exactly one ``.safetensors`` file), an
    index file, or a single ``.safetensors`` file. The whole layout is validated from the file headers first.
    Shards are memory-mapped (``safe_open``), so the peak memory is what the caller keeps, not twice the
    checkpoint. ``dtype`` casts floating-point tensors only (integer buffers keep their dtype).
    """
    device = torch.device(device)
    layout = _resolve_layout(path)
    _validate_layout(layout)
    direct = device.type in ("cpu", "cuda")  # safetensors can materialise straight onto these
    for shard in layout:
        try:
            with safe_open(str(shard), framework="pt", device=str(device) if direct else "cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if not direct:
                        t = t.to(device)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    yield key, t
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensors from '{shard}': {exc}") from exc


def load_sharded_safetensors(
    dir_or_index: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Load a (possibly sharded) safetensors checkpoint into ``{key: tensor}``; see :func:`iter_safetensors`.

    Raises :class:`CheckpointError` naming the problem for: a path that does not exist, a missing shard file,
    a key listed in the index but absent from its shard (or present but unlisted), and duplicate keys
    (twice in the index, or in two shards).
    """
    return dict(iter_safetensors(dir_or_index, device=device, dtype=dtype))


def _standalone(t: Tensor, seen_storages: set[int]) -> Tensor:
    """A CPU contiguous tensor that shares storage with no other tensor being saved (safetensors requires it)."""
    if t.device.type == "meta":
        raise CheckpointError("cannot save a tensor on the meta device (it has no data)")
    t = t.detach().to("cpu").contiguous()
    ptr = t.untyped_storage().data_ptr()
    if ptr in seen_storages and t.numel() > 0:
        t = t.clone()
        ptr = t.untyped_storage().data_ptr()
    seen_storages.add(ptr)
    return t


def save_sharded_safetensors(
    state_dict: Mapping[str, Tensor],
    directory: str | os.PathLike,
    max_shard_bytes: int,
    prefix: str = DEFAULT_SHARD_PREFIX,
) -> Path:
    """Write ``state_dict`` as ``{prefix}-0000i-of-0000n.safetensors`` shards plus ``{prefix}.safetensors.index.json``.

    This is the Hugging Face / diffusers layout of the official Wan2.2-S2V checkpoint, so our own training can
    ship checkpoints that the reference loads. Keys are packed greedily in the state dict's order; a shard
    is closed before it would exceed ``max_shard_bytes`` (a single larger tensor gets a shard of its own).
    An index is written even for one shard. Files are written to a temporary name and renamed. Stale shards
    of an earlier save with another shard count are left in place (the index never refers to them).
    Returns the index path.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise CheckpointError(f"shard prefix must be a plain non-empty file name part, got {prefix!r}")
    if not state_dict:
        raise CheckpointError("refusing to save an empty state dict")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"state dict entries must be str -> Tensor; bad keys: {_listing([str(b) for b in bad])}")

    # 1. Pack keys into shards.  nbytes: numel * element_size of each tensor.
    shards: list[list[str]] = [[]]
    used = 0
    for key, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += nbytes

    # 2. Write each shard, then the index.
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, keys in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        seen: set[int] = set()
        tensors = {k: _standalone(state_dict[k], seen) for k in keys}
        total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        tmp = out / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / name)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = out / f"{prefix}{INDEX_SUFFIX}"
    tmp = out / (index_path.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, index_path)
    return index_path


# ---------------------------------------------------------------------------------------------------------
# 2. Torch .pth state dicts (Wan2.1 VAE, umT5-XXL encoder)
# ---------------------------------------------------------------------------------------------------------


def load_torch_pth(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, Tensor]:
    """Load a ``.pth`` state dict on CPU with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    A ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped. With ``mmap`` the file is
    memory-mapped (zip-format files; older files fall back to a normal read), so the 11 GB umT5 checkpoint
    is not copied into RAM before it is used. Every value must be a tensor.
    """
    p = _require_path(path, "torch checkpoint")
    if not p.is_file():
        raise CheckpointError(f"torch checkpoint '{p}' is not a file")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:  # legacy (non-zip) serialization cannot be memory-mapped
            if not mmap or "mmap" not in str(exc):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot load torch checkpoint '{p}' with weights_only=True: {exc}") from exc

    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"torch checkpoint '{p}' holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"torch checkpoint '{p}' has {_plural(len(bad), 'non-tensor entry')}: {_listing(bad)}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------------------
# 3. Strict loading into a module (also on the meta device)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state_dict_strict` loaded.

    ``still_meta`` lists parameters/buffers that are still on the meta device after loading: non-persistent
    buffers (e.g. RoPE tables) are not in any state dict, so the module must rebuild them itself.
    """

    what: str
    num_tensors: int
    num_bytes: int
    still_meta: tuple[str, ...]


def keeps_fp32(key: str, keep_in_fp32: Sequence[str]) -> bool:
    """diffusers-style ``_keep_in_fp32_modules``: whether ``key`` (a parameter or buffer name) lies in one of
    the listed modules.

    A name matches the key itself, a dotted prefix of it or any path component (``"modulation"`` matches
    ``blocks.3.modulation``); ``*`` is a wildcard (``"blocks.*.norm3"`` matches ``blocks.0.norm3.weight``).
    """
    parts = key.split(".")
    return any(name in parts or fnmatch.fnmatchcase(key, name) or fnmatch.fnmatchcase(key, name + ".*")
               for name in keep_in_fp32)


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    what: str = "DiT",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    keep_in_fp32: Sequence[str] | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` after checking every key and shape, reporting all problems at once.

    Missing keys, unexpected keys and shape mismatches are gathered into ONE :class:`CheckpointError` that
    names them (the first 20 of each, plus counts). Loading uses ``assign=True``, so a module built on the
    meta device receives the real tensors without allocating a second copy.

    Dtype/device of the loaded tensors:
      - ``dtype`` given: floating tensors become ``dtype``, except keys matched by ``keep_in_fp32`` (default:
        the module's ``_keep_in_fp32_modules`` attribute, if any; see :func:`keeps_fp32`), which become
        float32 (float64 when ``dtype`` is float64);
      - ``dtype`` None: each tensor takes the dtype of the module's own tensor (on a meta module that is the
        dtype it was built with: build it in bf16 or pass ``dtype`` to avoid a float32 copy of a bf16 file);
      - ``device`` None: the module tensor's device, or the checkpoint tensor's device if the module is on meta.
    Integer and bool tensors always take the module tensor's dtype. A cast that is a no-op shares memory.
    Tied parameters (one tensor under two names) are not re-tied.
    """
    expected = module.state_dict()
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(ref)}"
        for k, ref in expected.items()
        if k in state_dict and isinstance(state_dict[k], Tensor) and _shape(state_dict[k]) != _shape(ref)
    ]
    problems = []
    if missing:
        problems.append(
            f"{_plural(len(missing), 'missing key')} (in the model, not in the checkpoint): {_listing(missing)}"
        )
    if unexpected:
        problems.append(
            f"{_plural(len(unexpected), 'unexpected key')} (in the checkpoint, not in the model): "
            f"{_listing(unexpected)}"
        )
    if mismatched:
        problems.append(f"{_plural(len(mismatched), 'shape mismatch')}: {_listing(mismatched)}")
    if not_tensors:
        problems.append(f"{_plural(len(not_tensors), 'non-tensor value')}: {_listing(not_tensors)}")
    if problems:
        raise CheckpointError(
            f"{what} checkpoint does not match the model ({len(state_dict)} checkpoint keys, {len(expected)} "
            "model keys):\n  " + "\n  ".join(problems)
        )

    if keep_in_fp32 is None:
        keep_in_fp32 = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    target_device = torch.device(device) if device is not None else None
    prepared: dict[str, Tensor] = {}
    num_bytes = 0
    for key, ref in expected.items():
        t = state_dict[key]
        if (t.is_floating_point() or t.is_complex()) and dtype is not None:
            keep = keeps_fp32(key, keep_in_fp32) and t.is_floating_point()
            want_dtype = torch.promote_types(dtype, torch.float32) if keep else dtype
        else:
            want_dtype = ref.dtype
        want_device = target_device or (t.device if ref.device.type == "meta" else ref.device)
        t = t.detach().to(device=want_device, dtype=want_dtype)
        prepared[key] = t
        num_bytes += t.numel() * t.element_size()
    try:
        module.load_state_dict(prepared, strict=True, assign=True)
    except RuntimeError as exc:  # should not happen after the checks above; keep the message readable
        raise CheckpointError(f"{what} checkpoint could not be loaded: {exc}") from exc

    still_meta = tuple(
        name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"
    )
    return LoadReport(what=what, num_tensors=len(prepared), num_bytes=num_bytes, still_meta=still_meta)


# ---------------------------------------------------------------------------------------------------------
# 4. PEFT LoRA: parse and merge
# ---------------------------------------------------------------------------------------------------------

# '<module>.lora_A[.<adapter>].weight' and '<module>.lora_B[.<adapter>].{weight,bias}' (after prefix removal)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that change the merge."""

    rank: int | None = None  # "r"
    alpha: float | None = None  # "lora_alpha"
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    target_modules: tuple[str, ...] | str | None = None  # list (suffix match) or one regex (full match)


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """Parse a PEFT ``adapter_config.json``; variants this loader cannot merge (DoRA, per-module ranks) raise."""
    p = _require_path(path, "adapter config")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read adapter config '{p}': {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"adapter config '{p}' is not a JSON object")
    for unsupported in ("use_dora", "rank_pattern", "alpha_pattern"):
        if data.get(unsupported):
            raise CheckpointError(f"adapter config '{p}': '{unsupported}' is not supported by this LoRA merge")
    targets = data.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(str(t) for t in targets)
    elif targets is not None and not isinstance(targets, str):
        raise CheckpointError(f"adapter config '{p}': 'target_modules' must be a list or a string, got {targets!r}")
    rank, alpha = data.get("r"), data.get("lora_alpha")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise CheckpointError(f"adapter config '{p}': 'r' must be a positive int, got {rank!r}")
    if alpha is not None and not isinstance(alpha, (int, float)):
        raise CheckpointError(f"adapter config '{p}': 'lora_alpha' must be a number, got {alpha!r}")
    return AdapterConfig(
        rank=rank,
        alpha=None if alpha is None else float(alpha),
        use_rslora=bool(data.get("use_rslora", False)),
        target_modules=targets,
    )


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-adapted Linear: ``W' = W + scale * lora_b @ lora_a`` (and ``b' = b + scale * lora_b_bias``)."""

    lora_a: Tensor  # [r, in]   ("lora_A", the down projection)
    lora_b: Tensor  # [out, r]  ("lora_B", the up projection)
    lora_b_bias: Tensor | None = None  # [out]; only with PEFT lora_bias=True (LiveAvatar has none)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True)
class LoraWeights:
    """A parsed PEFT LoRA file, keys normalised to the base model's names (no 'base_model.model.' prefix).

    ``pairs`` maps a module path ('blocks.0.self_attn.q') to its LoRA factors. ``full`` holds the file's
    non-LoRA tensors (keys as in the file, prefix removed; a PEFT-wrapped layer's weight is named
    '<module>.base_layer.weight'): the reference loads *all* keys of the file (section 1.7), so
    :func:`merge_lora` lets these replace base weights before the merge.
    """

    pairs: dict[str, LoraPair]
    full: dict[str, Tensor] = field(default_factory=dict)
    config: AdapterConfig | None = None
    source: Path | None = None


def load_peft_lora(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoraWeights:
    """Parse a PEFT-format LoRA safetensors file (e.g. ``liveavatar.safetensors``).

    Accepted LoRA key forms (with or without the ``base_model.model.`` prefix, with or without an adapter name
    such as ``.default``): ``blocks.0.self_attn.q.lora_A.default.weight`` [r, in] and
    ``blocks.0.self_attn.q.lora_B.default.weight`` [out, r] (optionally ``lora_B...bias`` [out]).
    Other keys are full tensors. ``path`` may be a folder (its ``adapter_model.safetensors`` or single
    ``.safetensors``); an ``adapter_config.json`` next to the file supplies r / lora_alpha when present.
    """
    p = _require_path(path, "LoRA")
    if p.is_dir() and (p / "adapter_model.safetensors").is_file():
        p = p / "adapter_model.safetensors"
    a: dict[str, Tensor] = {}
    b: dict[str, Tensor] = {}
    b_bias: dict[str, Tensor] = {}
    full: dict[str, Tensor] = {}
    adapters: set[str] = set()
    duplicates: list[str] = []
    malformed: list[str] = []
    for raw_key, t in iter_safetensors(p, device=device, dtype=dtype):
        key = raw_key[len(PEFT_PREFIX) :] if raw_key.startswith(PEFT_PREFIX) else raw_key
        m = _LORA_KEY.match(key)
        if m is None:
            if ".lora_" in key:  # DoRA magnitude vectors, embedding LoRA, ... : not silently a "full tensor"
                malformed.append(f"{raw_key} (unsupported LoRA key form)")
                continue
            target, base_key = full, key
        else:
            adapters.add(m["adapter"] or "")
            base_key = m["module"]
            target = a if m["which"] == "A" else (b if m["param"] == "weight" else b_bias)
            if m["which"] == "A" and m["param"] == "bias":
                malformed.append(f"{raw_key} (lora_A has no bias)")
                continue
        if base_key in target:
            duplicates.append(raw_key)
        target[base_key] = t

    problems = []
    if duplicates:
        problems.append(
            f"{_plural(len(duplicates), 'duplicate key')} after removing '{PEFT_PREFIX}': {_listing(duplicates)}"
        )
    if len(adapters) > 1:
        problems.append(f"several adapter names in one file: {_listing(sorted(repr(x) for x in adapters))}")
    unpaired = sorted((set(a) ^ set(b)) | (set(b_bias) - set(b)))
    if unpaired:
        problems.append(f"{_plural(len(unpaired), 'module')} without both lora_A and lora_B: {_listing(unpaired)}")
    for module in sorted(set(a) & set(b)):
        la, lb = a[module], b[module]
        if la.ndim != 2 or lb.ndim != 2 or la.shape[0] != lb.shape[1]:
            malformed.append(f"{module} (lora_A {_shape(la)}, lora_B {_shape(lb)}: need [r, in] and [out, r])")
        elif module in b_bias and _shape(b_bias[module]) != (lb.shape[0],):
            malformed.append(f"{module} (lora_B bias {_shape(b_bias[module])}, need ({lb.shape[0]},))")
    if malformed:
        problems.append(f"{_plural(len(malformed), 'malformed LoRA entry')}: {_listing(malformed)}")
    if problems:
        raise CheckpointError(f"LoRA file '{p}' is invalid: " + "; ".join(problems))

    config_path = (p if p.is_dir() else p.parent) / "adapter_config.json"
    config = read_adapter_config(config_path) if config_path.is_file() else None
    pairs = {m: LoraPair(a[m], b[m], b_bias.get(m)) for m in sorted(a)}
    return LoraWeights(pairs=pairs, full=full, config=config, source=p)


def _is_target(module: str, targets: Sequence[str] | str) -> bool:
    """PEFT target matching: a regex string must match the full name; list entries match a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_target_modules(
    state_dict: Mapping[str, Tensor], targets: Sequence[str] | str = LORA_DEFAULT_TARGETS
) -> list[str]:
    """Names of the Linear layers (2-D ``<name>.weight``) that PEFT suffix-matching would wrap.

    At real size (Wan2.2-S2V-14B, a meta-device ``module.state_dict()`` suffices) this is 448 layers:
    self_attn and cross_attn q/k/v/o plus ffn.0/ffn.2 in all 40 blocks (400), and the 12
    ``audio_injector.injector.N.{q,k,v,o}`` (48). Note ``norm_q``/``norm_k`` do not match 'q'/'k'.
    """
    return [
        key[: -len(".weight")]
        for key, t in state_dict.items()
        if key.endswith(".weight") and t.ndim == 2 and _is_target(key[: -len(".weight")], targets)
    ]


@dataclass(frozen=True)
class LoraMergeReport:
    """What :func:`merge_lora` changed. ``ignored`` is non-empty only with ``strict=False``."""

    merged: tuple[str, ...]  # module paths whose weight got W + scale * B @ A
    replaced: tuple[str, ...]  # base keys replaced by full tensors from the file
    ignored: tuple[str, ...]  # file entries the reference (PEFT load_state_dict(strict=False)) would ignore
    rank: int
    alpha: float
    scale: float

    @property
    def num_merged(self) -> int:
        return len(self.merged)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        return (
            f"LoRA merge: {self.num_merged} layers merged (r={self.rank}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}), {self.num_replaced} full tensors replaced, {len(self.ignored)} ignored"
        )


def merge_lora(
    state_dict: dict[str, Tensor],
    lora: LoraWeights,
    alpha: float | None = None,
    rank: int | None = None,
    targets: Sequence[str] | str | None = None,
    *,
    strict: bool = True,
) -> LoraMergeReport:
    """Merge ``lora`` into ``state_dict`` IN PLACE (one layer at a time, so no second copy of the weights).

    For every LoRA pair: ``W <- W + (alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA), computed in at
    least float32 and cast back to W's dtype and device; a LoRA bias, if any, is merged the same way (the
    LiveAvatar file has none, so biases stay untouched). Full tensors replace their base tensors first (cast
    to the base dtype), as the reference loads them before ``merge_and_unload``.

    ``alpha``/``rank``/``targets`` default to the file's ``adapter_config.json``, else 64 / 128 /
    ``("q","k","v","o","ffn.0","ffn.2")``. Every pair's rank must equal ``rank``.

    Everything is validated before anything is changed. Errors (one :class:`CheckpointError` naming keys and
    shapes): a LoRA pair or full tensor whose base key is missing, any shape mismatch, a rank mismatch. With
    ``strict=True`` (default) these also raise: a LoRA pair on a module that is not a target, and a full
    tensor named ``<target>.weight``/``.bias`` without '.base_layer.'. The reference silently ignores both
    (PEFT renames targeted weights to '.base_layer.weight'); ``strict=False`` ignores them too and lists them
    in the report. At real size 448 Linear layers are targets (see :func:`lora_target_modules`).
    """
    cfg = lora.config or AdapterConfig()
    alpha = float(alpha if alpha is not None else (cfg.alpha if cfg.alpha is not None else LORA_DEFAULT_ALPHA))
    rank = int(rank if rank is not None else (cfg.rank if cfg.rank is not None else LORA_DEFAULT_RANK))
    targets = targets if targets is not None else (cfg.target_modules or LORA_DEFAULT_TARGETS)
    if rank <= 0:
        raise CheckpointError(f"LoRA rank must be positive, got {rank}")
    scale = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank

    # 1. Validate every entry before touching the state dict.
    errors: list[str] = []
    soft: list[str] = []  # strict-only errors, else ignored
    ignored: list[str] = []
    replace: list[tuple[str, str]] = []  # (key in the LoRA file, base key)
    merge: list[str] = []
    for file_key, t in lora.full.items():
        key = file_key.replace(".base_layer.", ".")  # PEFT's name for a wrapped layer's own weight/bias
        module = key.rsplit(".", 1)[0]
        base = state_dict.get(key)
        weight = state_dict.get(module + ".weight")
        if (
            key == file_key
            and key.endswith((".weight", ".bias"))
            and weight is not None
            and weight.ndim == 2
            and _is_target(module, targets)
        ):
            soft.append(
                f"{key} (full tensor for a LoRA-targeted layer; PEFT expects '{module}.base_layer."
                f"{key.rsplit('.', 1)[1]}')"
            )
            ignored.append(file_key)
        elif key != file_key and not _is_target(module, targets):
            soft.append(f"{file_key} ('.base_layer.' on a module that is not a LoRA target)")
            ignored.append(file_key)
        elif base is None:
            soft.append(f"{file_key} (full tensor, no such base key)")
            ignored.append(file_key)
        elif _shape(base) != _shape(t):
            errors.append(f"{file_key} (full tensor {_shape(t)} vs base {_shape(base)})")
        else:
            replace.append((file_key, key))
    for module, pair in lora.pairs.items():
        weight = state_dict.get(module + ".weight")
        bias = state_dict.get(module + ".bias")
        a_shape, b_shape = _shape(pair.lora_a), _shape(pair.lora_b)
        if not _is_target(module, targets):
            soft.append(f"{module} (LoRA on a module that is not a target {targets!r})")
            ignored.append(module)
        elif weight is None:
            errors.append(f"{module}.lora_A/lora_B (base weight '{module}.weight' is missing)")
        elif pair.rank != rank:
            errors.append(f"{module} (LoRA rank {pair.rank} from lora_A {a_shape}, expected r={rank})")
        elif weight.ndim != 2 or _shape(weight) != (b_shape[0], a_shape[1]):
            errors.append(
                f"{module} (lora_B {b_shape} @ lora_A {a_shape} -> {(b_shape[0], a_shape[1])} "
                f"vs base weight {_shape(weight)})"
            )
        elif pair.lora_b_bias is not None and (bias is None or _shape(bias) != (b_shape[0],)):
            errors.append(f"{module} (LoRA bias ({b_shape[0]},) vs base bias {None if bias is None else _shape(bias)})")
        else:
            merge.append(module)
    if strict:
        errors += soft
    if errors:
        src = f" '{lora.source}'" if lora.source else ""
        raise CheckpointError(
            f"LoRA{src} does not fit the base weights ({_plural(len(errors), 'problem')}): {_listing(errors)}"
        )

    # 2. Replace full tensors (cast to the base tensor's dtype/device).
    for file_key, key in replace:
        base = state_dict[key]
        state_dict[key] = lora.full[file_key].to(device=base.device, dtype=base.dtype)

    # 3. Merge: W + scale * B @ A in >= float32 (float64 stays float64), cast back to W's dtype.
    for module in merge:
        pair = lora.pairs[module]
        w = state_dict[f"{module}.weight"]  # [out, in]
        compute = torch.promote_types(w.dtype, torch.float32)
        lora_a = pair.lora_a.to(device=w.device, dtype=compute)  # [r, in]
        lora_b = pair.lora_b.to(device=w.device, dtype=compute)  # [out, r]
        state_dict[f"{module}.weight"] = (w.to(compute) + scale * (lora_b @ lora_a)).to(w.dtype)
        if pair.lora_b_bias is not None:
            bias = state_dict[f"{module}.bias"]  # [out]
            delta = pair.lora_b_bias.to(device=bias.device, dtype=compute)
            state_dict[f"{module}.bias"] = (bias.to(compute) + scale * delta).to(bias.dtype)

    return LoraMergeReport(
        merged=tuple(merge),
        replaced=tuple(key for _, key in replace),
        ignored=tuple(ignored),
        rank=rank,
        alpha=alpha,
        scale=scale,
    )
