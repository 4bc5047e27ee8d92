# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file travels as remote code (`pipeline_img2img.py` of a saved folder / Hub repo, see `write_disback_layout`) with
# its siblings `pipeline_utils_disback.py` and `scheduling_disback.py`, and imports nothing of `diffusers_disback`
# but them, so that people who do not have the package installed can load it:
#     DiffusionPipeline.from_pretrained(repo_id, custom_pipeline="pipeline_img2img", trust_remote_code=True)
"""DisBackImg2ImgPipeline: one-step image-to-image editing with an SDXL generator distilled by DisBack (or DMD2)."""

from typing import Any, Callable

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.utils import logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from .pipeline_utils_disback import DisBackEditingMixin, disback_editing_timesteps
from .scheduling_disback import disback_timesteps

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import load_image
        >>> from diffusers_disback import DisBackImg2ImgPipeline

        >>> pipe = DisBackImg2ImgPipeline.from_pretrained("your-name/disback-sdxl", torch_dtype=torch.float16)
        >>> pipe = pipe.to("cuda")
        >>> init = load_image("cat.png").resize((1024, 1024))
        >>> # one step at the conditioning timestep 399, from the input noised to 399
        >>> image = pipe("a tiger", image=init, strength=0.5).images[0]
        >>> # two steps [499, 249] of the four-step grid
        >>> image = pipe("a tiger", image=init, strength=0.5, num_inference_steps=4).images[0]
        ```
"""


class DisBackImg2ImgPipeline(DisBackEditingMixin, StableDiffusionXLImg2ImgPipeline):
    r"""
    Image-to-image editing (SDEdit) with a one-step SDXL generator distilled by DisBack or DMD2.

    A [`StableDiffusionXLImg2ImgPipeline`] whose defaults are those of the distilled generator: one step, no
    classifier-free guidance, a [`DisBackScheduler`], and a strength rule that only runs the generator at the timesteps
    it was trained at (see [`disback_editing_timesteps`]):

    | `strength` | one step (`[399]`) | four steps (`[999, 749, 499, 249]`) |
    | --- | --- | --- |
    | 0 | the input, encoded and decoded | the same |
    | 0.25 | `ValueError` (below 399) | `[249]` |
    | 0.5 (default) | `[399]` from the input noised to 399 | `[499, 249]` |
    | 0.75 | `[399]` | `[749, 499, 249]` |
    | 1 | `[399]` from pure noise (= text-to-image) | `[999, 749, 499, 249]` from pure noise |

    It loads from the same folder or Hub repo as [`DisBackPipeline`] (`from_pretrained` swaps in a
    [`DisBackScheduler`]), or shares its components with `DisBackImg2ImgPipeline.from_pipe(text_to_image_pipe)`.

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder, feature_extractor,
        requires_aesthetics_score, force_zeros_for_empty_prompt, add_watermarker:
            As in [`StableDiffusionXLImg2ImgPipeline`]. `unet` is the distilled generator. Any scheduler that accepts
            explicit `timesteps` works: the pipeline always hands it the timesteps it chose.
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        image: PipelineImageInput = None,
        strength: float = 0.5,
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
        Edits `image`; one step and no classifier-free guidance by default.

        Args:
            image (`PipelineImageInput`):
                The image(s) to edit (PIL, numpy or torch; or latents with 4 channels), as in
                [`StableDiffusionXLImg2ImgPipeline`]. The output has its size, rounded down to a multiple of 8.
            strength (`float`, defaults to 0.5):
                How far the edit starts: the grid timesteps `t` with `t + 1 <= strength * 1000` are run, the first
                one on the input noised to it (see [`disback_editing_timesteps`]). `0` returns the input's
                latents decoded; `1` ignores the input and starts from pure noise (text-to-image). With explicit
                `timesteps`, strength no longer picks them; `0` and `1` keep their meaning.
            num_inference_steps (`int`, defaults to 1):
                The size of the DisBack grid the timesteps come from: `1 -> [399]`, `4 -> [999, 749, 499, 249]`.
            timesteps (`list[int]`, *optional*):
                Explicit timesteps, strictly decreasing, all run; the input is noised to the first. Overrides the
                strength rule and `num_inference_steps`.
            sigmas (`list[float]`, *optional*):
                For a sigma-based scheduler you set yourself; then diffusers' own strength rule applies.
            denoising_start (`float`, *optional*):
                As in [`StableDiffusionXLImg2ImgPipeline`]: `image` holds partly denoised latents, nothing is added to
                them, and the grid (or `timesteps`) below `(1 - denoising_start) * 1000` is run; strength is ignored.
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; distilled generators are sampled without it (values <= 1 disable it).
            cross_attention_kwargs (`dict`, *optional*):
                Passed to the attention processors; `{"scale": s}` scales loaded LoRA weights.
            prompt, prompt_2, denoising_end, negative_prompt, negative_prompt_2, num_images_per_prompt, eta,
            generator, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict,
            guidance_rescale, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score, clip_skip,
            callback_on_step_end, callback_on_step_end_tensor_inputs:
                As in [`StableDiffusionXLImg2ImgPipeline.__call__`]. `latents`, if given, are the starting latents
                as they are (already noised); `callback_on_step_end_tensor_inputs` defaults to `["latents"]`.
            kwargs:
                Passed on to [`StableDiffusionXLImg2ImgPipeline.__call__`] (deprecated `callback`,
                `callback_steps`).

        Examples:

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`: the images, as in [`StableDiffusionXLImg2ImgPipeline`].
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must lie in [0, 1], got {strength}.")
        continues = isinstance(denoising_start, float) and 0 < denoising_start < 1
        if strength == 0 and not continues:
            # no denoising: the input's latents (as every other strength starts from them), decoded
            device = self._execution_device
            init_latents = self.prepare_latents(
                self.image_processor.preprocess(image),
                None,
                self._batch_size(prompt, prompt_embeds, 1),
                num_images_per_prompt,
                self._latents_dtype(),
                device,
                generator,
                add_noise=False,
            )
            images = self._decode(init_latents, output_type)
            self.maybe_free_model_hooks()
            return StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)

        if sigmas is None and timesteps is None:
            config = self.scheduler.config
            args = (config.get("conditioning_timestep", 399), config.get("num_train_timesteps", 1000))
            if continues:
                timesteps = disback_timesteps(num_inference_steps, *args)  # diffusers cuts it at denoising_start
            else:
                timesteps = disback_editing_timesteps(strength, num_inference_steps, *args)

        if strength == 1 and latents is None and not continues:
            # the pure-noise path: the input only sets the size (the same noise as DisBackPipeline draws)
            pixels = self.image_processor.preprocess(image)
            size = pixels.shape[-2:]
            if pixels.shape[1] != self.vae.config.latent_channels:
                size = (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
            shape = (self._batch_size(prompt, prompt_embeds, num_images_per_prompt), self.unet.config.in_channels)
            latents = randn_tensor(
                shape + tuple(size), generator=generator, device=self._execution_device, dtype=self._latents_dtype()
            )
            latents = latents * self.scheduler.init_noise_sigma

        # from here on `get_timesteps` keeps every timestep handed to the scheduler (unless `sigmas` took over)
        self._disback_timesteps_chosen = sigmas is None
        try:
            return super().__call__(
                prompt=prompt,
                prompt_2=prompt_2,
                image=image,
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
