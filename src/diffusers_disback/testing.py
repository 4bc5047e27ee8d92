"""Tiny SDXL- and SD3-shaped components, built offline, for tests, the demo and benchmarks.

Nothing here downloads: the CLIP tokenizer is written from a byte-level vocabulary generated at run time, and every
model is built from a config with seeded random weights. The shapes follow SDXL (two text encoders whose penultimate
hidden states are concatenated, `text_time` added conditioning, an 8x-downsampling VAE), only much smaller.

`python -m diffusers_disback.testing OUT_DIR` saves a tiny teacher as a `StableDiffusionXLPipeline` folder (`--family
sd3`: a `StableDiffusion3Pipeline` folder: an MMDiT `SD3Transformer2DModel`, two CLIP encoders and no T5, a VAE with
SD3's layout, 16 latent channels and its shift and scaling factors, SD3's flow-matching scheduler with shift 3).
`get_sdxl_components(size="sdxl")` builds SDXL-sized random-weight components for GPU benchmarks.

For evaluation tests: `TinyFeatureExtractor` stands in for the FID Inception network, `get_tiny_clip_scorer` for the
open_clip model, and `write_tiny_caption_set` writes a small captioned image set (imagefolder and COCO layouts).
Numbers computed with them compare only to each other.
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
    "get_tiny_taesd",
    "get_sdxl_components",
    "get_sdxl_models",
    "get_sd3_components",
    "get_tiny_sd3_transformer",
    "get_tiny_flux_transformer",
    "save_sd35_medium_teacher",
    "save_tiny_sd3_teacher",
    "get_sd35_medium_models",
    "TINY_SD3_TRANSFORMER_CONFIG",
    "get_tiny_tokenizer",
    "save_tiny_teacher",
    "TinyFeatureExtractor",
    "get_tiny_clip_scorer",
    "write_tiny_caption_set",
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
        tokenizer = CLIPTokenizer(vocab=vocab_path, merges=merges_path, pad_token=pad_token, model_max_length=77)
    return tokenizer


def get_tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """The tiny SDXL-shaped UNet (block_out_channels (32, 64), cross_attention_dim 64, `text_time` conditioning)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


def get_tiny_taesd(seed: int = 0, size: str = "tiny"):
    """An untrained `AutoencoderTiny` in the TAESD-XL layout (4 latent channels, 8x, scaling factor 1): made small
    (`"tiny"`), or madebyollin/taesdxl's full shape (`"sdxl"`). It stands in for the real one, which cannot be
    downloaded here."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if size == "sdxl":
        return AutoencoderTiny().eval()
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()


def get_sdxl_models(size: str = "tiny", seed: int = 0) -> dict:
    """
    The networks of an SDXL pipeline with seeded random weights: `unet`, `vae`, `text_encoder`, `text_encoder_2` (no
    scheduler or tokenizers, so that it also builds under `torch.device("meta")`: the memory accounting's SDXL-sized
    modules without allocating them).
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
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}


