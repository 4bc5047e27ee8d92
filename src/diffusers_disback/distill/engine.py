"""The method's training steps, written once: what the SDXL training script and the benchmarks both run.

In the style of EDM's `training/loss.py` + `training_loop.py`: the losses are in [`losses`](losses.py); here are
the two steps that use them, written against small interfaces so that nothing here knows about SDXL, accelerate or
FSDP:

- a *score* is a [`Score`]; the *generator* is a callable `(z, cond) -> x0` (the one-step sample, differentiable);
- a *batch* is `(cond, z)`;
- an *update* is a callable `update(name, loss) -> applied` supplied by the caller, which does backward, clipping and
  the optimizer step of the network `name` (`"degrading"`, `"generator"`, `"fake_score"`). [`OptimizerUpdate`] is
  the plain-PyTorch one; the training script passes one built on `accelerator.backward`;
- *autocast* is a context-manager factory (`accelerator.autocast`, or `contextlib.nullcontext`).

The update order of stage 2 is the reference code's (DMD2 and DisBack `train_sd.py`), documented with the paper's
equations in docs/method.md ("The update order"): on iteration `i` (0-based) one batch is drawn and the generator
samples it; if `i % r == 0` the generator is updated first (Eq. 8 against the current target), then the fake score is
updated on the *same* samples, detached (Eq. 7); the backtracking schedule then counts the iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .backtracking import BacktrackingSchedule
from .losses import denoising_score_matching_loss, distribution_matching_step
from .scores import Score

Batch = tuple[Any, torch.Tensor]  # (cond, z)
GenerateFn = Callable[[torch.Tensor, Any], torch.Tensor]  # (z, cond) -> x0
UpdateFn = Callable[[str, torch.Tensor], bool]  # (network name, loss) -> whether the update was applied


class GanTerm(Protocol):
    """
    DMD2's optional GAN term (a discriminator head on the fake score's features). The SDXL implementation is
    `diffusers_disback.training.SDXLGanTerm`.
    """

    generator_weight: float

    def score_loss(self, x0: torch.Tensor, cond: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The score network's loss with the discriminator's: Eq. 7 on `x0` (detached) + weighted D loss."""

    def generator_loss(self, x0: torch.Tensor, cond: Any) -> torch.Tensor:
        """The generator's non-saturating GAN loss on its (differentiable) samples `x0`, unweighted."""


# ----------------------------------------------------------------------------------------------------- updates


