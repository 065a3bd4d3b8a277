"""Triton Python-backend model ``liveavatar_audio``: PCM blocks -> wav2vec2 features (production path).

Triton loads this file from the model repository and calls :meth:`TritonPythonModel.initialize`
once per model instance (one per GPU with ``KIND_GPU``), then :meth:`TritonPythonModel.execute`
with the requests the dynamic batcher merged. The computation is the project's own encoder
(``models.audio_encoder.Wav2VecAudioEncoder``, built by ``models.liveavatar.build_models`` like the
audio-encoder worker builds it), so the features equal the in-process torch backend's.

Wire contract (see ``services/audio_encoder/backends.py``)::

    PCM       FP32 [B, block_samples]                        one streaming block per row
    FEATURES  FP32 [B, num_states, hidden_size, block_frames]

Settings come from the ``parameters`` of ``config.pbtxt`` (documented there). The ``dims`` in
``config.pbtxt`` are checked against the built encoder: a mismatch fails the model load with a
message naming both shapes, instead of serving features of the wrong size.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT_NAME = "PCM"
OUTPUT_NAME = "FEATURES"


def _params(model_config: dict) -> dict[str, str]:
    """``parameters { key: K value: { string_value: V } }`` -> ``{K: V}``."""
    return {k: str(v.get("string_value", "")) for k, v in model_config.get("parameters", {}).items()}


def _flag(value: str, name: str) -> bool:
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"parameter {name} must be true or false, got {value!r}")


def _error(message: str, invalid_arg: bool) -> pb_utils.InferenceResponse:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class TritonPythonModel:
    """One model instance: the wav2vec2 encoder on this instance's device."""

    def initialize(self, args: dict) -> None:
        """1. read settings  2. import the project  3. build the encoder  4. check config.pbtxt's dims."""
        # 1. settings from config.pbtxt
        model_config = json.loads(args["model_config"])
        params = _params(model_config)
        extra_path = params.get("LIVEAVATAR_PYTHONPATH", "").strip()
        if extra_path and extra_path not in sys.path:
            sys.path.insert(0, extra_path)
        model_spec = params.get("LIVEAVATAR_MODEL", "reference").strip() or "reference"
        checkpoint = params.get("LIVEAVATAR_CHECKPOINT", "").strip() or None
        try:
            seed = int(params.get("LIVEAVATAR_SEED", "0") or 0)
            threads = int(params.get("LIVEAVATAR_THREADS", "0") or 0)
        except ValueError as exc:
            raise ValueError(f"LIVEAVATAR_SEED and LIVEAVATAR_THREADS must be integers: {exc}") from exc
        self.batched = _flag(params.get("LIVEAVATAR_BATCHED", "true"), "LIVEAVATAR_BATCHED")

        # 2. the project's code (the Triton image must have it importable; see ../../README.md)
        try:
            import torch

            from models.liveavatar import LiveAvatarConfig, build_models, default_checkpoint
            from services.audio_encoder.backends import check_pcm_batch, encode_pcm_batch
        except ImportError as exc:
            raise ImportError(f"liveavatar_audio needs the LiveAvatar packages (models, services) and torch in "
                              f"Triton's Python environment: {exc}. Install the project into the image or set "
                              f"the LIVEAVATAR_PYTHONPATH parameter to the source folder.") from exc
        self._check = check_pcm_batch
        self._encode = encode_pcm_batch

        # 3. the encoder on this instance's device
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{int(args['model_instance_device_id'])}"
        else:
            device = "cpu"
            if threads > 0:
                torch.set_num_threads(threads)
        config = LiveAvatarConfig.load(model_spec)
        self.encoder = build_models(config, device=device, seed=seed, checkpoint=default_checkpoint(model_spec, checkpoint),
                                    parts={"audio"}).audio
        cfg = self.encoder.config
        self.block_samples = cfg.block_samples
        feature_shape = [cfg.num_states, cfg.hidden_size, cfg.block_frames]

        # 4. config.pbtxt must describe this encoder
        if int(model_config.get("max_batch_size", 0)) < 1:
            raise ValueError("liveavatar_audio needs max_batch_size >= 1 (inputs carry a batch dimension)")
        pcm_dims = [int(d) for d in pb_utils.get_input_config_by_name(model_config, INPUT_NAME)["dims"]]
        feat_dims = [int(d) for d in pb_utils.get_output_config_by_name(model_config, OUTPUT_NAME)["dims"]]
        if pcm_dims != [cfg.block_samples] or feat_dims != feature_shape:
            raise ValueError(f"config.pbtxt declares {INPUT_NAME} {pcm_dims} -> {OUTPUT_NAME} {feat_dims}, but the "
                             f"encoder of LIVEAVATAR_MODEL={model_spec!r} takes [{cfg.block_samples}] -> "
                             f"{feature_shape}; fix the dims or the model setting")
        pb_utils.Logger.log_info(f"liveavatar_audio on {device}: {INPUT_NAME} [B, {cfg.block_samples}] -> "
                                 f"{OUTPUT_NAME} [B, {', '.join(map(str, feature_shape))}], batched={self.batched}")

    def execute(self, requests: list) -> list:
        """Validate each request, encode all valid rows together, split the features back per request."""
        # 1. gather rows; a bad request gets its own error and does not harm the others
        responses: list = [None] * len(requests)
        rows, owners = [], []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            try:
                if tensor is None:
                    raise ValueError(f"missing input {INPUT_NAME}")
                pcm = self._check(tensor.as_numpy(), self.block_samples)      # [b_i, N]
            except ValueError as exc:
                responses[i] = _error(f"bad {INPUT_NAME}: {exc}", invalid_arg=True)
                continue
            rows.append(pcm)
            owners.append((i, pcm.shape[0]))
        if not rows:
            return responses
        # 2. one encoder call for the whole batch  [sum b_i, N] -> [sum b_i, L, D, F]
        try:
            feats = self._encode(self.encoder, np.concatenate(rows), batched=self.batched)
        except Exception as exc:  # noqa: BLE001 - every pending request gets the reason
            for i, _ in owners:
                responses[i] = _error(f"liveavatar_audio failed: {type(exc).__name__}: {exc}", invalid_arg=False)
            return responses
        # 3. split back per request
        start = 0
        for i, count in owners:
            out = pb_utils.Tensor(OUTPUT_NAME, np.ascontiguousarray(feats[start:start + count]))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
            start += count
        return responses

    def finalize(self) -> None:
        self.encoder = None
