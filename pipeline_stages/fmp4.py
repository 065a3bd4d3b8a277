"""A small ISO-BMFF (MP4) box writer for fragmented MP4 with one H.264 and one AAC track.

Fragmented MP4 is what browsers' Media Source Extensions (MSE) play and what a file made by
concatenating received bytes plays: one *init segment* (``ftyp`` + ``moov``, the codecs and time
scales, no samples) followed by *media fragments* (``moof`` + ``mdat``), each carrying the samples of a
short stretch of time with its own absolute decode time (``tfdt``).

Layout written here (ISO/IEC 14496-12 box names, ISO/IEC 14496-15 for ``avcC``, 14496-1/-3 for
``esds``)::

    ftyp
    moov
      mvhd
      trak (video)  tkhd, mdia{mdhd, hdlr 'vide', minf{vmhd, dinf{dref{url}}, stbl{stsd{avc1{avcC}}, empty tables}}}
      trak (audio)  tkhd, edts{elst}, mdia{mdhd, hdlr 'soun', minf{smhd, dinf, stbl{stsd{mp4a{esds}}, empty tables}}}
      mvex          trex per track
    -- then per fragment --
    moof
      mfhd          sequence_number
      traf per track  tfhd (default-base-is-moof), tfdt (v1, 64-bit), trun (offset, duration, size, flags per sample)
    mdat            the samples of every traf, in traf order

This module knows nothing about encoders: it takes sample bytes (H.264 in AVCC form: each NAL unit
prefixed by its 4-byte big-endian length; AAC as raw access units) and integer timestamps. The
``annexb_*`` helpers convert an encoder's Annex-B byte stream (NAL units separated by start codes)
into that form; :func:`avcc_nal_units` checks and splits an AVCC access unit that arrived from elsewhere
(the lane's decode rank encodes, the packager muxes), and :func:`sps_dimensions` reads the picture size
from a sequence parameter set, so an init segment can be built from the codec configuration alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

#: ``sample_flags`` (ISO/IEC 14496-12 8.8.3.1): a sync sample depends on no other sample ...
SYNC_SAMPLE_FLAGS = 0x02000000
#: ... a non-sync sample depends on others (sample_depends_on=1, sample_is_non_sync_sample=1).
NON_SYNC_SAMPLE_FLAGS = 0x01010000

MOVIE_TIMESCALE = 1000
#: unity transformation matrix of mvhd/tkhd (16.16 and 2.30 fixed point)
_UNITY_MATRIX = struct.pack(">9i", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)
_LANGUAGE_UND = ((ord("u") - 0x60) << 10) | ((ord("n") - 0x60) << 5) | (ord("d") - 0x60)

# H.264 NAL unit types (ITU-T H.264 table 7-1) that this writer handles specially.
NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9


class Fmp4Error(ValueError):
    """Malformed input to the box writer (bad extradata, sample or track description)."""


# ------------------------------------------------------------------------------------------------
# Track and sample descriptions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AvcTrack:
    """An H.264 video track (``avc1`` sample entry; parameter sets live in ``avcC``, not in samples)."""

    track_id: int
    timescale: int  # ticks per second of this track's media timeline
    width: int
    height: int
    sps: bytes  # one sequence parameter set NAL unit (without start code)
    pps: bytes  # one picture parameter set NAL unit (without start code)
    default_sample_duration: int  # ticks per frame, for trex


@dataclass(frozen=True)
class AacTrack:
    """An AAC audio track (``mp4a`` sample entry with an ``esds`` descriptor).

    ``media_time`` is the edit-list offset: the first ``media_time`` ticks (= samples, the time scale
    is the sample rate) of the media timeline are not presented. It carries the AAC encoder's
    priming delay (and any silence the packager prepends), so presentation time 0 of the audio
    track is the first real input sample.
    """

    track_id: int
    sample_rate: int  # also the track's time scale
    channels: int
    audio_specific_config: bytes  # the encoder's extradata (ISO/IEC 14496-3 AudioSpecificConfig)
    avg_bitrate: int
    media_time: int
    samples_per_frame: int = 1024  # default sample duration, for trex


@dataclass(frozen=True)
class Sample:
    """One coded sample: a video access unit or an AAC frame."""

    data: bytes
    duration: int  # in the track's time scale
    is_sync: bool = True


@dataclass(frozen=True)
class TrackRun:
    """The samples of one track inside one fragment, starting at ``base_media_decode_time``."""

    track_id: int
    base_media_decode_time: int  # tfdt: decode time of the first sample, in the track's time scale
    samples: tuple[Sample, ...]


# ------------------------------------------------------------------------------------------------
# Box primitives
# ------------------------------------------------------------------------------------------------


def box(box_type: bytes, *payload: bytes) -> bytes:
    """A plain box: 32-bit size, 4-character type, payload."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), box_type) + body


