"""The Hub: repo layout, model cards and pushing (with retries). The only module of the package that talks to the Hub.

A DisBack repo loads three ways (see docs/hub.md):

1. `DisBackPipeline.from_pretrained(repo_id)` with this package installed;
2. `DiffusionPipeline.from_pretrained(repo_id, custom_pipeline=repo_id, trust_remote_code=True)` without it (the
   repo carries `pipeline.py` and `scheduling_disback.py`);
3. plain `StableDiffusionXLPipeline.from_pretrained(repo_id)` with `timesteps=[399], guidance_scale=0`
   (`model_index.json` names only stock diffusers/transformers classes).

A "unet" repo holds only `unet/` and references the base model for everything else.

An SD3 / SD3.5 repo (a `DisBackSD3Pipeline`, see docs/inference.md) loads the same three ways: `DisBackSD3Pipeline`,
the remote code, and plain `StableDiffusion3Pipeline.from_pretrained(repo_id)` (with `text_encoder_3=None,
tokenizer_3=None` when the repo has no T5) with `num_inference_steps=1, guidance_scale=0`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from ._io import atomic_write

logger = logging.getLogger(__name__)

__all__ = [
    "HubPushError",
    "DEFAULT_SAMPLE_PROMPTS",
    "download_checkpoint",
    "make_model_card",
    "save_for_hub",
    "write_fp16_variant",
    "push_folder",
    "push_pipeline",
    "make_space_card",
    "push_space",
    "space_app_source",
]

DEFAULT_SAMPLE_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
)
CARD_TAGS = ["disback", "distillation", "one-step", "stable-diffusion-xl", "text-to-image", "diffusers"]
SD3_CARD_TAGS = ["disback", "distillation", "one-step", "stable-diffusion-3", "text-to-image", "diffusers"]
# The license a card names by default: SDXL's, and for SD3 / SD3.5 Stability AI's community license.
DEFAULT_LICENSES = {
    "sdxl": {"license": "openrail++"},
    "sd3": {"license": "other", "license_name": "stabilityai-ai-community"},
}
FAMILIES = ("sdxl", "sd3")
SAMPLES_FILE = "samples.png"


class HubPushError(RuntimeError):
    """A push that failed after its retries. The local folder is untouched and can be pushed again."""


# ---------------------------------------------------------------------------------------------------------- download


_HUB_FILE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>.+)$")


def download_checkpoint(spec: str, revision: str | None = None) -> str:
    """
    Resolves `owner/repo/path/in/repo.bin` to a local file through the Hub cache.

    Raises:
        FileNotFoundError: `spec` is neither a local file nor of the form `owner/repo/path/to/file`.
    """
    if os.path.exists(spec):
        return os.fspath(spec)
    match = _HUB_FILE.match(os.fspath(spec))
    if match is None:
        raise FileNotFoundError(
            f"Checkpoint {spec!r} is not a local file, nor a Hub file of the form 'owner/repo/path/in/repo.bin'."
        )
    return hf_hub_download(match["repo"], match["file"], revision=revision)


# ------------------------------------------------------------------------------------------------------------ card


@dataclass
class _Routes:
    repo_id: str
    base_model: str | None
    kind: str  # "pipeline" | "unet"
    family: str = "sdxl"  # "sdxl" | "sd3"
    t5: bool = True  # an SD3 repo with T5 (`text_encoder_3`)
    max_sequence_length: int | None = None  # an SD3 generator's T5 length, when not diffusers' 256


def _usage_sd3(routes: _Routes) -> str:
    r = routes.repo_id
    no_t5 = "" if routes.t5 else ", text_encoder_3=None, tokenizer_3=None"
    note = "" if routes.t5 else "  # this repo has no T5"
    seq, seq_note = "", ""
    if routes.max_sequence_length not in (None, 256):
        seq = f", max_sequence_length={routes.max_sequence_length}"
        seq_note = (
            f" The generator was trained with {routes.max_sequence_length} T5 tokens: `DisBackSD3Pipeline` reads that "
            "from the repo, the plain-diffusers routes need `max_sequence_length` passed."
        )
    return f"""All three give the same one-step image for the same seed.{seq_note}

