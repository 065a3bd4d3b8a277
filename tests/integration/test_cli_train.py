"""``liveavatar train --quick``: every stage runs, the checkpoint loads through the normal path, and a
rerun resumes instead of training again."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from models.liveavatar import LiveAvatarConfig, build_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train(out, examples, *extra):
    return subprocess.run([sys.executable, "-m", "services.cli", "train", "--out", str(out), "--quick",
                           "--examples", str(examples), "--threads", "1", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=900)


def test_quick_training_writes_a_loadable_checkpoint_and_resumes(tmp_path, examples):
    out = tmp_path / "run"
    r = _train(out, examples)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(summary["stages"]) == {"vae", "vae_stream", "decoder", "teacher", "causal", "dmd"}
    assert all(s["resumed_from"] == 0 for s in summary["stages"].values())
    ckpt = out / "checkpoint"
    models = build_models(LiveAvatarConfig.load(ckpt), checkpoint=ckpt)
    assert not models.random_weights
    assert models.config.vae.decoder_dim == 8 and models.config.vae.dim == 12     # stage 1c's narrow decoder
    # the trained DiT is not the seeded random init of the same config
    fresh = build_models(LiveAvatarConfig.load(ckpt), seed=0, parts={"dit"})
    assert any(not torch.equal(a, b) for a, b in zip(models.dit.state_dict().values(),
                                                     fresh.dit.state_dict().values(), strict=True))
    # a rerun finds every stage done
    r2 = _train(out, examples)
    assert r2.returncode == 0, r2.stderr
    again = json.loads(r2.stdout[r2.stdout.index("{"):])
    assert all(s["resumed_from"] == s["steps"] for s in again["stages"].values())


def test_bad_override_is_a_clear_error(tmp_path, examples):
    r = _train(tmp_path / "run", examples, "--set", "no_such_knob=3")
    assert r.returncode == 2 and "--set wants KEY=VALUE" in r.stderr


def test_decoder_from_narrows_only_the_decoder_of_a_bundle(tmp_path, examples):
    """``--decoder-from DIR`` (how v5 came from v4): the new bundle's DiT, audio encoder and VAE encoder
    are DIR's tensors bit for bit, its decoder is the narrow one, and it loads through the normal path;
    a bundle already narrowed, or no folder at all, is a clear error (exit 2)."""
    from models.liveavatar import save_checkpoint
    from models.training.recipe import TrainConfig

    wide = dataclasses.replace(LiveAvatarConfig.load("tiny-trained"), vae=dataclasses.replace(
        TrainConfig().model_config().vae, decoder_dim=None))
    source = build_models(wide, seed=5)
    save_checkpoint(source, tmp_path / "wide")
    r = _train(tmp_path / "run", examples, "--decoder-from", str(tmp_path / "wide"))
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "run" / "checkpoint"
    narrow = build_models(LiveAvatarConfig.load(ckpt), checkpoint=ckpt)
    assert narrow.config.vae.decoder_dim == 8
    assert narrow.config.dit == source.config.dit and narrow.config.audio == source.config.audio
    for a, b in ((narrow.dit, source.dit), (narrow.audio, source.audio), (narrow.vae.encoder, source.vae.encoder),
                 (narrow.vae.conv1, source.vae.conv1)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in narrow.vae.decoder.parameters()) < sum(p.numel() for p in source.vae.decoder.parameters()) / 2

    again = _train(tmp_path / "run2", examples, "--decoder-from", str(ckpt))
    assert again.returncode == 2 and "already narrowed" in again.stderr
    missing = _train(tmp_path / "run3", examples, "--decoder-from", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no checkpoint folder" in missing.stderr
