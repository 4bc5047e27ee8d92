# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file travels as remote code (`pipeline.py` of a saved SD3 folder / Hub repo, see `write_disback_layout`) with
# its siblings `pipeline_utils_disback.py` and `scheduling_disback.py`, and imports nothing of `diffusers_disback` but
# them, for people who do not have the package installed:
#     DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id, trust_remote_code=True)
"""DisBackSD3Pipeline: one-step text-to-image generation with an SD3 / SD3.5 generator distilled by DisBack (or
DMD2) from a flow-matching MMDiT teacher."""

import functools
import inspect
from typing import Any, Callable

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.utils import logging, replace_example_docstring

from .pipeline_utils_disback import DisBackMixin

# Not used here: diffusers' remote-code loader copies, out of a local folder, only the files a pipeline file imports
# relatively itself, and `pipeline_utils_disback.py` imports this one.
from .scheduling_disback import DisBackScheduler  # noqa: F401

logger = logging.get_logger(__name__)

# The student's sampler, as diffusers' own flow-matching scheduler: no shift (the rungs are used as given) and a
# stochastic `step` that predicts `x0 = x - sigma v` and re-noises it to the next rung, `(1 - s_next) x0 + s_next eps`
# (after the last rung, `s_next = 0`: x0 itself).
STUDENT_SCHEDULER_CONFIG = {"shift": 1.0, "use_dynamic_shifting": False, "stochastic_sampling": True}

