"""Services benchmark: what the Kafka/Redis services path costs over the in-process lane.

Usage (from the repository root)::

    .venv/bin/python bench/services_bench.py                       # ~3-5 min on 2 cores
    .venv/bin/python bench/services_bench.py --json /tmp/s.json --doc none
    .venv/bin/python bench/services_bench.py --wire-only           # part 3 only, no stack (~20 s)

What it measures (the shipped trained tiny checkpoint, in process and in the services alike, on this CPU;
real example inputs from the repository's ``examples/`` folder)
  1. Per-block overhead of the services path. (a) ``pipeline_stages.tpp.TPPLane`` in process (4 denoise
     ranks + 1 decode rank as processes, audio stage and packaging in the caller), the whole audio pushed
     at once; (b) the same audio through the local stack (``liveavatar up``: audio-encoder -> lane of 5
     processes -> stream-packager over the broker), pushed all at once. Seconds per block = time from the
     first block out (fragment) to the last, divided by the number of intervals; the difference is the
     per-block overhead of the services path. Also the CPU seconds per block of every process involved
     (from /proc; fairer than wall time on a shared machine) and the CPU the idle stack burns.
  2. End-to-end latency: audio pushed at real time (one 0.48 s block of PCM every 0.48 s, one message per
     block); for block k, the time from the publish of the chunk that completes block k to the arrival
     of media fragment k at a :class:`~services.common.session_io.MediaCollector`; p50 / p99 / max, split
     into hops with the Kafka record timestamps; and the same feed through the in-process TPPLane.
  3. Broker throughput per session at the REFERENCE resolution (704x384, 25 x 1024 audio features),
     from the real wire encoding (``services.common.messages.encode``) of one block of every message
     type: raw and bf16 features, raw and zlib frames on realistic content (a real example image resized
     to 704x384, repeated 12 times, plus small per-frame noise), and the size of the H.264 fragment that
     ``PackageStage`` makes of that content.
  4. A lane rank killed mid-session (SIGKILL of one pid from the lane's pids file, at real-time pace):
     the stall between media fragments a viewer sees, the lane-group restart time, duplicates, and
     whether the stream the client assembles is complete and in order.

The machine is shared: the load average before and after each part goes into the JSON. Results go to
the JSON file (``--json``) and into the marked section of docs/services.md (``--doc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _benchlib import cpu_model, cpu_seconds, load, write_marked_section  # noqa: E402

from services.common.examples import examples_dir  # noqa: E402

EXAMPLES = examples_dir()
BLOCK = 7680                     # samples of 16 kHz PCM per block (12 frames at 25 fps = 0.48 s)
BLOCK_S = BLOCK / 16000
DOC_BEGIN, DOC_END = "<!-- services-bench:begin -->", "<!-- services-bench:end -->"


def write_doc(path: Path, table: str) -> None:
    write_marked_section(path, DOC_BEGIN, DOC_END, table, heading='Benchmark results')
REF_H, REF_W = 384, 704          # reference output size (area 720*400 rounded to multiples of 64)
REF_LAYERS, REF_AUDIO_DIM = 25, 1024


class BenchError(RuntimeError):
    """A part of the benchmark could not run (stack not ready, media never ended, ...)."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------



def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


def r3(x: float) -> float:
    return round(float(x), 3)


def example_pcm(names: list[str], n_blocks: int) -> np.ndarray:
    """16 kHz float32 speech: the named example WAVs concatenated (looped if short), cut to ``n_blocks``."""
    from models.inputs import load_audio

    parts = [load_audio(str(EXAMPLES / f"{n}.wav"), 60) for n in names]
    pcm = np.concatenate(parts)
    while len(pcm) < n_blocks * BLOCK:
        pcm = np.concatenate([pcm, pcm])
    return np.ascontiguousarray(pcm[:n_blocks * BLOCK], dtype=np.float32)




def per_block(times: list[float]) -> float:
    """Seconds per block from the arrival times of consecutive blocks: (last - first) / intervals."""
    return (times[-1] - times[0]) / (len(times) - 1)


# ---------------------------------------------------------------------------------------------
# Part 3: wire sizes at the reference resolution (no stack needed)
# ---------------------------------------------------------------------------------------------

