"""The Triton audio backend against a real Triton Inference Server (the binary nvidia-pytriton ships).

Two real servers, each a subprocess from the separate ``.venv-triton`` (``infra/triton/setup.sh``),
bound to free loopback ports:

- the PyTriton dev server (``services/audio_encoder/triton_server.py``), tiny model, 1 thread:
  its features must equal the in-process :class:`TorchBackend` **bit for bit**, because both sides
  run the same torch / transformers versions, the same seeded weights, fp32, one CPU thread, and
  tensors travel in Triton's binary format (no float rounding on the wire);
- ``tritonserver`` itself on a CPU copy of the shipped production model repository
  (``services/audio_encoder/triton_repository``: instance kind -> KIND_CPU, model -> tiny). It keeps
  the shipped ``LIVEAVATAR_BATCHED=true`` (one wav2vec2 forward per merged batch), so it is compared
  bit for bit with ``TorchBackend(batched=True)`` on the same rows, and with the per-block encoder
  within 1e-5: same computation, only the GEMM sizes differ (observed max difference ~1e-6 on
  features of magnitude ~1, i.e. a few fp32 ulps accumulated over the layers).

Speech comes from ``examples/*.wav`` (24 kHz), resampled to 16 kHz by ``models.inputs.load_audio``.
Each server is stopped with SIGTERM at the end and the test checks that no process it started is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.audio_encoder import AudioEncoderConfig
from models.inputs import load_audio
from models.liveavatar import LiveAvatarConfig, build_models
from services.audio_encoder.backends import (
    AudioFeatureBackend,
    BackendConfigError,
    BackendInputError,
    TorchBackend,
    TritonBackend,
    TritonUnavailableError,
    make_backend,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRITON_VENV = ROOT / ".venv-triton"
TRITON_PY = TRITON_VENV / "bin" / "python"
SHIPPED_REPO = ROOT / "services" / "audio_encoder" / "triton_repository"
MODEL = "liveavatar_audio"
START_TIMEOUT_S = 90.0

if not TRITON_PY.exists():
    pytest.skip(f"{TRITON_VENV} is missing: create it with `bash infra/triton/setup.sh`", allow_module_level=True)


# ---------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (scans /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ServerProcess:
    """A server subprocess in its own session; ``stop()`` sends SIGTERM and checks nothing is left."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, http_port: int) -> None:
        self.name, self.log, self.http_port = name, log, http_port
        self.url = f"127.0.0.1:{http_port}"
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.known: set[int] = set()
        self.stopped_cleanly: bool | None = None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def wait_ready(self, config: AudioEncoderConfig) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.known |= _descendants(self.proc.pid)
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                TritonBackend(self.url, MODEL, timeout_s=2.0, config=config).close()
                self.known |= _descendants(self.proc.pid)
                return
            except TritonUnavailableError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"{self.name} not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")
                time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM, wait; SIGKILL (the processes we started, by id) only if it did not stop by itself."""
        if self.stopped_cleanly is not None:
            return
        self.known |= _descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
            deadline = time.monotonic() + 10
            while any(_alive(p) for p in self.known) and time.monotonic() < deadline:
                time.sleep(0.1)
        except subprocess.TimeoutExpired:
            pass
        leftovers = sorted(p for p in self.known | {self.proc.pid} if _alive(p))
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self._log_file.close()
        self.stopped_cleanly = not leftovers
        assert not leftovers, f"{self.name} left processes {leftovers} after SIGTERM:\n{self.log_tail()}"


def _triton_env() -> tuple[dict[str, str], Path]:
    """Environment for .venv-triton (its venv on PATH, libpython on LD_LIBRARY_PATH, the repo on PYTHONPATH)
    and the installed pytriton package folder (it holds the tritonserver binary)."""
    probe = subprocess.run(
        [str(TRITON_PY), "-c", "import importlib.util, json, sysconfig; "
         "s = importlib.util.find_spec('pytriton'); "
         "print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR') or '', "
         "'pytriton': s.submodule_search_locations[0] if s else ''}))"],
        capture_output=True, text=True, check=True, timeout=60)
    info = json.loads(probe.stdout)
    if not info["pytriton"]:
        pytest.fail(f"{TRITON_VENV} has no pytriton: run `bash infra/triton/setup.sh`")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (info["libdir"], env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{TRITON_VENV / 'bin'}:{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env, Path(info["pytriton"])


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    """The tiny encoder exactly as the worker and both servers build it (tiny config, weights seed 0)."""
    torch.set_num_threads(1)
    return build_models(LiveAvatarConfig.tiny(), seed=0, parts={"audio"}).audio


@pytest.fixture(scope="module")
def speech_blocks(examples, encoder) -> np.ndarray:
    """Three real-speech blocks from each example wav (start, middle, last full block): [9, 7680]."""
    n = encoder.config.block_samples
    blocks = []
    for wav in sorted(examples.glob("*.wav")):
        pcm = load_audio(wav, max_seconds=120)                     # 24 kHz -> 16 kHz mono float32
        full = len(pcm) // n
        assert full >= 3, f"{wav.name} is too short for the test"
        blocks += [pcm[i * n:(i + 1) * n] for i in (0, full // 2, full - 1)]
    assert len(blocks) >= 6, "expected at least two example wavs"
    return np.stack(blocks).astype(np.float32)


@pytest.fixture(scope="module")
def torch_features(encoder, speech_blocks) -> np.ndarray:
    """Reference: the in-process encoder, block by block.  [B, L, D, 12]"""
    torch.set_num_threads(1)
    return np.stack([encoder.encode_block(torch.from_numpy(b)).numpy() for b in speech_blocks])


@pytest.fixture(scope="module")
def pytriton_server(tmp_path_factory, encoder):
    env, _ = _triton_env()
    http, grpc = _free_port(), _free_port()
    argv = [str(TRITON_PY), "-m", "services.audio_encoder.triton_server", "--http-port", str(http),
            "--grpc-port", str(grpc), "--model", "tiny", "--seed", "0", "--threads", "1"]
    server = ServerProcess("pytriton server", argv, env, tmp_path_factory.mktemp("pytriton") / "server.log", http)
    try:
        server.wait_ready(encoder.config)
        yield server
    finally:
        server.stop()


def _cpu_variant(config_text: str, cfg: AudioEncoderConfig) -> str:
    """The shipped config.pbtxt, switched to a CPU instance and the tiny model (each edit must apply once)."""
    edits = [
        (r"kind: KIND_GPU", "kind: KIND_CPU"),
        (r"dims: \[ 7680 \]", f"dims: [ {cfg.block_samples} ]"),
        (r"dims: \[ 25, 1024, 12 \]", f"dims: [ {cfg.num_states}, {cfg.hidden_size}, {cfg.block_frames} ]"),
        (r'"LIVEAVATAR_MODEL" value: \{ string_value: "[^"]*" \}', '"LIVEAVATAR_MODEL" value: { string_value: "tiny" }'),
        (r'"LIVEAVATAR_CHECKPOINT" value: \{ string_value: "[^"]*" \}',
         '"LIVEAVATAR_CHECKPOINT" value: { string_value: "" }'),
        (r'"LIVEAVATAR_THREADS" value: \{ string_value: "[^"]*" \}', '"LIVEAVATAR_THREADS" value: { string_value: "1" }'),
        # a long batching window, so concurrent requests surely merge (test_dynamic_batching)
        (r"max_queue_delay_microseconds: \d+", "max_queue_delay_microseconds: 300000"),
    ]
    for pattern, repl in edits:
        config_text, count = re.subn(pattern, repl, config_text)
        assert count == 1, f"config.pbtxt changed: {pattern!r} matched {count} times"
    assert 'LIVEAVATAR_BATCHED" value: { string_value: "true" }' in config_text
    return config_text


@pytest.fixture(scope="module")
def repository_server(tmp_path_factory, encoder):
    """tritonserver on a CPU copy of the shipped model repository."""
    env, pytriton_dir = _triton_env()
    work = tmp_path_factory.mktemp("tritonserver")
    repo = work / "repo"
    shutil.copytree(SHIPPED_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / MODEL / "config.pbtxt"
    config.write_text(_cpu_variant(config.read_text(), encoder.config))
    # the Python backend, with the stub for this interpreter where Triton looks for it
    backends = work / "backends"
    shutil.copytree(pytriton_dir / "tritonserver" / "backends", backends)
    version = subprocess.run([str(TRITON_PY), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy(pytriton_dir / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
                backends / "python" / "triton_python_backend_stub")
    env["LD_LIBRARY_PATH"] += f":{pytriton_dir.parent / 'nvidia_pytriton.libs'}"
    http, grpc = _free_port(), _free_port()
    argv = [str(pytriton_dir / "tritonserver" / "bin" / "tritonserver"), "--model-repository", str(repo),
            "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--http-port", str(http),
            "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc), "--allow-metrics", "false",
            "--exit-timeout-secs", "5"]
    server = ServerProcess("tritonserver", argv, env, work / "server.log", http)
    try:
        server.wait_ready(encoder.config)
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# PyTriton dev server vs the in-process backend
# ---------------------------------------------------------------------------------------------


def test_triton_equals_torch_on_speech_blocks(pytriton_server, encoder, speech_blocks, torch_features):
    torch_backend = make_backend("torch", encoder=encoder)
    with make_backend("triton", url=pytriton_server.url, encoder=encoder) as triton_backend:
        assert isinstance(triton_backend, AudioFeatureBackend) and isinstance(torch_backend, AudioFeatureBackend)
        assert triton_backend.is_ready()
        for block, want in zip(speech_blocks, torch_features, strict=True):
            got = triton_backend.encode_block(block)
            assert got.dtype == np.float32 and got.shape == (5, 32, 12)
            np.testing.assert_array_equal(got, want)                  # bit-identical
            np.testing.assert_array_equal(torch_backend.encode_block(block), want)
    # the features depend on the speech: no two blocks give the same features
    flat = torch_features.reshape(len(torch_features), -1)
    assert min(np.abs(flat[i] - flat[j]).max() for i in range(len(flat)) for j in range(i)) > 1e-3


def test_batch_of_three_in_one_request(pytriton_server, encoder, speech_blocks, torch_features):
    with TritonBackend(pytriton_server.url, config=encoder.config) as backend:
        rows = [0, 4, 8]
        got = backend.encode_blocks(speech_blocks[rows])
        assert got.shape == (3, 5, 32, 12)
        np.testing.assert_array_equal(got, torch_features[rows])


def test_readiness_metadata_and_mismatch(pytriton_server, encoder):
    with TritonBackend(f"http://{pytriton_server.url}") as backend:             # shapes read from the server
        assert backend.block_samples == encoder.config.block_samples == 7680
        assert backend.feature_shape == (5, 32, 12)
        backend.wait_ready(1.0)
    with pytest.raises(TritonUnavailableError, match="model 'no_such_model' is not ready"):
        TritonBackend(pytriton_server.url, model_name="no_such_model")
    with pytest.raises(BackendConfigError, match=r"another model size"):          # real size vs tiny server
        TritonBackend(pytriton_server.url, config=AudioEncoderConfig())


def test_bad_pcm_is_rejected_before_sending(pytriton_server, encoder, speech_blocks):
    with TritonBackend(pytriton_server.url) as backend:
        for bad, what in [(speech_blocks[0][:-1], "shape"), (speech_blocks[:2], "one block"),
                          ((speech_blocks[0] * 1000).astype(np.int16), "dtype"), ([0.0] * 7680, "numpy")]:
            with pytest.raises(BackendInputError, match=what):
                backend.encode_block(bad)
        nan = speech_blocks[0].copy()
        nan[100] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            backend.encode_block(nan)
        assert backend.encode_block(speech_blocks[0]).shape == (5, 32, 12)    # the client still works


# ---------------------------------------------------------------------------------------------
# The shipped production model repository on tritonserver
# ---------------------------------------------------------------------------------------------


def test_repository_model_matches_torch(repository_server, encoder, speech_blocks, torch_features):
    batched_torch = TorchBackend(encoder, batched=True)
    with make_backend("triton", url=repository_server.url, encoder=encoder) as backend:
        for i in (0, 4):                                       # one block per request: the per-block path exactly
            np.testing.assert_array_equal(backend.encode_block(speech_blocks[i]), torch_features[i])
        rows = [1, 5, 7]
        got = backend.encode_blocks(speech_blocks[rows])           # one wav2vec2 forward for the three rows
        np.testing.assert_array_equal(got, batched_torch.encode_blocks(speech_blocks[rows]))
        np.testing.assert_allclose(got, torch_features[rows], rtol=1e-5, atol=1e-5)


def test_repository_dynamic_batching(repository_server, encoder, speech_blocks, torch_features):
    """Concurrent requests of 1, 2, 1 and 3 blocks merge into fewer executions; each gets its own rows back."""
    import tritonclient.http as triton_http

    stats_client = triton_http.InferenceServerClient(repository_server.url)

    def executions() -> tuple[int, int]:
        stats = stats_client.get_inference_statistics(MODEL)["model_stats"][0]
        return int(stats["execution_count"]), int(stats["inference_stats"]["success"]["count"])

    exec0, req0 = executions()
    requests = [[2], [3, 6], [8], [0, 1, 7]]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(requests))

    def call(k: int) -> None:
        try:
            with TritonBackend(repository_server.url, timeout_s=30) as backend:   # one client per thread
                barrier.wait(timeout=10)
                results[k] = backend.encode_blocks(speech_blocks[requests[k]])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    exec1, req1 = executions()
    stats_client.close()
    assert not errors, errors
    for k, rows in enumerate(requests):
        np.testing.assert_allclose(results[k], torch_features[rows], rtol=1e-5, atol=1e-5)
    assert req1 - req0 == len(requests)
    assert exec1 - exec0 < len(requests), "the dynamic batcher merged no requests"


def test_repository_rejects_bad_pcm_per_request(repository_server, speech_blocks):
    """A NaN block sent past the client's check gets a 400 naming the problem from model.py."""
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    bad = speech_blocks[:2].copy()
    bad[1, 10] = np.inf
    client = triton_http.InferenceServerClient(repository_server.url)
    try:
        inp = triton_http.InferInput("PCM", list(bad.shape), "FP32")
        inp.set_data_from_numpy(bad, binary_data=True)
        with pytest.raises(InferenceServerException, match="NaN or inf") as info:
            client.infer(MODEL, [inp])
        assert str(info.value.status()) == "400"
    finally:
        client.close()