def get_sdxl_components(size: str = "tiny", seed: int = 0, scheduler: str = "euler") -> dict:
    """
    The components of a `StableDiffusionXLPipeline` with seeded random weights.

    Args:
        size: `"tiny"` (CPU tests; 64x64 images, 8x8 latents) or `"sdxl"` (SDXL-sized, 2.6B-parameter UNet; for GPU
            benchmarks only).
        seed: seeds every component.
        scheduler: `"euler"` (SDXL base's scheduler) or `"disback"` ([`DisBackScheduler`]).
    """
    models = get_sdxl_models(size, seed)
    unet, vae, text_encoder, text_encoder_2 = (models[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
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


# SD3's layout, small: an MMDiT over 16-channel latents (patch 1), two CLIP encoders of width 32 (joint 64 = 32 + 32,
# pooled 64 = 32 + 32 projections), no T5
TINY_SD3_TRANSFORMER_CONFIG = {
    "sample_size": 8,
    "patch_size": 1,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": 32,
}
# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
_TINY_SD3_VAE = {
    **_TINY_VAE,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,  # SD3's VAE: latents = (z - shift_factor) * scaling_factor
    "scaling_factor": 1.5035,
}


# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in the first 13 blocks);
# its text encoders are CLIP-L and CLIP-G with projections and T5-XXL's encoder, its VAE SDXL's with 16 channels
SD35_MEDIUM_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}


def get_sd35_medium_models(seed: int = 0) -> dict:
    """The networks of SD3.5-Medium at their real configuration with seeded random weights: `transformer`, `vae`,
    `text_encoder` (CLIP-L), `text_encoder_2` (CLIP-G), `text_encoder_3` (T5-XXL's encoder). Meant for
    `torch.device("meta")` (the memory accounting); at full size it is 7.6 B parameters."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG)
    vae = AutoencoderKL(**{**_SDXL_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                           "shift_factor": 0.0609, "scaling_factor": 1.5305})  # fmt: skip
    common = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=49408, hidden_act="gelu")
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**common, **_SDXL_TEXT_1, projection_dim=768))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**{**common, **_SDXL_TEXT_2}))
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))  # fmt: skip
    return {"transformer": transformer, "vae": vae, "text_encoder": clip_l, "text_encoder_2": clip_g,
            "text_encoder_3": t5}  # fmt: skip


def get_tiny_sd3_transformer(seed: int = 0, **overrides):
    """The tiny SD3-shaped MMDiT ([`TINY_SD3_TRANSFORMER_CONFIG`])."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**TINY_SD3_TRANSFORMER_CONFIG, **overrides})


def get_tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    """A tiny `FluxTransformer2DModel` with embedded guidance (FLUX.1-dev's kind): 4 latent channels packed 2x2 into
    16 features per token, a joint width of 32 and pooled 32 (one CLIP of width 32 and its projection)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )  # fmt: skip


def get_sd3_components(seed: int = 0, transformer: dict | None = None) -> dict:
    """The components of a `StableDiffusion3Pipeline` with seeded random weights, tiny, without T5
    (`text_encoder_3=None`, which SD3's pipeline supports: its T5 half of the prompt embedding is zeros);
    `transformer` overrides entries of [`TINY_SD3_TRANSFORMER_CONFIG`]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    common = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu")
    encoders = []
    for _ in range(2):
        torch.manual_seed(seed + len(encoders))
        config = CLIPTextConfig(**common, **_TINY_TEXT, projection_dim=32)
        encoders.append(CLIPTextModelWithProjection(config).eval())
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_TINY_SD3_VAE).eval()
    return {
        "transformer": get_tiny_sd3_transformer(seed, **(transformer or {})).eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": encoders[0],
        "tokenizer": get_tiny_tokenizer(),
        "text_encoder_2": encoders[1],
        "tokenizer_2": get_tiny_tokenizer(pad_token="!"),
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def save_tiny_sd3_teacher(output_dir: str, seed: int = 0, transformer: dict | None = None) -> str:
    """Saves a tiny SD3-shaped teacher ([`get_sd3_components`]) as a `StableDiffusion3Pipeline` folder."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**get_sd3_components(seed, transformer)).save_pretrained(output_dir)
    return output_dir


def save_sd35_medium_teacher(output_dir: str, seed: int = 0) -> str:
    """Saves an SD3.5-Medium-sized teacher with seeded random weights and without T5 ([`get_sd35_medium_models`]'s
    transformer, VAE and CLIPs; tiny tokenizers; SD3's shift-3 scheduler) as a `StableDiffusion3Pipeline` folder, for
    measuring the SD3 script on a GPU (`benchmarks/gpu_smoke.sh`). About 12 GB in fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    models = get_sd35_medium_models(seed)
    models.pop("text_encoder_3")  # T5-XXL: 19 GB more in fp32; the script runs without it (--no_t5 semantics)
    StableDiffusion3Pipeline(
        **models, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), tokenizer=get_tiny_tokenizer(),
        tokenizer_2=get_tiny_tokenizer(pad_token="!"), text_encoder_3=None, tokenizer_3=None,
    ).save_pretrained(output_dir)  # fmt: skip
    return output_dir


def save_tiny_teacher(output_dir: str, seed: int = 0, size: str = "tiny") -> str:
    """Saves a tiny SDXL-shaped teacher (or, with `size="sdxl"`, an SDXL-sized random one) as a
    `StableDiffusionXLPipeline` folder and returns its path."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**get_sdxl_components(size, seed=seed))
    pipe.save_pretrained(output_dir)
    return output_dir


class TinyFeatureExtractor(torch.nn.Module):
    """
    Stands in for clean-fid's Inception in offline tests: two fixed random convolutions and a mean pool, taking the
    same input (float32 `[N, 3, 299, 299]` in [0, 255]) and giving `dim` features. Its FIDs are not comparable to
    published ones.
    """

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.conv2 = torch.nn.Conv2d(8, dim, 4, stride=4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.requires_grad_(False).eval()
        self.name = f"testing: tiny random conv features, dim {dim}, seed {seed} (not comparable)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x / 127.5 - 1.0))
        return self.conv2(x).mean(dim=(2, 3))


def get_tiny_clip_scorer(prefix: str = "A photo depicts ", resolution: int = 256, seed: int = 0):
    """A `ClipScorer` over a tiny random transformers CLIP (32x32 images, the tiny tokenizer): CLIP-score plumbing."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    from .evaluation import ClipScorer

    tok = get_tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=1000, max_position_embeddings=77, **ids, **small).to_dict(),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, **small).to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()

    def _features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def preprocess(image):
        arr = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def tokenizer(texts):
        return tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    return ClipScorer(
        lambda px: _features(model.get_image_features(pixel_values=px)),
        lambda ids_: _features(model.get_text_features(input_ids=ids_)),
        preprocess,
        tokenizer,
        prefix=prefix,
        resolution=resolution,
        name="testing: tiny random CLIP (not comparable)",
    )


