# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file travels as remote code (`pipeline.py` of a saved folder / Hub repo, see `write_disback_layout`) with its
# siblings `pipeline_utils_disback.py` and `scheduling_disback.py`, for people who do not have
# `diffusers_disback` installed:
#     DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id, trust_remote_code=True)
# Besides them it imports only the package's `checkpoints`, inside `from_unet_checkpoint` and relatively: run as
# remote code it has no such sibling, so it never reaches for an installed package.
"""DisBackPipeline: one-step text-to-image generation with an SDXL generator distilled by DisBack (or DMD2)."""

import os
from typing import Any, Callable

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils import logging, replace_example_docstring

from .pipeline_utils_disback import DisBackMixin
from .scheduling_disback import DisBackScheduler, disback_timesteps

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_disback import DisBackPipeline

        >>> pipe = DisBackPipeline.from_pretrained("your-name/disback-sdxl", torch_dtype=torch.float16).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step, no CFG

        >>> # four steps at [999, 749, 499, 249]
        >>> image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=4).images[0]

        >>> # a released raw UNet checkpoint (e.g. SDXL_DisBack.bin) on top of the SDXL base model
        >>> pipe = DisBackPipeline.from_unet_checkpoint(
        ...     "SDXL_DisBack.bin", base_model="stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16
        ... )
        ```
"""


class DisBackPipeline(DisBackMixin, StableDiffusionXLPipeline):
    r"""
    Text-to-image generation with a one-step SDXL generator distilled by DisBack (Distribution Backtracking) or DMD2.

    A [`StableDiffusionXLPipeline`] whose defaults are those of the distilled generator: one step at the conditioning
    timestep 399 from pure noise, no classifier-free guidance, and a [`DisBackScheduler`]. Everything else of the SDXL
    pipeline (prompt embeddings, negative prompts, `num_images_per_prompt`, latents, callbacks, LoRA and IP-Adapter
    loading, offloading) works unchanged.

    `save_pretrained` writes a folder that loads three ways: with this class, with plain
    `StableDiffusionXLPipeline.from_pretrained` (model_index.json names only stock classes), and with
    `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)` (this file and the
    files it imports are copied into the folder). The editing pipelines load from the same folder:
    `DisBackImg2ImgPipeline.from_pretrained(folder)`, or as remote code with `custom_pipeline="pipeline_img2img"`
    (`"pipeline_inpaint"`).

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        force_zeros_for_empty_prompt, add_watermarker:
            As in [`StableDiffusionXLPipeline`]. `unet` is the distilled generator. Any scheduler that accepts
            explicit `timesteps` works; without explicit `timesteps`, the pipeline passes the DisBack timesteps to a
            scheduler that is not a [`DisBackScheduler`].
    """

    @classmethod
    def from_unet_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        base_model: str | os.PathLike = "stabilityai/stable-diffusion-xl-base-1.0",
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        r"""
        Builds a pipeline from a released raw UNet checkpoint (e.g. DisBack's `SDXL_DisBack.bin` or a DMD2 UNet) and
        the other components of `base_model`.

        The checkpoint is read safely (`weights_only=True` for pickles; `.safetensors` as is), wrapper prefixes such as
        `module.`, `feedforward_model.` or `_orig_mod.` are stripped, and the weights are loaded strictly into a UNet
        with `base_model`'s UNet config: missing or unexpected keys raise an error that names them.

        Args:
            checkpoint (`str` or `os.PathLike`):
                A local `.bin`/`.pt`/`.safetensors` file, or `owner/repo/path/in/repo.bin` on the Hub.
            base_model (`str` or `os.PathLike`):
                The SDXL base model (Hub repo id or folder) that provides the UNet config, text encoders, tokenizers,
                VAE and scheduler config.
            torch_dtype (`torch.dtype`, *optional*):
                The dtype of every component.
            kwargs:
                Passed to [`~DisBackPipeline.from_pretrained`] (e.g. `variant`, `revision`, `vae=`).

        Requires the `diffusers_disback` package.
        """
        try:
            # a sibling only in the package (diffusers' remote-code loader fetches the files of `from .name import`
            # lines, not of `from . import name`)
            from . import checkpoints
        except ImportError as e:
            raise ImportError(
                "`from_unet_checkpoint` needs the `diffusers_disback` package: `pip install diffusers_disback`, then "
                "`diffusers_disback.DisBackPipeline.from_unet_checkpoint(...)`."
            ) from e
        unet = checkpoints.load_unet_checkpoint(
            checkpoint,
            config=base_model,
            torch_dtype=torch_dtype,
            revision=kwargs.get("revision"),
            checkpoint_revision=kwargs.pop("checkpoint_revision", None),
        )
        return cls.from_pretrained(base_model, unet=unet, torch_dtype=torch_dtype, **kwargs)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""
        Generates images; one step and no classifier-free guidance by default.

        Args:
            num_inference_steps (`int`, defaults to 1):
                `1` samples at the conditioning timestep (399); `N > 1` at `N` timesteps evenly spaced down from 999
                (`4 -> [999, 749, 499, 249]`), re-noising the x0 prediction between steps.
            timesteps (`list[int]`, *optional*):
                Explicit timesteps, strictly decreasing; overrides `num_inference_steps`.
            sigmas (`list[float]`, *optional*):
                For a sigma-based scheduler you set yourself; then the DisBack timesteps are not passed.
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; distilled generators are sampled without it (values <= 1 disable it).
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors; `{"scale": s}` scales loaded LoRA weights.
            prompt, prompt_2, height, width, denoising_end, negative_prompt, negative_prompt_2,
            num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
            output_type, return_dict, guidance_rescale, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size, clip_skip,
            callback_on_step_end, callback_on_step_end_tensor_inputs:
                As in [`StableDiffusionXLPipeline.__call__`]. `height` and `width` must be divisible by 8;
                `callback_on_step_end_tensor_inputs` defaults to `["latents"]`.
            kwargs:
                Passed on to [`StableDiffusionXLPipeline.__call__`] (deprecated `callback`, `callback_steps`).

        Examples:

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`: the images, as in [`StableDiffusionXLPipeline`].
        """
        if timesteps is None and sigmas is None and not isinstance(self.scheduler, DisBackScheduler):
            config = self.scheduler.config
            timesteps = disback_timesteps(
                num_inference_steps,
                config.get("conditioning_timestep", 399),
                num_train_timesteps=config.get("num_train_timesteps", 1000),
            )
        return super().__call__(
            prompt=prompt,
            prompt_2=prompt_2,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            denoising_end=denoising_end,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            **kwargs,
        )