def make_optimizer(params, lr: float, config) -> torch.optim.Optimizer:
    """AdamW with the config's betas, weight decay and epsilon (bitsandbytes' 8-bit AdamW when `use_8bit_adam`)."""
    cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        cls = bnb.optim.AdamW8bit
    return cls(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def make_lr_scheduler(optimizer, config, num_iterations: int, num_processes: int = 1):
    """
    `config.lr_scheduler` over `num_iterations` loop iterations with `config.lr_warmup_steps` of warm-up, stepped
    once per iteration. Counts are multiplied by the processes because a scheduler prepared by accelerate advances
    once per process on each call (diffusers' convention).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=num_iterations * num_processes,
    )


@dataclass
class OptimizerUpdate:
    """
    `update(name, loss)` for plain PyTorch: zero the gradients, `backward`, clip to `max_grad_norm` (0: off), step.
    `backward` and `clip` may be replaced (the training script passes accelerate's); `finite(name, loss)` decides
    whether to apply an update (default: always).
    """

    optimizers: dict[str, torch.optim.Optimizer]
    params: dict[str, list[torch.nn.Parameter]]
    max_grad_norm: float = 0.0
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    clip: Callable[[str, list[torch.nn.Parameter], float], Any] = field(
        default=lambda name, params, max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)
    )
    finite: Callable[[str, torch.Tensor], bool] = field(default=lambda name, loss: True)
    updates: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str, loss: torch.Tensor) -> bool:
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)  # the generator's GAN term leaves gradients in the fake score
        if not self.finite(name, loss):
            return False
        self.backward(loss)
        if self.max_grad_norm > 0:
            self.clip(name, self.params[name], self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.updates[name] = self.updates.get(name, 0) + 1
        return True


# --------------------------------------------------------------------------------------------------- the steps


@dataclass
class DegradationStep:
    """
    Stage 1, one step: the frozen initial generator samples a batch and the degrading score `s_theta'` takes one
    denoising-score-matching update on its samples (Eq. 7), plus the discriminator's loss when `gan` is given.
    """

    generator: GenerateFn
    degrading: Score
    update: UpdateFn
    rng: torch.Generator
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    gan: GanTerm | None = None

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        cond, z = batch
        with torch.no_grad(), self.autocast():
            x0 = self.generator(z, cond)
        logs: dict[str, torch.Tensor] = {}
        with self.autocast():
            if self.gan is not None:
                loss, logs = self.gan.score_loss(x0, cond)
            else:
                loss = denoising_score_matching_loss(self.degrading, x0, cond, generator=self.rng)  # Eq. 7
        self.update("degrading", loss)
        return {"loss": loss.detach(), **logs}


@dataclass
class BacktrackingStep:
    """
    Stage 2, one iteration (Alg. 1 of the paper, in the reference code's order; docs/method.md, "The update order"):

    1. the generator samples the batch: `x0 = G(z, c)`;
    2. on every `r`-th iteration (`iteration % r == 0`), the generator takes the distribution-matching update toward
       the current target (Eq. 8; + `gan.generator_weight` times the GAN term);
    3. the fake score takes a denoising-score-matching update on the same `x0`, detached (Eq. 7; + the
       discriminator's loss);
    4. the backtracking schedule counts the iteration (the generator's DM distance drives the adaptive rule).

    Args:
        generator: `(z, cond) -> x0`, differentiable with respect to the generator's parameters.
        fake_score: the fake score `s_phi`, as trained by Eq. 7.
        target: `cond -> (score, guidance_scale)`: the current distribution-matching target of `schedule` (see
            [`target_score`]).
        schedule: the [`BacktrackingSchedule`] (ticked once per iteration).
        update: `update(name, loss) -> applied` for `"generator"` and `"fake_score"`.
        rng: the training noise (timesteps and noise of both losses).
        fake_score_update_ratio: `r`.
        min_step, max_step: the DM loss's timestep range.
        fake_score_dm: the fake score as the DM loss calls it (default `fake_score`): the SDXL script runs that pass
            in fp32 outside autocast, as DMD2 does.
        reduce: turns the local DM distance into the value every process agrees on (a mean over processes).
    """

    generator: GenerateFn
    fake_score: Score
    target: Callable[[Any], tuple[Score, float]]
    schedule: BacktrackingSchedule
    update: UpdateFn
    rng: torch.Generator
    fake_score_update_ratio: int = 5
    min_step: int = 20
    max_step: int = 980
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    gan: GanTerm | None = None
    fake_score_dm: Score | None = None
    reduce: Callable[[torch.Tensor], float] = field(default=lambda t: float(t))

    def __call__(self, iteration: int, batch: Batch) -> dict[str, Any]:
        cond, z = batch
        logs: dict[str, Any] = {}
        distance = None
        if iteration % self.fake_score_update_ratio == 0:
            target_node = self.schedule.target_node
            target, guidance_scale = self.target(cond)
            with self.autocast():
                x0 = self.generator(z, cond)
                loss_g, info = distribution_matching_step(  # Eq. 8
                    x0,
                    cond,
                    target,
                    self.fake_score_dm or self.fake_score,
                    guidance_scale=guidance_scale,
                    min_step=self.min_step,
                    max_step=self.max_step,
                    generator=self.rng,
                )
                if self.gan is not None:
                    loss_gan = self.gan.generator_loss(x0, cond)
                    logs["generator_gan_loss"] = loss_gan.detach()
                    loss_g = loss_g + self.gan.generator_weight * loss_gan
            self.update("generator", loss_g)
            distance = self.reduce(info["dm_distance"].detach().float())
            logs.update(
                generator_loss=loss_g.detach(),
                dm_distance=distance,
                grad_norm=info["grad_norm"],
                target_node=target_node,
            )
        else:
            with torch.no_grad(), self.autocast():
                x0 = self.generator(z, cond)
        x0 = x0.detach()
        with self.autocast():
            if self.gan is not None:
                loss_f, gan_logs = self.gan.score_loss(x0, cond)
                logs.update(gan_logs)
            else:
                loss_f = denoising_score_matching_loss(self.fake_score, x0, cond, generator=self.rng)  # Eq. 7
        self.update("fake_score", loss_f)
        logs["fake_loss"] = loss_f.detach()
        self.schedule.step(distance=distance)
        return logs


def generator_updates(iterations: int, fake_score_update_ratio: int) -> int:
    """Generator updates in the first `iterations` stage-2 iterations (on iterations 0, r, 2r, ...)."""
    return math.ceil(iterations / fake_score_update_ratio)
