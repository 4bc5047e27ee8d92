"""`make demo`: DisBack end to end on CPU, offline, in a few minutes, on a real (small) text-to-image teacher.

1. takes the shapes teacher shipped in `examples/shapes/teacher` (an SDXL-architecture model trained on coloured
   shapes by `examples/shapes/train_teacher.py`; docs/tutorial_shapes.md);
2. runs both stages of `examples/train_disback/train_disback_sdxl.py` under `accelerate launch` on the world's
   training captions, streamed with `datasets` (degradation recording, then distribution backtracking);
3. loads the result with `DisBackPipeline.from_pretrained`, writes a grid (the teacher at 25 steps with CFG above the
   one-step generator, same prompts and seeds; the last three prompts are combinations never trained on) and prints
   the shapes judge's accuracy of both over all 144 captions;
4. checks that plain diffusers loads the same folder (no remote code, and remote code) with the same pixels.

Every run starts its training afresh (a previous demo's run folder is replaced), so `make demo` can be run again.

`make demo-sd3` (`--family sd3`) does the same with the flow-matching teacher in the SD3 architecture
(`examples/shapes/teacher_sd3`, trained by `examples/shapes/train_teacher_sd3.py`) through `train_disback_sd3.py`:
the teacher at 28 Euler steps above the one-step `DisBackSD3Pipeline`, and stock `StableDiffusion3Pipeline` with one
step and no CFG on the same folder.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from PIL import Image

from diffusers_disback import DisBackPipeline, DisBackSD3Pipeline
from diffusers_disback.evaluation import default_judge, judge_images
from diffusers_disback.images import image_grid
from diffusers_disback.shapes import SHOWCASE_CAPTIONS, all_scenes, distill_arguments, write_prompts

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train_disback")
PROMPTS = list(SHOWCASE_CAPTIONS)  # the last three are held-out pairs: never trained on
NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}
FAMILIES = {
    "sdxl": {
        "teacher": "teacher", "script": "train_disback_sdxl.py", "flags": {"conditioning_timestep": None},
        "pipeline": DisBackPipeline, "stock": StableDiffusionXLPipeline, "load": {}, "call": {}, "steps": 25,
        "stock_call": {"timesteps": [399], "guidance_scale": 0.0},
    },
    "sd3": {  # sigma = 1; the teacher was trained with 8 (zero) T5 tokens and has no T5
        "teacher": "teacher_sd3", "script": "train_disback_sd3.py",
        "flags": {"conditioning_timestep": 1000, "max_sequence_length": 8}, "pipeline": DisBackSD3Pipeline,
        "stock": StableDiffusion3Pipeline, "load": NO_T5, "call": {"max_sequence_length": 8}, "steps": 28,
        "stock_call": {"num_inference_steps": 1, "guidance_scale": 0.0},
    },
}  # fmt: skip


def generate(pipe, captions, **kwargs):
    """Images for `captions`, image `i` seeded `i`, in batches."""
    images = []
    for start in range(0, len(captions), 48):
        chunk = captions[start : start + 48]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, height=64, width=64, **kwargs).images
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--degradation_steps", type=int, default=40)
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl", help="sd3: the flow-matching teacher")
    args = parser.parse_args()
    fam = FAMILIES[args.family]
    start = time.perf_counter()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.output_dir, exist_ok=True)

    teacher_dir = os.path.join(HERE, "shapes", fam["teacher"])
    prompts_file = write_prompts(os.path.join(args.output_dir, "prompts.txt"), "train")
    print(f"[1/4] the shapes teacher: {teacher_dir}; {len(all_scenes('train'))} training captions", flush=True)

    run_dir = os.path.join(args.output_dir, "run")
    shutil.rmtree(run_dir, ignore_errors=True)  # a previous demo's run: start it afresh, so a second demo works too
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(TRAIN, "configs", "cpu_demo.yaml"),
        os.path.join(TRAIN, fam["script"]),
        "--pretrained_teacher_model", teacher_dir,
        "--train_data_files", prompts_file,
        "--output_dir", run_dir,
        "--stage", "all",
        *distill_arguments(  # the shapes recipe on a smaller budget
            mixed_precision=None,  # the accelerate config's (fp32)
            degradation_steps=args.degradation_steps,
            path_interval=max(1, args.degradation_steps // 2),
            max_train_steps=args.max_train_steps,
            backtrack_interval=max(1, args.max_train_steps // 3),
            learning_rate=1e-4,
            **fam["flags"],  # SDXL: the script's default t_c, 399
            checkpointing_steps=max(1, args.max_train_steps // 2),
            checkpoints_total_limit=None,  # keep every checkpoint
            validation_steps=max(1, args.max_train_steps // 2),
        ),
        "--validation_prompts", *PROMPTS[:4],
    ]  # fmt: skip
    print(f"[2/4] training both stages: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})

    final = os.path.join(run_dir, "final")
    pipe = fam["pipeline"].from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    teacher = fam["stock"].from_pretrained(teacher_dir, **fam["load"])
    teacher.set_progress_bar_config(disable=True)
    captions = [s.caption for s in all_scenes()]
    judge = default_judge()
    steps = fam["steps"]
    one_step = generate(pipe, captions, **fam["call"])
    multi_step = generate(teacher, captions, num_inference_steps=steps, guidance_scale=5.0, **fam["call"])
    shown = [captions.index(p) for p in PROMPTS]
    grid = image_grid([multi_step[i] for i in shown] + [one_step[i] for i in shown], columns=len(shown))
    grid_path = os.path.join(args.output_dir, "samples_one_step.png")
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(grid_path)
    print(
        f"[3/4] loaded {final} with {type(pipe).__name__}; grid written to {grid_path} (top: teacher, {steps} steps, "
        f"CFG 5; bottom: one step); path, checkpoints, validation images and TensorBoard logs in {run_dir}"
    )
    for name, images in ((f"teacher, {steps} steps, CFG 5", multi_step), ("DisBack, 1 step", one_step)):
        accuracy = judge_images(judge, images, captions)["accuracy/all"]
        print(f"      judge: {name}: all-attribute accuracy {accuracy:.3f} over {len(captions)} captions")

    seed = torch.Generator().manual_seed
    reference = np.asarray(pipe(PROMPTS[0], generator=seed(0), **fam["call"]).images[0], dtype=np.float32)
    plain = fam["stock"].from_pretrained(final, **fam["load"])
    remote = DiffusionPipeline.from_pretrained(final, custom_pipeline=final, trust_remote_code=True)
    for name, p, kwargs in (
        (f"{fam['stock'].__name__} (no remote code)", plain, {**fam["stock_call"], **fam["call"]}),
        ("DiffusionPipeline(custom_pipeline=..., trust_remote_code=True)", remote, fam["call"]),
    ):
        p.set_progress_bar_config(disable=True)
        other = p(PROMPTS[0], generator=seed(0), **kwargs).images[0]
        diff = np.abs(np.asarray(other, dtype=np.float32) - reference).max()
        print(f"[4/4] {name}: max pixel difference to {type(pipe).__name__} = {diff:.0f}/255")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
