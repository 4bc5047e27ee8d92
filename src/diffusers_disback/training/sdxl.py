"""SDXL glue: the teacher's frozen parts and the UNets a run starts from, prompts to the conditioning the UNet takes,
and a UNet as the score callable of `diffusers_disback.distill`."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from ..distill import NoiseSchedule

# the attention projections: what every LoRA adapter of the training script targets
SDXL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class SDXLConditioner:
    """
    Prompts to SDXL conditioning, exactly as `StableDiffusionXLPipeline.encode_prompt` computes it at inference:
    penultimate hidden states of both text encoders concatenated, encoder 2's pooled projection, and
    `add_time_ids = (H, W, 0, 0, H, W)`. The unconditional branch for CFG is all zeros (SDXL's
    `force_zeros_for_empty_prompt`, and what DMD2 trains with).

    `offload=True` keeps the encoders in CPU memory and moves them to `device` for each call only (3 GiB of fp32
    SDXL encoders off the accelerator between batches, paid for with two transfers per batch; docs/training.md).
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, resolution: int, offload: bool = False):
        from diffusers import StableDiffusionXLPipeline

        if resolution % 8:
            raise ValueError(f"--resolution must be divisible by 8, got {resolution}")
        self.encoder = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=None,
            scheduler=None,
        )
        self.resolution = resolution
        self.offload = offload

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        encoders = (self.encoder.text_encoder, self.encoder.text_encoder_2)
        if self.offload:
            for encoder in encoders:
                encoder.to(device)
        try:
            prompt_embeds, _, pooled, _ = self.encoder.encode_prompt(
                prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        finally:
            if self.offload:
                for encoder in encoders:
                    encoder.to("cpu")
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=prompt_embeds.dtype)
        return {"prompt_embeds": prompt_embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}

    @staticmethod
    def uncond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional conditioning of a batch: zero embeddings, same time ids."""
        return {
            "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "text_embeds": torch.zeros_like(cond["text_embeds"]),
            "time_ids": cond["time_ids"],
        }


def unet_eps_fn(unet: torch.nn.Module, autocast: bool = True):
    """
    An SDXL UNet as the score callable `eps(x_t, t, cond)` of `diffusers_disback.distill` (float32 out).

    `autocast=False` runs it in its own weights' dtype even inside an autocast region: the fake score's pass in the
    distribution-matching loss runs in fp32, as DMD2's does (docs/method.md, "Differences from the reference code").
    """

    def eps(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = _dtype_of(unet)
        with torch.autocast(x_t.device.type, enabled=False) if not autocast else contextlib.nullcontext():
            return unet(
                x_t.to(dtype),
                t,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                added_cond_kwargs={
                    "text_embeds": cond["text_embeds"].to(dtype),
                    "time_ids": cond["time_ids"].to(dtype),
                },
                return_dict=False,
            )[0].float()

    return eps


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass
class FrozenSDXL:
    """
    The teacher's parts that never train: the UNet held in the compute dtype (so autocast casts none of its weights
    on any call), the text encoders in fp32 (one pass per batch, as in DMD2), the noise schedule and the conditioner;
    the VAE is loaded on first use ([`load_vae`]). Also loads the UNets a run starts from, in fp32.

    Example:
        ```py
        >>> frozen = FrozenSDXL.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", 1024, torch.bfloat16, "cuda")
        >>> generator = frozen.load_generator(None)  # the teacher's UNet again, in fp32
        ```
    """

    pretrained: str
    revision: str | None
    variant: str | None
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    teacher: torch.nn.Module
    scheduler_config: dict
    noise_schedule: NoiseSchedule
    conditioner: SDXLConditioner
    vae: torch.nn.Module | None = None
    family: str = "sdxl"
    lora_targets: list[str] = field(default_factory=lambda: list(SDXL_LORA_TARGETS))
    denoiser_subfolder: str = "unet"

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        resolution: int,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        variant: str | None = None,
        offload_text_encoders: bool = False,
    ) -> FrozenSDXL:
        """The frozen parts of the SDXL pipeline `pretrained` (a Hub id or folder) for images of `resolution`; with
        `offload_text_encoders` the encoders stay in CPU memory between batches ([`SDXLConditioner`])."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ..scheduling_disback import DisBackScheduler

        rev, var = revision, variant
        tok = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=rev)
        tok2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=rev)
        te = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", revision=rev, variant=var)
        te2 = CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", revision=rev, variant=var
        )
        teacher = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", revision=rev, variant=var)
        scheduler = DisBackScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=rev)
        for m in (te, te2, teacher):
            m.requires_grad_(False).eval()
        encoder_device = "cpu" if offload_text_encoders else device
        te, te2 = te.to(encoder_device, torch.float32), te2.to(encoder_device, torch.float32)
        teacher = teacher.to(device, weight_dtype)
        return cls(
            pretrained, revision, variant, tok, tok2, te, te2, teacher, scheduler.config,
            NoiseSchedule.from_scheduler(scheduler),
            SDXLConditioner(tok, tok2, te, te2, resolution, offload=offload_text_encoders),
        )  # fmt: skip

    @property
    def denoising_schedule(self) -> NoiseSchedule:
        """Stage 1's denoising loss's schedule: the teacher's (one DDPM schedule serves every use)."""
        return self.noise_schedule

    @staticmethod
    def score_fn(model: torch.nn.Module, autocast: bool = True):
        return unet_eps_fn(model, autocast=autocast)

    @staticmethod
    def generator_timestep(conditioning_timestep: int) -> int:
        """The generator's input timestep: `--conditioning_timestep` as it is."""
        return conditioning_timestep

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.teacher.config.in_channels, resolution // 8, resolution // 8)

    @staticmethod
    def decode_latents(vae, x0: torch.Tensor) -> torch.Tensor:
        """The VAE's input of the UNet's latents: `x0 / scaling_factor`."""
        return x0 / vae.config.scaling_factor

    def load_unet_fp32(self) -> torch.nn.Module:
        """The teacher's UNet read again in fp32: trainable copies start from its exact weights, not the frozen
        teacher's bf16/fp16 rounding."""
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(
            self.pretrained, subfolder="unet", revision=self.revision, variant=self.variant
        ).to(torch.float32)

    load_teacher_fp32 = load_unet_fp32

    def load_generator(self, source: str | None) -> torch.nn.Module:
        """The generator's starting point in fp32: the teacher (`None`), a diffusers UNet folder or repo (with or
        without `unet/`), or a raw checkpoint (strictly; a local file or `owner/repo/file.bin` on the Hub)."""
        from diffusers import UNet2DConditionModel

        from ..checkpoints import load_unet_checkpoint

        if source is None:
            return self.load_unet_fp32()
        if os.path.isfile(source) or source.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors")):
            gen = load_unet_checkpoint(source, config=self.teacher.config)
        else:
            sub = "unet" if os.path.isdir(os.path.join(source, "unet")) else None
            gen = UNet2DConditionModel.from_pretrained(source, subfolder=sub)
        return gen.to(torch.float32)

    def final_pipeline(self, unet_state: dict[str, torch.Tensor], conditioning_timestep: int):
        """The one-step `DisBackPipeline` of a trained generator's full weights (fp32, on the CPU): the teacher's
        VAE, text encoders and tokenizers, and a `DisBackScheduler` at the timestep the generator was trained at
        (not the teacher's scheduler default)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from ..pipeline_disback import DisBackPipeline
        from ..scheduling_disback import DisBackScheduler

        unet = UNet2DConditionModel.from_config(self.teacher.config)
        unet.load_state_dict(unet_state)
        vae = AutoencoderKL.from_pretrained(self.pretrained, subfolder="vae", revision=self.revision)
        return DisBackPipeline(
            vae=vae,
            text_encoder=self.text_encoder.float().cpu(),
            text_encoder_2=self.text_encoder_2.float().cpu(),
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet,
            scheduler=DisBackScheduler.from_config(self.scheduler_config, conditioning_timestep=conditioning_timestep),
        )

    def load_vae(self, device: torch.device | str, weight_dtype: torch.dtype) -> torch.nn.Module:
        """The teacher's VAE, loaded once (real-image encoding and validation share it); bf16 or fp32, since SDXL's
        VAE overflows in fp16."""
        if self.vae is None:
            from diffusers import AutoencoderKL

            dtype = torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32
            vae = AutoencoderKL.from_pretrained(self.pretrained, subfolder="vae", revision=self.revision)
            self.vae = vae.to(device, dtype).requires_grad_(False)
        return self.vae
