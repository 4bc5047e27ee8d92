#!/usr/bin/env python
"""DisBack distillation of an SDXL teacher into a one-step generator, under `accelerate launch`.

    accelerate launch examples/train_disback/train_disback_sdxl.py \\
        --pretrained_teacher_model stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_files prompts.txt --stage all --output_dir disback-sdxl

Stage 1 (degradation) fine-tunes a copy of the teacher on the initial generator's samples and writes the path
(`OUTPUT_DIR/path`); stage 2 (backtracking) trains the generator with distribution matching against targets that walk
the path back to the teacher, and writes the final pipeline (`OUTPUT_DIR/final`) in the Hub layout. The method lives
in `diffusers_disback.distill`, the SDXL glue in `diffusers_disback.training`; this file is the loop.
See examples/train_disback/README.md for accelerate configs (single, DDP, FSDP2, multi-node) and the paper's settings.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import shutil
import warnings

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_disback import DisBackPipeline, DisBackScheduler, load_unet_checkpoint
from diffusers_disback.distill import (
    LORA_ADAPTER,
    BacktrackingSchedule,
    DegradationPath,
    NodeSwitcher,
    NoiseSchedule,
    Score,
    add_lora_adapter,
    denoising_score_matching_loss,
    distribution_matching_step,
    gan_discriminator_loss,
    gan_generator_loss,
    lora_parameters,
    merge_lora,
    node_steps,
    one_step_sample,
    target_score,
)
from diffusers_disback.hub import save_for_hub
from diffusers_disback.training import (
    BackgroundPusher,
    FakeScoreWithHead,
    ImageStream,
    PromptStream,
    RunState,
    SDXLConditioner,
    full_state_dict,
    is_fsdp2_sharded,
    lora_state_dict,
    unet_eps_fn,
)

logger = get_logger(__name__)
# the generator's LR schedule steps every stage-2 iteration, as the reference's does, so before the generator's first
# update at iteration r; torch warns about exactly that order
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
STAGES = ("degradation", "backtracking")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DisBack: distribution backtracking distillation of SDXL (both stages).")
    # models
    p.add_argument("--pretrained_teacher_model", required=True, help="SDXL teacher: Hub repo id or local folder")
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
    # stages and path
    p.add_argument("--stage", choices=["degradation", "backtracking", "all"], default="all")
    p.add_argument("--output_dir", default="disback-sdxl")
    p.add_argument("--path_dir", default=None, help="where stage 1 writes / stage 2 reads the path (OUTPUT_DIR/path)")
    p.add_argument("--degradation_steps", type=int, default=1000, help="N1: stage-1 steps (paper: 1000)")
    p.add_argument("--path_interval", type=int, default=100, help="K1: a node every K1 stage-1 steps (paper: 100)")
    p.add_argument(
        "--num_path_nodes",
        type=int,
        default=None,
        help="instead of --path_interval: this many nodes, spaced by --path_node_spacing",
    )
    p.add_argument("--path_node_spacing", choices=["uniform", "log"], default="uniform")
    p.add_argument("--path_node_type", choices=["full", "lora"], default="full")
    p.add_argument("--path_lora_rank", type=int, default=64, help="rank of the degrading LoRA (--path_node_type lora)")
    p.add_argument(
        "--backtrack_interval",
        type=int,
        default=1000,
        help="K2: stage-2 iterations per node, counted like the reference code (paper: 1000 iterations = 200 "
        "generator updates at --fake_score_update_ratio 5)",
    )
    p.add_argument("--backtrack_rule", choices=["fixed", "adaptive"], default="fixed")
    p.add_argument("--backtrack_threshold", type=float, default=0.5, help="adaptive rule: advance at this fraction")
    p.add_argument("--fake_score_init", choices=["last_node", "teacher"], default="last_node")
    p.add_argument(
        "--intermediate_cfg",
        choices=["none", "node", "teacher"],
        default="none",
        help="CFG on intermediate nodes: none (measured best on digits), the node's own unconditional branch, or the "
        "teacher's (collapsed on digits); the teacher itself is always guided with --guidance_scale",
    )
    # distillation
    p.add_argument("--conditioning_timestep", type=int, default=399)
    p.add_argument("--guidance_scale", type=float, default=8.0, help="teacher CFG in the DM loss (SDXL: 8)")
    p.add_argument("--min_step_percent", type=float, default=0.02)
    p.add_argument("--max_step_percent", type=float, default=0.98)
    p.add_argument("--fake_score_update_ratio", type=int, default=5, help="r: fake-score updates per generator update")
    p.add_argument(
        "--gan_loss_weight",
        type=float,
        default=0.0,
        help="weight of DMD2's GAN term for the generator (SDXL: 5e-3; 0 = off, the default)",
    )
    p.add_argument(
        "--gan_discriminator_weight",
        type=float,
        default=1e-2,
        help="weight of the discriminator loss added to the fake score's (DMD2: 1e-2)",
    )
    p.add_argument(
        "--degradation_gan",
        action="store_true",
        help="stage 1 also trains a discriminator head on the degrading score (weight --gan_discriminator_weight), "
        "as the reference code does; needs real images. Off by default: the method does not need it",
    )
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
    p.add_argument("--max_train_steps", type=int, default=5000, help="stage-2 iterations (fake-score updates)")
    # optimisation
    p.add_argument("--learning_rate", type=float, default=5e-7, help="generator (and default for the others)")
    p.add_argument("--fake_learning_rate", type=float, default=None, help="fake score (default: --learning_rate)")
    p.add_argument("--degradation_learning_rate", type=float, default=None, help="stage 1 (default: --learning_rate)")
    p.add_argument("--lr_scheduler", default="constant_with_warmup")
    p.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=500,
        help="warm-up length in iterations of each stage's loop; the generator's schedule also advances on "
        "iterations without a generator update, as in the reference code",
    )
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=0.01)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=10.0)
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (if installed)")
    p.add_argument(
        "--lora_rank",
        type=int,
        default=0,
        help="train the generator and the fake score as LoRA adapters of this rank over frozen bases "
        "(one-GPU mode); 0: full fine-tuning. The final UNet has the generator's adapter merged in",
    )
    p.add_argument("--train_batch_size", type=int, default=1, help="per process")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="overrides the accelerate config; trainable nets keep fp32 master weights",
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument(
        "--nan_policy",
        choices=["skip", "abort"],
        default="skip",
        help="a non-finite loss: skip that update (with a warning) or stop the run",
    )
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard | wandb | all | none")
    p.add_argument("--logging_dir", default="logs")
    p.add_argument("--validation_steps", type=int, default=500)
    p.add_argument(
        "--validation_prompts",
        nargs="+",
        default=["a photo of an astronaut riding a horse on mars", "a red fox in a snowy forest"],
    )
    # in-training evaluation (off by default): FID / CLIP score of one-step samples on a small caption set
    p.add_argument("--eval_steps", type=int, default=0, help="every N stage-2 steps compute FID/CLIP (0: never)")
    p.add_argument(
        "--eval_dataset",
        default=None,
        help="captioned images: a datasets Hub id or a local imagefolder (metadata.jsonl)",
    )
    p.add_argument("--eval_dataset_split", default=None, help="default: train (local folder) / validation (Hub)")
    p.add_argument("--eval_num_prompts", type=int, default=256, help="captions (and reference images) to use")
    p.add_argument("--eval_fid_resolution", type=int, default=None, help="default: min(512, --resolution)")
    p.add_argument(
        "--eval_feature_extractor",
        choices=["inception", "tiny"],
        default="inception",
        help="inception: clean-fid's (needs the eval extra); tiny: a random stand-in for offline tests",
    )
    p.add_argument(
        "--eval_clip_model", default=None, help="open_clip model for a CLIP score, e.g. ViT-g-14 ('tiny' in tests)"
    )
    p.add_argument("--eval_clip_pretrained", default="laion2b_s12b_b42k")
    p.add_argument("--eval_stats_cache", default=None, help="reference statistics cache (default: output_dir/eval)")
    # hub
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None, help="default: the logged-in token (never logged or saved)")
    p.add_argument("--hub_private", action="store_true")
    p.add_argument("--hub_push_every", type=int, default=0, help="also push every N-th checkpoint (0: never)")
    args = p.parse_args(argv)

    if (args.dataset_name is None) == (args.train_data_files is None):
        p.error("give exactly one of --dataset_name and --train_data_files")
    if args.eval_steps and not args.eval_dataset:
        p.error("--eval_steps needs --eval_dataset (captioned reference images)")
    for flag, on in (("--gan_loss_weight", args.gan_loss_weight > 0), ("--degradation_gan", args.degradation_gan)):
        if on and (args.real_dataset_name is None) == (args.real_data_dir is None):
            p.error(f"{flag} needs real images: exactly one of --real_dataset_name and --real_data_dir")
    if args.resolution % 8:
        p.error(f"--resolution must be divisible by 8, got {args.resolution}")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id")
    if not 0 <= args.min_step_percent < args.max_step_percent <= 1:
        p.error("need 0 <= --min_step_percent < --max_step_percent <= 1")
    trackers = {"all": ["tensorboard", "wandb"], "none": []}.get(args.report_to, args.report_to.split(","))
    for name in trackers:
        if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
            p.error(f"--report_to {args.report_to} needs {name}: pip install {name} (or --report_to none)")
    if args.real_caption_column and args.real_caption_column.lower() == "none":
        args.real_caption_column = None
    args.path_dir = args.path_dir or os.path.join(args.output_dir, "path")
    args.fake_learning_rate = args.fake_learning_rate or args.learning_rate
    args.degradation_learning_rate = args.degradation_learning_rate or args.learning_rate
    return args


# ---------------------------------------------------------------------------------------------------- helpers


def load_frozen_components(args, weight_dtype):
    path, rev, var = args.pretrained_teacher_model, args.revision, args.variant
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)
    tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev, variant=var)
    te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", revision=rev, variant=var)
    teacher = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var)
    scheduler = DisBackScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
    for m in (te, te2, teacher):
        m.requires_grad_(False).eval()
    # the text encoders stay fp32 (one pass per batch), as in DMD2; the teacher runs in the mixed-precision dtype
    return tok, tok2, te.to(torch.float32), te2.to(torch.float32), teacher.to(weight_dtype), scheduler


def teacher_unet_fp32(args) -> UNet2DConditionModel:
    """The teacher's UNet read again in fp32: trainable copies start from its exact weights, not the frozen teacher's
    bf16/fp16 rounding."""
    return UNet2DConditionModel.from_pretrained(
        args.pretrained_teacher_model, subfolder="unet", revision=args.revision, variant=args.variant
    ).to(torch.float32)


def load_initial_generator(args, teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """The generator's starting point in fp32: the teacher, a diffusers UNet, or a raw checkpoint (strictly; a local
    file or `owner/repo/file.bin` on the Hub)."""
    src = args.pretrained_generator
    if src is None:
        gen = teacher_unet_fp32(args)
    elif os.path.isfile(src) or src.endswith((".bin", ".pt", ".pth", ".ckpt", ".safetensors")):
        gen = load_unet_checkpoint(src, config=teacher.config)
    else:
        sub = "unet" if os.path.isdir(os.path.join(src, "unet")) else None
        gen = UNet2DConditionModel.from_pretrained(src, subfolder=sub)
    return gen.to(torch.float32)


def classify(run: Run, fake, x0: torch.Tensor, cond: dict, t: torch.Tensor | None = None, noise=None):
    """Noises `x0` at `t ~ U{0..T-1}` (the diffusion GAN) and runs the fake score with its head: `(eps, logits)`."""
    schedule = run.noise_schedule
    if t is None:
        t = schedule.sample_timesteps(x0.shape[0], generator=run.noise, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=run.noise).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    dtype = next(p.dtype for p in fake.parameters() if p.is_floating_point())
    with run.accelerator.autocast():
        return fake(
            x_t.to(dtype),
            t,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)},
            classify=True,
        )


def fake_update_with_gan(run: Run, fake, x0: torch.Tensor, cond: dict):
    """
    The fake score's loss with the GAN term, in one forward pass (one backward, as DDP/FSDP want): generated and real
    latents are noised together; the generated half gives the denoising loss (Eq. 7), both halves the discriminator
    loss `softplus(D(fake)) + softplus(-D(real))`, weighted by --gan_discriminator_weight.
    """
    real, real_cond = run.real_batch()
    both = torch.cat([x0.detach().float(), real])
    t = run.noise_schedule.sample_timesteps(both.shape[0], generator=run.noise, device=both.device)
    noise = torch.randn(both.shape, generator=run.noise).to(both.device)
    eps, logits = classify(run, fake, both, {k: torch.cat([cond[k], real_cond[k]]) for k in cond}, t, noise)
    n = x0.shape[0]
    loss_dsm = torch.nn.functional.mse_loss(eps[:n].float(), noise[:n].float())
    loss_d = gan_discriminator_loss(logits[:n], logits[n:])
    return loss_dsm + run.args.gan_discriminator_weight * loss_d, loss_d


def lora_config(rank: int):
    """The LoRA of every adapter this script trains: the attention projections, `lora_alpha = r` (scaling 1)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS)


