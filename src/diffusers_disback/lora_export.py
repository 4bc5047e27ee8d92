"""
A DisBack generator as a LoRA that `pipe.load_lora_weights(...)` loads on the SDXL base it was distilled from, and on
other SDXL fine-tunes (docs/lora.md). An SD3 / SD3.5 generator (a `DisBackSD3Pipeline` folder) exports the same way,
as a transformer LoRA in diffusers' SD3 format (`StableDiffusion3Pipeline.load_lora_weights`), without a kohya file.

    from diffusers_disback.lora_export import export_lora

    report = export_lora("my-run/final", "my-run/lora", base_model="stabilityai/stable-diffusion-xl-base-1.0",
                         energy=0.9)

Two sources:

- a LoRA-mode run (`train_disback_sdxl.py --lora_rank r`) writes the trained adapter itself into
  `final/generator_lora/` ([`save_run_adapter`]); exporting copies it (exact: base + adapter is the generator);
- a fully fine-tuned generator: every `nn.Linear` / `nn.Conv2d` weight that differs from the base is factored by a
  truncated SVD of `W_generator - W_base` ([`extract_lora`]), at a fixed rank or at the smallest rank per layer that
  keeps a fraction `energy` of the difference's squared singular values. A changed bias of such a layer travels
  exactly as `lora_B.bias` if asked (peft's `lora_bias`; such a LoRA cannot be fused, so it is off by default); what
  the LoRA does not carry (biases by default, normalisation layers always) is reported.

Files (diffusers' LoRA format, read by `load_lora_weights`): `pytorch_lora_weights.safetensors`; with `kohya=True`
also `pytorch_lora_weights_kohya.safetensors`, written by diffusers' own `convert_state_dict_to_kohya` (no key table
of ours): the `lora_unet_*` / `lora_down` / `lora_up` / `alpha` layout that kohya-style tools read, for the layers of
the UNet's down, mid and up blocks (diffusers reads exactly those back; module names outside the blocks, such as
`add_embedding`, do not survive its key conversion, so they are left out of that file and reported).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
REPORT_NAME = "lora_export.json"
# where a LoRA-mode training run keeps its generator's adapter, inside the final pipeline folder
RUN_ADAPTER_DIR = "generator_lora"
_KOHYA_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")

__all__ = [
    "KOHYA_WEIGHTS_NAME",
    "LORA_WEIGHTS_NAME",
    "LayerReport",
    "LoraExport",
    "RUN_ADAPTER_DIR",
    "compare_one_step",
    "export_lora",
    "extract_lora",
    "save_lora",
    "save_run_adapter",
]


@dataclass
class LayerReport:
    """One layer of an extracted LoRA: its rank and the relative Frobenius error `|dW - B A| / |dW|`."""

    name: str
    shape: list[int]
    rank: int
    relative_error: float
    delta_norm: float
    bias: bool = False


@dataclass
class LoraExport:
    """What [`export_lora`] wrote and measured (also saved as `lora_export.json` beside the weights)."""

    folder: str
    source: str  # "adapter" (a LoRA-mode run) or "svd" (extracted from a full fine-tune)
    size_bytes: int
    layers: list[LayerReport] = field(default_factory=list)
    not_representable: dict[str, float] = field(default_factory=dict)  # parameter -> |delta| / |weight|
    kohya_file: str | None = None
    kohya_left_out: list[str] = field(default_factory=list)
    one_step_difference: dict[str, float] | None = None
    settings: dict = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def summary(self) -> dict:
        """The numbers a model card or a closing note quotes."""
        errors = sorted(layer.relative_error for layer in self.layers)
        out = {
            "source": self.source,
            "size_mb": round(self.size_bytes / 2**20, 3),
            "layers": len(self.layers),
            "rank_min": min(self.ranks, default=0),
            "rank_max": max(self.ranks, default=0),
            "relative_error_median": errors[len(errors) // 2] if errors else 0.0,
            "relative_error_max": errors[-1] if errors else 0.0,
            "not_representable_parameters": len(self.not_representable),
        }
        if self.one_step_difference:
            out.update({f"one_step_{k}": v for k, v in self.one_step_difference.items()})
        return out

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2)


# ------------------------------------------------------------------------------------------------------ extraction


def _rank_for(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:  # never above the difference's numerical rank: zero singular values carry nothing
        numerical = int((s > s[0] * 1e-4).sum()) if s[0] > 0 else 1
        return max(1, min(rank, numerical))
    kept = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def _check_choice(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (e.g. 64) and energy (e.g. 0.9)")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")


def _factor(delta: torch.Tensor, rank: int | None, energy: float | None):
    """`(lora_A, lora_B, rank, relative error)` of a Linear (2-D) or Conv2d (4-D) weight difference."""
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = _rank_for(s, rank, energy)
    root = s[:r].sqrt()
    lora_b, lora_a = u[:, :r] * root, root[:, None] * vh[:r]
    if delta.ndim == 4:
        lora_a = lora_a.reshape(r, *delta.shape[1:])
        lora_b = lora_b.reshape(delta.shape[0], r, 1, 1)
    total = float((s.double() ** 2).sum())
    error = float((s[r:].double() ** 2).sum() / total) ** 0.5 if total > 0 else 0.0
    return lora_a.contiguous().cpu(), lora_b.contiguous().cpu(), r, error


def _not_carried(generator: nn.Module, base: nn.Module, carried: set[str]) -> dict[str, float]:
    base_params = dict(base.named_parameters())
    lost = {}
    for name, param in generator.named_parameters():
        if name not in carried:
            before = base_params[name].float()
            change = (param.float() - before.to(param.device)).norm()
            if change > 0:
                lost[name] = float(change / before.norm().clamp_min(1e-12))
    return lost


def _bias_delta(module: nn.Module, other: nn.Module, device) -> torch.Tensor | None:
    if module.bias is None:
        return None
    delta = module.bias.float().to(device) - other.bias.float().to(device)
    return delta if delta.any() else None


@torch.no_grad()
def extract_lora(
    generator: nn.Module,
    base: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    device: str | torch.device | None = None,
    biases: bool = False,
) -> tuple[dict[str, torch.Tensor], list[LayerReport], dict[str, float]]:
    """
    A LoRA of `generator - base` (two modules of one architecture, e.g. two `UNet2DConditionModel`s).

    Every `nn.Linear` and `nn.Conv2d` whose weight differs gets `lora_A` / `lora_B` from a truncated SVD of the
    difference (a convolution's kernel flattened to `out x (in k k)`: `lora_A` is a convolution with the layer's kernel,
    `lora_B` a 1x1 one, as peft builds them), split as `B = U sqrt(S)`, `A = sqrt(S) Vh`. Give `rank` (the same for
    every layer, capped by the difference's numerical rank: singular values below 1e-4 of the largest, float32 rounding of the difference, are dropped) or `energy` in (0, 1] (per layer, the smallest rank whose singular values
    keep that fraction of `|dW|^2`; 1.0 reproduces the difference exactly). With `biases`, a changed bias becomes
    `lora_B.bias` (peft's `lora_bias`, which then covers every layer: such a LoRA loads and runs, but peft cannot fuse
    it into layers that have no bias of their own); without, changed biases are reported as not carried.

    Returns the state dict (peft keys, `<module>.lora_A.weight`), a [`LayerReport`] per layer, and the parameters that
    changed but the LoRA does not carry (`name -> |delta| / |weight|`).
    """
    _check_choice(rank, energy)
    base_modules = dict(base.named_modules())
    state, layers, carried = {}, [], set()
    for name, module in generator.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        other = base_modules.get(name)
        if other is None or other.weight.shape != module.weight.shape:
            raise ValueError(
                f"the generator and the base differ in architecture at {name!r} "
                f"({tuple(module.weight.shape)} vs {None if other is None else tuple(other.weight.shape)}): "
                "extract from the base the generator was distilled from"
            )
        carried.add(f"{name}.weight")
        delta = module.weight.float().to(device) - other.weight.float().to(device)
        bias_delta = _bias_delta(module, other, device) if biases else None
        if biases and module.bias is not None:
            carried.add(f"{name}.bias")
        if not delta.any() and bias_delta is None:
            continue
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"], r, error = _factor(delta, rank, energy)
        if bias_delta is not None:
            state[f"{name}.lora_B.bias"] = bias_delta.cpu()
        norm = float(delta.norm())
        layers.append(LayerReport(name, list(delta.shape), r, error, norm, bias=bias_delta is not None))
    if any(k.endswith(".lora_B.bias") for k in state):
        # peft's lora_bias is all or nothing: every layer gets a lora_B bias (zero where nothing changed), else the
        # loader leaves the missing ones uninitialised
        for key in [k for k in state if k.endswith(".lora_B.weight")]:
            state.setdefault(key[: -len("weight")] + "bias", torch.zeros(state[key].shape[0]))
    return state, layers, _not_carried(generator, base, carried)


# -------------------------------------------------------------------------------------------------------- writing


def save_lora(
    state: dict[str, torch.Tensor], folder: str | os.PathLike, kohya: bool = True, family: str = "sdxl"
) -> tuple[str, list[str]]:
    """
    Writes a UNet LoRA (peft keys) in diffusers' format (`pytorch_lora_weights.safetensors`) and, with `kohya`, the
    kohya-style file of its down/mid/up-block layers. Returns the folder and the layers left out of the kohya file.
    `family="sd3"`: an SD3 transformer's LoRA in diffusers' SD3 format (`transformer.` keys, what
    `StableDiffusion3Pipeline.load_lora_weights` reads); diffusers has no kohya conversion for SD3, so none is written.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    if family == "sd3":
        StableDiffusion3Pipeline.save_lora_weights(
            folder, transformer_lora_layers=state, weight_name=LORA_WEIGHTS_NAME
        )
        return folder, []
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, weight_name=LORA_WEIGHTS_NAME)
    left_out = []
    if kohya:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        blocks = {f"unet.{k}": v for k, v in state.items() if k.startswith(_KOHYA_BLOCKS) and k.endswith(".weight")}
        left_out = sorted({k.rsplit(".lora_", 1)[0] for k in state if not k.startswith(_KOHYA_BLOCKS)})
        left_out += sorted({k.rsplit(".lora_", 1)[0] for k in state if k.endswith(".bias")})  # no bias in kohya
        kohya_state = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(blocks).items()}
        tmp = os.path.join(folder, KOHYA_WEIGHTS_NAME + ".tmp")
        save_file(
            kohya_state, tmp, metadata={"format": "pt", "converted_with": "diffusers convert_state_dict_to_kohya"}
        )
        os.replace(tmp, os.path.join(folder, KOHYA_WEIGHTS_NAME))
    return folder, left_out