# The T5 tokens of the prompt embedding the generator was trained with, kept in `model_index.json` under a private
# key (diffusers passes no `_` key to a pipeline's `__init__`, so stock loaders neither see nor warn about it). It
# matters most without T5: the T5 half of the embedding is then `L` zero tokens, and the transformer attends to them.
MAX_SEQUENCE_LENGTH_KEY = "_disback_max_sequence_length"
DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_disback import DisBackSD3Pipeline

        >>> pipe = DisBackSD3Pipeline.from_pretrained("your-name/disback-sd3.5", torch_dtype=torch.bfloat16).to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step, no CFG

        >>> # four steps at sigmas [1.0, 0.75, 0.5, 0.25], re-noising the x0 prediction in between
        >>> image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=4).images[0]
        ```
"""


def disback_flow_sigmas(num_inference_steps: int) -> list[float]:
    """
    The sigmas (rungs) a flow-matching DisBack / DMD2 generator is sampled at: `N` evenly spaced from 1 (pure noise)
    down, without shift, `linspace(1, 0, N + 1)[:-1]`.

    Examples:
        >>> disback_flow_sigmas(1)
        [1.0]
        >>> disback_flow_sigmas(4)
        [1.0, 0.75, 0.5, 0.25]
    """
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    return np.linspace(1.0, 0.0, int(num_inference_steps) + 1)[:-1].tolist()


def disback_flow_scheduler(config: dict | None = None) -> FlowMatchEulerDiscreteScheduler:
    """
    The student's scheduler: a [`FlowMatchEulerDiscreteScheduler`] with `shift=1.0`, `use_dynamic_shifting=False` and
    `stochastic_sampling=True` ([`STUDENT_SCHEDULER_CONFIG`]), with the `num_train_timesteps` of `config` (e.g. the
    teacher's scheduler config; 1000 by default). Every other setting is diffusers' default: no Karras, exponential or
    beta sigmas, no terminal shift.
    """
    num_train_timesteps = (config or {}).get("num_train_timesteps", 1000)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, **STUDENT_SCHEDULER_CONFIG)


def is_disback_flow_scheduler(scheduler) -> bool:
    """Whether `scheduler` samples as [`disback_flow_scheduler`] does (by class name, so a copy loaded as remote code
    counts too)."""
    if type(scheduler).__name__ != FlowMatchEulerDiscreteScheduler.__name__:
        return False
    expected = disback_flow_scheduler(scheduler.config).config
    return all(scheduler.config.get(k) == v for k, v in expected.items() if not k.startswith("_"))


def _check_sigmas(sigmas: list[float]) -> list[float]:
    sigmas = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    if len(sigmas) == 0:
        raise ValueError("`sigmas` must not be empty.")
    if any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ValueError(f"`sigmas` must lie in (0, 1] (1 is pure noise), got {sigmas}.")
    if any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"`sigmas` must be strictly decreasing, got {sigmas}.")
    return sigmas


class DisBackSD3Pipeline(DisBackMixin, StableDiffusion3Pipeline):
    r"""
    Text-to-image generation with a one-step SD3 / SD3.5 generator (an `SD3Transformer2DModel`) distilled by DisBack
    (Distribution Backtracking) or DMD2 from a flow-matching teacher.

    A [`StableDiffusion3Pipeline`] whose defaults are those of the distilled generator: one step from pure noise
    `z` at sigma 1 (transformer timestep 1000), whose image is `x0 = z - v(z, 1000)`, and no classifier-free guidance
    (the generator was distilled with the teacher's guidance). `N > 1` steps sample at the rungs
    [`disback_flow_sigmas`] (`4 -> [1.0, 0.75, 0.5, 0.25]`) and re-noise the x0 prediction to the next rung with fresh
    noise from the call's `generator`. The scheduler is diffusers' [`FlowMatchEulerDiscreteScheduler`] configured as
    [`disback_flow_scheduler`]. Everything else of the SD3 pipeline (prompt embeddings, `prompt_3`, negative prompts,
    `num_images_per_prompt`, latents, callbacks, LoRA and IP-Adapter loading, offloading) works unchanged.

    T5 is optional: a folder saved without it (`text_encoder_3=None`, the T5 half of the prompt embedding is then
    zeros) loads with this class as it is. Plain `StableDiffusion3Pipeline.from_pretrained` needs
    `text_encoder_3=None, tokenizer_3=None` for such a folder.

    `save_pretrained` writes a folder that loads three ways with the same images: with this class, with plain
    `StableDiffusion3Pipeline.from_pretrained` and `pipe(prompt, num_inference_steps=1, guidance_scale=0)`
    (model_index.json names only stock classes; sigma 1 is the same under every shift, so the one-step image does not
    depend on the scheduler's shift), and with `DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
    trust_remote_code=True)` (this file and the files it imports are copied into the folder).

    Args:
        transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3,
        tokenizer_3, image_encoder, feature_extractor:
            As in [`StableDiffusion3Pipeline`]. `transformer` is the distilled generator; `text_encoder_3` and
            `tokenizer_3` may be `None`. [`~DisBackSD3Pipeline.from_pretrained`] replaces a scheduler configured
            otherwise (e.g. the teacher's, with shift 3) by [`disback_flow_scheduler`].
    """

    _optional_components = StableDiffusion3Pipeline._optional_components + ["text_encoder_3", "tokenizer_3"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Loads as [`DiffusionPipeline.from_pretrained`], with the student's scheduler (unless `scheduler=` is passed)
        and the T5 sequence length the generator was trained with, when the folder records one
        ([`~DisBackSD3Pipeline.default_max_sequence_length`]).
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub = ("cache_dir", "revision", "token", "local_files_only", "proxies")
        index = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in hub if k in kwargs})
        if index.get(MAX_SEQUENCE_LENGTH_KEY) is not None:
            pipe.default_max_sequence_length = index[MAX_SEQUENCE_LENGTH_KEY]
        return pipe

    @property
    def default_max_sequence_length(self) -> int:
        """The T5 tokens a call uses when it passes no `max_sequence_length`: the generator's training length if the
        folder recorded it (the training script does), else diffusers' 256. Set it to record another; it is saved
        with the pipeline."""
        return self.config.get(MAX_SEQUENCE_LENGTH_KEY) or DEFAULT_MAX_SEQUENCE_LENGTH

    @default_max_sequence_length.setter
    def default_max_sequence_length(self, value: int) -> None:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`max_sequence_length` must be a positive integer, got {value!r}.")
        self.register_to_config(**{MAX_SEQUENCE_LENGTH_KEY: int(value)})

    @classmethod
    def _student_scheduler(cls, scheduler):
        # what `from_pretrained` samples with in place of the scheduler the folder names
        return scheduler if is_disback_flow_scheduler(scheduler) else disback_flow_scheduler(scheduler.config)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        sigmas: list[float] | None = None,
        guidance_scale: float = 0.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.FloatTensor | None = None,
        prompt_embeds: torch.FloatTensor | None = None,
        negative_prompt_embeds: torch.FloatTensor | None = None,
        pooled_prompt_embeds: torch.FloatTensor | None = None,
        negative_pooled_prompt_embeds: torch.FloatTensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        mu: float | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        r"""
        Generates images; one step from pure noise and no classifier-free guidance by default.

        Args:
            num_inference_steps (`int`, defaults to 1):
                `1` samples once at sigma 1 (transformer timestep 1000): the image is `z - v(z, 1000)`. `N > 1`
                samples at `N` sigmas evenly spaced down from 1 (`4 -> [1.0, 0.75, 0.5, 0.25]`), re-noising the x0
                prediction to the next sigma with fresh noise from `generator` between steps.
            sigmas (`list[float]`, *optional*):
                Explicit sigmas, strictly decreasing, in `(0, 1]`; overrides `num_inference_steps`. One `sigmas=[s]`
                samples a generator distilled at the conditioning sigma `s` (`z - s v(z, 1000 s)`). The scheduler
                applies its shift to them (none for [`disback_flow_scheduler`]).
            guidance_scale (`float`, defaults to 0.0):
                Classifier-free guidance scale; distilled generators are sampled without it (values <= 1 disable it).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Draws the initial noise and, with `N > 1` steps, the re-noising noise (diffusers' SD3 loop does not
                hand its generator to the scheduler; this pipeline does).
            prompt, prompt_2, prompt_3, height, width, negative_prompt, negative_prompt_2, negative_prompt_3,
            num_images_per_prompt, latents, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict,
            joint_attention_kwargs, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs,
            skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_stop, skip_layer_guidance_start, mu:
                As in [`StableDiffusion3Pipeline.__call__`]. `height` and `width` must be divisible by
                `8 * patch_size` (16 for SD3 / SD3.5); `callback_on_step_end_tensor_inputs` defaults to `["latents"]`.

            max_sequence_length (`int`, *optional*):
                T5 tokens of the prompt embedding; defaults to [`~DisBackSD3Pipeline.default_max_sequence_length`],
                the length the generator was trained with when its folder records it, else 256. Stock
                `StableDiffusion3Pipeline` does not read the recorded length: pass it there.

        Examples:

        Returns:
            [`StableDiffusion3PipelineOutput`] or `tuple`: the images, as in [`StableDiffusion3Pipeline`].
        """
        sigmas = disback_flow_sigmas(num_inference_steps) if sigmas is None else _check_sigmas(sigmas)
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length
        if len(sigmas) > 1 and not is_disback_flow_scheduler(self.scheduler):
            config = self.scheduler.config
            logger.warning(
                f"The scheduler ({type(self.scheduler).__name__}, shift={config.get('shift')}, "
                f"stochastic_sampling={config.get('stochastic_sampling')}) does not sample as the DisBack student: a "
                "shift moves the sigmas, a deterministic step does not re-noise the x0 prediction. "
                "`pipe.scheduler = disback_flow_scheduler(pipe.scheduler.config)` restores the generator's sampler."
            )
        # diffusers' SD3 loop calls `scheduler.step(noise_pred, t, latents)` without the generator: hand it the
        # caller's, so that the re-noising draws from `generator` as the initial noise does
        scheduler = self.scheduler
        patched = generator is not None and "generator" in inspect.signature(scheduler.step).parameters
        previous = scheduler.__dict__.get("step")
        if patched:
            scheduler.step = functools.partial(scheduler.step, generator=generator)
        try:
            return super().__call__(
                prompt=prompt,
                prompt_2=prompt_2,
                prompt_3=prompt_3,
                height=height,
                width=width,
                num_inference_steps=len(sigmas),
                sigmas=sigmas,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                negative_prompt_2=negative_prompt_2,
                negative_prompt_3=negative_prompt_3,
                num_images_per_prompt=num_images_per_prompt,
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
                joint_attention_kwargs=joint_attention_kwargs,
                clip_skip=clip_skip,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
                max_sequence_length=max_sequence_length,
                skip_guidance_layers=skip_guidance_layers,
                skip_layer_guidance_scale=skip_layer_guidance_scale,
                skip_layer_guidance_stop=skip_layer_guidance_stop,
                skip_layer_guidance_start=skip_layer_guidance_start,
                mu=mu,
            )
        finally:
            if patched:
                if previous is None:
                    del scheduler.step
                else:
                    scheduler.step = previous
