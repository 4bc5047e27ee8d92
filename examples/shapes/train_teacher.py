#!/usr/bin/env python
"""A real text-to-image teacher in the SDXL architecture, trained on the shapes world on a CPU.

    python examples/shapes/train_teacher.py --output_dir shapes-teacher          # about 25 minutes on 2 cores

The result is a standard diffusers folder that `StableDiffusionXLPipeline.from_pretrained` loads and samples with
CFG, and that `train_disback_sdxl.py --pretrained_teacher_model` distills:

- two CLIP text encoders (hidden 64, 2 layers; `CLIPTextModelWithProjection` for the pooled embedding) over a
  whole-word CLIP tokenizer of the captions' vocabulary, frozen at random weights whose token embeddings are
  re-drawn at std 1 (CLIP's default init, std 0.02, makes different captions nearly identical);
- an `AutoencoderKL` with SDXL's 8x downsampling and 4 latent channels (64x64 images -> 4x8x8 latents), trained first
  (MSE + a small KL term), its `scaling_factor` set to 1 / std of the training latents;
- a `UNet2DConditionModel` with SDXL's `text_time` micro-conditioning and cross-attention on the concatenated
  penultimate hidden states, trained with epsilon prediction on SDXL's noise schedule, 10% of captions dropped to the
  zero embeddings SDXL uses as unconditional (`force_zeros_for_empty_prompt`), with an EMA of its weights;
- SDXL's Euler scheduler config.

Training images are fresh renders of the training split (`diffusers_disback.shapes`: the held-out colour-shape pairs
never appear). Each part is skipped when `OUTPUT_DIR` already holds it, so a rerun reuses what it can.
"""

import argparse
import copy
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_disback.shapes import VOCABULARY, all_scenes, render, sample_scenes
from diffusers_disback.testing import _bytes_to_unicode

RESOLUTION = 64
MAX_LENGTH = 16  # "a red triangle in the top left on a black background" is 11 words + begin/end tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the shapes-world SDXL-architecture teacher on a CPU.")
    p.add_argument("--output_dir", default="shapes-teacher")
    p.add_argument("--vae_steps", type=int, default=900)
    p.add_argument("--unet_steps", type=int, default=1600)
    p.add_argument("--num_images", type=int, default=20000, help="rendered training images (encoded once)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--card_only", action="store_true", help="only (re)write the model card of an existing teacher")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------ text


def write_tokenizer_files(directory: str) -> tuple[str, str]:
    """A CLIP BPE vocabulary in which every caption word is one token: byte-level characters plus, per word, the
    merges that build it left to right. Returns `(vocab.json, merges.txt)`."""
    alphabet = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in sorted(VOCABULARY, key=len, reverse=True):  # longer words first: their chains win shared pairs
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for piece in pieces[1:]:
            if (left, piece) not in merges:
                merges.append((left, piece))
            left += piece
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    tokens += ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def build_text_encoders(seed: int, with_projection: tuple[bool, bool] = (False, True)):
    """The two frozen random CLIP encoders (SDXL: the first without a projection; SD3: both with)."""
    with tempfile.TemporaryDirectory() as d:
        vocab, merges = write_tokenizer_files(d)
        tokenizer = CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>", model_max_length=MAX_LENGTH)
        tokenizer_2 = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=MAX_LENGTH)
    for word in VOCABULARY:  # every caption word is one token
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    te, te2 = (
        CLIPTextModelWithProjection(CLIPTextConfig(**common, projection_dim=64)) if proj else CLIPTextModel(
            CLIPTextConfig(**common))
        for proj in with_projection
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (te, te2):
            emb = getattr(model, "text_model", model).embeddings  # transformers 5 flattened `text_model`
            emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g))
            emb.position_embedding.weight.copy_(0.3 * torch.randn(emb.position_embedding.weight.shape, generator=g))
    return tokenizer, tokenizer_2, te.eval().requires_grad_(False), te2.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------ data


