"""`make demo`: build a tiny SDXL-shaped teacher offline, wrap its UNet as a one-step DisBack pipeline, save it in the
Hub layout, load it back the three ways a user would, and write a one-step sample image.

The weights are random (nothing can be downloaded here), so the image is noise: the demo shows the machinery end to
end, not a trained model. Training (`examples/train_disback/`) replaces the random generator with a distilled one.
"""

import argparse
import os
import time

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from diffusers_disback import DisBackPipeline
from diffusers_disback.hub import save_for_hub
from diffusers_disback.testing import save_tiny_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    args = parser.parse_args()
    start = time.perf_counter()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(args.output_dir, exist_ok=True)

    teacher_dir = save_tiny_teacher(os.path.join(args.output_dir, "tiny-teacher"))
    print(f"[1/4] tiny SDXL-shaped teacher saved to {teacher_dir}")

    pipe = DisBackPipeline.from_pretrained(teacher_dir)  # the teacher's Euler scheduler becomes a DisBackScheduler
    pipe.set_progress_bar_config(disable=True)
    folder = save_for_hub(
        pipe,
        os.path.join(args.output_dir, "disback-tiny"),
        repo_id="your-name/disback-tiny",
        sample_prompts=[args.prompt],
        training={"note": "random tiny weights, built by `make demo`"},
    )
    print(f"[2/4] DisBack pipeline saved in the Hub layout to {folder} (model card: {folder}/README.md)")

    generator = torch.Generator().manual_seed(0)
    ours = DisBackPipeline.from_pretrained(folder)
    image = ours(args.prompt, generator=generator).images[0]
    path = os.path.join(args.output_dir, "sample_one_step.png")
    image.save(path)
    print(f"[3/4] one-step sample ({ours.scheduler.timesteps.tolist()}) written to {path}")

    reference = np.asarray(image, dtype=np.float32)
    plain = StableDiffusionXLPipeline.from_pretrained(folder)
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    for name, p, kwargs in (
        ("StableDiffusionXLPipeline (no remote code)", plain, {"timesteps": [399], "guidance_scale": 0.0}),
        ("DiffusionPipeline(custom_pipeline=..., trust_remote_code=True)", remote, {}),
    ):
        p.set_progress_bar_config(disable=True)
        other = p(args.prompt, generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        diff = np.abs(np.asarray(other, dtype=np.float32) - reference).max()
        print(f"[4/4] {name}: max pixel difference to DisBackPipeline = {diff:.0f}/255")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