### 1. With `diffusers_disback` (`pip install diffusers_disback`)

```python
import torch
from diffusers_disback import DisBackSD3Pipeline

pipe = DisBackSD3Pipeline.from_pretrained("{r}", torch_dtype=torch.bfloat16).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step from pure noise, no CFG
image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=4).images[0]  # 1, .75, .5, .25
```

### 2. Plain diffusers with this repo's pipeline code (no extra package)

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{r}", custom_pipeline="{r}", trust_remote_code=True, torch_dtype=torch.bfloat16
).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars"{seq}).images[0]  # DisBack defaults
```

### 3. Plain diffusers, no remote code

```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained(
    "{r}"{no_t5}, torch_dtype=torch.bfloat16
).to("cuda"){note}
image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=1, guidance_scale=0{seq}).images[0]
# four steps: the same sigmas, but the re-noising draws from torch's global RNG rather than from `generator`
image = pipe("a photo of an astronaut riding a horse on mars", sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=0{seq}).images[0]
```
"""


def _usage(routes: _Routes) -> str:
    if routes.family == "sd3":
        return _usage_sd3(routes)
    r = routes.repo_id
    if routes.kind == "unet":
        base = routes.base_model or "stabilityai/stable-diffusion-xl-base-1.0"
        return f"""### With `diffusers_disback` (`pip install diffusers_disback`)

```python
import torch
from diffusers import UNet2DConditionModel
from diffusers_disback import DisBackPipeline

unet = UNet2DConditionModel.from_pretrained("{r}", subfolder="unet", torch_dtype=torch.float16)
pipe = DisBackPipeline.from_pretrained("{base}", unet=unet, torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step
```

### With plain diffusers

```python
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{r}", subfolder="unet", torch_dtype=torch.float16)
pipe = StableDiffusionXLPipeline.from_pretrained("{base}", unet=unet, torch_dtype=torch.float16).to("cuda")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000)
image = pipe("a photo of an astronaut riding a horse on mars", timesteps=[399], guidance_scale=0).images[0]
```
"""
    return f"""All three give the same images for the same seed.

### 1. With `diffusers_disback` (`pip install diffusers_disback`)

```python
import torch
from diffusers_disback import DisBackPipeline

pipe = DisBackPipeline.from_pretrained("{r}", torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # one step, no CFG
image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=4).images[0]  # 999,749,499,249
```

### 2. Plain diffusers with this repo's pipeline code (no extra package)

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(
    "{r}", custom_pipeline="{r}", trust_remote_code=True, torch_dtype=torch.float16
).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars").images[0]  # DisBack defaults
```

