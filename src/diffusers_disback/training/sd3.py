"""SD3/SD3.5 glue: the teacher's frozen parts and the transformers a run starts from, prompts to the conditioning the
MMDiT takes, and a transformer as the score callable of `diffusers_disback.distill` (on its rectified-flow schedule).

What differs from SDXL (docs/training.md, "Flow-matching teachers"):

- the network is an `SD3Transformer2DModel` predicting the velocity `v = eps - x0` at `timestep = 1000 sigma`;
- conditioning: CLIP-L and CLIP-G penultimate states (concatenated, zero-padded to T5's width) followed by T5's (zeros
  without T5), and both CLIPs' pooled projections; no time ids;
- the unconditional branch is the encoded empty prompt, as SD3's pipeline samples it (not zeros);
- the VAE's latents are `(z - shift_factor) * scaling_factor`;
- LoRA targets are the attention projections diffusers' SD3 DreamBooth script trains, the context ones included.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch

from ..distill import FlowSchedule, SigmaDistribution
from .sdxl import _dtype_of

# the method settings an SD3 / SD3.5 teacher distils with where they differ from `DisBackConfig`'s (SDXL's): the
# generator is fed pure noise at sigma = 1 (t_c = 1000), CFG 4.5 on the target (peers report over-saturation at 7;
# docs/training.md, "Flow-matching teachers"). `train_disback_sd3.py` and `disback path-profile` read them.
SD3_DEFAULTS = {"conditioning_timestep": 1000, "guidance_scale": 4.5}

# diffusers' train_dreambooth_lora_sd3.py: the image and the context stream's attention projections
SD3_LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


class SD3Conditioner:
    """
    Prompts to SD3 conditioning exactly as `StableDiffusion3Pipeline.encode_prompt` computes it:
    `{"prompt_embeds": (B, 77 + L, D), "pooled_projections": (B, P)}` with `L = max_sequence_length` T5 tokens (zeros
    when the pipeline has no T5). [`uncond`] is the encoded empty prompt, SD3's negative prompt by default.

    `offload=True` keeps the encoders in CPU memory and moves them to `device` for each call only.
    """

    def __init__(
        self,
        tokenizer,
        tokenizer_2,
        text_encoder,
        text_encoder_2,
        transformer,
        resolution: int,
        tokenizer_3=None,
        text_encoder_3=None,
        max_sequence_length: int = 256,
        offload: bool = False,
    ):
        from diffusers import StableDiffusion3Pipeline

        if resolution % 8:
            raise ValueError(f"--resolution must be divisible by 8, got {resolution}")
        # the pipeline is only the encoder here; the transformer is there for its config (T5's width without T5)
        self.encoder = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=None, vae=None,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        )  # fmt: skip
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.offload = offload
        self._empty: dict[str, dict[str, torch.Tensor]] = {}

    def _encoders(self) -> list[torch.nn.Module]:
        e = self.encoder
        return [m for m in (e.text_encoder, e.text_encoder_2, e.text_encoder_3) if m is not None]

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        if self.offload:
            for encoder in self._encoders():
                encoder.to(device)
        try:
            prompt_embeds, _, pooled, _ = self.encoder.encode_prompt(
                list(prompts), None, None, device=torch.device(device), num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )  # fmt: skip
        finally:
            if self.offload:
                for encoder in self._encoders():
                    encoder.to("cpu")
        return {"prompt_embeds": prompt_embeds, "pooled_projections": pooled}

    def uncond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional conditioning of a batch: the encoded empty prompt (computed once per device), repeated."""
        device = cond["prompt_embeds"].device
        key = str(device)
        if key not in self._empty:
            self._empty[key] = self([""], device)
        n = cond["prompt_embeds"].shape[0]
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._empty[key].items()}


