"""Stream packaging: decoded blocks (H.264 access units or RGB frames + 16 kHz audio) -> fragmented MP4.

``PackageStage`` is the last pure stage of a lane's output path. For every block the VAE decoder
emits (12 frames at 25 fps = 0.48 s; the first block of a stream has 9 frames) it returns, at once,
one media fragment (``moof`` + ``mdat``) that a client appends after the init segment. It does no
I/O and starts no threads of its own (x264 may use its own slice threads); the stream-packager
service wraps it.

Video
    Encoded by :class:`~pipeline_stages.video_encode.BlockVideoEncoder` with this module's
    :class:`PackageConfig`: libx264, yuv420p (BT.709, limited range, tagged in the SPS), no B-frames,
    ``tune=zerolatency`` so every frame comes out of the encoder as soon as it goes in, and a forced
    IDR keyframe at the start of every block (GOP = one block). So each fragment decodes on its own
    after the init segment, which is what a client that joins or reconnects mid-stream needs.
    Two ways in: :meth:`PackageStage.push_encoded` muxes access units encoded elsewhere (the services:
    the lane's decode rank encodes; the stage is built from their codec configuration and opens no
    video encoder), :meth:`PackageStage.push_block` encodes raw frames with the stage's own encoder
    (the in-process paths). Both give the same bytes for the same frames.

Audio
    16 kHz mono float32 in, resampled to 32 kHz by an exact integer-factor polyphase windowed-sinc
    filter (deterministic numpy, float64), encoded with FFmpeg's native AAC-LC encoder. At 32 kHz a
    12-frame block is 15,360 samples = exactly 15 AAC frames of 1,024 samples, so after the first
    block every fragment carries exactly 15 AAC frames and the AAC frame grid stays aligned with the
    block grid.

    Two delays are handled explicitly, so the timestamps stay exact:

    * the resampler looks ``half_taps`` input samples ahead, so the last ``L * half_taps`` output
      samples of a block (2 ms) become final only when the next block arrives;
    * the AAC encoder has 1,024 samples of priming (its first packet decodes to the 1,024 samples
      *before* the first input sample) and it holds one frame back as look-ahead.

    The stage prepends ``pad`` silent samples (``pad < 1024``) so that the samples that are final at
    the end of every block fill whole AAC frames. The audio track's edit list (``elst``
    ``media_time`` = priming + pad of a stream that starts at block 0) maps media time to
    presentation time, so presentation time 0 is the first real input sample. The audio media
    timeline is therefore *absolute*: the AAC packet covering absolute 32 kHz sample ``s`` has decode
    time ``s + media_time``, whatever block the stream started at, and every stream of a session has
    the same init segment. The cost is latency, not sync: a block's fragment carries audio up to
    2,080 samples (65 ms) before the block's end; the rest comes with the next fragment (``close()``
    flushes the tail). A player that ignored the edit list would play audio ``media_time``
    (1,824 samples = 57 ms) late.

Timing
    Video time scale 90 kHz (3,600 ticks per frame at 25 fps), audio time scale 32 kHz. ``tfdt`` of
    block ``k`` is the absolute time of its first frame, so fragments from any stage of the same
    session line up. ``mfhd`` sequence number of block ``k`` is ``k + 1``; ``close()`` uses the next.

Restarting a stream mid-session
    A client that reconnects takes ``init_segment()`` (identical for every stream of the session)
    and then the next fragments of the running stage: each starts with an IDR frame and carries
    absolute timestamps. When the stage itself must restart (service restart, new lane), build
    ``PackageStage(..., start_block=k)`` and push blocks ``k, k+1, ...``: its fragments carry the
    same absolute timestamps as the original stream would have (the MSE client sets its playback
    position to ``block_start_time(k)``). The new audio encoder knows no earlier audio: its stream
    starts up to 33 ms before block ``k`` with silence, and from the end of block ``k`` on its AAC
    packets have the same decode times as the original stream's. When the *video encoder* restarts
    (the decode rank restarted), its blocks still start with an IDR picture and its parameter sets
    are the same bytes (a pure function of the configuration), so the running stage muxes them on;
    a codec configuration that differs from the init segment's anyway goes in-band (see
    :meth:`PackageStage.push_encoded`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np

from pipeline_stages import fmp4

#: samples per AAC-LC frame
AAC_FRAME_SAMPLES = 1024
#: FFmpeg's native AAC encoder primes with one frame (its ``initial_padding``); checked at run time
AAC_ENCODER_DELAY = 1024
VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2
VIDEO_TIMESCALE = 90_000
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class PackageInputError(ValueError):
    """A block, a configuration value or a call order that the packager cannot accept."""


@dataclass(frozen=True)
class PackageConfig:
    """Everything that shapes the output stream. Defaults are the reference configuration.

    ``width``/``height`` default to the reference 704x384 (area 720*400 rounded to multiples of 64);
    any even size works.
    """

    width: int = 704
    height: int = 384
    fps: int = 25
    audio_rate_in: int = 16_000  # platform audio: mono float32
    audio_rate_out: int = 32_000  # AAC rate: 0.48 s = 15 AAC frames at 32 kHz
    block_frames: int = 12  # video frames per block
    first_block_frames: int = 9  # frames in block 0 of a stream
    preset: str = "veryfast"  # x264 speed preset
    crf: float | None = 23.0  # constant-quality mode (used when video_bitrate is None)
    video_bitrate: int | None = None  # bits/s; if set, ABR with a one-second VBV buffer
    audio_bitrate: int = 64_000  # bits/s
    threads: int = 0  # x264 threads, 0 = x264 decides (slice threads under zerolatency)
    half_taps: int = 16  # resampler look-ahead in input samples (filter length 2 * half_taps)
    kaiser_beta: float = 8.0  # resampler window shape

    def __post_init__(self) -> None:
        positive = ("width", "height", "fps", "audio_rate_in", "audio_rate_out", "block_frames")
        positive += ("first_block_frames", "audio_bitrate", "half_taps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PackageInputError(f"{name} must be a positive integer, got {value!r}")
        if self.width % 2 or self.height % 2:
            raise PackageInputError(f"width and height must be even for yuv420p, got {self.width}x{self.height}")
        if VIDEO_TIMESCALE % self.fps:
            raise PackageInputError(f"fps must divide {VIDEO_TIMESCALE}, got {self.fps}")
        if self.audio_rate_in % self.fps or self.audio_rate_out % self.fps:
            raise PackageInputError(
                f"audio rates must hold a whole number of samples per frame at {self.fps} fps, "
                f"got {self.audio_rate_in} and {self.audio_rate_out}"
            )
        if self.audio_rate_out % self.audio_rate_in:
            raise PackageInputError(
                f"audio_rate_out must be an integer multiple of audio_rate_in, got {self.audio_rate_out} "
                f"and {self.audio_rate_in}"
            )
        if self.preset not in X264_PRESETS:
            raise PackageInputError(f"preset must be one of {X264_PRESETS}, got {self.preset!r}")
        if self.video_bitrate is None and self.crf is None:
            raise PackageInputError("set either crf or video_bitrate")
        if self.video_bitrate is not None and self.video_bitrate <= 0:
            raise PackageInputError(f"video_bitrate must be positive, got {self.video_bitrate}")
        if self.threads < 0:
            raise PackageInputError(f"threads must be >= 0, got {self.threads}")

    @classmethod
    def tiny(cls, **overrides) -> PackageConfig:
        """CPU test size: 64x64, one x264 thread, the fastest preset."""
        base = cls(width=64, height=64, preset="ultrafast", threads=1)
        return replace(base, **overrides)

    # ---- derived sizes -------------------------------------------------------------------------

    @property
    def upsample_factor(self) -> int:
        return self.audio_rate_out // self.audio_rate_in

    @property
    def samples_in_per_frame(self) -> int:
        return self.audio_rate_in // self.fps

    @property
    def samples_out_per_frame(self) -> int:
        return self.audio_rate_out // self.fps

    @property
    def frame_ticks(self) -> int:
        """Duration of one video frame in the video time scale."""
        return VIDEO_TIMESCALE // self.fps

    def frames_in_block(self, block: int) -> int:
        return self.first_block_frames if block == 0 else self.block_frames

    def block_start_frame(self, block: int) -> int:
        """Absolute index of the first video frame of ``block``."""
        return 0 if block == 0 else self.first_block_frames + (block - 1) * self.block_frames

    def block_start_time(self, block: int) -> Fraction:
        """Presentation time (seconds) of ``block``'s first frame."""
        return Fraction(self.block_start_frame(block), self.fps)

    @property
    def resampler_holdback(self) -> int:
        """Output samples a block leaves not yet final (they need the next block's first input)."""
        return 0 if self.upsample_factor == 1 else self.upsample_factor * self.half_taps

    def audio_pad(self, start_block: int) -> int:
        """Silent samples prepended by a stream starting at ``start_block`` so blocks end on AAC frames.

        At the end of every block the final output samples reach (absolute, output rate)
        ``block_end - holdback``. Choosing the encoder's first input sample ``a0 = start - pad`` with
        ``a0 = end_of_block_0 - holdback (mod 1024)`` makes that a whole number of AAC frames, for
        every block when the block length is a multiple of 1024 samples (as at 32 kHz / 25 fps).
        """
        first_end = self.first_block_frames * self.samples_out_per_frame
        start = self.block_start_frame(start_block) * self.samples_out_per_frame
        return (start - first_end + self.resampler_holdback) % AAC_FRAME_SAMPLES

    @property
    def audio_media_time(self) -> int:
        """Edit-list offset of the audio track: decode time of absolute output sample 0."""
        return AAC_ENCODER_DELAY + self.audio_pad(0)