### 3. Plain diffusers, no remote code

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{r}", torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of an astronaut riding a horse on mars", timesteps=[399], guidance_scale=0).images[0]
image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=4, guidance_scale=0).images[0]
```
"""


def _elsewhere(repo_id: str, base_model: str | None, kind: str) -> str:
    """Card section: the generator as a LoRA on another SDXL model, and one-step editing (docs/lora.md,
    docs/editing.md)."""
    base = base_model or "<the SDXL model it was distilled from>"
    lora = f"""## On your own SDXL model (as a LoRA), and editing

```bash
pip install diffusers_disback
disback export-lora {repo_id} --output disback-lora --base-model {base} --rank 64
```

```python
pipe = StableDiffusionXLPipeline.from_pretrained("your/sdxl-model", torch_dtype=torch.float16).to("cuda")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000)
pipe.load_lora_weights("disback-lora", adapter_name="disback")
pipe.set_adapters(["disback"], adapter_weights=[1.0])  # scale 1.0: this generator, on its base
image = pipe("a photo of an astronaut riding a horse on mars", timesteps=[399], guidance_scale=0).images[0]
```

"""
    if kind != "pipeline":
        return lora
    return f"""{lora}One-step img2img and inpainting: `DisBackImg2ImgPipeline.from_pretrained("{repo_id}")` /
`DisBackInpaintPipeline` from `diffusers_disback`, or without the package
`DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="pipeline_img2img", trust_remote_code=True)`
(`"pipeline_inpaint"`).

"""


def _training_table(training: dict | None) -> str:
    if not training:
        return "No training record was attached to this upload.\n"
    rows = ["| setting | value |", "| --- | --- |"]
    for key, value in training.items():
        if re.search(r"token|secret|password|api_key", key, flags=re.IGNORECASE):
            continue  # never publish credentials that slipped into a config
        rows.append(f"| {key} | {json.dumps(value) if not isinstance(value, str) else value} |")
    return "\n".join(rows) + "\n"


def make_model_card(
    repo_id: str,
    *,
    base_model: str | None = None,
    kind: str = "pipeline",
    license: str | None = None,
    training: dict | None = None,
    sample_prompts: list[str] | tuple[str, ...] | None = None,
    samples_file: str | None = SAMPLES_FILE,
    family: str = "sdxl",
    t5: bool = True,
    max_sequence_length: int | None = None,
) -> ModelCard:
    """
    The model card of a DisBack repo: Hub metadata (`library_name: diffusers`, `pipeline_tag: text-to-image`,
    `base_model`, tags, license), a usage snippet for each loading route, sample images and the training record.

    `family="sd3"` writes the card of a `DisBackSD3Pipeline` repo (SD3 / SD3.5 teacher, tag `stable-diffusion-3`, the
    `StableDiffusion3Pipeline` routes; `t5=False` when the repo has no T5, so that the plain-diffusers route passes
    `text_encoder_3=None, tokenizer_3=None`; `max_sequence_length`, the generator's T5 length, is then passed in the
    plain-diffusers snippets when it is not 256). `license=None` names the family's default ([`DEFAULT_LICENSES`]).
    """
    if kind not in ("pipeline", "unet"):
        raise ValueError(f"kind must be 'pipeline' or 'unet', got {kind!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family == "sd3" and kind != "pipeline":
        raise ValueError("an SD3 repo holds the whole pipeline: kind must be 'pipeline' (an SD3 model has no UNet)")
    license_data = DEFAULT_LICENSES[family] if license is None else {"license": license}
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="text-to-image",
        **license_data,
        base_model=base_model,
        tags=list(SD3_CARD_TAGS if family == "sd3" else CARD_TAGS),
    )
    samples = ""
    if samples_file and sample_prompts:
        prompts = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(sample_prompts))
        samples = f"## Samples\n\n![samples]({samples_file})\n\nOne step, seed 0, prompts:\n\n{prompts}\n\n"
    name = repo_id.split("/")[-1]
    teacher = "an SD3 / SD3.5 teacher" if family == "sd3" else "an SDXL teacher"
    if family == "sd3":
        sampling = (
            "Sampled in one step from pure noise (sigma 1, transformer timestep 1000), without classifier-free "
            "guidance; four steps use sigmas 1, 0.75, 0.5, 0.25, re-noising the x0 prediction in between."
        )
        if not t5:
            sampling += " This repo has no T5 encoder: the T5 half of the prompt embedding is zeros."
    else:
        sampling = (
            "Sampled in one step at timestep 399 from pure noise, without classifier-free guidance; "
            "four steps use timesteps 999, 749, 499, 249."
        )
    content = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {name}\n\n"
        "A one-step text-to-image generator distilled from "
        f"{('[' + base_model + '](https://huggingface.co/' + base_model + ')') if base_model else teacher} "
        "by **Distribution Backtracking** (DisBack, Zhang et al., ICLR 2025): distribution-matching distillation "
        "whose target walks back along the recorded degradation path from the initial generator to the teacher. "
        f"{sampling}\n\n"
        f"## Usage\n\n{_usage(_Routes(repo_id, base_model, kind, family, t5, max_sequence_length))}\n"
        f"{_elsewhere(repo_id, base_model, kind) if family == 'sdxl' else ''}"
        f"{samples}"
        f"## Training\n\n{_training_table(training)}\n"
        "Made with [diffusers_disback](https://github.com/diffusers-disback/diffusers_disback).\n"
    )
    return ModelCard(content)


# ---------------------------------------------------------------------------------------------------------- saving


def _sample_grid(pipeline, prompts, seed: int = 0):
    from .images import image_grid

    images = []
    for prompt in prompts:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images.append(pipeline(prompt, generator=generator).images[0])
    return image_grid(images)


def write_fp16_variant(folder: str | os.PathLike) -> list[str]:
    """
    Writes an fp16 copy of every component's weights next to it (`*.fp16.safetensors`, the name diffusers and
    transformers load with `variant="fp16"`), one component at a time. Returns the files written.
    """
    from safetensors.torch import load_file, save_file

    written = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext != ".safetensors" or "." in stem:  # skip variants and shards' index files
                continue
            if re.search(r"-\d{5}-of-\d{5}$", stem):
                raise NotImplementedError(
                    f"{os.path.join(root, name)} is a shard; save with a larger `max_shard_size` to write an fp16 "
                    "variant."
                )
            state = load_file(os.path.join(root, name))
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            target = os.path.join(root, f"{stem}.fp16.safetensors")
            atomic_write(target, lambda tmp, state=state: save_file(state, tmp, metadata={"format": "pt"}))
            written.append(target)
    return written


def save_for_hub(
    pipeline,
    save_directory: str | os.PathLike,
    repo_id: str,
    *,
    kind: str = "pipeline",
    base_model: str | None = None,
    fp16_variant: bool = False,
    license: str | None = None,
    training: dict | None = None,
    sample_prompts: list[str] | tuple[str, ...] | None = DEFAULT_SAMPLE_PROMPTS,
) -> str:
    """
    Writes the folder a DisBack repo holds: the pipeline (`kind="pipeline"`) or only `unet/` (`kind="unet"`, the base
    model referenced in the card), an optional fp16 variant, `samples.png` and `README.md`. Returns the folder.

    An SD3 / SD3.5 pipeline (`DisBackSD3Pipeline`) is saved whole (`kind="pipeline"` only), in the SD3 layout, with
    the SD3 card ([`make_model_card`] with `family="sd3"`). `license=None` names the family's default license.
    """
    save_directory = os.fspath(save_directory)
    if _family_of(pipeline) == "sd3" and kind != "pipeline":
        raise ValueError("an SD3 pipeline has no UNet: save it with kind='pipeline' (the transformer and the rest)")
    os.makedirs(save_directory, exist_ok=True)
    if kind == "pipeline":
        pipeline.save_pretrained(save_directory)
    elif kind == "unet":
        pipeline.unet.save_pretrained(os.path.join(save_directory, "unet"))
    else:
        raise ValueError(f"kind must be 'pipeline' or 'unet', got {kind!r}")
    if fp16_variant:
        write_fp16_variant(save_directory)
    _write_card(pipeline, save_directory, repo_id, base_model, kind, license, training, sample_prompts)
    return save_directory


def append_card_section(folder: str | os.PathLike, title: str, rows: dict, note: str = "") -> str:
    """Appends a `## title` section with a two-column table of `rows` (and a `note` under it) to the model card
    `folder/README.md`, e.g. evaluation numbers measured after the folder was written. Returns the card's path."""
    table = "| metric | value |\n| --- | --- |\n" + "".join(
        f"| {k} | {f'{v:.3f}' if isinstance(v, float) else v} |\n" for k, v in rows.items()
    )
    return append_card_markdown(folder, title, f"{table}\n{note.strip()}\n" if note else table)


