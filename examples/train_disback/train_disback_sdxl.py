#!/usr/bin/env python
"""DisBack distillation of an SDXL teacher into a one-step generator, under `accelerate launch`.

    accelerate launch examples/train_disback/train_disback_sdxl.py \\
        --pretrained_teacher_model stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_files prompts.txt --stage all --output_dir disback-sdxl

Stage 1 (degradation) fine-tunes a copy of the teacher on the initial generator's samples and writes the path
(`OUTPUT_DIR/path`); stage 2 (backtracking) trains the generator with distribution matching against targets that walk
the path back to the teacher, and writes the final pipeline (`OUTPUT_DIR/final`) in the Hub layout.

The method's steps are `diffusers_disback.distill.DegradationStep` and `BacktrackingStep` (the ones the benchmarks
run too) and its settings `diffusers_disback.distill.DisBackConfig` (one flag each); the SDXL glue is in
`diffusers_disback.training`. This file wires them together; `main` reads top to bottom:

    1. arguments  2. accelerator  3. frozen models  4. data  5. resume plan  6. stage 1  7. stage 2  8. save and push

See examples/train_disback/README.md for accelerate configs (single, DDP, FSDP2, multi-node) and the paper's settings.
"""

import argparse
import copy
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffusers_disback._io import failpoint
from diffusers_disback.distill import (
    FAKE_SCORE_ADAPTER,
    GENERATOR_ADAPTER,
    LORA_ADAPTER,
    AdapterView,
    BacktrackingSchedule,
    BacktrackingStep,
    DegradationPath,
    DegradationStep,
    DisBackConfig,
    MethodPlan,
    NodeSwitcher,
    OptimizerUpdate,
    Score,
    SharedBase,
    add_config_arguments,
    generator_updates,
    lora_config,
    lora_state_dict,
    make_lr_scheduler,
    make_optimizer,
    make_trainable,
    merge_lora,
    one_step_sample,
    target_score,
)
from diffusers_disback.distill.profile import PathProfile, pairwise_distances, place_by_distance, score_distance
from diffusers_disback.hub import append_card_markdown, save_for_hub
from diffusers_disback.images import image_grid
from diffusers_disback.lora_export import RUN_ADAPTER_DIR, save_run_adapter
from diffusers_disback.training import (
    SD3_DEFAULTS,
    BackgroundPusher,
    FakeScoreWithHead,
    FrozenSD3,
    FrozenSDXL,
    ImageStream,
    PromptStream,
    ResumePlan,
    RunState,
    SDXLGanTerm,
    checkpoint_dirs,
    clip_grad_norm,
    finite_or_skip,
    full_state_dict,
    load_path_verified_once,
    plan_resume,
    prepare_trainable,
    restore_checkpoint,
    save_checkpoint,
)
from diffusers_disback.training.faults import (
    RankWatch,
    download_hub_checkpoint,
    hub_checkpoints,
    is_collective_failure,
    parse_hub_resume,
)
from diffusers_disback.training.path_profile import PROFILE_PLOT, PathProfiler, save_predictions, write_profile
from diffusers_disback.training.state import DamagedCheckpointError, newest_good_checkpoint, verify_checkpoint

logger = get_logger(__name__)
# the generator's LR schedule steps every stage-2 iteration, as the reference's does; torch warns when a schedule
# steps on an iteration without an optimizer step
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")


# ------------------------------------------------------------------------------------------------- 1. arguments

# What differs per teacher family lives in its module under `diffusers_disback.training` (`FrozenSDXL`, `FrozenSD3`:
# components, conditioning, the score call, the unconditional branch, LoRA targets); here are only the pipeline
# class a teacher folder names and the defaults that differ. `train_disback_sd3.py` runs this loop with "sd3".
FAMILIES = {
    "sdxl": {"name": "SDXL", "pipelines": ("StableDiffusionXLPipeline", "DisBackPipeline"), "defaults": {}},
    "sd3": {
        "name": "SD3/SD3.5",
        "pipelines": ("StableDiffusion3Pipeline", "DisBackSD3Pipeline"),
        "defaults": {**SD3_DEFAULTS, "output_dir": "disback-sd3"},  # sigma = 1 and CFG 4.5
    },
}


