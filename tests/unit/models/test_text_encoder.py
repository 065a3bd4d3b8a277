"""umT5 text encoder: float64 reference, padding invariance, determinism, real-size layout on meta."""

import math

import pytest
import torch

from models.text_encoder import (
    BYTE_OFFSET,
    ByteTokenizer,
    TextEncoder,
    TextEncoderConfig,
    TextEncoderError,
    UMT5Encoder,
    relative_position_bucket,
)

pytestmark = pytest.mark.unit


def _bucket_scalar(rel: int, num_buckets: int, max_distance: int) -> int:
    """T5 bidirectional bucket, written out in plain Python from the definition."""
    half = num_buckets // 2
    out = half if rel > 0 else 0
    d = abs(rel)
    exact = half // 2
    if d < exact:
        return out + d
    b = exact + int(math.log(d / exact) / math.log(max_distance / exact) * (half - exact))
    return out + min(b, half - 1)


def _reference_forward_f64(state: dict, cfg: TextEncoderConfig, ids: list[int]) -> torch.Tensor:
    """Loop-heavy float64 umT5 encoder over an unpadded sequence, straight from the state dict."""
    sd = {k: v.double() for k, v in state.items()}
    n, heads, dh = len(ids), cfg.num_heads, cfg.head_dim
    x = sd["token_embedding.weight"][torch.tensor(ids)]  # [n, D]

    def rms(v, w):
        return w * v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.eps)

    def gelu_tanh(v):
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q = (h @ sd[p + "attn.q.weight"].T).view(n, heads, dh)
        k = (h @ sd[p + "attn.k.weight"].T).view(n, heads, dh)
        v = (h @ sd[p + "attn.v.weight"].T).view(n, heads, dh)
        table = sd[p + "pos_embedding.embedding.weight"]  # [buckets, heads]
        out = torch.zeros(n, heads, dh, dtype=torch.float64)
        for hd in range(heads):
            for a in range(n):
                logits = torch.stack([
                    q[a, hd] @ k[b, hd] + table[_bucket_scalar(b - a, cfg.num_buckets, cfg.max_distance), hd]
                    for b in range(n)
                ])
                w = torch.softmax(logits, 0)
                out[a, hd] = (w[:, None] * v[:, hd]).sum(0)
        x = x + out.reshape(n, -1) @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)) @ sd[
            p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_bucket_matches_definition():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel, 32, 128).tolist()
    assert got == [_bucket_scalar(int(r), 32, 128) for r in rel]
    # spot checks of the T5 convention: 0 -> 0, key after query -> upper half, far -> last bucket
    assert got[300] == 0 and got[301] == 17 and got[299] == 1 and got[0] == 15 and got[-1] == 31


def test_tiny_forward_matches_float64_reference():
    torch.set_num_threads(1)
    enc = TextEncoder.random(TextEncoderConfig.tiny(), seed=3)
    text = "Hello, avatar!"
    ids, mask = enc.tokenize([text])
    n = int(mask.sum())
    assert n == len(text.encode()) + 1 and ids[0, n - 1] == 1  # bytes + EOS
    got = enc.encode_prompt(text)
    ref = _reference_forward_f64(enc.model.state_dict(), enc.config, ids[0, :n].tolist())
    assert got.shape == (n, enc.config.dim)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_output_does_not_depend_on_padding():
    cfg = TextEncoderConfig.tiny()
    enc = TextEncoder.random(cfg, seed=0)
    ids, mask = ByteTokenizer(64)(["a short prompt"])
    n = int(mask.sum())
    outs = []
    for pad_to, filler in [(n, 0), (20, 0), (64, 0), (40, 123)]:  # 123: garbage ids under mask 0
        i2 = torch.full((1, pad_to), filler, dtype=torch.long)
        i2[0, :n] = ids[0, :n]
        m2 = torch.zeros((1, pad_to), dtype=torch.long)
        m2[0, :n] = 1
        outs.append(enc.model.encode(i2, m2)[0])
    for o in outs[1:]:
        assert o.shape == outs[0].shape == (n, cfg.dim)
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_batch_encode_zeroes_past_each_length():
    enc = TextEncoder.random(seed=0)
    ids, mask = enc.tokenize(["short", "a noticeably longer prompt"])
    out = enc.model.encode(ids, mask)  # [2, Lmax, D]
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert out.shape[1] == n1 and n0 < n1
    assert torch.count_nonzero(out[0, n0:]) == 0
    torch.testing.assert_close(out[0, :n0], enc.encode_prompt("short"), rtol=1e-5, atol=1e-6)