def full_box(box_type: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A FullBox: a plain box whose payload starts with an 8-bit version and 24-bit flags."""
    return box(box_type, struct.pack(">I", (version << 24) | flags), *payload)


def _descriptor(tag: int, payload: bytes) -> bytes:
    """An MPEG-4 systems descriptor (ISO/IEC 14496-1 expandable size, written on 4 bytes)."""
    n = len(payload)
    size = bytes([0x80 | ((n >> 21) & 0x7F), 0x80 | ((n >> 14) & 0x7F), 0x80 | ((n >> 7) & 0x7F), n & 0x7F])
    return bytes([tag]) + size + payload


# ------------------------------------------------------------------------------------------------
# H.264 byte-stream helpers
# ------------------------------------------------------------------------------------------------


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex-B byte stream (``00 00 01`` / ``00 00 00 01`` start codes) into NAL units."""
    nals: list[bytes] = []
    start = -1  # index of the current NAL's first byte
    i, n = 0, len(data)
    while i + 2 < n:
        if data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 1:
            if start >= 0:
                nals.append(data[start:i].rstrip(b"\x00"))  # trailing zeros belong to a 4-byte start code
            i += 3
            start = i
        else:
            i += 1
    if start < 0:
        raise Fmp4Error("no Annex-B start code found in H.264 data")
    nals.append(data[start:])
    return [nal for nal in nals if nal]


def nal_type(nal: bytes) -> int:
    """``nal_unit_type``: the low 5 bits of the NAL header byte."""
    return nal[0] & 0x1F


def annexb_to_avcc(data: bytes, drop_types: frozenset[int] = frozenset({NAL_SPS, NAL_PPS, NAL_AUD})) -> bytes:
    """Convert one Annex-B access unit to AVCC (4-byte length prefixes), dropping ``drop_types`` NALs.

    Parameter sets are dropped by default because the ``avc1`` sample entry carries them in ``avcC``.
    """
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in split_annexb(data) if nal_type(nal) not in drop_types)


def parameter_sets(extradata: bytes) -> tuple[bytes, bytes]:
    """The (SPS, PPS) NAL units from an encoder's extradata, in Annex-B or ``avcC`` form."""
    if not extradata:
        raise Fmp4Error("H.264 extradata is empty (the encoder needs the global-header flag)")
    if extradata[0] == 1:  # already an AVCDecoderConfigurationRecord
        pos = 5
        nals: list[bytes] = []
        try:
            for count_mask in (0x1F, 0xFF):  # SPS count has 3 reserved bits, PPS count does not
                count = extradata[pos] & count_mask
                pos += 1
                for _ in range(count):
                    (length,) = struct.unpack_from(">H", extradata, pos)
                    nals.append(extradata[pos + 2 : pos + 2 + length])
                    pos += 2 + length
        except (IndexError, struct.error) as exc:
            raise Fmp4Error("truncated AVCDecoderConfigurationRecord") from exc
        if pos > len(extradata) or not all(nals):
            raise Fmp4Error("truncated AVCDecoderConfigurationRecord")
    else:
        nals = split_annexb(extradata)
    sps = [nal for nal in nals if nal_type(nal) == NAL_SPS]
    pps = [nal for nal in nals if nal_type(nal) == NAL_PPS]
    if len(sps) != 1 or len(pps) != 1:
        raise Fmp4Error(f"expected exactly one SPS and one PPS in H.264 extradata, got {len(sps)} and {len(pps)}")
    return sps[0], pps[0]


def avcc_nal_units(access_unit: bytes) -> list[bytes]:
    """The NAL units of one AVCC access unit (4-byte big-endian lengths); malformed data raises."""
    nals, pos, n = [], 0, len(access_unit)
    while pos < n:
        if pos + 4 > n:
            raise Fmp4Error(f"AVCC access unit: a NAL length field runs past the end at byte {pos}")
        (length,) = struct.unpack_from(">I", access_unit, pos)
        if length == 0 or pos + 4 + length > n:
            raise Fmp4Error(f"AVCC access unit: NAL unit of {length} bytes at byte {pos} does not fit {n} bytes")
        nals.append(access_unit[pos + 4 : pos + 4 + length])
        pos += 4 + length
    if not nals:
        raise Fmp4Error("empty H.264 access unit")
    return nals