def parse_args(argv=None, family: str = "sdxl") -> argparse.Namespace:
    """The script's own flags, then one flag per method setting (`DisBackConfig`); `args.config` holds the latter.
    `family` ("sdxl" or "sd3") picks the teacher's glue and the defaults that differ (`FAMILIES`)."""
    name = FAMILIES[family]["name"]
    p = argparse.ArgumentParser(
        description=f"DisBack: distribution backtracking distillation of {name} (both stages).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # models
    p.add_argument("--pretrained_teacher_model", required=True, help=f"{name} teacher: Hub repo id or local folder")
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="teacher weights variant, e.g. fp16")
    p.add_argument(
        "--pretrained_generator",
        default=None,
        help="initial generator: a UNet folder/repo (with or without unet/), or a raw checkpoint file "
        "(e.g. DMD2's one-step UNet; the released DisBack SDXL run starts from DMD2's step-24000 generator). "
        "Default: the teacher's UNet, which DMD2's authors report does not reach a good one-step SDXL generator "
        "without regression pre-training; a warning says so",
    )
    # stages and outputs
    p.add_argument("--stage", choices=["degradation", "backtracking", "all"], default="all")
    p.add_argument("--output_dir", default="disback-sdxl")
    p.add_argument("--path_dir", default=None, help="where stage 1 writes / stage 2 reads the path (OUTPUT_DIR/path)")
    # real images for the GAN term
    p.add_argument("--real_dataset_name", default=None, help="GAN term: a Hub image dataset")
    p.add_argument("--real_data_dir", default=None, help="GAN term: a local image folder (imagefolder)")
    p.add_argument("--real_image_column", default="image")
    p.add_argument(
        "--real_caption_column",
        default="text",
        help="captions of the real images, which condition them as prompts condition the fakes (an image folder: "
        "the `text` field of metadata.jsonl). 'none': the empty prompt for every real image (warned: the "
        "discriminator can then tell real from fake by the text)",
    )
    # precision and speed
    p.add_argument("--resolution", type=int, default=1024, help="training and validation image size (divisible by 8)")
    p.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="overrides the accelerate config; trainable nets keep fp32 master weights, frozen ones are held in "
        "the mixed-precision dtype",
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument(
        "--offload_text_encoders",
        action="store_true",
        help="keep the fp32 text encoders (3 GiB for SDXL) in CPU memory, moved to the accelerator for each batch's "
        "prompts only",
    )
    p.add_argument(
        "--lora_base",
        choices=["shared", "separate"],
        default="shared",
        help="with --lora_rank: shared: the teacher, every path node, stage 1's degrading score, the fake score and "
        "the generator are named adapters of one frozen teacher UNet (a generator from --pretrained_generator keeps "
        "its own base); separate: each its own UNet, ~3 more SDXL UNets in memory (docs/training.md, 'One frozen base')",
    )
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile every UNet (trained and frozen) in place, with this backend (default inductor); the "
        "first iterations pay the compile time",
    )
    p.add_argument(
        "--nan_policy",
        choices=["skip", "abort"],
        default="skip",
        help="a non-finite loss: skip that update (with a warning) or stop the run",
    )
    # data
    p.add_argument("--dataset_name", default=None, help="prompts: a Hub dataset")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_data_files", nargs="+", default=None, help="prompts: local .txt/.csv/.json/.parquet")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--shuffle_buffer", type=int, default=1000)
    p.add_argument("--no_streaming", action="store_true", help="download/prepare the dataset instead of streaming")
    # checkpoints, logging, validation
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest checkpoint of --output_dir that matches its manifest; damaged ones are named and "
        "skipped), a checkpoint folder, or 'hub' / 'hub:REVISION' (the newest complete checkpoint pushed to "
        "--hub_model_id, with its path, downloaded into --output_dir and verified; docs/training.md, 'Faults')",
    )
    p.add_argument(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="seconds a collective waits for the other ranks before the run ends, naming the lost rank",
    )
    p.add_argument("--report_to", default="tensorboard", help="tensorboard | wandb | all | none")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument(
        "--validation_vae",
        default=None,
        help="decode validation images with this autoencoder instead of the teacher's VAE: an AutoencoderTiny "
        "(TAESD-XL, e.g. madebyollin/taesdxl: a few MB, decodes 1024² images with far less memory) or an "
        "AutoencoderKL, Hub id or folder; evaluation and the final pipeline keep the teacher's VAE",
    )
    p.add_argument(
        "--validation_prompts",
        nargs="+",
        default=["a photo of an astronaut riding a horse on mars", "a red fox in a snowy forest"],
    )
    # in-training evaluation (off by default): FID / CLIP score of one-step samples on a small caption set
    p.add_argument(
        "--eval_steps",
        type=int,
        default=0,
        help="every N stage-2 steps (and before the first) compute FID/CLIP, or the shapes judge's metrics (0: never); "
        "also appended to OUTPUT_DIR/eval/metrics.jsonl",
    )
    p.add_argument(
        "--eval_dataset",
        default=None,
        help="captioned images: a datasets Hub id or a local imagefolder (metadata.jsonl); 'shapes': the shapes world, "
        "scored by the shapes judge (accuracy and FD in its features; docs/tutorial_shapes.md)",
    )
    p.add_argument("--eval_dataset_split", default=None, help="default: train (local folder) / validation (Hub)")
    p.add_argument("--eval_num_prompts", type=int, default=256, help="captions (and reference images) to use")
    p.add_argument(
        "--eval_images_per_prompt",
        type=int,
        default=1,
        help="images per caption (each its own seed): more images, less noise (shapes: 4 resolves 0.05 in accuracy)",
    )
    p.add_argument("--eval_fid_resolution", type=int, default=None, help="default: min(512, --resolution)")
    p.add_argument(
        "--eval_feature_extractor",
        default="inception",
        help="the FID network: inception (clean-fid's; needs the eval extra) or a TorchScript file mapping float32 "
        "[N, 3, 299, 299] in [0, 255] to features (docs/evaluation.md)",
    )
    p.add_argument("--eval_clip_model", default=None, help="open_clip model for a CLIP score, e.g. ViT-g-14")
    p.add_argument("--eval_clip_pretrained", default="laion2b_s12b_b42k")
    p.add_argument("--eval_stats_cache", default=None, help="reference statistics cache (default: output_dir/eval)")
    # hub
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None, help="default: the logged-in token (never logged or saved)")
    p.add_argument("--hub_private", action="store_true")
    p.add_argument(
        "--hub_space_id", default=None, help="after the final push, also push the model's web app as a Gradio Space"
    )
    p.add_argument("--hub_push_every", type=int, default=0, help="also push every N-th checkpoint (0: never)")
    add_family_arguments(p, family)
    add_config_arguments(p)
    p.set_defaults(**FAMILIES[family]["defaults"])
    args = p.parse_args(argv)
    args.family = family

    if (args.dataset_name is None) == (args.train_data_files is None):
        p.error("give exactly one of --dataset_name and --train_data_files")
    if args.eval_steps and not args.eval_dataset:
        p.error("--eval_steps needs --eval_dataset (captioned reference images)")
    if args.eval_feature_extractor != "inception" and not os.path.isfile(args.eval_feature_extractor):
        p.error(f"--eval_feature_extractor {args.eval_feature_extractor}: neither 'inception' nor a TorchScript file")
    for flag, on in (("--gan_loss_weight", args.gan_loss_weight > 0), ("--degradation_gan", args.degradation_gan)):
        if on and (args.real_dataset_name is None) == (args.real_data_dir is None):
            p.error(f"{flag} needs real images: exactly one of --real_dataset_name and --real_data_dir")
    if args.resolution % 8:
        p.error(f"--resolution must be divisible by 8, got {args.resolution}")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    check_lora_base(p, args)
    check_family(p, args)
    trackers = {"all": ["tensorboard", "wandb"], "none": []}.get(args.report_to, args.report_to.split(","))
    for name in trackers:
        if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
            p.error(f"--report_to {args.report_to} needs {name}: pip install {name} (or --report_to none)")
    if args.real_caption_column and args.real_caption_column.lower() == "none":
        args.real_caption_column = None
    args.path_dir = args.path_dir or os.path.join(args.output_dir, "path")
    try:
        args.config = DisBackConfig.from_dict(vars(args), strict=False)
    except ValueError as e:
        p.error(str(e))
    return args


def add_family_arguments(p: argparse.ArgumentParser, family: str) -> None:
    """The flags only one family has."""
    if family == "sd3":
        p.add_argument(
            "--max_sequence_length", type=int, default=256, help="T5 tokens of the prompt embedding (SD3's default)"
        )
        p.add_argument(
            "--no_t5", action="store_true", help="drop the teacher's T5 encoder: its half of the embedding is zeros"
        )


def check_family(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What only the SDXL glue offers."""
    if args.family != "sdxl" and (args.gan_loss_weight > 0 or args.degradation_gan):
        name = FAMILIES[args.family]["name"]
        p.error(f"the GAN term is built on the SDXL UNet's mid-block features; it is not available for {name}")


def check_lora_base(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What `--lora_base shared` needs: every network an adapter of the teacher's UNet."""
    if not (args.lora_rank and args.lora_base == "shared"):
        return
    if args.gan_loss_weight > 0 or args.degradation_gan:
        p.error("the GAN term trains a discriminator head on the fake score's own UNet: with --gan_loss_weight or "
                "--degradation_gan pass --lora_base separate")  # fmt: skip
    if args.path_node_type != "lora" and args.method != "dmd":
        p.error("--lora_base shared keeps path nodes as adapters of the shared base: pass --path_node_type lora (or "
                "--lora_base separate for full-weight nodes)")  # fmt: skip


# ----------------------------------------------------------------------------------------------- 2. accelerator


def make_accelerator(args) -> Accelerator:
    """The accelerator (its mixed precision from --mixed_precision or the accelerate config), trackers and logging."""
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    report_to = None if args.report_to == "none" else args.report_to
    # on a shared base the generator's and the fake score's adapters are one model with an update each: under DDP
    # each backward leaves the other adapter's parameters unused
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if shares_base(args) else []
    handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)))
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=report_to, project_config=project, kwargs_handlers=handlers
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is too much
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if "token" not in k and k != "config"}
        accelerator.init_trackers(
            "disback", config={k: str(v) if isinstance(v, list) else v for k, v in config.items()}
        )
    if args.pretrained_generator is None and args.family == "sdxl":  # said once: both stages load the generator
        logger.warning(
            "the generator starts from the teacher's UNet (no --pretrained_generator). DMD2's authors report that a "
            "one-step SDXL generator needs regression pre-training or a DMD2 start (the released DisBack SDXL run "
            "starts from DMD2's one-step UNet); from the teacher, expect slow progress at SDXL scale.",
            main_process_only=True,
        )
    return accelerator


def shares_base(args) -> bool:
    """Whether this run's LoRA networks are adapters of one frozen base (`--lora_rank` with `--lora_base shared`)."""
    return bool(args.config.lora_rank) and args.lora_base == "shared"