def realistic_frames(name: str, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """A real example image fitted to 704x384, 12 times, plus N(0, sigma) noise per frame: [12, H, W, 3]."""
    from PIL import Image, ImageOps

    img = ImageOps.fit(Image.open(EXAMPLES / f"{name}.jpg").convert("RGB"), (REF_W, REF_H))
    base = np.asarray(img, dtype=np.float32)                                       # [H, W, 3]
    if sigma == 0:
        return np.repeat(base.astype(np.uint8)[None], 12, axis=0)
    noise = rng.normal(0.0, sigma, size=(12, *base.shape)).astype(np.float32)     # [12, H, W, 3]
    return np.clip(np.rint(base[None] + noise), 0, 255).astype(np.uint8)


def wire_sizes() -> dict:
    """Bytes per block of every message type with reference shapes, and the MB/s they mean per session."""
    import torch

    from pipeline_stages.package_stage import make_package_stage
    from services.common.messages import AudioIn, Features, Frames, Media, Tensor, encode, tensor_from_torch

    rng = np.random.default_rng(0)
    names = ["cyclops_baker", "music_producer", "kitchen_grandmother"]
    pcm = example_pcm(["cyclops_baker"], 8)
    out: dict = {"shapes": {"features": [1, REF_LAYERS, REF_AUDIO_DIM, 12], "frames": [12, REF_H, REF_W, 3],
                            "pcm": [BLOCK]}}
    ids = dict(session_id="s-" + "0" * 10, tenant_id="acme")

    # audio: the default publish_pcm chunk (3,200 samples = 0.2 s) and one message per block
    a3200 = len(encode(AudioIn(**ids, seq=1, kind="pcm"), {"pcm": Tensor.from_numpy(pcm[:3200])}))
    a7680 = len(encode(AudioIn(**ids, seq=1, kind="pcm"), {"pcm": Tensor.from_numpy(pcm[:BLOCK])}))
    out["audio"] = {"msg_bytes_chunk3200": a3200, "bytes_per_s_chunk3200": a3200 * 16000 / 3200,
                    "msg_bytes_chunk7680": a7680, "bytes_per_s_chunk7680": a7680 / BLOCK_S}

    # audio-features: float32 and bf16 features, plus the block's PCM
    feats = torch.from_numpy(rng.standard_normal((1, REF_LAYERS, REF_AUDIO_DIM, 12)).astype(np.float32))
    hdr = Features(**ids, seq=7, kind="block", lane_id="lane-0")
    f32 = len(encode(hdr, {"features": tensor_from_torch(feats), "pcm": Tensor.from_numpy(pcm[:BLOCK])}))
    bf16 = len(encode(hdr, {"features": tensor_from_torch(feats.to(torch.bfloat16)),
                            "pcm": Tensor.from_numpy(pcm[:BLOCK])}))
    out["audio_features"] = {"block_bytes_f32": f32, "block_bytes_bf16": bf16}

    # frames: raw, and zlib (level 1, what encode(compress=...) does) on static and noisy content
    fhdr = Frames(**ids, seq=7, kind="block", lane_id="lane-0")
    frames_rows, media_rows = [], []
    for sigma in (0.0, 2.0):
        for name in names:
            fr = realistic_frames(name, rng, sigma)
            tensors = {"frames": Tensor.from_numpy(fr), "pcm": Tensor.from_numpy(pcm[:BLOCK])}
            raw = len(encode(fhdr, tensors))
            t0 = time.perf_counter()
            packed = encode(fhdr, tensors, compress={"frames"})
            t_comp = time.perf_counter() - t0
            t0 = time.perf_counter()
            zlib.decompress(zlib.compress(fr.tobytes(), 1))
            t_round = time.perf_counter() - t0
            frames_rows.append({"image": name, "noise_sigma": sigma, "raw_bytes": raw, "zlib_bytes": len(packed),
                                "ratio": r3(len(packed) / raw), "compress_s": r3(t_comp),
                                "compress_plus_decompress_s": r3(t_round)})
            # media: the packager's H.264 + AAC fragment of the same content (reference PackageConfig)
            stage = make_package_stage(REF_W, REF_H, 25, 12)
            init = stage.init_segment()
            sizes, t_pkg = [], []
            for b in range(6):
                fb = realistic_frames(name, rng, sigma)
                t0 = time.perf_counter()
                frag = stage.push_block(fb, pcm[b * BLOCK:(b + 1) * BLOCK])
                t_pkg.append(time.perf_counter() - t0)
                sizes.append(len(encode(Media(**ids, seq=b, kind="fragment"),
                                        {"data": Tensor("uint8", (len(frag),), frag)})))
            stage.close()
            media_rows.append({"image": name, "noise_sigma": sigma, "init_bytes": len(init),
                               "fragment_msg_bytes_mean": int(np.mean(sizes[1:])),
                               "fragment_msg_bytes_max": int(max(sizes)), "package_s_per_block": r3(np.median(t_pkg))})
    out["frames"] = frames_rows
    out["media"] = media_rows

    def mbps(nbytes: float) -> float:
        return round(nbytes / BLOCK_S / 1e6, 3)

    noisy = [r for r in frames_rows if r["noise_sigma"] > 0]
    noisy_media = [r for r in media_rows if r["noise_sigma"] > 0]
    raw_frames = float(np.mean([r["raw_bytes"] for r in noisy]))
    zlib_frames = float(np.mean([r["zlib_bytes"] for r in noisy]))
    media = float(np.mean([r["fragment_msg_bytes_mean"] for r in noisy_media]))
    audio_bps = out["audio"]["bytes_per_s_chunk3200"]
    per_topic = {"audio": round(audio_bps / 1e6, 3), "audio-features (f32)": mbps(f32),
                 "audio-features (bf16)": mbps(bf16), "frames (raw uint8)": mbps(raw_frames),
                 "frames (zlib, sigma=2 noise)": mbps(zlib_frames), "media (H.264+AAC fMP4)": mbps(media)}
    out["mb_per_s_per_session"] = per_topic
    out["total_mb_per_s_as_built"] = round(per_topic["audio"] + per_topic["audio-features (f32)"]
                                           + per_topic["frames (raw uint8)"] + per_topic["media (H.264+AAC fMP4)"], 3)
    out["total_mb_per_s_bf16_zlib"] = round(per_topic["audio"] + per_topic["audio-features (bf16)"]
                                            + per_topic["frames (zlib, sigma=2 noise)"]
                                            + per_topic["media (H.264+AAC fMP4)"], 3)
    return out


# ---------------------------------------------------------------------------------------------
# Part 1a: the in-process TPP lane
# ---------------------------------------------------------------------------------------------

def tpp_inprocess(image: bytes, pcm: np.ndarray, pcm_rt: np.ndarray, decode_threads: int | None = None) -> dict:
    """TPPLane: ``pcm`` pushed at once (arrival time of every block result, fragment made), then a second
    session with ``pcm_rt`` pushed at real time (latency from push to result, as in part 2)."""
    import torch

    from models.checkpoints import SHIPPED_SPEC
    from models.inputs import load_image
    from models.liveavatar import LiveAvatarConfig, default_checkpoint
    from pipeline_stages.sequential import SessionSpec
    from pipeline_stages.tpp import TPPLane

    torch.set_num_threads(1)
    n = len(pcm) // BLOCK
    t0 = time.monotonic()
    # the model the services run by default (the shipped checkpoint), so the difference is the services path
    with TPPLane(LiveAvatarConfig.load(SHIPPED_SPEC), checkpoint=default_checkpoint(SHIPPED_SPEC),
                 decode_threads=decode_threads) as lane:
        t_ready = time.monotonic() - t0
        lane.start_session(SessionSpec(load_image(image, 50_000_000), "", seed=1))
        pids = [os.getpid()] + [proc.pid for proc in lane.procs]
        cpu0 = cpu_seconds(pids)
        t_push = time.monotonic()
        lane.push_audio(pcm)
        times: list[float] = []
        while len(times) < n:
            for _ in lane.collect(block=True):
                times.append(time.monotonic())
        cpu = cpu_seconds(pids) - cpu0
        lane.finish()
        lane.close_session()
        lane.start_session(SessionSpec(load_image(image, 50_000_000), "", seed=2))
        n_rt = len(pcm_rt) // BLOCK
        pub: dict[int, float] = {}
        arr: dict[int, float] = {}
        t0, k = time.monotonic(), 0
        while len(arr) < n_rt:
            if k < n_rt and time.monotonic() >= t0 + k * BLOCK_S:
                pub[k] = time.monotonic()
                results = lane.push_audio(pcm_rt[k * BLOCK:(k + 1) * BLOCK])
                k += 1
            else:
                results = lane.collect(block=False)
                time.sleep(0.002)
            for r in results:
                arr[r.block_index] = time.monotonic()
        lane.finish()
        lane.close_session()
        rt = [arr[b] - pub[b] for b in range(n_rt)]
    return {"blocks": n, "lane_start_s": r3(t_ready), "first_block_s": r3(times[0] - t_push),
            "s_per_block": r3(per_block(times)), "blocks_per_s": r3(1 / per_block(times)),
            "cpu_s_per_block": r3(cpu / n), "processes": len(pids),
            "realtime": {"blocks": n_rt, "p50_s": r3(pct(rt, 50)), "p99_s": r3(pct(rt, 99)), "max_s": r3(max(rt)),
                         "latency_s": [r3(x) for x in rt]},
            "intervals_s": [r3(b - a) for a, b in zip(times, times[1:])]}


# ---------------------------------------------------------------------------------------------
# Parts 1b, 2, 4: the local stack
# ---------------------------------------------------------------------------------------------

class StampedMedia:
    """A MediaCollector that also records when each message arrived (right after the poll that got it)."""

    def __init__(self, bootstrap: str):
        from services.common.session_io import MediaCollector

        self.collector = MediaCollector(bootstrap)
        self.arrivals: dict[str, list[float]] = {}

    def poll(self, timeout_ms: int = 20) -> None:
        self.collector.poll(timeout_ms=timeout_ms)
        now = time.monotonic()
        for sid, msgs in self.collector.messages.items():
            arr = self.arrivals.setdefault(sid, [])
            arr.extend([now] * (len(msgs) - len(arr)))

    def fragments(self, sid: str) -> list[tuple[int, float]]:
        """(block index, arrival time) of every fragment message, duplicates included, in arrival order."""
        msgs = self.collector.messages.get(sid, [])
        return [(m.header.seq, t) for m, t in zip(msgs, self.arrivals.get(sid, [])) if m.header.kind == "fragment"]

    def first_arrival(self, sid: str) -> dict[int, float]:
        out: dict[int, float] = {}
        for seq, t in self.fragments(sid):
            out.setdefault(seq, t)
        return out

    def ended(self, sid: str) -> bool:
        return any(m.header.kind == "end" for m in self.collector.messages.get(sid, []))

    def close(self) -> None:
        self.collector.close()


class Stack:
    """The local stack with one lane, a producer, a state store and a stamped media reader."""

    def __init__(self, run_dir: Path):
        from services.cli import stack_cmd
        from services.common.kafka import make_producer
        from services.common.redis_state import StateStore

        self.stack_cmd, self.run_dir = stack_cmd, run_dir
        t0 = time.monotonic()
        res = stack_cmd.up(run_dir, lanes=1, api=False, timeout_s=300)
        self.up_s = time.monotonic() - t0
        self.info = res["infra"]
        self.store = StateStore.from_url(self.info.redis_url)
        self.producer = make_producer(self.info.kafka_bootstrap)
        self.media = StampedMedia(self.info.kafka_bootstrap)

    def close(self) -> None:
        for obj in (self.media, self.producer):
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - best effort; down() follows
                pass

    def lane_info(self) -> dict:
        return self.stack_cmd.services_info(self.run_dir)["lane-0"]

    def pids(self) -> list[int]:
        """Every process of the stack (supervisor, services, lane group and ranks, broker, Redis) and this one."""
        pids = [os.getpid(), int((self.run_dir / "supervisor.pid").read_text())]
        pids += [srv.pid for srv in self.info.servers.values()]
        pids += self.stack_cmd._all_pids(self.run_dir)
        return sorted(set(pids))

    def head_lag(self) -> float:
        """The lane head's exported lag on audio-features (blocks unread + queued + in flight)."""
        port = self.lane_info()["health_ports"][0]
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
        except OSError:
            return float("nan")
        vals = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("liveavatar_queue_lag_messages") and 'topic="audio-features"' in line]
        return max(vals) if vals else float("nan")

    def start(self, image: bytes, seed: int) -> tuple[str, float]:
        from services.common.session_io import publish_start

        sid = "s-" + uuid.uuid4().hex[:10]
        t0 = time.monotonic()
        publish_start(self.store, self.producer, sid, "bench", image, {"seed": seed})
        self.producer.flush()
        return sid, t0

    def wait_active(self, sid: str, timeout_s: float = 120) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rec = self.store.get_session(sid)
            if rec is not None and rec.state == "active" and rec.lane:
                return time.monotonic()
            if rec is not None and rec.state == "failed":
                raise BenchError(f"session {sid} failed: {rec.error}")
            self.media.poll(50)
        raise BenchError(f"session {sid} got no lane within {timeout_s:.0f} s")

    def end(self, sid: str, seq: int) -> None:
        from services.common.messages import AudioIn
        from services.common.session_io import send

        send(self.producer, AudioIn(session_id=sid, tenant_id="bench", seq=seq, kind="end"))
        self.producer.flush()

    def wait_end(self, sid: str, timeout_s: float = 240, every=None) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.media.ended(sid):
            if time.monotonic() > deadline:
                raise BenchError(f"media of {sid} did not end within {timeout_s:.0f} s")
            self.media.poll(20)
            if every is not None:
                every()

    def check_stream(self, sid: str, n: int) -> dict:
        from services.common.session_io import assemble

        frags = self.media.fragments(sid)
        data, kept = assemble(self.media.collector.messages[sid])
        return {"complete_and_ordered": kept == list(range(n)), "blocks_kept": len(kept), "blocks_expected": n,
                "fragment_messages": len(frags), "duplicates_dropped": len(frags) - len(kept),
                "mp4_bytes": len(data)}