def is_idr(access_unit: bytes) -> bool:
    """Whether an AVCC access unit holds an IDR picture (a sync sample: it decodes on its own)."""
    return any(nal_type(nal) == NAL_IDR for nal in avcc_nal_units(access_unit))


class _BitReader:
    """MSB-first bit reader over an RBSP with Exp-Golomb codes (ITU-T H.264 7.2, 9.1)."""

    def __init__(self, rbsp: bytes) -> None:
        self.data, self.pos = rbsp, 0

    def u(self, bits: int) -> int:
        value = 0
        for _ in range(bits):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise Fmp4Error("SPS ends early")
            value = (value << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise Fmp4Error("SPS holds an Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


#: profile_idc values whose SPS carries chroma format, bit depths and scaling matrices (H.264 7.3.2.1.1)
_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def sps_dimensions(sps: bytes) -> tuple[int, int]:
    """(width, height) in pixels of the pictures a sequence parameter set NAL unit describes, cropping
    applied (ITU-T H.264 7.3.2.1.1 and 7.4.2.1.1)."""
    if not sps or nal_type(sps) != NAL_SPS:
        raise Fmp4Error("not an SPS NAL unit")
    rbsp = sps[1:].replace(b"\x00\x00\x03", b"\x00\x00")   # drop emulation-prevention bytes
    r = _BitReader(rbsp)
    profile_idc = r.u(8)
    r.u(16)                                                  # constraint flags, level_idc
    r.ue()                                                   # seq_parameter_set_id
    chroma_format_idc, separate_planes = 1, 0
    if profile_idc in _HIGH_PROFILES:
        chroma_format_idc = r.ue()
        if chroma_format_idc == 3:
            separate_planes = r.u(1)
        r.ue(), r.ue(), r.u(1)                              # bit depths, qpprime_y_zero_transform_bypass
        if r.u(1):                                           # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format_idc != 3 else 12):
                if r.u(1):                                   # scaling_list(): skip its deltas
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se() + 256) % 256
                        last = nxt or last
    r.ue()                                                   # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.u(1), r.se(), r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue(), r.u(1)                                           # max_num_ref_frames, gaps_in_frame_num_allowed
    width_mbs, height_units = r.ue() + 1, r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.u(1)                                               # mb_adaptive_frame_field_flag
    r.u(1)                                                   # direct_8x8_inference_flag
    crop = (r.ue(), r.ue(), r.ue(), r.ue()) if r.u(1) else (0, 0, 0, 0)  # left, right, top, bottom
    chroma_array_type = 0 if separate_planes else chroma_format_idc
    sub_w, sub_h = {0: (1, 1), 1: (2, 2), 2: (2, 1), 3: (1, 1)}[chroma_array_type]
    crop_x = 1 if chroma_array_type == 0 else sub_w
    crop_y = (2 - frame_mbs_only) * (1 if chroma_array_type == 0 else sub_h)
    width = 16 * width_mbs - crop_x * (crop[0] + crop[1])
    height = 16 * height_units * (2 - frame_mbs_only) - crop_y * (crop[2] + crop[3])
    if width <= 0 or height <= 0:
        raise Fmp4Error(f"SPS describes an empty picture ({width}x{height})")
    return width, height


# ------------------------------------------------------------------------------------------------
# Init segment
# ------------------------------------------------------------------------------------------------


def _avcc(track: AvcTrack) -> bytes:
    """The ``avcC`` box: the track's AVCDecoderConfigurationRecord."""
    return box(b"avcC", avc_decoder_config(track.sps, track.pps))


def avc_decoder_config(sps: bytes, pps: bytes) -> bytes:
    """AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1) of one SPS and one PPS; the inverse of
    :func:`parameter_sets`. This is the codec configuration that travels with encoded blocks."""
    if len(sps) < 4:
        raise Fmp4Error("SPS is too short to hold profile and level")
    profile, compat, level = sps[1], sps[2], sps[3]
    body = bytes([1, profile, compat, level, 0xFC | 3, 0xE0 | 1])  # 4-byte NAL lengths, one SPS
    body += struct.pack(">H", len(sps)) + sps + bytes([1]) + struct.pack(">H", len(pps)) + pps
    if profile not in (66, 77, 88):
        # Profiles above Baseline/Main/Extended (High, High 4:4:4, ...) carry chroma format and bit
        # depths. The packager always encodes 8-bit yuv420p, so these are chroma_format_idc=1,
        # bit_depth_luma/chroma_minus8=0, and no SPS extensions.
        body += bytes([0xFC | 1, 0xF8 | 0, 0xF8 | 0, 0])
    return body


def _avc1(track: AvcTrack) -> bytes:
    """Visual sample entry 'avc1' (ISO/IEC 14496-12 12.1.3) with its avcC."""
    entry = bytes(6) + struct.pack(">H", 1)  # reserved, data_reference_index
    entry += bytes(16)  # pre_defined, reserved
    entry += struct.pack(">HHIIIH", track.width, track.height, 0x00480000, 0x00480000, 0, 1)
    entry += bytes(32)  # compressorname (empty Pascal string)
    entry += struct.pack(">Hh", 0x0018, -1)  # depth, pre_defined
    return box(b"avc1", entry, _avcc(track))


def _esds(track: AacTrack) -> bytes:
    """Elementary stream descriptor (ISO/IEC 14496-1 7.2.6.5) for AAC."""
    decoder_specific = _descriptor(0x05, track.audio_specific_config)
    decoder_config = _descriptor(
        0x04,
        bytes([0x40, 0x15])  # objectTypeIndication: MPEG-4 audio; streamType 5 (audio), upstream 0, reserved 1
        + (0).to_bytes(3, "big")  # bufferSizeDB (unknown)
        + struct.pack(">II", track.avg_bitrate, track.avg_bitrate)  # maxBitrate, avgBitrate
        + decoder_specific,
    )
    sl_config = _descriptor(0x06, bytes([0x02]))  # predefined: MP4 file
    es = _descriptor(0x03, struct.pack(">HB", track.track_id, 0) + decoder_config + sl_config)
    return full_box(b"esds", 0, 0, es)


def _mp4a(track: AacTrack) -> bytes:
    """Audio sample entry 'mp4a' (ISO/IEC 14496-12 12.2.3, version 0)."""
    entry = bytes(6) + struct.pack(">H", 1)  # reserved, data_reference_index
    entry += bytes(8)  # reserved
    entry += struct.pack(">HHHHI", track.channels, 16, 0, 0, track.sample_rate << 16)
    return box(b"mp4a", entry, _esds(track))


def _empty_sample_tables(sample_entry: bytes) -> bytes:
    """stbl with the sample description and empty tables (the samples live in fragments)."""
    stsd = full_box(b"stsd", 0, 0, struct.pack(">I", 1), sample_entry)
    stts = full_box(b"stts", 0, 0, struct.pack(">I", 0))
    stsc = full_box(b"stsc", 0, 0, struct.pack(">I", 0))
    stsz = full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0))
    stco = full_box(b"stco", 0, 0, struct.pack(">I", 0))
    return box(b"stbl", stsd, stts, stsc, stsz, stco)


