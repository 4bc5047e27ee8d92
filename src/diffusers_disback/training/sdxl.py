"""SDXL glue: prompts to the conditioning the UNet takes, and a UNet as the score callable of
`diffusers_disback.distill`."""

from __future__ import annotations

import contextlib

import torch

# the attention projections: what every LoRA adapter of the training script targets
SDXL_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class SDXLConditioner:
    """
    Prompts to SDXL conditioning, exactly as `StableDiffusionXLPipeline.encode_prompt` computes it at inference:
    penultimate hidden states of both text encoders concatenated, encoder 2's pooled projection, and
    `add_time_ids = (H, W, 0, 0, H, W)`. The unconditional branch for CFG is all zeros (SDXL's
    `force_zeros_for_empty_prompt`, and what DMD2 trains with).
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, resolution: int):
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

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.encoder.encode_prompt(
            prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
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
