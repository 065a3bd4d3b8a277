"""Where the audio encoder's wav2vec2 runs: in this process (torch) or on a Triton Inference Server.

The audio-encoder worker's audio stage (:class:`pipeline_stages.audio_stage.AudioStage`) cuts each
session's PCM into streaming blocks (7,680 samples = 0.48 s at 16 kHz) and asks a backend for the
block's features. Every backend has the same small interface,
:class:`AudioFeatureBackend`::

    backend = make_backend("torch", encoder=encoder)              # in process
    backend = make_backend("triton", url="127.0.0.1:8000")        # remote, Triton HTTP/REST (KServe v2)
    feats = backend.encode_block(pcm)     # float32 [7680] -> float32 [L, D, 12]  (L = 25, D = 1024 at real size)
    backend.close()

Both backends compute exactly :meth:`models.audio_encoder.Wav2VecAudioEncoder.encode_block` (each
block normalised and encoded alone), so they are interchangeable.

Triton wire contract of the model ``liveavatar_audio``. The same contract holds for the PyTriton
dev/test server (:mod:`services.audio_encoder.triton_server`) and for the production model
repository (``services/audio_encoder/triton_repository``)::

    input  "PCM"       FP32 [B, block_samples]                       one streaming block per row
    output "FEATURES"  FP32 [B, num_states, hidden_size, block_frames]

``B`` is the batch dimension (Triton ``max_batch_size > 0``). Tensors travel in Triton's binary
tensor extension, so float32 values arrive bit-exact (no JSON rounding).

Batching: :func:`encode_pcm_batch` with ``batched=False`` loops over the rows (bit-identical to
the in-process encoder); ``batched=True`` runs all rows through wav2vec2 in one forward, which is
the same computation (equal-length rows, no padding, no attention mask, per-sample layer norms)
but may differ in the last bits because the kernels see a different matrix size. The production
GPU model uses ``batched=True`` for throughput.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import numpy as np
import torch

from models.audio_encoder import AudioEncoderConfig, Wav2VecAudioEncoder, resample_to_video

TRITON_MODEL_NAME = "liveavatar_audio"
INPUT_NAME = "PCM"
OUTPUT_NAME = "FEATURES"
BACKEND_KINDS = ("torch", "triton")


class BackendError(RuntimeError):
    """A backend could not produce features (server error, unexpected reply)."""


class BackendInputError(ValueError):
    """The PCM handed to a backend is not a valid batch of blocks (shape, dtype, NaN/inf)."""


class BackendConfigError(ValueError):
    """A backend was asked for with bad settings, or the server's model does not match our config."""


class TritonUnavailableError(BackendError, ConnectionError):
    """The Triton server is unreachable, timed out, or does not have the model ready."""


@runtime_checkable
class AudioFeatureBackend(Protocol):
    """What the audio-encoder worker calls. ``encode_block``: float32 ``[N]`` -> float32 ``[L, D, F]``."""

    name: str

    def encode_block(self, pcm: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the Triton server side)
# ---------------------------------------------------------------------------------------------


def check_pcm_batch(pcm, block_samples: int) -> np.ndarray:
    """Validate blocks of mono PCM: ``[N]`` or ``[B, N]`` float, ``N == block_samples``, finite.

    Returns a C-contiguous float32 ``[B, N]`` array (a single block gets ``B = 1``).
    """
    if isinstance(pcm, torch.Tensor):
        pcm = pcm.detach().cpu().numpy()
    if not isinstance(pcm, np.ndarray):
        raise BackendInputError(f"PCM must be a numpy array, got {type(pcm).__name__}")
    if pcm.dtype.kind != "f":
        raise BackendInputError(f"PCM must be float samples in [-1, 1], got dtype {pcm.dtype}")
    if pcm.ndim == 1:
        pcm = pcm[None]
    if pcm.ndim != 2 or pcm.shape[0] < 1 or pcm.shape[1] != block_samples:
        raise BackendInputError(f"PCM must be [{block_samples}] or [B, {block_samples}] with B >= 1, "
                                f"got shape {tuple(pcm.shape)}")
    pcm = np.ascontiguousarray(pcm, dtype=np.float32)
    if not np.isfinite(pcm).all():
        raise BackendInputError("PCM contains NaN or inf samples")
    return pcm