def render_batch(scenes, seeds) -> torch.Tensor:
    """Scenes rendered to a float tensor in [-1, 1], NCHW."""
    pixels = [torch.frombuffer(bytearray(render(s, i).tobytes()), dtype=torch.uint8) for s, i in zip(scenes, seeds)]
    x = torch.stack(pixels).reshape(len(scenes), RESOLUTION, RESOLUTION, 3).permute(0, 3, 1, 2)
    return x.float().div(127.5).sub(1)


# ------------------------------------------------------------------------------------------------------ VAE


def train_vae(steps: int, batch_size: int, seed: int, **layout) -> AutoencoderKL:
    """The 8x VAE (4 latent channels; `layout` overrides, e.g. SD3's 16 channels without quant convs)."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )
    vae = AutoencoderKL(**{**config, **layout})
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.time()
    for step in range(steps):
        scenes = sample_scenes(batch_size, "train", seed=seed * 7919 + step)
        x = render_batch(scenes, range(step * batch_size, (step + 1) * batch_size))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}/{steps} mse {F.mse_loss(recon, x).item():.4f} ({time.time() - start:.0f} s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, num_images: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Fresh renders of the training split as latents (scaled by the VAE's factor) and their captions."""
    scenes = sample_scenes(num_images, "train", seed=seed + 12345)
    latents = []
    for i in range(0, num_images, 256):
        x = render_batch(scenes[i : i + 256], range(10**6 + i, 10**6 + i + len(scenes[i : i + 256])))
        latents.append(vae.encode(x).latent_dist.mode())
    return torch.cat(latents) * vae.config.scaling_factor, [s.caption for s in scenes]


# ------------------------------------------------------------------------------------------------------ UNet


