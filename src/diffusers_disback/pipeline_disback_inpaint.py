# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file travels as remote code (`pipeline_inpaint.py` of a saved folder / Hub repo, see `write_disback_layout`) with
# its siblings `pipeline_utils_disback.py` and `scheduling_disback.py`, and imports nothing of `diffusers_disback`
# but them, so that people who do not have the package installed can load it:
#     DiffusionPipeline.from_pretrained(repo_id, custom_pipeline="pipeline_inpaint", trust_remote_code=True)
"""DisBackInpaintPipeline: one-step inpainting with an SDXL generator distilled by DisBack (or DMD2)."""

from typing import Any, Callable

import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils import logging, replace_example_docstring

from .pipeline_utils_disback import DisBackEditingMixin, disback_editing_timesteps
from .scheduling_disback import disback_timesteps

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffusers_disback import DisBackInpaintPipeline

        >>> pipe = DisBackInpaintPipeline.from_pretrained("your-name/disback-sdxl", torch_dtype=torch.float16)
        >>> pipe = pipe.to("cuda")
        >>> init = load_image("room.png").resize((1024, 1024))
        >>> mask = load_image("room_mask.png").resize((1024, 1024))  # white: repaint, black: keep
        >>> # one step at 399 from the masked region noised to 399
        >>> image = pipe("a green armchair", image=init, mask_image=mask).images[0]
        >>> # four steps from pure noise in the masked region, re-blended with the kept region after each step
        >>> image = pipe("a green armchair", image=init, mask_image=mask, strength=1.0, num_inference_steps=4).images[0]
        ```
"""


class DisBackInpaintPipeline(DisBackEditingMixin, StableDiffusionXLInpaintPipeline):
    r"""
    Inpainting with a one-step SDXL generator distilled by DisBack or DMD2.

    A [`StableDiffusionXLInpaintPipeline`] whose defaults are those of the distilled generator: one step, no
    classifier-free guidance, a [`DisBackScheduler`], and the strength rule of [`DisBackImg2ImgPipeline`] (see
    [`disback_editing_timesteps`]): the grid timesteps `t` with `t + 1 <= strength * 1000` run, the first one on the
    input noised to it; `strength=1` starts the masked region from pure noise; `strength=0` returns the input's
    latents decoded. After every step the region outside the mask is put back (the input's latents, noised to the
    next timestep), so after the last step it holds the input's latents exactly.

    With a 4-channel generator (every DisBack / DMD2 SDXL generator) the model does not see the mask: at one step the
    masked region is the generator's edit of the noised input; more steps re-blend it with its surroundings.

    It loads from the same folder or Hub repo as [`DisBackPipeline`] (`from_pretrained` swaps in a
    [`DisBackScheduler`]), or shares its components with `DisBackInpaintPipeline.from_pipe(text_to_image_pipe)`.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        requires_aesthetics_score, force_zeros_for_empty_prompt, add_watermarker:
            As in [`StableDiffusionXLInpaintPipeline`]. `unet` is the distilled generator. Any scheduler that accepts
            explicit `timesteps` works: the pipeline always hands it the timesteps it chose.
    """

    def _input_decoded(self, image, mask_image, height, width, padding_mask_crop, batch_size, generator, output_type):
        # strength 0: the input's latents (the ones every other strength starts from), decoded
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        init_image = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        init_image = init_image.to(device=self._execution_device, dtype=self._latents_dtype())
        if init_image.shape[1] == 4:
            image_latents = init_image
        else:
            image_latents = self._encode_vae_image(image=init_image, generator=generator)
        image_latents = image_latents.repeat(batch_size // image_latents.shape[0], 1, 1, 1)
        images = self._decode(image_latents, output_type)
        if padding_mask_crop is not None and output_type != "latent":
            images = [self.image_processor.apply_overlay(mask_image, image, i, crops_coords) for i in images]
        self.maybe_free_model_hooks()
        return images

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        mask_image: PipelineImageInput = None,
        masked_image_latents: torch.Tensor = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 1,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
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
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""
        Repaints the masked region of `image`; one step and no classifier-free guidance by default.

        Args:
            image (`PipelineImageInput`):
                The image(s) to inpaint, as in [`StableDiffusionXLInpaintPipeline`].
            mask_image (`PipelineImageInput`):
                White (1) where the image is repainted, black (0) where it is kept.
            height, width (`int`, *optional*):
                The output size, divisible by 8; defaults to the UNet's sample size times 8 (as in diffusers).
            strength (`float`, defaults to 0.9999):
                How far the edit starts: the grid timesteps `t` with `t + 1 <= strength * 1000` are run, the first
                one on the input noised to it (see [`disback_editing_timesteps`]): the default is `[399]` at one step,
                `[749, 499, 249]` at four (as diffusers' default 0.9999 would be). `1` starts the masked region
                from pure noise; `0` returns the input's latents decoded. With explicit `timesteps`, strength no
                longer picks them; `0` and `1` keep their meaning.
            num_inference_steps (`int`, defaults to 1):
                The size of the DisBack grid the timesteps come from: `1 -> [399]`, `4 -> [999, 749, 499, 249]`.
            timesteps (`list[int]`, *optional*):
                Explicit timesteps, strictly decreasing, all run; the input is noised to the first. Overrides the
                strength rule and `num_inference_steps`.
            sigmas (`list[float]`, *optional*):
                For a sigma-based scheduler you set yourself; then diffusers' own strength rule applies.
            denoising_start (`float`, *optional*):
                As in [`StableDiffusionXLInpaintPipeline`]: nothing is added to the input latents and the grid (or
                `timesteps`) below `(1 - denoising_start) * 1000` is run; strength is ignored.
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; distilled generators are sampled without it (values <= 1 disable it).
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors; `{"scale": s}` scales loaded LoRA weights.
            prompt, prompt_2, masked_image_latents, padding_mask_crop, denoising_end, negative_prompt,
            negative_prompt_2, num_images_per_prompt, eta, generator, latents, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
            output_type, return_dict, guidance_rescale, original_size, crops_coords_top_left, target_size,
            negative_original_size, negative_crops_coords_top_left, negative_target_size, aesthetic_score,
            negative_aesthetic_score, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs:
                As in [`StableDiffusionXLInpaintPipeline.__call__`]; `callback_on_step_end_tensor_inputs` defaults to
                `["latents"]`.
            kwargs:
                Passed on to [`StableDiffusionXLInpaintPipeline.__call__`] (deprecated `callback`,
                `callback_steps`).

        Examples:

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`: the images, as in [`StableDiffusionXLInpaintPipeline`].
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must lie in [0, 1], got {strength}.")
        continues = isinstance(denoising_start, float) and 0 < denoising_start < 1
        if strength == 0 and not continues:
            batch_size = self._batch_size(prompt, prompt_embeds, num_images_per_prompt)
            images = self._input_decoded(
                image, mask_image, height, width, padding_mask_crop, batch_size, generator, output_type
            )
            return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

        if sigmas is None and timesteps is None:
            config = self.scheduler.config
            args = (config.get("conditioning_timestep", 399), config.get("num_train_timesteps", 1000))
            if continues:
                timesteps = disback_timesteps(num_inference_steps, *args)  # diffusers cuts it at denoising_start
            else:
                timesteps = disback_editing_timesteps(strength, num_inference_steps, *args)

        # strength 1 (pure noise in the masked region) is the parent's own `is_strength_max` path
        # from here on `get_timesteps` keeps every timestep handed to the scheduler (unless `sigmas` took over)
        self._disback_timesteps_chosen = sigmas is None
        try:
            return super().__call__(
                prompt=prompt,
                prompt_2=prompt_2,
                image=image,
                mask_image=mask_image,
                masked_image_latents=masked_image_latents,
                height=height,
                width=width,
                padding_mask_crop=padding_mask_crop,
                strength=strength,
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                sigmas=sigmas,
                denoising_start=denoising_start,
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
                aesthetic_score=aesthetic_score,
                negative_aesthetic_score=negative_aesthetic_score,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
                **kwargs,
            )
        finally:
            self._disback_timesteps_chosen = False
