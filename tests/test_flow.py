"""The rectified-flow schedule of `diffusers_disback.distill`: hand-computed conversions, the timestep shift applied
exactly once, SD3's sampler reproduced, and the losses on a flow score."""

import math

import pytest
import torch

from diffusers_disback.distill import (
    FlowSchedule,
    NoiseSchedule,
    Score,
    SigmaDistribution,
    denoising_score_matching_loss,
    distribution_matching_step,
    one_step_sample,
    shift_sigmas,
)
from diffusers_disback.distill.profile import sample


def test_forward_process_and_conversions_by_hand():
    # x0 = 2, eps = -1, sigma = 0.25: x_t = 0.75 * 2 + 0.25 * (-1) = 1.25; v = eps - x0 = -3
    x0, eps, t = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0), torch.tensor([0.25])
    flow = FlowSchedule()
    x_t = flow.add_noise(x0, eps, t)
    assert torch.equal(x_t, torch.full_like(x0, 1.25))
    v = torch.full_like(x0, -3.0)
    assert torch.equal(flow.training_target(x0, eps, t), v)
    assert torch.equal(flow.x0_from_prediction(x_t, v, t), x0)  # 1.25 - 0.25 * (-3)
    assert torch.equal(flow.eps_from_prediction(x_t, v, t), eps)  # 1.25 + 0.75 * (-3)
    as_eps = FlowSchedule(prediction_type="epsilon")
    assert torch.allclose(as_eps.x0_from_prediction(x_t, eps, t), x0)  # (1.25 + 0.25) / 0.75
    assert torch.equal(as_eps.training_target(x0, eps, t), eps)
    as_x0 = FlowSchedule(prediction_type="sample")
    assert torch.equal(as_x0.x0_from_prediction(x_t, x0, t), x0)
    assert torch.allclose(as_x0.eps_from_prediction(x_t, x0, t), eps)  # (1.25 - 1.5) / 0.25
    assert torch.equal(as_x0.training_target(x0, eps, t), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        FlowSchedule(prediction_type="v_prediction")


def test_conversion_precision_float64():
    """`x0 = x_t - sigma v` is taken in the schedule's precision: bf16 inputs come back as float32 of the exact
    arithmetic, float64 keeps the last bits of a float32 input."""
    g = torch.Generator().manual_seed(0)
    x_t, v, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.9])
    exact = x_t.double() - t.double().view(-1, 1, 1, 1) * v.double()
    f64 = FlowSchedule(precision=torch.float64).x0_from_prediction(x_t, v, t)
    assert f64.dtype == torch.float32 and torch.equal(f64, exact.float())
    bf = FlowSchedule().x0_from_prediction(x_t.bfloat16(), v.bfloat16(), t)
    assert bf.dtype == torch.float32


def test_shift_by_hand_and_as_diffusers_computes_it():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    # s = 3: 0.25 -> 0.75 / 1.5 = 0.5; 0.5 -> 1.5 / 2 = 0.75; 0 and 1 are fixed
    assert shift_sigmas(s, 3.0).tolist() == [0.0, 0.5, 0.75, 1.0]
    # FLUX's exponential shift is the static one with s = e^mu
    assert torch.allclose(shift_sigmas(s, mu=math.log(3.0)), shift_sigmas(s, 3.0))
    assert torch.equal(shift_sigmas(s, 1.0), s.double())
    # diffusers bakes the static shift into its training sigmas: shift(linspace(1, 1/T, T))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = shift_sigmas(torch.linspace(1, 1 / 1000, 1000, dtype=torch.float64), 3.0)
    assert torch.allclose(sched.sigmas.double(), ours)
    with pytest.raises(ValueError, match="positive"):
        shift_sigmas(s, 0.0)


def test_sigma_distributions_shift_once_and_respect_the_range():
    n = 20000
    uniform = SigmaDistribution().sample(n, generator=torch.Generator().manual_seed(0))
    shifted = SigmaDistribution(shift=3.0).sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, shift_sigmas(uniform, 3.0))  # the same draws, shifted exactly once
    logit = SigmaDistribution("logit_normal", mean=0.0, std=1.0).sample(n, generator=torch.Generator().manual_seed(1))
    expected = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert torch.allclose(logit, expected)
    assert abs(float(logit.median()) - 0.5) < 0.02
    # the DM loss's range [min_step / T, max_step / T]: sigma = lo + (hi - lo) * shifted draw
    flow = FlowSchedule(sigma_distribution=SigmaDistribution(shift=3.0))
    t = flow.sample_timesteps(n, 20, 980, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and float(t.min()) >= 0.02 and float(t.max()) <= 0.98
    assert torch.allclose(t.double(), 0.02 + 0.96 * shift_sigmas(uniform, 3.0), atol=1e-6)
    assert float(t.median()) > 0.7  # shift 3 moves the median of U[0, 1] to 0.75
    with pytest.raises(ValueError, match="one of"):
        SigmaDistribution("normal")
    with pytest.raises(ValueError, match="min_step"):
        flow.sample_timesteps(2, 0, 1001)


class LinearFlow(torch.nn.Module):
    """A velocity network small enough to check by hand: `v = a * x_t + b * sigma + c * cond`."""

    def __init__(self, a=0.5, b=-1.0, c=0.25):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(float(x))) for x in (a, b, c))
        self.calls = []

    def forward(self, x_t, t, cond):
        self.calls.append(t.detach().clone())
        return self.a * x_t + self.b * t.view(-1, 1, 1, 1) + self.c * cond.view(-1, 1, 1, 1)