def services_burst(st: Stack, image: bytes, pcm: np.ndarray) -> dict:
    """Part 1b: the whole audio at once through the services; first fragment to last, per block."""
    from services.common.session_io import publish_pcm

    n = len(pcm) // BLOCK
    pids = st.pids()
    idle0, t_idle = cpu_seconds(pids), time.monotonic()
    time.sleep(3.0)                                   # the stack idle: what its polling loops cost
    idle_cores = (cpu_seconds(pids) - idle0) / (time.monotonic() - t_idle)
    sid, t_start = st.start(image, seed=1)
    st.wait_active(sid)
    cpu0 = cpu_seconds(pids)
    t_push = time.monotonic()
    seq = publish_pcm(st.producer, sid, "bench", pcm, 1, chunk=BLOCK)
    st.producer.flush()
    st.end(sid, seq)
    lags: list[float] = []
    last_probe = [0.0]

    def probe() -> None:
        if time.monotonic() - last_probe[0] > 0.5:
            lags.append(st.head_lag())
            last_probe[0] = time.monotonic()

    st.wait_end(sid, every=probe)
    cpu = cpu_seconds(pids) - cpu0
    arr = st.media.first_arrival(sid)
    times = [arr[k] for k in range(n)]
    return {"blocks": n, "first_fragment_after_push_s": r3(times[0] - t_push),
            "start_to_first_fragment_s": r3(times[0] - t_start),
            "s_per_block": r3(per_block(times)), "blocks_per_s": r3(1 / per_block(times)),
            "cpu_s_per_block": r3(cpu / n), "processes": len(pids), "idle_cpu_cores": r3(idle_cores),
            "max_head_lag_blocks": max([x for x in lags if x == x], default=float("nan")),
            "intervals_s": [r3(b - a) for a, b in zip(times, times[1:])], **st.check_stream(sid, n)}