def test_determinism_and_seed_dependence():
    a = TextEncoder.random(seed=7).encode_prompt("same words")
    b = TextEncoder.random(seed=7).encode_prompt("same words")
    c = TextEncoder.random(seed=8).encode_prompt("same words")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_prompt_cleaning_and_truncation():
    tok = ByteTokenizer(8)
    ids, mask = tok(["  two \n\t words  ", "x" * 50])
    # whitespace collapsed to "two words", truncated to 7 bytes + EOS
    assert ids[0].tolist() == [b + BYTE_OFFSET for b in b"two wor"] + [1]
    assert mask[1].sum() == 8 and ids[1, 7] == 1  # truncated, EOS kept


def test_real_config_on_meta():
    cfg = TextEncoderConfig()
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    sd = model.state_dict()
    d, f, v, layers = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.num_layers
    per_layer = 4 * d * cfg.dim_attn + 3 * d * f + 2 * d + cfg.num_buckets * cfg.num_heads
    assert sum(p.numel() for p in model.parameters()) == v * d + layers * per_layer + d
    assert 5.6e9 < v * d + layers * per_layer + d < 5.8e9
    assert len(sd) == 1 + 10 * layers + 1
    expect = {
        "token_embedding.weight": (256384, 4096),
        "blocks.0.attn.q.weight": (4096, 4096),
        "blocks.23.attn.o.weight": (4096, 4096),
        "blocks.5.ffn.gate.0.weight": (10240, 4096),
        "blocks.5.ffn.fc1.weight": (10240, 4096),
        "blocks.5.ffn.fc2.weight": (4096, 10240),
        "blocks.11.pos_embedding.embedding.weight": (32, 64),
        "blocks.0.norm1.weight": (4096,),
        "norm.weight": (4096,),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    assert model(ids, torch.ones_like(ids)).shape == (1, 8, 4096)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    cfg = TextEncoderConfig.tiny()
    src = TextEncoder.random(cfg, seed=5)
    path = tmp_path / "t5.pth"
    torch.save(src.model.state_dict(), path)
    loaded = TextEncoder.from_pretrained(path, None, cfg, dtype=torch.float32)
    assert torch.equal(loaded.encode_prompt("hi there"), src.encode_prompt("hi there"))

    bad = dict(src.model.state_dict())
    bad["blocks.0.attn.q.weight"] = torch.zeros(3, 3)
    bad.pop("norm.weight")
    torch.save(bad, path)
    with pytest.raises(TextEncoderError, match="missing.*norm.weight.*wrong shape"):
        TextEncoder.from_pretrained(path, None, cfg)
    with pytest.raises(TextEncoderError, match="not found.*nope.pth"):
        TextEncoder.from_pretrained(tmp_path / "nope.pth", None, cfg)
    with pytest.raises(TextEncoderError, match="tokenizer folder not found"):
        TextEncoder.from_pretrained(path, tmp_path / "no_tokenizer", cfg)


def test_bad_inputs():
    enc = TextEncoder.random(seed=0)
    ids, mask = enc.tokenize(["ok"])
    with pytest.raises(TextEncoderError, match="out of range"):
        enc.model.encode(ids + 1000, mask)
    with pytest.raises(TextEncoderError, match="mask shape"):
        enc.model.encode(ids, mask[:, :5])
    with pytest.raises(TextEncoderError, match="at least one real token"):
        enc.model.encode(ids, torch.zeros_like(mask))
    with pytest.raises(TextEncoderError, match="must be a str"):
        enc.encode_prompt(None)
    with pytest.raises(TextEncoderError, match="divisible"):
        TextEncoderConfig(dim_attn=30, num_heads=4)
