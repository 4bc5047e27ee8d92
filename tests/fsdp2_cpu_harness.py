"""Test-only: run the training script with accelerate's FSDP2 code path on CPU (gloo).

accelerate never enables FSDP on a CPU by itself. After the Accelerator is built, this harness switches its state to
FSDP with an FSDP2 plugin, so `prepare`, `get_state_dict`, `save_state`/`load_state` and `clip_grad_norm_` take their
FSDP2 branches over gloo. Launch it like the script:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/fsdp2_cpu_harness.py ARGS...

It runs `train_disback_sdxl.py`, or `train_disback_sd3.py` (wrapping SD3's `JointTransformerBlock`s) when the
`--pretrained_teacher_model` folder is an SD3 one.
"""

import os
import runpy
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_disback")
# the script and the blocks FSDP2 wraps, by the teacher's family (an SD3 teacher folder has `transformer/`)
_teacher = sys.argv[sys.argv.index("--pretrained_teacher_model") + 1]
if os.path.isdir(os.path.join(_teacher, "transformer")):
    SCRIPT, BLOCKS = os.path.join(SCRIPTS, "train_disback_sd3.py"), ["JointTransformerBlock"]
else:
    SCRIPT, BLOCKS = os.path.join(SCRIPTS, "train_disback_sdxl.py"), ["BasicTransformerBlock", "ResnetBlock2D"]
_init = accelerate.Accelerator.__init__


def _init_with_fsdp2(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=BLOCKS,
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
    )
    # both the accelerator's state and the process state: `prepare` reads the latter back
    self.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP


accelerate.Accelerator.__init__ = _init_with_fsdp2
sys.argv = [SCRIPT, *sys.argv[1:]]
sys.path.insert(0, SCRIPTS)  # as running the script would: train_disback_sd3.py imports train_disback_sdxl
runpy.run_path(SCRIPT, run_name="__main__")
