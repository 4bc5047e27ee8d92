"""How long the evaluation protocol takes, and what `generate_images` costs over bare pipeline calls.

Measured in one process: (1) bare pipeline calls in batches (one generator per batch, images kept in memory) against
(2) `generate_images` (one seeded generator per image, PNGs written atomically, resume bookkeeping) on the same
captions; (3) feature throughput of the FID path (square crop + LANCZOS to the FID size, clean-fid's resize to 299²,
a feature network: the tiny stand-in, since Inception's weights are not downloadable here) and of the patch-FID
path, on one thread and on the thread pool. The ratio (2)/(1) is the evaluation's generation overhead; the per-image times give the protocol's wall time.

    python benchmarks/eval_throughput.py                                   # tiny components, CPU, 64x64
    python benchmarks/eval_throughput.py --size sdxl --device cuda --dtype float16 --num_prompts 32   # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from diffusers_disback import DisBackPipeline, DisBackScheduler
from diffusers_disback.evaluation import (
    compute_features,
    fid_transform,
    generate_images,
    patch_fid_transform,
)
from diffusers_disback.evaluation.generation import image_path
from diffusers_disback.testing import TinyFeatureExtractor, get_sdxl_components


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 tiny, 1024 sdxl")
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    resolution = args.resolution or (64 if args.size == "tiny" else 1024)
    components = get_sdxl_components(args.size)
    components["scheduler"] = DisBackScheduler()
    pipe = DisBackPipeline(**components).to(args.device, getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    captions = [f"a photo of object number {i} on a table" for i in range(args.num_prompts)]
    batches = [captions[i : i + args.batch_size] for i in range(0, len(captions), args.batch_size)]

    pipe(batches[0], height=resolution, width=resolution, output_type="pil")  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    for batch in batches:
        pipe(batch, height=resolution, width=resolution, generator=torch.Generator().manual_seed(0), output_type="pil")
    _sync(args.device)
    bare = (time.perf_counter() - start) / len(captions)

    with tempfile.TemporaryDirectory() as tmp:
        _sync(args.device)
        start = time.perf_counter()
        generate_images(pipe, captions, tmp, resolution=resolution, batch_size=args.batch_size, progress=False)
        _sync(args.device)
        ours = (time.perf_counter() - start) / len(captions)
        start = time.perf_counter()
        again = generate_images(pipe, captions, tmp, resolution=resolution, batch_size=args.batch_size, progress=False)
        resume = time.perf_counter() - start
        assert again["generated"] == 0

        from PIL import Image

        images = [Image.open(image_path(tmp, i)).convert("RGB") for i in range(len(captions))]
        extractor = TinyFeatureExtractor().to(args.device)
        feats = {}
        transforms = [("FID", fid_transform(min(512, resolution)))]
        if resolution >= 299:
            transforms.append(("patch-FID", patch_fid_transform(299)))
        for name, transform in transforms:
            for workers, label in ((1, f"{name} features, 1 thread"), (None, f"{name} features, thread pool")):
                start = time.perf_counter()
                compute_features(images, extractor, transform, batch_size=64, device=args.device, workers=workers)
                feats[label] = (time.perf_counter() - start) / len(images)

    print(
        f"\nevaluation throughput, {args.size} components, {resolution}x{resolution}, {args.device}, {args.dtype}, "
        f"{len(captions)} prompts, batch {args.batch_size}"
    )
    print("| figure | per image | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| bare pipeline calls (one generator per batch) | {bare * 1000:.1f} ms | 1.000x |")
    print(f"| generate_images (seed per image, PNG writes) | {ours * 1000:.1f} ms | {ours / bare:.3f}x |")
    print(f"| going on with nothing missing (whole set) | {resume * 1000:.1f} ms | |")
    for name, t in feats.items():
        base = feats[name.replace("thread pool", "1 thread")]
        print(f"| {name} (crop/resize on the CPU + network) | {t * 1000:.1f} ms | {t / base:.3f}x |")
    total = ours + sum(t for name, t in feats.items() if "pool" in name)
    print(f"| 10k-prompt protocol, one process (generation + features) | {total * 10_000 / 60:.1f} min | |")
    return {"bare": bare, "ours": ours, "features": feats}


if __name__ == "__main__":
    main()
