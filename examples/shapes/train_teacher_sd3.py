#!/usr/bin/env python
"""A real text-to-image teacher in the SD3 architecture (a flow-matching MMDiT), trained on the shapes world on a CPU.

    python examples/shapes/train_teacher_sd3.py --output_dir shapes-teacher-sd3      # about 40 minutes on 2 cores

The result is a standard diffusers folder that `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
tokenizer_3=None)` loads and samples with CFG (pass `max_sequence_length=8`, what it was trained with), and that
`train_disback_sd3.py --pretrained_teacher_model` distills. Beside the SDXL-architecture teacher (`train_teacher.py`,
whose tokenizer, frozen text encoders, renders and judge it shares), it differs where SD3 differs:

- two `CLIPTextModelWithProjection` encoders (SD3's pooled embedding is both projections) and no T5: SD3's pipeline
  fills T5's part of the prompt embedding with zeros, here 8 tokens;
- an `AutoencoderKL` in SD3's layout: 16 latent channels, no quant convolutions, latents `(z - shift_factor) *
  scaling_factor` with both factors measured on the training latents (mean and 1 / std);
- an `SD3Transformer2DModel` (patch 1 over the 8x8 latents) trained with the flow-matching loss
  `|| v(x_s, s) - (eps - x0) ||^2`, `x_s = (1 - s) x0 + s eps`, `s` logit-normal(0, 1) shifted by 3, as diffusers' SD3
  DreamBooth script draws it; 10% of captions dropped to the encoded empty prompt (SD3's unconditional branch), EMA;
- SD3's `FlowMatchEulerDiscreteScheduler` with shift 3.
"""

import argparse
import copy
import math
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from train_teacher import RESOLUTION, build_text_encoders, render_batch

from diffusers_disback.distill import shift_sigmas
from diffusers_disback.shapes import sample_scenes

MAX_SEQUENCE_LENGTH = 8  # T5's (zero) tokens in the prompt embedding; sample with the same number
SHIFT = 3.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the shapes-world SD3-architecture teacher on a CPU.")
    p.add_argument("--output_dir", default="shapes-teacher-sd3")
    p.add_argument("--vae_steps", type=int, default=900)
    p.add_argument("--transformer_steps", type=int, default=2000)
    p.add_argument("--num_images", type=int, default=20000, help="rendered training images (encoded once)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--card_only", action="store_true", help="only (re)write the model card of an existing teacher")
    return p.parse_args(argv)


def text_pipeline(seed: int, vae=None, transformer=None, scheduler=None) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, te, te2 = build_text_encoders(seed, with_projection=(True, True))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tokenizer,
        text_encoder_2=te2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def build_transformer(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // 8,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=128,  # 64 + 64: both CLIPs' penultimate states
        caption_projection_dim=128,
        pooled_projection_dim=128,  # 64 + 64: both projections
        pos_embed_max_size=RESOLUTION // 8,
    )


