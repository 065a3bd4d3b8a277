"""Real-size DiT on the meta device: parameter count, state-dict keys and shapes (§1.2, §1.8),
and the config.json reader/writer."""

import json
import re

import pytest
import torch

from models.checkpoint import load_state_dict_strict
from models.config import OFFICIAL_KEYS, ConfigError, DiTConfig
from models.dit import CausalWanS2V

pytestmark = pytest.mark.unit

#: The modules the dtype policy keeps in fp32 (models/dit.py docstring), spelled out independently.
FP32_KEY = re.compile(r"^(time_embedding\.|time_projection\.|head\.|blocks\.\d+\.modulation$|blocks\.\d+\.norm3\."
                      r"|audio_injector\.injector_adain_layers\.)")
FP32_FAMILIES = ("time_embedding.", "time_projection.", "head.", ".modulation", ".norm3.", "injector_adain_layers.")


@pytest.fixture(scope="module")
def meta_state():
    model = CausalWanS2V(DiTConfig(), dtype=torch.bfloat16, device="meta")
    return {k: v for k, v in model.state_dict().items()}


def _count(state, prefix=""):
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix))


def test_total_parameters_and_key_count(meta_state):
    assert all(v.device.type == "meta" for v in meta_state.values())
    assert all(v.dtype == (torch.float32 if FP32_KEY.match(k) else torch.bfloat16) for k, v in meta_state.items())
    assert len(meta_state) == 1260
    assert abs(_count(meta_state) - 16.296e9) < 0.0005e9


@pytest.mark.parametrize("prefix, expected, tol", [
    ("blocks.", 14.056e9, 0.0005e9),
    ("audio_injector.", 1.888e9, 0.0005e9),
    ("time_projection.", 157e6, 0.5e6),
    ("casual_audio_encoder.", 95e6, 0.5e6),
    ("text_embedding.", 47e6, 0.5e6),
    ("time_embedding.", 27.5e6, 0.05e6),
    ("frame_packer.", 23.9e6, 0.05e6),
])
def test_component_parameter_counts(meta_state, prefix, expected, tol):
    assert abs(_count(meta_state, prefix) - expected) < tol


TABLE_1_8 = {
    "patch_embedding.weight": (5120, 16, 1, 2, 2),
    "cond_encoder.weight": (5120, 16, 1, 2, 2),
    "text_embedding.0.weight": (5120, 4096),
    "text_embedding.2.weight": (5120, 5120),
    "time_embedding.0.weight": (5120, 256),
    "time_projection.1.weight": (30720, 5120),
    "blocks.0.modulation": (1, 6, 5120),
    "blocks.0.self_attn.q.weight": (5120, 5120),
    "blocks.0.self_attn.norm_q.weight": (5120,),
    "blocks.0.cross_attn.k.bias": (5120,),
    "blocks.0.norm3.weight": (5120,),
    "blocks.0.ffn.0.weight": (13824, 5120),
    "blocks.0.ffn.2.weight": (5120, 13824),
    "head.head.weight": (64, 5120),
    "head.modulation": (1, 2, 5120),
    "casual_audio_encoder.weights": (1, 25, 1, 1),
    "casual_audio_encoder.encoder.conv1_local.conv.weight": (5120, 1024, 3),
    "casual_audio_encoder.encoder.conv1_global.conv.weight": (1280, 1024, 3),
    "casual_audio_encoder.encoder.conv2.conv.weight": (2560, 1280, 3),
    "casual_audio_encoder.encoder.final_linear.weight": (5120, 5120),
    "casual_audio_encoder.encoder.padding_tokens": (1, 1, 1, 5120),
    "audio_injector.injector.0.q.weight": (5120, 5120),
    "audio_injector.injector.0.norm_k.weight": (5120,),
    "audio_injector.injector_adain_layers.0.linear.weight": (10240, 5120),
    "frame_packer.proj_4x.weight": (5120, 16, 4, 8, 8),
    "trainable_cond_mask.weight": (3, 5120),
}


@pytest.mark.parametrize("key", sorted(TABLE_1_8))
def test_key_shapes_of_the_reference_table(meta_state, key):
    assert key in meta_state
    assert tuple(meta_state[key].shape) == TABLE_1_8[key]


def test_keys_that_must_not_exist(meta_state):
    bad = [k for k in meta_state
           if ".norm1." in k or ".norm2." in k or k.startswith("motioner.") or "injector_pre_norm" in k
           or k.startswith("causal_audio_encoder.")]
    assert bad == []
    assert len([k for k in meta_state if k.startswith("audio_injector.injector.")]) == 12 * 10
    assert {k.split(".")[1] for k in meta_state if k.startswith("blocks.")} == {str(i) for i in range(40)}
    assert len([k for k in meta_state if k.startswith("blocks.7.")]) == 27


