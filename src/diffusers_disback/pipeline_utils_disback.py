# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# Shared by the DisBack pipeline files. It travels with them as remote code (next to `pipeline.py`,
# `pipeline_img2img.py`, `pipeline_inpaint.py` and `scheduling_disback.py`; see `write_disback_layout`), so it imports
# nothing of `diffusers_disback` but its sibling `scheduling_disback.py`.
"""What every DisBack pipeline shares: loading with a `DisBackScheduler`, the execution-device shortcut, and for the
editing pipelines the strength rule and the steps around diffusers' SDXL img2img / inpaint `__call__`."""

import importlib
import os

import torch

from .scheduling_disback import DisBackScheduler, disback_timesteps


def disback_editing_timesteps(
    strength: float,
    num_inference_steps: int = 1,
    conditioning_timestep: int = 399,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """
    The timesteps an editing call samples at: the DisBack timesteps of `num_inference_steps` whose noise level is
    within `strength`, i.e. each grid timestep `t` with `(t + 1) / num_train_timesteps <= strength`.

    The generator is only ever run at timesteps it was trained at: the grid is [`disback_timesteps`] of
    `num_inference_steps` (`1 -> [399]`, `2 -> [999, 499]`, `4 -> [999, 749, 499, 249]`), and strength only decides
    where on that grid the edit starts. The input is noised to the first returned timestep (by the pipeline). A grid
    timestep `t` "costs" strength `(t + 1) / T`: 999 -> 1, 749 -> 0.75, 499 -> 0.5, 399 -> 0.4, 249 -> 0.25.

    - `strength == 0`: `[]`, no denoising (the pipelines return the input's latents decoded).
    - `strength == 1`: the whole grid (the pipelines start from pure noise: text-to-image).
    - otherwise: the grid timesteps `t` with `t + 1 <= strength * T`. One step at any strength in `[0.4, 1)` is
      `[399]`: 399 is the only timestep a one-step generator was trained at. A strength below the last grid
      timestep's (one step below 0.4, four steps below 0.25) raises a `ValueError` that says what to change.

    For `N` steps with `N` dividing `T` (1, 2, 4, 5, ...) this keeps the last `int(N * strength)` grid timesteps,
    which is diffusers' own img2img rule applied to the DisBack grid.

    Examples:
        >>> disback_editing_timesteps(0.5)
        [399]
        >>> disback_editing_timesteps(0.5, 4)
        [499, 249]
        >>> disback_editing_timesteps(1.0, 4)
        [999, 749, 499, 249]
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"`strength` must lie in [0, 1], got {strength}.")
    grid = disback_timesteps(num_inference_steps, conditioning_timestep, num_train_timesteps=num_train_timesteps)
    if strength == 0:
        return []
    if strength == 1:
        return grid
    steps = [t for t in grid if t + 1 <= strength * num_train_timesteps + 1e-6]
    if not steps:
        lowest = grid[-1]
        raise ValueError(
            f"strength {strength} lies below every timestep the generator is sampled at with "
            f"num_inference_steps={num_inference_steps} ({grid}; timestep t needs strength >= (t + 1) / "
            f"{num_train_timesteps}). Use strength >= {(lowest + 1) / num_train_timesteps}, more steps "
            "(num_inference_steps=4 reaches down to strength 0.25), strength=0 to return the input, or explicit "
            "`timesteps=[...]` (off the trained grid)."
        )
    return steps


class DisBackMixin:
    """Loading and the execution device of every DisBack pipeline (put it before the diffusers pipeline class)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads from a Hub repo id or a local folder (e.g. one written by `DisBackPipeline.save_pretrained`), as
        [`DiffusionPipeline.from_pretrained`]. The scheduler the repo names (the stock `LCMScheduler` of a DisBack
        repo, or SDXL base's `EulerDiscreteScheduler` when you load the base model and pass `unet=`) is replaced by a
        [`DisBackScheduler`] built from its config, unless you pass `scheduler=` yourself.
        """
        user_scheduler = "scheduler" in kwargs
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not user_scheduler and not isinstance(pipe.scheduler, DisBackScheduler):
            pipe.scheduler = DisBackScheduler.from_config(pipe.scheduler.config)
        return pipe

    @property
    def _execution_device(self):
        # Same answer as `DiffusionPipeline._execution_device`, faster. diffusers probes every submodule of every
        # component with `hasattr` for offloading hooks on each call (measured 5.7 ms a call on the tiny components,
        # several times that at SDXL size): a one-step pipeline pays it once per image. Looking the hook attributes
        # up in each module's `__dict__` costs a sixth of that; only when a hook exists do we defer to diffusers.
        for component in self.components.values():
            if isinstance(component, torch.nn.Module) and any(
                "_hf_hook" in m.__dict__ or "_diffusers_hook" in m.__dict__ for m in component.modules()
            ):
                return super()._execution_device
        return self.device


class DisBackEditingMixin(DisBackMixin):
    """What `DisBackImg2ImgPipeline` and `DisBackInpaintPipeline` share around diffusers' SDXL editing pipelines."""

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        r"""
        Builds the pipeline from another one's components without copying them, as [`DiffusionPipeline.from_pipe`];
        a scheduler other than a [`DisBackScheduler`] is replaced by one built from its config, unless you pass
        `scheduler=` yourself.
        """
        user_scheduler = "scheduler" in kwargs
        pipe = super().from_pipe(pipeline, **kwargs)
        if not user_scheduler and not isinstance(pipe.scheduler, DisBackScheduler):
            pipe.scheduler = DisBackScheduler.from_config(pipe.scheduler.config)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        r"""
        Saves the components in the DisBack layout, the folder `DisBackPipeline.save_pretrained` writes (which every
        DisBack pipeline, plain `StableDiffusionXLPipeline` and the remote code load). Keyword arguments are those of
        `DisBackPipeline.save_pretrained`. Needs the `diffusers_disback` package.
        """
        try:
            module = importlib.import_module("diffusers_disback.pipeline_disback")
        except ImportError as e:
            raise ImportError(
                "Saving in the DisBack layout needs the `diffusers_disback` package: `pip install diffusers_disback`."
                " Without it, load the text-to-image remote code (`custom_pipeline=<repo>`) and save that."
            ) from e
        module.DisBackPipeline.from_pipe(self, scheduler=self.scheduler).save_pretrained(save_directory, **kwargs)

    def get_timesteps(self, num_inference_steps, strength, device, denoising_start=None):
        # `__call__` has already chosen the timesteps by the DisBack strength rule and set them on the scheduler:
        # keep them all (diffusers' rule would keep only the last `int(num_inference_steps * strength)`).
        if denoising_start is None and getattr(self, "_disback_timesteps_chosen", False):
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(0)
            return self.scheduler.timesteps, len(self.scheduler.timesteps)
        return super().get_timesteps(num_inference_steps, strength, device, denoising_start=denoising_start)

    def _batch_size(self, prompt, prompt_embeds, num_images_per_prompt):
        if isinstance(prompt, str):
            n = 1
        elif isinstance(prompt, list):
            n = len(prompt)
        elif prompt_embeds is not None:
            n = prompt_embeds.shape[0]
        else:
            n = 1
        return n * (num_images_per_prompt or 1)

    def _latents_dtype(self):
        # the dtype `encode_prompt` gives the prompt embeddings, which the parent uses for the latents
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

    def _decode(self, latents: torch.Tensor, output_type: str):
        # the tail of diffusers' SDXL img2img / inpaint `__call__` (before inpaint's crop overlay)
        if output_type == "latent":
            return latents
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        latents_mean = getattr(self.vae.config, "latents_mean", None)
        latents_std = getattr(self.vae.config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            latents_mean = torch.tensor(latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents_std = torch.tensor(latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * latents_std / self.vae.config.scaling_factor + latents_mean
        else:
            latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)
