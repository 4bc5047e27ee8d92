"""Tiny SDXL-shaped components, built offline, for tests, the demo and benchmarks.

Nothing here downloads: the CLIP tokenizer is written from a byte-level vocabulary generated at run time, and every
model is built from a config with seeded random weights. The shapes follow SDXL (two text encoders whose penultimate
hidden states are concatenated, `text_time` added conditioning, an 8x-downsampling VAE), only much smaller.

`python -m diffusers_disback.testing OUT_DIR` saves a tiny teacher as a `StableDiffusionXLPipeline` folder.
`get_sdxl_components(size="sdxl")` builds SDXL-sized random-weight components for GPU benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "get_tiny_unet",
    "get_sdxl_components",
    "get_tiny_tokenizer",
    "save_tiny_teacher",
]

# SDXL's scheduler config (stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json)
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TINY_UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 80,  # 6 * 8 time ids + 32 pooled text
    "cross_attention_dim": 64,  # 32 + 32 from the two text encoders
    "norm_num_groups": 32,
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the keys that differ from diffusers' defaults)
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "transformer_layers_per_block": (1, 2, 10),
    "projection_class_embeddings_input_dim": 2816,
    "cross_attention_dim": 2048,
}

_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4)
_SDXL_TEXT_1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
_SDXL_TEXT_2 = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)

_TINY_VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
    scaling_factor=0.13025,
)
_SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_tiny_tokenizer_files(directory: str) -> tuple[str, str]:
    """Writes a byte-level CLIP `vocab.json` and `merges.txt` (a few merges) and returns their paths."""
    os.makedirs(directory, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_tokens))}
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_path, merges_path


def get_tiny_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer over a byte-level vocabulary (about 520 tokens), built without any download."""
    with tempfile.TemporaryDirectory() as d:
        vocab_path, merges_path = write_tiny_tokenizer_files(d)
        tokenizer = CLIPTokenizer(
            vocab=vocab_path, merges=merges_path, pad_token=pad_token, model_max_length=77
        )
    return tokenizer


def get_tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """The tiny SDXL-shaped UNet (block_out_channels (32, 64), cross_attention_dim 64, `text_time` conditioning)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


def get_sdxl_components(size: str = "tiny", seed: int = 0, scheduler: str = "euler") -> dict:
    """
    The components of a `StableDiffusionXLPipeline` with seeded random weights.

    Args:
        size: `"tiny"` (CPU tests; 64x64 images, 8x8 latents) or `"sdxl"` (SDXL-sized, 2.6B-parameter UNet; for GPU
            benchmarks only).
        seed: seeds every component.
        scheduler: `"euler"` (SDXL base's scheduler) or `"disback"` ([`DisBackScheduler`]).
    """
    if size not in ("tiny", "sdxl"):
        raise ValueError(f"size must be 'tiny' or 'sdxl', got {size!r}")
    tiny = size == "tiny"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SDXL_UNET_CONFIG))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**(_TINY_VAE if tiny else _SDXL_VAE))
    common = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000 if tiny else 49408)
    common["hidden_act"] = "gelu"
    common["projection_dim"] = 32
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**common, **(_TINY_TEXT if tiny else _SDXL_TEXT_1)))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**common, **(_TINY_TEXT if tiny else _SDXL_TEXT_2)})
    )
    if scheduler == "disback":
        from .scheduling_disback import DisBackScheduler

        sched = DisBackScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    elif scheduler == "euler":
        sched = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    else:
        raise ValueError(f"scheduler must be 'euler' or 'disback', got {scheduler!r}")
    tokenizer = get_tiny_tokenizer()
    tokenizer_2 = get_tiny_tokenizer(pad_token="!")
    return {
        "unet": unet.eval(),
        "scheduler": sched,
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_teacher(output_dir: str, seed: int = 0, size: str = "tiny") -> str:
    """Saves a tiny SDXL-shaped teacher (or, with `size="sdxl"`, an SDXL-sized random one) as a
    `StableDiffusionXLPipeline` folder and returns its path."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**get_sdxl_components(size, seed=seed))
    pipe.save_pretrained(output_dir)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny SDXL-shaped teacher pipeline (random weights).")
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=["tiny", "sdxl"], default="tiny", help="sdxl: SDXL-sized (about 14 GB)")
    args = parser.parse_args(argv)
    print(save_tiny_teacher(args.output_dir, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
