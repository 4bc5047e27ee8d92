# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file is self-contained (it imports only torch, numpy and diffusers) so that it can be uploaded next to a
# model on the Hub and loaded as remote code by people who do not have `diffusers_disback` installed.
"""DisBackScheduler: the sampler of one-step (and few-step) generators distilled by DisBack / DMD2."""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class DisBackSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample to feed to the generator at the next timestep: the clean-sample prediction re-noised to the
            next timestep, or the clean-sample prediction itself after the last step.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The generator's clean-sample (x0) prediction at this step.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def disback_timesteps(
    num_inference_steps: int, conditioning_timestep: int = 399, num_train_timesteps: int = 1000
) -> list[int]:
    """
    The timesteps a DisBack / DMD2 generator is sampled at.

    One step feeds pure noise at the conditioning timestep (`[399]` for SDXL). `N > 1` steps are evenly spaced down
    from the last training timestep, `t_k = T - 1 - floor(k T / N)`, the rule DMD2's lists follow:
    `4 -> [999, 749, 499, 249]`, `2 -> [999, 499]`. (diffusers' `LCMScheduler` with `original_inference_steps=T`
    gives the same lists, which is what lets plain diffusers sample a DisBack repo without this package.)

    Examples:
        >>> disback_timesteps(1)
        [399]
        >>> disback_timesteps(4)
        [999, 749, 499, 249]
    """
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` ({num_inference_steps}) cannot exceed `num_train_timesteps` ({num_train_timesteps})."
        )
    if num_inference_steps == 1:
        return [int(conditioning_timestep)]
    return [
        num_train_timesteps - 1 - (k * num_train_timesteps) // num_inference_steps for k in range(num_inference_steps)
    ]


class DisBackScheduler(SchedulerMixin, ConfigMixin):
    r"""
    `DisBackScheduler` samples one-step and few-step generators trained by distribution-matching distillation
    (DisBack, DMD2) from an epsilon-predicting teacher.

    With one step, pure noise is fed to the generator at `conditioning_timestep` and the generator's x0 prediction is
    the image. With `N > 1` steps, the timesteps are evenly spaced down from `num_train_timesteps - 1`; after each
    step the x0 prediction is re-noised to the next timestep with fresh noise drawn from the caller's generator.

    This equals diffusers' [`LCMScheduler`] called with the same explicit `timesteps` (whose boundary-condition
    scalings are `c_skip ~ 1e-8`, `c_out = 1` at these timesteps), without the consistency-model boundary terms.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. Check the superclass documentation for the generic
    methods the library implements for all schedulers such as loading and saving.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The number of diffusion steps the teacher was trained with.
        beta_start (`float`, defaults to 0.00085):
            The starting `beta` value of the teacher's noise schedule.
        beta_end (`float`, defaults to 0.012):
            The final `beta` value of the teacher's noise schedule.
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            `"linear"` or `"scaled_linear"` (Stable Diffusion / SDXL).
        trained_betas (`np.ndarray` or `list[float]`, *optional*):
            Pass betas directly to the constructor to bypass `beta_start` and `beta_end`.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the generator predicts: `"epsilon"` (noise), `"sample"` (x0) or `"v_prediction"`.
        conditioning_timestep (`int`, defaults to 399):
            The timestep a one-step generator is conditioned on (DMD2 / DisBack SDXL use 399).

    Example:
        ```py
        >>> from diffusers_disback import DisBackScheduler

        >>> scheduler = DisBackScheduler()
        >>> scheduler.set_timesteps(1)
        >>> scheduler.timesteps
        tensor([399])
        >>> scheduler.set_timesteps(4)
        >>> scheduler.timesteps
        tensor([999, 749, 499, 249])
        ```
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        conditioning_timestep: int = 399,
    ):
        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        else:
            raise NotImplementedError(
                f"beta_schedule {beta_schedule!r} is not supported by {self.__class__.__name__}; "
                "use 'linear', 'scaled_linear' or pass `trained_betas`."
            )
        if len(self.betas) != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` has {len(self.betas)} entries but `num_train_timesteps` is {num_train_timesteps}."
            )
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; use 'epsilon', 'sample' or 'v_prediction'."
            )
        if not 0 <= conditioning_timestep < num_train_timesteps:
            raise ValueError(
                f"`conditioning_timestep` must lie in [0, {num_train_timesteps - 1}], got {conditioning_timestep}."
            )

        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

        # the generator is fed pure noise: no scaling of the initial sample
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self.timesteps = torch.tensor([conditioning_timestep], dtype=torch.int64)
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """The index of the current timestep in `timesteps`; it increases by one after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index of the first timestep, set by a pipeline with `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Sets the index of the first timestep (for pipelines that start mid-schedule)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The generator takes the sample unscaled; returns `sample` unchanged."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device = None,
        timesteps: list[int] | None = None,
    ):
        """
        Sets the timesteps to sample at.

        Args:
            num_inference_steps (`int`, *optional*):
                `1` gives `[conditioning_timestep]`; `N > 1` gives `N` timesteps evenly spaced down from
                `num_train_timesteps - 1` (`4 -> [999, 749, 499, 249]`); see [`disback_timesteps`].
            device (`str` or `torch.device`, *optional*):
                The device the timesteps are moved to.
            timesteps (`list[int]`, *optional*):
                Custom timesteps, strictly decreasing integers in `[0, num_train_timesteps)`. Mutually exclusive with
                `num_inference_steps`.
        """
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Pass either `num_inference_steps` or `timesteps` to `set_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass only one of `num_inference_steps` or `timesteps` to `set_timesteps`.")

        num_train_timesteps = self.config.num_train_timesteps
        if timesteps is not None:
            timesteps = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
            if len(timesteps) == 0:
                raise ValueError("`timesteps` must not be empty.")
            if any(t < 0 or t >= num_train_timesteps for t in timesteps):
                raise ValueError(
                    f"`timesteps` must lie in [0, {num_train_timesteps - 1}] (`num_train_timesteps` is "
                    f"{num_train_timesteps}), got {timesteps}."
                )
            if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"`timesteps` must be strictly decreasing, got {timesteps}.")
            self.custom_timesteps = True
        else:
            timesteps = disback_timesteps(
                num_inference_steps, self.config.conditioning_timestep, num_train_timesteps=num_train_timesteps
            )
            self.custom_timesteps = False

        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(timesteps, dtype=torch.int64, device=device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: int | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The position of `timestep` in the schedule (`self.timesteps` unless given)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"timestep {int(timestep)} is not in the schedule {schedule_timesteps.tolist()}; "
                "call `set_timesteps` with the timesteps you step through."
            )
        return indices[0].item()

    def _init_step_index(self, timestep: int | torch.Tensor):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _alpha_prod(self, timestep: int | torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[int(timestep)]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> DisBackSchedulerOutput | tuple:
        """
        Predicts x0 from the generator's output and, unless this is the last step, re-noises it to the next timestep.

        Args:
            model_output (`torch.Tensor`):
                The generator's output at `timestep` (noise, sample or v, by `prediction_type`).
            timestep (`int` or `torch.Tensor`):
                The current timestep, one of `self.timesteps`.
            sample (`torch.Tensor`):
                The generator's input at `timestep`.
            generator (`torch.Generator`, *optional*):
                The random number generator for the re-noising noise.
            return_dict (`bool`, defaults to `True`):
                Return a [`DisBackSchedulerOutput`] rather than a tuple `(prev_sample, pred_original_sample)`.
        """
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None': run `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError(
                f"`step` was called {self.step_index + 1} times for {len(self.timesteps)} timesteps; "
                "call `set_timesteps` again before sampling anew."
            )

        # x0 in float32, whatever the model's dtype (half-precision x0 loses detail at high noise levels)
        alpha_prod_t = self._alpha_prod(timestep).to(device=sample.device)
        beta_prod_t = 1 - alpha_prod_t
        x_t = sample.float()
        output = model_output.float()
        if self.config.prediction_type == "epsilon":
            pred_original_sample = (x_t - beta_prod_t.sqrt() * output) / alpha_prod_t.sqrt()
        elif self.config.prediction_type == "sample":
            pred_original_sample = output
        else:  # v_prediction
            pred_original_sample = alpha_prod_t.sqrt() * x_t - beta_prod_t.sqrt() * output

        next_index = self.step_index + 1
        if next_index < len(self.timesteps):
            alpha_prod_next = self._alpha_prod(self.timesteps[next_index]).to(device=sample.device)
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
            )
            prev_sample = alpha_prod_next.sqrt() * pred_original_sample + (1 - alpha_prod_next).sqrt() * noise
        else:
            prev_sample = pred_original_sample

        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        pred_original_sample = pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DisBackSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """The forward process: `x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise`."""
        alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        alpha_prod = alphas_cumprod[timesteps.to(original_samples.device).long()].flatten()
        while alpha_prod.dim() < original_samples.dim():
            alpha_prod = alpha_prod.unsqueeze(-1)
        return alpha_prod.sqrt() * original_samples + (1 - alpha_prod).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