def save_run_adapter(
    full_state: dict[str, torch.Tensor], folder: str | os.PathLike, adapter_name: str, family: str = "sdxl"
) -> str:
    """
    The LoRA-mode training run's generator adapter (`adapter_name`'s weights in a gathered peft state dict), in
    diffusers' LoRA format in `folder` (the training script writes `final/generator_lora/`). `lora_alpha` equals the
    rank in training (scaling 1), which is what `load_lora_weights` assumes for a file without alphas.
    """
    from .distill.lora import lora_state_dict

    adapter = {k: v.float().contiguous() for k, v in lora_state_dict(full_state, adapter_name).items()}
    if not adapter:
        raise ValueError(f"no weights of adapter {adapter_name!r} in the state dict")
    save_lora(adapter, folder, kohya=True, family=family)
    return os.fspath(folder)


# ------------------------------------------------------------------------------------------------------- checking


@torch.no_grad()
def compare_one_step(full_pipe, lora_pipe, prompts: list[str], seed: int = 0, **kwargs) -> dict[str, float]:
    """The largest and mean absolute difference (images in [0, 1]) between two pipelines' samples of `prompts`, image
    `i` from seed `seed + i`."""
    worst, total, count = 0.0, 0.0, 0
    for i, prompt in enumerate(prompts):
        images = []
        for pipe in (full_pipe, lora_pipe):
            g = torch.Generator("cpu").manual_seed(seed + i)
            images.append(torch.from_numpy(pipe(prompt, generator=g, output_type="np", **kwargs).images[0]))
        diff = (images[0].float() - images[1].float()).abs()
        worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    return {"max_abs": worst, "mean_abs": total / count}


