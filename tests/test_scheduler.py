"""DisBackScheduler, in the spirit of diffusers' SchedulerCommonTest."""

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, LCMScheduler

from diffusers_disback import DisBackScheduler, disback_timesteps
from diffusers_disback.testing import SDXL_SCHEDULER_CONFIG


def _sample(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "steps, expected",
    [
        (1, [399]),
        (2, [999, 499]),
        (4, [999, 749, 499, 249]),
        (3, [999, 666, 333]),
    ],
)
def test_timesteps_rule(steps, expected):
    s = DisBackScheduler()
    s.set_timesteps(steps)
    assert s.timesteps.tolist() == expected
    assert s.num_inference_steps == steps
    assert disback_timesteps(steps) == expected


def test_many_steps_cover_the_schedule_and_match_lcm():
    s = DisBackScheduler()
    s.set_timesteps(1000)
    assert s.timesteps.tolist() == list(range(999, -1, -1))
    lcm = LCMScheduler.from_config(s.config, original_inference_steps=1000)
    for n in (2, 3, 4, 5, 6, 7, 8, 9, 25, 37):
        s.set_timesteps(n)
        lcm.set_timesteps(n)
        assert s.timesteps.tolist() == lcm.timesteps.tolist(), n


def test_conditioning_timestep_is_configurable():
    s = DisBackScheduler(conditioning_timestep=500)
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [500]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "positive integer"),
        ({"num_inference_steps": 1001}, "cannot exceed"),
        ({}, "either"),
        ({"num_inference_steps": 1, "timesteps": [399]}, "only one"),
        ({"timesteps": [499, 999]}, "strictly decreasing"),
        ({"timesteps": [999, 999]}, "strictly decreasing"),
        ({"timesteps": [1000, 10]}, r"\[0, 999\]"),
        ({"timesteps": [-1]}, r"\[0, 999\]"),
        ({"timesteps": []}, "empty"),
    ],
)
def test_set_timesteps_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DisBackScheduler().set_timesteps(**kwargs)


def test_custom_timesteps():
    s = DisBackScheduler()
    s.set_timesteps(timesteps=torch.tensor([800, 400, 100]))
    assert s.timesteps.tolist() == [800, 400, 100] and s.custom_timesteps and s.num_inference_steps == 3


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        DisBackScheduler(prediction_type="flow")
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        DisBackScheduler(beta_schedule="cosine-ish")
    with pytest.raises(ValueError, match="conditioning_timestep"):
        DisBackScheduler(conditioning_timestep=1000)


def test_one_step_epsilon_is_x0_formula():
    s = DisBackScheduler()
    s.set_timesteps(1)
    x, eps = _sample(0), _sample(1)
    a = s.alphas_cumprod[399]
    out = s.step(eps, 399, x)
    expected = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(out.prev_sample, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.pred_original_sample, expected, rtol=0, atol=1e-6)
    # hand-computed alpha_bar_399 of SDXL's scaled_linear schedule
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert abs(float(a) - float(torch.prod(1 - betas[:400]))) < 1e-6


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_parameterisations(prediction_type):
    s = DisBackScheduler(prediction_type=prediction_type)
    s.set_timesteps(1)
    x, out = _sample(0), _sample(1)
    a = s.alphas_cumprod[399]
    expected = out if prediction_type == "sample" else a.sqrt() * x - (1 - a).sqrt() * out
    torch.testing.assert_close(s.step(out, 399, x).prev_sample, expected, rtol=0, atol=1e-6)


def test_multistep_renoises_with_callers_generator():
    s = DisBackScheduler()
    s.set_timesteps(4)
    x, eps = _sample(0), _sample(1)
    out = s.step(eps, 999, x, generator=torch.Generator().manual_seed(7))
    a, a_next = s.alphas_cumprod[999], s.alphas_cumprod[749]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.prev_sample, a_next.sqrt() * x0 + (1 - a_next).sqrt() * noise, rtol=0, atol=1e-5)
    assert s.step_index == 1
    # walk to the end: the last step returns x0 itself
    for t in s.timesteps[1:]:
        last = s.step(eps, t, x, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(eps, 249, x)


def test_step_equals_lcm_at_dmd2_timesteps():
    s = DisBackScheduler()
    lcm = LCMScheduler.from_config(s.config, original_inference_steps=1000)
    s.set_timesteps(4)
    lcm.set_timesteps(4)
    x, eps = _sample(0), _sample(1)
    for t in s.timesteps:
        a = s.step(eps, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        b = lcm.step(eps, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def test_return_tuple_and_dtype():
    s = DisBackScheduler()
    s.set_timesteps(1)
    x, eps = _sample(0).half(), _sample(1).half()
    prev, x0 = s.step(eps, torch.tensor(399), x, return_dict=False)
    assert prev.dtype == torch.float16 and x0.dtype == torch.float16
    assert s.scale_model_input(x, 399) is x and s.init_noise_sigma == 1.0


def test_step_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="set_timesteps"):
        DisBackScheduler().step(_sample(1), 399, _sample(0))


def test_add_noise_matches_ddpm():
    s = DisBackScheduler()
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x, n, t = _sample(0), _sample(1), torch.tensor([10, 900])
    torch.testing.assert_close(s.add_noise(x, n, t), ddpm.add_noise(x, n, t))
    assert len(s) == 1000


def test_save_load_round_trip(tmp_path):
    s = DisBackScheduler(conditioning_timestep=300, prediction_type="v_prediction")
    s.save_pretrained(tmp_path)
    loaded = DisBackScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(s.config)
    s.set_timesteps(1)
    loaded.set_timesteps(1)
    x, eps = _sample(0), _sample(1)
    torch.testing.assert_close(s.step(eps, 300, x).prev_sample, loaded.step(eps, 300, x).prev_sample, rtol=0, atol=0)


def test_from_sdxl_scheduler_config():
    euler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    s = DisBackScheduler.from_config(euler.config)
    s.set_timesteps(4)  # SDXL's "leading" spacing and steps_offset must not leak in
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(s.alphas_cumprod, euler.alphas_cumprod)
    assert s.config.conditioning_timestep == 399
    # and back to a stock scheduler
    assert isinstance(LCMScheduler.from_config(s.config), LCMScheduler)
    assert "LCMScheduler" in [c.__name__ for c in s.compatibles]
