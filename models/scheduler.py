"""Flow-matching Euler scheduler used by Live Avatar (4 steps, shift 3, no CFG).

The model predicts a flow-matching velocity ``v ~= noise - x0``. A latent at noise level ``sigma``
is ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and one Euler step moves it along ``v``:

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v

The sampling schedule reproduces the behaviour of the scheduler the reference pipelines use
(reference notes §3): the training grid ``t = 1..1000`` is shifted once to find ``sigma_max`` and
``sigma_min``; the inference grid is then a linspace between those two *shifted* end points in
timestep units, which is shifted a second time. Hence the low end is shifted twice and the last
sampling timestep is 8.93, not 0. With the defaults this gives

    timesteps [1000, 857.6923, 602.1506, 8.9286]
    sigmas    [1, 0.857692, 0.602151, 0.0089286, 0]

The values are derived here in float64 and stored as float32 tensors (what the model sees).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SchedulerConfigError(ValueError):
    """Raised for an invalid scheduler configuration or step index."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Flow-matching Euler schedule. Defaults are the Live Avatar inference settings.

    Attributes:
        num_train_timesteps: size of the training timestep grid (timestep = sigma * this).
        shift: sigma shift ``s' = shift * s / (1 + (shift - 1) * s)``.
        num_inference_steps: number of Euler steps (4 = one TPP denoising stage per step).
    """

    num_train_timesteps: int = 1000
    shift: float = 3.0
    num_inference_steps: int = 4

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise SchedulerConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not self.shift > 0:
            raise SchedulerConfigError(f"shift must be > 0, got {self.shift}")
        if self.num_inference_steps < 1:
            raise SchedulerConfigError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")

    @classmethod
    def tiny(cls) -> SchedulerConfig:
        """The schedule has no size: the CPU test preset is the real schedule."""
        return cls()


def shift_sigma(sigma: float, shift: float) -> float:
    """Time shift of a flow-matching noise level: ``shift * s / (1 + (shift - 1) * s)``."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def compute_schedule(config: SchedulerConfig) -> tuple[list[float], list[float]]:
    """Derive (timesteps, sigmas) in float64; ``len(sigmas) == len(timesteps) + 1`` (final 0 appended).

    1. Training grid: sigma_k = k / N for k = N..1, shifted once -> sigma_max (k = N), sigma_min (k = 1).
    2. Inference grid: ``num_inference_steps`` points evenly spaced (in timestep units) from
       sigma_max * N down to sigma_min * N, back to sigmas, shifted a second time.
    3. Timesteps = sigmas * N; a terminal sigma 0 is appended.
    """
    n = config.num_train_timesteps
    steps = config.num_inference_steps
    # 1. shifted end points of the training grid
    sigma_max = shift_sigma(n / n, config.shift)
    sigma_min = shift_sigma(1.0 / n, config.shift)
    # 2. evenly spaced in timestep units, shifted again
    t_hi, t_lo = sigma_max * n, sigma_min * n
    if steps == 1:
        grid = [t_hi]
    else:
        grid = [t_hi + (t_lo - t_hi) * i / (steps - 1) for i in range(steps)]
    sigmas = [shift_sigma(t / n, config.shift) for t in grid]
    # 3. timesteps and the terminal zero
    timesteps = [s * n for s in sigmas]
    return timesteps, sigmas + [0.0]


class FlowMatchScheduler:
    """Deterministic flow-matching Euler sampler (no stochastic re-noising, no CFG).

    ``timesteps[i]`` is the timestep fed to the model at step ``i`` (TPP stage ``i``); ``step``
    advances from ``sigmas[i]`` to ``sigmas[i + 1]``. The object is stateless: the step index is
    an explicit argument, so each TPP stage can own a copy and run only its own step.
    """

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        timesteps, sigmas = compute_schedule(self.config)
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)  # [steps]
        self.sigmas = torch.tensor(sigmas, dtype=torch.float32)  # [steps + 1]

    @property
    def num_steps(self) -> int:
        return self.config.num_inference_steps

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise SchedulerConfigError(f"step index must be an int, got {type(i).__name__}")
        if not 0 <= i < self.num_steps:
            raise SchedulerConfigError(f"step index {i} out of range [0, {self.num_steps})")
        return i

    def timestep(self, i: int) -> float:
        """Model timestep of step ``i`` as a Python float."""
        return float(self.timesteps[self._check_index(i)])

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        """One Euler step ``x + (sigma[i+1] - sigma[i]) * v``, computed in fp32, returned in x's dtype."""
        self._check_index(i)
        if x.shape != v.shape:
            raise SchedulerConfigError(f"latent shape {tuple(x.shape)} != velocity shape {tuple(v.shape)}")
        dt = self.sigmas[i + 1] - self.sigmas[i]  # fp32 scalar, negative
        out = x.float() + dt.to(x.device) * v.float()
        return out.to(x.dtype)

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Forward process for training: ``(1 - sigma) * x0 + sigma * noise``.

        ``sigma`` is a float or a tensor broadcastable against ``x0`` (e.g. ``[B, 1, 1, 1, 1]`` or
        ``[B, 1, T, 1, 1]`` for per-frame noise levels).
        """
        if x0.shape != noise.shape:
            raise SchedulerConfigError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
        return (1.0 - sigma) * x0 + sigma * noise

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity the model is trained to predict: ``noise - x0``."""
        return noise - x0