def transformer_flow_fn(transformer: torch.nn.Module, autocast: bool = True):
    """
    An SD3 transformer as the score callable `v(x_t, sigma, cond)` of `diffusers_disback.distill` (float32 out): the
    transformer gets `timestep = 1000 sigma`, as SD3's pipeline passes its scheduler's timesteps.

    `autocast=False` runs it in its own weights' dtype even inside an autocast region (the fake score's pass in the
    DM loss runs in fp32, as for SDXL).
    """

    def velocity(x_t: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = _dtype_of(transformer)
        with torch.autocast(x_t.device.type, enabled=False) if not autocast else contextlib.nullcontext():
            return transformer(
                hidden_states=x_t.to(dtype),
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                pooled_projections=cond["pooled_projections"].to(dtype),
                timestep=(sigma.float() * 1000).to(x_t.device),
                return_dict=False,
            )[0].float()

    return velocity


def flow_schedule(config, scheduler_shift: float) -> dict[str, FlowSchedule]:
    """
    The flow schedules of a run, by use, each with its sigma distribution ([`SigmaDistribution`], shifted once):

    - `"dm"`: the DM loss (over its `[min, max]` range) and the fake score's denoising loss (over `[0, 1]`):
      `config.dm_timestep_distribution` with `config.dm_timestep_shift`;
    - `"denoising"`: stage 1's denoising loss: `config.denoising_timestep_distribution` with
      `config.denoising_timestep_shift`, by default the teacher scheduler's shift (how SD3 was trained: logit-normal
      draws shifted by 3);

    and the teacher's sampler shifts its grid by the scheduler's shift (`inference_shift`).
    """
    base = FlowSchedule(prediction_type="flow", inference_shift=scheduler_shift)
    dm = SigmaDistribution(
        config.dm_timestep_distribution, config.dm_timestep_shift, mean=config.logit_mean, std=config.logit_std
    )
    shift = config.denoising_timestep_shift if config.denoising_timestep_shift is not None else scheduler_shift
    denoising = SigmaDistribution(
        config.denoising_timestep_distribution, shift, mean=config.logit_mean, std=config.logit_std
    )
    return {"dm": base.with_distribution(dm), "denoising": base.with_distribution(denoising)}


@dataclass
class FrozenSD3:
    """
    The SD3 teacher's parts that never train (the transformer in the compute dtype, the text encoders in fp32), its
    flow schedule and conditioner; the VAE is loaded on first use. The same interface as [`FrozenSDXL`], which the
    training script reads: `teacher`, `noise_schedule` (the DM loss's), `schedules`, `conditioner`, `score_fn`,
    `lora_targets`, `latent_shape`, `decode_latents`, `load_teacher_fp32`, `load_generator`, `load_vae`.
    """

    pretrained: str
    revision: str | None
    variant: str | None
    tokenizer: object
    tokenizer_2: object
    tokenizer_3: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    text_encoder_3: torch.nn.Module | None
    teacher: torch.nn.Module
    scheduler_config: dict
    schedules: dict[str, FlowSchedule]
    conditioner: SD3Conditioner
    vae: torch.nn.Module | None = None
    family: str = "sd3"
    lora_targets: list[str] = field(default_factory=lambda: list(SD3_LORA_TARGETS))
    denoiser_subfolder: str = "transformer"

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        resolution: int,
        config,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        variant: str | None = None,
        offload_text_encoders: bool = False,
        max_sequence_length: int = 256,
        use_t5: bool = True,
    ) -> FrozenSD3:
        """The frozen parts of the SD3 pipeline `pretrained` (a Hub id or folder) for images of `resolution`, with
        the run's settings `config` (a `DisBackConfig`: the sigma distributions). T5 is loaded when the pipeline
        has one and `use_t5`."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from diffusers.pipelines.pipeline_utils import DiffusionPipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        rev, var = revision, variant
        index = DiffusionPipeline.load_config(pretrained, revision=rev)
        tok = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=rev)
        tok2 = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=rev)
        te = CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder", revision=rev, variant=var
        )
        te2 = CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", revision=rev, variant=var
        )
        tok3 = te3 = None
        if use_t5 and (index.get("text_encoder_3") or [None])[0] is not None:
            from transformers import T5EncoderModel, T5TokenizerFast

            tok3 = T5TokenizerFast.from_pretrained(pretrained, subfolder="tokenizer_3", revision=rev)
            te3 = T5EncoderModel.from_pretrained(pretrained, subfolder="text_encoder_3", revision=rev, variant=var)
        teacher = SD3Transformer2DModel.from_pretrained(
            pretrained, subfolder="transformer", revision=rev, variant=var, torch_dtype=weight_dtype
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=rev)
        if scheduler.config.get("use_dynamic_shifting"):
            raise ValueError(
                f"{pretrained}'s scheduler shifts dynamically (FLUX's kind); SD3/SD3.5 teachers use a static shift"
            )
        encoders = [m for m in (te, te2, te3) if m is not None]
        for m in (*encoders, teacher):
            m.requires_grad_(False).eval()
        encoder_device = "cpu" if offload_text_encoders else device
        for m in (te, te2):  # the CLIPs in fp32 (one pass per batch), as SDXL's
            m.to(encoder_device, torch.float32)
        if te3 is not None:  # T5-XXL is 4.8 B parameters (19 GB in fp32): bf16 under bf16, else fp32 (fp16 overflows)
            te3.to(encoder_device, torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
        step = 8 * teacher.config.patch_size
        if resolution % step:
            raise ValueError(
                f"--resolution must be divisible by {step} for this teacher (8x VAE, {teacher.config.patch_size}x"
                f"{teacher.config.patch_size} patches), got {resolution}"
            )
        teacher = teacher.to(device)
        conditioner = SD3Conditioner(
            tok, tok2, te, te2, teacher, resolution, tok3, te3, max_sequence_length, offload=offload_text_encoders
        )
        schedules = flow_schedule(config, float(scheduler.config.get("shift", 1.0)))
        return cls(
            pretrained, rev, var, tok, tok2, tok3, te, te2, te3, teacher, dict(scheduler.config), schedules,
            conditioner,
        )  # fmt: skip

    @property
    def noise_schedule(self) -> FlowSchedule:
        """The DM loss's and the fake score's schedule (the teacher's and every node's, as stage 2 calls them)."""
        return self.schedules["dm"]

    @property
    def denoising_schedule(self) -> FlowSchedule:
        """Stage 1's denoising loss's schedule."""
        return self.schedules["denoising"]

    @staticmethod
    def score_fn(model: torch.nn.Module, autocast: bool = True):
        return transformer_flow_fn(model, autocast=autocast)

    def generator_timestep(self, conditioning_timestep: float) -> float:
        """The generator's input sigma: `--conditioning_timestep / T` (1000: pure noise, sigma = 1, where every
        shift maps 1 to itself and stock SD3 pipelines with one step reproduce the generator)."""
        T = self.noise_schedule.num_train_timesteps
        if not 0 < conditioning_timestep <= T:
            raise ValueError(
                f"--conditioning_timestep must be in (0, {T}] for a flow teacher, got {conditioning_timestep}"
            )
        return conditioning_timestep / T

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        c = self.teacher.config.in_channels
        return (c, resolution // 8, resolution // 8)

    @staticmethod
    def decode_latents(vae, x0: torch.Tensor) -> torch.Tensor:
        """The VAE's input of the transformer's latents: `x0 / scaling_factor + shift_factor` (SD3's pipeline)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return x0 / vae.config.scaling_factor + shift

    def load_teacher_fp32(self) -> torch.nn.Module:
        """The teacher's transformer read again in fp32 (trainable copies start from its exact weights)."""
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(
            self.pretrained, subfolder="transformer", revision=self.revision, variant=self.variant,
            torch_dtype=torch.float32,
        )  # fmt: skip

    def load_generator(self, source: str | None) -> torch.nn.Module:
        """The generator's starting point in fp32: the teacher (`None`) or a diffusers transformer folder or repo
        (with or without `transformer/`)."""
        from diffusers import SD3Transformer2DModel

        if source is None:
            return self.load_teacher_fp32()
        sub = "transformer" if os.path.isdir(os.path.join(source, "transformer")) else None
        return SD3Transformer2DModel.from_pretrained(source, subfolder=sub, torch_dtype=torch.float32)

    def final_pipeline(self, transformer_state: dict[str, torch.Tensor], conditioning_timestep: int):
        """The one-step `DisBackSD3Pipeline` of a trained generator's full weights (fp32, on the CPU): the teacher's
        VAE, text encoders and tokenizers, the student's scheduler (one step from sigma = 1), and the run's
        `max_sequence_length` as the pipeline's default."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel

        from ..pipeline_disback_sd3 import DisBackSD3Pipeline, disback_flow_scheduler

        if conditioning_timestep != self.noise_schedule.num_train_timesteps:
            raise ValueError(
                f"the SD3 one-step pipeline starts from pure noise (sigma = 1, --conditioning_timestep 1000); this "
                f"generator was trained at {conditioning_timestep}"
            )
        transformer = SD3Transformer2DModel.from_config(self.teacher.config)
        transformer.load_state_dict(transformer_state)
        vae = AutoencoderKL.from_pretrained(self.pretrained, subfolder="vae", revision=self.revision)
        encoders = [None if m is None else m.float().cpu() for m in (self.text_encoder, self.text_encoder_2,
                                                                      self.text_encoder_3)]  # fmt: skip
        pipe = DisBackSD3Pipeline(
            transformer=transformer,
            scheduler=disback_flow_scheduler(self.scheduler_config),
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=self.tokenizer,
            text_encoder_2=encoders[1],
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=encoders[2],
            tokenizer_3=self.tokenizer_3,
        )
        # sampled, by default, with the T5 length it was trained with (recorded in the saved folder)
        pipe.default_max_sequence_length = self.conditioner.max_sequence_length
        return pipe

    def load_vae(self, device: torch.device | str, weight_dtype: torch.dtype) -> torch.nn.Module:
        """The teacher's VAE, loaded once; bf16 or fp32."""
        if self.vae is None:
            from diffusers import AutoencoderKL

            dtype = torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32
            vae = AutoencoderKL.from_pretrained(self.pretrained, subfolder="vae", revision=self.revision)
            self.vae = vae.to(device, dtype).requires_grad_(False)
        return self.vae
