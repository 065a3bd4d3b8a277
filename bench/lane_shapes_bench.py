"""Blocks per second and CPU per block of every lane shape, on the cores this machine (or ``--cpus``) gives.

    .venv/bin/python bench/lane_shapes_bench.py                        # 6 shapes x decode threads 1, 2; ~5 min
    .venv/bin/python bench/lane_shapes_bench.py --cpus 0,1 --shapes 1,2+1 --decode-threads 2 --blocks 16
    .venv/bin/python bench/lane_shapes_bench.py --json /tmp/shapes.json --doc docs/tpp.md

For each shape (``4+1``, ``4``, ``2+1``, ``2``, ``1+1``, ``1``: docs/tpp.md) and each decode thread count,
a local lane (:class:`pipeline_stages.tpp.TPPLane`, the shipped ``tiny-trained`` model, one torch thread
per rank, the decoder on ``--decode-threads``) is started, one session opened, and ``--blocks`` blocks
of example speech pushed at once (a burst: the lane runs as fast as it can). Measured, after
``--warmup`` blocks:

- **s/block**: (arrival of the last block - arrival of block ``warmup``) / (blocks - 1 - warmup), at the
  caller; the lane holds real time when this is at most 0.48 s;
- **CPU s/block**: CPU time (user + system) of the rank processes and the caller (audio stage and
  packaging) over the same window, per block;
- the cores the lane used in the window (CPU s / wall s).

Before the shapes, the per-stage costs of the same model in one process (one denoising step; the
streaming decode at 1 and 2 threads) are measured: these are the constants ``liveavatar up`` uses to
choose a shape (``services/cli/lane_plan.py``).

The machine may be shared: the load average before and after each run is recorded with it. ``--cpus``
pins the bench and every lane process to those cores (Linux), e.g. ``--cpus 0,1`` for the 2-core case
on a bigger machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _benchlib import cpu_model, cpu_seconds, load, write_marked_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BLOCK_S = 0.48
DOC_BEGIN, DOC_END = "<!-- lane-shapes-bench:begin -->", "<!-- lane-shapes-bench:end -->"


def write_doc(path: Path, table: str) -> None:
    write_marked_section(path, DOC_BEGIN, DOC_END, table, heading=None)






def stage_costs(repeats: int) -> dict:
    """One denoising step and one streaming decode of the shipped model in this process (warm caches)."""
    import torch

    from models.inputs import load_audio, load_image
    from models.liveavatar import LiveAvatarConfig, build_models, default_checkpoint
    from pipeline_stages.sequential import SequentialRunner, SessionSpec
    from services.common.examples import examples_dir

    ex = examples_dir()
    config = LiveAvatarConfig.load("tiny-trained")
    models = build_models(config, seed=0, checkpoint=default_checkpoint("tiny-trained"))
    runner = SequentialRunner(models, package=False)
    image = load_image(str(ex / "cyclops_baker.jpg"), 50_000_000)
    pcm = load_audio(str(ex / "cyclops_baker.wav"), 60)
    out: dict = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runner.start_session(SessionSpec(image, "", seed=0))
        feats = list(runner.audio.push(pcm[:config.audio.block_samples * (repeats + 2)]))
        step_w, step_c, dec_w, dec_c = [], [], [], []
        for b, f in enumerate(feats):
            t, c = time.perf_counter(), time.process_time()
            latent = runner.run_block(b, f)
            t1, c1 = time.perf_counter(), time.process_time()
            runner.decode.run(latent)
            t2, c2 = time.perf_counter(), time.process_time()
            runner.next_block += 1
            if b >= 2:
                step_w.append((t1 - t) / 4)
                step_c.append((c1 - c) / 4)
                dec_w.append(t2 - t1)
                dec_c.append(c2 - c1)
        med = statistics.median
        out[f"threads_{threads}"] = {"step_wall_s": round(med(step_w), 4), "step_cpu_s": round(med(step_c), 4),
                                     "decode_wall_s": round(med(dec_w), 4), "decode_cpu_s": round(med(dec_c), 4)}
    torch.set_num_threads(1)
    return out


def run_shape(shape: str, decode_threads: int, blocks: int, warmup: int) -> dict:
    import torch

    from models.inputs import load_audio, load_image
    from models.liveavatar import LiveAvatarConfig, default_checkpoint
    from pipeline_stages.runner import SessionSpec
    from pipeline_stages.tpp import TPPLane
    from services.common.examples import examples_dir

    torch.set_num_threads(1)
    ex = examples_dir()
    config = LiveAvatarConfig.load("tiny-trained")
    image = load_image(str(ex / "cyclops_baker.jpg"), 50_000_000)
    pcm = load_audio(str(ex / "cyclops_baker.wav"), 60)
    n = config.audio.block_samples
    pcm = np.tile(pcm, -(-n * blocks // len(pcm)))[:n * blocks]
    res: dict = {"shape": shape, "decode_threads": decode_threads, "load_before": load()}
    t0 = time.monotonic()
    with TPPLane(config, checkpoint=default_checkpoint("tiny-trained"), shape=shape, threads_per_rank=1,
                 decode_threads=decode_threads) as lane:
        res["start_s"] = round(time.monotonic() - t0, 2)
        pids = [p.pid for p in lane.procs] + [os.getpid()]
        lane.start_session(SessionSpec(image, "", seed=0))
        arrivals: dict[int, float] = {}
        cpu_at: dict[int, float] = {}
        for r in lane.push_audio(pcm):
            arrivals[r.block_index] = time.monotonic()
        while len(arrivals) < blocks:
            for r in lane.collect(block=True):
                arrivals[r.block_index] = time.monotonic()
                if r.block_index in (warmup, blocks - 1):
                    cpu_at[r.block_index] = cpu_seconds(pids)
        lane.close_session()
    span = blocks - 1 - warmup
    wall = arrivals[blocks - 1] - arrivals[warmup]
    cpu = cpu_at[blocks - 1] - cpu_at[warmup]
    res.update({"processes": len(pids) - 1, "s_per_block": round(wall / span, 3),
                "blocks_per_s": round(span / wall, 3), "cpu_s_per_block": round(cpu / span, 3),
                "cores_used": round(cpu / wall, 2), "holds_real_time": wall / span <= BLOCK_S,
                "load_after": load()})
    return res


def markdown(res: dict, argv: list[str]) -> str:
    m = res["machine"]
    lines = [f"Run: `python bench/lane_shapes_bench.py{' ' + ' '.join(argv) if argv else ''}` on {m['cpu']} "
             f"({m['cores']} cores{', pinned to ' + m['cpus'] if m.get('cpus') else ''}), torch {m['torch']}, "
             f"{m['date_utc']} UTC; shipped `tiny-trained` model, {res['blocks']} blocks pushed at once, "
             f"window from block {res['warmup']}. Load average at start / end: {res['load_start']} / "
             f"{res['load_end']}.", ""]
    c = res["stage_costs"]
    lines += ["Per-stage cost in one process (median over blocks, warm caches):", "",
              "| threads | one denoising step, wall / CPU s | streaming decode of a block, wall / CPU s |",
              "|---|---|---|"]
    for t in (1, 2):
        k = c[f"threads_{t}"]
        lines.append(f"| {t} | {k['step_wall_s']} / {k['step_cpu_s']} | {k['decode_wall_s']} / {k['decode_cpu_s']} |")
    lines += ["", "| shape | processes | decode threads | s/block | blocks/s | CPU s/block | cores used | "
              "real time (<= 0.48 s/block) | load before / after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['shape']} | {r['processes']} | {r['decode_threads']} | {r['s_per_block']} | "
                     f"{r['blocks_per_s']} | {r['cpu_s_per_block']} | {r['cores_used']} | "
                     f"{'yes' if r['holds_real_time'] else 'no'} | {r['load_before']} / {r['load_after']} |")
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4+1,4,2+1,2,1+1,1", help="comma-separated lane shapes")
    p.add_argument("--decode-threads", default="1,2", help="comma-separated decoder thread counts")
    p.add_argument("--blocks", type=int, default=16, help="blocks per run (default 16)")
    p.add_argument("--warmup", type=int, default=3, help="blocks before the measured window (default 3)")
    p.add_argument("--repeats", type=int, default=6, help="blocks timed for the per-stage costs (default 6)")
    p.add_argument("--cpus", default="", help="pin to these cores, e.g. 0,1 (Linux; default: all)")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--doc", default=None, help="fill the marked section of this markdown file (docs/tpp.md)")
    args = p.parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})   # lane processes inherit it
    import torch

    cpu = cpu_model()
    res: dict = {"machine": {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpus": args.cpus,
                             "torch": torch.__version__, "python": platform.python_version(),
                             "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())},
                 "blocks": args.blocks, "warmup": args.warmup, "load_start": load()}
    res["stage_costs"] = stage_costs(args.repeats)
    print(json.dumps(res["stage_costs"]), flush=True)
    res["runs"] = []
    for shape in args.shapes.split(","):
        for dt in (int(x) for x in args.decode_threads.split(",")):
            r = run_shape(shape, dt, args.blocks, args.warmup)
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    res["load_end"] = load()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    table = markdown(res, argv)
    print(table)
    if args.doc:
        write_doc(Path(args.doc), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
