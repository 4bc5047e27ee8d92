"""The DisBack method, model-agnostic: scores, losses, stage 1 (degradation path), stage 2 (backtracking schedule).

Nothing in this package imports SDXL-specific code: a score is any epsilon-predicting callable `eps(x_t, t, cond)`.
"""

from .backtracking import BacktrackingSchedule, target_score
from .degradation import (
    LORA_ADAPTER,
    DegradationPath,
    NodeSwitcher,
    PathError,
    PathNode,
    add_lora_adapter,
    architecture_fingerprint,
    lora_parameters,
    merge_lora,
    node_steps,
)
from .losses import (
    denoising_score_matching_loss,
    distribution_matching_gradient,
    distribution_matching_loss,
    distribution_matching_step,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .scores import NoiseSchedule, Score, one_step_sample

__all__ = [
    "LORA_ADAPTER",
    "BacktrackingSchedule",
    "DegradationPath",
    "NodeSwitcher",
    "NoiseSchedule",
    "PathError",
    "PathNode",
    "Score",
    "add_lora_adapter",
    "architecture_fingerprint",
    "denoising_score_matching_loss",
    "distribution_matching_gradient",
    "distribution_matching_loss",
    "distribution_matching_step",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "lora_parameters",
    "merge_lora",
    "node_steps",
    "one_step_sample",
    "target_score",
]
