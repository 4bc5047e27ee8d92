"""Scores: what every network of the method is, seen from the losses.

A *score* here is a denoising network `pred(x_t, t, cond)` on a noise schedule; the losses need its clean-sample
estimate `x0_hat(x_t, t, cond)`, optionally with classifier-free guidance. Two schedules are known:

- [`NoiseSchedule`], the discrete DDPM schedule of SDXL: `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, integer
  `t in [0, T)`, epsilon prediction: `x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`;
- [`FlowSchedule`], the continuous rectified-flow schedule of SD3 and FLUX: `x_t = (1 - s) x0 + s eps`, `t = s`
  (sigma) in `[0, 1]`, velocity prediction `v = eps - x0` (or eps, or x0): `x0_hat = x_t - s v`.

Both give the losses the same few operations (`add_noise`, `x0_from_prediction`, `training_target`,
`sample_timesteps`, ...), so the losses, the path and the training steps never ask which one they have. Nothing here
knows about a model family: `cond` is whatever the wrapped callable takes (a class label, a text embedding, a dict of
SDXL or SD3 conditioning tensors, FLUX's embedded guidance), and the unconditional `cond` for CFG is given by the
caller. docs/method.md, "Flow-matching teachers", gives the equations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch

PredFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
EpsFn = PredFn  # the name of the DDPM era: an epsilon-predicting network is a `PredFn`

PREDICTION_TYPES = ("flow", "epsilon", "sample")
SIGMA_DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclass
class NoiseSchedule:
    """
    The teacher's discrete DDPM schedule: `x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`, `t` in `[0, T)`; the
    network predicts epsilon.

    `alphas_cumprod` is kept in float64; every conversion below is computed in float32 or better and returned in the
    input's dtype.
    """

    alphas_cumprod: torch.Tensor
    prediction_type = "epsilon"

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

    def describe(self) -> dict:
        """What this schedule is, for logs and manifests."""
        return {"schedule": "ddpm", "prediction_type": self.prediction_type, "T": self.num_train_timesteps}

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

    x0_from_prediction = x0_from_eps

    def eps_from_prediction(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise estimate of a prediction: the prediction itself."""
        return eps

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What denoising score matching regresses the network onto: `eps`."""
        return noise

    def timesteps_of(self, value: float, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`value` as the network's `t` for a batch: a long tensor of shape `(batch_size,)`."""
        return torch.full((batch_size,), int(value), dtype=torch.long, device=device)

    def timestep_grid(self, min_step: int, max_step: int, num: int) -> torch.Tensor:
        """`num` timesteps evenly spaced over `[min_step, max_step]`, rounded to integers."""
        return torch.linspace(min_step, max_step, num).round().long()

    def sampling_timesteps(self, num_inference_steps: int) -> list:
        """The deterministic sampler's grid from `T - 1` down, `num_inference_steps` points (0 is reached by the
        last step's x0 estimate)."""
        T = self.num_train_timesteps
        return torch.linspace(T - 1, 0, num_inference_steps + 1)[:-1].round().long().tolist()

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


def shift_sigmas(sigmas: torch.Tensor, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """
    The timestep shift of SD3 and FLUX, `sigma' = s sigma / (1 + (s - 1) sigma)` (static, SD3's `shift`), or with
    `mu` FLUX's exponential one, `sigma' = e^mu / (e^mu + 1/sigma - 1)` (which is the static shift with `s = e^mu`).
    Both fix 0 and 1. Apply it once: diffusers' `FlowMatchEulerDiscreteScheduler` shifts its training sigmas and
    again any `sigmas` passed to `set_timesteps`.
    """
    s = math.exp(mu) if mu is not None else float(shift)
    if s <= 0:
        raise ValueError(f"the shift must be positive, got {s}")
    sigmas = sigmas.double() if sigmas.dtype != torch.float64 else sigmas
    return s * sigmas / (1 + (s - 1) * sigmas)


@dataclass(frozen=True)
class SigmaDistribution:
    """
    How a loss draws its `sigma` on a [`FlowSchedule`]: `u ~ kind` on `[0, 1]` (`uniform`, or `logit_normal`:
    `sigmoid(N(mean, std))`, SD3's training default), then shifted once ([`shift_sigmas`], `shift` or `mu`), then
    placed in the loss's range `[lo, hi]` as `lo + (hi - lo) sigma`.
    """

    kind: str = "uniform"
    shift: float = 1.0
    mu: float | None = None
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self):
        if self.kind not in SIGMA_DISTRIBUTIONS:
            raise ValueError(f"sigma distribution must be one of {SIGMA_DISTRIBUTIONS}, got {self.kind!r}")
        if self.shift <= 0 or self.std <= 0:
            raise ValueError(f"shift and std must be positive, got shift={self.shift}, std={self.std}")

    def sample(self, n: int, lo: float = 0.0, hi: float = 1.0, generator: torch.Generator | None = None):
        """`n` sigmas in `[lo, hi]` (float64, on the CPU)."""
        if self.kind == "uniform":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        else:
            u = torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64))
        return lo + (hi - lo) * shift_sigmas(u, self.shift, self.mu)

    def describe(self) -> dict:
        out = {"kind": self.kind, "shift": self.shift, "mu": self.mu}
        if self.kind == "logit_normal":
            out.update(mean=self.mean, std=self.std)
        return out


