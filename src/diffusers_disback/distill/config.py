"""The settings of a DisBack run, one name each: the training script's flag, this dataclass's field, the saved config
and the docs all use the same word (in the style of peft's `LoraConfig`: each field carries its help text).

The SDXL training script builds its argument parser from [`DisBackConfig`] ([`add_config_arguments`]) and the
benchmarks build their runs from it, so a setting means the same thing in both. Units: every count of the training
loop is in *iterations*; an iteration is one fake-score update, and the generator is updated on every
`fake_score_update_ratio`-th (docs/method.md, "The update order").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from .backtracking import METHODS


def _setting(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DisBackConfig:
    """
    The method's settings, shared by the SDXL training script (`--<field>`) and the benchmarks. Defaults are the
    paper's SDXL settings where it gives them (docs/training.md lists them with the reference code's values).
    """

    method: str = _setting(
        "disback",
        "disback: record the path, then walk it back; dmd: no path (stage 1 skipped), the fake score and the target "
        "are the teacher from the start (DMD2 without its GAN term, the baseline); warm: the path's last node starts "
        "the fake score but the target is the teacher from the start (a control: what the path buys beyond a "
        "better-initialised fake score); what each means for stage 2 is `MethodPlan`",
        METHODS,
    )
    # ------------------------------------------------------------------------------- stage 1: degradation recording
    degradation_steps: int = _setting(1000, "N1: stage-1 steps (paper: 1000)")
    path_interval: int = _setting(100, "K1: a path node every K1 stage-1 steps (paper: 100)")
    num_path_nodes: int | None = _setting(
        None, "instead of --path_interval: this many nodes, spaced by --path_node_spacing"
    )
    path_node_spacing: str = _setting(
        "uniform",
        "spacing of --num_path_nodes: uniform or log in stage-1 steps, or distance: record --path_candidates snapshots "
        "and keep the nodes evenly spaced in their measured distance to the teacher (docs/method.md, 'The path "
        "profile')",
        ("uniform", "log", "distance"),
    )
    path_candidates: int | None = _setting(
        None, "--path_node_spacing distance: snapshots stage 1 records to choose from (default 4 x --num_path_nodes)"
    )
    path_spacing_tolerance: float = _setting(
        0.1,
        "--path_node_spacing distance: the largest gap between neighbouring nodes may exceed the smallest it can be by "
        "this fraction if that spaces the nodes more evenly (about the probe's own noise; 0: the smallest largest gap)",
    )
    path_profile_prompts: int = _setting(
        32,
        "captions of the path profile's probe (one initial-generator and one teacher sample each): stage 1 measures "
        "every node's distance to the teacher on it and profiles the path at its end; 0: no profile",
    )
    path_profile_timesteps: int = _setting(8, "timesteps of the path profile's probe, evenly spaced over the DM range")
    path_node_type: str = _setting(
        "full", "a node is the degrading score's full weights, or a LoRA adapter on the teacher", ("full", "lora")
    )
    path_lora_rank: int = _setting(64, "rank of the degrading LoRA (--path_node_type lora)")
    degradation_learning_rate: float | None = _setting(None, "stage-1 learning rate (default: --learning_rate)")
    degradation_gan: bool = _setting(
        False,
        "stage 1 also trains a discriminator head on the degrading score (weight --gan_discriminator_weight), as the "
        "reference code does; needs real images. Off by default: the method does not need it",
    )
    # ---------------------------------------------------------------------------- stage 2: distribution backtracking
    max_train_steps: int = _setting(5000, "stage-2 iterations (one fake-score update each)")
    fake_score_update_ratio: int = _setting(
        5, "r: the generator is updated on every r-th iteration (fake-score updates per generator update)"
    )
    backtrack_interval: int = _setting(
        1000,
        "K2: stage-2 iterations per path node, counted like the reference code (paper: 1000 iterations = 200 "
        "generator updates at --fake_score_update_ratio 5); the adaptive rule's upper bound",
    )
    backtrack_rule: str = _setting(
        "fixed",
        "fixed: advance every K2 iterations (the paper); adaptive: when the generator caught up",
        ("fixed", "adaptive"),
    )
    backtrack_threshold: float = _setting(
        0.5, "adaptive rule: advance when the DM distance fell to this fraction of its value at the node's start"
    )
    fake_score_init: str = _setting(
        "last_node",
        "the fake score starts at the most degraded node (DisBack) or the teacher",
        ("last_node", "teacher"),
    )
    intermediate_cfg: str = _setting(
        "node",
        "CFG on intermediate nodes: node (the node's own unconditional branch, as the reference code does; the path "
        "profile's choice: unguided nodes sit next to the generator, docs/method.md), none (no CFG; best on 8x8 "
        "digits only), or the teacher's unconditional branch (collapsed on digits); the teacher itself is always "
        "guided with --guidance_scale",
        ("node", "none", "teacher"),
    )
    conditioning_timestep: int = _setting(
        399, "t_c: the timestep the one-step generator is fed pure noise at (flow teachers: 1000, sigma = t_c / 1000)"
    )
    guidance_scale: float = _setting(8.0, "teacher CFG in the distribution-matching loss (SDXL: 8)")
    min_step_percent: float = _setting(0.02, "DM loss: t ~ U{min..max} as fractions of T (DMD2: 0.02..0.98)")
    max_step_percent: float = _setting(0.98, "DM loss: upper end of t, a fraction of T")
    # ------------------------------------------------------------- flow-matching teachers (SD3; the DDPM ignores it)
    dm_timestep_distribution: str = _setting(
        "uniform",
        "flow teachers: the sigma distribution of the DM loss (over its min..max range) and of the fake score's "
        "denoising loss, before the shift",
        ("uniform", "logit_normal"),
    )
    dm_timestep_shift: float = _setting(
        1.0, "flow teachers: the shift s*sigma/(1+(s-1)*sigma) applied once to the DM loss's and fake score's sigmas"
    )
    denoising_timestep_distribution: str = _setting(
        "logit_normal",
        "flow teachers: stage 1's denoising-loss sigma distribution (SD3's training: logit-normal)",
        ("uniform", "logit_normal"),
    )
    denoising_timestep_shift: float | None = _setting(
        None, "flow teachers: the shift of stage 1's sigmas (default: the teacher scheduler's, SD3: 3.0)"
    )
    logit_mean: float = _setting(0.0, "flow teachers: mean of the logit-normal distributions")
    logit_std: float = _setting(1.0, "flow teachers: standard deviation of the logit-normal distributions")
    gan_loss_weight: float = _setting(
        0.0, "weight of DMD2's GAN term for the generator (SDXL: 5e-3; 0 = off, the default)"
    )
    gan_discriminator_weight: float = _setting(
        1e-2, "weight of the discriminator loss added to the fake score's (DMD2: 1e-2)"
    )
    # -------------------------------------------------------------------------------------------------- optimisation
    learning_rate: float = _setting(5e-7, "generator (and default for the others)")
    fake_learning_rate: float | None = _setting(None, "fake score (default: --learning_rate)")
    lr_scheduler: str = _setting("constant_with_warmup", "diffusers' get_scheduler name, for every optimiser")
    lr_warmup_steps: int = _setting(
        500,
        "warm-up length in iterations of each stage's loop; the generator's schedule also advances on iterations "
        "without a generator update, as in the reference code",
    )
    adam_beta1: float = _setting(0.9, "AdamW beta1")
    adam_beta2: float = _setting(0.999, "AdamW beta2")
    adam_weight_decay: float = _setting(0.01, "AdamW weight decay")
    adam_epsilon: float = _setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = _setting(10.0, "gradient-norm clipping (0: off)")
    use_8bit_adam: bool = _setting(False, "bitsandbytes' AdamW8bit (if installed)")
    lora_rank: int = _setting(
        0,
        "train the generator and the fake score as LoRA adapters of this rank over frozen bases (one-GPU mode; the "
        "SDXL script holds them on one shared teacher base, --lora_base); 0: full fine-tuning. The final UNet has the "
        "generator's adapter merged in",
    )
    train_batch_size: int = _setting(1, "per process")
    seed: int = _setting(0, "seed of the initial weights' randomness, the data order and the training noise")

    def __post_init__(self):
        for name in ("degradation_steps", "path_interval", "max_train_steps", "fake_score_update_ratio",
                     "backtrack_interval", "train_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if not 0 <= self.min_step_percent < self.max_step_percent <= 1:
            raise ValueError("need 0 <= min_step_percent < max_step_percent <= 1")
        self._check_flow_settings()
        if self.path_node_spacing == "distance":
            if not self.num_path_nodes:
                raise ValueError("--path_node_spacing distance needs --num_path_nodes (how many nodes to keep)")
            if self.path_profile_prompts < 1:
                raise ValueError(
                    "--path_node_spacing distance measures distances: --path_profile_prompts must be >= 1"
                )
            if self.path_spacing_tolerance < 0:
                raise ValueError(f"--path_spacing_tolerance must be >= 0, got {self.path_spacing_tolerance}")
            if self.path_candidates is not None and self.path_candidates < self.num_path_nodes:
                raise ValueError(
                    f"--path_candidates ({self.path_candidates}) must be >= --num_path_nodes ({self.num_path_nodes})"
                )
        if self.fake_learning_rate is None:
            self.fake_learning_rate = self.learning_rate
        if self.degradation_learning_rate is None:
            self.degradation_learning_rate = self.learning_rate

    def _check_flow_settings(self) -> None:
        for name in ("dm_timestep_shift", "denoising_timestep_shift", "logit_std"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    # -------------------------------------------------------------------------------------------------- derived

    def node_steps(self) -> list[int]:
        """The stage-1 steps after which a path node is taken (distance spacing: a candidate node)."""
        from .degradation import candidate_steps, node_steps

        if self.path_node_spacing == "distance":
            return candidate_steps(self.degradation_steps, self.num_candidates)
        if self.num_path_nodes:
            return node_steps(
                self.degradation_steps, num_path_nodes=self.num_path_nodes, path_node_spacing=self.path_node_spacing
            )
        return node_steps(self.degradation_steps, path_interval=self.path_interval)

    @property
    def num_candidates(self) -> int:
        """Candidate nodes distance spacing records (`path_candidates`, default 4 x `num_path_nodes`)."""
        return self.path_candidates or 4 * (self.num_path_nodes or 1)

    def timestep_range(self, num_train_timesteps: int) -> tuple[int, int]:
        """`(min_step, max_step)` of the DM loss's `t` for a schedule of `num_train_timesteps`."""
        T = num_train_timesteps
        return int(self.min_step_percent * T), min(int(self.max_step_percent * T), T - 1)

    # ------------------------------------------------------------------------------------------- (de)serialising

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict, strict: bool = True) -> DisBackConfig:
        """The config of `values` (e.g. a saved config, or `vars(args)` with `strict=False` to ignore other keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if strict and unknown:
            raise ValueError(f"unknown DisBack settings {unknown}; the settings are {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if k in names})


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(DisBackConfig)[f.name]
    if isinstance(hint, types.UnionType):  # `int | None`
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """
    Adds one `--<field>` flag per setting of [`DisBackConfig`] to `parser`, with the field's type, default, choices
    and help; booleans are `store_true` flags.
    """
    group = parser.add_argument_group("DisBack settings (diffusers_disback.distill.DisBackConfig)")
    for f in dataclasses.fields(DisBackConfig):
        kind, help_text = _field_type(f), f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(f"--{f.name}", action="store_true", default=f.default, help=help_text)
            continue
        group.add_argument(
            f"--{f.name}", type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_text
        )
    return group