# -------------------------------------------------------------------------------------------------------- export


def _folder_size(folder: str, names: tuple[str, ...] = (LORA_WEIGHTS_NAME,)) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names if os.path.exists(os.path.join(folder, n)))


def _family(model: str) -> str:
    """`"sd3"` when `model` (a pipeline folder or Hub id) holds an MMDiT `transformer`, else `"sdxl"`."""
    from diffusers import DiffusionPipeline

    return "sd3" if "transformer" in DiffusionPipeline.load_config(model) else "sdxl"


_DENOISERS = {"sdxl": "unet", "sd3": "transformer"}


def _load_denoiser(source: str, family: str) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls = SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel
    return cls.from_pretrained(source, subfolder=_DENOISERS[family], torch_dtype=torch.float32)


def export_lora(
    model: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    kohya: bool = True,
    check_prompts: list[str] | None = None,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    biases: bool = False,
) -> LoraExport:
    """
    Writes `model` (a DisBack pipeline folder or Hub id) as a LoRA in `output_dir` and returns what was measured.

    A folder with `generator_lora/` (a LoRA-mode run) exports that adapter as it is. Otherwise `base_model` (the SDXL
    model the generator was distilled from: a folder or Hub id with `unet/`) is required, and `rank` or `energy`
    chooses the factorisation ([`extract_lora`]). With `check_prompts`, the base with the LoRA and the full generator
    sample them (one step, seeds `0 + i`) and their largest and mean difference is reported. `lora_export.json` holds
    the report. An SD3 / SD3.5 folder (a `transformer/`) gives a transformer LoRA in diffusers' SD3 format and no
    kohya file (diffusers has no kohya conversion for SD3).
    """
    model, output_dir = os.fspath(model), os.fspath(output_dir)
    if check_prompts and base_model is None:
        raise ValueError("checking the LoRA against the generator needs the base model it goes on (--base-model)")
    family = _family(model)
    kohya = kohya and family == "sdxl"
    local_adapter = os.path.join(model, RUN_ADAPTER_DIR)
    settings = {"model": model, "base_model": base_model, "rank": rank, "energy": energy, "biases": biases,
                "family": family}  # fmt: skip
    if os.path.isdir(local_adapter) and rank is None and energy is None:
        os.makedirs(output_dir, exist_ok=True)
        for name in (LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME):
            if os.path.exists(os.path.join(local_adapter, name)):
                shutil.copyfile(os.path.join(local_adapter, name), os.path.join(output_dir, name))
        from safetensors.torch import load_file

        adapter = load_file(os.path.join(output_dir, LORA_WEIGHTS_NAME))
        prefix = _DENOISERS[family] + "."
        layers = [
            LayerReport(k[len(prefix) : -len(".lora_A.weight")], list(v.shape), v.shape[0], 0.0, 0.0)
            for k, v in adapter.items()
            if k.endswith(".lora_A.weight")
        ]
        result = LoraExport(output_dir, "adapter", _folder_size(output_dir), layers, settings=settings)
        result.kohya_file = (
            KOHYA_WEIGHTS_NAME if os.path.exists(os.path.join(output_dir, KOHYA_WEIGHTS_NAME)) else None
        )
    else:
        if base_model is None:
            raise ValueError(
                f"{model} holds a fully fine-tuned generator (no {RUN_ADAPTER_DIR}/ from a --lora_rank run): give the "
                "base model it was distilled from (--base-model) and --rank or --energy"
            )
        if rank is None and energy is None:
            energy = settings["energy"] = 0.9
        generator, base = _load_denoiser(model, family), _load_denoiser(base_model, family)
        state, layers, lost = extract_lora(generator, base, rank, energy, device, biases)
        if not state:
            raise ValueError(
                f"{model}'s {_DENOISERS[family]} does not differ from {base_model}'s: there is nothing to export"
            )
        _, left_out = save_lora(state, output_dir, kohya, family=family)
        result = LoraExport(output_dir, "svd", _folder_size(output_dir), layers, lost, settings=settings)
        result.kohya_file, result.kohya_left_out = (KOHYA_WEIGHTS_NAME if kohya else None), left_out
        del generator, base
    if check_prompts:
        result.one_step_difference = _check(model, output_dir, base_model, check_prompts, device, torch_dtype, family)
    with open(os.path.join(output_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write(result.to_json())
    return result


def _check(model, lora_dir, base_model, prompts, device, torch_dtype, family="sdxl") -> dict[str, float]:
    if family == "sd3":
        from .evaluation.evaluate import load_sd3_pipeline

        full = load_sd3_pipeline(model, torch_dtype=torch_dtype)
    else:
        from .pipeline_disback import DisBackPipeline

        full = DisBackPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    full.to(device).set_progress_bar_config(disable=True)
    name = _DENOISERS[family]
    denoiser = getattr(full, name)
    base = _load_denoiser(base_model, family).to(device, denoiser.dtype)
    with_lora = type(full)(**{**full.components, name: base})
    if family == "sd3":
        with_lora.default_max_sequence_length = full.default_max_sequence_length
    with_lora.set_progress_bar_config(disable=True)
    with_lora.load_lora_weights(lora_dir, weight_name=LORA_WEIGHTS_NAME, adapter_name="disback")
    return compare_one_step(full, with_lora, prompts)


# ---------------------------------------------------------------------------------------------------------- card


def write_lora_card(
    folder: str | os.PathLike,
    export: LoraExport,
    repo_id: str,
    base_model: str | None = None,
    conditioning_timestep: int = 399,
) -> str:
    """`README.md` of a LoRA repo: what it is, how to use it on the base and on another SDXL model (scale 1.0
    reproduces the generator on its base), and the numbers [`export_lora`] measured. Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    from .hub import DEFAULT_LICENSES

    folder = os.fspath(folder)
    hub_base = base_model if base_model and not os.path.exists(base_model) else None
    sd3 = export.settings.get("family") == "sd3"
    data = ModelCardData(
        library_name="diffusers",
        **DEFAULT_LICENSES["sd3" if sd3 else "sdxl"],
        base_model=hub_base,
        tags=["disback", "lora", "one-step", "stable-diffusion-3" if sd3 else "stable-diffusion-xl", "text-to-image",
              "diffusers"],
    )  # fmt: skip
    summary = export.summary()
    rows = "".join(f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |\n" for k, v in summary.items())
    how = (
        "the trained adapter of a LoRA-mode run (`--lora_rank`): exact"
        if export.source == "adapter"
        else f"a truncated SVD of (generator - base) per layer ({_choice(export.settings)})"
    )
    lost = ""
    if export.not_representable:
        worst = max(export.not_representable.values())
        lost = (
            f"\n{len(export.not_representable)} changed parameters are not carried by the LoRA (biases unless "
            f"exported with biases, normalisation layers); the largest relative change among them is {worst:.3g}.\n"
        )
    kohya = ""
    if export.kohya_file:
        kohya = (
            f"\n`{export.kohya_file}` holds the same LoRA's down/mid/up-block layers in the kohya-style layout "
            "(`lora_unet_*`, `lora_down`/`lora_up`, `alpha`), written by diffusers' `convert_state_dict_to_kohya`"
            + (
                f"; left out of it: {len(export.kohya_left_out)} layers outside the blocks"
                if export.kohya_left_out
                else ""
            )
            + ".\n"
        )
    base_line = f"`{base_model}`" if base_model else "the SDXL model the generator was distilled from"
    if sd3:
        return _write_sd3_lora_card(folder, data, repo_id, base_model, how, rows, lost)
    text = f"""---
{data.to_yaml()}
---

# {repo_id}

A one-step SDXL generator distilled with DisBack (Distribution Backtracking), as a LoRA over {base_line}: {how}.
One step at timestep {conditioning_timestep}, no classifier-free guidance.

## Use on your own SDXL model

```python
import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("your/sdxl-model", torch_dtype=torch.float16).to("cuda")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=1000)
pipe.load_lora_weights("{repo_id}", adapter_name="disback")
pipe.set_adapters(["disback"], adapter_weights=[1.0])  # 1.0 reproduces the generator on its base
image = pipe("a photo of an astronaut riding a horse on mars", timesteps=[{conditioning_timestep}], guidance_scale=0).images[0]
```

Scale 1.0 is the distilled generator itself on {base_line}; on another SDXL fine-tune the LoRA adds the same
difference to that model's weights, and a lower scale trades the one-step sharpness for more of the fine-tune's own
look. `pipe.fuse_lora(lora_scale=1.0)` bakes it in. With `diffusers_disback` installed,
`DisBackPipeline.from_pipe(pipe)` samples the DisBack timesteps without passing them.

## Measured at export

| figure | value |
| --- | --- |
{rows}{lost}{kohya}
See docs/lora.md of the `diffusers_disback` package for how these are measured.
"""
    path = os.path.join(folder, "README.md")
    ModelCard(text).save(path)
    return path


def _write_sd3_lora_card(folder, data, repo_id, base_model, how, rows, lost) -> str:
    from huggingface_hub import ModelCard

    base_line = f"`{base_model}`" if base_model else "the SD3 / SD3.5 model the generator was distilled from"
    text = f"""---
{data.to_yaml()}
---

# {repo_id}

A one-step SD3 / SD3.5 generator distilled with DisBack (Distribution Backtracking), as a transformer LoRA over
{base_line}: {how}. One step from pure noise (sigma 1), no classifier-free guidance.

## Use

```python
import torch
from diffusers import StableDiffusion3Pipeline

pipe = StableDiffusion3Pipeline.from_pretrained("your/sd3-model", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("{repo_id}", adapter_name="disback")
image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=1, guidance_scale=0).images[0]
```

Sigma 1 is the same under every timestep shift, so the base's own scheduler takes the one step. Scale 1.0
(`pipe.set_adapters(["disback"], adapter_weights=[1.0])`) is the distilled generator itself on {base_line};
`pipe.fuse_lora(lora_scale=1.0)` bakes it in. diffusers has no kohya conversion for SD3, so only diffusers' format is
written.

## Measured at export

| figure | value |
| --- | --- |
{rows}{lost}
See docs/lora.md of the `diffusers_disback` package for how these are measured.
"""
    path = os.path.join(folder, "README.md")
    ModelCard(text).save(path)
    return path


def _choice(settings: dict) -> str:
    if settings.get("rank") is not None:
        return f"rank {settings['rank']} for every layer"
    return f"per layer, the smallest rank keeping {settings.get('energy')} of the difference's energy"
