"""``liveavatar eval``: the quality harness on a video file, or on a video it generates first.

    liveavatar eval VIDEO --reference IMG [--audio WAV] --out DIR
    liveavatar eval --generate --image IMG --audio WAV [--checkpoint DIR] [--seconds S] --out DIR

The first form reads VIDEO with PyAV (frames as RGB, in chunks, so an hour-long file runs in bounded
memory) and scores it against the reference image and the audio: ``--audio`` when given, else the
video's own audio track (both averaged to mono and resampled to 16 kHz as ``liveavatar generate``
does). The second form generates with the in-process sequential runner (the same path as
``liveavatar generate``), writes ``DIR/generated.mp4`` and scores the blocks as they are made.

Writes ``DIR/report.json``, ``DIR/series.npz`` and PNG plots (:mod:`models.quality.report`), then
prints a one-line summary and the report's path. Bad input (a missing or unreadable file, a video
without audio and no ``--audio``, missing probes) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from services.cli.generate import USER_ERRORS

#: Video frames decoded and scored per chunk (memory is bounded by this, not by the video's length).
CHUNK_FRAMES = 250


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", nargs="?", default=None, help="video to score (MP4 or anything PyAV reads)")
    p.add_argument("--reference", default=None, help="reference image the video should look like")
    p.add_argument("--audio", default=None, help="speech the video was driven by (default: the video's audio "
                   "track); with --generate, the speech to generate from")
    p.add_argument("--out", required=True, help="output directory (report.json, series.npz, *.png)")
    p.add_argument("--generate", action="store_true", help="generate from --image and --audio, then score")
    p.add_argument("--image", default=None, help="with --generate: the reference image")
    p.add_argument("--checkpoint", default=None, help="with --generate: checkpoint directory (default: the "
                   "shipped checkpoint for tiny-trained, the directory itself when the config is a trained bundle, "
                   "seeded random weights otherwise)")
    p.add_argument("--config", default=None, help="with --generate: 'tiny-trained', 'tiny', 'reference' or a "
                   "checkpoint directory (default: the checkpoint's liveavatar.json, else tiny-trained)")
    p.add_argument("--seconds", type=float, default=None, help="with --generate: use only the first S seconds "
                   "of the audio")
    p.add_argument("--seed", type=int, default=0, help="with --generate: the generation seed")
    p.add_argument("--probes", default=None, help="quality-probe directory (default: the shipped "
                   "models/checkpoints/quality-probes)")
    p.add_argument("--window", type=float, default=10.0, help="window of the per-window series, seconds")
    p.add_argument("--max-offset", type=int, default=15, help="largest lip-sync offset searched, frames")
    p.add_argument("--max-audio-seconds", type=float, default=4 * 3600.0, help="reject longer audio")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="reject larger images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check_args(args: argparse.Namespace) -> None:
    from models.inputs import InputError

    if args.generate:
        if args.video is not None or args.reference is not None:
            raise InputError("--generate takes --image and --audio, not a VIDEO or --reference")
        if args.image is None or args.audio is None:
            raise InputError("--generate needs --image IMG and --audio WAV")
        if args.seconds is not None and not args.seconds > 0:
            raise InputError(f"--seconds must be positive, got {args.seconds}")
    else:
        if args.video is None or args.reference is None:
            raise InputError("give VIDEO and --reference IMG (or --generate --image IMG --audio WAV)")
        for flag in ("image", "checkpoint", "config", "seconds"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag} only applies with --generate")
        if not Path(args.video).is_file():
            raise InputError(f"video file not found: {args.video}")
    if args.audio is not None and not Path(args.audio).is_file():
        raise InputError(f"audio file not found: {args.audio}")


def _run(args: argparse.Namespace) -> int:
    import torch

    from models.inputs import load_image
    from models.quality.probes import PROBES_DIR, load_probes
    from models.quality.report import write_report

    # 1. arguments and inputs: every file is checked before any work
    _check_args(args)
    image_path = args.image if args.generate else args.reference
    reference = load_image(image_path, args.max_image_pixels)
    probes = load_probes(args.probes or PROBES_DIR)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 2. score (generating first with --generate)
    report = _generate_and_score(args, reference, probes, out) if args.generate else \
        _score_file(args, reference, probes)

    # 3. write and summarise
    path = write_report(report, out, plots=not args.no_plots)
    print(report.summary_line())
    print(f"report: {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# scoring a file
# ---------------------------------------------------------------------------------------------


def _open(path: str, what: str):
    import av

    from models.inputs import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    try:
        return av.open(str(p), mode="r")
    except Exception as exc:  # noqa: BLE001 - any demuxer failure is bad input
        raise InputError(f"cannot read {what} {p}: {exc}") from exc


def _audio_chunks(path: str, what: str, max_seconds: float) -> Iterator:
    """The first audio stream of ``path`` as float32 mono 16 kHz chunks: channels averaged, rate
    changed with :class:`models.inputs.Resampler` (what :func:`models.inputs.load_audio` does).
    The file and its audio track are checked now; decoding happens as the chunks are taken."""
    import av
    import numpy as np

    from models.inputs import InputError, Resampler

    container = _open(path, what)
    if not container.streams.audio:
        container.close()
        raise InputError(f"{what} {path} has no audio track; pass --audio WAV")
    stream = container.streams.audio[0]
    rate = stream.codec_context.sample_rate or stream.rate
    try:
        resampler = Resampler(int(rate or 0))
    except InputError:
        container.close()
        raise

    def chunks():
        state = resampler.new_state()
        to_float = av.AudioResampler(format="fltp")                # keeps the layout and the rate
        decoded, limit = 0, max_seconds * rate
        with container:
            try:
                for frame in container.decode(stream):
                    for f in to_float.resample(frame):
                        mono = f.to_ndarray()[:, :f.samples].astype(np.float64).mean(axis=0)   # [C, n] -> [n]
                        decoded += mono.shape[0]
                        if decoded > limit:
                            raise InputError(f"audio too long: more than {max_seconds} s")
                        yield resampler.push(state, mono)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - decoder errors on corrupt data
                raise InputError(f"cannot decode the audio of {path}: {exc}") from exc
        if decoded == 0:
            raise InputError(f"{what} {path} holds no audio samples")
        yield resampler.flush(state)

    return chunks()


def _video_chunks(path: str) -> tuple[int, int | None, Iterator]:
    """(fps, frame count if known, iterator of uint8 RGB ``[n, H, W, 3]`` chunks)."""
    import numpy as np

    from models.inputs import InputError

    container = _open(path, "video")
    if not container.streams.video:
        container.close()
        raise InputError(f"{path} has no video track")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate or abs(float(rate) - round(float(rate))) > 1e-3:
        container.close()
        raise InputError(f"{path}: the video frame rate {rate} is not a whole number of frames per second")

    def chunks():
        with container:
            buf = []
            try:
                for frame in container.decode(stream):
                    buf.append(frame.to_ndarray(format="rgb24"))
                    if len(buf) == CHUNK_FRAMES:
                        yield np.stack(buf)
                        buf = []
            except Exception as exc:  # noqa: BLE001 - decoder errors on corrupt data
                raise InputError(f"cannot decode the video {path}: {exc}") from exc
            if buf:
                yield np.stack(buf)

    return int(round(float(rate))), (stream.frames or None), chunks()


def _score_file(args: argparse.Namespace, reference, probes):
    from tqdm import tqdm

    from models.inputs import TARGET_SAMPLE_RATE
    from models.quality.report import Evaluator

    fps, total, video = _video_chunks(args.video)
    audio_path, what = (args.audio, "audio") if args.audio else (args.video, "video")
    audio = _audio_chunks(audio_path, what, args.max_audio_seconds)
    ev = Evaluator(probes, reference, fps=fps, window_s=args.window, max_offset=args.max_offset)
    spf = TARGET_SAMPLE_RATE // fps
    fed = 0
    bar = tqdm(total=total, unit="frame", disable=args.no_progress, file=sys.stderr)
    for frames in video:
        ev.add_frames(frames)
        bar.update(frames.shape[0])
        while fed < ev.num_frames * spf:          # keep the audio level with the video
            piece = next(audio, None)
            if piece is None:
                break
            ev.add_audio(piece)
            fed += piece.shape[0]
    bar.close()
    for piece in audio:                           # the rest (the tail, and the checks at the end)
        ev.add_audio(piece)
    return ev.finish()


# ---------------------------------------------------------------------------------------------
# generating, then scoring
# ---------------------------------------------------------------------------------------------


def _generate_and_score(args: argparse.Namespace, reference, probes, out: Path):
    from tqdm import tqdm

    from models.inputs import TARGET_SAMPLE_RATE, load_audio
    from models.liveavatar import BUNDLE_CONFIG_FILE, LiveAvatarConfig, build_models, default_checkpoint
    from models.quality.report import Evaluator
    from pipeline_stages.sequential import SequentialRunner, SessionSpec

    # 1. audio and models
    pcm = load_audio(args.audio, args.max_audio_seconds)
    if args.seconds is not None:
        pcm = pcm[:max(1, round(args.seconds * TARGET_SAMPLE_RATE))]
    spec_cfg = args.config or (args.checkpoint if args.checkpoint and
                               (Path(args.checkpoint) / BUNDLE_CONFIG_FILE).exists() else "tiny-trained")
    config = LiveAvatarConfig.load(spec_cfg)
    checkpoint = default_checkpoint(spec_cfg, args.checkpoint)
    if checkpoint is None:
        print("note: no checkpoint given, so the weights are SEEDED RANDOM (the floor of every metric)",
              file=sys.stderr)
    models = build_models(config, seed=args.seed, checkpoint=checkpoint)
    runner = SequentialRunner(models)
    ev = Evaluator(probes, reference, fps=config.fps, window_s=args.window, max_offset=args.max_offset)

    # 2. generate block by block: each block is written to the MP4 and scored, then dropped
    n_blocks = -(-len(pcm) // config.audio.block_samples)
    bar = tqdm(total=n_blocks, unit="block", disable=args.no_progress, file=sys.stderr)
    with open(out / "generated.mp4", "wb") as f:
        f.write(runner.start_session(SessionSpec(image_rgb=reference, seed=args.seed)))
        for res in runner.generate(pcm):
            f.write(res.fragment)
            ev.add_frames(res.frames.numpy(), res.audio)
            bar.update(1)
        f.write(runner.close_session())
    bar.close()
    return ev.finish()