def hop_breakdown(st: Stack, sid: str, pub: dict[int, float], arr: dict[int, float]) -> dict:
    """Where the latency goes, per block, from the Kafka record timestamps (producer send time, wall clock).

    publish -> features record (audio-encoder: poll, encode, send), features -> frames record (the lane:
    5 ranks), frames -> media record (stream-packager), media -> arrival at the collector. ``pub`` and
    ``arr`` are ``time.monotonic()`` values; they are moved to the wall clock with one offset."""
    from kafka import TopicPartition

    from infra import topics
    from services.common.kafka import make_consumer
    from services.common.messages import decode

    offset = time.time() - time.monotonic()
    c = make_consumer(st.info.kafka_bootstrap, group_id=None)
    names = [topics.name(t) for t in (topics.AUDIO_FEATURES, topics.FRAMES, topics.MEDIA)]
    tps = [TopicPartition(t, p) for t in names for p in sorted(c.partitions_for_topic(t) or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    ends = c.end_offsets(tps)
    ts: dict[str, dict[int, float]] = {t: {} for t in names}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(c.position(tp) < ends[tp] for tp in tps):
        for tp, recs in c.poll(timeout_ms=200).items():
            for rec in recs:
                m = decode(rec.value)
                if m.header.session_id == sid and m.header.kind in ("block", "fragment"):
                    ts[tp.topic].setdefault(m.header.seq, rec.timestamp / 1000.0)
    c.close()
    feats, frames, media = (ts[t] for t in names)
    hops: dict[str, list[float]] = {"audio-encoder": [], "lane": [], "stream-packager": [], "media delivery": []}
    for b in sorted(pub):
        if b in feats and b in frames and b in media and b in arr:
            hops["audio-encoder"].append(feats[b] - (pub[b] + offset))
            hops["lane"].append(frames[b] - feats[b])
            hops["stream-packager"].append(media[b] - frames[b])
            hops["media delivery"].append(arr[b] + offset - media[b])
    return {name: {"p50_s": r3(pct(v, 50)), "p99_s": r3(pct(v, 99))} for name, v in hops.items()} | {
        "blocks": len(hops["lane"])}


def realtime_feed(st: Stack, image: bytes, pcm: np.ndarray, kill_rank: int | None = None,
                  kill_after_block: int = 8, keep_lane_alive: bool = False, steady_p50: float = 0.0,
                  give_up_s: float = 25.0) -> dict:
    """Parts 2 and 4: one block of PCM every 0.48 s; per block, publish -> fragment arrival.

    With ``kill_rank``: right after block ``kill_after_block`` is published, SIGKILL that rank of the
    session's lane (a pid from the lane's pids file) and time the gap and the group's restart. When no
    fragment comes ``give_up_s`` after the new group is ready (and all audio is sent), the session is
    reported lost. ``keep_lane_alive`` refreshes the lane's Redis heartbeat from here while the group
    restarts (it emulates a lane record that survives a restart longer than its 15 s TTL)."""
    from services.common.session_io import publish_pcm

    n = len(pcm) // BLOCK
    sid, t_start = st.start(image, seed=2)
    t_active = st.wait_active(sid)
    lane = st.store.get_session(sid).lane
    pub: dict[int, float] = {}
    kill: dict = {}
    seq, k = 1, 0
    t0 = time.monotonic()
    pids_file = Path(st.lane_info()["rank_pids_file"])
    while k < n or not st.media.ended(sid):
        now = time.monotonic()
        if k < n and now >= t0 + k * BLOCK_S:
            pub[k] = time.monotonic()
            seq = publish_pcm(st.producer, sid, "bench", pcm[k * BLOCK:(k + 1) * BLOCK], seq, chunk=BLOCK,
                              store=st.store)
            st.producer.flush()
            if kill_rank is not None and k == kill_after_block:
                old = pids_file.read_text().split()
                os.kill(int(old[kill_rank]), signal.SIGKILL)
                kill = {"t": time.monotonic(), "pid": int(old[kill_rank]), "old_pids": old, "hb": 0.0}
            k += 1
            if k == n:
                st.end(sid, seq)
        if kill and "t_resumed" not in kill:
            if keep_lane_alive and now - kill["hb"] > 1.0:
                st.store.heartbeat_lane(lane)
                kill["hb"] = now
            if "t_respawn" not in kill and pids_file.read_text().split() not in ([], kill["old_pids"]):
                kill["t_respawn"] = time.monotonic()
            if "t_respawn" in kill and "t_ready" not in kill and now - kill.get("probe", 0) > 0.25:
                kill["probe"] = now
                if st.stack_cmd.service_status(st.run_dir)[lane]["ready"]:
                    kill["t_ready"] = time.monotonic()
            if "t_respawn" in kill and any(t > kill["t_respawn"] for _, t in st.media.fragments(sid)):
                kill["t_resumed"] = time.monotonic()
            if "t_ready" in kill and k >= n and now - kill["t_ready"] > give_up_s:
                kill["lost"] = True
                kill["lane_record_after"] = st.store.get_lane(lane)
                break
        if time.monotonic() - t0 > 90 + n * BLOCK_S * 6:
            raise BenchError(f"media of {sid} did not end in time")
        wait_ms = 20 if k >= n else max(1, min(20, int((t0 + k * BLOCK_S - time.monotonic()) * 1000)))
        st.media.poll(wait_ms)
    arr = st.media.first_arrival(sid)
    lat = [arr[b] - pub[b] for b in range(n) if b in arr]
    res = {"blocks": n, "start_to_active_s": r3(t_active - t_start),
           "start_to_first_fragment_s": r3(min(arr.values()) - t_start) if arr else None,
           "latency_s": [r3(x) for x in lat], **st.check_stream(sid, n)}
    if kill_rank is None:
        steady = lat[1:]
        res.update({"p50_s": r3(pct(lat, 50)), "p99_s": r3(pct(lat, 99)), "max_s": r3(max(lat)),
                    "block0_s": r3(lat[0]), "p50_excl_block0_s": r3(pct(steady, 50)),
                    "p99_excl_block0_s": r3(pct(steady, 99)),
                    "latency_trend_s": r3(np.mean(lat[-10:]) - np.mean(lat[1:11])),
                    "inter_fragment_p50_s": r3(pct(np.diff(sorted(arr.values())).tolist(), 50)),
                    "hops": hop_breakdown(st, sid, pub, arr)})
        return res
    t_kill = kill["t"]
    t_new = kill.get("t_respawn", float("inf"))
    frags = st.media.fragments(sid)
    old_gen = [(s, t) for s, t in frags if t <= t_new]
    new_gen = [(s, t) for s, t in frags if t > t_new]
    last_old = max(t for _, t in old_gen) if old_gen else t_kill
    first_new = min(t for _, t in new_gen) if new_gen else None
    res.update({"kill_rank": kill_rank, "killed_after_block": kill_after_block, "keep_lane_alive": keep_lane_alive,
                "session_resumed": first_new is not None,
                "last_block_before_restart": max(s for s, _ in old_gen) if old_gen else -1,
                "fragments_after_kill_before_restart": sum(1 for _, t in old_gen if t > t_kill),
                "first_block_after_restart": new_gen[0][0] if new_gen else None,
                "stall_s": r3(first_new - last_old) if first_new else None,
                "kill_to_first_new_fragment_s": r3(first_new - t_kill) if first_new else None,
                "group_respawn_s": r3(kill["t_respawn"] - t_kill) if "t_respawn" in kill else None,
                "lane_ready_again_s": r3(kill["t_ready"] - t_kill) if "t_ready" in kill else None,
                "latency_max_s": r3(max(lat)), "latency_last_block_s": r3(lat[-1]),
                "lane_record_after": kill.get("lane_record_after")})
    if first_new is not None and steady_p50 > 0:
        # catch-up: the first block after the restart whose latency is back under 2x the steady p50
        back = [b for b in range(n) if b in arr and arr[b] > t_new and arr[b] - pub[b] <= 2 * steady_p50]
        res["caught_up_at_block"] = back[0] if back else None
        res["kill_to_caught_up_s"] = r3(arr[back[0]] - t_kill) if back else None
        burst = sorted(t for _, t in new_gen)
        res["catch_up_blocks_per_s"] = r3((len(burst) - 1) / (burst[-1] - burst[0])) if len(burst) > 2 else None
    return res


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def markdown(res: dict) -> str:
    """The results table that goes between the markers of docs/services.md."""
    m, lines = res["machine"], []
    lines.append(f"Measured {m['date_utc']} UTC on {m['cores']} cores ({m['cpu']}), the shipped tiny "
                 f"checkpoint (64x64) in both columns, decode rank with {res.get('decode_threads', 1)} thread(s), "
                 f"one lane of 5 processes; 1-minute load average "
                 f"{' -> '.join(str(v) for v in res.get('load', {}).values())} over the run (the machine is shared "
                 f"with other work). Whole run: {res.get('total_s', 0):.0f} s.")
    lines.append("")
    if "tpp" in res and "burst" in res:
        t, b = res["tpp"], res["burst"]
        lines += ["| 1. throughput, audio pushed at once | in-process TPPLane | services | difference |",
                  "| --- | --- | --- | --- |",
                  f"| seconds per block (first to last of {t['blocks']}) | {t['s_per_block']:.3f} | "
                  f"{b['s_per_block']:.3f} | {b['s_per_block'] - t['s_per_block']:+.3f} |",
                  f"| blocks per second (real time = {1 / BLOCK_S:.2f}) | {t['blocks_per_s']:.2f} | "
                  f"{b['blocks_per_s']:.2f} | |",
                  f"| CPU seconds per block, all processes involved ({t['processes']} / {b['processes']}) | "
                  f"{t['cpu_s_per_block']:.3f} | {b['cpu_s_per_block']:.3f} | "
                  f"{b['cpu_s_per_block'] - t['cpu_s_per_block']:+.3f} |",
                  f"| first block after the audio was pushed (s) | {t['first_block_s']:.2f} | "
                  f"{b['first_fragment_after_push_s']:.2f} | |",
                  f"| stream complete and in order | yes | {'yes' if b['complete_and_ordered'] else 'NO'} | |",
                  ""]
        lines.append(f"Peak lag exported by the lane head during the burst (liveavatar_queue_lag_messages): "
                     f"{b['max_head_lag_blocks']} blocks. Stack start (`up`, ready): {res['stack_up_s']:.1f} s. "
                     f"CPU of the idle stack (no session): {b['idle_cpu_cores']:.2f} cores.")
        lines.append("")
    if "realtime" in res:
        r = res["realtime"]
        tr = res.get("tpp", {}).get("realtime", {})

        def tp(key: str) -> str:
            return f"{tr[key]:.3f}" if key in tr else "-"

        lines += ["| 2. end-to-end latency at real time (publish of block k -> media fragment k) | services | "
                  "in-process TPPLane |",
                  "| --- | --- | --- |",
                  f"| p50 over {r['blocks']} blocks | {r['p50_s']:.3f} | {tp('p50_s')} |",
                  f"| p99 over {r['blocks']} blocks | {r['p99_s']:.3f} | {tp('p99_s')} |",
                  f"| max | {r['max_s']:.3f} | {tp('max_s')} |",
                  f"| block 0 | {r['block0_s']:.3f} | |",
                  f"| p50 / p99 without block 0 | {r['p50_excl_block0_s']:.3f} / {r['p99_excl_block0_s']:.3f} | |",
                  f"| trend (mean of last 10 minus mean of blocks 1-10) | {r['latency_trend_s']:+.3f} | |",
                  f"| session start -> lane assigned | {r['start_to_active_s']:.2f} | |",
                  *[f"| of which {name} (p50 / p99, from Kafka record timestamps) | "
                    f"{h['p50_s']:.3f} / {h['p99_s']:.3f} | |"
                    for name, h in r.get("hops", {}).items() if isinstance(h, dict)],
                  f"| stream complete and in order | {'yes' if r['complete_and_ordered'] else 'NO'} | |", ""]
    kills = [(label, res[key]) for key, label in (("kill", "as built"),
                                                   ("kill_assisted", "lane heartbeat kept alive by the bench"))
             if key in res]
    if kills:
        k0 = kills[0][1]

        def fmt(v, unit=" s"):
            return "-" if v is None else f"{v:.2f}{unit}" if isinstance(v, float) else str(v)

        lines += [f"| 4. SIGKILL of lane rank {k0['kill_rank']} after block {k0['killed_after_block']} "
                  f"(real-time feed, {k0['blocks']} blocks) | " + " | ".join(lb for lb, _ in kills) + " |",
                  "| --- |" + " --- |" * len(kills)]
        rows = [("session resumed", lambda k: "yes" if k["session_resumed"] else "**NO (session lost)**"),
                ("stall seen by the viewer (last fragment before the restart -> first after)",
                 lambda k: fmt(k["stall_s"])),
                ("kill -> first fragment of the new lane group", lambda k: fmt(k["kill_to_first_new_fragment_s"])),
                ("kill -> lane group respawned (new pids)", lambda k: fmt(k["group_respawn_s"])),
                ("kill -> every rank of the lane ready again", lambda k: fmt(k["lane_ready_again_s"])),
                ("kill -> latency back under 2x the steady p50", lambda k: fmt(k.get("kill_to_caught_up_s"))),
                ("catch-up rate after the restart (blocks/s)", lambda k: fmt(k.get("catch_up_blocks_per_s"), "")),
                ("last block before / first block after the restart",
                 lambda k: f"{k['last_block_before_restart']} / {fmt(k['first_block_after_restart'])}"),
                ("worst publish -> fragment latency", lambda k: fmt(k["latency_max_s"])),
                ("blocks received / expected", lambda k: f"{k['blocks_kept']} / {k['blocks_expected']}"),
                ("duplicate fragments dropped by the client", lambda k: str(k["duplicates_dropped"])),
                ("stream complete and in order", lambda k: "yes" if k["complete_and_ordered"] else "**NO**")]
        for name, f in rows:
            lines.append(f"| {name} | " + " | ".join(f(k) for _, k in kills) + " |")
        lost = [k for _, k in kills if not k["session_resumed"]]
        if lost and lost[0].get("lane_record_after") is not None:
            lines.append("")
            lines.append(f"Lane record in Redis after the lost restart: `{lost[0]['lane_record_after']}`.")
        lines.append("")
    if "wire" in res:
        w = res["wire"]
        lines += ["| 3. broker throughput per session, reference 704x384 | bytes per 0.48 s block | MB/s |",
                  "| --- | --- | --- |"]
        per = w["mb_per_s_per_session"]
        noisy = [r for r in w["frames"] if r["noise_sigma"] > 0]
        static = [r for r in w["frames"] if r["noise_sigma"] == 0]
        nmedia = [r for r in w["media"] if r["noise_sigma"] > 0]
        smedia = [r for r in w["media"] if r["noise_sigma"] == 0]
        rows = [("audio (PCM f32, 3,200-sample chunks)", int(w["audio"]["bytes_per_s_chunk3200"] * BLOCK_S),
                 per["audio"]),
                ("audio-features, features f32 + PCM", w["audio_features"]["block_bytes_f32"],
                 per["audio-features (f32)"]),
                ("audio-features, features bf16 + PCM", w["audio_features"]["block_bytes_bf16"],
                 per["audio-features (bf16)"]),
                ("frames, raw uint8 + PCM", int(np.mean([r["raw_bytes"] for r in noisy])), per["frames (raw uint8)"]),
                ("frames, zlib-1, image + N(0,2) noise", int(np.mean([r["zlib_bytes"] for r in noisy])),
                 per["frames (zlib, sigma=2 noise)"]),
                ("frames, zlib-1, static image (lower bound)", int(np.mean([r["zlib_bytes"] for r in static])),
                 round(np.mean([r["zlib_bytes"] for r in static]) / BLOCK_S / 1e6, 3)),
                ("media, H.264+AAC fragment, image + noise", int(np.mean([r["fragment_msg_bytes_mean"]
                                                                         for r in nmedia])),
                 per["media (H.264+AAC fMP4)"]),
                ("media, H.264+AAC fragment, static image", int(np.mean([r["fragment_msg_bytes_mean"]
                                                                        for r in smedia])),
                 round(np.mean([r["fragment_msg_bytes_mean"] for r in smedia]) / BLOCK_S / 1e6, 3))]
        lines += [f"| {a} | {b:,} | {c:.3f} |" for a, b, c in rows]
        lines += [f"| **total as built** (f32 features, raw frames) | | **{w['total_mb_per_s_as_built']:.2f}** |",
                  f"| total with bf16 features + zlib frames | | {w['total_mb_per_s_bf16_zlib']:.2f} |", ""]
        lines.append("zlib level 1 on one block of noisy frames: compress "
                     f"{np.mean([r['compress_s'] for r in noisy]):.3f} s, compress + decompress "
                     f"{np.mean([r['compress_plus_decompress_s'] for r in noisy]):.3f} s of one core; ratio "
                     f"{np.mean([r['ratio'] for r in noisy]):.2f} (noisy) / "
                     f"{np.mean([r['ratio'] for r in static]):.2f} (static). H.264 packaging at 704x384: "
                     f"{np.mean([r['package_s_per_block'] for r in nmedia]):.3f} s per block (noisy content).")
        lines.append("")
    lines.append("Rerun: `.venv/bin/python bench/services_bench.py --json /tmp/services_bench.json`")
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/services_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--doc", default=str(ROOT / "docs" / "services.md"), help="markdown file to update, or 'none'")
    p.add_argument("--blocks", type=int, default=24, help="blocks of the throughput runs (part 1)")
    p.add_argument("--rt-blocks", type=int, default=32, help="blocks of the real-time latency run (part 2, >= 30)")
    p.add_argument("--kill-blocks", type=int, default=24, help="blocks of the kill run (part 4)")
    p.add_argument("--kill-rank", type=int, default=2, help="lane rank to SIGKILL (0 head .. 4 decoder)")
    p.add_argument("--wire-only", action="store_true", help="part 3 only (no processes, no stack)")
    p.add_argument("--run-dir", help="run directory of the local stack (default: a fresh temporary one)")
    p.add_argument("--decode-threads", type=int, default=None,
                   help="torch threads of the lane's decode rank, in process and in the stack "
                        "(LIVEAVATAR_DECODE_THREADS); default: 1 like every rank")
    args = p.parse_args(argv)
    if args.decode_threads:
        os.environ["LIVEAVATAR_DECODE_THREADS"] = str(args.decode_threads)    # inherited by the stack's lanes

    res: dict = {"machine": machine(), "load": {"start": load()}, "decode_threads": args.decode_threads or 1}
    image = (EXAMPLES / "cyclops_baker.jpg").read_bytes()
    t_all = time.monotonic()

    def save(r: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2, default=float))

    print("part 3: wire sizes at the reference resolution ...", flush=True)
    res["wire"] = wire_sizes()
    res["load"]["after_wire"] = load()
    save(res)
    if not args.wire_only:
        pcm_burst = example_pcm(["cyclops_baker"], args.blocks)
        pcm_rt = example_pcm(["cyclops_baker", "kitchen_grandmother", "music_producer"], args.rt_blocks)
        print(f"part 1a (+2 in process): TPPLane, {args.blocks} blocks at once, {args.rt_blocks} at real time ...",
              flush=True)
        res["tpp"] = tpp_inprocess(image, pcm_burst, pcm_rt, args.decode_threads)
        res["load"]["after_tpp"] = load()
        save(res)
        run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="services-bench-"))
        print(f"starting the local stack in {run_dir} ...", flush=True)
        st = None
        try:
            st = Stack(run_dir)
            res["stack_up_s"] = r3(st.up_s)
            print("part 1b: services, audio at once ...", flush=True)
            res["burst"] = services_burst(st, image, pcm_burst)
            res["load"]["after_burst"] = load()
            save(res)
            print(f"part 2: real-time feed, {args.rt_blocks} blocks ...", flush=True)
            res["realtime"] = realtime_feed(st, image, pcm_rt)
            res["load"]["after_realtime"] = load()
            save(res)
            print(f"part 4: real-time feed, SIGKILL lane rank {args.kill_rank} ...", flush=True)
            pcm_kill = example_pcm(["music_producer", "cyclops_baker"], args.kill_blocks)
            img_kill = (EXAMPLES / "music_producer.jpg").read_bytes()
            p50 = res["realtime"]["p50_s"]
            res["kill"] = realtime_feed(st, img_kill, pcm_kill, kill_rank=args.kill_rank, steady_p50=p50)
            res["load"]["after_kill"] = load()
            save(res)
            if not res["kill"]["session_resumed"]:
                print("part 4b: the session was lost; again with the lane heartbeat kept alive ...", flush=True)
                res["kill_assisted"] = realtime_feed(st, img_kill, pcm_kill, kill_rank=args.kill_rank,
                                                     keep_lane_alive=True, steady_p50=p50)
                res["load"]["after_kill_assisted"] = load()
        finally:
            if st is not None:
                st.close()
            from services.cli import stack_cmd

            stack_cmd.down(run_dir)
    res["total_s"] = r3(time.monotonic() - t_all)
    table = markdown(res)
    print(table)
    save(res)
    if args.doc != "none":
        write_doc(Path(args.doc), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
