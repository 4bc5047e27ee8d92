"""`disback`: the command line.

disback generate MODEL "a prompt" --output image.png [--steps 1] [--seed 0]
disback convert CHECKPOINT --base-model DIR_OR_REPO --output DIR [--push-to-hub REPO] [--fp16-variant] [--unet-only]
disback push FOLDER REPO_ID
disback push FOLDER REPO_ID --space SPACE_ID                (also the web app of the model, as a Gradio Space)
disback app MODEL [--tiny-vae REPO] [--port 7860]            (needs the app extra: pip install "diffusers_disback[app]")
disback export-lora MODEL --output DIR [--base-model BASE] [--rank R | --energy E] [--push-to-hub REPO]
disback evaluate MODEL --output DIR (--coco-annotations JSON --coco-images DIR | --dataset NAME | --captions-file TXT)
    [--protocol sdxl-coco10k] [--num-prompts N] [--reference-dir DIR] ...   (also under `accelerate launch -m`)
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


def _model_source(spec: str, what: str = "model") -> str:
    """`spec` if it is an existing folder or file, or a valid Hub repo id; else a clear error (a missing local path
    would otherwise reach the Hub client and come back as a complaint about repo-id characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(spec):
        return spec
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise SystemExit(
            f"error: {what} {spec!r}: no such file or folder exists here, and it is not a Hub repo id either "
            "(those look like 'owner/name')"
        ) from None
    return spec


def _is_sd3(source: str) -> bool:
    """Whether `source` is an SD3 pipeline folder or repo (its model_index names one)."""
    from diffusers import DiffusionPipeline

    try:
        cls = DiffusionPipeline.load_config(source).get("_class_name")
    except (OSError, ValueError):
        return False
    return cls in ("StableDiffusion3Pipeline", "DisBackSD3Pipeline")


def _generate(args) -> int:
    import torch

    from .evaluation.evaluate import load_sd3_pipeline
    from .pipeline_disback import DisBackPipeline

    source = _model_source(args.model)
    extra = {}
    if _is_sd3(source):  # the one-step SD3 pipeline (a flow-matching generator)
        pipe = load_sd3_pipeline(source, torch_dtype=_dtype(args.dtype))
        extra = {"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}
    else:
        pipe = DisBackPipeline.from_pretrained(source, torch_dtype=_dtype(args.dtype))
    pipe.to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        num_images_per_prompt=args.num_images,
        generator=generator,
        **extra,
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
    base = _model_source(args.base_model, "base model")
    pipe = DisBackPipeline.from_unet_checkpoint(args.checkpoint, base_model=base, torch_dtype=dtype)
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

    if not os.path.isdir(args.folder):
        raise SystemExit(f"error: {args.folder!r} is not a folder here; push uploads a local folder")
    print(push_folder(args.folder, args.repo_id, private=args.private, max_retries=args.max_retries))
    if args.space:  # the web app of what was just pushed, as a Space (docs/app.md)
        from .hub import push_space

        print(
            push_space(
                args.repo_id, args.space, tiny_vae=args.tiny_vae, hardware=args.space_hardware,
                private=args.private, max_retries=args.max_retries,
            )
        )  # fmt: skip
    return 0


def _app(args) -> int:
    from .app import run_app

    if args.model:
        _model_source(args.model)
    return run_app(args)


def _caption_set(args, protocol):
    """The caption source `disback evaluate` was given (the shapes world by default for `--protocol shapes`)."""
    from .evaluation import CaptionSet

    sources = [bool(args.captions_file), bool(args.coco_annotations), bool(args.dataset)]
    if sum(sources) == 0 and protocol.name == "shapes":
        captions = CaptionSet.from_shapes()
    elif sum(sources) != 1:
        raise SystemExit(
            "error: give exactly one caption source: --coco-annotations, --dataset or --captions-file "
            "(--protocol shapes needs none)"
        )
    elif args.coco_annotations:
        if not args.coco_images:
            raise SystemExit("error: --coco-annotations needs --coco-images (the folder of val2014 images)")
        captions = CaptionSet.from_coco(args.coco_annotations, args.coco_images, protocol.num_prompts, args.coco_seed)
    elif args.dataset:
        captions = CaptionSet.from_dataset(
            args.dataset,
            args.dataset_split,
            protocol.num_prompts,
            caption_column=args.caption_column,
            image_column=None if args.image_column == "none" else args.image_column,
        )
    else:
        captions = CaptionSet.from_text_file(args.captions_file, protocol.num_prompts)
    return captions


def _evaluate(args) -> int:
    import dataclasses

    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from .evaluation import ReferenceImages, evaluate, get_protocol, load_feature_extractor, load_pipeline

    _model_source(args.model)  # before anything else is read
    protocol = get_protocol(args.protocol)
    changes = {
        "num_prompts": args.num_prompts,
        "resolution": args.resolution,
        "fid_resolution": args.fid_resolution,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.no_patch_fid:
        changes["patch_fid"] = False
    if args.clip_model is not None:
        changes["clip_model"] = None if args.clip_model == "none" else args.clip_model
    if args.clip_pretrained is not None:
        changes["clip_pretrained"] = args.clip_pretrained
    protocol = dataclasses.replace(protocol, **changes)
    captions = _caption_set(args, protocol)
    reference = ReferenceImages.from_folder(args.reference_dir, args.num_reference) if args.reference_dir else None

    # under `accelerate launch --cpu` (ACCELERATE_USE_CPU) the process group is CPU; PartialState is a singleton, so
    # this first call decides for the generation and evaluation code too
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = torch.device(args.device) if args.device else state.device
    pipe = load_pipeline(
        _model_source(args.model), args.checkpoint, _dtype(args.dtype), args.revision, args.variant
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    feature_extractor = None  # evaluate() builds clean-fid's Inception where a metric needs it
    if args.feature_extractor != "inception":
        feature_extractor = load_feature_extractor(args.feature_extractor, device)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    if args.clip_model == "none" and metrics:
        metrics = [m for m in metrics if m != "clip_score"]
    record = evaluate(
        pipe,
        captions,
        args.output,
        protocol,
        reference=reference,
        metrics=metrics,
        batch_size=args.batch_size,
        feature_extractor=feature_extractor,
        stats_cache=args.stats_cache,
        device=device,
        model_id=_model_id(args),
        feature_batch_size=args.feature_batch_size,
        **({"max_sequence_length": args.max_sequence_length} if args.max_sequence_length else {}),
    )
    if record is not None:
        for name, value in record["metrics"].items():
            print(f"{name}: {value:.4f}")
        print(os.path.join(args.output, "metrics.json"))
    return 0


def _export_lora(args) -> int:
    from .lora_export import export_lora, write_lora_card

    model = _model_source(args.model)
    base = _model_source(args.base_model, "base model") if args.base_model else None
    if args.rank is not None and args.energy is not None:
        raise SystemExit("error: give --rank or --energy, not both")
    result = export_lora(
        model,
        args.output,
        base_model=base,
        rank=args.rank,
        energy=args.energy,
        kohya=not args.no_kohya,
        check_prompts=args.check_prompt or None,
        device=args.device,
        torch_dtype=_dtype(args.dtype),
        biases=args.with_biases,
    )
    write_lora_card(args.output, result, args.push_to_hub or os.path.basename(os.path.abspath(args.output)), base)
    for key, value in result.summary().items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    print(f"saved {args.output}")
    if args.push_to_hub:
        from .hub import push_folder

        print(push_folder(args.output, args.push_to_hub, private=args.private))
    return 0


def _model_id(args) -> str:
    model = args.model if args.checkpoint is None else f"{args.checkpoint} in {args.model}"
    if args.revision:
        model += f"@{args.revision}"
    return model + (f" (variant {args.variant})" if args.variant else "")


def _path_profile(args) -> int:
    import random

    import torch

    from .distill import DegradationPath, DisBackConfig
    from .training import SD3_DEFAULTS, FrozenSD3, FrozenSDXL
    from .training.path_profile import PROFILE_PLOT, PathProfiler, judge_nodes

    path = DegradationPath.load(args.path)
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif args.judge == "shapes":
        from .shapes import all_scenes

        prompts = [s.caption for s in all_scenes("train")]
    else:
        raise ValueError("give --prompts (a file, one caption per line): the probe's captions")
    if len(prompts) > args.num_prompts:
        prompts = random.Random(args.seed).sample(prompts, args.num_prompts)
    device = args.device or ("cuda" if _cuda() else "cpu")
    dtype = _dtype(args.dtype) or torch.float32
    teacher = _model_source(args.teacher, "teacher")
    sd3 = _is_sd3(teacher)  # a flow-matching teacher: the SD3 script's defaults, else DisBackConfig's (SDXL's)
    given = {"guidance_scale": args.guidance_scale, "conditioning_timestep": args.conditioning_timestep}
    settings = {**(SD3_DEFAULTS if sd3 else {}), **{k: v for k, v in given.items() if v is not None}}
    config = DisBackConfig(**settings, intermediate_cfg=args.intermediate_cfg, path_profile_timesteps=args.timesteps)
    length = args.max_sequence_length or 256  # SD3: T5 tokens
    resolution = args.resolution
    if resolution is None:
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel

        cls, sub = (SD3Transformer2DModel, "transformer") if sd3 else (UNet2DConditionModel, "unet")
        resolution = cls.load_config(teacher, subfolder=sub)["sample_size"] * 8
    if sd3:
        frozen = FrozenSD3.from_pretrained(teacher, resolution, config, dtype, device, max_sequence_length=length)
    else:
        frozen = FrozenSDXL.from_pretrained(teacher, resolution, dtype, device)
    generator = frozen.load_generator(args.generator).to(device, dtype)
    profiler = PathProfiler(frozen, generator, prompts, config, device, seed=args.seed)
    profile = profiler.profile(path)
    if args.judge == "shapes":
        judge_dir = os.path.join(args.output or args.path, "path_profile_judge")
        sampling = {"num_inference_steps": 28, "max_sequence_length": length} if sd3 else {}
        profile.judge = judge_nodes(path, teacher, judge_dir, **sampling)
    out = args.output or args.path
    os.makedirs(out, exist_ok=True)
    plot = profile.plot(os.path.join(out, PROFILE_PLOT))
    with open(os.path.join(out, "path_profile.json"), "w", encoding="utf-8") as f:
        f.write(profile.to_json_string())
    print(profile.table())
    print(f"plot: {plot}\nprofile: {os.path.join(out, 'path_profile.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disback",
        description="DisBack one-step SDXL generation, editing LoRAs, a web app, conversion and evaluation.",
    )
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
    g.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3: T5 tokens (default: the length the folder records, else 256)",
    )
    g.set_defaults(func=_generate)

    x = sub.add_parser(
        "export-lora",
        help="write a DisBack generator as a LoRA for SDXL models (diffusers format, and kohya-style) or SD3 / SD3.5 "
        "models (diffusers' SD3 format)",
        description="A LoRA-mode run's adapter as it is, or a LoRA extracted from a full fine-tune by truncated SVD "
        "of (generator - base) per layer (docs/lora.md).",
    )
    x.add_argument("model", help="DisBack pipeline folder or Hub id (a run's final/ folder)")
    x.add_argument("--output", required=True, help="folder to write (LoRA weights, lora_export.json, README.md)")
    x.add_argument("--base-model", default=None, help="the SDXL (SD3) model it was distilled from (needed for SVD)")
    x.add_argument("--rank", type=int, default=None, help="the same rank for every layer")
    x.add_argument("--energy", type=float, default=None, help="per layer, keep this share of |dW|^2 (default 0.9)")
    x.add_argument("--with-biases", action="store_true", help="carry changed biases too (the LoRA cannot be fused)")
    x.add_argument("--no-kohya", action="store_true", help="skip the kohya-style file (SDXL; SD3 writes none)")
    x.add_argument("--check-prompt", action="append", default=[], help="measure base+LoRA against the generator on it")
    x.add_argument("--device", default="cuda" if _cuda() else "cpu")
    x.add_argument("--dtype", default=None, help="for the check: float32 | float16 | bfloat16 (default: as saved)")
    x.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also push the LoRA as its own repo")
    x.add_argument("--private", action="store_true")
    x.set_defaults(func=_export_lora)

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
    p.add_argument("--space", metavar="SPACE_ID", default=None, help="also push REPO_ID's web app as a Gradio Space")
    p.add_argument("--space-hardware", default=None, help="the Space's hardware, e.g. t4-small (default: the Hub's)")
    p.add_argument("--tiny-vae", default=None, help="AutoencoderTiny repo for the Space's fast decode")
    p.set_defaults(func=_push)

    from .app import add_app_arguments  # the standard library only, at import

    a = sub.add_parser(
        "app", help="a web app (Gradio) of a DisBack SDXL or SD3 model; generates as you type (docs/app.md)"
    )
    add_app_arguments(a)
    a.set_defaults(func=_app)
    e = sub.add_parser(
        "evaluate",
        help="FID, patch-FID and CLIP score of a pipeline on COCO captions (DMD2 protocol), or its accuracy on the "
        "shapes world (--protocol shapes); docs/evaluation.md",
    )
    e.add_argument("model", help="pipeline folder or Hub id (with --checkpoint: the SDXL base model)")
    e.add_argument("--output", required=True, help="folder for images/, metrics.json and grid.png (resumable)")
    e.add_argument(
        "--protocol",
        default="sdxl-coco10k",
        help="sdxl-coco10k (default), sd15-coco30k, or shapes (the shapes world; no caption source needed)",
    )
    src = e.add_argument_group("captions and reference images (one caption source)")
    src.add_argument("--coco-annotations", help="COCO captions file, e.g. annotations/captions_val2014.json")
    src.add_argument("--coco-images", help="the folder of the COCO images (e.g. val2014/)")
    src.add_argument("--coco-seed", type=int, default=0, help="seed of the random subset of COCO images")
    src.add_argument("--dataset", help="a datasets Hub id or a local imagefolder (images + metadata.jsonl)")
    src.add_argument(
        "--dataset-split", default=None, help="default: train for a local folder, validation for a Hub id"
    )
    src.add_argument("--caption-column", default=None, help="default: caption/text/prompt/captions/sentences")
    src.add_argument("--image-column", default="image", help="'none' for captions only")
    src.add_argument("--captions-file", help="one caption per line (captions only: give --reference-dir for FID)")
    src.add_argument("--reference-dir", help="reference images for FID (default: the caption source's images)")
    src.add_argument("--num-reference", type=int, default=None, help="use the first N reference images")
    ov = e.add_argument_group("protocol overrides (default: the protocol's)")
    ov.add_argument("--num-prompts", type=int, default=None, help="fewer prompts, e.g. 1000 for a quick look")
    ov.add_argument("--resolution", type=int, default=None, help="generation size (divisible by 8)")
    ov.add_argument("--fid-resolution", type=int, default=None, help="FID images are resized to this")
    ov.add_argument("--steps", type=int, default=None, help="sampling steps (default 1)")
    ov.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default 0: none)")
    ov.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default 0)")
    ov.add_argument("--no-patch-fid", action="store_true")
    ov.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model (default ViT-g-14); 'none' skips the score",
    )
    ov.add_argument("--clip-pretrained", default=None, help="open_clip weights tag (default laion2b_s12b_b42k)")
    e.add_argument(
        "--metrics",
        default=None,
        help="comma-separated subset of fid,patch_fid,clip_score,shapes (default: fid,patch_fid,clip_score; "
        "shapes for --protocol shapes)",
    )
    e.add_argument("--checkpoint", default=None, help="a raw UNet checkpoint (.bin/.safetensors) to put into MODEL")
    e.add_argument("--batch-size", type=int, default=8, help="images per pipeline call per process")
    e.add_argument("--feature-batch-size", type=int, default=64)
    e.add_argument("--stats-cache", default=None, help="reference statistics cache folder")
    e.add_argument("--device", default=None, help="default: the accelerate process's device")
    e.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: as saved)")
    e.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="SD3: T5 tokens (default: the length the folder records, else 256)",
    )
    e.add_argument("--revision", default=None)
    e.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    e.add_argument(
        "--feature-extractor",
        default="inception",
        help="inception: clean-fid's (the protocol); or the path of a TorchScript network mapping float32 [N, 3, 299, "
        "299] in [0, 255] to features (its FIDs compare only with its own; docs/evaluation.md)",
    )
    e.set_defaults(func=_evaluate)
    pp = sub.add_parser(
        "path-profile",
        help="where a degradation path's nodes lie: each node's distance to the teacher, to the last node and to its "
        "neighbour, in score space; a table and a plot (docs/method.md, 'The path profile')",
    )
    pp.add_argument("path", help="a path folder (path_manifest.json and its nodes)")
    pp.add_argument("--teacher", required=True, help="the teacher the path was recorded from (Hub id or folder): "
                    "an SDXL or an SD3 / SD3.5 pipeline")  # fmt: skip
    pp.add_argument("--generator", default=None, help="the initial generator's UNet or transformer (default: the "
                    "teacher's)")  # fmt: skip
    pp.add_argument("--prompts", default=None, help="the probe's captions, one per line (default with --judge shapes: "
                    "the shapes world's training captions)")  # fmt: skip
    pp.add_argument("--num-prompts", type=int, default=32, help="captions of the probe (a random subset if more)")
    pp.add_argument("--guidance-scale", type=float, default=None, help="the teacher's CFG, as in stage 2 (default: "
                    "the script's, 8 for SDXL, 4.5 for SD3)")  # fmt: skip
    pp.add_argument("--intermediate-cfg", default="node", choices=("node", "none", "teacher"),
                    help="how stage 2 guides intermediate nodes (--intermediate_cfg)")  # fmt: skip
    pp.add_argument("--conditioning-timestep", type=int, default=None, help="the one-step generator's t_c (default: "
                    "399 for SDXL, 1000 for SD3)")  # fmt: skip
    pp.add_argument("--max-sequence-length", type=int, default=None, help="SD3: T5 tokens of the prompt embedding, "
                    "the run's --max_sequence_length (default 256)")  # fmt: skip
    pp.add_argument("--timesteps", type=int, default=8, help="timesteps of the probe over the DM range")
    pp.add_argument("--resolution", type=int, default=None, help="default: the teacher UNet's (transformer's) "
                    "sample size x 8")  # fmt: skip
    pp.add_argument("--judge", default=None, choices=("shapes",),
                    help="shapes: also sample each node as a diffusion model (Euler, 25 steps, SD3 28, CFG 5) and read it back "
                    "with the shapes judge (accuracy, FD to the teacher's samples)")  # fmt: skip
    pp.add_argument("--output", default=None, help="folder for path_profile.png and .json (default: the path folder)")
    pp.add_argument("--seed", type=int, default=0, help="the probe's noise and caption subset")
    pp.add_argument("--device", default=None)
    pp.add_argument("--dtype", default=None, help="float32 (default) | float16 | bfloat16")
    pp.set_defaults(func=_path_profile)
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
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError, HubPushError, a model the Hub lacks, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