@torch.no_grad()
def encode_dataset(vae, num_images: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh renders of the training split as the transformer's latents and their captions."""
    scenes = sample_scenes(num_images, "train", seed=seed + 12345)
    latents = []
    for i in range(0, num_images, 256):
        x = render_batch(scenes[i : i + 256], range(10**6 + i, 10**6 + i + len(scenes[i : i + 256])))
        latents.append(vae.encode(x).latent_dist.mode())
    z = torch.cat(latents)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor, [s.caption for s in scenes]


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """Every distinct caption's SD3 conditioning as the pipeline computes it, and the empty prompt's (last row)."""
    unique = sorted(set(captions)) + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        unique, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    index = {c: i for i, c in enumerate(unique)}
    ids = torch.tensor([index[c] for c in captions])
    return {"prompt_embeds": embeds[ids], "pooled": pooled[ids], "empty": (embeds[-1:], pooled[-1:])}


def train_transformer(latents, cond, steps: int, batch_size: int, seed: int) -> SD3Transformer2DModel:
    model = build_transformer(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    empty_embeds, empty_pooled = cond["empty"]
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0, embeds, pooled = latents[idx], cond["prompt_embeds"][idx], cond["pooled"][idx]
        drop = torch.rand(batch_size, generator=g) < 0.1  # the unconditional branch SD3 samples with: ""
        embeds = torch.where(drop[:, None, None], empty_embeds.expand_as(embeds), embeds)
        pooled = torch.where(drop[:, None], empty_pooled.expand_as(pooled), pooled)
        u = torch.sigmoid(torch.randn(batch_size, generator=g, dtype=torch.float64))
        sigma = shift_sigmas(u, SHIFT).float()  # logit-normal, shifted once, as SD3 was trained
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = model(hidden_states=x_t, encoder_hidden_states=embeds, pooled_projections=pooled,
                  timestep=sigma * 1000, return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            print(f"transformer step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    return ema.eval()


@torch.no_grad()
def write_card(folder: str, steps: int = 28, guidance_scale: float = 5.0) -> dict:
    """Judges the teacher over every caption of the world (image i seeded i, `steps` Euler steps) and writes
    `README.md` and `samples.png`."""
    from train_teacher import judge_teacher

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    rows, table = judge_teacher(pipe, folder, steps, guidance_scale, max_sequence_length=MAX_SEQUENCE_LENGTH)
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [diffusers_disback, shapes, sd3-architecture, flow-matching]
---

# shapes teacher (SD3 architecture, 64x64)

A small text-to-image model in the SD3 architecture (an MMDiT `SD3Transformer2DModel` trained with the flow-matching
loss, two CLIP text encoders and no T5, a VAE with 16 latent channels and SD3's shift and scaling factors, SD3's
flow-matching scheduler with shift 3), trained on the procedural shapes world of `diffusers_disback.shapes` by
`examples/shapes/train_teacher_sd3.py` on a CPU. The flow-matching teacher DisBack's tutorial distills
(docs/tutorial_shapes.md).

```py
pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
image = pipe(caption, height=64, width=64, guidance_scale=5.0, max_sequence_length={MAX_SEQUENCE_LENGTH}).images[0]
```

![samples](samples.png)

Showcase captions, {steps} Euler steps, CFG {guidance_scale:g}; the last three are colour-shape pairs never trained on.

## Evaluation: the shapes judge

Every caption of the world, one image each (image i seeded i), {steps} Euler steps, CFG {guidance_scale:g}, read back by
`diffusers_disback.evaluation.default_judge()`:

| captions | all four attributes | colour | shape | position | background |
| --- | --- | --- | --- | --- | --- |
{table}
"""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.output_dir
    if args.card_only:
        print(write_card(out))
        return
    from train_teacher import train_vae

    vae_dir = os.path.join(out, "vae")
    if os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae = AutoencoderKL.from_pretrained(vae_dir)
        print(f"reusing the VAE in {vae_dir}")
    else:
        vae = train_vae(args.vae_steps, 32, args.seed, latent_channels=16, use_quant_conv=False,
                        use_post_quant_conv=False)  # fmt: skip
        with torch.no_grad():  # SD3's two factors: zero-mean, unit-variance latents
            z = vae.encode(render_batch(sample_scenes(512, "train", seed=99), range(512))).latent_dist.mode()
            vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
        vae.save_pretrained(vae_dir)
    pipe = text_pipeline(args.seed, transformer=build_transformer(args.seed))  # its config: T5's (zero) width
    latents, captions = encode_dataset(vae, args.num_images, args.seed)
    print(f"{len(captions)} training latents, mean {latents.mean():.3f}, std {latents.std():.3f}", flush=True)
    model = train_transformer(latents, encode_captions(pipe, captions), args.transformer_steps, args.batch_size,
                              args.seed)  # fmt: skip
    # the transformer and the VAE in fp16 (diffusers loads them back into fp32), the text encoders in fp32
    pipe = text_pipeline(args.seed, vae.to(torch.float16), model.to(torch.float16),
                         FlowMatchEulerDiscreteScheduler(shift=SHIFT))  # fmt: skip
    pipe.save_pretrained(out)
    rows = write_card(out)
    print(f"teacher written to {out}; all-attribute accuracy {rows['all']['accuracy/all']:.3f} (28 steps, CFG 5)")


if __name__ == "__main__":
    main()
