"""Speech for the synthetic talking-avatar domain: the real examples plus espeak-ng utterances.

- :func:`synthesize` runs Debian's ``espeak-ng`` and returns 16 kHz float32 mono.
- :class:`SpeechCorpus` builds the training / evaluation speech once and caches it as ``.npy``:
  the real example WAVs (24 kHz, resampled to 16 kHz, levels unchanged) and ``num_synth``
  utterances of seeded random sentences with varied voices, speeds and pitches, each scaled so
  its loud frames sit at the level of the real examples (:data:`TARGET_ACTIVE_DBFS`).

Holdout: the real example ``kitchen_grandmother.wav`` and every 10th synthetic utterance
(indices 9, 19, 29, ...) are for evaluation only and never appear in :meth:`SpeechCorpus.train_clips`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.inputs import Resampler, load_audio
from models.training.synthetic import SAMPLE_RATE, SAMPLES_PER_FRAME

ESPEAK = "espeak-ng"
ESPEAK_TIMEOUT_S = 60.0
MAX_EXAMPLE_SECONDS = 600.0
HELD_OUT_EXAMPLE = "kitchen_grandmother.wav"
EVAL_EVERY = 10  # synthetic utterance k is eval-only when (k + 1) % EVAL_EVERY == 0

VOICES = ("en", "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4")
SPEED_RANGE = (120, 200)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng 0..99
WORDS_RANGE = (3, 24)  # words per sentence
# Level: the 90th percentile of a clip's frame RMS (dBFS). The real examples sit at -17..-20.
TARGET_ACTIVE_DBFS = -18.0
ACTIVE_PERCENTILE = 90.0
PEAK_LIMIT = 0.99
CACHE_VERSION = 1

_WORDS = tuple("""
the a one my your our this that every some many few old new small big little long short
morning evening night day week year time home house garden kitchen window door table chair
bread water coffee tea music song story book letter picture river mountain city street market
friend mother father sister brother teacher baker doctor farmer singer child people family
dog cat bird horse fish tree flower apple orange lemon sugar butter cheese soup dinner lunch
walk run talk sing cook bake read write paint build open close bring carry find keep make take
see hear tell ask answer laugh smile wait help start stop play learn listen remember forget
is was will can could should would might must has had does did goes went comes came
quickly slowly quietly loudly gently always never often sometimes today tomorrow yesterday
here there together again almost really very quite just still only also
red blue green yellow golden bright dark warm cold happy sad busy lazy quiet noisy lovely
and but or so because when while before after if although then
in on at under over near behind beside through across into from with without about around
""".split())
_PUNCTUATION = (".", ".", ".", "?", "!")


class SpeechError(RuntimeError):
    """espeak-ng is missing, failed, or produced no audio."""


class SpeechInputError(ValueError):
    """Bad arguments to the speech tools (empty text, out-of-range speed, missing directory)."""


# ---------------------------------------------------------------------------------------------
# espeak-ng
# ---------------------------------------------------------------------------------------------


def espeak_available() -> bool:
    """True when the ``espeak-ng`` executable is on PATH."""
    return shutil.which(ESPEAK) is not None


@lru_cache(maxsize=4)
def _resampler(rate_in: int) -> Resampler:
    return Resampler(rate_in, SAMPLE_RATE)


def parse_wav_pcm16(data: bytes) -> tuple[np.ndarray, int]:
    """RIFF WAV bytes (PCM 16-bit) -> (float32 mono ``[N]`` in [-1, 1], sample rate).

    espeak-ng writes to a pipe, so its header's RIFF and data sizes are placeholders
    (0x7ffff000): the data chunk is read to the end of the bytes, whatever its size field says.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SpeechError("espeak-ng output is not a RIFF/WAVE file")
    pos, rate, channels, bits = 12, None, None, None
    # 1. walk the chunks: 4-byte id, 4-byte little-endian size, payload (padded to even length)
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt ":
            fmt = int.from_bytes(data[body:body + 2], "little")
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
            if fmt != 1 or bits != 16 or channels < 1:
                raise SpeechError(f"unsupported WAV format (tag {fmt}, {bits} bits, {channels} channels)")
        elif chunk == b"data":
            if rate is None:
                raise SpeechError("WAV data chunk before its fmt chunk")
            end = min(len(data), body + size)
            payload = data[body:end]
            payload = payload[: len(payload) // (2 * channels) * (2 * channels)]
            pcm = np.frombuffer(payload, dtype="<i2").astype(np.float32) / np.float32(32768.0)
            return pcm.reshape(-1, channels).mean(axis=1), rate  # [N * C] -> [N]
        pos = body + size + (size & 1)
    raise SpeechError("WAV has no data chunk")


def synthesize(text: str, voice: str = "en", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """Speak ``text`` with espeak-ng: 16 kHz float32 mono ``[N]``.

    Runs ``espeak-ng -v VOICE -s SPEED -p PITCH --stdout --stdin`` with the text on stdin (so a
    text starting with '-' is never read as an option), parses the 22050 Hz int16 WAV and
    resamples it to 16 kHz.

    Raises:
        SpeechInputError: empty text, or speed / pitch out of espeak-ng's range.
        SpeechError: espeak-ng is missing, fails, times out, or returns no audio (unknown voice).
    """
    if not isinstance(text, str) or not text.strip():
        raise SpeechInputError("text must be a non-empty string")
    if not isinstance(voice, str) or not voice or voice.startswith("-"):
        raise SpeechInputError(f"voice must be an espeak-ng voice name, got {voice!r}")
    if isinstance(speed, bool) or not isinstance(speed, (int, np.integer)) or not 80 <= speed <= 450:
        raise SpeechInputError(f"speed must be an integer in [80, 450] words per minute, got {speed!r}")
    if isinstance(pitch, bool) or not isinstance(pitch, (int, np.integer)) or not 0 <= pitch <= 99:
        raise SpeechInputError(f"pitch must be an integer in [0, 99], got {pitch!r}")
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise SpeechError(f"{ESPEAK} not found on PATH; install it (Debian: apt-get install espeak-ng)")
    cmd = [exe, "-v", voice, "-s", str(int(speed)), "-p", str(int(pitch)), "--stdout", "--stdin"]
    try:
        proc = subprocess.run(cmd, input=" ".join(text.split()).encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SpeechError(f"{ESPEAK} timed out after {ESPEAK_TIMEOUT_S} s") from exc
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or not proc.stdout:
        raise SpeechError(f"{ESPEAK} failed (exit {proc.returncode}, voice {voice!r}): {stderr or 'no output'}")
    pcm, rate = parse_wav_pcm16(proc.stdout)
    if pcm.shape[0] == 0:
        raise SpeechError(f"{ESPEAK} produced no audio for voice {voice!r}: {stderr or 'empty WAV'}")
    return pcm if rate == SAMPLE_RATE else _resampler(int(rate))(pcm)


# ---------------------------------------------------------------------------------------------
# Sentences and levels
# ---------------------------------------------------------------------------------------------


def random_sentence(rng: np.random.Generator) -> str:
    """A sentence of WORDS_RANGE words from the word list, with commas and a final mark."""
    n = int(rng.integers(WORDS_RANGE[0], WORDS_RANGE[1] + 1))
    words = [_WORDS[k] for k in rng.integers(len(_WORDS), size=n)]
    for k in range(2, n - 1):
        if rng.uniform() < 0.08:
            words[k] += ","
    return " ".join(words).capitalize() + _PUNCTUATION[rng.integers(len(_PUNCTUATION))]


def active_level_dbfs(pcm: np.ndarray) -> float:
    """The ACTIVE_PERCENTILE-th percentile of the frame RMS (640-sample frames) in dBFS."""
    n = pcm.shape[0] // SAMPLES_PER_FRAME
    if n == 0:
        return -np.inf
    frames = pcm[: n * SAMPLES_PER_FRAME].astype(np.float64).reshape(n, SAMPLES_PER_FRAME)
    rms = np.sqrt(np.mean(frames ** 2, axis=1))  # [n]
    return float(20.0 * np.log10(max(np.percentile(rms, ACTIVE_PERCENTILE), 1e-10)))


def normalize_level(pcm: np.ndarray) -> np.ndarray:
    """Scale so :func:`active_level_dbfs` is TARGET_ACTIVE_DBFS, then limit the peak to PEAK_LIMIT."""
    level = active_level_dbfs(pcm)
    if not np.isfinite(level) or level < -90.0:
        return pcm.astype(np.float32)
    gain = 10.0 ** ((TARGET_ACTIVE_DBFS - level) / 20.0)
    peak = float(np.abs(pcm).max()) * gain
    if peak > PEAK_LIMIT:
        gain *= PEAK_LIMIT / peak
    return (pcm * gain).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


class SpeechCorpus:
    """Speech clips at 16 kHz for training and evaluation, built once and cached.

    1. Real examples: every ``*.wav`` in ``examples_dir`` (sorted by name), decoded and
       resampled to 16 kHz with :func:`models.inputs.load_audio`; levels unchanged.
    2. ``num_synth`` espeak-ng utterances: utterance k draws, from a generator seeded with
       ``seed``, a sentence (:func:`random_sentence`), a voice (VOICES x VARIANTS), a speed in
       SPEED_RANGE and a pitch in PITCH_RANGE; it is level-normalized (:func:`normalize_level`).
    3. The clips are saved under ``cache_dir/speech-<key>/`` (``.npy`` arrays plus an index),
       where ``key`` hashes every setting and the examples' names and sizes; a later
       construction with the same settings loads them without running espeak-ng.

    Holdout: HELD_OUT_EXAMPLE and synthetic utterances 9, 19, 29, ... are evaluation only.
    """

    def __init__(self, cache_dir: Path, examples_dir: Path | None, num_synth: int = 200,
                 seed: int = 0) -> None:
        if isinstance(num_synth, bool) or not isinstance(num_synth, (int, np.integer)) or num_synth < 0:
            raise SpeechInputError(f"num_synth must be a non-negative integer, got {num_synth!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SpeechInputError(f"seed must be a non-negative integer, got {seed!r}")
        self.cache_dir = Path(cache_dir)
        self.examples_dir = None if examples_dir is None else Path(examples_dir)
        if self.examples_dir is not None and not self.examples_dir.is_dir():
            raise SpeechInputError(f"examples_dir is not a directory: {self.examples_dir}")
        self.num_synth, self.seed = int(num_synth), int(seed)
        example_paths = sorted(self.examples_dir.glob("*.wav")) if self.examples_dir else []
        if not example_paths and self.num_synth == 0:
            raise SpeechInputError("the corpus would be empty: no example WAVs and num_synth=0")
        self.key = self._key(example_paths)
        self.path = self.cache_dir / f"speech-{self.key}"
        if not (self.path / "index.json").is_file():
            self._build(example_paths)
        self.example_names, self.examples, self.synth, self.synth_settings = self._load()

    # 1. cache key and layout

    def _key(self, example_paths: list[Path]) -> str:
        settings = {
            "version": CACHE_VERSION, "num_synth": self.num_synth, "seed": self.seed,
            "voices": VOICES, "variants": VARIANTS, "speed": SPEED_RANGE, "pitch": PITCH_RANGE,
            "words": WORDS_RANGE, "vocabulary": hashlib.sha256(" ".join(_WORDS).encode()).hexdigest(),
            "target_dbfs": TARGET_ACTIVE_DBFS, "examples": [(p.name, p.stat().st_size) for p in example_paths],
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def _save_clips(folder: Path, stem: str, clips: list[np.ndarray]) -> None:
        lengths = np.array([c.shape[0] for c in clips], dtype=np.int64)
        joined = np.concatenate(clips).astype(np.float32) if clips else np.zeros(0, np.float32)
        np.save(folder / f"{stem}.npy", joined)
        np.save(folder / f"{stem}_lengths.npy", lengths)

    @staticmethod
    def _load_clips(folder: Path, stem: str) -> list[np.ndarray]:
        joined = np.load(folder / f"{stem}.npy")
        bounds = np.concatenate([[0], np.cumsum(np.load(folder / f"{stem}_lengths.npy"))])
        return [joined[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]

    # 2. build

    def _build(self, example_paths: list[Path]) -> None:
        examples = [load_audio(p, MAX_EXAMPLE_SECONDS) for p in example_paths]
        rng = np.random.default_rng(self.seed)
        synth, settings = [], []
        for _ in range(self.num_synth):
            text = random_sentence(rng)
            voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
            speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
            pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
            synth.append(normalize_level(synthesize(text, voice=voice, speed=speed, pitch=pitch)))
            settings.append({"text": text, "voice": voice, "speed": speed, "pitch": pitch})
        # write into a temporary folder, then rename: a crash never leaves a half-written cache
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".speech-{self.key}-", dir=self.cache_dir))
        try:
            self._save_clips(tmp, "examples", examples)
            self._save_clips(tmp, "synth", synth)
            index = {"examples": [p.name for p in example_paths], "synth": settings}
            (tmp / "index.json").write_text(json.dumps(index, indent=1))
            try:
                os.replace(tmp, self.path)
            except OSError:  # another process finished the same cache first
                if not (self.path / "index.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _load(self):
        index = json.loads((self.path / "index.json").read_text())
        return (index["examples"], self._load_clips(self.path, "examples"),
                self._load_clips(self.path, "synth"), index["synth"])

    # 3. splits

    @staticmethod
    def is_eval_synth(k: int) -> bool:
        """Synthetic utterance ``k`` (0-based) is evaluation only: every 10th one."""
        return (k + 1) % EVAL_EVERY == 0

    def train_clips(self) -> list[np.ndarray]:
        """Real examples except the held-out one, then the training synthetic utterances."""
        real = [c for n, c in zip(self.example_names, self.examples) if n != HELD_OUT_EXAMPLE]
        return real + [c for k, c in enumerate(self.synth) if not self.is_eval_synth(k)]

    def eval_clips(self) -> list[np.ndarray]:
        """The held-out real example (when present), then every 10th synthetic utterance."""
        real = [c for n, c in zip(self.example_names, self.examples) if n == HELD_OUT_EXAMPLE]
        return real + [c for k, c in enumerate(self.synth) if self.is_eval_synth(k)]

    def held_out_example(self) -> np.ndarray:
        """``kitchen_grandmother.wav`` at 16 kHz (levels unchanged)."""
        for name, clip in zip(self.example_names, self.examples):
            if name == HELD_OUT_EXAMPLE:
                return clip
        raise SpeechInputError(f"{HELD_OUT_EXAMPLE} is not in the examples directory "
                               f"{self.examples_dir}")
