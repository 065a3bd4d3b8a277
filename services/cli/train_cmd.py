"""``liveavatar train``: reproduce the shipped tiny checkpoint from scratch on this machine.

    liveavatar train --out runs/train                       # everything (resumes when rerun)
    liveavatar train --out runs/train --install             # ... and replace the shipped checkpoint
    liveavatar train --out runs/quick --quick               # a few steps of every stage (smoke run)
    liveavatar train --out runs/train --probes              # also the quality-harness probes
    liveavatar train --out runs/v5 --decoder-from models/checkpoints/liveavatar-tiny
                                                            # only stage 1c: narrow a trained bundle's decoder

Every stage shows a progress bar and checkpoints under ``--out``; rerunning the same command
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="working directory: stage checkpoints, caches, logs")
    p.add_argument("--examples", default=None, help="folder with the example WAVs (default: the repository's "
                   "examples/, or $LIVEAVATAR_EXAMPLES_DIR)")
    p.add_argument("--quick", action="store_true", help="a few steps of every stage (smoke test)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field, e.g. --set teacher_steps=500 (repeatable)")
    p.add_argument("--install", action="store_true", help="copy the result over the shipped checkpoint "
                   "(models/checkpoints/liveavatar-tiny)")
    p.add_argument("--probes", action="store_true", help="also train the quality-harness probes")
    p.add_argument("--decoder-from", default=None, metavar="DIR",
                   help="run only stage 1c on the trained bundle DIR: distil a narrower decoder "
                   "(width decoder_dim) from its VAE and write DIR's bundle with it")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(cfg, pairs: list[str]):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set wants KEY=VALUE with KEY one of {sorted(fields)}; got {pair!r}")
        kind = type(getattr(cfg, key))
        try:
            values[key] = kind(raw)
        except ValueError as exc:
            raise ValueError(f"--set {key}: {raw!r} is not a {kind.__name__}") from exc
    return dataclasses.replace(cfg, **values)


def default_examples() -> Path | None:
    from services.common.examples import examples_dir

    here = examples_dir()
    return here.resolve() if here.is_dir() else None


def run(args: argparse.Namespace) -> int:
    try:
        import torch

        from models.checkpoints import SHIPPED_CHECKPOINT
        from models.training.recipe import TrainConfig, train_all, train_decoder_from

        torch.set_num_threads(args.threads)
        cfg = _overrides(TrainConfig.quick() if args.quick else TrainConfig(), args.set)
        examples = Path(args.examples) if args.examples else default_examples()
        if examples is not None and not examples.is_dir():
            raise FileNotFoundError(f"examples folder not found: {examples}")
        if args.decoder_from is not None:
            if not Path(args.decoder_from).is_dir():
                raise FileNotFoundError(f"--decoder-from: no checkpoint folder at {args.decoder_from}")
            report = train_decoder_from(cfg, args.decoder_from, args.out, examples, progress=not args.no_progress)
        else:
            report = train_all(cfg, args.out, examples, progress=not args.no_progress)
        print(json.dumps(report.summary(), indent=2))
        if args.install:
            if SHIPPED_CHECKPOINT.exists():
                shutil.rmtree(SHIPPED_CHECKPOINT)
            shutil.copytree(report.checkpoint, SHIPPED_CHECKPOINT)
            print(f"installed {report.checkpoint} -> {SHIPPED_CHECKPOINT}")
        if args.probes:
            from models.quality.probes import PROBES_DIR, ProbeConfig, save_probes, train_probes

            probes = train_probes(Path(args.out) / "probes", ProbeConfig(), progress=not args.no_progress)
            target = PROBES_DIR if args.install else Path(args.out) / "probes" / "export"
            save_probes(probes, target)
            print(f"probes written to {target}")
        return 0
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
