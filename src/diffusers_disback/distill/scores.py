"""Scores: what every network of the method is, seen from the losses.

A *score* here is an epsilon-predicting network `eps(x_t, t, cond)`; the losses need its clean-sample estimate
`x0_hat(x_t, t, cond) = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)`, optionally with classifier-free guidance.
Nothing here knows about SDXL: `cond` is whatever the wrapped callable takes (a class label, a text embedding, a dict
of SDXL conditioning tensors), and the unconditional `cond` for CFG is given by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class NoiseSchedule:
    """
    The teacher's discrete DDPM schedule: `x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`, `t` in `[0, T)`.

    `alphas_cumprod` is kept in float64; every conversion below is computed in float32 or better and returned in the
    input's dtype.
    """

    alphas_cumprod: torch.Tensor

    @classmethod
    def ddpm(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
    ) -> NoiseSchedule:
        """SDXL's schedule by default (`scaled_linear`, beta 0.00085 -> 0.012, T = 1000), as diffusers computes it."""
        from diffusers import DDPMScheduler

        if beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
        return cls.from_scheduler(DDPMScheduler(num_train_timesteps, beta_start, beta_end, beta_schedule))

    @classmethod
    def from_scheduler(cls, scheduler) -> NoiseSchedule:
        """The schedule of any diffusers scheduler that has `alphas_cumprod` (DDPM, Euler, LCM, DisBack, ...)."""
        return cls(scheduler.alphas_cumprod.to(torch.float64))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[t.to(like.device).long()].to(torch.float32)
        abar = abar.reshape(-1, *([1] * (like.dim() - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, one `t` per sample."""
        a, s = self._coefficients(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, in float32."""
        a, s = self._coefficients(t, x_t)
        return (x_t.float() - s * eps.float()) / a

    def sample_timesteps(
        self,
        batch_size: int,
        min_step: int = 0,
        max_step: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """`t ~ U{min_step .. max_step}` (inclusive), one per sample; `max_step` defaults to `T - 1`."""
        max_step = self.num_train_timesteps - 1 if max_step is None else max_step
        if not 0 <= min_step <= max_step < self.num_train_timesteps:
            raise ValueError(
                f"need 0 <= min_step <= max_step < {self.num_train_timesteps}, got [{min_step}, {max_step}]"
            )
        t = torch.randint(min_step, max_step + 1, (batch_size,), generator=generator)
        return t.to(device) if device is not None else t


class Score:
    """
    An epsilon-predicting network seen as a score: `eps(x_t, t, cond)` and `x0(x_t, t, cond, guidance_scale)`.

    Args:
        eps_fn: `eps_fn(x_t, t, cond) -> eps` (an `nn.Module` or any callable; `t` is a long tensor of shape `(B,)`).
        schedule: the [`NoiseSchedule`] the network was trained with.
        uncond: the unconditional `cond` used for classifier-free guidance (e.g. zero embeddings, a null class).
        uncond_fn: the network that gives the unconditional branch; defaults to `eps_fn` itself. Intermediate path
            nodes were fine-tuned on conditional inputs only, so their own unconditional branch may be off: pass the
            teacher here to guide a node with the teacher's unconditional prediction.

    Example:
        ```py
        >>> schedule = NoiseSchedule.ddpm()
        >>> teacher = Score(teacher_unet_fn, schedule, uncond=null_cond)
        >>> x0_hat = teacher.x0(x_t, t, cond, guidance_scale=8.0)
        ```
    """

    def __init__(self, eps_fn: EpsFn, schedule: NoiseSchedule, uncond: Any = None, uncond_fn: EpsFn | None = None):
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.uncond = uncond
        self.uncond_fn = uncond_fn

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float = 1.0) -> torch.Tensor:
        """The (guided) noise prediction `eps_u + w (eps_c - eps_u)`; `w = 1` is the plain conditional one."""
        eps_c = self.eps_fn(x_t, t, cond)
        if guidance_scale == 1.0:
            return eps_c
        if self.uncond is None:
            raise ValueError("classifier-free guidance needs `uncond`: the unconditional cond of this score")
        eps_u = (self.uncond_fn or self.eps_fn)(x_t, t, self.uncond)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float = 1.0) -> torch.Tensor:
        """The clean-sample estimate `x0_hat(x_t)` in float32."""
        return self.schedule.x0_from_eps(x_t, self.eps(x_t, t, cond, guidance_scale), t)

    __call__ = eps


def one_step_sample(
    generator_fn: EpsFn,
    noise: torch.Tensor,
    cond: Any,
    schedule: NoiseSchedule,
    conditioning_timestep: int = 399,
) -> torch.Tensor:
    """
    One-step generation: `z ~ N(0, I)` is fed as `x_{t_c}` and the generator's x0 estimate is the sample
    (`t_c = 399` for DMD2/DisBack SDXL). Differentiable with respect to the generator's parameters.
    """
    t = torch.full((noise.shape[0],), conditioning_timestep, dtype=torch.long, device=noise.device)
    return schedule.x0_from_eps(noise, generator_fn(noise, t, cond), t)