def append_card_markdown(folder: str | os.PathLike, title: str, markdown: str) -> str:
    """Appends a `## title` section with `markdown` to the model card `folder/README.md`; returns the card's path."""
    path = os.path.join(os.fspath(folder), "README.md")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {title}\n\n{markdown.rstrip()}\n")
    return path


def _write_card(pipeline, folder, repo_id, base_model, kind, license, training, sample_prompts) -> None:
    """`samples.png` (rendered by the pipeline) and `README.md` of a repo folder."""
    if base_model is None and pipeline is not None:
        base_model = _base_model_of(pipeline)
    if pipeline is not None and sample_prompts:
        _sample_grid(pipeline, list(sample_prompts)).save(os.path.join(folder, SAMPLES_FILE))
    family = _family_of(pipeline)
    card = make_model_card(
        repo_id,
        base_model=base_model,
        kind=kind,
        license=license,
        training=training,
        sample_prompts=sample_prompts,
        family=family,
        t5=family != "sd3" or getattr(pipeline, "text_encoder_3", None) is not None,
        max_sequence_length=getattr(pipeline, "default_max_sequence_length", None),
    )
    card.save(os.path.join(folder, "README.md"))


def _family_of(pipeline) -> str:
    """`"sd3"` for an SD3 / SD3.5 pipeline (an MMDiT `transformer` and a `text_encoder_3` slot), else `"sdxl"`."""
    components = getattr(pipeline, "components", None) or {}
    return "sd3" if "transformer" in components and "text_encoder_3" in components else "sdxl"


