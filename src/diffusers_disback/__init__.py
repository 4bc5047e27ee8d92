"""diffusers_disback: one-step SDXL generation and distillation by Distribution Backtracking (DisBack)."""

__version__ = "0.1.0.dev0"

from .checkpoints import CheckpointError, load_unet_checkpoint
from .pipeline_disback import DisBackPipeline
from .pipeline_disback_img2img import DisBackImg2ImgPipeline, disback_editing_timesteps
from .pipeline_disback_inpaint import DisBackInpaintPipeline
from .scheduling_disback import DisBackScheduler, DisBackSchedulerOutput, disback_timesteps

__all__ = [
    "CheckpointError",
    "DisBackImg2ImgPipeline",
    "DisBackInpaintPipeline",
    "DisBackPipeline",
    "DisBackScheduler",
    "DisBackSchedulerOutput",
    "disback_editing_timesteps",
    "disback_timesteps",
    "load_unet_checkpoint",
]
