"""diffusers_disback: one-step SDXL and SD3 / SD3.5 generation and distillation by Distribution Backtracking
(DisBack)."""

__version__ = "0.1.0.dev0"

from .checkpoints import CheckpointError, load_unet_checkpoint
from .pipeline_disback import DisBackPipeline
from .pipeline_disback_img2img import DisBackImg2ImgPipeline, disback_editing_timesteps
from .pipeline_disback_inpaint import DisBackInpaintPipeline
from .pipeline_disback_sd3 import DisBackSD3Pipeline, disback_flow_scheduler, disback_flow_sigmas
from .scheduling_disback import DisBackScheduler, DisBackSchedulerOutput, disback_timesteps

__all__ = [
    "CheckpointError",
    "DisBackImg2ImgPipeline",
    "DisBackInpaintPipeline",
    "DisBackPipeline",
    "DisBackSD3Pipeline",
    "DisBackScheduler",
    "DisBackSchedulerOutput",
    "disback_editing_timesteps",
    "disback_flow_scheduler",
    "disback_flow_sigmas",
    "disback_timesteps",
    "load_unet_checkpoint",
]