def _base_model_of(pipeline) -> str | None:
    name = getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path")
    # a local folder is no Hub reference
    return name if isinstance(name, str) and _HUB_FILE.match(name + "/x") and not os.path.exists(name) else None


# --------------------------------------------------------------------------------------------------------- pushing


def _retryable(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status >= 500 or status in (408, 429)
    return isinstance(error, (ConnectionError, TimeoutError, OSError)) or type(error).__module__.startswith("httpx")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload DisBack pipeline",
    path_in_repo: str | None = None,
    max_retries: int = 3,
    retry_wait: float = 2.0,
    api: HfApi | None = None,
) -> str:
    """
    Uploads a folder to a model repo in one commit, creating the repo if needed, with retries on server and network
    errors (waiting `retry_wait`, doubling each time). A commit is atomic on the Hub: a push that fails leaves the
    repo as it was and the local folder untouched.

    Returns:
        The URL of the commit.

    Raises:
        HubPushError: the push failed after `max_retries` retries (or at once, for errors that retrying cannot fix,
            such as authentication or permission errors); the message names the local folder.
    """
    api = api or HfApi(token=token)
    folder = os.fspath(folder)
    attempt = 0
    while True:
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                path_in_repo=path_in_repo,
                commit_message=commit_message,
                repo_type="model",
            )
            return str(getattr(info, "commit_url", info))
        except Exception as e:  # noqa: BLE001 - classified below, re-raised with context
            attempt += 1
            if not _retryable(e) or attempt > max_retries:
                raise HubPushError(
                    f"Pushing {folder!r} to {repo_id!r} failed after {attempt} attempt(s): "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                    "The local folder is intact; push it again with `disback push` or `push_folder`."
                ) from e
            wait = retry_wait * 2 ** (attempt - 1)
            logger.warning(
                "Push to %s failed (%s: %s); retry %d/%d in %.1fs.",
                repo_id,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                attempt,
                max_retries,
                wait,
            )
            time.sleep(wait)


