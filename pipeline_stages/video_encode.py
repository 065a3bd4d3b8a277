"""Block video encoding: one block of RGB frames -> H.264 access units, ready to mux without re-encoding.

The lane's decode rank runs this stage on every block it decodes, so what leaves the rank is a block of
H.264 access units (a few tens of kB) rather than its raw frames (9.7 MB at 448x640); the packager
(:class:`~pipeline_stages.package_stage.PackageStage`) muxes them into fMP4 as they are. It does no I/O.

Settings
    :class:`~pipeline_stages.package_stage.PackageConfig` is the one configuration of the output stream:
    libx264, yuv420p (BT.709, limited range, tagged in the SPS), no B-frames, ``tune=zerolatency``
    (every frame comes out as soon as it goes in), and a forced IDR keyframe at the start of every block
    (GOP = one block). The RGB -> YUV conversion is swscale's bilinear BT.709 one.

Output
    One access unit per frame in AVCC form (each NAL unit prefixed by its 4-byte big-endian length),
    without SPS, PPS or access-unit delimiters: the parameter sets travel out of band as the
    AVCDecoderConfigurationRecord :attr:`BlockVideoEncoder.codec_config` (the ``avcC`` of the init
    segment). The first access unit of an encoder also carries x264's SEI (version and options).

Restarts
    Every block starts with an IDR, so each block's access units decode on their own. The parameter sets
    are a pure function of the configuration (a fresh encoder with the same :class:`PackageConfig` gives
    the same bytes, whatever its thread count or start frame; ``tests/unit/stages/test_video_encode.py``),
    so a decode rank that restarts mid-session with a new encoder continues the stream under the same
    init segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from pipeline_stages import fmp4
from pipeline_stages.package_stage import PackageConfig, PackageInputError


@dataclass(frozen=True)
class EncodedBlock:
    """One block of H.264: ``access_units[i]`` is frame ``first_frame + i`` (AVCC form)."""

    access_units: tuple[bytes, ...]
    first_frame: int  # absolute index (pts) of the block's first frame

    @property
    def keyframes(self) -> tuple[bool, ...]:
        return tuple(fmp4.is_idr(au) for au in self.access_units)

    @property
    def nbytes(self) -> int:
        return sum(len(au) for au in self.access_units)


class BlockVideoEncoder:
    """RGB blocks of one stream -> :class:`EncodedBlock` s (x264, one IDR per block).

    Pure and single-threaded from the caller's view (x264 may use its own slice threads); one instance
    per stream. ``start_frame`` is the absolute index of the first frame it will be given::

        enc = BlockVideoEncoder(config, start_frame=cfg.block_start_frame(k))
        avcc = enc.codec_config
        for frames in blocks:            # uint8 [T, H, W, 3] RGB
            send(enc.encode_block(frames).access_units, avcc)
        enc.close()
    """

    def __init__(self, config: PackageConfig, start_frame: int = 0) -> None:
        if not isinstance(start_frame, int) or isinstance(start_frame, bool) or start_frame < 0:
            raise PackageInputError(f"start_frame must be an integer >= 0, got {start_frame!r}")
        self.config = cfg = config
        self.next_frame = start_frame
        self.closed = False

        # x264, low latency, one IDR per block, parameter sets out of band (global header -> extradata).
        self._codec = av.CodecContext.create("libx264", "w")
        self._codec.width, self._codec.height = cfg.width, cfg.height
        self._codec.pix_fmt = "yuv420p"
        self._codec.time_base = Fraction(1, cfg.fps)
        self._codec.framerate = Fraction(cfg.fps)
        self._codec.gop_size = cfg.block_frames
        self._codec.max_b_frames = 0
        self._codec.flags |= av.codec.context.Flags.global_header
        x264_params = [
            f"keyint={cfg.block_frames}",
            "scenecut=0",  # no extra keyframes inside a block
            "bframes=0",
            f"threads={cfg.threads}",
            "colorprim=bt709:transfer=bt709:colormatrix=bt709:range=tv",
        ]
        options = {"preset": cfg.preset, "tune": "zerolatency", "forced-idr": "1"}
        if cfg.video_bitrate is None:
            options["crf"] = f"{cfg.crf:g}"
        else:
            self._codec.bit_rate = cfg.video_bitrate
            options.update(maxrate=str(cfg.video_bitrate), bufsize=str(cfg.video_bitrate))
        options["x264-params"] = ":".join(x264_params)
        self._codec.options = options
        self._codec.open()
        self.sps, self.pps = fmp4.parameter_sets(bytes(self._codec.extradata or b""))
        #: AVCDecoderConfigurationRecord: what the init segment's ``avcC`` holds
        self.codec_config = fmp4.avc_decoder_config(self.sps, self.pps)

    def encode_block(self, frames) -> EncodedBlock:
        """Encode ``frames`` (uint8 ``[T, H, W, 3]`` RGB); the first comes out as an IDR picture."""
        cfg = self.config
        if self.closed:
            raise PackageInputError("encode_block after close(): start a new BlockVideoEncoder")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8:
            raise PackageInputError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        if frames.ndim != 4 or frames.shape[0] < 1 or frames.shape[1:] != (cfg.height, cfg.width, 3):
            raise PackageInputError(
                f"frames must have shape [T, {cfg.height}, {cfg.width}, 3] (T, H, W, RGB), got {list(frames.shape)}"
            )
        first = self.next_frame
        units: list[bytes] = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(
                format="yuv420p",
                dst_colorspace="ITU709",
                dst_color_range="MPEG",
                interpolation="BILINEAR",
                threads=1,
            )
            frame.pts = first + i
            frame.pict_type = av.video.frame.PictureType.I if i == 0 else av.video.frame.PictureType.NONE
            for packet in self._codec.encode(frame):
                if not units and not packet.is_keyframe:
                    raise RuntimeError("x264 did not start the block with a keyframe")
                units.append(fmp4.annexb_to_avcc(bytes(packet)))
        if len(units) != len(frames):
            raise RuntimeError(
                f"x264 returned {len(units)} packets for {len(frames)} frames; it must not buffer frames"
            )
        if not fmp4.is_idr(units[0]):
            raise RuntimeError("x264's first access unit of the block is not an IDR picture")
        self.next_frame += len(frames)
        return EncodedBlock(tuple(units), first)

    def close(self) -> None:
        """End the stream; zerolatency x264 holds nothing back, so the flush must return no packet."""
        if self.closed:
            return
        self.closed = True
        if self._codec.encode(None):
            raise RuntimeError("x264 returned packets on flush; frames were buffered")