def make_trainable(unet: UNet2DConditionModel, config, weight_dtype, adapter_name: str, gradient_checkpointing=False):
    """
    Full fine-tuning (`config=None`), or a LoRA adapter (`config`, see [`lora_config`]) over a frozen base held in the
    mixed-precision dtype: the one-GPU mode. Returns the parameters to optimise, always fp32 master weights: peft
    creates an adapter in its base layer's dtype, and AdamW steps of lr 5e-7 on bf16 weights of size ~0.1 round away
    (docs/method.md, "Differences from the reference code").
    """
    if config is not None:
        unet.requires_grad_(False).to(weight_dtype)
        add_lora_adapter(unet, config, adapter_name=adapter_name)  # B = 0: starts at the base
        params = lora_parameters(unet, adapter_name)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    cast_training_params(unet, dtype=torch.float32)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return params


def prepare_trainable(accelerator, model, optimizer, lr_scheduler):
    """
    `accelerator.prepare` for one trainable model with its optimizer and LR schedule, without the autocast that
    accelerate wraps around the model's forward under mixed precision: precision is decided by the loop's own
    autocast regions, as in DMD2, so the fake score's pass in the DM loss can run in fp32.
    """
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restores the module's own forward, in place
    return model, optimizer, lr_scheduler


def make_optimizer(args, params, lr):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def real_image_stream(args, rank: int = 0, world_size: int = 1) -> ImageStream:
    """The GAN term's real images, each with its caption from `--real_caption_column`, this process's share."""
    return ImageStream(
        args.resolution, dataset_name=args.real_dataset_name, data_dir=args.real_data_dir,
        image_column=args.real_image_column, caption_column=args.real_caption_column,
        streaming=not args.no_streaming, shuffle_buffer=args.shuffle_buffer, seed=args.seed,
        rank=rank, world_size=world_size,
    )  # fmt: skip