@dataclass
class PackageState:
    """Per-stream counters. All are integers; decode times are in each track's time scale."""

    next_block: int  # index of the block the next push_block expects
    next_frame: int  # absolute index of that block's first frame
    sequence_number: int  # mfhd of the next fragment
    audio_first_decode_time: int  # decode time of the encoder's first (priming) packet
    audio_frames_fed: int = 0  # AAC frames given to the encoder
    audio_packets_out: int = 0  # AAC packets written to fragments
    inband_parameter_sets: int = 0  # blocks whose codec configuration differed from the init segment's
    closed: bool = False


class PolyphaseUpsampler:
    """Streaming integer-factor upsampler: windowed-sinc polyphase FIR, float64, deterministic.

    Output sample ``L*n + r`` (phase ``r`` of input sample ``n``) is the band-limited value at input
    time ``n + r/L``: ``sum_j x[n + j] * h_r[j]`` over ``j = -half+1 .. half``, with
    ``h_r[j] = sinc(j - r/L) * kaiser(j - r/L)`` normalised to unit DC gain. Phase 0 reduces to
    ``x[n]`` exactly. The filter needs ``half`` samples of look-ahead, so after ``N`` input samples
    ``L * (N - half)`` outputs are final; ``flush()`` treats the input as silent after its end.
    Input before the stream's start is silence too.
    """

    def __init__(self, factor: int, half: int, beta: float) -> None:
        self.factor, self.half = factor, half
        # 1. Taps [2*half, L]: column r is phase r.
        offsets = np.arange(-half + 1, half + 1, dtype=np.float64)[:, None]  # j
        t = offsets - np.arange(factor, dtype=np.float64)[None, :] / factor  # j - r/L
        window = np.i0(beta * np.sqrt(np.clip(1.0 - (t / half) ** 2, 0.0, None))) / np.i0(beta)
        taps = np.sinc(t) * window
        taps[:, 0] = offsets[:, 0] == 0  # phase 0 is x[n] itself (sinc at integers, without rounding noise)
        self.taps = taps / taps.sum(axis=0, keepdims=True)
        # 2. State: inputs x[n_next - half + 1 :], starting with silence before the stream.
        self.pending = np.zeros(half - 1, dtype=np.float64)

    def push(self, x: np.ndarray) -> np.ndarray:
        """Append input samples ``[n]``; return the outputs that became final ``[L * m]`` (float64)."""
        if self.factor == 1:
            return x.astype(np.float64)
        self.pending = np.concatenate([self.pending, x.astype(np.float64)])
        count = len(self.pending) - 2 * self.half + 1  # inputs n whose look-ahead is available
        if count <= 0:
            return np.zeros(0, dtype=np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(self.pending, 2 * self.half)[:count]  # [m, 2*half]
        out = windows @ self.taps  # [m, 2*half] @ [2*half, L] -> [m, L]
        self.pending = self.pending[count:]
        return out.reshape(-1)  # [m, L] -> [m * L], phase-interleaved

    def flush(self) -> np.ndarray:
        """The outputs still held back, computed as if silence followed the last input."""
        return self.push(np.zeros(self.half, dtype=np.float64)) if self.factor > 1 else np.zeros(0)


class PackageStage:
    """Video + audio of one stream -> init segment and one fragmented-MP4 fragment per block.

    Pure and single-threaded from the caller's view; one instance per output stream. Typical use::

        stage = PackageStage(704, 384)
        send(stage.init_segment())
        for block in blocks:             # block 0: 9 frames, then 12; audio 640 samples/frame
            send(stage.push_block(block.frames, block.audio))
        send(stage.close())

    or, with blocks encoded elsewhere (:class:`~pipeline_stages.video_encode.BlockVideoEncoder`)::

        stage = PackageStage(704, 384, start_block=k, video_config=avcc)
        for block in blocks:
            send(stage.push_encoded(block.access_units, block.audio, avcc))
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: int = 25,
        audio_rate_in: int = 16_000,
        *,
        crf: float | None = 23.0,
        video_bitrate: int | None = None,
        audio_bitrate: int = 64_000,
        preset: str = "veryfast",
        threads: int = 0,
        start_block: int = 0,
        config: PackageConfig | None = None,
        video_config: bytes | None = None,
    ) -> None:
        """Open the encoders. ``config``, if given, replaces every other size/codec argument
        (``width``/``height`` must then match it).

        ``video_config``: the AVCDecoderConfigurationRecord of blocks encoded elsewhere
        (:attr:`~pipeline_stages.video_encode.BlockVideoEncoder.codec_config`) for a stage that muxes
        them with :meth:`push_encoded`; no video encoder is opened then. Without it the stage opens its
        own encoder for :meth:`push_block`."""
        if config is not None and (config.width, config.height) != (width, height):
            raise PackageInputError(
                f"width x height {width}x{height} differs from the config's {config.width}x{config.height}"
            )
        if config is None:
            config = PackageConfig(
                width=width,
                height=height,
                fps=fps,
                audio_rate_in=audio_rate_in,
                crf=crf,
                video_bitrate=video_bitrate,
                audio_bitrate=audio_bitrate,
                preset=preset,
                threads=threads,
            )
        if not isinstance(start_block, int) or isinstance(start_block, bool) or start_block < 0:
            raise PackageInputError(f"start_block must be an integer >= 0, got {start_block!r}")
        self.config = cfg = config
        self.start_block = start_block

        # 1. Video: the parameter sets of the init segment, from the given codec configuration or from
        #    this stage's own encoder (opened only when the frames come raw).
        self._encoder = None
        if video_config is None:
            self._encoder = self._open_encoder(cfg.block_start_frame(start_block))
            video_config = self._encoder.codec_config
        try:
            sps, pps = fmp4.parameter_sets(bytes(video_config))
            size = fmp4.sps_dimensions(sps)
        except fmp4.Fmp4Error as exc:
            raise PackageInputError(f"bad H.264 codec configuration: {exc}") from exc
        if size != (cfg.width, cfg.height):
            raise PackageInputError(
                f"the H.264 codec configuration is for {size[0]}x{size[1]}, the stream is {cfg.width}x{cfg.height}"
            )
        self.video_config = fmp4.avc_decoder_config(sps, pps)

        # 2. Audio: resampler, then FFmpeg's AAC-LC encoder fed whole 1024-sample frames.
        self._resampler = PolyphaseUpsampler(cfg.upsample_factor, cfg.half_taps, cfg.kaiser_beta)
        self._audio = av.CodecContext.create("aac", "w")
        self._audio.sample_rate = cfg.audio_rate_out
        self._audio.layout = "mono"
        self._audio.format = "fltp"
        self._audio.bit_rate = cfg.audio_bitrate
        self._audio.time_base = Fraction(1, cfg.audio_rate_out)
        self._audio.flags |= av.codec.context.Flags.global_header  # AudioSpecificConfig in extradata
        self._audio.open()
        if self._audio.frame_size != AAC_FRAME_SAMPLES:
            raise RuntimeError(f"AAC encoder frame size {self._audio.frame_size}, expected {AAC_FRAME_SAMPLES}")
        pad = cfg.audio_pad(start_block)
        self._fifo = np.zeros(pad, dtype=np.float64)  # encoder-ready samples, not yet a whole frame

        # 3. Track descriptions (identical for every stream of a session) and stream counters.
        self._tracks = (
            fmp4.AvcTrack(VIDEO_TRACK_ID, VIDEO_TIMESCALE, cfg.width, cfg.height, sps, pps, cfg.frame_ticks),
            fmp4.AacTrack(
                AUDIO_TRACK_ID,
                cfg.audio_rate_out,
                1,
                bytes(self._audio.extradata),
                cfg.audio_bitrate,
                cfg.audio_media_time,
                AAC_FRAME_SAMPLES,
            ),
        )
        start_sample = cfg.block_start_frame(start_block) * cfg.samples_out_per_frame  # absolute, output rate
        self.state = PackageState(
            next_block=start_block,
            next_frame=cfg.block_start_frame(start_block),
            sequence_number=start_block + 1,
            # the first packet decodes to [a0 - delay, a0), a0 = start_sample - pad; media = absolute + media_time
            audio_first_decode_time=start_sample - pad - AAC_ENCODER_DELAY + cfg.audio_media_time,
        )

    # ---- public API ----------------------------------------------------------------------------

    def init_segment(self) -> bytes:
        """``ftyp`` + ``moov`` (H.264 + AAC tracks). Available before the first block; call any time."""
        return fmp4.init_segment(self._tracks)

    def push_block(self, frames, audio) -> bytes:
        """Encode one block and return its fragment (``moof`` + ``mdat``), playable after the init segment.

        ``frames``: uint8 ``[T, H, W, 3]`` RGB, ``T`` = 9 for block 0 of a stream, else 12.
        ``audio``: float32 ``[T * audio_rate_in / fps]`` mono samples in [-1, 1] (clipped).
        """
        self._validate(frames, audio)
        if self._encoder is None:   # a stage built from a codec configuration, given raw frames after all
            self._encoder = self._open_encoder(self.state.next_frame)
        block = self._encoder.encode_block(frames)
        return self.push_encoded(block.access_units, audio, self._encoder.codec_config)

    def push_encoded(self, access_units, audio, video_config: bytes | None = None) -> bytes:
        """Mux one block of H.264 access units (no re-encoding) and its audio into the block's fragment.

        ``access_units``: one AVCC access unit per frame (:class:`~pipeline_stages.video_encode.EncodedBlock`),
        the first an IDR picture; ``audio`` as for :meth:`push_block`. ``video_config``: the codec
        configuration they were encoded with. When it differs from the init segment's (an encoder of
        another build after a restart), the block's parameter sets go in-band, before its IDR picture,
        so decoders switch to them while the init segment stays the session's.
        """
        cfg, state = self.config, self.state
        access_units = tuple(bytes(au) for au in access_units)
        expected_frames = cfg.frames_in_block(state.next_block)
        self._check_state()
        if len(access_units) != expected_frames:
            raise PackageInputError(
                f"block {state.next_block} must have {expected_frames} access units, got {len(access_units)}"
            )
        audio = self._validate_audio(audio, expected_frames)

        # 1. Video: one sample per access unit; the first must be an IDR picture.
        try:
            sync = [fmp4.is_idr(au) for au in access_units]
            inband = b""
            if video_config is not None and bytes(video_config) != self.video_config:
                sets = fmp4.parameter_sets(bytes(video_config))   # the same sets in another form are no change
                if sets != fmp4.parameter_sets(self.video_config):
                    inband = b"".join(len(nal).to_bytes(4, "big") + nal for nal in sets)
        except fmp4.Fmp4Error as exc:
            raise PackageInputError(f"block {state.next_block}: bad H.264 data: {exc}") from exc
        if not sync[0]:
            raise PackageInputError(f"block {state.next_block} does not start with an IDR picture")
        if inband:
            state.inband_parameter_sets += 1
            access_units = (inband + access_units[0],) + access_units[1:]
        video_samples = tuple(fmp4.Sample(au, cfg.frame_ticks, s) for au, s in zip(access_units, sync, strict=True))
        video_run = fmp4.TrackRun(VIDEO_TRACK_ID, state.next_frame * cfg.frame_ticks, video_samples)

        # 2. Audio: resample, append to the frame FIFO, encode every whole AAC frame.
        audio_run = self._encode_audio(self._resampler.push(audio), final=False)

        # 3. Fragment and counters.
        fragment = fmp4.media_fragment(state.sequence_number, [video_run, audio_run])
        state.sequence_number += 1
        state.next_frame += expected_frames
        state.next_block += 1
        return fragment

    def close(self) -> bytes:
        """Flush the audio still held by the resampler and the encoder; return the last fragment (may be b"")."""
        state = self.state
        if state.closed:
            return b""
        state.closed = True
        if self._encoder is not None:   # zerolatency x264 holds nothing back (checked by its close)
            self._encoder.close()
        audio_run = self._encode_audio(self._resampler.flush(), final=True)
        fragment = fmp4.media_fragment(state.sequence_number, [audio_run])
        if fragment:
            state.sequence_number += 1
        return fragment

    # ---- internals -----------------------------------------------------------------------------

    def _open_encoder(self, start_frame: int):
        """This stage's own video encoder, for raw frames (imported here: ``video_encode`` imports
        this module's :class:`PackageConfig`)."""
        from pipeline_stages.video_encode import BlockVideoEncoder

        return BlockVideoEncoder(self.config, start_frame=start_frame)

    def _check_state(self) -> None:
        if self.state.closed:
            raise PackageInputError("push_block after close(): start a new PackageStage")

    def _validate(self, frames, audio) -> None:
        """Check one block's raw frames and audio."""
        cfg, state = self.config, self.state
        self._check_state()
        frames = np.asarray(frames)
        expected_frames = cfg.frames_in_block(state.next_block)
        if frames.dtype != np.uint8:
            raise PackageInputError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        if frames.ndim != 4 or frames.shape[1:] != (cfg.height, cfg.width, 3):
            raise PackageInputError(
                f"frames must have shape [T, {cfg.height}, {cfg.width}, 3] (T, H, W, RGB), got {list(frames.shape)}"
            )
        if frames.shape[0] != expected_frames:
            raise PackageInputError(
                f"block {state.next_block} must have {expected_frames} frames, got {frames.shape[0]}"
            )
        self._validate_audio(audio, expected_frames)

    def _validate_audio(self, audio, frames: int) -> np.ndarray:
        """Check one block's audio (``frames`` video frames long); return it as a numpy array."""
        cfg, state = self.config, self.state
        audio = np.asarray(audio)
        expected_samples = frames * cfg.samples_in_per_frame
        if audio.dtype != np.float32:
            raise PackageInputError(f"audio must be float32 mono samples, got dtype {audio.dtype}")
        if audio.ndim != 1 or audio.shape[0] != expected_samples:
            raise PackageInputError(
                f"block {state.next_block} audio must have shape [{expected_samples}] "
                f"({frames} frames at {cfg.audio_rate_in} Hz), got {list(audio.shape)}"
            )
        if not np.isfinite(audio).all():
            raise PackageInputError("audio contains NaN or infinite samples")
        return audio

    def _encode_audio(self, samples: np.ndarray, *, final: bool) -> fmp4.TrackRun:
        """Append output-rate ``samples`` to the FIFO and encode every whole frame (all of it if ``final``)."""
        state = self.state
        # 1. Whole frames from the FIFO; when final, the partial tail too (the encoder pads it).
        self._fifo = np.concatenate([self._fifo, samples])
        n_whole = len(self._fifo) // AAC_FRAME_SAMPLES
        cut = len(self._fifo) if final else n_whole * AAC_FRAME_SAMPLES
        chunks = [self._fifo[i : i + AAC_FRAME_SAMPLES] for i in range(0, cut, AAC_FRAME_SAMPLES)]
        self._fifo = self._fifo[cut:]

        # 2. Encode; every packet decodes to exactly one frame of 1024 samples (the last may be padding).
        packets = []
        for chunk in chunks:
            pcm = np.clip(chunk, -1.0, 1.0).astype(np.float32)[None, :]  # [1, n] planar mono
            frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
            frame.sample_rate = self.config.audio_rate_out
            frame.pts = state.audio_frames_fed * AAC_FRAME_SAMPLES
            state.audio_frames_fed += 1
            packets.extend(self._audio.encode(frame))
        if final:
            packets.extend(self._audio.encode(None))
        if packets and state.audio_packets_out == 0 and packets[0].pts != -AAC_ENCODER_DELAY:
            # the encoder's first packet must be its priming frame, or the edit list would be wrong
            raise RuntimeError(f"AAC encoder priming is {-packets[0].pts} samples, expected {AAC_ENCODER_DELAY}")
        decode_time = state.audio_first_decode_time + AAC_FRAME_SAMPLES * state.audio_packets_out
        state.audio_packets_out += len(packets)
        samples_out = tuple(fmp4.Sample(bytes(p), AAC_FRAME_SAMPLES, True) for p in packets)
        return fmp4.TrackRun(AUDIO_TRACK_ID, decode_time, samples_out)


