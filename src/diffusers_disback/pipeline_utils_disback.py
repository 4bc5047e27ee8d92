# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# Shared by the DisBack pipeline files. It travels with them as remote code (next to `pipeline.py`,
# `pipeline_img2img.py`, `pipeline_inpaint.py` and `scheduling_disback.py`; see `write_disback_layout`), so it imports
# nothing of `diffusers_disback` but its sibling `scheduling_disback.py`, and no pipeline: the pipelines import it.
"""What every DisBack pipeline shares: loading with the student's scheduler (a `DisBackScheduler` for SDXL), saving in
the DisBack layout (SDXL or SD3), the execution-device shortcut, and for the editing pipelines the strength rule and
the steps around diffusers' SDXL img2img / inpaint `__call__`."""

import inspect
import json
import os
import shutil

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.utils import logging
from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import create_repo

from .scheduling_disback import DisBackScheduler, disback_timesteps

logger = logging.get_logger(__name__)

# The files that travel as remote code in a saved pipeline folder / Hub repo: the name in the folder -> the package
# file. diffusers loads `pipeline.py` for `custom_pipeline=<repo or folder>`, `pipeline_img2img.py` for
# `custom_pipeline="pipeline_img2img"` (it looks a name up as `<name>.py` in the folder or repo being loaded), and
# fetches the modules each imports relatively (`from .scheduling_disback import ...`) from the same place.
REMOTE_FILES = {
    "pipeline.py": "pipeline_disback.py",
    "pipeline_img2img.py": "pipeline_disback_img2img.py",
    "pipeline_inpaint.py": "pipeline_disback_inpaint.py",
    "pipeline_utils_disback.py": "pipeline_utils_disback.py",
    "scheduling_disback.py": "scheduling_disback.py",
}
# The remote code of a saved SD3 / SD3.5 folder (`DisBackSD3Pipeline`): `pipeline.py` and the files it imports. There
# are no SD3 editing pipelines.
SD3_REMOTE_FILES = {
    "pipeline.py": "pipeline_disback_sd3.py",
    "pipeline_utils_disback.py": "pipeline_utils_disback.py",
    "scheduling_disback.py": "scheduling_disback.py",
}
# The stock scheduler written into model_index.json. With `original_inference_steps == num_train_timesteps` it
# samples exactly the DisBack timesteps, so plain `StableDiffusionXLPipeline.from_pretrained` needs no remote code.
STOCK_SCHEDULER = ["diffusers", "LCMScheduler"]
# `save_pretrained(push_to_hub=True, ...)` arguments, as in `DiffusionPipeline.save_pretrained`.
_PUSH_ARGUMENTS = ("repo_id", "commit_message", "private", "create_pr", "token")


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
    """Loading, saving and the execution device of every DisBack pipeline (put it before the diffusers pipeline
    class)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Loads from a Hub repo id or a local folder (e.g. one written by `DisBackPipeline.save_pretrained`), as
        [`DiffusionPipeline.from_pretrained`]. The scheduler the repo names (the stock `LCMScheduler` of a DisBack
        repo, or SDXL base's `EulerDiscreteScheduler` when you load the base model and pass `unet=`) is replaced by a
        [`DisBackScheduler`] built from its config, unless you pass `scheduler=` yourself. (`DisBackSD3Pipeline`: by
        the student's `FlowMatchEulerDiscreteScheduler`, see its `disback_flow_scheduler`.)
        """
        user_scheduler = "scheduler" in kwargs
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not user_scheduler:
            scheduler = cls._student_scheduler(pipe.scheduler)
            if scheduler is not pipe.scheduler:
                pipe.scheduler = scheduler
        return pipe

    @classmethod
    def _student_scheduler(cls, scheduler):
        # what `from_pretrained` samples with in place of the scheduler the folder names (`scheduler` itself to keep it)
        return scheduler if isinstance(scheduler, DisBackScheduler) else DisBackScheduler.from_config(scheduler.config)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        r"""
        Saves the pipeline in the DisBack layout (see [`write_disback_layout`]), which plain diffusers can load too.
        Every DisBack pipeline writes the same folder: an editing pipeline saves its components as the text-to-image
        folder, from which all three load.

        On top of [`DiffusionPipeline.save_pretrained`]: `model_index.json` names `StableDiffusionXLPipeline` and a
        stock `LCMScheduler` (configured to sample the DisBack timesteps), and `pipeline.py`, `pipeline_img2img.py`,
        `pipeline_inpaint.py`, `scheduling_disback.py` and `pipeline_utils_disback.py` are copied into the folder as
        remote code. `DisBackSD3Pipeline` writes the SD3 layout: `model_index.json` names `StableDiffusion3Pipeline`,
        the scheduler is saved as it is, and `pipeline.py` is the SD3 pipeline.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            safe_serialization (`bool`, defaults to `True`): write safetensors.
            variant (`str`, *optional*): e.g. `"fp16"` to write `*.fp16.safetensors` weights.
            push_to_hub (`bool`, defaults to `False`): upload the folder to the Hub afterwards, as diffusers does
                (`repo_id`, defaulting to the folder's name, `commit_message`, `private`, `create_pr`, `token`),
                adding diffusers' model card if the folder has none. For the DisBack model card (loading routes,
                samples, training record) and retries, push with `diffusers_disback.hub.push_pipeline` instead.
            kwargs: passed to [`DiffusionPipeline.save_pretrained`] (e.g. `max_shard_size`).
        """
        hub_only = sorted({"card_data", "sample_prompts"} & set(kwargs))
        if hub_only:
            raise TypeError(
                f"save_pretrained() got {', '.join(hub_only)}: these are arguments of the DisBack model card; use "
                "`diffusers_disback.hub.push_pipeline(pipe, repo_id, ...)` (or `save_for_hub`) for it."
            )
        push = {key: kwargs.pop(key) for key in _PUSH_ARGUMENTS if key in kwargs}
        DiffusionPipeline.save_pretrained(
            self._pipeline_to_save(), save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs
        )
        write_disback_layout(save_directory, self.scheduler)
        if push_to_hub:
            push_disback_folder(self, save_directory, **push)

    def _pipeline_to_save(self):
        # the pipeline whose folder `save_pretrained` writes
        return self

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

    def _pipeline_to_save(self):
        # the same components, saved as the text-to-image folder that every DisBack pipeline loads from
        return StableDiffusionXLPipeline.from_pipe(self, scheduler=self.scheduler)

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


