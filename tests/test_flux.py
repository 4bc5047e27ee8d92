"""FLUX's embedded guidance through the method: a tiny `FluxTransformer2DModel` (guidance_embeds, packed latents) runs
both stages' steps, and the guidance scale reaches every network of them."""

import copy

import pytest
import torch

from diffusers_disback.distill import (
    BacktrackingSchedule,
    BacktrackingStep,
    DegradationStep,
    FlowSchedule,
    OptimizerUpdate,
    Score,
    one_step_sample,
)
from diffusers_disback.testing import get_tiny_flux_transformer
from diffusers_disback.training.flux import flux_flow_fn, with_guidance


class GuidanceSpy:
    """Records the embedded guidance of every forward of the modules it is attached to."""

    def __init__(self, **modules):
        self.seen = {name: [] for name in modules}
        for name, module in modules.items():
            module.register_forward_pre_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.seen[name].append(kwargs["guidance"].detach().clone())

        return hook


def _cond(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cond = {
        "prompt_embeds": torch.randn(batch, 6, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
    }
    return with_guidance(cond, 3.5)


def test_flux_velocity_uses_the_embedded_guidance():
    teacher = get_tiny_flux_transformer().eval()
    v = flux_flow_fn(teacher)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.5)
    a, b = v(x, sigma, _cond(2)), v(x, sigma, {**_cond(2), "guidance": torch.full((2,), 1.0)})
    assert a.shape == x.shape and a.dtype == torch.float32
    assert (a - b).abs().max() > 1e-4  # the scale changes the prediction: it is an input, not a no-op
    cond = _cond(2)
    del cond["guidance"]
    with pytest.raises(ValueError, match="with_guidance"):
        v(x, sigma, cond)


def test_both_stages_on_a_flux_transformer():
    """Stage 1's denoising update and stage 2's DM and fake-score updates run on FLUX's packed latents, the guidance
    of 3.5 goes to the generator, the degrading score, the teacher and the fake score on every call, and each trained
    network moves."""
    torch.manual_seed(0)
    teacher = get_tiny_flux_transformer().eval().requires_grad_(False)
    generator, degrading, fake = (copy.deepcopy(teacher).requires_grad_(True) for _ in range(3))
    spy = GuidanceSpy(teacher=teacher, generator=generator, degrading=degrading, fake=fake)
    flow = FlowSchedule()
    rng = torch.Generator().manual_seed(0)

    def generate(net):
        return lambda z, cond: one_step_sample(flux_flow_fn(net), z, cond, flow, 1.0)

    def batch():
        return _cond(2), torch.randn(2, 4, 8, 8, generator=rng)

    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in (("generator", generator),
              ("degrading", degrading), ("fake", fake))}  # fmt: skip
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in
            (("degrading", degrading), ("generator", generator), ("fake_score", fake))}  # fmt: skip
    params = {name: [p for g in o.param_groups for p in g["params"]] for name, o in opts.items()}
    update = OptimizerUpdate(opts, params)
    stage1 = DegradationStep(generate(teacher), Score(flux_flow_fn(degrading), flow), update, rng)
    for _ in range(2):
        assert torch.isfinite(stage1(batch())["loss"])
    schedule = BacktrackingSchedule(num_nodes=1, backtrack_interval=10)
    target = Score(flux_flow_fn(teacher), flow)
    stage2 = BacktrackingStep(
        generate(generator), Score(flux_flow_fn(fake), flow), lambda cond: (target, 1.0), schedule, update, rng,
        fake_score_update_ratio=2,
    )  # fmt: skip
    logs = [stage2(i, batch()) for i in range(4)]
    assert sum("generator_loss" in log for log in logs) == 2 and all(torch.isfinite(log["fake_loss"]) for log in logs)
    assert update.updates == {"degrading": 2, "generator": 2, "fake_score": 4}
    for name, module in (("generator", generator), ("degrading", degrading), ("fake", fake)):
        assert any(not torch.equal(a, p) for a, p in zip(before[name], module.parameters())), name
    for name, calls in spy.seen.items():
        assert calls and all(torch.equal(g, torch.full((2,), 3.5)) for g in calls), name