#: the services' rule: frames of at most this many pixels are test-size and get :meth:`PackageConfig.tiny`
TINY_MAX_PIXELS = 128 * 128


def lane_stream_config(width: int, height: int, fps: int, block_frames: int, tiny: bool | None = None) -> PackageConfig:
    """The stream configuration of a lane's blocks: every block, the first included, holds ``block_frames``
    frames. ``tiny`` starts from :meth:`PackageConfig.tiny` (the test-size encoder settings) instead of
    the defaults; ``None`` applies the services' rule (:data:`TINY_MAX_PIXELS`), which the decode rank's
    encoder and the packager share, so both agree on the stream of any size."""
    if tiny is None:
        tiny = width * height <= TINY_MAX_PIXELS
    base = PackageConfig.tiny() if tiny else PackageConfig()
    return replace(base, width=width, height=height, fps=fps, block_frames=block_frames,
                   first_block_frames=block_frames)


def make_package_stage(width: int, height: int, fps: int, block_frames: int, start_block: int = 0,
                       tiny: bool | None = False, video_config: bytes | None = None) -> PackageStage:
    """A packager for a lane's blocks (:func:`lane_stream_config`); ``video_config`` as for
    :class:`PackageStage` (blocks encoded elsewhere)."""
    cfg = lane_stream_config(width, height, fps, block_frames, tiny)
    return PackageStage(width, height, fps=fps, config=cfg, start_block=start_block, video_config=video_config)
