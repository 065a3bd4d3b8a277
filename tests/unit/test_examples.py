"""The bundled examples/ folder and services/common/examples.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.training.synthetic import face_params, reference_image
from services.common import examples as ex

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_examples_dir_is_the_repository_folder_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv(ex.ENV_VAR, raising=False)
    assert ex.examples_dir() == ROOT / "examples"
    monkeypatch.setenv(ex.ENV_VAR, str(tmp_path))
    assert ex.examples_dir() == tmp_path
    assert ex.face_for("music_producer") == tmp_path / "faces" / "face_977.png"


def test_every_example_and_face_is_in_the_folder(examples):
    for name in ex.EXAMPLE_NAMES:
        assert ex.photo_path(name, examples).is_file(), name
        assert ex.speech_path(name, examples).is_file(), name
        assert ex.face_for(name, examples).is_file(), name
    # the pairing covers every speech with a distinct face
    assert sorted(ex.FACE_FOR_SPEECH) == sorted(p.stem for p in examples.glob("*.wav"))
    assert len(set(ex.FACE_FOR_SPEECH.values())) == len(ex.EXAMPLE_NAMES)
    assert (examples / "NOTICE.md").read_text().count("Apache") >= 1


@pytest.mark.parametrize("identity", ex.FACE_IDENTITIES)
def test_the_committed_faces_are_what_the_renderer_draws_now(examples, identity):
    committed = np.asarray(Image.open(ex.face_path(identity, examples)).convert("RGB"))
    rendered = reference_image(face_params(identity))
    assert committed.shape == rendered.shape
    np.testing.assert_array_equal(committed, rendered)


def test_the_demo_faces_are_held_out_identities():
    from models.training.data import identities_split
    from models.training.recipe import TrainConfig
    from services.cli.demo import DEMO_IDENTITIES

    cfg = TrainConfig()
    train, held_out = identities_split(cfg.num_identities, cfg.train_identities)
    assert tuple(DEMO_IDENTITIES) == ex.FACE_IDENTITIES
    assert all(i in held_out and i not in train for i in ex.FACE_IDENTITIES)


def test_output_names_say_what_the_video_shows():
    assert ex.output_stem("cyclops_baker") == "face_812-speaks-cyclops_baker"


def test_the_module_does_not_import_torch():
    code = "import sys\nimport services.common.examples\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
