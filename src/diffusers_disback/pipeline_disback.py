# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file is self-contained apart from its siblings `pipeline_utils_disback.py` and `scheduling_disback.py`, so that
# they can be uploaded next to a model on the Hub and loaded as remote code by people who do not have `diffusers_disback` installed:
#     DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id, trust_remote_code=True)
"""DisBackPipeline: one-step text-to-image generation with an SDXL generator distilled by DisBack (or DMD2)."""

import importlib
import inspect
import json
import os
import shutil
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

# The file names the remote code travels under in a saved pipeline folder / Hub repo. diffusers loads `pipeline.py`
# for `custom_pipeline=<repo or folder>` and fetches the modules it imports relatively from the same folder.
REMOTE_PIPELINE_FILE = "pipeline.py"
REMOTE_SCHEDULER_FILE = "scheduling_disback.py"
REMOTE_UTILS_FILE = (
    "pipeline_utils_disback.py"  # what the pipeline files share, imported relatively like the scheduler
)
# The editing pipelines travel next to it, each loaded with `custom_pipeline="<file name without .py>"` (diffusers
# looks a `custom_pipeline` name up as `<name>.py` in the repo / folder being loaded): remote name -> package file.
REMOTE_EDITING_FILES = {
    "pipeline_img2img.py": "pipeline_disback_img2img.py",
    "pipeline_inpaint.py": "pipeline_disback_inpaint.py",
}
# The stock scheduler written into model_index.json. With `original_inference_steps == num_train_timesteps` it
# samples exactly the DisBack timesteps, so plain `StableDiffusionXLPipeline.from_pretrained` needs no remote code.
STOCK_SCHEDULER = ["diffusers", "LCMScheduler"]

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
    scheduler's are copied into the folder). The editing pipelines load from the same folder:
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
            checkpoints = importlib.import_module("diffusers_disback.checkpoints")
        except ImportError as e:
            raise ImportError(
                "`from_unet_checkpoint` needs the `diffusers_disback` package: `pip install diffusers_disback`."
            ) from e
        unet = checkpoints.load_unet_checkpoint(
            checkpoint,
            config=base_model,
            torch_dtype=torch_dtype,
            revision=kwargs.get("revision"),
            checkpoint_revision=kwargs.pop("checkpoint_revision", None),
        )
        return cls.from_pretrained(base_model, unet=unet, torch_dtype=torch_dtype, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""
        Saves the pipeline in the DisBack layout, which plain diffusers can load too.

        On top of [`DiffusionPipeline.save_pretrained`]: `model_index.json` names `StableDiffusionXLPipeline` and a
        stock `LCMScheduler` (configured to sample the DisBack timesteps), and `pipeline.py`, `pipeline_img2img.py`,
        `pipeline_inpaint.py` plus `scheduling_disback.py` and `pipeline_utils_disback.py` are copied into the folder as
        remote code.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            safe_serialization (`bool`, defaults to `True`): write safetensors.
            variant (`str`, *optional*): e.g. `"fp16"` to write `*.fp16.safetensors` weights.
            push_to_hub (`bool`, defaults to `False`): push the folder to the Hub with a model card afterwards
                (needs the `diffusers_disback` package; keyword arguments go to `diffusers_disback.hub.push_pipeline`,
                e.g. `repo_id`, `private`, `token`).
        """
        push_kwargs = {}
        for key in ("repo_id", "commit_message", "private", "create_pr", "token", "card_data", "sample_prompts"):
            if key in kwargs:
                push_kwargs[key] = kwargs.pop(key)
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        write_disback_layout(save_directory, self.scheduler)
        if push_to_hub:
            try:
                hub = importlib.import_module("diffusers_disback.hub")
            except ImportError as e:
                raise ImportError(
                    "Pushing a DisBack pipeline needs the `diffusers_disback` package: `pip install diffusers_disback`."
                    f" The folder was saved at {save_directory}; upload it with `huggingface_hub.upload_folder`."
                ) from e
            hub.push_pipeline_folder(save_directory, pipeline=self, **push_kwargs)

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


def write_disback_layout(save_directory: str | os.PathLike, scheduler=None) -> None:
    """
    Turns a folder written by `DiffusionPipeline.save_pretrained` into the DisBack layout.

    - `model_index.json`: `_class_name` becomes `StableDiffusionXLPipeline`; a DisBack scheduler is recorded as the
      stock `LCMScheduler`, so no loading route needs remote code unless it asks for it.
    - `scheduler/scheduler_config.json`: the same class swap, plus `original_inference_steps = num_train_timesteps`
      so `LCMScheduler(num_inference_steps=N)` samples the DisBack timesteps for `N > 1`.
    - `pipeline.py`, `scheduling_disback.py` and `pipeline_utils_disback.py`: this file and those it imports, for
      `custom_pipeline=<repo>, trust_remote_code=True`.
    - `pipeline_img2img.py` and `pipeline_inpaint.py`: the editing pipelines, for
      `custom_pipeline="pipeline_img2img"` (or `"pipeline_inpaint"`), `trust_remote_code=True`. (Run as remote code
      itself, this file has no editing siblings to copy and writes the folder without them.)
    """
    save_directory = os.fspath(save_directory)
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = StableDiffusionXLPipeline.__name__
    # by name too: a DisBackScheduler loaded as remote code is another class object
    disback_scheduler = (
        scheduler is None
        or isinstance(scheduler, DisBackScheduler)
        or type(scheduler).__name__ == DisBackScheduler.__name__
    )
    if disback_scheduler or type(scheduler).__name__ == "LCMScheduler":
        index["scheduler"] = STOCK_SCHEDULER
        sched_path = os.path.join(save_directory, "scheduler", "scheduler_config.json")
        with open(sched_path, encoding="utf-8") as f:
            sched = json.load(f)
        # keep only the DisBack keys (a config converted from SDXL's Euler carries keys LCMScheduler warns about);
        # the conditioning timestep only where it differs from the default both loaders assume
        keep = set(inspect.signature(DisBackScheduler.__init__).parameters) | {"_diffusers_version"}
        sched = {k: v for k, v in sched.items() if k in keep}
        if sched.get("conditioning_timestep") == 399:
            del sched["conditioning_timestep"]
        sched["_class_name"] = STOCK_SCHEDULER[1]
        sched["original_inference_steps"] = sched.get("num_train_timesteps", 1000)
        _write_json(sched_path, sched)
    _write_json(index_path, index)

    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, REMOTE_PIPELINE_FILE))
    for shared in (REMOTE_SCHEDULER_FILE, REMOTE_UTILS_FILE):
        shutil.copyfile(os.path.join(here, shared), os.path.join(save_directory, shared))
    for remote_name, package_name in REMOTE_EDITING_FILES.items():
        for candidate in (package_name, remote_name):
            if os.path.isfile(os.path.join(here, candidate)):
                shutil.copyfile(os.path.join(here, candidate), os.path.join(save_directory, remote_name))
                break
        else:
            logger.info(f"{package_name} is not next to {__file__}: the folder is written without {remote_name}.")


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
