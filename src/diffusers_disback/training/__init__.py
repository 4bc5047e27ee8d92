"""SDXL training glue for DisBack, by role; the method itself is in `diffusers_disback.distill`.

- [`data`](data.py): prompt and real-image streams (`datasets`, streamed, rank-split, exactly resumable);
- [`sdxl`](sdxl.py): the teacher's frozen parts and the UNets a run starts from, prompts to SDXL conditioning, a
  UNet as a score;
- [`discriminator`](discriminator.py): DMD2's discriminator head and the SDXL GAN term;
- [`state`](state.py): the run state, checkpoint save/restore and the resume plan;
- [`distributed`](distributed.py): full state dicts, gradient clipping, preparing models under DDP/FSDP, the
  ranks' joint NaN decision, a path hashed once per machine;
- [`hub_push`](hub_push.py): pushes to the Hub in the background.

The training script (`examples/train_disback/train_disback_sdxl.py`) wires them together.
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
from .sdxl import SDXL_LORA_TARGETS, FrozenSDXL, SDXLConditioner, unet_eps_fn
from .state import STAGES, ResumePlan, RunState, checkpoint_dirs, plan_resume, restore_checkpoint, save_checkpoint

__all__ = [
    "SDXL_LORA_TARGETS",
    "STAGES",
    "BackgroundPusher",
    "DiscriminatorHead",
    "EmptyStreamError",
    "FakeScoreWithHead",
    "FrozenSDXL",
    "ImageStream",
    "PromptStream",
    "ResumePlan",
    "RunState",
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
    "unet_eps_fn",
]
