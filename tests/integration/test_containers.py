"""The images and the chart's tiny CPU profile as podman containers: one session through them, a lane killed.

``make test-containers`` runs this (it builds the images first: minutes on a cold cache). Plain ``make test``
skips it with the reason: it needs root podman, buildah and mmdebstrap, and LIVEAVATAR_CONTAINER_TESTS=1.

What it checks, through the containers only (the host talks to the published session API and Redis ports):
- the torch-free images really carry no torch, and their services import;
- the session API's image has espeak-ng (``POST .../speak``) and it speaks as the image's user;
- a tenant created from the host with ``liveavatar tenants create --redis-url`` can run a session;
- SIGKILL on one lane rank's container mid-session: the whole lane group is recreated (new containers for
  every rank, as LeaderWorkerSet's RecreateGroupOnPodRestart does) and the media resumes at the next block:
  no block skipped or repeated, and the stream's duration is the speech's;
- ``containers-down`` leaves no container and no network behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BLOCK_S = 0.48
LANE = "liveavatar-lane-default-0"
VICTIM = f"{LANE}-2"                       # a worker rank (denoise stage 2) of the only lane group
TORCH_FREE = {"session-api": "services.session_api.app", "stream-packager": "services.stream_packager.worker",
              "lane-controller": "services.lane_controller.controller", "webhooks": "services.webhooks.worker"}


def _skip_reason() -> str | None:
    from infra.containers import images

    if os.environ.get("LIVEAVATAR_CONTAINER_TESTS") != "1":
        return ("builds every image and runs the stack as containers (minutes): run `make test-containers` "
                "or set LIVEAVATAR_CONTAINER_TESTS=1")
    missing = images.missing_tools()
    if missing:
        return f"needs {' '.join(missing)} (`make images` installs them as root)"
    if os.geteuid() != 0:
        return "needs root podman (infra/containers/containers.conf is written for rootful podman)"
    return None


@pytest.fixture(scope="module")
def container_stack(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from infra.containers import images, stack

    os.environ["LIVEAVATAR_CONTAINERS_DIR"] = str(tmp_path_factory.mktemp("containers"))
    t0 = time.monotonic()
    report = images.build(log=lambda m: print(m, file=sys.stderr))
    print(f"images built in {time.monotonic() - t0:.0f} s: "
          + ", ".join(f"{k} {v['bytes'] / 1e6:.0f} MB" for k, v in report.items()), file=sys.stderr)
    t0 = time.monotonic()
    st = stack.up(timeout_s=900, log=lambda m: print(m, file=sys.stderr))
    print(f"containers up in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    try:
        yield st
    finally:
        stack.down(log=lambda m: print(m, file=sys.stderr))
        left = subprocess.run(["podman", "ps", "-a", "-q", "--filter", f"label={stack.LABEL}={stack.STACK}"],
                              env=images.podman_env(), capture_output=True, text=True).stdout.split()
        nets = subprocess.run(["podman", "network", "exists", stack.NETWORK], env=images.podman_env()).returncode
        os.environ.pop("LIVEAVATAR_CONTAINERS_DIR", None)
        assert left == [] and nets != 0, f"containers-down left {left} (network exists: {nets == 0})"


def _podman(*args: str) -> str:
    from infra.containers import images

    r = subprocess.run(["podman", *args], env=images.podman_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_torch_free_images_carry_no_torch_and_their_services_import(container_stack):
    from infra.containers import images

    for image, module in TORCH_FREE.items():
        if not images.image_exists(images.ref(image)):
            continue          # the webhooks image exists only with its service
        out = _podman("run", "--rm", "--entrypoint", "python", images.ref(image), "-c",
                      f"import importlib, importlib.util as u; importlib.import_module({module!r}); "
                      "print(u.find_spec('torch') is None)")
        assert out.strip() == "True", f"{image} has torch"
    out = _podman("run", "--rm", "--entrypoint", "python", images.ref("lane"), "-c",
                  "import torch; print(torch.__version__, torch.version.cuda)")
    assert out.split() == ["2.13.0+cpu", "None"]


def test_the_session_api_image_has_espeak_ng_for_speak(container_stack):
    """``POST /v1/sessions/{id}/speak`` runs espeak-ng in the session API's container: as the image's user,
    it turns text into a WAV of speech."""
    from infra.containers import images

    r = subprocess.run(["podman", "run", "--rm", "-i", "--entrypoint", "espeak-ng", images.ref("session-api"),
                        "--stdout", "-v", "en-us"], input=b"Hello, I am a live avatar.", env=images.podman_env(),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout[:4] == b"RIFF" and r.stdout[8:12] == b"WAVE" and len(r.stdout) > 20000, len(r.stdout)

def _speech(seconds: float) -> tuple[bytes, int, str]:
    import av

    from services.common.examples import FACE_FOR_SPEECH, examples_dir, speech_path

    name = "cyclops_baker"
    with av.open(str(speech_path(name))) as c:
        rate = c.streams.audio[0].rate
        x = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    pcm = (np.clip(x[: int(rate * seconds)], -1, 1) * 32767).astype("<i2").tobytes()
    return pcm, rate, str(examples_dir() / "faces" / f"face_{FACE_FOR_SPEECH[name]}.png")


def _lane_ids() -> dict[str, str]:
    from infra.containers import stack

    out = json.loads(_podman("ps", "--filter", f"label=io.liveavatar.group={LANE}", "--filter",
                             f"label={stack.LABEL}={stack.STACK}", "--format", "json"))
    return {c["Names"][0]: c["Id"] for c in out}


def test_a_session_survives_a_killed_lane_container(container_stack, tmp_path):
    from liveavatar_client import LiveAvatar

    from infra.containers import stack

    r = subprocess.run([sys.executable, "-m", "services.cli", "tenants", "create", "containers", "--max-sessions", "2",
                        "--redis-url", container_stack.redis_url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("la_")

    seconds = 4.0
    pcm, rate, face = _speech(seconds)
    session = LiveAvatar(container_stack.api_url, key, timeout=60).create_session(face, {"seed": 3, "idle": "pause"})
    errors: list = []

    def send():
        try:
            report = session.stream_audio(pcm, rate, fmt="pcm16", chunk_s=0.1, speed=2.0, end_timeout_s=600)
            errors.extend(report.errors)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(repr(exc))

    sender = threading.Thread(target=send)
    sender.start()
    init, first = session.read_media(until_block=2, timeout_s=600)
    before = _lane_ids()
    assert len(before) == 5, before                               # 4 denoise stages + the decoder
    _podman("kill", "--signal", "KILL", VICTIM)
    t_kill = time.monotonic()
    last = max(p.block for p in first if p.type == "fragment")
    last_block = int(np.ceil(seconds / BLOCK_S)) - 1               # 4 s of speech: blocks 0..8
    init2, rest = session.read_media(until_block=last_block, timeout_s=900, from_block=last + 1)
    resumed_s = time.monotonic() - t_kill
    sender.join(timeout=600)
    session.end()
    assert errors == [], errors

    after = _lane_ids()
    assert set(after) == set(before), after
    assert all(after[n] != before[n] for n in before), "the whole lane group must be recreated, not one rank"
    watch_log = (stack.state_dir() / "watch.log").read_text()
    assert f"lane group {LANE}" in watch_log and VICTIM in watch_log

    frags = [p for p in first + rest if p.type == "fragment"]
    blocks = [p.block for p in frags]
    assert blocks == list(range(last_block + 1)), blocks          # nothing skipped or repeated
    assert init and init2 == init
    out = tmp_path / "containers.mp4"
    out.write_bytes(init + b"".join(p.data for p in frags))
    probe = subprocess.run([shutil.which("ffprobe") or "ffprobe", "-v", "error", "-show_format", "-of", "json",
                            str(out)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    duration = float(json.loads(probe.stdout)["format"]["duration"])
    assert abs(duration - seconds) <= BLOCK_S + 0.05, duration
    print(f"lane killed at block {last}; media resumed to block {last_block} {resumed_s:.0f} s later",
          file=sys.stderr)
