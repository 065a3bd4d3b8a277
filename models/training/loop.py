"""One training loop for every stage: progress bar, periodic checkpoints, exact resume.

A stage is a function ``step_fn(step, generator) -> {"loss": float, ...}`` that does one optimiser
step. :func:`run_stage` calls it for ``step = start .. total_steps - 1`` and, every ``save_every``
steps and at the end, writes ``<out>/<name>/state.pt`` (step, every module's and optimiser's state
dict, the loss history) atomically (temp file + rename). Run it again with the same arguments and it
resumes from the last saved step.

Resume is exact because nothing random is carried between steps: every step draws its randomness
from ``torch.Generator().manual_seed(step_seed(seed, step))`` (and data from the step index), so
steps 0..N-1 followed by a restart at N give the same weights as one uninterrupted run (the test
checks this bit for bit).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


class TrainingError(RuntimeError):
    """A stage cannot run or resume (bad arguments, a checkpoint from another configuration, a NaN loss)."""


def step_seed(seed: int, step: int) -> int:
    """The seed of one step's generator: a pure function of (seed, step)."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


StepFn = Callable[[int, torch.Generator], dict[str, float]]


@dataclass
class StageResult:
    """What a finished (or resumed-and-finished) stage did."""

    name: str
    steps: int                                       # total steps done
    resumed_from: int                                # 0 for a fresh run
    history: list[dict[str, float]] = field(default_factory=list)   # one entry per step
    seconds: float = 0.0                             # wall time of this call

    def mean(self, key: str, first: int | None = None, last: int | None = None) -> float:
        """Mean of ``key`` over the first or last ``n`` steps of the history."""
        rows = self.history[:first] if first is not None else self.history
        rows = rows[-last:] if last is not None else rows
        values = [r[key] for r in rows if key in r]
        if not values:
            raise TrainingError(f"no {key!r} values in the history of stage {self.name}")
        return float(np.mean(values))


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_stage_state(out_dir: Path, name: str) -> dict | None:
    """The saved state of stage ``name`` under ``out_dir``, or None when there is none."""
    path = Path(out_dir) / name / STATE_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise TrainingError(f"cannot read the checkpoint {path}: {exc}") from exc


def run_stage(name: str, total_steps: int, step_fn: StepFn, modules: dict[str, nn.Module],
              optimizers: dict[str, torch.optim.Optimizer], out_dir: str | Path, seed: int,
              save_every: int = 100, resume: bool = True, progress: bool = True,
              log_every: int = 10) -> StageResult:
    """Run ``step_fn`` until ``total_steps`` steps are done, checkpointing and resuming as described above."""
    if total_steps < 0 or save_every < 1:
        raise TrainingError(f"total_steps must be >= 0 and save_every >= 1, got {total_steps}, {save_every}")
    out = Path(out_dir)
    state_path = out / name / STATE_FILE
    start, history = 0, []
    saved = load_stage_state(out, name) if resume else None
    if saved is not None:
        missing = (set(modules) - set(saved["modules"])) | (set(optimizers) - set(saved["optimizers"]))
        if missing:
            raise TrainingError(f"{state_path} does not hold {sorted(missing)}: it is from another stage")
        for key, module in modules.items():
            try:
                module.load_state_dict(saved["modules"][key])
            except RuntimeError as exc:
                raise TrainingError(f"{state_path}: module {key!r} does not match this configuration: {exc}") from exc
        for key, opt in optimizers.items():
            opt.load_state_dict(saved["optimizers"][key])
        start, history = int(saved["step"]), list(saved["history"])
    t0 = time.perf_counter()

    def save(step: int) -> None:
        _save(state_path, {"step": step, "history": history,
                           "modules": {k: m.state_dict() for k, m in modules.items()},
                           "optimizers": {k: o.state_dict() for k, o in optimizers.items()}})

    bar = None
    if progress and start < total_steps:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    log_path = out / name / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        for step in range(start, total_steps):
            for m in modules.values():
                m.train()
            gen = torch.Generator().manual_seed(step_seed(seed, step))
            metrics = {k: float(v) for k, v in step_fn(step, gen).items()}
            if not all(math.isfinite(v) for v in metrics.values()):
                save(step)   # keep the last good state
                raise TrainingError(f"stage {name}: non-finite metrics at step {step}: {metrics}")
            history.append(metrics)
            if step % log_every == 0 or step == total_steps - 1:
                log.write(json.dumps({"step": step, **metrics}) + "\n")
                log.flush()
            if bar is not None:
                bar.update(1)
                if step % log_every == 0:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if (step + 1) % save_every == 0 and step + 1 < total_steps:
                save(step + 1)
    if bar is not None:
        bar.close()
    if start < total_steps or saved is None:
        save(total_steps)
    for m in modules.values():
        m.eval()
    return StageResult(name=name, steps=total_steps, resumed_from=start, history=history,
                       seconds=time.perf_counter() - t0)