@torch.no_grad()
def encode_pcm_batch(encoder: Wav2VecAudioEncoder, pcm: np.ndarray, batched: bool = False) -> np.ndarray:
    """Blocks ``[B, N]`` -> features ``[B, L, D, F]`` float32 (each block encoded on its own).

    ``batched=False``: one :meth:`Wav2VecAudioEncoder.encode_block` per row (bit-identical to it).
    ``batched=True``: the same steps with one wav2vec2 forward for all rows:

    1. normalise each row alone                                   [B, N]
    2. wav2vec2, all hidden states                                L x [B, T50, D]
    3. resample each row to the video rate                        [B, L, D, F]
    """
    cfg = encoder.config
    pcm = check_pcm_batch(pcm, cfg.block_samples)
    if not batched:
        rows = [encoder.encode_block(torch.from_numpy(row)).float().cpu().numpy() for row in pcm]
        return np.ascontiguousarray(np.stack(rows), dtype=np.float32)
    # 1. per-row normalisation  [B, N]
    x = torch.stack([encoder.normalize(torch.from_numpy(row)) for row in pcm])
    x = x.to(device=encoder.device, dtype=encoder.dtype)
    # 2. one forward  -> L x [B, T50, D] -> [L, B, T50, D]
    states = torch.stack(encoder.wav2vec2(x, output_hidden_states=True).hidden_states)
    # 3. per-row resampling  [L, T50, D] -> [L, D, F], stacked -> [B, L, D, F]
    feats = [resample_to_video(states[:, b], cfg.block_frames, cfg.feature_rate, cfg.interp_rate, cfg.video_fps)
             for b in range(states.shape[1])]
    return np.ascontiguousarray(torch.stack(feats).cpu().numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# In process
# ---------------------------------------------------------------------------------------------


class TorchBackend:
    """The wav2vec2 encoder in this process, on the encoder's device."""

    name = "torch"

    def __init__(self, encoder: Wav2VecAudioEncoder, batched: bool = False) -> None:
        if not isinstance(encoder, Wav2VecAudioEncoder):
            raise BackendConfigError(f"TorchBackend needs a Wav2VecAudioEncoder, got {type(encoder).__name__}")
        self.encoder = encoder
        self.batched = batched

    @property
    def config(self) -> AudioEncoderConfig:
        return self.encoder.config

    def encode_block(self, pcm: np.ndarray) -> np.ndarray:
        """One block: float32 ``[block_samples]`` -> ``[L, D, block_frames]``."""
        if np.ndim(pcm) != 1:
            raise BackendInputError(f"encode_block takes one block [N], got shape {tuple(np.shape(pcm))}")
        return self.encode_blocks(pcm)[0]

    def encode_blocks(self, pcm: np.ndarray) -> np.ndarray:
        """Several blocks: ``[B, block_samples]`` -> ``[B, L, D, block_frames]``."""
        return encode_pcm_batch(self.encoder, pcm, self.batched)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Triton Inference Server
# ---------------------------------------------------------------------------------------------


def _split_url(url: str) -> tuple[str, bool]:
    """``host:port``, ``http://host:port`` or ``https://host:port`` -> (``host:port``, ssl)."""
    if not isinstance(url, str) or not url.strip():
        raise BackendConfigError("the Triton URL is empty; expected host:port, e.g. 127.0.0.1:8000")
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BackendConfigError(f"Triton URL {url!r}: only the HTTP/REST endpoint is supported (http:// or https://)")
    try:
        port = parts.port
    except ValueError as exc:
        raise BackendConfigError(f"Triton URL {url!r} has an invalid port") from exc
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise BackendConfigError(f"Triton URL {url!r} must be host:port (with an optional http:// or https://)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}", parts.scheme == "https"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'could not talk to the server' (refused, reset, DNS, timeouts)."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:  # geventhttpclient signals timeouts with gevent.Timeout, a BaseException
        import gevent

        errors.append(gevent.Timeout)
    except ImportError:  # pragma: no cover - tritonclient[http] depends on gevent
        pass
    return tuple(errors)


class TritonBackend:
    """Features from the ``liveavatar_audio`` model on a Triton Inference Server (HTTP/REST).

    On construction the server must be live and the model ready (waiting up to ``wait_ready_s``),
    and the model's input/output shapes must match the wire contract (and ``config`` when given);
    otherwise a clear :class:`TritonUnavailableError` / :class:`BackendConfigError` is raised.

    Args:
        url: ``host:port`` of Triton's HTTP endpoint (``http://`` / ``https://`` prefixes accepted).
        model_name: the served model.
        timeout_s: connection and per-request network timeout.
        config: the audio config the caller expects (block size, L, D, frames); checked against the
            server's model metadata. ``None``: take the shapes from the server.
        wait_ready_s: how long to wait for readiness at construction (0 = check once).

    One instance is not thread-safe (tritonclient's HTTP client is not); use one per thread.
    """

    name = "triton"

    def __init__(self, url: str, model_name: str = TRITON_MODEL_NAME, timeout_s: float = 10.0, *,
                 config: AudioEncoderConfig | None = None, wait_ready_s: float = 0.0) -> None:
        import tritonclient.http as triton_http

        if not timeout_s > 0:
            raise BackendConfigError(f"timeout_s must be > 0, got {timeout_s}")
        self.url, ssl = _split_url(url)
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self._http = triton_http
        self._errors = _transport_errors()
        self._client = triton_http.InferenceServerClient(self.url, ssl=ssl, connection_timeout=self.timeout_s,
                                                         network_timeout=self.timeout_s)
        try:
            self.wait_ready(wait_ready_s)
            self.block_samples, self.feature_shape = self._read_metadata(config)
        except BaseException:
            self.close()
            raise

    # ---- readiness -----------------------------------------------------------------------------
    def _probe(self) -> str | None:
        """``None`` when ready, else why not (one short sentence)."""
        from tritonclient.utils import InferenceServerException

        try:
            if not self._client.is_server_live():
                return f"Triton at {self.url} is not live"
            if not self._client.is_model_ready(self.model_name):
                return f"Triton at {self.url} is up but model {self.model_name!r} is not ready (not loaded or failed)"
        except InferenceServerException as exc:
            return f"Triton at {self.url} answered with an error: {exc}"
        except self._errors as exc:
            return f"Triton at {self.url} is unreachable ({type(exc).__name__}: {exc or 'timed out'})"
        return None

    def is_ready(self) -> bool:
        """True when the server is live and the model is ready. Never raises."""
        return self._probe() is None

    def wait_ready(self, timeout_s: float = 0.0) -> None:
        """Poll readiness for up to ``timeout_s`` seconds; raise :class:`TritonUnavailableError` if not ready."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            reason = self._probe()
            if reason is None:
                return
            if time.monotonic() >= deadline:
                waited = f" after waiting {timeout_s:g} s" if timeout_s > 0 else ""
                raise TritonUnavailableError(reason + waited)
            time.sleep(0.2)

    def _read_metadata(self, config: AudioEncoderConfig | None) -> tuple[int, tuple[int, int, int]]:
        """Check the model's I/O against the contract -> (block_samples, (L, D, F))."""
        try:
            meta = self._client.get_model_metadata(self.model_name)
        except self._errors as exc:
            raise TritonUnavailableError(f"Triton at {self.url} is unreachable ({exc})") from exc
        except Exception as exc:  # noqa: BLE001 - InferenceServerException and friends
            raise TritonUnavailableError(f"cannot read metadata of model {self.model_name!r} at {self.url}: {exc}") \
                from exc
        ins = {t["name"]: t for t in meta.get("inputs", [])}
        outs = {t["name"]: t for t in meta.get("outputs", [])}
        where = f"model {self.model_name!r} at {self.url}"
        if INPUT_NAME not in ins or OUTPUT_NAME not in outs:
            raise BackendConfigError(f"{where} must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}; "
                                     f"it has inputs {sorted(ins)} and outputs {sorted(outs)}")
        pcm_t, feat_t = ins[INPUT_NAME], outs[OUTPUT_NAME]
        if pcm_t["datatype"] != "FP32" or feat_t["datatype"] != "FP32":
            raise BackendConfigError(f"{where}: {INPUT_NAME} and {OUTPUT_NAME} must be FP32, got "
                                     f"{pcm_t['datatype']} and {feat_t['datatype']}")
        pcm_shape, feat_shape = [int(d) for d in pcm_t["shape"]], [int(d) for d in feat_t["shape"]]
        if len(pcm_shape) != 2 or len(feat_shape) != 4 or min(pcm_shape[1:] + feat_shape[1:]) < 1:
            raise BackendConfigError(f"{where}: expected {INPUT_NAME} [B, N] and {OUTPUT_NAME} [B, L, D, F] with a "
                                     f"batch dimension, got {pcm_shape} and {feat_shape}")
        block_samples, feature_shape = pcm_shape[1], (feat_shape[1], feat_shape[2], feat_shape[3])
        if config is not None:
            want = (config.block_samples, (config.num_states, config.hidden_size, config.block_frames))
            if (block_samples, feature_shape) != want:
                raise BackendConfigError(
                    f"{where} serves blocks of {block_samples} samples -> features {list(feature_shape)}, but this "
                    f"process's audio config expects {want[0]} -> {list(want[1])}: the server runs another model size")
        return block_samples, feature_shape

    # ---- inference -----------------------------------------------------------------------------
    def encode_block(self, pcm: np.ndarray) -> np.ndarray:
        """One block: float32 ``[block_samples]`` -> ``[L, D, block_frames]``."""
        if np.ndim(pcm) != 1:
            raise BackendInputError(f"encode_block takes one block [N], got shape {tuple(np.shape(pcm))}")
        return self.encode_blocks(pcm)[0]

    def encode_blocks(self, pcm: np.ndarray) -> np.ndarray:
        """Several blocks in one request: ``[B, block_samples]`` -> ``[B, L, D, block_frames]``."""
        from tritonclient.utils import InferenceServerException

        pcm = check_pcm_batch(pcm, self.block_samples)
        inp = self._http.InferInput(INPUT_NAME, list(pcm.shape), "FP32")
        inp.set_data_from_numpy(pcm, binary_data=True)
        out = self._http.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
        try:
            result = self._client.infer(self.model_name, [inp], outputs=[out])
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            if status in ("404", "503", "StatusCode.UNAVAILABLE"):
                raise TritonUnavailableError(f"model {self.model_name!r} at {self.url} is unavailable: {exc}") from exc
            raise BackendError(f"Triton inference failed for model {self.model_name!r} at {self.url}: {exc}") from exc
        except self._errors as exc:
            raise TritonUnavailableError(f"Triton at {self.url} is unreachable or timed out after "
                                         f"{self.timeout_s:g} s ({type(exc).__name__}: {exc})") from exc
        feats = result.as_numpy(OUTPUT_NAME)
        want = (pcm.shape[0], *self.feature_shape)
        if feats is None or feats.dtype != np.float32 or feats.shape != want:
            got = None if feats is None else (feats.dtype, feats.shape)
            raise BackendError(f"model {self.model_name!r} at {self.url} returned {got}, expected float32 {want}")
        return feats

    def close(self) -> None:
        client, self._client = getattr(self, "_client", None), None
        if client is not None:
            client.close()

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def make_backend(kind: str, *, encoder: Wav2VecAudioEncoder | None = None, url: str | None = None,
                 model_name: str = TRITON_MODEL_NAME, timeout_s: float = 10.0, wait_ready_s: float = 0.0,
                 batched: bool = False) -> AudioFeatureBackend:
    """Build the backend named ``kind``.

    - ``"torch"``: needs ``encoder`` (the in-process :class:`Wav2VecAudioEncoder`).
    - ``"triton"``: needs ``url``; when ``encoder`` is given too, its config is checked against the
      server's model (block size and feature shape), so a size mismatch fails at start-up.
    """
    if kind == "torch":
        if encoder is None:
            raise BackendConfigError("the torch audio backend needs the wav2vec2 encoder (encoder=...)")
        return TorchBackend(encoder, batched=batched)
    if kind == "triton":
        if not url:
            raise BackendConfigError("the triton audio backend needs the server URL (url='host:port')")
        config = encoder.config if encoder is not None else None
        return TritonBackend(url, model_name, timeout_s, config=config, wait_ready_s=wait_ready_s)
    raise BackendConfigError(f"unknown audio backend {kind!r}; choose one of {list(BACKEND_KINDS)}")
