"""A real Triton Inference Server serving ``liveavatar_audio`` on loopback, through PyTriton.

For tests, local trials and CPU-only setups. PyTriton (``nvidia-pytriton``) ships a real
``tritonserver`` binary; this module starts it and binds a Python inference function that runs
the same wav2vec2 encoder as the in-process backend. Production GPU serving uses the model
repository in ``services/audio_encoder/triton_repository`` with a stock Triton image instead.

PyTriton pins numpy<2, so this runs from its own venv (``infra/triton/setup.sh`` creates
``.venv-triton``), with the repository on ``PYTHONPATH`` and the Python library folder on
``LD_LIBRARY_PATH`` (Triton's Python-backend stub embeds libpython)::

    LD_LIBRARY_PATH=$(.venv-triton/bin/python -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))") \\
    PYTHONPATH=. .venv-triton/bin/python -m services.audio_encoder.triton_server \\
        --http-port 8000 --grpc-port 8001 --model tiny

The server binds 127.0.0.1 only (HTTP and gRPC), with the metrics endpoint off. It serves
the wire contract of :mod:`services.audio_encoder.backends`: ``PCM`` FP32 ``[B, block_samples]``
-> ``FEATURES`` FP32 ``[B, L, D, block_frames]``, dynamic batching up to ``--max-batch-size``.
The encoder is built as the worker builds it (``build_models(LiveAvatarConfig.load(--model),
seed=--seed, checkpoint=--checkpoint, parts={"audio"})``), so features match the in-process
backend bit for bit when both use the same thread count on CPU (``--threads``, default 1).

SIGTERM or SIGINT stops the server, its proxy processes and its workspace cleanly.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile

LOOPBACK = "127.0.0.1"
log = logging.getLogger("liveavatar.triton_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.audio_encoder.triton_server", description=__doc__.split("\n")[0])
    p.add_argument("--http-port", type=int, required=True, help="HTTP/REST port on 127.0.0.1")
    p.add_argument("--grpc-port", type=int, required=True, help="gRPC port on 127.0.0.1")
    p.add_argument("--model", default="tiny-trained", help="'tiny-trained', 'tiny', 'reference' or a checkpoint "
                                                           "directory (config)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory with the wav2vec2 weights "
                                                      "(default: seeded random weights)")
    p.add_argument("--seed", type=int, default=0, help="weights seed without --checkpoint (as the worker's)")
    p.add_argument("--device", default="cpu", help="torch device of the encoder, e.g. cpu or cuda:0")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=8, help="largest batch Triton hands the model")
    p.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batcher's wait for more requests")
    p.add_argument("--batched", action="store_true", help="one wav2vec2 forward per batch instead of per block "
                                                          "(faster on GPU, not bit-identical to the torch backend)")
    p.add_argument("--model-name", default=None, help="served model name (default liveavatar_audio)")
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's verbose log level")
    args = p.parse_args(argv)
    for name in ("http_port", "grpc_port"):
        if not 0 < getattr(args, name) < 65536:
            p.error(f"--{name.replace('_', '-')} must be a port number in 1..65535")
    if args.http_port == args.grpc_port:
        p.error("--http-port and --grpc-port must differ")
    if args.threads < 1 or args.max_batch_size < 1 or args.max_queue_delay_us < 0:
        p.error("--threads and --max-batch-size must be >= 1, --max-queue-delay-us >= 0")
    return args


def build_encoder(args: argparse.Namespace):
    """The wav2vec2 encoder exactly as the audio-encoder worker builds it."""
    import torch

    from models.liveavatar import LiveAvatarConfig, build_models, default_checkpoint

    torch.set_num_threads(args.threads)
    config = LiveAvatarConfig.load(args.model)
    models = build_models(config, device=args.device, seed=args.seed,
                          checkpoint=default_checkpoint(args.model, args.checkpoint), parts={"audio"})
    return models.audio


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def serve(args: argparse.Namespace) -> None:
    """Build the encoder, start Triton on loopback, serve until SIGTERM/SIGINT."""
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from services.audio_encoder.backends import INPUT_NAME, OUTPUT_NAME, TRITON_MODEL_NAME, encode_pcm_batch

    encoder = build_encoder(args)
    cfg = encoder.config
    feature_shape = (cfg.num_states, cfg.hidden_size, cfg.block_frames)

    @batch
    def infer(**inputs):
        # [B, block_samples] -> [B, L, D, block_frames]; bad PCM raises a ValueError -> error reply
        return {OUTPUT_NAME: encode_pcm_batch(encoder, inputs[INPUT_NAME], batched=args.batched)}

    triton_config = TritonConfig(
        http_address=LOOPBACK, http_port=args.http_port,
        grpc_address=LOOPBACK, grpc_port=args.grpc_port,
        allow_metrics=False, allow_gpu_metrics=False, allow_cpu_metrics=False,
        allow_sagemaker=False, allow_vertex_ai=False,
        log_verbose=args.log_verbose, exit_timeout_secs=5,
    )
    model_config = ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us))
    scratch = tempfile.mkdtemp(prefix="liveavatar-triton-")      # PyTriton creates the workspace itself
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with Triton(config=triton_config, workspace=f"{scratch}/workspace") as triton:
            triton.bind(
                model_name=args.model_name or TRITON_MODEL_NAME,
                infer_func=infer,
                inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=(cfg.block_samples,))],
                outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=feature_shape)],
                config=model_config,
                strict=True,
            )
            log.info("serving %s on http %s:%d, grpc %s:%d: PCM [B, %d] -> FEATURES [B, %s]",
                     args.model_name or TRITON_MODEL_NAME, LOOPBACK, args.http_port, LOOPBACK, args.grpc_port,
                     cfg.block_samples, ", ".join(map(str, feature_shape)))
            triton.serve()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    serve(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
