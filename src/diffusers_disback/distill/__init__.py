"""The DisBack method, model-agnostic: scores, losses, stage 1 (degradation path), stage 2 (backtracking schedule),
the training steps both stages run, the settings, and the LoRA helpers.

Nothing in this package imports model-specific code: a score is any denoising callable `pred(x_t, t, cond)` on a
DDPM schedule (epsilon, SDXL) or a rectified-flow schedule (velocity, SD3 and FLUX).
"""

from .backtracking import METHODS, BacktrackingSchedule, MethodPlan, target_score
from .config import DisBackConfig, add_config_arguments
from .degradation import (
    DegradationPath,
    NodeSwitcher,
    PathError,
    PathNode,
    architecture_fingerprint,
    node_steps,
)
from .engine import (
    BacktrackingStep,
    DegradationStep,
    GanTerm,
    OptimizerUpdate,
    generator_updates,
    make_lr_scheduler,
    make_optimizer,
)
from .lora import (
    FAKE_SCORE_ADAPTER,
    GENERATOR_ADAPTER,
    LORA_ADAPTER,
    AdapterView,
    SharedBase,
    add_lora_adapter,
    lora_config,
    lora_parameters,
    lora_state_dict,
    make_trainable,
    merge_lora,
)
from .losses import (
    denoising_score_matching_loss,
    distribution_matching_gradient,
    distribution_matching_loss,
    distribution_matching_step,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .scores import (
    PREDICTION_TYPES,
    FlowSchedule,
    NoiseSchedule,
    Schedule,
    Score,
    SigmaDistribution,
    one_step_sample,
    shift_sigmas,
)

__all__ = [
    "FAKE_SCORE_ADAPTER",
    "GENERATOR_ADAPTER",
    "LORA_ADAPTER",
    "METHODS",
    "AdapterView",
    "BacktrackingSchedule",
    "BacktrackingStep",
    "DegradationPath",
    "DegradationStep",
    "DisBackConfig",
    "GanTerm",
    "MethodPlan",
    "NodeSwitcher",
    "NoiseSchedule",
    "FlowSchedule",
    "Schedule",
    "SigmaDistribution",
    "PREDICTION_TYPES",
    "shift_sigmas",
    "OptimizerUpdate",
    "PathError",
    "PathNode",
    "Score",
    "SharedBase",
    "add_config_arguments",
    "add_lora_adapter",
    "architecture_fingerprint",
    "denoising_score_matching_loss",
    "distribution_matching_gradient",
    "distribution_matching_loss",
    "distribution_matching_step",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "generator_updates",
    "lora_config",
    "lora_parameters",
    "lora_state_dict",
    "make_lr_scheduler",
    "make_optimizer",
    "make_trainable",
    "merge_lora",
    "node_steps",
    "one_step_sample",
    "target_score",
]
