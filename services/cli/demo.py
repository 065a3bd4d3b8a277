"""``make demo``: the main job on the embedded default, end to end, on the repository's ``examples/``.

The model is the shipped trained tiny checkpoint (``models/checkpoints/liveavatar-tiny``), trained
on procedural 64x64 faces, so the avatars are the held-out synthetic faces in ``examples/faces/`` (the
example photos are outside that domain) and the speech is the real example speech. Every output is
named for what it shows: ``face_812-speaks-cyclops_baker`` is synthetic face 812 speaking
``cyclops_baker.wav`` (see :func:`services.common.examples.output_stem`).

1. ``liveavatar generate`` (single process) for every example speech, each with its own face ->
   ``out/<stem>.mp4``, scored by ``liveavatar eval`` (lip sync, identity, motion) -> ``out/<stem>.eval/``,
   and a contact sheet of frames with the audio envelope -> ``out/contact_sheet.png``;
2. the same job for the first example through a 5-process TPP lane (``--tpp``) -> ``out/<stem>.tpp.mp4``,
   checked bit-identical to step 1;
3. the whole local stack (``liveavatar up``: broker, Redis, audio-encoder, a lane, stream-packager),
   one session streamed through it -> ``out/<stem>.services.mp4``, then ``liveavatar down``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from services.common.examples import EXAMPLE_NAMES, FACE_IDENTITIES, examples_dir, face_for, output_stem

#: Held-out synthetic identities (training used identities 0..799) that play the demo's avatars; their
#: faces are committed as ``examples/faces/face_<id>.png``.
DEMO_IDENTITIES = FACE_IDENTITIES


def _generate(image: Path, audio: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "generate", "--image", str(image), "--audio", str(audio),
           "--out", str(out), "--no-progress", "--threads", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"generate failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _run_cli(args: list[str]) -> str:
    r = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"liveavatar {args[0]} failed:\n{r.stderr}")
    return r.stdout


def contact_sheet(video: Path, audio: Path, out_png: Path, start_s: float = 2.0, columns: int = 12,
                  rows: int = 3, scale: int = 2, title: str = "") -> Path:
    """Consecutive frames (``rows x columns`` from ``start_s``) with the audio envelope drawn under each
    frame, so one can see the mouth follow the speech; ``title`` is written in a strip above them."""
    import av
    from PIL import Image, ImageDraw

    from models.inputs import load_audio
    from models.mouth import FPS, mouth_envelope

    first, count = round(start_s * FPS), rows * columns
    frames = []
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= first:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    env = mouth_envelope(load_audio(str(audio), 3600))
    h, w = frames[0].shape[:2]
    bar = 10
    top = 16 if title else 0
    sheet = Image.new("RGB", (columns * w * scale, top + rows * (h * scale + bar)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 3), title, fill=(0, 0, 0))
    for k, f in enumerate(frames):
        r, c = divmod(k, columns)
        x, y = c * w * scale, top + r * (h * scale + bar)
        sheet.paste(Image.fromarray(f).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y))
        level = float(env[first + k]) if first + k < len(env) else 0.0
        draw.rectangle([x + 1, y + h * scale + 2, x + 1 + round(level * (w * scale - 2)), y + h * scale + bar - 2],
                       fill=(200, 40, 40))
    sheet.save(out_png)
    return out_png


def run_demo(args: argparse.Namespace) -> int:
    t_demo = time.monotonic()
    examples = Path(args.examples) if args.examples else examples_dir()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for n in EXAMPLE_NAMES for p in (examples / f"{n}.wav", face_for(n, examples)) if not p.is_file()]
    if missing:
        print(f"error: the examples folder {examples} lacks {', '.join(str(p) for p in missing)}", file=sys.stderr)
        return 2
    print("model: the shipped trained tiny checkpoint (64x64, synthetic talking-face domain); the avatars are\n"
          "held-out synthetic faces (examples/faces/), the speech is the real example speech.\n")
    pairs = [(face_for(n, examples), examples / f"{n}.wav", output_stem(n)) for n in EXAMPLE_NAMES]

    # 1. single process, every example speech with its own face; scored by the quality harness
    for image, audio, name in pairs:
        s = _generate(image, audio, out_dir / f"{name}.mp4",
                      ["--dump-latents", str(out_dir / f"{name}.latents.safetensors")])
        print(f"generate   {name:36s} {s['frames']:4d} frames  {s['fps']:6.1f} FPS  "
              f"RTF {s['real_time_factor']:.2f}  -> {s['out']}")
        summary = _run_cli(["eval", str(out_dir / f"{name}.mp4"), "--reference", str(image), "--audio", str(audio),
                            "--out", str(out_dir / f"{name}.eval"), "--threads", "1", "--no-progress"])
        print(f"eval       {name:36s} {summary.strip().splitlines()[0]}")
    image, audio, name = pairs[0]
    title = (f"{name}.mp4: synthetic {image.stem} speaking {audio.name}; consecutive frames from 2 s, "
             f"the red bar under each is the speech loudness")
    sheet = contact_sheet(out_dir / f"{name}.mp4", audio, out_dir / f"{name}.contact_sheet.png", title=title)
    print(f"contact sheet of {name} (frames with the audio envelope under each) -> {sheet}")

    # 2. the first example through a TPP lane: same latents
    tpp_lat = out_dir / f"{name}.tpp.latents.safetensors"
    s = _generate(image, audio, out_dir / f"{name}.tpp.mp4", ["--tpp", "--dump-latents", str(tpp_lat)])
    from safetensors.torch import load_file

    a, b = load_file(str(out_dir / f"{name}.latents.safetensors")), load_file(str(tpp_lat))
    same = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    print(f"generate   {name + ' --tpp':36s} {s['frames']:4d} frames  {s['fps']:6.1f} FPS  "
          f"(5 processes; latents {'bit-identical to' if same else 'DIFFERENT from'} the single-process run)")

    # 3. the local stack: one session through the services
    from models.inputs import load_audio
    from services.cli import stack_cmd
    from services.common.kafka import make_producer
    from services.common.messages import AudioIn
    from services.common.redis_state import StateStore
    from services.common.session_io import MediaCollector, assemble, publish_pcm, publish_start, send

    with tempfile.TemporaryDirectory(prefix="liveavatar-demo-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        t0 = time.monotonic()
        res = stack_cmd.up(run_dir, lanes=1, api=False)
        info = res["infra"]
        try:
            print(f"\nlocal stack up in {time.monotonic() - t0:.0f} s: broker {info.kafka_bootstrap}, redis "
                  f"{info.redis_url}, services {', '.join(res['services'])}")
            store, producer = StateStore.from_url(info.redis_url), make_producer(info.kafka_bootstrap)
            media = MediaCollector(info.kafka_bootstrap)
            sid = "demo-" + uuid.uuid4().hex[:8]
            pcm = load_audio(str(audio), 3600)
            t1 = time.monotonic()
            publish_start(store, producer, sid, "demo", image.read_bytes(), {"seed": 0})
            seq = publish_pcm(producer, sid, "demo", pcm, 1)
            send(producer, AudioIn(session_id=sid, tenant_id="demo", seq=seq, kind="end"))
            producer.flush()
            media.wait_end([sid], 600)
            data, blocks = assemble(media.messages[sid])
            path = out_dir / f"{name}.services.mp4"
            path.write_bytes(data)
            print(f"services   {name:36s} {len(blocks):4d} blocks in order through audio-encoder -> lane "
                  f"(5 processes) -> packager in {time.monotonic() - t1:.1f} s -> {path}")
            media.close()
            producer.close()
        finally:
            stack_cmd.down(run_dir)
            print("local stack down")
    print(f"\ndemo done in {time.monotonic() - t_demo:.0f} s; outputs in {out_dir}/")
    return 0
