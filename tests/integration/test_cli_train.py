"""``liveavatar train --quick``: every stage runs, the checkpoint loads through the normal path, and a
rerun resumes instead of training again."""

from __future__ import annotations

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
    assert set(summary["stages"]) == {"vae", "vae_stream", "teacher", "causal", "dmd"}
    assert all(s["resumed_from"] == 0 for s in summary["stages"].values())
    ckpt = out / "checkpoint"
    models = build_models(LiveAvatarConfig.load(ckpt), checkpoint=ckpt)
    assert not models.random_weights
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
