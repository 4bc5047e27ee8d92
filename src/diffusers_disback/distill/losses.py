"""The losses of DisBack, each a few lines that name the paper's equation.

Zhang et al., "Distribution Backtracking Builds A Faster Convergence Trajectory for Diffusion Distillation" (ICLR
2025), built on DMD2 (Yin et al., 2024). Eq. numbers refer to the DisBack paper.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .scores import Schedule, Score


def denoising_score_matching_loss(
    score: Score,
    x0: torch.Tensor,
    cond: Any,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Denoising score matching, Eq. 5 (teacher) / Eq. 7 (degradation and fake score):
    `t ~ U{0..T-1}, eps ~ N(0, I)`, `L = || s(x_t, t, c) - eps ||^2` (mean). On a flow schedule `t` is the schedule's
    sigma distribution and the target is the schedule's (`eps - x0` for velocity: the flow-matching loss). A `t` the
    caller passes is used as it is (never shifted again).

    `x0` is detached: this loss trains the score network, never the generator that made `x0`.
    """
    x0 = x0.detach()
    schedule = score.schedule
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    return F.mse_loss(score.predict(x_t, t, cond).float(), schedule.training_target(x0, noise, t).float())


def distribution_matching_gradient(x0: torch.Tensor, x0_target: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """
    The per-sample normalised distribution-matching direction of DMD2 (DisBack Eq. 8):
    `p_tgt = x0 - x0_hat_tgt`, `p_fake = x0 - x0_hat_fake`, `g = (p_tgt - p_fake) / mean_{C,H,W} |p_tgt|`.
    Descending along `g` moves `x0` toward the target's estimate and away from the fake score's.
    """
    x0, x0_target, x0_fake = x0.detach().float(), x0_target.detach().float(), x0_fake.detach().float()
    p_target = x0 - x0_target
    p_fake = x0 - x0_fake
    dims = tuple(range(1, x0.dim()))
    return torch.nan_to_num((p_target - p_fake) / p_target.abs().mean(dim=dims, keepdim=True))


def distribution_matching_loss(x0: torch.Tensor, x0_target: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """
    Distribution matching (Eq. 8, DMD2 form): `L_DM = 1/2 MSE(x0, stopgrad(x0 - g))`, so `dL/dx0 = g / numel`.

    `x0` carries the generator's graph; `x0_target` and `x0_fake` are the two scores' estimates at the same noised
    sample (no graph needed).
    """
    g = distribution_matching_gradient(x0, x0_target, x0_fake)
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - g))


def distribution_matching_step(
    x0: torch.Tensor,
    cond: Any,
    target: Score,
    fake: Score,
    guidance_scale: float = 1.0,
    min_step: int = 20,
    max_step: int = 980,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    Noises the generator's samples at `t ~ U{min_step..max_step}` (DMD2: 2%..98% of T; on a flow schedule, its sigma
    distribution over `[min_step / T, max_step / T]`), asks the target (with CFG)
    and the fake score (without) for their x0 estimates, and returns the Eq. 8 loss with diagnostics:
    `grad_norm` (mean |g|) and `dm_distance` (the RMS of `x0_hat_tgt - x0_hat_fake`: how far the generator is from
    the current target as the two scores see it, the path profile's measure at the generator's samples with the fake
    score standing in for the generator's distribution; docs/method.md, "The path profile").
    """
    schedule: Schedule = target.schedule
    t = schedule.sample_timesteps(x0.shape[0], min_step, max_step, generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    with torch.no_grad():
        x_t = schedule.add_noise(x0.detach(), noise, t)
        x0_target = target.x0(x_t, t, cond, guidance_scale=guidance_scale)
        x0_fake = fake.x0(x_t, t, cond)
        g = distribution_matching_gradient(x0, x0_target, x0_fake)
        info = {"grad_norm": g.abs().mean(), "dm_distance": (x0_target - x0_fake).pow(2).mean().sqrt()}
    return distribution_matching_loss(x0, x0_target, x0_fake), info


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss for the generator (DMD2): `softplus(-D(fake))` (mean)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    """GAN loss for the discriminator head (DMD2): `softplus(D(fake)) + softplus(-D(real))` (means)."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
