#!/usr/bin/env python
"""LoRA size and reconstruction error by rank: a distilled shapes generator exported with `export_lora` at several
ranks and energies, each put on its base (the shapes teacher) and judged on the whole shapes world.

    python benchmarks/lora_ranks.py --generator shapes-run/final            # the generator of a shapes distillation
    python benchmarks/lora_ranks.py --generator shapes-run/final --ranks 1 4 16 --energies 0.9

For each setting: the file size, the per-layer relative error |dW - BA| / |dW| (median and max over layers), the
one-step image difference to the full generator (mean and max absolute, images in [0, 1], 144 prompts, the same seeds),
and the shapes judge's all-attribute accuracy of base + LoRA beside the full generator's and the base's own (one step).
Writes a markdown table (`--report`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", required=True, help="a distilled shapes pipeline folder (a run's final/)")
    p.add_argument("--base_model", default=os.path.join(ROOT, "examples", "shapes", "teacher"))
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--energies", nargs="+", type=float, default=[0.5, 0.9, 0.99])
    p.add_argument("--skip_exact", action="store_true", help="leave out the energy-1.0 exports (with/without biases)")
    p.add_argument("--figure", default=None, help="also save a grid: base, base + each LoRA, the full generator")
    p.add_argument("--label", default=None, help="how the report names the generator (default: its path)")
    p.add_argument("--report", default=os.path.join(HERE, "results", "lora_ranks.md"))
    return p.parse_args(argv)


def _accuracy(pipe, out: str) -> float:
    from diffusers_disback.evaluation import CaptionSet, evaluate, get_protocol

    record = evaluate(pipe, CaptionSet.from_shapes(), out, get_protocol("shapes"), progress=False)
    return record["metrics"]["shapes_accuracy"]


def _showcase(pipe) -> list:
    from diffusers_disback.shapes import SHOWCASE_CAPTIONS

    return [pipe(c, generator=torch.Generator().manual_seed(i)).images[0] for i, c in enumerate(SHOWCASE_CAPTIONS)]


@torch.no_grad()
def main(argv=None):
    from diffusers import UNet2DConditionModel

    from diffusers_disback import DisBackPipeline
    from diffusers_disback.evaluation import CaptionSet
    from diffusers_disback.lora_export import LORA_WEIGHTS_NAME, compare_one_step, export_lora

    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="lora-ranks-")
    full = DisBackPipeline.from_pretrained(args.generator)
    full.set_progress_bar_config(disable=True)
    base_unet = UNet2DConditionModel.from_pretrained(args.base_model, subfolder="unet", torch_dtype=torch.float32)
    prompts = CaptionSet.from_shapes().captions
    full_acc = _accuracy(full, os.path.join(work, "full"))
    base_pipe = DisBackPipeline(**{**full.components, "unet": base_unet})
    base_pipe.set_progress_bar_config(disable=True)
    base_acc = _accuracy(base_pipe, os.path.join(work, "base"))
    full_params = sum(p.numel() for p in full.unet.parameters())
    rows, figure_rows = [], [_showcase(base_pipe)] if args.figure else []
    settings = [("rank", r, False) for r in args.ranks] + [("energy", e, False) for e in args.energies]
    if not args.skip_exact:
        settings += [("energy", 1.0, False), ("energy", 1.0, True)]
    for kind, value, biases in settings:
        out = os.path.join(work, f"{kind}-{value}-{biases}")
        result = export_lora(args.generator, out, args.base_model, kohya=False, biases=biases, **{kind: value})
        unet = UNet2DConditionModel.from_pretrained(args.base_model, subfolder="unet", torch_dtype=torch.float32)
        pipe = DisBackPipeline(**{**full.components, "unet": unet})
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(out, weight_name=LORA_WEIGHTS_NAME, adapter_name="disback")
        diff = compare_one_step(full, pipe, prompts)
        s = result.summary()
        accuracy = _accuracy(pipe, os.path.join(work, f"judge-{kind}-{value}-{biases}"))
        rows.append(
            f"| {kind} {value:g}{' + biases' if biases else ''} | {s['rank_min']}–{s['rank_max']} | {s['size_mb']:.2f} "
            f"| {s['relative_error_median']:.3f} / {s['relative_error_max']:.3f} "
            f"| {diff['mean_abs']:.4f} / {diff['max_abs']:.3f} | {accuracy:.3f} |"
        )
        print(rows[-1], flush=True)
        if args.figure:
            figure_rows.append(_showcase(pipe))
        pipe.unload_lora_weights()
        if not biases:
            not_carried = result.summary()["not_representable_parameters"]
    lines = [
        "# LoRA size and reconstruction error by rank",
        "",
        f"`python benchmarks/lora_ranks.py --generator {args.label or args.generator}` — the generator's UNet has "
        f"{full_params / 1e6:.1f} M parameters ({full_params * 4 / 2**20:.1f} MB in fp32); LoRA files are fp32. "
        f"Without biases, {not_carried} changed parameters (biases, normalisation layers) are not carried; with "
        f"biases (`--with-biases`), {result.summary()['not_representable_parameters']} (normalisation layers).",
        "",
        f"All-attribute accuracy (shapes judge, 144 prompts, one step): full generator {full_acc:.3f}, base (the "
        f"teacher) without LoRA {base_acc:.3f}.",
        "",
        "| export | rank per layer | size (MB) | per-layer relative error, median / max | one-step image difference "
        "to the full generator, mean / max | all-attribute accuracy, base + LoRA |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    if args.figure:
        from diffusers_disback.images import image_grid

        figure_rows.append(_showcase(full))
        image_grid([im for row in figure_rows for im in row], len(figure_rows[0]), tile=96).save(args.figure)
    os.makedirs(os.path.dirname(args.report), exist_ok=True)
    with open(args.report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