def weight_dtype_of(accelerator) -> torch.dtype:
    """The compute dtype: frozen networks are held in it, trainable ones keep fp32 masters and autocast to it."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# --------------------------------------------------------------------------------------------- 3. frozen models


def check_teacher_family(args) -> None:
    """A teacher of another family gets one line naming the script to use, not a stack of missing-key errors."""
    from diffusers import DiffusionPipeline

    try:
        cls = DiffusionPipeline.load_config(args.pretrained_teacher_model, revision=args.revision)["_class_name"]
    except (OSError, KeyError, ValueError):
        return  # not a pipeline folder: loading says what is missing
    for family, spec in FAMILIES.items():
        if cls in spec["pipelines"] and family != args.family:
            script = "train_disback_sd3.py" if family == "sd3" else "train_disback_sdxl.py"
            raise ValueError(
                f"{args.pretrained_teacher_model} is a {cls} ({spec['name']}) teacher; this run expects "
                f"{FAMILIES[args.family]['name']}: use examples/train_disback/{script}"
            )


def load_frozen_models(args, accelerator, weight_dtype) -> FrozenSDXL | FrozenSD3:
    """The teacher's frozen parts, by family: `FrozenSDXL` or `FrozenSD3` (one interface; docs/training.md)."""
    check_teacher_family(args)
    if args.family == "sd3":
        frozen = FrozenSD3.from_pretrained(
            args.pretrained_teacher_model, args.resolution, args.config, weight_dtype, accelerator.device,
            args.revision, args.variant, offload_text_encoders=args.offload_text_encoders,
            max_sequence_length=args.max_sequence_length, use_t5=not args.no_t5,
        )  # fmt: skip
        frozen.generator_timestep(args.config.conditioning_timestep)  # checked before any work
        logger.info(f"flow schedules: { ({k: v.describe() for k, v in frozen.schedules.items()}) }")
        return frozen
    frozen = FrozenSDXL.from_pretrained(
        args.pretrained_teacher_model, args.resolution, weight_dtype, accelerator.device, args.revision, args.variant,
        offload_text_encoders=args.offload_text_encoders,
    )  # fmt: skip
    if args.gan_loss_weight > 0 or args.degradation_gan:
        frozen.load_vae(accelerator.device, weight_dtype)
    return frozen


# ------------------------------------------------------------------------------------------------------- 4. data


class Batches:
    """This rank's training batches: prompts (conditioning) with the generator's input noise, and real images for the
    GAN term, both from resumable streams; `rng` is the training noise (also of the losses)."""

    def __init__(self, args, accelerator, frozen: FrozenSDXL | FrozenSD3):
        self.args, self.accelerator, self.frozen = args, accelerator, frozen
        rank, world = accelerator.process_index, accelerator.num_processes
        self.prompts = PromptStream(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
            data_files=args.train_data_files, caption_column=args.caption_column, streaming=not args.no_streaming,
            shuffle_buffer=args.shuffle_buffer, seed=args.seed, rank=rank, world_size=world,
        )  # fmt: skip
        self.real = None
        if args.gan_loss_weight > 0 or args.degradation_gan:
            self.real = real_image_stream(args, rank, world)
        self.rng = torch.Generator().manual_seed(args.seed * 1000 + rank)
        self.latent_shape = frozen.latent_shape(args.resolution)

    @property
    def streams(self) -> dict:
        """The streams whose positions a checkpoint saves."""
        return {"prompts": self.prompts, "real": self.real}

    def __call__(self) -> tuple[dict, torch.Tensor]:
        prompts = self.prompts.take(self.args.train_batch_size)
        cond = self.frozen.conditioner(prompts, self.accelerator.device)
        z = torch.randn((len(prompts), *self.latent_shape), generator=self.rng).to(self.accelerator.device)
        return cond, z

    @torch.no_grad()
    def real_batch(self) -> tuple[torch.Tensor, dict]:
        """Real images encoded to latents on the fly, with their conditioning (empty captions if the data has none)."""
        images, captions = zip(*self.real.take(self.args.train_batch_size))
        vae = self.frozen.vae
        pixels = torch.stack(images).to(self.accelerator.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=None) * vae.config.scaling_factor
        return latents.float(), self.frozen.conditioner(list(captions), self.accelerator.device)


