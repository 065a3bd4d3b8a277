"""``liveavatar inspect`` (services/cli/inspect_cmd.py), driven through its argparse entry point."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from models.config import DiTConfig
from models.dit import CausalWanS2V
from models.flops import analytic_flops
from services.cli import inspect_cmd

pytestmark = pytest.mark.unit


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="liveavatar inspect")
    inspect_cmd.add_arguments(parser)
    rc = inspect_cmd.run(parser.parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def reference_report():
    return inspect_cmd.inspect_config("reference")


def test_reference_counts_match_an_independent_meta_model(reference_report):
    dit = reference_report["parameters"]["dit"]
    model = CausalWanS2V(DiTConfig(), dtype=torch.bfloat16, device="meta")
    assert dit["parameters"] == sum(p.numel() for p in model.parameters())
    assert abs(dit["parameters"] - 16.296e9) < 0.0005e9          # §1.2
    assert dit["state_dict_keys"] == 1260                          # §1.8
    vae = reference_report["parameters"]["vae"]
    assert abs(vae["parameters"] - 126.9e6) < 0.05e6 and abs(vae["decoder_parameters"] - 73.3e6) < 0.05e6  # §5


def test_reference_resolution_and_flops(reference_report):
    r = reference_report["resolution"]
    assert (r["height"], r["width"], r["latent_hw"]) == (384, 704, [48, 88])
    assert (r["tokens_per_block"], r["sink_tokens"], r["attention_keys_steady_state"]) == (3168, 2640, 15312)
    f = reference_report["flops"]
    assert f["step_steady_state"] == analytic_flops(DiTConfig(), (48, 88), steady_state=True)["step"]
    assert f["block_steady_state"]["total"] == 4 * f["step_steady_state"]["total"]
    assert f["block_first"]["total"] == 4 * f["step_first_block"]["total"]
    assert abs(reference_report["tflop"]["step_steady_state"] - 123) < 0.5    # §9
    assert abs(reference_report["tflop"]["step_first_block"] - 98) < 0.5
    bound = reference_report["physical_bound"]
    assert abs(bound["tpp"]["fps_bf16"] - 97) < 1 and abs(bound["claimed"]["mfu_bf16"] - 0.46) < 0.01


def test_tiny_cli_prints_json(capsys):
    rc, out, err = _run(["--config", "tiny"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert (rep["resolution"]["height"], rep["resolution"]["width"]) == (64, 64)
    from models.liveavatar import LiveAvatarConfig, build_models

    models = build_models(LiveAvatarConfig.tiny(), parts={"dit", "vae"})
    assert rep["parameters"]["dit"]["parameters"] == sum(p.numel() for p in models.dit.parameters())
    assert rep["parameters"]["dit"]["state_dict_keys"] == len(models.dit.state_dict())
    assert rep["parameters"]["vae"]["parameters"] == sum(p.numel() for p in models.vae.parameters())
    assert rep["analytic_check"]["max_relative_error"] == 0


def test_explicit_resolution(capsys):
    rc, out, _ = _run(["--config", "tiny", "--height", "128", "--width", "64", "--no-encoders"], capsys)
    assert rc == 0
    rep = json.loads(out)
    assert rep["resolution"]["latent_hw"] == [16, 8]
    assert rep["resolution"]["tokens_per_block"] == 3 * 8 * 4
    assert "audio_encoder" not in rep["parameters"]


@pytest.mark.parametrize("argv, needle", [
    (["--config", "no-such-config"], "config must be"),
    (["--config", "tiny", "--height", "70", "--width", "64"], "multiples"),
    (["--config", "tiny", "--height", "32", "--width", "32"], "too small"),
    (["--config", "tiny", "--height", "64"], "both --height and --width"),
    (["--config", "tiny", "--device-spec", "tpu-v9"], "unknown device"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