def push_pipeline(
    pipeline,
    repo_id: str,
    *,
    save_directory: str | os.PathLike | None = None,
    kind: str = "pipeline",
    base_model: str | None = None,
    fp16_variant: bool = False,
    license: str | None = None,
    training: dict | None = None,
    sample_prompts=DEFAULT_SAMPLE_PROMPTS,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload DisBack pipeline",
    max_retries: int = 3,
    retry_wait: float = 2.0,
) -> str:
    """
    Saves a pipeline in the DisBack Hub layout (see [`save_for_hub`]) and pushes it (see [`push_folder`]).

    With `save_directory=None` the folder is a temporary one, removed after a successful push; after a failed push it
    is kept and its path is in the error, so nothing is lost.
    """
    folder = os.fspath(save_directory) if save_directory is not None else tempfile.mkdtemp(prefix="disback-push-")
    save_for_hub(
        pipeline,
        folder,
        repo_id,
        kind=kind,
        base_model=base_model,
        fp16_variant=fp16_variant,
        license=license,
        training=training,
        sample_prompts=sample_prompts,
    )
    url = push_folder(
        folder,
        repo_id,
        private=private,
        token=token,
        commit_message=commit_message,
        max_retries=max_retries,
        retry_wait=retry_wait,
    )
    if save_directory is None:
        shutil.rmtree(folder, ignore_errors=True)
    return url


# ----------------------------------------------------------------------------------------------------------- Space

# The Gradio the Space runs (its `sdk_version`): the release tests/test_app.py drives in a browser.
SPACE_SDK_VERSION = "6.31.0"
# What the Space installs besides Gradio (which the Hub installs from `sdk_version`): the app needs only these.
SPACE_REQUIREMENTS = ("torch", "diffusers>=0.32", "transformers>=4.44", "accelerate>=1.0", "safetensors>=0.4.3")
SPACE_APP_FILE = "app.py"


def space_app_source(model_repo_id: str, tiny_vae: str | None = None) -> str:
    """The Space's `app.py`: `diffusers_disback/app.py` with `DEFAULT_MODEL` (and `DEFAULT_TINY_VAE`) written in."""
    from . import app

    with open(app.__file__, encoding="utf-8") as f:
        source = f.read()
    for name, value in (("DEFAULT_MODEL", model_repo_id), ("DEFAULT_TINY_VAE", tiny_vae)):
        pattern = re.compile(rf"^{name}: str \| None = None$", flags=re.MULTILINE)
        source, n = pattern.subn(lambda _m, name=name, value=value: f"{name}: str | None = {value!r}", source)
        if n != 1:
            raise RuntimeError(f"{app.__file__} has no single `{name}: str | None = None` line to write the id into")
    return source


def make_space_card(
    model_repo_id: str,
    space_id: str,
    *,
    title: str | None = None,
    sdk_version: str = SPACE_SDK_VERSION,
    license: str = "openrail++",
    hardware: str | None = None,
    tiny_vae: str | None = None,
):
    """
    The Space's `README.md`: the front matter the Hub reads (`sdk: gradio`, `sdk_version`, `app_file: app.py`,
    `models`, `title`, ...) and a short description with how to run the same app locally.
    """
    from huggingface_hub import SpaceCard, SpaceCardData

    models = [model_repo_id] + ([tiny_vae] if tiny_vae and _HUB_FILE.match(tiny_vae + "/x") else [])
    title = title or f"DisBack: {model_repo_id.split('/')[-1]}"
    data = SpaceCardData(
        title=title,
        emoji="⚡",
        colorFrom="indigo",
        colorTo="purple",
        sdk="gradio",
        sdk_version=sdk_version,
        app_file=SPACE_APP_FILE,
        pinned=False,
        license=license,
        models=models,
        tags=["disback", "one-step", "text-to-image", "stable-diffusion-xl"],
        short_description="One-step text-to-image, generated as you type",
        suggested_hardware=hardware,
    )
    fast = f" Fast decode uses [{tiny_vae}](https://huggingface.co/{tiny_vae})." if tiny_vae in models else ""
    content = (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {title}\n\n"
        f"A web app for [{model_repo_id}](https://huggingface.co/{model_repo_id}), a one-step SDXL generator distilled "
        "by **Distribution Backtracking** (DisBack): type a prompt and the image follows as you type. One step "
        "samples at timestep 399 from pure noise; 2 and 4 steps at timesteps evenly spaced down from 999; no "
        f"classifier-free guidance.{fast}\n\n"
        "## Run it yourself\n\n"
        "```bash\n"
        "pip install 'diffusers_disback[app]'\n"
        f"disback app {model_repo_id}\n"
        "```\n\n"
        f"or, with only torch, diffusers, transformers and gradio: `python app.py` (this Space's {SPACE_APP_FILE} "
        "is `diffusers_disback/app.py` with the model id written in).\n\n"
        f"Made with [diffusers_disback](https://github.com/diffusers-disback/diffusers_disback) (`disback push "
        f"--space {space_id}`).\n"
    )
    return SpaceCard(content)


