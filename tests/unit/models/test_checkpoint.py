"""Tests for models/checkpoint.py: sharded safetensors, .pth, strict loading, PEFT LoRA merge.

A tiny nn.Module whose Linear layers are named like the Wan DiT (blocks.N.self_attn.q, blocks.N.ffn.0,
audio_injector.injector.N.q, ...) stands in for the real network. LoRA merges are checked against an
independent float64 computation W + (alpha / r) B @ A.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.checkpoint import (
    PEFT_PREFIX,
    CheckpointError,
    load_peft_lora,
    load_sharded_safetensors,
    load_state_dict_strict,
    load_torch_pth,
    lora_target_modules,
    merge_lora,
    save_sharded_safetensors,
)

pytestmark = pytest.mark.unit

DIM, FFN = 8, 16


class TinyAttn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q = nn.RMSNorm(DIM)  # 'norm_q' must NOT match the LoRA target 'q'
        self.norm_k = nn.RMSNorm(DIM)


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM))
        self.self_attn = TinyAttn()
        self.cross_attn = TinyAttn()
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, DIM))


class TinyInjector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.injector = nn.ModuleList([TinyAttn()])


class TinyDiT(nn.Module):
    """Key names follow the Wan2.2-S2V DiT; sizes are toy."""

    _keep_in_fp32_modules = ("modulation",)

    def __init__(self, num_blocks: int = 2) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, DIM, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList([TinyBlock() for _ in range(num_blocks)])
        self.audio_injector = TinyInjector()
        self.head = nn.Linear(DIM, 16)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # persistent, integer
        self.register_buffer("freqs", torch.zeros(4, 2), persistent=False)  # rebuilt by the model, not loaded


def _random_state_dict(module: nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype)
        else:
            out[k] = torch.randint(0, 100, v.shape, generator=g).to(v.dtype)
    return out


def _targets_by_type(module: nn.Module) -> set[str]:
    """Independent of the code under test: Linear layers whose last name part is q/k/v/o, or ffn.0 / ffn.2."""
    return {
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
        and (name.split(".")[-1] in {"q", "k", "v", "o"} or name.endswith(("ffn.0", "ffn.2")))
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ safetensors


@pytest.fixture
def mixed_sd() -> dict[str, torch.Tensor]:
    sd = _random_state_dict(TinyDiT())
    sd["blocks.0.self_attn.q.weight"] = sd["blocks.0.self_attn.q.weight"].to(torch.bfloat16)
    return sd


def test_sharded_roundtrip_several_shards(tmp_path, mixed_sd):
    max_bytes = 600
    index_path = save_sharded_safetensors(mixed_sd, tmp_path, max_shard_bytes=max_bytes)
    assert index_path.name == "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(mixed_sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in mixed_sd.values())
    for shard in shards:  # each shard respects the limit unless it is a single oversized tensor
        content = load_file(tmp_path / shard)
        nbytes = sum(t.numel() * t.element_size() for t in content.values())
        assert nbytes <= max_bytes or len(content) == 1
        assert {k for k, s in index["weight_map"].items() if s == shard} == set(content)
    _assert_same(load_sharded_safetensors(tmp_path), mixed_sd)
    _assert_same(load_sharded_safetensors(index_path), mixed_sd)


def test_load_single_file_and_dtype_cast(tmp_path, mixed_sd):
    save_file(mixed_sd, str(tmp_path / "model.safetensors"))
    _assert_same(load_sharded_safetensors(tmp_path / "model.safetensors"), mixed_sd)
    cast = load_sharded_safetensors(tmp_path, dtype=torch.float16, device="cpu")
    assert cast["blocks.0.self_attn.q.weight"].dtype == torch.float16
    assert cast["step"].dtype == torch.int64  # integer tensors are never cast
    assert torch.equal(cast["head.weight"], mixed_sd["head.weight"].to(torch.float16))


def test_save_tied_tensors(tmp_path):
    w = torch.randn(4, 4)
    sd = {"a.weight": w, "b.weight": w, "c.weight": w[:2]}  # shared storage is not allowed by safetensors
    save_sharded_safetensors(sd, tmp_path, max_shard_bytes=1 << 20, prefix="model")
    loaded = load_sharded_safetensors(tmp_path / "model.safetensors.index.json")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_missing_shard_is_named(tmp_path, mixed_sd):
    save_sharded_safetensors(mixed_sd, tmp_path, max_shard_bytes=600)
    victim = sorted(tmp_path.glob("*-00002-of-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_sharded_safetensors(tmp_path)


def test_key_in_index_but_not_in_shard(tmp_path, mixed_sd):
    index_path = save_sharded_safetensors(mixed_sd, tmp_path, max_shard_bytes=600)
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["blocks.9.ghost.weight"] = first
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"blocks\.9\.ghost\.weight"):
        load_sharded_safetensors(tmp_path)


def test_duplicate_key_in_two_shards(tmp_path, mixed_sd):
    index_path = save_sharded_safetensors(mixed_sd, tmp_path, max_shard_bytes=600)
    index = json.loads(index_path.read_text())
    s1, s2 = sorted(set(index["weight_map"].values()))[:2]
    key_of_s1 = next(k for k, s in index["weight_map"].items() if s == s1)
    content = load_file(tmp_path / s2)
    content[key_of_s1] = torch.zeros(1)
    save_file(content, str(tmp_path / s2))
    with pytest.raises(CheckpointError, match=rf"duplicate.*{key_of_s1}"):
        load_sharded_safetensors(tmp_path)


def test_duplicate_key_in_index_json(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "m-00001-of-00001.safetensors"))
    raw = '{"metadata": {}, "weight_map": {"a": "m-00001-of-00001.safetensors", "a": "m-00001-of-00001.safetensors"}}'
    (tmp_path / "m.safetensors.index.json").write_text(raw)
    with pytest.raises(CheckpointError, match="duplicate key.*: a"):
        load_sharded_safetensors(tmp_path)


def test_ambiguous_folder(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="one.safetensors, two.safetensors"):
        load_sharded_safetensors(tmp_path)


@pytest.mark.parametrize("loader", [load_sharded_safetensors, load_torch_pth, load_peft_lora])
def test_nonexistent_path_is_named(tmp_path, loader):
    with pytest.raises(CheckpointError, match="does not exist: .*nope.safetensors"):
        loader(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="Quark-Vision/Live-Avatar"):  # hub ids are never fetched
        loader("Quark-Vision/Live-Avatar")


@pytest.mark.parametrize("bad", [0, -5, 1.5])
def test_save_rejects_bad_shard_size(tmp_path, bad):
    with pytest.raises(CheckpointError, match="max_shard_bytes"):
        save_sharded_safetensors({"a": torch.zeros(1)}, tmp_path, max_shard_bytes=bad)


# ------------------------------------------------------------------------------------------ .pth


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("legacy", [False, True])
def test_load_torch_pth(tmp_path, wrapper, legacy):
    sd = _random_state_dict(TinyDiT(num_blocks=1))
    payload = sd if wrapper is None else {wrapper: sd, "epoch": 3}
    path = tmp_path / "vae.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    _assert_same(load_torch_pth(path), sd)


class _NotAllowed:
    pass


def test_load_torch_pth_rejects_unsafe_and_non_tensor(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"x": _NotAllowed()}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_torch_pth(unsafe)
    mixed = tmp_path / "mixed.pth"
    torch.save({"w": torch.zeros(2), "note": "hello"}, mixed)
    with pytest.raises(CheckpointError, match="non-tensor entry.*note"):
        load_torch_pth(mixed)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_torch_pth(garbage)


# ------------------------------------------------------------------------------------------ strict loading


def test_strict_reports_missing_unexpected_and_shape_together():
    model = TinyDiT()
    sd = _random_state_dict(model)
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    sd["head.weight"] = torch.zeros(16, DIM + 1)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, sd, what="TinyDiT")
    msg = str(info.value)
    assert msg.startswith("TinyDiT checkpoint does not match")
    assert "1 missing key" in msg and "blocks.1.ffn.2.bias" in msg
    assert "1 unexpected key" in msg and "blocks.0.self_attn.extra.weight" in msg
    assert "1 shape mismatch" in msg and f"head.weight: checkpoint (16, {DIM + 1}) vs model (16, {DIM})" in msg


def test_strict_error_lists_first_twenty_with_count():
    model = TinyDiT()
    sd = _random_state_dict(model)
    extra = [f"ghost.{i:02d}" for i in range(25)]
    sd.update({k: torch.zeros(1) for k in extra})
    with pytest.raises(CheckpointError, match=r"25 unexpected keys.*ghost\.19, \.\.\. \(\+5 more\)") as info:
        load_state_dict_strict(model, sd)
    assert "ghost.20" not in str(info.value)


def test_strict_load_into_meta_module():
    with torch.device("meta"):
        model = TinyDiT()
    sd = _random_state_dict(TinyDiT())
    report = load_state_dict_strict(model, sd, what="TinyDiT", dtype=torch.bfloat16)
    loaded = model.state_dict()
    for k, v in sd.items():
        assert loaded[k].device.type == "cpu", k
        expected_dtype = (
            v.dtype if not v.is_floating_point() else (torch.float32 if "modulation" in k else torch.bfloat16)
        )  # _keep_in_fp32_modules
        assert loaded[k].dtype == expected_dtype, k
        assert torch.equal(loaded[k], v.to(expected_dtype)), k
    assert report.num_tensors == len(sd)
    assert report.still_meta == ("freqs",)  # the non-persistent buffer is the model's job
    x = torch.randn(2, DIM, dtype=torch.bfloat16)
    y = model.blocks[0].self_attn.q(x)  # real tensors now: the layer runs
    ref = x.double() @ sd["blocks.0.self_attn.q.weight"].double().T + sd["blocks.0.self_attn.q.bias"].double()
    torch.testing.assert_close(y.double(), ref, atol=0.1, rtol=0.05)


def test_strict_load_keeps_module_dtype_when_none_given():
    model = TinyDiT()
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _random_state_dict(model).items()}
    load_state_dict_strict(model, sd)
    assert model.head.weight.dtype == torch.float32
    assert torch.equal(model.head.weight.detach(), sd["head.weight"].float())
    assert model.step.dtype == torch.int64 and torch.equal(model.step, sd["step"])


# ------------------------------------------------------------------------------------------ LoRA


def _write_lora(path, model, rank, *, prefix=PEFT_PREFIX, adapter=".default", seed=7, extra=None):
    """A PEFT-style LoRA file for every target Linear of ``model`` (found independently by type + name)."""
    g = torch.Generator().manual_seed(seed)
    layers = dict(model.named_modules())
    tensors = {}
    for name in sorted(_targets_by_type(model)):
        lin = layers[name]
        tensors[f"{prefix}{name}.lora_A{adapter}.weight"] = torch.randn(rank, lin.in_features, generator=g)
        tensors[f"{prefix}{name}.lora_B{adapter}.weight"] = torch.randn(lin.out_features, rank, generator=g)
    tensors.update(extra or {})
    save_file(tensors, str(path))
    return tensors


def _reference_merge(base, lora_tensors, scale, prefix, adapter):
    """float64 W + scale * B @ A for every LoRA pair in the raw file tensors."""
    out = {}
    for key, a in lora_tensors.items():
        if f".lora_A{adapter}." not in key:
            continue
        module = key[len(prefix) :].split(f".lora_A{adapter}.")[0]
        b = lora_tensors[key.replace(".lora_A", ".lora_B")]
        out[f"{module}.weight"] = base[f"{module}.weight"].double() + scale * (b.double() @ a.double())
    return out


@pytest.mark.parametrize("prefix", [PEFT_PREFIX, ""])
@pytest.mark.parametrize("adapter", [".default", ""])
def test_lora_merge_matches_float64(tmp_path, prefix, adapter):
    model = TinyDiT()
    base = _random_state_dict(model)
    full_mod = torch.randn(1, 6, DIM)
    rank, alpha = 4, 3.0
    raw = _write_lora(
        tmp_path / "lora.safetensors",
        model,
        rank,
        prefix=prefix,
        adapter=adapter,
        extra={f"{prefix}blocks.1.modulation": full_mod},
    )
    lora = load_peft_lora(tmp_path / "lora.safetensors")
    assert set(lora.pairs) == _targets_by_type(model)  # prefix and adapter name normalised away
    assert set(lora.full) == {"blocks.1.modulation"}

    expected = _reference_merge(base, raw, alpha / rank, prefix, adapter)
    untouched = {k: v.clone() for k, v in base.items() if k not in expected and k != "blocks.1.modulation"}
    report = merge_lora(base, lora, alpha=alpha, rank=rank)

    assert report.num_merged == len(_targets_by_type(model)) == 2 * 10 + 4
    assert report.replaced == ("blocks.1.modulation",) and report.num_replaced == 1
    assert report.scale == alpha / rank
    for k, ref in expected.items():
        assert base[k].dtype == torch.float32
        torch.testing.assert_close(base[k].double(), ref, atol=1e-5, rtol=1e-6)
    assert torch.equal(base["blocks.1.modulation"], full_mod)
    for k, v in untouched.items():  # biases, norms, non-targets: unchanged (the LoRA has no bias)
        assert torch.equal(base[k], v), k


def test_lora_target_modules_suffix_matching():
    model = TinyDiT()
    found = lora_target_modules(model.state_dict())
    assert set(found) == _targets_by_type(model)
    assert not any("norm_q" in f or "norm_k" in f for f in found)
    with torch.device("meta"):
        meta = TinyDiT(num_blocks=5)
    assert len(lora_target_modules(meta.state_dict())) == 5 * 10 + 4  # works on the meta device


def test_lora_merge_bf16_and_adapter_config(tmp_path):
    model = TinyDiT()
    base = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _random_state_dict(model).items()}
    raw = _write_lora(tmp_path / "liveavatar.safetensors", model, rank=2)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3, "peft_type": "LORA"}))
    lora = load_peft_lora(tmp_path)  # folder with a single .safetensors
    expected = _reference_merge(base, raw, 3 / 2, PEFT_PREFIX, ".default")
    report = merge_lora(base, lora)  # alpha and r from adapter_config.json
    assert (report.rank, report.alpha, report.scale) == (2, 3.0, 1.5)
    for k, ref in expected.items():
        assert base[k].dtype == torch.bfloat16
        # fp32 compute then one rounding to bf16: within one bf16 ulp (2^-8 relative) of the exact value
        assert torch.all((base[k].double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6), k

    base2 = _random_state_dict(model)
    report2 = merge_lora(base2, lora, alpha=1.0)  # an explicit alpha wins over the file's config
    assert report2.scale == 0.5


def test_lora_base_layer_full_tensor_then_merge(tmp_path):
    model = TinyDiT()
    base = _random_state_dict(model)
    new_q = torch.randn(DIM, DIM)
    raw = _write_lora(
        tmp_path / "l.safetensors", model, rank=2, extra={f"{PEFT_PREFIX}blocks.0.self_attn.q.base_layer.weight": new_q}
    )
    lora = load_peft_lora(tmp_path / "l.safetensors")
    merge_lora(base, lora, alpha=2.0, rank=2)
    a = raw[f"{PEFT_PREFIX}blocks.0.self_attn.q.lora_A.default.weight"].double()
    b = raw[f"{PEFT_PREFIX}blocks.0.self_attn.q.lora_B.default.weight"].double()
    torch.testing.assert_close(
        base["blocks.0.self_attn.q.weight"].double(), new_q.double() + b @ a, atol=1e-5, rtol=1e-6
    )


def test_lora_missing_base_key_and_shape_mismatch_are_named(tmp_path):
    model = TinyDiT()
    base = _random_state_dict(model)
    _write_lora(
        tmp_path / "l.safetensors",
        model,
        rank=2,
        extra={
            "blocks.7.self_attn.q.lora_A.default.weight": torch.zeros(2, DIM),
            "blocks.7.self_attn.q.lora_B.default.weight": torch.zeros(DIM, 2),
            f"{PEFT_PREFIX}blocks.0.ffn.0.lora_A.default.weight": torch.zeros(2, DIM + 3),  # wrong in-features
            "blocks.0.norm3.weight": torch.zeros(DIM + 1),  # full tensor of the wrong shape
        },
    )
    lora = load_peft_lora(tmp_path / "l.safetensors")
    before = {k: v.clone() for k, v in base.items()}
    with pytest.raises(CheckpointError) as info:
        merge_lora(base, lora, alpha=2.0, rank=2)
    msg = str(info.value)
    assert "blocks.7.self_attn.q" in msg and "missing" in msg
    assert f"blocks.0.ffn.0 (lora_B ({FFN}, 2) @ lora_A (2, {DIM + 3})" in msg and f"({FFN}, {DIM})" in msg
    assert f"blocks.0.norm3.weight (full tensor ({DIM + 1},) vs base ({DIM},))" in msg
    _assert_same(base, before)  # nothing was changed: validation happens before merging


def test_lora_rank_mismatch(tmp_path):
    model = TinyDiT(num_blocks=1)
    _write_lora(tmp_path / "l.safetensors", model, rank=4)
    with pytest.raises(CheckpointError, match="rank 4 .* expected r=128"):
        merge_lora(_random_state_dict(model), load_peft_lora(tmp_path / "l.safetensors"))


def test_lora_strict_vs_lenient_for_what_peft_would_ignore(tmp_path):
    model = TinyDiT(num_blocks=1)
    _write_lora(
        tmp_path / "l.safetensors",
        model,
        rank=2,
        extra={
            "blocks.0.norm3.lora_A.default.weight": torch.zeros(2, DIM),  # not a target
            "blocks.0.norm3.lora_B.default.weight": torch.zeros(DIM, 2),
            "blocks.0.self_attn.k.weight": torch.zeros(DIM, DIM),  # targeted layer without '.base_layer.'
            "not.in.model": torch.zeros(1),
        },
    )
    lora = load_peft_lora(tmp_path / "l.safetensors")
    with pytest.raises(CheckpointError) as info:
        merge_lora(_random_state_dict(model), lora, alpha=2.0, rank=2)
    for name in ("blocks.0.norm3", "blocks.0.self_attn.k.weight", "base_layer", "not.in.model"):
        assert name in str(info.value)
    base = _random_state_dict(model)
    k_before = base["blocks.0.self_attn.k.weight"].clone()
    report = merge_lora(base, lora, alpha=2.0, rank=2, strict=False)
    assert set(report.ignored) == {"blocks.0.norm3", "blocks.0.self_attn.k.weight", "not.in.model"}
    assert report.num_merged == len(_targets_by_type(model)) == 14 and report.num_replaced == 0
    assert not torch.equal(base["blocks.0.self_attn.k.weight"], k_before)  # merged, not replaced by zeros


def test_lora_file_errors(tmp_path):
    save_file({"blocks.0.self_attn.q.lora_A.default.weight": torch.zeros(2, DIM)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="without both lora_A and lora_B: blocks.0.self_attn.q"):
        load_peft_lora(tmp_path / "a.safetensors")
    save_file(
        {"x.q.lora_A.default.weight": torch.zeros(2, DIM), "x.q.lora_B.default.weight": torch.zeros(DIM, 3)},
        str(tmp_path / "b.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"x.q \(lora_A \(2, 8\), lora_B \(8, 3\)"):
        load_peft_lora(tmp_path / "b.safetensors")
    save_file(
        {
            "x.q.lora_A.weight": torch.zeros(2, DIM),
            f"{PEFT_PREFIX}x.q.lora_A.weight": torch.zeros(2, DIM),
            "x.q.lora_B.weight": torch.zeros(DIM, 2),
        },
        str(tmp_path / "c.safetensors"),
    )
    with pytest.raises(CheckpointError, match="duplicate key"):
        load_peft_lora(tmp_path / "c.safetensors")
    save_file({"x.q.lora_magnitude_vector.default.weight": torch.zeros(DIM)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="unsupported LoRA key form"):
        load_peft_lora(tmp_path / "d.safetensors")