@dataclass
class FlowSchedule:
    """
    The rectified-flow schedule of SD3/SD3.5 and FLUX: `x_t = (1 - sigma) x0 + sigma eps`, the network's `t` is
    `sigma` in `[0, 1]` (a float tensor; the model glue scales it, e.g. SD3's transformer takes `1000 sigma`).

    Args:
        prediction_type: `"flow"` (the velocity `v = eps - x0`, SD3 and FLUX), `"epsilon"` or `"sample"` (x0).
        sigma_distribution: the [`SigmaDistribution`] this schedule's losses draw `sigma` from. Each use gets its own
            schedule ([`with_distribution`]): the DM loss and the fake score share one, stage 1's denoising loss may have another.
        num_train_timesteps: `T`, the scale of the settings given as timesteps (`min_step = 20` is `sigma = 0.02`).
        inference_shift: the shift of the deterministic sampler's grid ([`sampling_timesteps`]), SD3's 3.0 for the
            teacher.
        precision: the dtype every conversion is computed in (float32, or float64).
    """

    prediction_type: str = "flow"
    sigma_distribution: SigmaDistribution = dataclasses.field(default_factory=SigmaDistribution)
    num_train_timesteps: int = 1000
    inference_shift: float = 1.0
    precision: torch.dtype = torch.float32

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    def with_distribution(self, sigma_distribution: SigmaDistribution) -> FlowSchedule:
        """This schedule with another sigma distribution for its losses."""
        return dataclasses.replace(self, sigma_distribution=sigma_distribution)

    def describe(self) -> dict:
        return {
            "schedule": "flow",
            "prediction_type": self.prediction_type,
            "sigma_distribution": self.sigma_distribution.describe(),
            "inference_shift": self.inference_shift,
        }

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.device, self.precision).reshape(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process `x_t = (1 - sigma) x0 + sigma eps`, one `sigma` per sample."""
        s = self._sigma(t, x0)
        return ((1 - s) * x0.to(self.precision) + s * noise.to(self.precision)).to(x0.dtype)

    def x0_from_prediction(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`x0_hat`: `x_t - sigma v` (flow), `(x_t - sigma eps) / (1 - sigma)` (epsilon) or the prediction (sample);
        float32."""
        s, x, p = self._sigma(t, x_t), x_t.to(self.precision), pred.to(self.precision)
        if self.prediction_type == "flow":
            x0 = x - s * p
        elif self.prediction_type == "epsilon":
            x0 = (x - s * p) / (1 - s).clamp_min(1e-4)
        else:
            x0 = p
        return x0.float()

    def eps_from_prediction(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise estimate: `x_t + (1 - sigma) v` (flow), the prediction (epsilon), `(x_t - (1 - sigma) x0) /
        sigma` (sample); float32."""
        s, x, p = self._sigma(t, x_t), x_t.to(self.precision), pred.to(self.precision)
        if self.prediction_type == "flow":
            eps = x + (1 - s) * p
        elif self.prediction_type == "epsilon":
            eps = p
        else:
            eps = (x - (1 - s) * p) / s.clamp_min(1e-4)
        return eps.float()

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What denoising score matching regresses the network onto: `eps - x0` (flow; the flow-matching loss of
        SD3's training), `eps` or `x0`."""
        if self.prediction_type == "flow":
            return noise.float() - x0.float()
        return noise if self.prediction_type == "epsilon" else x0

    def timesteps_of(self, value: float, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """`value` (a sigma) as the network's `t` for a batch: a float32 tensor of shape `(batch_size,)`."""
        return torch.full((batch_size,), float(value), dtype=torch.float32, device=device)

    def timestep_grid(self, min_step: int, max_step: int, num: int) -> torch.Tensor:
        """`num` sigmas evenly spaced over `[min_step / T, max_step / T]`."""
        T = self.num_train_timesteps
        return torch.linspace(min_step / T, max_step / T, num, dtype=torch.float32)

    def sampling_timesteps(self, num_inference_steps: int) -> list:
        """The Euler sampler's grid as SD3's pipeline gets it from `FlowMatchEulerDiscreteScheduler(shift=s)
        .set_timesteps(N)`: `N` points from 1 to `shift(1 / T)`, evenly spaced, then shifted once by
        `inference_shift` (the last step's x0 estimate reaches 0)."""
        s = self.inference_shift
        lowest = float(shift_sigmas(torch.tensor(1.0 / self.num_train_timesteps), s))
        grid = torch.linspace(1.0, lowest, num_inference_steps, dtype=torch.float64)
        return shift_sigmas(grid, s).tolist()

    def sample_timesteps(
        self,
        batch_size: int,
        min_step: int = 0,
        max_step: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """`sigma ~ sigma_distribution` in `[min_step / T, max_step / T]` (the whole `[0, 1]` by default), float32."""
        T = self.num_train_timesteps
        max_step = T if max_step is None else max_step
        if not 0 <= min_step <= max_step <= T:
            raise ValueError(f"need 0 <= min_step <= max_step <= {T}, got [{min_step}, {max_step}]")
        t = self.sigma_distribution.sample(batch_size, min_step / T, max_step / T, generator).float()
        return t.to(device) if device is not None else t


Schedule = Union[NoiseSchedule, FlowSchedule]


class Score:
    """
    A denoising network seen as a score: `predict(x_t, t, cond)` (guided) and `x0(x_t, t, cond, guidance_scale)`.

    Args:
        eps_fn: `eps_fn(x_t, t, cond) -> prediction` (an `nn.Module` or any callable): epsilon on a
            [`NoiseSchedule`] (`t` a long tensor of shape `(B,)`), the schedule's `prediction_type` on a
            [`FlowSchedule`] (`t` = sigma, a float tensor). Extra conditioning a family needs at every call (FLUX's
            embedded guidance) travels in `cond`.
        schedule: the schedule the network was trained with.
        uncond: the unconditional `cond` used for classifier-free guidance (zero embeddings for SDXL, the encoded
            empty prompt for SD3, a null class).
        uncond_fn: the network that gives the unconditional branch; defaults to `eps_fn` itself. Intermediate path
            nodes were fine-tuned on conditional inputs only, so their own unconditional branch may be off: pass the
            teacher here to guide a node with the teacher's unconditional prediction.

    Guidance is taken on the prediction, `p_u + w (p_c - p_u)`; every prediction type is affine in `x0_hat` at a
    fixed `x_t`, so this is the same guidance in x0 space.

    Example:
        ```py
        >>> schedule = NoiseSchedule.ddpm()
        >>> teacher = Score(teacher_unet_fn, schedule, uncond=null_cond)
        >>> x0_hat = teacher.x0(x_t, t, cond, guidance_scale=8.0)
        ```
    """

    def __init__(self, eps_fn: PredFn, schedule: Schedule, uncond: Any = None, uncond_fn: PredFn | None = None):
        self.eps_fn = eps_fn
        self.schedule = schedule
        self.uncond = uncond
        self.uncond_fn = uncond_fn

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float = 1.0) -> torch.Tensor:
        """The (guided) prediction `p_u + w (p_c - p_u)`; `w = 1` is the plain conditional one."""
        pred_c = self.eps_fn(x_t, t, cond)
        if guidance_scale == 1.0:
            return pred_c
        if self.uncond is None:
            raise ValueError("classifier-free guidance needs `uncond`: the unconditional cond of this score")
        pred_u = (self.uncond_fn or self.eps_fn)(x_t, t, self.uncond)
        return pred_u + guidance_scale * (pred_c - pred_u)

    eps = predict  # the prediction of an epsilon network on the DDPM schedule

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float = 1.0) -> torch.Tensor:
        """The clean-sample estimate `x0_hat(x_t)` in float32."""
        return self.schedule.x0_from_prediction(x_t, self.predict(x_t, t, cond, guidance_scale), t)

    __call__ = predict


def one_step_sample(
    generator_fn: PredFn,
    noise: torch.Tensor,
    cond: Any,
    schedule: Schedule,
    conditioning_timestep: float = 399,
) -> torch.Tensor:
    """
    One-step generation: `z ~ N(0, I)` is fed as `x_{t_c}` and the generator's x0 estimate is the sample
    (`t_c = 399` for DMD2/DisBack SDXL; `t_c = 1.0`, pure noise, on a flow schedule). Differentiable with respect to
    the generator's parameters.
    """
    t = schedule.timesteps_of(conditioning_timestep, noise.shape[0], noise.device)
    return schedule.x0_from_prediction(noise, generator_fn(noise, t, cond), t)