def _trak(track: AvcTrack | AacTrack) -> bytes:
    """One track box, durations 0 (unknown: the samples come in fragments)."""
    is_video = isinstance(track, AvcTrack)
    if is_video:
        timescale, volume = track.timescale, 0
        width, height = track.width << 16, track.height << 16
        handler, name = b"vide", b"VideoHandler\x00"
        media_header = full_box(b"vmhd", 0, 1, struct.pack(">HHHH", 0, 0, 0, 0))
        sample_entry = _avc1(track)
    else:
        timescale, volume = track.sample_rate, 0x0100
        width = height = 0
        handler, name = b"soun", b"SoundHandler\x00"
        media_header = full_box(b"smhd", 0, 0, struct.pack(">hH", 0, 0))
        sample_entry = _mp4a(track)

    # flags 3 = track_enabled | track_in_movie
    tkhd = full_box(
        b"tkhd",
        0,
        3,
        struct.pack(">IIIII", 0, 0, track.track_id, 0, 0),  # creation, modification, id, reserved, duration
        bytes(8),  # reserved
        struct.pack(">hhhH", 0, 0, volume, 0),  # layer, alternate_group, volume, reserved
        _UNITY_MATRIX,
        struct.pack(">II", width, height),
    )
    parts = [tkhd]
    if not is_video:
        # One edit: present the media from media_time on, at rate 1. segment_duration 0 means "to the
        # end", since the duration is unknown when the init segment is written.
        elst = full_box(b"elst", 0, 0, struct.pack(">IIihh", 1, 0, track.media_time, 1, 0))
        parts.append(box(b"edts", elst))

    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, 0, _LANGUAGE_UND, 0))
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, handler), bytes(12), name)
    dref = full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1))  # flag 1: data in this file
    minf = box(b"minf", media_header, box(b"dinf", dref), _empty_sample_tables(sample_entry))
    parts.append(box(b"mdia", mdhd, hdlr, minf))
    return box(b"trak", *parts)