def real_image_stream(args, rank: int = 0, world_size: int = 1) -> ImageStream:
    """The GAN term's real images, each with its caption from `--real_caption_column`, this process's share."""
    return ImageStream(
        args.resolution, dataset_name=args.real_dataset_name, data_dir=args.real_data_dir,
        image_column=args.real_image_column, caption_column=args.real_caption_column,
        streaming=not args.no_streaming, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
        rank=rank, world_size=world_size,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------- the run


@dataclass
class Run:
    """What a run holds: its arguments and settings, the accelerator, the frozen models, the batches, where it is, and
    the pusher."""

    args: argparse.Namespace
    accelerator: Accelerator
    weight_dtype: torch.dtype
    frozen: FrozenSDXL | FrozenSD3
    batches: Batches
    state: RunState = field(default_factory=RunState)
    pusher: BackgroundPusher | None = None
    shared: SharedBase | None = None  # the frozen teacher holding every adapter (--lora_base shared)
    tiny_vae: torch.nn.Module | None = None  # --validation_vae, once loaded
    checkpoint_count: int = 0
    stage2_started: float | None = None  # perf_counter() when this process began stage-2 iterations
    eval_seconds: float = 0.0  # of it, spent in evaluate()

    def stage2_seconds(self) -> float:
        """Seconds of stage-2 iterations in this process so far, evaluation excluded (0 before the first)."""
        if self.stage2_started is None:
            return 0.0
        return time.perf_counter() - self.stage2_started - self.eval_seconds

    @property
    def config(self) -> DisBackConfig:
        return self.args.config

    def generate_fn(self, unet, autocast: bool = True):
        """`(z, cond) -> x0`: the one-step sample of `unet` (a UNet or transformer) at `--conditioning_timestep`."""
        pred = self.frozen.score_fn(unet, autocast=autocast)
        t_c = self.frozen.generator_timestep(self.config.conditioning_timestep)
        return lambda z, cond: one_step_sample(pred, z, cond, self.frozen.noise_schedule, t_c)

    def update_fn(self, models: dict, optimizers: dict, params: dict) -> OptimizerUpdate:
        """The training steps' `update(name, loss)`: accelerate's backward, clipping that works under FSDP2 (on a shared
        base, of the updated adapter's parameters only), NaN policy decided by all ranks."""
        acc, own = self.accelerator, self.shared is not None

        def clip(name, params, max_norm):
            clip_grad_norm(acc, models[name], optimizers[name], max_norm, params if own else None)

        return OptimizerUpdate(
            optimizers,
            params,
            self.config.max_grad_norm,
            backward=acc.backward,
            clip=clip,
            finite=lambda name, loss: finite_or_skip(acc, loss, name, self.args.nan_policy, self.state.global_step),
        )

    def save_checkpoint(self, with_path: bool = False) -> None:
        """Saves a checkpoint and pushes every `--hub_push_every`-th one; `with_path` (stage 1): the path recorded so
        far is pushed first, so a run resumed from the Hub finds the nodes its checkpoint expects."""
        args = self.args
        final = save_checkpoint(
            self.accelerator, args.output_dir, self.state, self.batches.rng, self.batches.streams,
            args.checkpoints_total_limit,
        )  # fmt: skip
        if self.accelerator.is_main_process:
            self.checkpoint_count += 1
            if self.pusher and args.hub_push_every and self.checkpoint_count % args.hub_push_every == 0:
                name = os.path.basename(final)
                if with_path and os.path.isdir(args.path_dir):
                    self.pusher.submit(args.path_dir, path_in_repo="path", commit_message=f"Path up to {name}")
                self.pusher.submit(final, path_in_repo=f"checkpoints/{name}", commit_message=f"Checkpoint {name}")
        logger.info(f"saved {final}")

    def restore(self, plan: ResumePlan, stage: str) -> None:
        self.state = restore_checkpoint(self.accelerator, plan, stage, self.batches.rng, self.batches.streams)

    def log(self, values: dict, step: int) -> None:
        self.accelerator.log({k: float(v) for k, v in values.items()}, step=step)

    def report_peak_memory(self, what: str) -> None:
        if torch.cuda.is_available():
            peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
            logger.info(
                f"{what}: peak GPU memory {peak:.2f} GiB allocated, {reserved:.2f} GiB reserved, on rank "
                f"{self.accelerator.process_index}"
            )
            torch.cuda.reset_peak_memory_stats()

    def finish(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            for failure in self.pusher.failures:
                logger.error(f"a Hub push failed (local files are intact): {failure}")
            if self.args.hub_space_id and os.path.isdir(os.path.join(self.args.output_dir, "final")):
                push_app_space(self.args)
        self.accelerator.end_training()


def push_app_space(args) -> None:
    """The web app of the pushed model as a Space (`--hub_space_id`; docs/app.md). A failure is logged, not raised:
    the model is on the Hub and `disback push --space` can make the Space later."""
    from diffusers_disback.hub import HubPushError, push_space

    try:
        url = push_space(args.hub_model_id, args.hub_space_id, private=args.hub_private or None, token=args.hub_token)
        logger.info(f"app Space pushed: {url}")
    except HubPushError as e:
        logger.error(f"the app Space push failed (the model is pushed; retry with disback push --space): {e}")


def make_run(args, accelerator) -> Run:
    if shares_base(args) and accelerator.distributed_type == DistributedType.FSDP:
        # FSDP would shard the teacher itself, and the main process alone runs it (path profile, final pipeline)
        raise ValueError(
            "--lora_base shared does not run under FSDP: the shared base is the frozen teacher, which FSDP would "
            "shard. Use DDP or a single process with it, or pass --lora_base separate under FSDP."
        )
    weight_dtype = weight_dtype_of(accelerator)
    frozen = load_frozen_models(args, accelerator, weight_dtype)
    batches = Batches(args, accelerator, frozen)
    pusher = None
    if args.push_to_hub and accelerator.is_main_process:
        pusher = BackgroundPusher(args.hub_model_id, private=args.hub_private or None, token=args.hub_token)
    shared = None
    if shares_base(args):
        shared = SharedBase(frozen.teacher)
        if args.gradient_checkpointing:
            shared.enable_gradient_checkpointing()
    return Run(args, accelerator, weight_dtype, frozen, batches, pusher=pusher, shared=shared)


def trainable_unet(run: Run, unet, rank: int, adapter_name: str, with_head: bool):
    """A UNet made trainable (full, or a LoRA adapter of `rank`), with the discriminator head if `with_head`; returns
    the module and its fp32 master parameters."""
    config = lora_config(rank, run.frozen.lora_targets) if rank else None
    params = make_trainable(unet, config, run.weight_dtype, adapter_name, run.args.gradient_checkpointing)
    if with_head:  # the discriminator head reads the score's mid-block features and trains with it
        unet = FakeScoreWithHead(unet, run.args.resolution // 8)
        params = params + list(unet.head.parameters())
    return unet, params


def gan_term(run: Run, score, generator_weight: float = 0.0) -> SDXLGanTerm:
    return SDXLGanTerm(
        score, run.batches.real_batch, run.frozen.noise_schedule, run.batches.rng,
        run.config.gan_discriminator_weight, generator_weight,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ validation and evaluation


@torch.no_grad()
def decode(run: Run, x0: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents to images in [0, 1] (NCHW, fp32) with the teacher's VAE (or `vae`: any diffusers autoencoder)."""
    vae = vae or run.frozen.load_vae(run.accelerator.device, run.weight_dtype)
    latents = run.frozen.decode_latents(vae, x0)
    return vae.decode(latents.to(vae.dtype)).sample.float().clamp(-1, 1).add(1).div(2)


def validation_vae(run: Run):
    """`--validation_vae`, loaded once: an `AutoencoderTiny` (TAESD-XL: scaling factor 1, decodes the UNet's latents
    as they are) or an `AutoencoderKL`; None: the teacher's VAE."""
    source = run.args.validation_vae
    if source is None:
        return None
    if run.tiny_vae is None:
        from diffusers import AutoencoderTiny

        kl = AutoencoderTiny.load_config(source).get("_class_name") == "AutoencoderKL"
        cls = AutoencoderKL if kl else AutoencoderTiny
        dtype = torch.bfloat16 if run.weight_dtype == torch.bfloat16 else torch.float32
        run.tiny_vae = cls.from_pretrained(source).to(run.accelerator.device, dtype).requires_grad_(False)
    return run.tiny_vae


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


@torch.no_grad()
def validate(run: Run, generator_unet, step: int) -> None:
    """One-step samples for the fixed validation prompts and seeds, logged and saved as a PNG grid. Every rank runs
    the generator (it may be sharded); the main process decodes and logs."""
    acc, args = run.accelerator, run.args
    if not args.validation_prompts:
        return
    cond = run.frozen.conditioner(args.validation_prompts, acc.device)
    z = torch.randn(
        (len(args.validation_prompts), *run.batches.latent_shape), generator=torch.Generator().manual_seed(0)
    ).to(acc.device)
    with acc.autocast():
        x0 = run.generate_fn(generator_unet)(z, cond)
    if not acc.is_main_process:
        return
    images = decode(run, x0, validation_vae(run))
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    grid = image_grid(to_pil(images))
    grid.save(os.path.join(args.output_dir, "validation", f"step-{step:08d}.png"))
    for tracker in acc.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", images.cpu(), step, dataformats="NCHW")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(args.validation_prompts))]}, step=step)


def setup_evaluation(run: Run) -> dict:
    """Captions on every rank (each runs the possibly sharded generator); the evaluation package's [`Scorer`] (the
    feature network, the reference statistics computed once and cached, CLIP, or the shapes judge) on the main
    process."""
    from diffusers_disback.evaluation import (
        CaptionSet,
        EvalProtocol,
        ReferenceImages,
        Scorer,
        get_protocol,
        load_feature_extractor,
    )

    args, acc = run.args, run.accelerator
    if args.eval_dataset == "shapes":
        captions, protocol = CaptionSet.from_shapes(), get_protocol("shapes")
    else:
        captions = CaptionSet.from_dataset(args.eval_dataset, args.eval_dataset_split, args.eval_num_prompts)
        protocol = EvalProtocol(
            name="in-training", num_prompts=len(captions), resolution=args.resolution,
            fid_resolution=args.eval_fid_resolution or min(512, args.resolution), patch_fid=False,
            clip_model=args.eval_clip_model, clip_pretrained=args.eval_clip_pretrained,
        )  # fmt: skip
    if args.eval_images_per_prompt < 1:
        raise ValueError(f"--eval_images_per_prompt must be >= 1, got {args.eval_images_per_prompt}")
    setup = {"captions": list(captions.captions) * args.eval_images_per_prompt}  # image i: seed i
    if not acc.is_main_process:
        return setup
    extractor = None if protocol.name == "shapes" else load_feature_extractor(args.eval_feature_extractor, acc.device)
    # a CLIP model is kept on the CPU between evaluations: ViT-g-14 is ~5.5 GB in fp32, on rank 0's training GPU
    scorer = Scorer(
        protocol, reference=ReferenceImages.from_caption_set(captions), feature_extractor=extractor,
        stats_cache=args.eval_stats_cache or os.path.join(args.output_dir, "eval"), device=acc.device,
        clip_device="cpu",
    )  # fmt: skip
    return {**setup, "scorer": scorer}


def start_evaluation(run: Run, generator_unet) -> dict | None:
    """The evaluation setup if `--eval_steps` asks for one, with a first evaluation before stage 2's first iteration
    (where the curve starts)."""
    if not run.args.eval_steps:
        return None
    setup = setup_evaluation(run)
    if run.state.stage_step == 0:
        evaluate(run, setup, generator_unet, run.state.global_step)
    return setup


@torch.no_grad()
def evaluate(run: Run, setup: dict, generator_unet, step: int) -> None:
    """FID (and CLIP score) of one-step samples for the eval captions, fixed seeds (`seed + i`), logged as
    `eval/fid` and `eval/clip_score` (with `--eval_dataset shapes`: `eval/shapes_accuracy`, per attribute, and
    `eval/shapes_fd` to renders) and appended to `OUTPUT_DIR/eval/metrics.jsonl` with the stage-2 seconds so far."""
    acc, args = run.accelerator, run.args
    began = time.perf_counter()
    captions, images, generate = setup["captions"], [], run.generate_fn(generator_unet)
    for start in range(0, len(captions), args.train_batch_size):
        chunk = captions[start : start + args.train_batch_size]
        z = torch.stack(
            [
                torch.randn(run.batches.latent_shape, generator=torch.Generator().manual_seed(start + i))
                for i in range(len(chunk))
            ]
        ).to(acc.device)
        with acc.autocast():
            x0 = generate(z, run.frozen.conditioner(chunk, acc.device))
        if acc.is_main_process:
            images += to_pil(decode(run, x0))
    if not acc.is_main_process:
        return
    logs = {f"eval/{k}": v for k, v in setup["scorer"](lambda: iter(images), captions).items()}
    run.log(logs, step)
    record = {"step": step, "stage_step": run.state.stage_step, "stage2_seconds": run.stage2_seconds(), **logs}
    os.makedirs(os.path.join(args.output_dir, "eval"), exist_ok=True)
    with open(os.path.join(args.output_dir, "eval", "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    logger.info(f"evaluation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
    if run.stage2_started is not None:
        run.eval_seconds += time.perf_counter() - began


def progress_bar(run: Run, total: int, desc: str):
    start = run.state.stage_step
    return tqdm(
        range(start, total), initial=start, total=total, desc=desc, disable=not run.accelerator.is_local_main_process
    )


# -------------------------------------------------------------------------------------------------- 6. stage 1


CANDIDATES = "candidates"  # subfolder of --path_dir: the snapshots distance spacing chooses the nodes from


def open_path(run: Run, plan: ResumePlan, lora) -> tuple[DegradationPath | None, DegradationPath | None]:
    """The path stage 1 writes and, with distance spacing, the candidates it records (main process; None on the
    others): new ones, or, resumed, the existing ones cut back to the checkpoint's step (the kept nodes are chosen
    again at the end). Refuses to overwrite a path it did not start."""
    args, acc = run.args, run.accelerator
    has_path = os.path.exists(os.path.join(args.path_dir, "path_manifest.json"))
    acc.wait_for_everyone()  # every rank looks before the main process creates the path
    resumed = plan.resumes("degradation")
    # a resumed run killed before its first checkpoint left nodes in its own path folder: they are recorded again
    restart = (
        has_path
        and not resumed
        and args.resume_from_checkpoint is not None
        and not checkpoint_dirs(args.output_dir)
        and os.path.abspath(args.path_dir).startswith(os.path.abspath(args.output_dir) + os.sep)
    )
    if has_path and not resumed and not restart:  # checked on every rank (shared output dir): no rank left waiting
        raise FileExistsError(
            f"{args.path_dir} already holds a path and there is no checkpoint to resume from "
            f"({os.path.join(args.output_dir, 'checkpoints')}); pass --resume_from_checkpoint latest, another "
            "--path_dir, or --stage backtracking to use that path (nothing was overwritten)"
        )
    if not acc.is_main_process:
        return None, None
    by_distance = run.config.path_node_spacing == "distance"
    candidates_dir = os.path.join(args.path_dir, CANDIDATES)
    if has_path:
        after = 0 if restart else plan.path_truncation
        if restart:
            logger.warning(f"no checkpoint yet: the nodes in {args.path_dir} are dropped and recorded again")
        path = DegradationPath.load(args.path_dir)
        if not by_distance:
            path.truncate(after)  # nodes after the checkpoint are recorded again
            return path, None
        path.truncate(0)  # chosen from the candidates again at the end
        candidates = DegradationPath.load(candidates_dir)
        candidates.truncate(after)
        return path, candidates
    if resumed:
        raise FileNotFoundError(
            f"resuming stage 1 at step {plan.state.stage_step}, but {args.path_dir} holds no path: the nodes "
            "recorded before the checkpoint are gone. Restore the path folder or start stage 1 afresh."
        )
    kind, teacher = run.config.path_node_type, run.frozen.teacher
    path = DegradationPath.create(args.path_dir, teacher, kind=kind, lora_config=lora)
    if not by_distance:
        return path, None
    return path, DegradationPath.create(candidates_dir, teacher, kind=kind, lora_config=lora)


def path_profiler(run: Run, generator) -> PathProfiler | None:
    """The probe of the path profile (every rank builds the same one: a live UNet is measured by all ranks), from
    the first `--path_profile_prompts` captions of a stream of its own (the training stream does not move)."""
    args, config = run.args, run.config
    if config.path_profile_prompts < 1:
        return None
    prompts = PromptStream(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name, data_files=args.train_data_files,
        caption_column=args.caption_column, streaming=not args.no_streaming, shuffle_buffer=args.shuffle_buffer,
        seed=args.seed + 1,
    ).take(config.path_profile_prompts)  # fmt: skip
    device = run.accelerator.device
    return PathProfiler(run.frozen, generator, prompts, config, device, seed=args.seed + 1, shared=run.shared)


def add_path_node(run: Run, path: DegradationPath | None, degrading, step: int, distance: float | None) -> None:
    """Gathers the degrading score's weights (every rank takes part) and writes them as the next node (or
    candidate), with its measured distance to the teacher."""
    node_state = full_state_dict(run.accelerator, degrading)
    if run.config.degradation_gan:  # a node is the score; the head is not part of it
        node_state = FakeScoreWithHead.unet_state_dict(node_state)
    if run.config.path_node_type == "lora":
        node_state = lora_state_dict(node_state, LORA_ADAPTER)
    if run.accelerator.is_main_process:
        node = path.add_node(node_state, step, distance=distance)
        what = "candidate" if os.path.basename(path.directory) == CANDIDATES else "path node"
        at = f", distance to the teacher {distance:.4f}" if distance is not None else ""
        logger.info(f"{what} {node.index} at stage-1 step {step} ({node.num_bytes / 2**20:.1f} MiB{at})")
    else:
        failpoint("path_node")  # while the main process writes the node
    run.accelerator.wait_for_everyone()


def record_node(run: Run, profiler: PathProfiler | None, path, degrading, module, step: int) -> float | None:
    """A path node (or candidate) at stage-1 `step`, with its distance to the teacher when profiled (returned). A
    candidate's probe predictions are kept beside it: placing the nodes then needs no second probe pass."""
    predictions = profiler.predictions(degrading) if profiler else None
    distance = score_distance(predictions, profiler.teacher_predictions) if profiler else None
    add_path_node(run, path, module, step, distance)
    if path is not None and predictions is not None and os.path.basename(path.directory) == CANDIDATES:
        save_predictions(path, step, predictions)
    return distance


def degradation_networks(run: Run, rank: int):
    """
    Stage 1's networks: the frozen initial generator (in the compute dtype), the degrading score (full, or a LoRA of
    `rank`) as the loss calls it and as accelerate prepared it, its optimizer and LR schedule. On a shared base the
    degrading score is an adapter of the frozen teacher, and a generator that starts from the teacher is the base
    alone.
    """
    args, config, acc, shared = run.args, run.config, run.accelerator, run.shared
    if shared is not None and args.pretrained_generator is None:
        generator = shared.view()
    else:
        generator = run.frozen.load_generator(args.pretrained_generator)
        generator = generator.to(acc.device, run.weight_dtype).requires_grad_(False)
    if shared is not None:
        module = run.frozen.teacher
        params = shared.add_adapter(lora_config(rank, run.frozen.lora_targets), LORA_ADAPTER, trainable=True)
    else:
        teacher = run.frozen.load_teacher_fp32()
        module, params = trainable_unet(run, teacher, rank, LORA_ADAPTER, config.degradation_gan)
    optimizer = make_optimizer(params, config.degradation_learning_rate, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, config.degradation_steps, acc.num_processes)
    module, optimizer, lr_scheduler = prepare_trainable(acc, module, optimizer, lr_scheduler)
    degrading = shared.view(LORA_ADAPTER, caller=module) if shared is not None else module
    if args.compile:
        for unet in (module,) if isinstance(generator, AdapterView) else (generator, module):
            unet.compile(backend=args.compile)
    return generator, degrading, module, optimizer, lr_scheduler


def run_degradation(run: Run, plan: ResumePlan) -> None:
    """Stage 1: fine-tune a copy of the teacher on the frozen initial generator's samples; record the path."""
    args, config, acc, shared = run.args, run.config, run.accelerator, run.shared
    rank = config.path_lora_rank if config.path_node_type == "lora" else 0
    generator, degrading, module, optimizer, lr_scheduler = degradation_networks(run, rank)
    if plan.resumes("degradation"):
        run.restore(plan, "degradation")
    path, candidates = open_path(run, plan, lora_config(rank, run.frozen.lora_targets) if rank else None)
    profiler = path_profiler(run, generator)
    step_fn = DegradationStep(
        generator=run.generate_fn(generator, autocast=False),  # frozen, held in the compute dtype
        degrading=Score(run.frozen.score_fn(degrading), run.frozen.denoising_schedule),
        update=run.update_fn(
            {"degrading": module}, {"degrading": optimizer}, {"degrading": optimizer.param_groups[0]["params"]}
        ),
        rng=run.batches.rng,
        autocast=acc.autocast,
        gan=gan_term(run, degrading) if config.degradation_gan else None,
    )
    node_steps, kept_predictions = config.node_steps(), None
    for _ in (progress := progress_bar(run, config.degradation_steps, "stage 1: degradation")):
        lr = lr_scheduler.get_last_lr()[0]  # the LR of this update
        logs = step_fn(run.batches())
        failpoint("iteration")  # an update made, the step not counted: a resume redoes it
        lr_scheduler.step()  # the LR is a function of the iteration, skipped updates included
        run.state.stage_step += 1
        run.state.global_step += 1
        step = run.state.stage_step
        if step in node_steps:
            distance = record_node(run, profiler, candidates or path, degrading, module, step)
            if distance is not None:
                logs["distance_to_teacher"] = distance
        if step == config.degradation_steps and candidates is not None and acc.is_main_process:
            kept_predictions = keep_by_distance(run, profiler, path, candidates)
        run.log({f"degradation/{k}": v for k, v in {**logs, "lr": lr}.items()}, run.state.global_step)
        progress.set_postfix(loss=f"{logs['loss'].item():.4f}", nodes=len(path) if path else "-")
        if step % args.checkpointing_steps == 0 or step == config.degradation_steps:
            if step == config.degradation_steps:
                run.state.stage, run.state.stage_step = "backtracking", 0
            run.save_checkpoint(with_path=True)
    run.report_peak_memory("stage 1")
    del degrading, module, optimizer
    acc.free_memory()
    if shared is not None:  # its nodes are saved; the shared base is the teacher again
        shared.delete_adapter(LORA_ADAPTER)
    if acc.is_main_process and path is not None:
        if profiler is not None:
            profile_recorded_path(run, profiler, path, candidates, kept_predictions)
        if candidates is not None:
            shutil.rmtree(
                candidates.directory
            )  # the kept nodes are linked into the path; the final checkpoint is safe
    acc.wait_for_everyone()
    if acc.is_main_process and run.pusher:
        run.pusher.submit(args.path_dir, path_in_repo="path", commit_message="Degradation path (stage 1)")
    acc.wait_for_everyone()
    del generator, profiler
    acc.free_memory()


def keep_by_distance(run: Run, profiler: PathProfiler, path: DegradationPath, candidates) -> list[torch.Tensor]:
    """Distance spacing, at the last stage-1 step: of the candidates, the `--num_path_nodes` evenly spaced in distance
    between neighbours become the path (written before the final checkpoint, so a resumed run chooses them again).
    Returns the kept nodes' probe predictions (the teacher first), for the profile."""
    predictions = profiler.node_predictions(candidates)
    config = run.config
    chosen = place_by_distance(pairwise_distances(predictions), config.num_path_nodes, config.path_spacing_tolerance)
    path.keep_nodes(candidates, chosen)
    logger.info(
        f"kept {len(chosen)} of {len(candidates) - 1} candidates, evenly spaced in distance: stage-1 steps "
        f"{[n.step for n in path.nodes[1:]]}"
    )
    return [predictions[0]] + [predictions[i] for i in chosen]


def profile_recorded_path(run: Run, profiler: PathProfiler, path: DegradationPath, candidates, predictions) -> None:
    """The path's profile at the end of stage 1: into the manifest, a plot beside it, TensorBoard and the log."""
    profile = profiler.profile(path, candidates, predictions)
    plot = write_profile(path, profile)
    logger.info(f"path profile (plot: {plot}):\n{profile.table()}")
    for node in profile.nodes[1:]:
        values = {"to_teacher": node.to_teacher, "to_last": node.to_last, "to_previous": node.to_previous}
        run.log({f"path_profile/{k}": v for k, v in values.items()}, node.step)
    run.log({"path_profile/gap_ratio": profile.gap_ratio}, run.state.global_step)


# -------------------------------------------------------------------------------------------------- 7. stage 2


def backtracking_target(run: Run, switcher: NodeSwitcher, schedule: BacktrackingSchedule):
    """`cond -> (score, guidance)`: the current target of `schedule`; the teacher and path nodes are frozen and held
    in the compute dtype, so they run outside autocast."""
    frozen, config = run.frozen, run.config
    teacher_pred = frozen.score_fn(frozen.teacher, autocast=False)

    def node_pred(index):
        return frozen.score_fn(switcher.activate(index), autocast=False)

    def target(cond) -> tuple[Score, float]:
        teacher = Score(teacher_pred, frozen.noise_schedule, uncond=frozen.conditioner.uncond(cond))
        return target_score(schedule, node_pred, teacher, config.guidance_scale, config.intermediate_cfg)

    return target


def warn_if_short(config: DisBackConfig, path: DegradationPath) -> None:
    needed = (len(path) - 2) * config.backtrack_interval  # iterations until the target is the teacher
    if len(path) > 1 and config.max_train_steps <= needed:
        logger.warning(
            f"--max_train_steps {config.max_train_steps} ends before the target reaches the teacher, after {needed} "
            f"iterations ({len(path) - 2} switches x --backtrack_interval {config.backtrack_interval}): the run ends "
            f"on an intermediate node. Raise --max_train_steps above {needed} or lower --backtrack_interval."
        )


def stage2_path(run: Run) -> DegradationPath:
    """The recorded path, verified once per machine (`--method dmd`: a path of the teacher alone, nothing read)."""
    args, acc = run.args, run.accelerator
    if not MethodPlan.uses_path(run.config.method):
        return DegradationPath.create(tempfile.mkdtemp(prefix="disback-dmd-"), run.frozen.teacher)
    path = load_path_verified_once(acc, args.path_dir)
    leftover = os.path.join(args.path_dir, CANDIDATES)  # a run killed after its last stage-1 checkpoint
    if acc.is_main_process and os.path.isdir(leftover):
        shutil.rmtree(leftover)
    return path


def run_backtracking(run: Run, plan: ResumePlan) -> tuple[torch.nn.Module, DegradationPath]:
    """Stage 2: distribution matching against targets that walk the path back to the teacher (`--method dmd`: the
    teacher from the start, no path; `warm`: the teacher from the start, the fake score from the last node). Returns
    the trained generator (prepared) and the path."""
    args, config, acc = run.args, run.config, run.accelerator
    path = stage2_path(run)
    method = MethodPlan.of(config.method, len(path), config.fake_score_init)
    if method.num_targets > 1:
        warn_if_short(config, path)
    gan = config.gan_loss_weight > 0
    if run.shared is not None:
        generator, fake, switcher, opts, models = shared_base_networks(run, path, method)
        (opt_g, sched_g), (opt_f, sched_f) = opts
    else:
        generator, params_g = trainable_unet(
            run, run.frozen.load_generator(args.pretrained_generator), config.lora_rank, GENERATOR_ADAPTER, False
        )
        fake = run.frozen.load_teacher_fp32()
        if method.fake_score_node is not None:  # s_phi <- R[0]
            fake.load_state_dict(path.merged_state_dict(fake, method.fake_score_node))
        fake, params_f = trainable_unet(run, fake, config.lora_rank, FAKE_SCORE_ADAPTER, gan)
        switcher = NodeSwitcher(path, copy.deepcopy(run.frozen.teacher), teacher=run.frozen.teacher)
        opt_g, sched_g = optimizer_and_schedule(run, params_g, config.learning_rate)
        opt_f, sched_f = optimizer_and_schedule(run, params_f, config.fake_learning_rate)
        generator, opt_g, sched_g = prepare_trainable(acc, generator, opt_g, sched_g)
        fake, opt_f, sched_f = prepare_trainable(acc, fake, opt_f, sched_f)
        models = {"generator": generator, "fake_score": fake}
        if args.compile:  # after the switcher copied the teacher and loaded the nodes
            for unet in (generator, fake, switcher.model, run.frozen.teacher):
                unet.compile(backend=args.compile)
    schedule = method.schedule(config)
    if plan.resumes("backtracking"):
        run.restore(plan, "backtracking")
        if plan.restores_models("backtracking"):
            schedule.load_state_dict(run.state.backtracking)
    run.state.stage = "backtracking"
    optimizers = {"generator": opt_g, "fake_score": opt_f}
    params_g, params_f = (o.param_groups[0]["params"] for o in (opt_g, opt_f))
    min_step, max_step = config.timestep_range(run.frozen.noise_schedule.num_train_timesteps)
    step_fn = BacktrackingStep(
        generator=run.generate_fn(generator),
        fake_score=Score(run.frozen.score_fn(fake), run.frozen.noise_schedule),
        # in the DM loss the fake score runs in fp32 outside autocast, as DMD2's does (its gradient is the
        # difference of two x0 estimates, which bf16 rounding would blur as the generator closes in)
        fake_score_dm=Score(run.frozen.score_fn(fake, autocast=False), run.frozen.noise_schedule),
        target=backtracking_target(run, switcher, schedule),
        schedule=schedule,
        update=run.update_fn(models, optimizers, {"generator": params_g, "fake_score": params_f}),
        rng=run.batches.rng,
        fake_score_update_ratio=config.fake_score_update_ratio,
        min_step=min_step,
        max_step=max_step,
        autocast=acc.autocast,
        gan=gan_term(run, fake, config.gan_loss_weight) if gan else None,
        reduce=lambda d: acc.reduce(d, reduction="mean").item(),
    )
    eval_setup = start_evaluation(run, generator)
    run.stage2_started = time.perf_counter()
    for _ in (progress := progress_bar(run, config.max_train_steps, "stage 2: backtracking")):
        lr = sched_g.get_last_lr()[0]  # the LR of this iteration's generator update, if it has one
        logs = step_fn(run.state.stage_step, run.batches())
        failpoint("iteration")
        if "generator_loss" in logs:
            logs["lr"] = lr
        sched_g.step()
        sched_f.step()
        run.state.stage_step += 1
        run.state.global_step += 1
        run.state.backtracking = schedule.state_dict()
        step = run.state.stage_step
        run.log({f"backtracking/{k}": v for k, v in logs.items()}, run.state.global_step)
        progress.set_postfix(target=f"P{schedule.target_node}", fake=f"{logs['fake_loss'].item():.4f}")
        if args.validation_steps and step % args.validation_steps == 0:
            validate(run, generator, run.state.global_step)
        if args.eval_steps and step % args.eval_steps == 0:
            evaluate(run, eval_setup, generator, run.state.global_step)
        if step % args.checkpointing_steps == 0 or step == config.max_train_steps:
            run.save_checkpoint()  # resuming the last one runs no iteration but still writes the final pipeline
    run.report_peak_memory("stage 2")
    return generator, path


def optimizer_and_schedule(run: Run, params, lr: float):
    """AdamW over `params` and its LR schedule over stage 2's iterations (the reference steps the generator's every
    iteration, updated or not)."""
    optimizer = make_optimizer(params, lr, run.config)
    return optimizer, make_lr_scheduler(
        optimizer, run.config, run.config.max_train_steps, run.accelerator.num_processes
    )


def shared_base_networks(run: Run, path: DegradationPath, method: MethodPlan):
    """
    Stage 2's networks as adapters of the one frozen teacher UNet (`--lora_base shared`; docs/training.md, "One frozen
    base"): the generator `base + generator` (or its own base, from `--pretrained_generator`), the fake score
    `base + node_k + fake_score` when it starts from node k (the separate mode's `merge(base, node_k) + fake_score`),
    every path node `base + node_i`, the teacher the base alone. The adapters are created in the separate mode's order
    (generator, fake score, nodes), so both modes draw the same initial LoRA weights. Returns the generator and fake
    score views (each calling the prepared module), the switcher, their (optimizer, schedule) pairs and the prepared
    modules by network name.
    """
    args, config, acc, shared = run.args, run.config, run.accelerator, run.shared
    adapter = lora_config(config.lora_rank, run.frozen.lora_targets)
    own_generator = args.pretrained_generator is not None  # a different UNet: it cannot share the teacher's weights
    if own_generator:
        gen_module, params_g = trainable_unet(
            run, run.frozen.load_generator(args.pretrained_generator), config.lora_rank, GENERATOR_ADAPTER, False
        )
    else:
        params_g = shared.add_adapter(adapter, GENERATOR_ADAPTER, trainable=True)
    params_f = shared.add_adapter(adapter, FAKE_SCORE_ADAPTER, trainable=True)
    switcher = NodeSwitcher(path, shared, teacher=run.frozen.teacher)
    opt_g, sched_g = optimizer_and_schedule(run, params_g, config.learning_rate)
    opt_f, sched_f = optimizer_and_schedule(run, params_f, config.fake_learning_rate)
    fake_adapters = (FAKE_SCORE_ADAPTER,)
    if method.fake_score_node:  # s_phi <- R[0]: the node's adapter under the fake score's, both active
        fake_adapters = (f"node_{method.fake_score_node}", FAKE_SCORE_ADAPTER)
    if own_generator:
        gen_module, opt_g, sched_g = prepare_trainable(acc, gen_module, opt_g, sched_g)
        base, opt_f, sched_f = prepare_trainable(acc, run.frozen.teacher, opt_f, sched_f)
        generator = gen_module
    else:
        base, opt_g, opt_f, sched_g, sched_f = prepare_trainable(
            acc, run.frozen.teacher, opt_g, opt_f, sched_g, sched_f
        )
        generator = shared.view(GENERATOR_ADAPTER, caller=base)
    if args.compile:
        for unet in (base, gen_module) if own_generator else (base,):
            unet.compile(backend=args.compile)
    fake = shared.view(*fake_adapters, caller=base)
    models = {"generator": gen_module if own_generator else base, "fake_score": base}
    return generator, fake, switcher, ((opt_g, sched_g), (opt_f, sched_f)), models


# --------------------------------------------------------------------------------------------- 8. save and push


def training_summary(run: Run, path: DegradationPath) -> dict:
    """What the model card says about the run: every setting under its flag name, and the counts they imply."""
    args, config = run.args, run.config
    return {
        "teacher": args.pretrained_teacher_model,
        "initial_generator": args.pretrained_generator or "the teacher",
        "stage": args.stage,
        **config.to_dict(),
        "path_nodes": len(path) - 1,
        "node_steps": [n.step for n in path.nodes[1:]],
        "generator_updates": generator_updates(config.max_train_steps, config.fake_score_update_ratio),
        "resolution": args.resolution,
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.accelerator.mixed_precision,
    }


def final_unet_state(run: Run, generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The generator's full weights and, with LoRA, its adapter's (every rank takes part; the main process gets
    them): the adapter is merged onto the initial generator's fp32 weights, not its bf16 training copy. On a shared
    base the module holds every adapter; only the generator's is taken."""
    module = generator.caller if isinstance(generator, AdapterView) else generator
    state = full_state_dict(run.accelerator, module)
    adapter = {}
    if run.accelerator.is_main_process and run.config.lora_rank:
        adapter = {k: v for k, v in state.items() if "lora_" in k and f".{GENERATOR_ADAPTER}." in k}
        base = run.frozen.load_generator(run.args.pretrained_generator).state_dict()
        state = merge_lora({**base, **adapter}, GENERATOR_ADAPTER)  # lora_alpha = r: scaling 1
    return state, adapter


def save_final(run: Run, generator, path: DegradationPath) -> None:
    """Builds the pipeline with the trained generator and writes it in the Hub layout (`OUTPUT_DIR/final`, with the
    model card and `disback_config.json`); pushes it."""
    args, acc = run.args, run.accelerator
    state, adapter = final_unet_state(run, generator)
    if acc.is_main_process:
        # the family's one-step pipeline (DisBackPipeline, DisBackSD3Pipeline) at the generator's trained timestep
        pipe = run.frozen.final_pipeline(state, run.config.conditioning_timestep)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(acc.device)  # samples for the card render on the accelerator
        final = os.path.join(args.output_dir, "final")
        base = args.pretrained_teacher_model if not os.path.exists(args.pretrained_teacher_model) else None
        save_for_hub(
            pipe,
            final,
            args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            base_model=base,
            training=training_summary(run, path),
            sample_prompts=args.validation_prompts,
        )
        with open(os.path.join(final, "disback_config.json"), "w", encoding="utf-8") as f:
            f.write(run.config.to_json_string())
        card_path_profile(path, final)
        if adapter:  # the LoRA users put on their own model (`disback export-lora`, docs/lora.md)
            save_run_adapter(adapter, os.path.join(final, RUN_ADAPTER_DIR), GENERATOR_ADAPTER, run.frozen.family)
        logger.info(f"final pipeline written to {final}")
        if run.pusher:
            run.pusher.submit(final, commit_message="DisBack one-step generator (final)")
    acc.wait_for_everyone()


def card_path_profile(path: DegradationPath, final: str) -> None:
    """The model card shows where the path's nodes lay: the profile's plot and table (when stage 1 profiled it)."""
    plot = os.path.join(path.directory, PROFILE_PLOT)
    if not path.profile or not os.path.isfile(plot):
        return
    shutil.copyfile(plot, os.path.join(final, PROFILE_PLOT))
    text = (
        "Where the targets of distribution backtracking lay: each node's distance to the teacher in score space "
        "(the RMS difference of x0 estimates on a fixed probe of generator and teacher samples; docs/method.md, "
        f'"The path profile").\n\n![path profile]({PROFILE_PLOT})\n\n{PathProfile.from_dict(path.profile).table()}'
    )
    append_card_markdown(final, "Degradation path", text)


# ------------------------------------------------------------------------------------------------------------ main


def resume_folder(args, accelerator) -> str | None:
    """
    `--resume_from_checkpoint` as the folder every rank opens, chosen (and hashed) once by the main process:
    `latest` is the newest local checkpoint that matches its manifest, `hub[:REVISION]` the newest pushed one unless
    the output folder holds one at least as new (downloaded with the path and verified), a folder is verified as it
    is. A choice that cannot be made stops every rank with one line (docs/training.md, "Faults").
    """
    value, chosen = args.resume_from_checkpoint, [None, None]  # the folder, or the reason there is none
    if value is None:
        return None
    if accelerator.is_main_process:
        try:
            revision = parse_hub_resume(value)
            if revision is not None:
                if not args.hub_model_id:
                    raise ValueError("--resume_from_checkpoint hub needs --hub_model_id: the repo the run pushed to")
                local = newest_good_checkpoint(args.output_dir)
                _, pushed = hub_checkpoints(args.hub_model_id, revision, args.hub_token)
                newest_pushed = int(pushed[0].split("-")[1]) if pushed else -1
                if local is not None and int(os.path.basename(local).split("-")[1]) >= newest_pushed:
                    chosen[0] = local
                else:
                    chosen[0] = download_hub_checkpoint(
                        args.hub_model_id, revision, args.output_dir, args.path_dir, args.hub_token
                    )
            elif value == "latest":
                chosen[0] = newest_good_checkpoint(args.output_dir)
            else:
                if not verify_checkpoint(value):
                    logger.warning(f"{value} has no manifest (written by an older version): resuming it unverified")
                chosen[0] = value
        except (DamagedCheckpointError, FileNotFoundError, ValueError, OSError) as e:
            chosen[1] = str(e)
    if accelerator.num_processes > 1:
        chosen = broadcast_object_list(chosen)
    if chosen[1]:
        raise SystemExit(f"cannot resume ({value}): {chosen[1]}")
    return chosen[0]


def main(argv=None, family: str = "sdxl"):
    args = parse_args(argv, family)  # 1. arguments
    accelerator = make_accelerator(args)  # 2. accelerator
    watch = RankWatch(accelerator, args.output_dir)  # a lost rank ends the job in one line
    run = make_run(args, accelerator)  # 3. frozen models, 4. data
    try:
        checkpoint = resume_folder(args, accelerator)
        plan = plan_resume(checkpoint, args.output_dir, args.stage)  # 5. resume plan
        if "degradation" in plan.stages and MethodPlan.uses_path(args.config.method):
            run_degradation(run, plan)  # 6. stage 1
        if "backtracking" in plan.stages:
            generator, path = run_backtracking(run, plan)  # 7. stage 2
            save_final(run, generator, path)  # 8. save and push
    except DamagedCheckpointError as e:  # a pickle that would run code: one line, on every rank
        raise SystemExit(f"cannot resume: {e}") from None
    except Exception as e:
        if accelerator.num_processes > 1 and is_collective_failure(e):
            where = f"at global step {run.state.global_step} ({run.state.stage})"
            sys.stderr.write(watch.report(e, where) + "\n")
            sys.stderr.flush()
            if run.pusher is not None:  # what was queued still goes up
                run.pusher.close()
            os._exit(1)  # no stack of gloo/NCCL traces, no collective in the clean-up that would wait again
        raise
    finally:
        watch.close()
        run.finish()


if __name__ == "__main__":
    main()
