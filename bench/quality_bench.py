"""Quality of the shipped checkpoint and the rolling-sink-frame ablation.

    python bench/quality_bench.py                      # everything: ~1 h of stream per ablation variant
    python bench/quality_bench.py --hours 0.05 --ids 2 # a quick run

Part 1, short clips (``--clip-seconds`` of held-out speech, on ``--ids`` held-out identities):
  - ceiling: the ground-truth synthetic videos (rendered with the same audio);
  - floor: the same architecture with seeded random weights;
  - shipped: the trained checkpoint (models/checkpoints/liveavatar-tiny).
Part 2, the rolling-sink ablation: ``--hours`` of stream time per variant (RSFM on; no rolling of
the sink position; no re-anchoring; no sink at all), one held-out identity, looped held-out
speech. Every block is generated (the generator runs the whole hour); to bound the cost only
``--window-seconds`` windows every ``--every-minutes`` are decoded and evaluated, each with a
freshly warmed decoder (the decode stage's warm-up on the reference's motion latents).

Writes ``<out>/quality.json``, ``<out>/quality.md`` (tables) and PNG curves.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import SHIPPED_CHECKPOINT  # noqa: E402
from models.generator import GenerationOptions  # noqa: E402
from models.liveavatar import LiveAvatarConfig, build_models  # noqa: E402
from models.quality.probes import PROBES_DIR, load_probes  # noqa: E402
from models.quality.report import Evaluator, evaluate  # noqa: E402
from models.training import synthetic as syn  # noqa: E402
from models.training.speech import SpeechCorpus  # noqa: E402
from pipeline_stages.decode_stage import DecodeStage  # noqa: E402
from pipeline_stages.sequential import SequentialRunner, SessionSpec  # noqa: E402
from services.common.examples import examples_dir  # noqa: E402

VARIANTS = {
    "rsfm": GenerationOptions(),
    "no_rolling": GenerationOptions(rolling_sink=False),
    "no_reanchor": GenerationOptions(reanchor=False),
    "no_sink": GenerationOptions(sink=False, reanchor=False),
}
HELD_OUT_IDS = range(800, 1000)


def looped_speech(clips: list[np.ndarray], samples: int, seed: int) -> np.ndarray:
    """Concatenate ``clips`` in a seeded order with 0.3-1.5 s pauses until ``samples`` samples."""
    rng = np.random.default_rng(seed)
    parts, n = [], 0
    while n < samples:
        clip = clips[int(rng.integers(len(clips)))]
        gap = np.zeros(int(rng.uniform(0.3, 1.5) * syn.SAMPLE_RATE), dtype=np.float32)
        parts += [clip, gap]
        n += clip.shape[0] + gap.shape[0]
    return np.concatenate(parts)[:samples].astype(np.float32)


def generate_clip(models, reference: np.ndarray, pcm: np.ndarray, seed: int,
                  options: GenerationOptions = GenerationOptions()) -> np.ndarray:
    """Frames uint8 [T, H, W, 3] of the whole ``pcm`` through the sequential runner (no packaging)."""
    runner = SequentialRunner(models, package=False)
    runner.start_session(SessionSpec(image_rgb=reference, seed=seed, options=options))
    with torch.no_grad():
        frames = [r.frames.numpy() for r in runner.generate(pcm)]
    return np.concatenate(frames)


def _row(report) -> dict:
    m = report.motion
    return {"sync_corr": report.sync.correlation, "sync_offset": report.sync.offset_frames,
            "sync_conf": report.sync.confidence, "identity": report.identity.mean,
            "mouth_var_ratio": m.mouth_var_ratio, "head_var_ratio": m.head_var_ratio,
            "sharpness": report.sharpness.mean, "colour_drift": report.colour_drift.mean}


def part1(probes, speech: np.ndarray, ids: list[int], seconds: float, seed: int, checkpoint: Path) -> dict:
    """Ceiling (ground truth), floor (random weights) and the shipped checkpoint on short clips."""
    n_frames = int(seconds * syn.FPS)
    pcm = speech[: n_frames * syn.SAMPLES_PER_FRAME]
    shipped = build_models(LiveAvatarConfig.load(checkpoint), checkpoint=checkpoint)
    floor = build_models(LiveAvatarConfig.load(checkpoint), seed=seed)
    rows: dict[str, list[dict]] = {"ground_truth": [], "random_weights": [], "shipped": []}
    for identity in ids:
        clip = syn.sample_clip(identity, pcm, n_frames, seed=seed + identity)
        ref = clip.reference
        rows["ground_truth"].append(_row(evaluate(clip.frames, pcm, ref, probes, gt_motion=clip.motion)))
        for name, models in (("random_weights", floor), ("shipped", shipped)):
            frames = generate_clip(models, ref, pcm, seed)
            rows[name].append(_row(evaluate(frames[:n_frames], pcm, ref, probes)))
        print(f"  identity {identity}: " + ", ".join(f"{k} sync {v[-1]['sync_corr']:.3f} id {v[-1]['identity']:.3f}"
                                                    for k, v in rows.items()), flush=True)
    return {k: {"per_identity": v, "mean": {m: float(np.mean([r[m] for r in v])) for m in v[0]}}
            for k, v in rows.items()}


@dataclass
class Window:
    start_s: float
    report: dict


def ablation_variant(models, name: str, reference: np.ndarray, pcm: np.ndarray, probes, seed: int,
                     window_s: float, every_s: float) -> dict:
    """Generate ``len(pcm)`` samples of stream with variant ``name``; evaluate windows."""
    cfg = models.config
    block_samples, fpb_frames = cfg.audio.block_samples, cfg.audio.block_frames
    n_blocks = len(pcm) // block_samples
    win_blocks = max(1, round(window_s * cfg.fps / fpb_frames))
    every_blocks = max(win_blocks, round(every_s * cfg.fps / fpb_frames))
    one_minute = round(60.0 * cfg.fps / fpb_frames)        # a window at 1 min too
    starts = sorted({*range(0, n_blocks - win_blocks + 1, every_blocks), max(0, n_blocks - win_blocks),
                     *([one_minute] if one_minute + win_blocks <= n_blocks else [])})
    runner = SequentialRunner(models, package=False)
    runner.start_session(SessionSpec(image_rgb=reference, seed=seed, options=VARIANTS[name]))
    decoder = DecodeStage(models.vae)
    windows, ev, frames_in_win, t0 = [], None, 0, time.perf_counter()
    with torch.no_grad():
        for b in range(n_blocks):
            block = pcm[b * block_samples:(b + 1) * block_samples]
            feats = models.audio.encode_block(torch.from_numpy(block))[None]      # [1, L, C, 12]
            latent = runner.run_block(b, feats)
            if b in starts:                       # a new window: fresh decoder warmed on the reference
                decoder.start_session(runner.sink.motion_latents)
                ev, frames_in_win, win_start = Evaluator(probes, reference, window_s=window_s), 0, b
            if ev is not None:
                frames = decoder.run(latent).numpy()
                ev.add_frames(frames, block)
                frames_in_win += frames.shape[0]
                if b - win_start + 1 == win_blocks:
                    rep = ev.finish()
                    windows.append(Window(win_start * block_samples / syn.SAMPLE_RATE, _row(rep)))
                    ev = None
            if b % 500 == 0:
                print(f"  {name}: block {b}/{n_blocks} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"windows": [{"start_s": w.start_s, **w.report} for w in windows],
            "seconds": time.perf_counter() - t0, "blocks": n_blocks}


def identity_slope_per_hour(windows: list[dict]) -> float:
    t = np.array([w["start_s"] for w in windows]) / 3600.0
    y = np.array([w["identity"] for w in windows])
    return float(np.polyfit(t, y, 1)[0]) if len(t) > 1 else float("nan")


def at(windows: list[dict], seconds: float, key: str) -> float:
    """The value of the window that starts closest to ``seconds``."""
    return float(min(windows, key=lambda w: abs(w["start_s"] - seconds))[key])


def write_outputs(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=2))
    lines = ["# Quality of the shipped tiny checkpoint", "",
             f"Generated by `python bench/quality_bench.py {' '.join(res['args'])}` on {res['machine']}.", ""]
    if "part1" in res:
        p = res["part1"]
        lines += [f"## Short clips ({res['clip_seconds']:.0f} s of held-out speech, {len(res['ids'])} held-out "
                  "identities, means)", "",
                  "| video | sync corr | sync offset (frames) | sync conf | identity sim | mouth var / GT | "
                  "head var / GT | sharpness / ref | colour drift |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name in ("ground_truth", "shipped", "random_weights"):
            m = p[name]["mean"]
            lines.append(f"| {name} | {m['sync_corr']:.3f} | {m['sync_offset']:+.1f} | {m['sync_conf']:.3f} | "
                         f"{m['identity']:.3f} | {m['mouth_var_ratio']:.2f} | {m['head_var_ratio']:.2f} | "
                         f"{m['sharpness']:.2f} | {m['colour_drift']:.1f} |")
        lines.append("")
    if "ablation" in res:
        hours = res["hours"]
        last = hours * 3600.0
        w0 = next(iter(res["ablation"].values()))["windows"]
        t1, t2 = (min(w0, key=lambda w: abs(w["start_s"] - t))["start_s"] / 60 for t in (60.0, last))
        lines += [f"## Rolling-sink-frame ablation ({hours:g} h of stream per variant, identity {res['ablation_id']})",
                  "", f"Windows of {res['window_s']:g} s every {res['every_minutes']:g} min (column headers give "
                  "the start of the window used).", "",
                  f"| variant | identity @{t1:.1f} min | identity @{t2:.1f} min | identity slope / h | "
                  "sync corr (mean) | mouth var / GT (mean) | colour drift @end |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, v in res["ablation"].items():
            w = v["windows"]
            lines.append(f"| {name} | {at(w, 60, 'identity'):.3f} | {at(w, last, 'identity'):.3f} | "
                         f"{identity_slope_per_hour(w):+.4f} | {np.mean([x['sync_corr'] for x in w]):.3f} | "
                         f"{np.mean([x['mouth_var_ratio'] for x in w]):.2f} | {at(w, last, 'colour_drift'):.1f} |")
        lines.append("")
        _plot_ablation(res, out)
        lines += ["![identity over time](rsfm_identity.png)", "", "![lip sync over time](rsfm_sync.png)", ""]
    (out / "quality.md").write_text("\n".join(lines))


def _plot_ablation(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, fname, label in (("identity", "rsfm_identity.png", "identity similarity to the reference"),
                              ("sync_corr", "rsfm_sync.png", "lip-sync correlation")):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for name, v in res["ablation"].items():
            w = v["windows"]
            ax.plot([x["start_s"] / 60 for x in w], [x[key] for x in w], marker="o", ms=3, label=name)
        ax.set_xlabel("stream time (min)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "quality"))
    p.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="default: the shipped checkpoint")
    p.add_argument("--cache", default=str(ROOT / "runs" / "bench-cache"))
    p.add_argument("--examples", default=str(examples_dir()))
    p.add_argument("--ids", type=int, default=5, help="held-out identities in part 1")
    p.add_argument("--clip-seconds", type=float, default=20.0)
    p.add_argument("--hours", type=float, default=1.0, help="stream time per ablation variant")
    p.add_argument("--window-seconds", type=float, default=10.0)
    p.add_argument("--every-minutes", type=float, default=5.0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
                   + " ('' for none; results of earlier runs under --out/parts are merged)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint).resolve()
    probes = load_probes(PROBES_DIR)
    corpus = SpeechCorpus(Path(args.cache) / "speech", Path(args.examples), num_synth=200, seed=0)
    held = corpus.held_out_example()
    ids = list(HELD_OUT_IDS)[:: max(1, len(HELD_OUT_IDS) // args.ids)][: args.ids]
    res: dict = {"args": argv if argv is not None else sys.argv[1:], "machine": f"{platform.processor() or 'cpu'}, "
                 f"{args.threads} torch thread(s)", "clip_seconds": args.clip_seconds, "ids": ids,
                 "checkpoint": str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt)}
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if not args.skip_part1:
        speech = looped_speech([held], int(args.clip_seconds * syn.SAMPLE_RATE), args.seed)
        print("part 1: ceiling / floor / shipped", flush=True)
        (out / "parts" / "part1.json").write_text(json.dumps(part1(probes, speech, ids, args.clip_seconds,
                                                                   args.seed, ckpt), indent=2))
    models = build_models(LiveAvatarConfig.load(ckpt), checkpoint=ckpt)
    ident = ids[0]
    reference = syn.reference_image(syn.face_params(ident))
    pcm = looped_speech([held, *corpus.eval_clips()], int(args.hours * 3600 * syn.SAMPLE_RATE), args.seed + 1)
    res.update(hours=args.hours, ablation_id=ident, window_s=args.window_seconds, every_minutes=args.every_minutes)
    for name in [v for v in args.variants.split(",") if v]:
        print(f"ablation: {name}", flush=True)
        part = ablation_variant(models, name, reference, pcm, probes, args.seed, args.window_seconds,
                                args.every_minutes * 60.0)
        (out / "parts" / f"ablation-{name}.json").write_text(json.dumps({**part, "hours": args.hours}, indent=2))
    # compose the outputs from every part present (variants may run in parallel processes)
    if (out / "parts" / "part1.json").exists():
        res["part1"] = json.loads((out / "parts" / "part1.json").read_text())
    res["ablation"] = {name: json.loads((out / "parts" / f"ablation-{name}.json").read_text())
                       for name in VARIANTS if (out / "parts" / f"ablation-{name}.json").exists()}
    if not res["ablation"]:
        del res["ablation"]
    write_outputs(res, out)
    print((Path(args.out) / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
