"""`disback`: the command line.

disback generate MODEL "a prompt" --output image.png [--steps 1] [--seed 0]
disback convert CHECKPOINT --base-model DIR_OR_REPO --output DIR [--push-to-hub REPO] [--fp16-variant] [--unet-only]
disback push FOLDER REPO_ID
"""

from __future__ import annotations

import argparse
import os
import sys

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in _DTYPES:
        raise SystemExit(f"error: unknown dtype {name!r}; choose from {sorted(set(_DTYPES))}")
    return getattr(torch, _DTYPES[name])


def _generate(args) -> int:
    import torch

    from .pipeline_disback import DisBackPipeline

    pipe = DisBackPipeline.from_pretrained(args.model, torch_dtype=_dtype(args.dtype))
    pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=generator,
    ).images
    for i, image in enumerate(images):
        path = args.output if len(images) == 1 else args.output.replace(".png", f"_{i}.png")
        image.save(path)
        print(path)
    return 0


def _convert(args) -> int:
    from .hub import push_folder, save_for_hub
    from .pipeline_disback import DisBackPipeline

    dtype = _dtype(args.dtype)
    pipe = DisBackPipeline.from_unet_checkpoint(args.checkpoint, base_model=args.base_model, torch_dtype=dtype)
    repo_id = args.push_to_hub or args.output
    base_model = None if os.path.exists(args.base_model) else args.base_model  # a local folder is no Hub reference
    save_for_hub(
        pipe,
        args.output,
        repo_id,
        kind="unet" if args.unet_only else "pipeline",
        base_model=base_model,
        fp16_variant=args.fp16_variant,
        sample_prompts=None if args.no_samples else [args.sample_prompt],
        training={"source_checkpoint": args.checkpoint, "converted_with": "disback convert"},
    )
    print(f"saved {args.output}")
    if args.push_to_hub:
        print(push_folder(args.output, args.push_to_hub, private=args.private))
    return 0


def _push(args) -> int:
    from .hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, max_retries=args.max_retries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disback", description="DisBack one-step SDXL generation and conversion.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images with a DisBack pipeline (Hub repo or folder)")
    g.add_argument("model", help="Hub repo id or folder of a DisBack pipeline")
    g.add_argument("prompt")
    g.add_argument("--output", default="disback.png", help="PNG path (an index is added for several images)")
    g.add_argument("--steps", type=int, default=1, help="1 (t=399) or N (evenly spaced from 999); default 1")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=int, default=None, help="divisible by 8; default: the UNet's size")
    g.add_argument("--width", type=int, default=None, help="divisible by 8; default: the UNet's size")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--device", default="cuda" if _cuda() else "cpu")
    g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: as saved)")
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "convert",
        help="turn a raw UNet checkpoint (.bin/.safetensors, e.g. SDXL_DisBack.bin) into a diffusers folder",
    )
    c.add_argument("checkpoint", help="local file, or owner/repo/path/in/repo.bin on the Hub")
    c.add_argument("--base-model", required=True, help="SDXL base model folder or Hub repo id (config + components)")
    c.add_argument("--output", required=True, help="folder to write")
    c.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also push the folder to this repo")
    c.add_argument("--private", action="store_true", help="create the Hub repo private")
    c.add_argument("--unet-only", action="store_true", help="write only unet/ (the card references the base model)")
    c.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors weights")
    c.add_argument("--dtype", default=None, help="cast all weights: float32 | float16 | bfloat16")
    c.add_argument("--sample-prompt", default="a photo of an astronaut riding a horse on mars")
    c.add_argument("--no-samples", action="store_true", help="do not render samples.png for the model card")
    c.set_defaults(func=_convert)

    p = sub.add_parser("push", help="push a saved folder to the Hub (e.g. again after a failed push)")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--max-retries", type=int, default=3)
    p.set_defaults(func=_push)
    return parser


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # CheckpointError, HubPushError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
