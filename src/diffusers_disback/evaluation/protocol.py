"""Evaluation protocols: everything that decides a number, in one frozen record.

Two presets follow DMD2's published evaluation (the protocol DisBack's SDXL numbers use):

- `sdxl-coco10k`: 10k COCO-2014 val captions (one per image), images generated at 1024², centre-cropped and
  LANCZOS-resized to 512 for FID (clean-fid, "clean" mode); patch-FID on the centre 299×299 crop of the full-size
  image; CLIP score = mean cosine of open_clip ViT-g-14 (`laion2b_s12b_b42k`) image and text embeddings, images
  centre-cropped and LANCZOS-resized to 256 first, captions prefixed with "A photo depicts ".
- `sd15-coco30k`: 30k captions, generated at 512², FID at 256.

A third, `shapes`, scores a model of the shapes world (docs/tutorial_shapes.md): its 144 captions at 64², read back by
the shapes judge (metric `shapes`: per-attribute and all-attribute accuracy, and the Fréchet distance in the judge's
features to the reference images).

Anything else (fewer prompts, other resolutions, steps, guidance) is `dataclasses.replace(protocol, ...)`; the
result file records the protocol it ran, so a number is never separated from what produced it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalProtocol:
    """
    Args:
        name: a label for result files.
        num_prompts: how many captions (and reference images) to use.
        resolution: the generation size (square).
        fid_resolution: FID images are centre-cropped to a square and LANCZOS-resized to this; `None` keeps the
            generated size.
        patch_fid: also compute FID on the centre 299×299 crop of the full-size images.
        clip_model / clip_pretrained: the open_clip model for the CLIP score (`None` skips it).
        clip_resolution: images are centre-cropped and LANCZOS-resized to this before the CLIP preprocessing.
        clip_prefix: prepended to every caption for the CLIP text embedding.
        seed: image `i` is generated from `seed + i` (reproducible and independent of batch size and process count).
        num_inference_steps / guidance_scale: the sampler settings (1 step without CFG for a DisBack generator).
    """

    name: str = "sdxl-coco10k"
    num_prompts: int = 10_000
    resolution: int = 1024
    fid_resolution: int | None = 512
    patch_fid: bool = True
    clip_model: str | None = "ViT-g-14"
    clip_pretrained: str | None = "laion2b_s12b_b42k"
    clip_resolution: int = 256
    clip_prefix: str = "A photo depicts "
    seed: int = 0
    num_inference_steps: int = 1
    guidance_scale: float = 0.0

    def __post_init__(self):
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.resolution % 8:
            raise ValueError(
                f"resolution must be divisible by 8 (the VAE downsamples by 8), got {self.resolution}; "
                f"try {self.resolution // 8 * 8} or {(self.resolution // 8 + 1) * 8}"
            )
        if self.patch_fid and self.resolution < 299:
            raise ValueError(
                f"patch-FID takes a 299x299 crop of the generated image, which needs resolution >= 299 "
                f"(got {self.resolution}); turn patch_fid off for smaller images"
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")

    def replace(self, **changes) -> EvalProtocol:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROTOCOLS: dict[str, EvalProtocol] = {
    "sdxl-coco10k": EvalProtocol(),
    "sd15-coco30k": EvalProtocol(
        name="sd15-coco30k", num_prompts=30_000, resolution=512, fid_resolution=256, patch_fid=True
    ),
    # the shapes world (docs/tutorial_shapes.md): every caption once at 64x64, scored by the shapes judge
    "shapes": EvalProtocol(
        name="shapes",
        num_prompts=144,
        resolution=64,
        fid_resolution=None,
        patch_fid=False,
        clip_model=None,
        clip_pretrained=None,
    ),  # fmt: skip
}


def get_protocol(name: str) -> EvalProtocol:
    """A preset by name (`sdxl-coco10k`, `sd15-coco30k`, `shapes`)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]
