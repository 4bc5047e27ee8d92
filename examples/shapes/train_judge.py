"""
Train the shapes-world judge: a ~0.6M-parameter CNN that reads colour, shape, position and background back from a 64x64
image (`diffusers_disback.evaluation.shapes_judge`), and write it where `default_judge()` finds it.

    python examples/shapes/train_judge.py                      # 800 steps at batch 64: about 1.5 min on 2 CPU cores
    python examples/shapes/train_judge.py --steps 300 --output /tmp/judge --no_package_copy

It trains on fresh renders of all 144 scenes (the compositional held-out pairs included) under VAE-like augmentation,
then prints its accuracy on 2,000 renders with seeds it never saw: crisp, blurred (PIL Gaussian blur, radius 1 and
2), and under the training augmentation. The weights (fp16 safetensors, ~1.2 MB) and `config.json` go to `--output`
and, unless `--no_package_copy`, to the package (`diffusers_disback/evaluation/shapes_judge_weights/`), which is what
`default_judge()` loads.
"""

import argparse
import json
import os
import random
import time

import torch

from diffusers_disback.evaluation.shapes_judge import (
    DEFAULT_JUDGE_DIR,
    EVAL_SEED_BASE,
    IMAGE_SIZE,
    ShapesJudge,
    augment_like_vae,
    evaluate_judge,
    judge_images,
    train_judge,
)
from diffusers_disback.shapes import all_scenes, render

HERE = os.path.dirname(os.path.abspath(__file__))


def evaluate_augmented(judge: ShapesJudge, n: int = 2000, seed_base: int = EVAL_SEED_BASE) -> dict:
    """Accuracy on `n` fresh renders passed through the training augmentation (a fixed generator)."""
    import numpy as np

    rng = random.Random(seed_base + 1)
    scenes = [rng.choice(all_scenes("all")) for _ in range(n)]
    x = torch.from_numpy(
        np.stack([np.asarray(render(s, seed_base + n + i, IMAGE_SIZE)) for i, s in enumerate(scenes)])
    )
    x = augment_like_vae(x.permute(0, 3, 1, 2).float() / 255, torch.Generator().manual_seed(1))
    return judge_images(judge, x, [s.caption for s in scenes])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", default=str(DEFAULT_JUDGE_DIR), help="where the judge is written (default: the package's copy)"
    )
    parser.add_argument(
        "--no_package_copy", action="store_true", help=f"do not also write the judge to {DEFAULT_JUDGE_DIR}"
    )
    parser.add_argument("--eval_images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    judge = train_judge(
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, device=args.device, log_every=100
    )
    train_seconds = time.perf_counter() - start
    judge = judge.cpu()
    print(f"trained {args.steps} steps at batch {args.batch_size} in {train_seconds:.0f}s")

    n = args.eval_images
    results = {
        "crisp": evaluate_judge(judge, n),
        "blur_radius_1": evaluate_judge(judge, n, blur=1.0),
        "blur_radius_2": evaluate_judge(judge, n, blur=2.0),
        "augmented": evaluate_augmented(judge, n),
    }
    for name, accuracies in results.items():
        print(
            f"{name:>14} ({n} held-out-seed renders): " + "  ".join(f"{k[9:]} {v:.4f}" for k, v in accuracies.items())
        )

    info = {
        "training": {
            "recipe": "examples/shapes/train_judge.py",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
        "held_out_seed_accuracy": {name: {k: round(v, 4) for k, v in acc.items()} for name, acc in results.items()},
    }
    outputs = list(dict.fromkeys([args.output] + ([] if args.no_package_copy else [str(DEFAULT_JUDGE_DIR)])))
    for output in outputs:
        judge.save_pretrained(output, **info)
        # what is saved is fp16: check that the saved judge reads as well as the trained one
        reloaded = evaluate_judge(ShapesJudge.from_pretrained(output), n, blur=1.0)
        print(
            f"wrote {output} ({os.path.getsize(os.path.join(output, 'model.safetensors')) / 1e6:.2f} MB); "
            f"reloaded, blur radius 1: all {reloaded['accuracy/all']:.4f}"
        )
    print(json.dumps(info["held_out_seed_accuracy"]))
    return results


if __name__ == "__main__":
    main()