def _trex(track: AvcTrack | AacTrack) -> bytes:
    """Track-extends defaults used by fragments that do not override them."""
    if isinstance(track, AvcTrack):
        duration, flags = track.default_sample_duration, NON_SYNC_SAMPLE_FLAGS
    else:
        duration, flags = track.samples_per_frame, SYNC_SAMPLE_FLAGS
    return full_box(b"trex", 0, 0, struct.pack(">IIIII", track.track_id, 1, duration, 0, flags))


def init_segment(tracks: Sequence[AvcTrack | AacTrack]) -> bytes:
    """``ftyp`` + ``moov`` describing ``tracks`` (fragmented: every sample table is empty)."""
    ids = [t.track_id for t in tracks]
    if not tracks or len(set(ids)) != len(ids) or min(ids) < 1:
        raise Fmp4Error(f"track ids must be distinct positive integers, got {ids}")
    # iso5 is required for default-base-is-moof in tfhd; iso6 adds tfdt-based timing.
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6iso5isomavc1mp41")
    mvhd = full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, MOVIE_TIMESCALE, 0),  # creation, modification, timescale, duration
        struct.pack(">IH", 0x00010000, 0x0100),  # rate 1.0, volume 1.0
        bytes(10),  # reserved
        _UNITY_MATRIX,
        bytes(24),  # pre_defined
        struct.pack(">I", max(ids) + 1),  # next_track_ID
    )
    mvex = box(b"mvex", *(_trex(t) for t in tracks))
    return ftyp + box(b"moov", mvhd, *(_trak(t) for t in tracks), mvex)


# ------------------------------------------------------------------------------------------------
# Media fragment
# ------------------------------------------------------------------------------------------------

_TFHD_DEFAULT_BASE_IS_MOOF = 0x020000
_TRUN_FLAGS = 0x000001 | 0x000100 | 0x000200 | 0x000400  # data offset; per-sample duration, size, flags


def _moof(sequence_number: int, runs: Sequence[TrackRun], data_offsets: Sequence[int]) -> bytes:
    trafs = []
    for run, offset in zip(runs, data_offsets, strict=True):
        tfhd = full_box(b"tfhd", 0, _TFHD_DEFAULT_BASE_IS_MOOF, struct.pack(">I", run.track_id))
        tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_media_decode_time))
        entries = b"".join(
            struct.pack(">III", s.duration, len(s.data), SYNC_SAMPLE_FLAGS if s.is_sync else NON_SYNC_SAMPLE_FLAGS)
            for s in run.samples
        )
        trun = full_box(b"trun", 0, _TRUN_FLAGS, struct.pack(">Ii", len(run.samples), offset), entries)
        trafs.append(box(b"traf", tfhd, tfdt, trun))
    return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence_number)), *trafs)


def media_fragment(sequence_number: int, runs: Sequence[TrackRun]) -> bytes:
    """One ``moof`` + ``mdat`` holding ``runs`` (runs without samples are left out; none -> b"")."""
    runs = [run for run in runs if run.samples]
    if not runs:
        return b""
    for run in runs:
        if run.base_media_decode_time < 0:
            raise Fmp4Error(f"track {run.track_id}: negative base media decode time {run.base_media_decode_time}")
        if any(s.duration <= 0 or not s.data for s in run.samples):
            raise Fmp4Error(f"track {run.track_id}: every sample needs data and a positive duration")
    # 1. The moof's size does not depend on the offset values, so build it once to measure it.
    moof_size = len(_moof(sequence_number, runs, [0] * len(runs)))
    # 2. trun data offsets are relative to the moof's first byte (default-base-is-moof); the mdat
    #    payload follows the moof and its 8-byte header, one run after the other.
    offsets, position = [], moof_size + 8
    for run in runs:
        offsets.append(position)
        position += sum(len(s.data) for s in run.samples)
    payload = b"".join(s.data for run in runs for s in run.samples)
    return _moof(sequence_number, runs, offsets) + box(b"mdat", payload)