def test_stopped_server_gives_a_clear_error(repository_server, encoder, speech_blocks):
    """Runs last on this server: stop it (SIGTERM, no process left), then the client names the problem."""
    backend = TritonBackend(repository_server.url, config=encoder.config)
    try:
        repository_server.stop()
        assert repository_server.stopped_cleanly
        assert not backend.is_ready()
        with pytest.raises(TritonUnavailableError, match="unreachable"):
            backend.encode_block(speech_blocks[0])
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------
# No server
# ---------------------------------------------------------------------------------------------


def test_server_down_or_hung_gives_a_clear_error():
    port = _free_port()                                                    # nothing listens there
    start = time.monotonic()
    with pytest.raises(TritonUnavailableError, match=rf"127\.0\.0\.1:{port} is unreachable.*after waiting 0\.5 s"):
        make_backend("triton", url=f"127.0.0.1:{port}", wait_ready_s=0.5)
    assert time.monotonic() - start >= 0.5
    with socket.socket() as hung:                                          # accepts TCP, never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        start = time.monotonic()
        with pytest.raises(TritonUnavailableError, match="unreachable"):
            TritonBackend(f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=0.5)
        assert time.monotonic() - start < 5
    for kind, kwargs, what in [("triton", {}, "needs the server URL"), ("torch", {}, "needs the wav2vec2 encoder"),
                               ("onnx", {}, "unknown audio backend"), ("triton", {"url": "grpc://h:1"}, "HTTP")]:
        with pytest.raises(BackendConfigError, match=what):
            make_backend(kind, **kwargs)
