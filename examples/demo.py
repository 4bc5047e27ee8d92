"""`make demo`: DisBack end to end on CPU, offline, in a few minutes.

1. builds a tiny SDXL-shaped teacher (random weights: nothing can be downloaded here);
2. runs both stages of `examples/train_disback/train_disback_sdxl.py` under `accelerate launch` on the bundled prompt
   file, streamed with `datasets` (degradation recording, then distribution backtracking);
3. loads the result with `DisBackPipeline.from_pretrained` and writes a sample grid;
4. checks that plain diffusers loads the same folder (no remote code, and remote code) with the same pixels.

The teacher's weights are random, so the images are noise: the demo shows the machinery, not a trained model.
"""

import argparse
import os
import subprocess
import sys
import time

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from diffusers_disback import DisBackPipeline
from diffusers_disback.testing import save_tiny_teacher

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train_disback")
PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red fox in a snowy forest", "a bowl of ramen"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--degradation_steps", type=int, default=20)
    parser.add_argument("--max_train_steps", type=int, default=40)
    args = parser.parse_args()
    start = time.perf_counter()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.output_dir, exist_ok=True)

    teacher_dir = save_tiny_teacher(os.path.join(args.output_dir, "tiny-teacher"))
    print(f"[1/4] tiny SDXL-shaped teacher saved to {teacher_dir}", flush=True)

    run_dir = os.path.join(args.output_dir, "run")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", os.path.join(TRAIN, "configs", "cpu_demo.yaml"),
        os.path.join(TRAIN, "train_disback_sdxl.py"),
        "--pretrained_teacher_model", teacher_dir,
        "--train_data_files", os.path.join(TRAIN, "data", "demo_prompts.txt"),
        "--output_dir", run_dir,
        "--stage", "all",
        "--resolution", "64", "--train_batch_size", "2",
        "--degradation_steps", str(args.degradation_steps), "--path_interval", str(args.degradation_steps // 4),
        "--max_train_steps", str(args.max_train_steps), "--fake_score_update_ratio", "2",
        "--backtrack_interval", str(max(1, args.max_train_steps // 10)),
        "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
        "--checkpointing_steps", str(args.max_train_steps // 2), "--validation_steps", str(args.max_train_steps // 2),
        "--validation_prompts", *PROMPTS,
    ]  # fmt: skip
    print(f"[2/4] training both stages: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})

    final = os.path.join(run_dir, "final")
    pipe = DisBackPipeline.from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]).images
    grid = Image.new("RGB", (64 * len(images), 64))
    for i, image in enumerate(images):
        grid.paste(image, (64 * i, 0))
    grid_path = os.path.join(args.output_dir, "samples_one_step.png")
    grid.resize((256 * len(images), 256), Image.NEAREST).save(grid_path)
    print(
        f"[3/4] loaded {final} with DisBackPipeline; one-step samples ({pipe.scheduler.timesteps.tolist()}) "
        f"written to {grid_path}; path, checkpoints, validation images and TensorBoard logs in {run_dir}"
    )

    reference = np.asarray(pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0)).images[0], dtype=np.float32)
    plain = StableDiffusionXLPipeline.from_pretrained(final)
    remote = DiffusionPipeline.from_pretrained(final, custom_pipeline=final, trust_remote_code=True)
    for name, p, kwargs in (
        ("StableDiffusionXLPipeline (no remote code)", plain, {"timesteps": [399], "guidance_scale": 0.0}),
        ("DiffusionPipeline(custom_pipeline=..., trust_remote_code=True)", remote, {}),
    ):
        p.set_progress_bar_config(disable=True)
        other = p(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        diff = np.abs(np.asarray(other, dtype=np.float32) - reference).max()
        print(f"[4/4] {name}: max pixel difference to DisBackPipeline = {diff:.0f}/255")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
