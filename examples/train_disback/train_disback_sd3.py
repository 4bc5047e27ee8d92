#!/usr/bin/env python
"""DisBack distillation of an SD3/SD3.5 teacher (a flow-matching MMDiT) into a one-step generator, under
`accelerate launch`.

    accelerate launch examples/train_disback/train_disback_sd3.py \\
        --pretrained_teacher_model stabilityai/stable-diffusion-3.5-medium \\
        --train_data_files prompts.txt --stage all --output_dir disback-sd3

The training loop is `train_disback_sdxl.py`'s, run for the "sd3" family: every flag is the same (FSDP2/DDP, bf16,
LoRA on one shared base, streaming, resume, pushes, validation, in-training evaluation, `--method dmd|warm`), with
SD3's defaults (`--conditioning_timestep 1000`, i.e. sigma = 1; `--guidance_scale 4.5`) and two flags of its own
(`--max_sequence_length`, `--no_t5`). What differs for SD3 (the transformer as a velocity score at `1000 sigma`, the
conditioning, the encoded empty prompt as the unconditional branch, the VAE's shift and scale, the LoRA targets, the
final `DisBackSD3Pipeline`) is in `diffusers_disback.training.sd3`; the flow schedule and its timestep shift in
`diffusers_disback.distill`. docs/training.md, "Flow-matching teachers", has the recipe.
"""

# run as a script, this file's folder is first on sys.path: the shared loop is the module beside it
from train_disback_sdxl import main

if __name__ == "__main__":
    main(family="sd3")
