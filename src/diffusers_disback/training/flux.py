"""FLUX glue, the part the method needs: a `FluxTransformer2DModel` as the score callable of
`diffusers_disback.distill`, on the rectified-flow schedule like SD3's.

FLUX.1-dev has no true classifier-free guidance: its guidance scale is an input of the transformer (`guidance_embeds`)
and goes to every network of the method alike (teacher, fake score and generator; NVIDIA FastGen does the same).
It travels in the conditioning, `cond["guidance"]` (one scale per sample, [`with_guidance`]), which the losses and
the engine pass through untouched, so the target runs unguided (`--guidance_scale 1`) and the embedded scale does the
guiding. The engine keeps latents as `(B, C, H, W)`; the callable packs them into FLUX's 2x2 tokens and back.
docs/method.md, "Flow-matching teachers". The FLUX training script and pipeline are not part of the package yet.
"""

from __future__ import annotations

import contextlib

import torch


def with_guidance(cond: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """`cond` with FLUX's embedded guidance `scale` for each of its samples (`cond["guidance"]`, float32)."""
    n = cond["prompt_embeds"].shape[0]
    return {**cond, "guidance": torch.full((n,), float(scale), device=cond["prompt_embeds"].device)}


def flux_flow_fn(transformer: torch.nn.Module, autocast: bool = True):
    """
    A FLUX transformer as the score callable `v(x_t, sigma, cond)` (float32 out, `(B, C, H, W)` in and out): latents
    packed 2x2 as `FluxPipeline` packs them, `timestep = sigma` and the raw guidance scale (the transformer scales
    both by 1000 itself), the pipeline's image and text position ids.
    """
    from diffusers import FluxPipeline

    embeds_guidance = bool(transformer.config.guidance_embeds)

    def velocity(x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
        b, c, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs latents in 2x2 patches: latent height and width must be even, got {h}x{w}")
        guidance = cond.get("guidance")
        if embeds_guidance and guidance is None:
            raise ValueError(
                "this FLUX transformer embeds its guidance scale (guidance_embeds=True, FLUX.1-dev): put it in the "
                "conditioning with diffusers_disback.training.flux.with_guidance(cond, 3.5)"
            )
        device = x_t.device
        packed = FluxPipeline._pack_latents(x_t.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=device, dtype=dtype)
        with torch.autocast(device.type, enabled=False) if not autocast else contextlib.nullcontext():
            out = transformer(
                hidden_states=packed,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_projections"].to(dtype),
                timestep=sigma.to(device, dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance.to(device, dtype) if embeds_guidance else None,
                return_dict=False,
            )[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).float()

    return velocity
