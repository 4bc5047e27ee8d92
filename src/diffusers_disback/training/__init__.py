"""Training glue for DisBack, by role; the method itself is in `diffusers_disback.distill`.

- [`data`](data.py): prompt and real-image streams (`datasets`, streamed, rank-split, exactly resumable);
- [`sdxl`](sdxl.py): the teacher's frozen parts and the UNets a run starts from, prompts to SDXL conditioning, a
  UNet as a score, the final pipeline;
- [`sd3`](sd3.py): the same for SD3/SD3.5 teachers (one interface, so one training loop serves both families): an
  MMDiT as a velocity score on the flow schedule, SD3's conditioning and unconditional branch;
- [`discriminator`](discriminator.py): DMD2's discriminator head and the SDXL GAN term;
- [`state`](state.py): the run state, checkpoint save/restore and the resume plan;
- [`distributed`](distributed.py): full state dicts, gradient clipping, preparing models under DDP/FSDP, the
  ranks' joint NaN decision, a path hashed once per machine;
- [`hub_push`](hub_push.py): pushes to the Hub in the background.

The training scripts (`examples/train_disback/train_disback_sdxl.py`, `train_disback_sd3.py`: one loop) wire them
together.
"""

from .data import EmptyStreamError, ImageStream, PromptStream
from .discriminator import DiscriminatorHead, FakeScoreWithHead, SDXLGanTerm
from .distributed import (
    clip_grad_norm,
    finite_or_skip,
    full_state_dict,
    is_fsdp2_sharded,
    load_path_verified_once,
    prepare_trainable,
)
from .hub_push import BackgroundPusher
from .sd3 import SD3_DEFAULTS, SD3_LORA_TARGETS, FrozenSD3, SD3Conditioner, transformer_flow_fn
from .sdxl import SDXL_LORA_TARGETS, FrozenSDXL, SDXLConditioner, unet_eps_fn
from .state import STAGES, ResumePlan, RunState, checkpoint_dirs, plan_resume, restore_checkpoint, save_checkpoint

__all__ = [
    "SD3_DEFAULTS",
    "SD3_LORA_TARGETS",
    "SDXL_LORA_TARGETS",
    "STAGES",
    "BackgroundPusher",
    "DiscriminatorHead",
    "EmptyStreamError",
    "FakeScoreWithHead",
    "FrozenSD3",
    "FrozenSDXL",
    "ImageStream",
    "PromptStream",
    "ResumePlan",
    "RunState",
    "SD3Conditioner",
    "SDXLConditioner",
    "SDXLGanTerm",
    "checkpoint_dirs",
    "clip_grad_norm",
    "finite_or_skip",
    "full_state_dict",
    "is_fsdp2_sharded",
    "load_path_verified_once",
    "plan_resume",
    "prepare_trainable",
    "restore_checkpoint",
    "save_checkpoint",
    "transformer_flow_fn",
    "unet_eps_fn",
]