def test_tiny_config_has_the_same_architecture(meta_state):
    """Same key set once block/injector indices are erased; same per-block layout."""
    tiny = CausalWanS2V(DiTConfig.tiny()).state_dict()

    def erase(keys):
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    assert erase(tiny) == erase(meta_state)
    assert len(tiny) == 1260 - 27 * 36 - 12 * 10


def _official_config_json():
    cfg = DiTConfig()
    data = {k: getattr(cfg, k) for k in OFFICIAL_KEYS}
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
    return {"_class_name": "WanModel_S2V", "_diffusers_version": "0.33.1", **data}


def test_from_json_reads_official_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_official_config_json()))
    assert DiTConfig.from_json(tmp_path / "config.json") == DiTConfig()
    assert DiTConfig.from_json(tmp_path) == DiTConfig()           # a checkpoint directory
    assert DiTConfig.from_json(_official_config_json()).audio_inject_layers == DiTConfig().audio_inject_layers


def test_from_json_rejects_unknown_keys():
    data = {**_official_config_json(), "zz_extra": 1, "aa_other": True}
    with pytest.raises(ConfigError) as err:
        DiTConfig.from_json(data)
    assert isinstance(err.value, ValueError)
    assert "aa_other" in str(err.value) and "zz_extra" in str(err.value)


@pytest.mark.parametrize("cfg", [DiTConfig(), DiTConfig.tiny(), DiTConfig.tiny(kv_cache_frames=9, sink_lead_max=12)])
def test_to_json_round_trip(tmp_path, cfg):
    path = tmp_path / "c.json"
    text = cfg.to_json(path)
    assert DiTConfig.from_json(path) == cfg
    assert DiTConfig.from_json(json.loads(text)) == cfg


@pytest.mark.parametrize("bad, word", [
    ({"dim": 100, "num_heads": 3}, "num_heads"),
    ({"audio_inject_layers": (0, 40)}, "audio_inject_layers"),
    ({"dim": "5120"}, "dim"),
    ({"enable_motioner": True}, "enable_motioner"),
    ({"framepack_buckets": (1, 2, 15)}, "framepack_buckets"),
    ({"kv_cache_frames": 2}, "kv_cache_frames"),
    ({"patch_size": (2, 2, 2)}, "patch_size"),
])
def test_invalid_config_values_are_named(bad, word):
    with pytest.raises(ConfigError, match=word):
        DiTConfig.from_json(bad)


def _dtypes(model):
    return {k: v.dtype for k, v in model.state_dict().items()}


def _policy(model, dtype):
    return {k: (torch.float32 if FP32_KEY.match(k) else dtype) for k in model.state_dict()}


def test_loading_in_bf16_keeps_exactly_the_fp32_modules():
    cfg = DiTConfig.tiny()
    torch.manual_seed(0)
    source = CausalWanS2V(cfg, dtype=torch.float64).state_dict()        # not bf16-representable
    keys = list(source)
    assert all(any(f in k for k in keys if FP32_KEY.match(k)) for f in FP32_FAMILIES)   # none is vacuous
    assert sum(bool(FP32_KEY.match(k)) for k in keys) < len(keys) / 2
    # 1. the loader casts a checkpoint: bf16, except the fp32 modules
    model = CausalWanS2V(cfg, dtype=torch.bfloat16, device="meta")
    load_state_dict_strict(model, source, what="DiT", dtype=torch.bfloat16)
    assert _dtypes(model) == _policy(model, torch.bfloat16)
    loaded = model.state_dict()
    for k, v in source.items():
        assert torch.equal(loaded[k], v.to(loaded[k].dtype)), k
    # 2. a bf16 file into a bf16-built model (no dtype given): the construction applied the same policy
    model2 = CausalWanS2V(cfg, dtype=torch.bfloat16, device="meta")
    load_state_dict_strict(model2, {k: v.to(torch.bfloat16) for k, v in source.items()}, what="DiT")
    assert _dtypes(model2) == _policy(model2, torch.bfloat16)
    # 3. a float64 model keeps everything float64 ("at least fp32")
    model3 = CausalWanS2V(cfg, dtype=torch.float64, device="meta")
    load_state_dict_strict(model3, source, what="DiT", dtype=torch.float64)
    assert set(_dtypes(model3).values()) == {torch.float64}


def test_seeded_bf16_models_follow_the_same_policy():
    from models.liveavatar import LiveAvatarConfig, build_models

    models = build_models(LiveAvatarConfig.load("tiny"), dtype=torch.bfloat16, seed=0, parts={"dit"})
    assert _dtypes(models.dit) == _policy(models.dit, torch.bfloat16)