@torch.no_grad()
def encode_captions(pipe: StableDiffusionXLPipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """Every distinct caption's SDXL conditioning, as the pipeline computes it (penultimate states, pooled)."""
    unique = sorted(set(captions))
    embeds, _, pooled, _ = pipe.encode_prompt(unique, device="cpu", do_classifier_free_guidance=False)
    index = {c: i for i, c in enumerate(unique)}
    ids = torch.tensor([index[c] for c in captions])
    return {"prompt_embeds": embeds[ids], "text_embeds": pooled[ids]}


def train_unet(pipe, latents, cond, steps: int, batch_size: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=2,
        attention_head_dim=(4, 8),
        cross_attention_dim=128,
        transformer_layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=64 + 6 * 32,
        norm_num_groups=32,
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=8e-4, weight_decay=0.0)
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    abar = pipe.scheduler.alphas_cumprod.float()
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0, embeds, pooled = latents[idx], cond["prompt_embeds"][idx], cond["text_embeds"][idx]
        drop = torch.rand(batch_size, generator=g) < 0.1  # the unconditional branch SDXL samples with: zeros
        embeds = torch.where(drop[:, None, None], torch.zeros_like(embeds), embeds)
        pooled = torch.where(drop[:, None], torch.zeros_like(pooled), pooled)
        t = torch.randint(0, abar.shape[0], (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(
            x_t, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(batch_size, 1)}
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            print(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return ema.eval()


# ------------------------------------------------------------------------------------------------------ card


@torch.no_grad()
def judge_teacher(pipe, folder: str, steps: int, guidance_scale: float, **call_kwargs) -> tuple[dict, str]:
    """Samples every caption of the world with `pipe` (image i seeded i), reads them back with the shapes judge and
    writes `samples.png` (the showcase captions) into `folder`; returns the judge's rows (all, training, held-out
    captions) and their markdown table rows."""
    from diffusers_disback.evaluation import default_judge, judge_images
    from diffusers_disback.images import image_grid
    from diffusers_disback.shapes import SHOWCASE_CAPTIONS

    pipe.set_progress_bar_config(disable=True)
    scenes = all_scenes()
    captions = [s.caption for s in scenes]
    images = []
    for start in range(0, len(captions), 48):
        chunk = captions[start : start + 48]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, height=RESOLUTION, width=RESOLUTION,
                       num_inference_steps=steps, guidance_scale=guidance_scale, **call_kwargs).images  # fmt: skip
    judge = default_judge()
    rows = {}
    for name, keep in (
        ("all", lambda s: True),
        ("training", lambda s: not s.held_out),
        ("held-out", lambda s: s.held_out),
    ):
        idx = [i for i, s in enumerate(scenes) if keep(s)]
        scores = judge_images(judge, [images[i] for i in idx], [captions[i] for i in idx])
        rows[name] = scores
    shown = [images[captions.index(c)] for c in SHOWCASE_CAPTIONS]
    image_grid(shown).resize((len(shown) * 192, 192), resample=0).save(os.path.join(folder, "samples.png"))
    table = "\n".join(
        f"| {name} captions | {r['accuracy/all']:.3f} | {r['accuracy/colour']:.3f} | {r['accuracy/shape']:.3f} | "
        f"{r['accuracy/position']:.3f} | {r['accuracy/background']:.3f} |"
        for name, r in rows.items()
    )
    return rows, table


@torch.no_grad()
def write_card(folder: str, steps: int = 25, guidance_scale: float = 5.0) -> dict:
    """Judges the teacher over every caption of the world (image i seeded i) and writes `README.md` (the judge's
    numbers) and `samples.png` (the showcase captions) into its folder."""
    rows, table = judge_teacher(StableDiffusionXLPipeline.from_pretrained(folder), folder, steps, guidance_scale)
    card = f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [diffusers_disback, shapes, sdxl-architecture]
---

# shapes teacher (SDXL architecture, 64x64)

A small text-to-image model in the SDXL architecture (two CLIP text encoders, an 8x VAE with 4 latent channels, a
`text_time` UNet, SDXL's noise schedule), trained on the procedural shapes world of `diffusers_disback.shapes` by
`examples/shapes/train_teacher.py` on a CPU. The teacher DisBack's tutorial distills (docs/tutorial_shapes.md).

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


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.output_dir
    if args.card_only:
        print(write_card(out))
        return
    tokenizer, tokenizer_2, te, te2 = build_text_encoders(args.seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip
    vae_dir = os.path.join(out, "vae")
    if os.path.isfile(os.path.join(vae_dir, "config.json")):
        vae = AutoencoderKL.from_pretrained(vae_dir)
        print(f"reusing the VAE in {vae_dir}")
    else:
        vae = train_vae(args.vae_steps, 32, args.seed)
        with torch.no_grad():  # the scaling factor: unit-variance latents, as SDXL's 0.13025 does for its VAE
            x = render_batch(sample_scenes(512, "train", seed=99), range(512))
            vae.register_to_config(scaling_factor=float(1 / vae.encode(x).latent_dist.mode().std()))
        vae.save_pretrained(vae_dir)
    pipe = StableDiffusionXLPipeline(vae, te, te2, tokenizer, tokenizer_2, unet=None, scheduler=scheduler)
    latents, captions = encode_dataset(vae, args.num_images, args.seed)
    print(f"{len(captions)} training latents, std {latents.std():.3f}; {len(set(captions))} distinct captions "
          f"of {len(all_scenes('train'))} in the training split")  # fmt: skip
    unet = train_unet(pipe, latents, encode_captions(pipe, captions), args.unet_steps, args.batch_size, args.seed)
    # stored in fp16 (14 MB: small enough for the repository; diffusers loads them back into fp32), the text encoders
    # in fp32 (transformers would load fp16 weights as fp16)
    pipe = StableDiffusionXLPipeline(vae.to(torch.float16), te, te2, tokenizer, tokenizer_2, unet.to(torch.float16),
                                     scheduler)  # fmt: skip
    pipe.save_pretrained(out)
    rows = write_card(out)
    print(f"teacher written to {out}; all-attribute accuracy {rows['all']['accuracy/all']:.3f} (25 steps, CFG 5)")


if __name__ == "__main__":
    main()