_WORDS = ["a", "cat", "dog", "the", "red", "blue", "on", "table", "street", "with", "bus", "tree", "man", "two"]


def write_tiny_caption_set(directory: str, num: int = 24, size: tuple[int, int] = (320, 304), seed: int = 0) -> str:
    """
    Writes `num` seeded random images (smooth colour fields with a few rectangles, `size` = (w, h)) with captions, as
    an `imagefolder` dataset (`metadata.jsonl`: file_name, text) and as COCO annotations (`captions.json`, two
    captions per image, the first by annotation id being the one `CaptionSet.from_coco` picks). Returns `directory`.
    """
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    w, h = size
    images, annotations, rows = [], [], []
    for i in range(num):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(np.sin(xx / rng.uniform(8, 40) + c) * 0.5 + 0.5) * 255 for c in range(3)], axis=-1)
        image = Image.fromarray(base.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = rng.randrange(w - 40), rng.randrange(h - 40)
            draw.rectangle(
                (x0, y0, x0 + rng.randint(10, 40), y0 + rng.randint(10, 40)), fill=tuple(rng.choices(range(256), k=3))
            )
        name = f"img_{i:03d}.png"
        image.save(os.path.join(directory, name))
        caption = " ".join(rng.choices(_WORDS, k=rng.randint(3, 8)))
        rows.append({"file_name": name, "text": caption})
        images.append({"id": 1000 + i, "file_name": name, "width": w, "height": h})
        annotations.append({"id": 5000 + 2 * i, "image_id": 1000 + i, "caption": caption})
        annotations.append({"id": 5001 + 2 * i, "image_id": 1000 + i, "caption": "another " + caption})
    rng.shuffle(annotations)
    with open(os.path.join(directory, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, "captions.json"), "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations}, f)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny SDXL- or SD3-shaped teacher pipeline (random weights).")
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=["tiny", "sdxl", "sd3.5-medium"], default="tiny",
                        help="sdxl: SDXL-sized (about 14 GB); sd3.5-medium (with --family sd3): SD3.5-Medium-sized, "
                        "without T5 (about 12 GB)")  # fmt: skip
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl", help="sd3: an SD3-shaped teacher")
    args = parser.parse_args(argv)
    if (args.size == "sd3.5-medium") != (args.family == "sd3" and args.size != "tiny"):
        parser.error(f"--size {args.size} is not a size of the {args.family} family")
    if args.family == "sd3":
        save = save_sd35_medium_teacher if args.size == "sd3.5-medium" else save_tiny_sd3_teacher
        print(save(args.output_dir, seed=args.seed))
    else:
        print(save_tiny_teacher(args.output_dir, seed=args.seed, size=args.size))


if __name__ == "__main__":
    main()