def test_denoising_loss_uses_a_given_sigma_as_it_is():
    """A sigma the caller passes is not shifted again, even on a shifted schedule."""
    net = LinearFlow()
    flow = FlowSchedule(sigma_distribution=SigmaDistribution(shift=3.0))
    x0, noise = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    t, cond = torch.tensor([0.25, 0.5]), torch.tensor([1.0, 0.0])
    loss = denoising_score_matching_loss(Score(net, flow), x0, cond, t=t, noise=noise)
    assert torch.equal(net.calls[-1], t)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise  # 1.25 and 0.5
    v = 0.5 * x_t - t.view(-1, 1, 1, 1) + 0.25 * cond.view(-1, 1, 1, 1)
    assert torch.allclose(loss, ((v - (noise - x0)) ** 2).mean())
    # drawn sigmas come from the schedule's (shifted) distribution, not a second shift of it
    denoising_score_matching_loss(Score(net, flow), x0, cond, generator=torch.Generator().manual_seed(3))
    drawn = SigmaDistribution(shift=3.0).sample(2, 0.0, 1.0, torch.Generator().manual_seed(3)).float()
    assert torch.allclose(net.calls[-1], drawn)


def test_one_step_sample_from_pure_noise():
    """On a flow schedule the student is fed pure noise at sigma = 1: `x0 = z - v(z, 1)`."""
    net = LinearFlow()
    z, cond = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, -1.0])
    x0 = one_step_sample(net, z, cond, FlowSchedule(), 1.0)
    assert torch.equal(net.calls[-1], torch.ones(2))
    assert torch.allclose(x0, z - (0.5 * z - 1.0 + 0.25 * cond.view(-1, 1, 1, 1)))


def test_sampler_is_sd3s_euler_sampler():
    """`profile.sample` on a flow schedule with `inference_shift=3` is SD3's `FlowMatchEulerDiscreteScheduler`
    loop, guidance included: the shift is applied once, as the stock pipeline applies it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    net = LinearFlow()
    uncond = torch.zeros(2)
    score = Score(net, FlowSchedule(inference_shift=3.0), uncond=uncond)
    z, cond = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, -1.0])
    ours = sample(score, z, cond, guidance_scale=4.0, num_inference_steps=6)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x = z.clone()
    for t in sched.timesteps:
        sigma = (t / 1000).expand(2)
        v_c, v_u = net(x, sigma, cond), net(x, sigma, uncond)
        x = sched.step(v_u + 4.0 * (v_c - v_u), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def test_distribution_matching_on_a_flow_score():
    """Eq. 8 on a flow teacher: zero distance when the fake score is the target, and the DM gradient pushes x0 along
    `x0_fake - x0_target` otherwise."""
    flow = FlowSchedule()
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cond = torch.ones(4)
    same = Score(LinearFlow(), flow)
    _, info = distribution_matching_step(x0, cond, same, same, generator=torch.Generator().manual_seed(1))
    assert float(info["dm_distance"]) == 0.0
    target, fake = Score(LinearFlow(c=0.25), flow), Score(LinearFlow(c=-0.25), flow)
    loss, info = distribution_matching_step(x0, cond, target, fake, generator=torch.Generator().manual_seed(1))
    loss.backward()
    # x0_target - x0_fake = -sigma * (v_target - v_fake) = -sigma * 0.5: the target's estimate is lower
    assert float(info["dm_distance"]) > 0 and float(x0.grad.sum()) > 0


def test_ddpm_schedule_is_unchanged():
    """The DDPM schedule's new names are the old operations (SDXL runs stay bit-identical)."""
    ddpm = NoiseSchedule.ddpm()
    assert ddpm.x0_from_prediction == ddpm.x0_from_eps
    noise = torch.randn(2, 4, 8, 8)
    assert ddpm.training_target(torch.zeros_like(noise), noise, torch.tensor([1, 2])) is noise
    t = ddpm.timesteps_of(399, 3)
    assert t.dtype == torch.long and t.tolist() == [399] * 3
    assert ddpm.sampling_timesteps(4) == [999, 749, 500, 250]
