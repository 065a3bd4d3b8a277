"""Flow-matching Euler scheduler: published schedule, update rule, forward process."""

import pytest
import torch

from models.scheduler import (
    FlowMatchScheduler,
    SchedulerConfig,
    SchedulerConfigError,
    compute_schedule,
)

pytestmark = pytest.mark.unit

# Printed from the reference's scheduler (reference notes §3); rounded there to ~7 digits.
PUBLISHED_TIMESTEPS = [1000.0, 857.6923, 602.1506, 8.9286]
PUBLISHED_SIGMAS = [1.0, 0.857692, 0.602151, 0.0089286, 0.0]


def test_schedule_matches_published_values():
    sched = FlowMatchScheduler(SchedulerConfig())
    assert sched.timesteps.dtype == torch.float32 and sched.sigmas.dtype == torch.float32
    assert sched.timesteps.tolist() == pytest.approx(PUBLISHED_TIMESTEPS, abs=2e-4)
    assert sched.sigmas.tolist() == pytest.approx(PUBLISHED_SIGMAS, abs=2e-6)
    # The last sampling timestep is not 0: sigma_min is shifted twice.
    assert sched.timestep(3) > 8.0


def test_schedule_closed_form_float64():
    """Independent closed form: the inverse shift of the inference grid is linear in i."""
    n, shift, steps = 1000, 3.0, 4
    timesteps, sigmas = compute_schedule(SchedulerConfig(n, shift, steps))

    def unshift(s):  # inverse of s' = k s / (1 + (k - 1) s)
        return s / (shift - (shift - 1.0) * s)

    lo = 3.0 * (1 / n) / (1 + 2.0 * (1 / n))  # sigma_min after the first shift
    expected_unshifted = [1.0 + (lo - 1.0) * i / (steps - 1) for i in range(steps)]
    assert [unshift(s) for s in sigmas[:-1]] == pytest.approx(expected_unshifted, rel=1e-12)
    assert timesteps == pytest.approx([s * n for s in sigmas[:-1]], rel=1e-12)
    assert sigmas[-1] == 0.0


def test_step_is_fp32_euler_and_keeps_dtype():
    sched = FlowMatchScheduler()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 4, 6, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 16, 3, 4, 6, generator=g).to(torch.bfloat16)
    for i in range(4):
        out = sched.step(x, v, i)
        assert out.dtype == torch.bfloat16
        dt = PUBLISHED_SIGMAS[i + 1] - PUBLISHED_SIGMAS[i]
        ref = (x.double() + dt * v.double()).to(torch.bfloat16)
        # fp32 math then one rounding to bf16: at most one bf16 ulp from the float64 reference
        diff = (out.float() - ref.float()).abs()
        ulp = ref.float().abs().clamp_min(1e-3) * 2**-7
        assert bool((diff <= ulp).all())


def test_four_steps_with_exact_velocity_recover_x0():
    """With the true velocity noise - x0, Euler on a straight path is exact: ends at x0."""
    sched = FlowMatchScheduler()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 16, 3, 4, 4, generator=g, dtype=torch.float64)
    x = sched.add_noise(x0, noise, 1.0)
    assert torch.equal(x, noise)
    for i in range(4):
        x = sched.step(x, FlowMatchScheduler.training_target(x0, noise), i)
        assert torch.allclose(x, sched.add_noise(x0, noise, float(sched.sigmas[i + 1])), atol=1e-6)
    assert torch.allclose(x, x0, atol=1e-6)


def test_add_noise_per_sample_sigma():
    x0 = torch.ones(2, 3)
    noise = torch.zeros(2, 3)
    sigma = torch.tensor([[0.25], [1.0]])
    out = FlowMatchScheduler.add_noise(x0, noise, sigma)
    assert torch.equal(out, torch.tensor([[0.75] * 3, [0.0] * 3]))


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True])
def test_bad_step_index(bad):
    sched = FlowMatchScheduler()
    x = torch.zeros(2)
    with pytest.raises(SchedulerConfigError, match="step index"):
        sched.step(x, x, bad)


def test_bad_config_and_shapes():
    with pytest.raises(SchedulerConfigError, match="shift"):
        SchedulerConfig(shift=0.0)
    with pytest.raises(SchedulerConfigError, match="num_inference_steps"):
        SchedulerConfig(num_inference_steps=0)
    with pytest.raises(SchedulerConfigError, match="velocity shape"):
        FlowMatchScheduler().step(torch.zeros(2), torch.zeros(3), 0)
    assert issubclass(SchedulerConfigError, ValueError)