def push_space(
    model_repo_id: str,
    space_id: str,
    *,
    tiny_vae: str | None = None,
    title: str | None = None,
    sdk_version: str = SPACE_SDK_VERSION,
    license: str = "openrail++",
    hardware: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload DisBack app",
    max_retries: int = 3,
    retry_wait: float = 2.0,
    api: HfApi | None = None,
) -> str:
    """
    Creates (or updates) a Gradio Space that serves the DisBack model `model_repo_id`: `app.py` (the package's
    `app.py` with the model id written in), `requirements.txt` and a `README.md` with the Space front matter, in one
    commit, with the retries of [`push_folder`]. The files are built in memory: nothing is written locally.

    Args:
        model_repo_id: the DisBack model repo the Space loads.
        space_id: `owner/name` of the Space.
        tiny_vae: an `AutoencoderTiny` repo id (TAESD-XL layout, e.g. `madebyollin/taesdxl`) for fast decode; by
            default the app uses the model repo's `vae_tiny/` when it has one.
        hardware: written as `suggested_hardware` (e.g. `"t4-small"`); the Space starts on the free CPU otherwise.

    Returns:
        The URL of the commit.

    Raises:
        HubPushError: the push failed after `max_retries` retries (or at once for errors retrying cannot fix); the
            Space is left as it was.
    """
    from huggingface_hub import CommitOperationAdd

    api = api or HfApi(token=token)
    files = {
        SPACE_APP_FILE: space_app_source(model_repo_id, tiny_vae),
        "requirements.txt": "\n".join(SPACE_REQUIREMENTS) + "\n",
        "README.md": str(
            make_space_card(
                model_repo_id,
                space_id,
                title=title,
                sdk_version=sdk_version,
                license=license,
                hardware=hardware,
                tiny_vae=tiny_vae,
            )
        ),
    }

    def push() -> str:
        api.create_repo(space_id, private=private, exist_ok=True, repo_type="space", space_sdk="gradio")
        operations = [CommitOperationAdd(path, text.encode("utf-8")) for path, text in files.items()]
        info = api.create_commit(space_id, operations, commit_message=commit_message, repo_type="space")
        return str(getattr(info, "commit_url", info))

    return _with_retries(push, f"the Space {space_id!r} (for {model_repo_id!r})", max_retries, retry_wait)


def _with_retries(action, what: str, max_retries: int, retry_wait: float) -> str:
    """Runs `action` with `push_folder`'s retry policy; a final failure raises HubPushError naming `what`."""
    attempt = 0
    while True:
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised with context
            attempt += 1
            first_line = str(e).splitlines()[0] if str(e) else ""
            if not _retryable(e) or attempt > max_retries:
                raise HubPushError(
                    f"Pushing {what} failed after {attempt} attempt(s): {type(e).__name__}: {first_line}. "
                    "A commit is all or nothing: the repo's files are as they were, nothing was written locally; "
                    "run the push again."
                ) from e
            wait = retry_wait * 2 ** (attempt - 1)
            logger.warning(
                "Push of %s failed (%s: %s); retry %d/%d in %.1fs.",
                what,
                type(e).__name__,
                first_line,
                attempt,
                max_retries,
                wait,
            )
            time.sleep(wait)