def write_disback_layout(save_directory: str | os.PathLike, scheduler=None) -> None:
    """
    Turns a folder written by `DiffusionPipeline.save_pretrained` into the DisBack layout.

    - `model_index.json`: `_class_name` becomes `StableDiffusionXLPipeline`; a DisBack scheduler is recorded as the
      stock `LCMScheduler`, so no loading route needs remote code unless it asks for it.
    - `scheduler/scheduler_config.json`: the same class swap, plus `original_inference_steps = num_train_timesteps`
      so `LCMScheduler(num_inference_steps=N)` samples the DisBack timesteps for `N > 1`.
    - the remote code ([`REMOTE_FILES`]): `pipeline.py` for `custom_pipeline=<repo>, trust_remote_code=True`,
      `pipeline_img2img.py` / `pipeline_inpaint.py` for `custom_pipeline="pipeline_img2img"` (`"pipeline_inpaint"`),
      and the files they import relatively. They are copied from the folder this file lies in: the package, or, run
      as remote code, the folder diffusers copied the repo's files to (there a file that was not loaded is missing,
      and the folder is written without it).

    An SD3 / SD3.5 folder (its `model_index.json` has `transformer` and `text_encoder_3`, the latter `[null, null]`
    without T5) gets the SD3 layout instead: `_class_name` becomes `StableDiffusion3Pipeline`, the scheduler is left as
    saved (the student's `FlowMatchEulerDiscreteScheduler` is a stock class already), and the remote code is
    [`SD3_REMOTE_FILES`] (`pipeline.py` is `DisBackSD3Pipeline`).
    """
    save_directory = os.fspath(save_directory)
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    if "transformer" in index and "text_encoder_3" in index:
        index["_class_name"] = StableDiffusion3Pipeline.__name__
        _write_json(index_path, index)
        _copy_remote_files(save_directory, SD3_REMOTE_FILES)
        return
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
    _copy_remote_files(save_directory, REMOTE_FILES)


def _copy_remote_files(save_directory: str, remote_files: dict[str, str]) -> None:
    # each file from the package (its package name) or, run as remote code, from diffusers' copy (its remote name)
    here = os.path.dirname(os.path.abspath(__file__))
    for remote_name, package_name in remote_files.items():
        for candidate in (package_name, remote_name):
            if os.path.isfile(os.path.join(here, candidate)):
                shutil.copyfile(os.path.join(here, candidate), os.path.join(save_directory, remote_name))
                break
        else:
            logger.info(f"{package_name} is not next to {__file__}: the folder is written without {remote_name}.")


def _write_json(path: str, obj: dict) -> None:
    # in place, as diffusers' `save_config` wrote the file a moment before: the folder is complete when
    # `save_pretrained` returns. (The package's atomic writer, `diffusers_disback._io`, does not travel as remote code.)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def push_disback_folder(
    pipeline,
    save_directory: str | os.PathLike,
    repo_id: str | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    create_pr: bool = False,
    token: str | None = None,
) -> str:
    """What `save_pretrained(push_to_hub=True)` does after writing the folder, as `DiffusionPipeline.save_pretrained`
    does it: creates the repo if needed, adds diffusers' model card if the folder has none, and uploads the folder in
    one commit. Returns the commit's URL."""
    save_directory = os.fspath(save_directory)
    repo_id = repo_id or os.path.basename(os.path.normpath(save_directory))
    repo_id = create_repo(repo_id, exist_ok=True, private=private, token=token).repo_id
    card_path = os.path.join(save_directory, "README.md")
    if not os.path.exists(card_path):
        populate_model_card(load_or_create_model_card(repo_id, token=token, is_pipeline=True)).save(card_path)
    info = pipeline._upload_folder(
        save_directory,
        repo_id,
        token=token,
        commit_message=commit_message or "Upload DisBack pipeline",
        create_pr=create_pr,
    )
    return str(getattr(info, "commit_url", info))
