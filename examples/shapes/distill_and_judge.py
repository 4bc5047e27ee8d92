#!/usr/bin/env python
"""Distill the shapes teacher with the real training script, then judge the teacher and the one-step generator.

    python examples/shapes/distill_and_judge.py --teacher shapes-teacher --output_dir shapes-run [--method dmd]

1. writes the training split's captions as the prompt file (the held-out colour-shape pairs are never trained on);
2. runs `examples/train_disback/train_disback_sdxl.py` on the teacher, unchanged, with the shapes recipe
   (`diffusers_disback.shapes.distill_arguments()`; any extra arguments after `--` go to it);
3. samples the teacher (Euler, 25 steps, CFG) and the distilled `DisBackPipeline` (one step) for every caption of
   the world, the same seeds for both, scores both with the shapes judge (`diffusers_disback.evaluation`), and
   writes `judge.json` and `grid.png` (teacher row above one-step row, held-out captions included).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from diffusers_disback import DisBackPipeline
from diffusers_disback.evaluation import CaptionSet, default_judge, fd_in_judge_features, shapes_metrics
from diffusers_disback.hub import append_card_section
from diffusers_disback.images import image_grid
from diffusers_disback.shapes import SHOWCASE_CAPTIONS, all_scenes, distill_arguments, write_prompts

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "train_disback", "train_disback_sdxl.py")
# What the shapes teacher distills with: the recipe as it is (diffusers_disback.shapes.distill_arguments).
# SETTINGS and DEMO_PROMPTS stay importable for benchmarks/shapes_compare.py until it imports those itself.
SETTINGS = distill_arguments()
DEMO_PROMPTS = list(SHOWCASE_CAPTIONS)  # the last three are held-out pairs: never trained on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the shapes teacher folder (examples/shapes/train_teacher.py)")
    p.add_argument("--output_dir", default="shapes-run")
    p.add_argument("--method", choices=["disback", "dmd", "warm"], default="disback")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher_steps", type=int, default=25)
    p.add_argument("--teacher_guidance", type=float, default=5.0)
    p.add_argument("--skip_training", action="store_true", help="judge an existing OUTPUT_DIR/final")
    args, extra = p.parse_known_args(argv)
    args.extra = [a for a in extra if a != "--"]
    return args


@torch.no_grad()
def sample(pipe, prompts, seeds, **kwargs):
    images = []
    for prompt, seed in zip(prompts, seeds):
        generator = torch.Generator().manual_seed(seed)
        images += pipe(prompt, generator=generator, height=64, width=64, **kwargs).images
    return images


def judge_both(args) -> dict:
    from diffusers import StableDiffusionXLPipeline

    judge = default_judge()
    prompts = [s.caption for s in all_scenes()]
    seeds = list(range(len(prompts)))
    teacher = StableDiffusionXLPipeline.from_pretrained(args.teacher)
    teacher.set_progress_bar_config(disable=True)
    student = DisBackPipeline.from_pretrained(os.path.join(args.output_dir, "final"))
    student.set_progress_bar_config(disable=True)
    results = {}
    images = {}
    renders = list(CaptionSet.from_shapes().images())
    for name, pipe, kw in (
        ("teacher", teacher, dict(num_inference_steps=args.teacher_steps, guidance_scale=args.teacher_guidance)),
        ("one_step", student, {}),
    ):
        start = time.time()
        images[name] = sample(pipe, prompts, seeds, **kw)
        results[name] = {**shapes_metrics(images[name], prompts, renders, judge), "seconds": time.time() - start}
    results["fd_one_step_to_teacher"] = fd_in_judge_features(judge, images["one_step"], images["teacher"])
    shown = [prompts.index(p) for p in SHOWCASE_CAPTIONS]
    grid = image_grid([images["teacher"][i] for i in shown] + [images["one_step"][i] for i in shown], len(shown))
    grid.save(os.path.join(args.output_dir, "grid.png"))
    return results


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    prompts = write_prompts(os.path.join(args.output_dir, "prompts.txt"), "train")
    if not args.skip_training:
        cmd = [sys.executable, SCRIPT, "--pretrained_teacher_model", args.teacher, "--output_dir", args.output_dir,
               "--train_data_files", prompts, "--method", args.method, "--seed", str(args.seed),
               "--validation_prompts", *SHOWCASE_CAPTIONS[:4], *SETTINGS, *args.extra]  # fmt: skip
        if os.path.isdir(os.path.join(args.output_dir, "checkpoints")):
            cmd += ["--resume_from_checkpoint", "latest"]
        start = time.time()
        subprocess.run(cmd, check=True)
        print(f"distillation: {time.time() - start:.0f} s")
    results = judge_both(args)
    with open(os.path.join(args.output_dir, "judge.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    rows = {}
    for name in ("teacher", "one_step"):
        for split, key in (("all captions", ""), ("training captions", "_training_captions"),
                           ("held-out captions", "_held_out_captions")):  # fmt: skip
            rows[f"{name}: all-attribute accuracy, {split}"] = results[name][f"shapes_accuracy{key}"]
    rows["FD one-step to teacher (judge features)"] = results["fd_one_step_to_teacher"]
    append_card_section(
        os.path.join(args.output_dir, "final"),
        "Evaluation: the shapes judge",
        rows,
        f"Every caption of the shapes world, one image each (image i seeded i); the teacher at {args.teacher_steps} "
        f"Euler steps with CFG {args.teacher_guidance:g}. `grid.png` beside this run shows both (docs/tutorial_shapes.md).",
    )
    for name in ("teacher", "one_step"):
        r = results[name]
        print(
            f"{name}: all-attribute accuracy {r['shapes_accuracy']:.3f} "
            f"(training captions {r['shapes_accuracy_training_captions']:.3f}, held-out "
            f"{r['shapes_accuracy_held_out_captions']:.3f})"
        )
    print(f"FD one-step to teacher (judge features): {results['fd_one_step_to_teacher']:.2f}")


if __name__ == "__main__":
    main()