def make_lr_scheduler(args, optimizer, num_iterations: int, num_processes: int):
    """`--lr_scheduler` over `num_iterations` loop iterations with `--lr_warmup_steps` of warm-up, stepped once per
    iteration. Counts are multiplied by the processes because a scheduler prepared by accelerate advances once per
    process on each call (diffusers' convention)."""
    return get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=num_iterations * num_processes,
    )


def checkpoint_dirs(output_dir: str) -> list[str]:
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("checkpoint-") and not d.endswith(".tmp")]
    return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


def resolve_resume(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        dirs = checkpoint_dirs(args.output_dir)
        return dirs[-1] if dirs else None
    if not os.path.isfile(os.path.join(args.resume_from_checkpoint, "run_state.json")):
        raise FileNotFoundError(
            f"{args.resume_from_checkpoint} is not a checkpoint of this script (no run_state.json)"
        )
    return args.resume_from_checkpoint


class Run:
    """The pieces every stage shares: accelerator, frozen models, conditioning, data, state, trackers, pusher."""

    def __init__(self, args):
        self.args = args
        project = ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        )
        report_to = None if args.report_to == "none" else args.report_to
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision, log_with=report_to, project_config=project
        )
        acc = self.accelerator
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is too much
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        set_seed(args.seed)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        tok, tok2, te, te2, teacher, scheduler = load_frozen_components(args, self.weight_dtype)
        self.teacher = teacher.to(acc.device)
        self.scheduler_config = scheduler.config
        self.noise_schedule = NoiseSchedule.from_scheduler(scheduler)
        self.conditioner = SDXLConditioner(tok, tok2, te.to(acc.device), te2.to(acc.device), args.resolution)
        self.text_parts = (tok, tok2, te, te2)
        self.latent_shape = (4, args.resolution // 8, args.resolution // 8)
        T = self.noise_schedule.num_train_timesteps
        self.min_step, self.max_step = int(args.min_step_percent * T), min(int(args.max_step_percent * T), T - 1)
        self.stream = PromptStream(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            data_files=args.train_data_files,
            caption_column=args.caption_column,
            streaming=not args.no_streaming,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
        )
        self.real, self.vae = None, None
        if args.gan_loss_weight > 0 or args.degradation_gan:
            self.real = real_image_stream(args, acc.process_index, acc.num_processes)
            self._load_vae()
        self.state = RunState()
        self.noise = torch.Generator().manual_seed(args.seed * 1000 + acc.process_index)
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            config = {k: v for k, v in vars(args).items() if "token" not in k}
            acc.init_trackers("disback", config={k: str(v) if isinstance(v, list) else v for k, v in config.items()})
        self.pusher = None
        if args.push_to_hub and acc.is_main_process:
            self.pusher = BackgroundPusher(args.hub_model_id, private=args.hub_private or None, token=args.hub_token)
        self.checkpoint_count = 0
        self.eval = self._setup_eval() if args.eval_steps else None

    # ------------------------------------------------------------------------------------------------ batches

    def batch(self):
        prompts = self.stream.take(self.args.train_batch_size)
        cond = self.conditioner(prompts, self.accelerator.device)
        z = torch.randn((len(prompts), *self.latent_shape), generator=self.noise).to(self.accelerator.device)
        return cond, z

    def _load_vae(self):
        """The teacher's VAE, loaded once (real-image encoding and validation share it); bf16 or fp32, since SDXL's
        VAE overflows in fp16."""
        dtype = torch.bfloat16 if self.weight_dtype == torch.bfloat16 else torch.float32
        vae = AutoencoderKL.from_pretrained(
            self.args.pretrained_teacher_model, subfolder="vae", revision=self.args.revision
        )
        self.vae = vae.to(self.accelerator.device, dtype).requires_grad_(False)
        return self.vae

    @torch.no_grad()
    def real_batch(self):
        """Real images encoded to latents on the fly, with their conditioning (empty captions if the data has none)."""
        images, captions = zip(*self.real.take(self.args.train_batch_size))
        pixels = torch.stack(images).to(self.accelerator.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=None) * self.vae.config.scaling_factor
        return latents.float(), self.conditioner(list(captions), self.accelerator.device)

    def generate(self, generator_unet, cond, z):
        return one_step_sample(
            unet_eps_fn(generator_unet), z, cond, self.noise_schedule, self.args.conditioning_timestep
        )

    def finite_or_skip(self, loss: torch.Tensor, what: str) -> bool:
        """Whether to apply this update. Decided together by all ranks (a rank that skipped backward alone would
        leave the others waiting in the gradient all-reduce)."""
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if bool(self.accelerator.gather(finite).min() > 0):
            return True
        msg = f"{what} loss is {loss.item()} on rank {self.accelerator.process_index} (or another rank) at global step {self.state.global_step}"
        if self.args.nan_policy == "abort":
            raise FloatingPointError(msg + "; stopping (--nan_policy abort). Lower the learning rate or check data.")
        logger.warning(msg + "; skipping this update (--nan_policy skip)")
        return False

    # ---------------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self):
        """
        `accelerator.save_state` (models, optimizers, schedulers, RNGs; sharded under FSDP) plus the run state into
        `checkpoint-<step>.tmp`, then an atomic rename; rotation; an optional background push.
        """
        acc, args = self.accelerator, self.args
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(args.output_dir, "checkpoints", name)
        tmp = final + ".tmp"
        if acc.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        rank, error = acc.process_index, None
        try:
            acc.save_state(tmp)
            save_file({"noise_rng": self.noise.get_state()}, os.path.join(tmp, f"noise_rng_{rank}.safetensors"))
            with open(os.path.join(tmp, f"data_{rank}.json"), "w") as f:
                json.dump({**self.stream.state_dict(), "real": self.real.state_dict() if self.real else None}, f)
        except OSError as e:  # a full disk, a quota, a vanished mount
            error = e
        if bool(acc.gather(torch.tensor([float(error is not None)], device=acc.device)).max() > 0):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            good = checkpoint_dirs(args.output_dir)
            raise RuntimeError(
                f"writing {name} failed ({error or 'on another rank'}); the run stops here. The last good checkpoint "
                f"is {good[-1] if good else 'none (nothing was saved yet)'}: free space and resume with "
                "--resume_from_checkpoint latest."
            ) from error
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(os.path.join(tmp, "run_state.json"), "w") as f:
                json.dump(self.state.state_dict(), f, indent=2)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            if args.checkpoints_total_limit:
                for old in checkpoint_dirs(args.output_dir)[: -args.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
            self.checkpoint_count += 1
            if self.pusher and args.hub_push_every and self.checkpoint_count % args.hub_push_every == 0:
                self.pusher.submit(final, path_in_repo=f"checkpoints/{name}", commit_message=f"Checkpoint {name}")
        acc.wait_for_everyone()
        logger.info(f"saved {final}")

    def restore(self, checkpoint: str, models: bool = True):
        """Restores a checkpoint: the accelerate state (unless `models=False`: a stage-1 checkpoint resumed into
        stage 2), the run state, this rank's prompt-stream position and noise generator."""
        if models:
            self.accelerator.load_state(checkpoint)
        rank = self.accelerator.process_index
        with open(os.path.join(checkpoint, "run_state.json")) as f:
            self.state.load_state_dict(json.load(f))
        with open(os.path.join(checkpoint, f"data_{rank}.json")) as f:
            data = json.load(f)
        self.stream.load_state_dict(data)
        if self.real is not None and data.get("real"):
            self.real.load_state_dict(data["real"])
        self.noise.set_state(load_file(os.path.join(checkpoint, f"noise_rng_{rank}.safetensors"))["noise_rng"])
        logger.info(f"resumed from {checkpoint}: stage {self.state.stage}, stage step {self.state.stage_step}")

    def log(self, values: dict, step: int):
        self.accelerator.log(values, step=step)

    @torch.no_grad()
    def validate(self, generator_unet, step: int):
        """One-step samples for the fixed validation prompts and seeds, logged and saved as a PNG grid. Every rank
        runs the generator (it may be sharded); the main process decodes and logs."""
        acc, args = self.accelerator, self.args
        if not args.validation_prompts:
            return
        cond = self.conditioner(args.validation_prompts, acc.device)
        z = torch.randn(
            (len(args.validation_prompts), *self.latent_shape), generator=torch.Generator().manual_seed(0)
        ).to(acc.device)
        with acc.autocast():
            x0 = self.generate(generator_unet, cond, z)
        if not acc.is_main_process:
            return
        vae = self.vae if self.vae is not None else self._load_vae()
        images = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1).add(1).div(2)
        os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
        grid = save_image_grid(images, os.path.join(args.output_dir, "validation", f"step-{step:08d}.png"))
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", images.cpu(), step, dataformats="NCHW")
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {"validation": [wandb.Image(grid, caption=" | ".join(args.validation_prompts))]}, step=step
                )

    def _setup_eval(self) -> dict:
        """Captions on every rank (each runs the possibly sharded generator); extractor, CLIP and the reference
        statistics (computed once, cached) on the main process."""
        from diffusers_disback.evaluation import (
            CaptionSet,
            ReferenceStatistics,
            extractor_id,
            fid_transform,
            fid_transform_name,
            reference_stats_key,
        )

        args, acc = self.args, self.accelerator
        captions = CaptionSet.from_dataset(args.eval_dataset, args.eval_dataset_split, args.eval_num_prompts)
        setup = {"captions": captions.captions}
        if acc.is_main_process:
            if args.eval_feature_extractor == "tiny":
                from diffusers_disback.testing import TinyFeatureExtractor

                extractor = TinyFeatureExtractor().to(acc.device)
            else:
                from diffusers_disback.evaluation import inception_feature_extractor

                extractor = inception_feature_extractor(acc.device)
            fid_resolution = args.eval_fid_resolution or min(512, args.resolution)
            transform = fid_transform(fid_resolution)
            # the key evaluate() uses for this reference set, transform and network
            key = reference_stats_key(
                captions.fingerprint, fid_transform_name(fid_resolution), extractor_id(extractor)
            )
            stats, _ = ReferenceStatistics.get_or_compute(
                args.eval_stats_cache or os.path.join(args.output_dir, "eval"), key, captions.images, extractor,
                transform, device=acc.device, total=len(captions), metadata={"source": captions.source},
            )  # fmt: skip
            scorer = None
            if args.eval_clip_model == "tiny":
                from diffusers_disback.testing import get_tiny_clip_scorer

                scorer = get_tiny_clip_scorer()
            elif args.eval_clip_model:
                from diffusers_disback.evaluation import ClipScorer

                # kept on the CPU between evaluations: ViT-g-14 is ~5.5 GB in fp32, on rank 0's training GPU otherwise
                scorer = ClipScorer.from_open_clip(args.eval_clip_model, args.eval_clip_pretrained, "cpu")
            setup.update(extractor=extractor, transform=transform, stats=stats, scorer=scorer)
        return setup

    @torch.no_grad()
    def evaluate(self, generator_unet, step: int):
        """FID (and CLIP score) of one-step samples for the eval captions, fixed seeds (`seed + i`), logged as
        `eval/fid` and `eval/clip_score`."""
        from PIL import Image

        from diffusers_disback.evaluation import fid_against

        acc, args, setup = self.accelerator, self.args, self.eval
        captions, images = setup["captions"], []
        vae = (self.vae if self.vae is not None else self._load_vae()) if acc.is_main_process else None
        for start in range(0, len(captions), args.train_batch_size):
            chunk = captions[start : start + args.train_batch_size]
            z = torch.stack(
                [
                    torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(start + i))
                    for i in range(len(chunk))
                ]
            ).to(acc.device)
            with acc.autocast():
                x0 = self.generate(generator_unet, self.conditioner(chunk, acc.device), z)
            if acc.is_main_process:
                pixels = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
                arrays = (
                    pixels.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                )
                images += [Image.fromarray(a) for a in arrays]
        if not acc.is_main_process:
            return
        fid = fid_against(
            setup["stats"], lambda: iter(images), setup["extractor"], setup["transform"], device=acc.device
        )
        logs = {"eval/fid": fid}
        if setup["scorer"] is not None:
            scorer = setup["scorer"].to(acc.device)
            logs["eval/clip_score"] = scorer.score(images, captions)
            scorer.to("cpu")
        self.log(logs, step)
        logger.info(f"evaluation at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))

    def report_peak_memory(self, what: str):
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
            logger.info(f"{what}: peak GPU memory {peak:.2f} GiB on rank {self.accelerator.process_index}")
            torch.cuda.reset_peak_memory_stats()

    def finish(self):
        if self.pusher is not None:
            self.pusher.close()
            for failure in self.pusher.failures:
                logger.error(f"a Hub push failed (local files are intact): {failure}")
        self.accelerator.end_training()


def save_image_grid(images: torch.Tensor, path: str):
    """Images in [0, 1], NCHW, saved side by side as one PNG; returns the PIL image."""
    from PIL import Image

    row = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    grid = Image.fromarray(row.transpose(1, 0, 2, 3).reshape(row.shape[1], -1, 3))
    grid.save(path)
    return grid


def clip_and_step(accelerator, model, optimizer, max_grad_norm):
    if accelerator.sync_gradients and max_grad_norm > 0:
        if is_fsdp2_sharded(model):
            # accelerate's clip_grad_norm_ matches the parameters against each prepared model with `==`, which fails
            # on DTensors when two prepared models share an architecture (the generator and the fake score); torch
            # clips DTensor gradients itself
            accelerator.unscale_gradients(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        else:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------- stage 1


def run_degradation(run: Run, resume: str | None):
    """Stage 1: fine-tune a copy of the teacher on the frozen initial generator's samples; record the path."""
    args, acc = run.args, run.accelerator
    generator = load_initial_generator(args, run.teacher).to(acc.device, run.weight_dtype).requires_grad_(False)
    degrading = teacher_unet_fp32(args)
    node_lora = lora_config(args.path_lora_rank) if args.path_node_type == "lora" else None
    params = make_trainable(degrading, node_lora, run.weight_dtype, LORA_ADAPTER, args.gradient_checkpointing)
    if args.degradation_gan:  # the reference's stage 1 adds the discriminator loss to the degrading score's
        degrading = FakeScoreWithHead(degrading, args.resolution // 8)
        params = params + list(degrading.head.parameters())
    optimizer = make_optimizer(args, params, args.degradation_learning_rate)
    lr_scheduler = make_lr_scheduler(args, optimizer, args.degradation_steps, acc.num_processes)
    degrading, optimizer, lr_scheduler = prepare_trainable(acc, degrading, optimizer, lr_scheduler)

    if args.num_path_nodes:
        steps_at = node_steps(args.degradation_steps, num_nodes=args.num_path_nodes, spacing=args.path_node_spacing)
    else:
        steps_at = node_steps(args.degradation_steps, interval=args.path_interval)
    path = None
    if resume:
        run.restore(resume)
    has_path = os.path.exists(os.path.join(args.path_dir, "path_manifest.json"))
    acc.wait_for_everyone()  # every rank looks before the main process creates the path
    if has_path and not resume:  # checked on every rank (shared output dir), so no rank is left waiting
        raise FileExistsError(
            f"{args.path_dir} already holds a path and there is no checkpoint to resume from "
            f"({os.path.join(args.output_dir, 'checkpoints')}); pass --resume_from_checkpoint latest, another "
            "--path_dir, or --stage backtracking to use that path (nothing was overwritten)"
        )
    if acc.is_main_process:
        if has_path:
            path = DegradationPath.load(args.path_dir)
            path.truncate(run.state.stage_step)  # nodes after the checkpoint are recorded again
        elif resume and run.state.stage_step > 0:
            raise FileNotFoundError(
                f"resuming stage 1 at step {run.state.stage_step}, but {args.path_dir} holds no path: the nodes "
                "recorded before the checkpoint are gone. Restore the path folder or start stage 1 afresh."
            )
        else:
            path = DegradationPath.create(args.path_dir, run.teacher, kind=args.path_node_type, lora_config=node_lora)
    score = Score(unet_eps_fn(degrading), run.noise_schedule)
    progress = tqdm(
        range(run.state.stage_step, args.degradation_steps),
        initial=run.state.stage_step,
        total=args.degradation_steps,
        desc="stage 1: degradation",
        disable=not acc.is_local_main_process,
    )
    for _ in progress:
        logs = {}
        cond, z = run.batch()
        with torch.no_grad():
            x0 = run.generate(generator, cond, z)
        if args.degradation_gan:
            loss, loss_d = fake_update_with_gan(run, degrading, x0, cond)  # Eq. 7 + the discriminator's loss
            logs["degradation/discriminator_loss"] = loss_d.item()
        else:
            with acc.autocast():
                loss = denoising_score_matching_loss(score, x0, cond, generator=run.noise)  # Eq. 7
        logs["degradation/lr"] = lr_scheduler.get_last_lr()[0]  # the LR of this update
        if run.finite_or_skip(loss, "degradation DSM"):
            acc.backward(loss)
            clip_and_step(acc, degrading, optimizer, args.max_grad_norm)
        else:
            optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()  # the LR is a function of the iteration, skipped updates included
        run.state.stage_step += 1
        run.state.global_step += 1
        step = run.state.stage_step
        if step in steps_at:
            node_state = full_state_dict(acc, degrading)
            if args.degradation_gan:  # a node is the score; the head is not part of it
                node_state = FakeScoreWithHead.unet_state_dict(node_state)
            if args.path_node_type == "lora":
                node_state = lora_state_dict(node_state, "degradation")
            if acc.is_main_process:
                node = path.add_node(node_state, step)
                logger.info(f"path node {node.index} at stage-1 step {step} ({node.num_bytes / 2**20:.1f} MiB)")
            acc.wait_for_everyone()
        logs["degradation/loss"] = loss.item()
        run.log(logs, run.state.global_step)
        progress.set_postfix(loss=f"{loss.item():.4f}", nodes=len(path) if path else "-")
        if step % args.checkpointing_steps == 0 or step == args.degradation_steps:
            if step == args.degradation_steps:
                run.state.stage, run.state.stage_step = "backtracking", 0
            run.save_checkpoint()
    run.report_peak_memory("stage 1")
    if acc.is_main_process and run.pusher:
        run.pusher.submit(args.path_dir, path_in_repo="path", commit_message="Degradation path (stage 1)")
    acc.wait_for_everyone()
    del degrading, optimizer, generator
    acc.free_memory()


# ------------------------------------------------------------------------------------------------- stage 2


def run_backtracking(run: Run, resume: str | None):
    """Stage 2: distribution matching against targets that walk the path back to the teacher."""
    args, acc = run.args, run.accelerator
    path = DegradationPath.load(args.path_dir)
    last = len(path) - 1
    generator = load_initial_generator(args, run.teacher)
    fake = teacher_unet_fp32(args)
    if args.fake_score_init == "last_node" and last > 0:  # s_phi <- R[0], the most degraded node
        fake.load_state_dict(path.merged_state_dict(fake, last))
    target_model = copy.deepcopy(run.teacher)
    switcher = NodeSwitcher(path, target_model, teacher=run.teacher)
    schedule = BacktrackingSchedule(
        num_nodes=len(path),
        interval=args.backtrack_interval,
        rule=args.backtrack_rule,
        threshold=args.backtrack_threshold,
    )
    adapter = lora_config(args.lora_rank) if args.lora_rank else None
    params_g = make_trainable(generator, adapter, run.weight_dtype, "generator", args.gradient_checkpointing)
    params_f = make_trainable(fake, adapter, run.weight_dtype, "fake_score", args.gradient_checkpointing)
    gan = args.gan_loss_weight > 0
    if gan:  # the discriminator head reads the fake score's mid-block features and trains with it
        fake = FakeScoreWithHead(fake, args.resolution // 8)
        params_f = params_f + list(fake.head.parameters())
    r = args.fake_score_update_ratio
    needed = (len(path) - 2) * args.backtrack_interval  # iterations until the target is the teacher
    if last > 0 and args.max_train_steps <= needed:
        logger.warning(
            f"--max_train_steps {args.max_train_steps} ends before the target reaches the teacher, after {needed} "
            f"iterations ({len(path) - 2} switches x --backtrack_interval {args.backtrack_interval}): the run ends on "
            f"an intermediate node. Raise --max_train_steps above {needed} or lower --backtrack_interval."
        )
    opt_g = make_optimizer(args, params_g, args.learning_rate)
    opt_f = make_optimizer(args, params_f, args.fake_learning_rate)
    # both schedules count stage-2 iterations (the reference steps the generator's every iteration, updated or not)
    sched_g = make_lr_scheduler(args, opt_g, args.max_train_steps, acc.num_processes)
    sched_f = make_lr_scheduler(args, opt_f, args.max_train_steps, acc.num_processes)
    # under FSDP each trainable model is prepared with its own optimizer, in its own call
    generator, opt_g, sched_g = prepare_trainable(acc, generator, opt_g, sched_g)
    fake, opt_f, sched_f = prepare_trainable(acc, fake, opt_f, sched_f)
    if resume:
        with open(os.path.join(resume, "run_state.json")) as f:
            mid_stage_2 = json.load(f)["stage_step"] > 0
        # a checkpoint taken at the end of stage 1 holds stage-1 models: only the stream and RNG carry over
        run.restore(resume, models=mid_stage_2)
        if mid_stage_2:
            schedule.load_state_dict(run.state.schedule)
    run.state.stage, run.state.schedule = "backtracking", schedule.state_dict()

    fake_score = Score(unet_eps_fn(fake), run.noise_schedule)
    # in the DM loss the fake score runs in fp32 outside autocast, as DMD2's does (its gradient is the difference of
    # two x0 estimates, which bf16 rounding would blur as the generator closes in)
    fake_score_fp32 = Score(unet_eps_fn(fake, autocast=False), run.noise_schedule)
    teacher_eps = unet_eps_fn(run.teacher)

    def target_for(cond) -> tuple[Score, float]:
        teacher = Score(teacher_eps, run.noise_schedule, uncond=SDXLConditioner.uncond(cond))
        node_eps = lambda i: unet_eps_fn(switcher.activate(i))  # noqa: E731
        return target_score(schedule, node_eps, teacher, args.guidance_scale, args.intermediate_cfg)

    progress = tqdm(
        range(run.state.stage_step, args.max_train_steps),
        initial=run.state.stage_step,
        total=args.max_train_steps,
        desc="stage 2: backtracking",
        disable=not acc.is_local_main_process,
    )
    for _ in progress:
        logs = {}
        # (a) the fake score tracks the generator: Eq. 7 on detached samples
        cond, z = run.batch()
        with torch.no_grad(), acc.autocast():
            x0 = run.generate(generator, cond, z)
        opt_f.zero_grad(set_to_none=True)  # the generator's GAN term leaves gradients in the fake score
        if gan:
            loss_f, loss_d = fake_update_with_gan(run, fake, x0, cond)
            logs["backtracking/discriminator_loss"] = loss_d.item()
        else:
            with acc.autocast():
                loss_f = denoising_score_matching_loss(fake_score, x0, cond, generator=run.noise)
        if run.finite_or_skip(loss_f, "fake-score DSM"):
            acc.backward(loss_f)
            clip_and_step(acc, fake, opt_f, args.max_grad_norm)
        else:
            opt_f.zero_grad(set_to_none=True)
        sched_f.step()
        logs["backtracking/fake_loss"] = loss_f.item()
        run.state.stage_step += 1
        run.state.global_step += 1
        step = run.state.stage_step
        # (b) every r-th iteration the generator moves toward the current target: Eq. 8
        distance = None
        if step % r == 0:
            cond, z = run.batch()
            target, w = target_for(cond)
            with acc.autocast():
                x0 = run.generate(generator, cond, z)
                loss_g, info = distribution_matching_step(
                    x0,
                    cond,
                    target,
                    fake_score_fp32,
                    guidance_scale=w,
                    min_step=run.min_step,
                    max_step=run.max_step,
                    generator=run.noise,
                )
                if gan:
                    loss_gan = gan_generator_loss(classify(run, fake, x0, cond)[1])
                    logs["backtracking/generator_gan_loss"] = loss_gan.item()
                    loss_g = loss_g + args.gan_loss_weight * loss_gan
            if run.finite_or_skip(loss_g, "generator DM"):
                acc.backward(loss_g)
                clip_and_step(acc, generator, opt_g, args.max_grad_norm)
            else:
                opt_g.zero_grad(set_to_none=True)
            distance = acc.reduce(info["dm_distance"].detach().float(), reduction="mean").item()
            logs.update(
                {
                    "backtracking/generator_loss": loss_g.item(),
                    "backtracking/dm_distance": distance,
                    "backtracking/grad_norm": info["grad_norm"].item(),
                    "backtracking/target_node": schedule.target_node,  # the target of this update
                    "backtracking/lr": sched_g.get_last_lr()[0],  # the LR of this update
                }
            )
        # both count stage-2 iterations, as the reference does: K2 and the generator's warm-up
        sched_g.step()
        schedule.step(distance=distance)
        run.log(logs, run.state.global_step)
        progress.set_postfix(target=f"P{schedule.target_node}", fake=f"{loss_f.item():.4f}")
        run.state.schedule = schedule.state_dict()
        if args.validation_steps and step % args.validation_steps == 0:
            run.validate(generator, run.state.global_step)
        if args.eval_steps and step % args.eval_steps == 0:
            run.evaluate(generator, run.state.global_step)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            run.save_checkpoint()  # resuming the last one runs no iteration but still writes the final pipeline
    run.report_peak_memory("stage 2")
    save_final(run, generator, path)


def save_final(run: Run, generator, path: DegradationPath):
    """Gathers the generator's full state dict, builds the pipeline and writes it in the Hub layout; pushes it."""
    args, acc = run.args, run.accelerator
    state = full_state_dict(acc, generator)
    if acc.is_main_process:
        if args.lora_rank:  # the adapter onto the initial generator's fp32 weights, not its bf16 training copy
            adapter = {k: v for k, v in state.items() if "lora_" in k}
            base = load_initial_generator(args, run.teacher).state_dict()
            state = merge_lora({**base, **adapter}, "generator")  # lora_alpha = r: scaling 1
        unet = UNet2DConditionModel.from_config(run.teacher.config)
        unet.load_state_dict(state)
        tok, tok2, te, te2 = run.text_parts
        vae = AutoencoderKL.from_pretrained(args.pretrained_teacher_model, subfolder="vae", revision=args.revision)
        pipe = DisBackPipeline(
            vae=vae,
            text_encoder=te.float().cpu(),
            text_encoder_2=te2.float().cpu(),
            tokenizer=tok,
            tokenizer_2=tok2,
            unet=unet,
            # the timestep the generator was trained at, not the teacher's scheduler default
            scheduler=DisBackScheduler.from_config(
                run.scheduler_config, conditioning_timestep=args.conditioning_timestep
            ),
        )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(acc.device)  # samples for the card render on the accelerator
        training = {
            "teacher": args.pretrained_teacher_model,
            "initial_generator": args.pretrained_generator or "the teacher",
            "stages": args.stage,
            "degradation_steps": args.degradation_steps,
            "path_nodes": len(path) - 1,
            "path_node_type": path.kind,
            "node_steps": [n.step for n in path.nodes[1:]],
            "backtrack_interval": args.backtrack_interval,
            "backtrack_rule": args.backtrack_rule,
            "stage2_iterations": args.max_train_steps,
            "generator_updates": args.max_train_steps // args.fake_score_update_ratio,
            "fake_score_update_ratio": args.fake_score_update_ratio,
            "learning_rate": args.learning_rate,
            "guidance_scale": args.guidance_scale,
            "conditioning_timestep": args.conditioning_timestep,
            "resolution": args.resolution,
            "train_batch_size_per_process": args.train_batch_size,
            "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "lora_rank": args.lora_rank or "full fine-tuning",
        }
        final = os.path.join(args.output_dir, "final")
        base = args.pretrained_teacher_model if not os.path.exists(args.pretrained_teacher_model) else None
        save_for_hub(
            pipe,
            final,
            args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            base_model=base,
            training=training,
            sample_prompts=args.validation_prompts,
        )
        logger.info(f"final pipeline written to {final}")
        if run.pusher:
            run.pusher.submit(final, commit_message="DisBack one-step generator (final)")
    acc.wait_for_everyone()


def main(argv=None):
    args = parse_args(argv)
    run = Run(args)
    if args.pretrained_generator is None:  # said once: stage 1, stage 2 and the LoRA merge all load the generator
        logger.warning(
            "the generator starts from the teacher's UNet (no --pretrained_generator). DMD2's authors report that a "
            "one-step SDXL generator needs regression pre-training or a DMD2 start (the released DisBack SDXL run "
            "starts from DMD2's one-step UNet); from the teacher, expect slow progress at SDXL scale.",
            main_process_only=True,
        )
    resume = resolve_resume(args)
    if resume:
        with open(os.path.join(resume, "run_state.json")) as f:
            resumed_stage = json.load(f)["stage"]
    else:
        resumed_stage = None
    stages = STAGES if args.stage == "all" else (args.stage,)
    try:
        for stage in stages:
            if resumed_stage == "backtracking" and stage == "degradation":
                continue
            if stage == "backtracking" and resumed_stage == "degradation":
                raise ValueError(
                    f"{resume} is a stage-1 checkpoint that did not finish the path; resume it with --stage "
                    "degradation or --stage all, not --stage backtracking"
                )
            stage_resume = resume if resumed_stage in (stage, "backtracking") else None
            if stage == "degradation":
                run_degradation(run, stage_resume)
            else:
                run_backtracking(run, stage_resume)
            resume, resumed_stage = None, None
    finally:
        run.finish()


if __name__ == "__main__":
    main()
