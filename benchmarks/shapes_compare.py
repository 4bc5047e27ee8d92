#!/usr/bin/env python
"""DMD, DisBack and the warm control through the training script on a shapes teacher: seeds x initialisations,
with accuracy curves over iterations and wall time with stage 1 counted.

    python benchmarks/shapes_compare.py                                  # 3 methods x 3 seeds x 2 inits (~90 min, 2 cores)
    python benchmarks/shapes_compare.py --seeds 0 --inits teacher        # one seed, teacher-initialised
    python benchmarks/shapes_compare.py --family sd3 --inits teacher     # the flow-matching (SD3-architecture) teacher

`--family sd3` runs `train_disback_sd3.py` on the SD3-architecture shapes teacher (`examples/shapes/teacher_sd3`,
`examples/shapes/train_teacher_sd3.py`) with the same recipe, sampled from sigma = 1 (`--conditioning_timestep
1000`) and with the 8 (zero) T5 tokens the teacher was trained with; its teacher is judged at 28 Euler steps.

Every run is `examples/train_disback/train_disback_sdxl.py` (or `_sd3.py`), unchanged, with the shapes recipe
(`diffusers_disback.shapes.distill_arguments`, docs/tutorial_shapes.md). Per seed and initialisation:

1. stage 1 once (`--stage degradation`, 200 steps, a node every 50): DisBack's path, which the warm control reuses
   (the same cost is charged to both);
2. stage 2 for each method (`--stage backtracking`; DMD reads no path), with `--eval_steps` scoring the one-step
   generator on every caption of the world with the shapes judge (the curve: `OUTPUT/<run>/eval/metrics.jsonl`);
3. the final pipeline through the evaluation API (`evaluate(..., get_protocol("shapes"))`, what `disback evaluate
   --protocol shapes` runs): all-attribute accuracy on all, training and held-out captions, and the Fréchet distance
   in the judge's features to the teacher's own samples (25 Euler steps, CFG 5, the same seeds).

"random" initialises the generator as a freshly initialised UNet of the teacher's config (`torch.manual_seed(seed)`).
Finished runs are kept and skipped on a rerun. Writes `OUTPUT/results.json`, a markdown report (`--report`) and a
plot of the curves (`--plot`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import write_section

from diffusers_disback.shapes import SHOWCASE_CAPTIONS, distill_arguments, write_prompts

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
METHODS = ("dmd", "disback", "warm")
# what differs per teacher family: the script, the teacher, the flags the recipe needs on top, the teacher's steps
FAMILIES = {
    "sdxl": {
        "script": "train_disback_sdxl.py", "teacher": "teacher", "extra": {}, "teacher_steps": 25, "call": {},
        "name": "SDXL", "suffix": "",
    },
    "sd3": {
        "script": "train_disback_sd3.py", "teacher": "teacher_sd3",
        "extra": {"conditioning_timestep": 1000, "max_sequence_length": 8}, "teacher_steps": 28,
        "call": {"max_sequence_length": 8}, "name": "SD3", "suffix": "_sd3",
    },
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    p.add_argument("--teacher", default=None, help="default: the family's committed shapes teacher")
    p.add_argument("--output_dir", default=None, help="default: shapes-compare (sd3: shapes-compare-sd3)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--inits", nargs="+", choices=["teacher", "random"], default=["teacher", "random"])
    p.add_argument("--max_train_steps", type=int, default=1500)
    p.add_argument("--eval_steps", type=int, default=250)
    p.add_argument("--report", default=None, help="default: results/shapes_compare{,_sd3}.md")
    p.add_argument("--plot", default=None, help="default: docs/images/shapes_curves{,_sd3}.png")
    p.add_argument(
        "--merge_from", nargs="+", default=None, metavar="DIR",
        help="only write the report, from the results.json of these output folders (runs split across processes)",
    )  # fmt: skip
    args = p.parse_args(argv)
    fam = args.spec = FAMILIES[args.family]
    args.teacher = args.teacher or os.path.join(ROOT, "examples", "shapes", fam["teacher"])
    args.output_dir = args.output_dir or "shapes-compare" + fam["suffix"].replace("_", "-")
    args.report = args.report or os.path.join(HERE, "results", f"shapes_compare{fam['suffix']}.md")
    args.plot = args.plot or os.path.join(ROOT, "docs", "images", f"shapes_curves{fam['suffix']}.png")
    return args


def run_script(args, out: str, extra: list[str]) -> float:
    """One invocation of the training script; returns its wall time (kept in OUT/wall.json so reruns skip it)."""
    marker = os.path.join(out, "wall.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return json.load(f)["seconds"]
    script = os.path.join(ROOT, "examples", "train_disback", args.spec["script"])
    recipe = distill_arguments(max_train_steps=args.max_train_steps, report_to="none", **args.spec["extra"])
    cmd = [sys.executable, script, "--pretrained_teacher_model", args.teacher, "--output_dir", out,
           "--train_data_files", args.prompts, "--validation_prompts", *SHOWCASE_CAPTIONS[:4], *recipe,
           *extra]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    with open(marker, "w") as f:
        json.dump({"seconds": seconds, "command": cmd}, f)
    return seconds


def random_generator(args, seed: int) -> str:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls, sub = (SD3Transformer2DModel, "transformer") if args.family == "sd3" else (UNet2DConditionModel, "unet")
    folder = os.path.join(args.output_dir, f"random-{sub}-{seed}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        config = cls.load_config(args.teacher, subfolder=sub)
        torch.manual_seed(seed)
        cls.from_config(config).save_pretrained(folder)
    return folder


def judge_final(args, run_dir: str, teacher_images: str) -> dict:
    from diffusers_disback import DisBackPipeline, DisBackSD3Pipeline
    from diffusers_disback.evaluation import CaptionSet, ReferenceImages, evaluate, get_protocol

    cls = DisBackSD3Pipeline if args.family == "sd3" else DisBackPipeline
    pipe = cls.from_pretrained(os.path.join(run_dir, "final"))
    record = evaluate(
        pipe, CaptionSet.from_shapes(), os.path.join(run_dir, "judge"), get_protocol("shapes"),
        reference=ReferenceImages.from_folder(teacher_images), progress=False, **args.spec["call"],
    )  # fmt: skip
    return record["metrics"]


def teacher_samples(args) -> tuple[str, dict]:
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from diffusers_disback.evaluation import CaptionSet, evaluate, get_protocol

    out = os.path.join(args.output_dir, "teacher")
    protocol = get_protocol("shapes").replace(num_inference_steps=args.spec["teacher_steps"], guidance_scale=5.0)
    if args.family == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(args.teacher, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(args.teacher, torch_dtype=torch.float32)
    record = evaluate(pipe, CaptionSet.from_shapes(), out, protocol, progress=False, **args.spec["call"])
    return os.path.join(out, "images"), record["metrics"]


def curve(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "eval", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    last = {}
    for r in records:  # a resumed run may repeat a step: keep the last
        last[r["stage_step"]] = r
    return [last[k] for k in sorted(last)]


def merge_report(args) -> None:
    """The report of runs made by several invocations (e.g. one seed per core), read from their results.json."""
    teacher, runs = None, []
    for folder in args.merge_from:
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        teacher = teacher or results["teacher"]
        runs += results["runs"]
    args.seeds = sorted({r["seed"] for r in runs})
    write_report(args, teacher, runs)


def main(argv=None):
    args = parse_args(argv)
    if args.merge_from:
        return merge_report(args)
    os.makedirs(args.output_dir, exist_ok=True)
    args.prompts = write_prompts(os.path.join(args.output_dir, "prompts.txt"), "train")
    teacher_images, teacher_metrics = teacher_samples(args)
    print(f"teacher ({args.spec['teacher_steps']} steps, CFG 5): {teacher_metrics}", flush=True)
    runs = []
    for init in args.inits:
        for seed in args.seeds:
            common = ["--seed", str(seed)]
            if init == "random":
                common += ["--pretrained_generator", random_generator(args, seed)]
            stage1_dir = os.path.join(args.output_dir, f"{init}-s{seed}-stage1")
            stage1 = 0.0
            if {"disback", "warm"} & set(args.methods):
                stage1 = run_script(args, stage1_dir, [*common, "--stage", "degradation", "--method", "disback"])
            for method in args.methods:
                run_dir = os.path.join(args.output_dir, f"{init}-s{seed}-{method}")
                extra = [*common, "--stage", "backtracking", "--method", method, "--eval_steps", str(args.eval_steps),
                         "--eval_dataset", "shapes"]  # fmt: skip
                if method != "dmd":
                    extra += ["--path_dir", os.path.join(stage1_dir, "path")]
                stage2 = run_script(args, run_dir, extra)
                final = judge_final(args, run_dir, teacher_images)
                runs.append(
                    {
                        "init": init, "seed": seed, "method": method,
                        "stage1_steps": 0 if method == "dmd" else 200, "stage2_iterations": args.max_train_steps,
                        "stage1_seconds": 0.0 if method == "dmd" else stage1, "stage2_seconds": stage2,
                        "final": final, "curve": curve(run_dir),
                    }
                )  # fmt: skip
                print(f"{init} seed {seed} {method}: accuracy {final['shapes_accuracy']:.3f}", flush=True)
                with open(os.path.join(args.output_dir, "results.json"), "w") as f:
                    json.dump({"teacher": teacher_metrics, "runs": runs}, f, indent=2)
    write_report(args, teacher_metrics, runs)


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _groups(args, runs: list[dict]):
    """`(init, method, runs)` for each initialisation and method that has runs, in the arguments' order."""
    for init in args.inits:
        for method in args.methods:
            rs = [r for r in runs if r["init"] == init and r["method"] == method]
            if rs:
                yield init, method, rs


def _curve_table(args, runs: list[dict], name=str, step="{}".format) -> list[str]:
    """The in-training all-attribute accuracy, mean over seeds, by stage-2 iteration."""
    steps = sorted({p["stage_step"] for r in runs for p in r["curve"]})
    lines = ["| init | method | " + " | ".join(step(s) for s in steps) + " |"]
    lines.append("| --- | --- | " + " | ".join("---:" for _ in steps) + " |")
    for init, method, rs in _groups(args, runs):
        cells = []
        for s in steps:
            vals = [p["eval/shapes_accuracy"] for r in rs for p in r["curve"] if p["stage_step"] == s]
            cells.append(f"{statistics.mean(vals):.3f}" if vals else "")
        lines.append(f"| {init} | {name(method)} | " + " | ".join(cells) + " |")
    return lines


def write_report(args, teacher: dict, runs: list[dict]) -> None:
    """The full tables (section `record` of `--report`) and the summary that docs/benchmarks.md shows (`summary`)."""
    lines = [
        f"`python benchmarks/shapes_compare.py{'' if args.family == 'sdxl' else ' --family ' + args.family} "
        f"--seeds {' '.join(map(str, args.seeds))} --inits {' '.join(args.inits)}`"
        f" — {args.max_train_steps} stage-2 iterations; mean ± sd over seeds; wall times of the whole invocation "
        "(model loading included, in-training evaluation included in stage 2), measured in this run.",
        "",
        f"Teacher ({args.spec['teacher_steps']} Euler steps, CFG 5): all-attribute accuracy {teacher['shapes_accuracy']:.3f} (training "
        f"captions {teacher['shapes_accuracy_training_captions']:.3f}, held-out "
        f"{teacher['shapes_accuracy_held_out_captions']:.3f}).",
        "",
        "| init | method | seeds | stage-1 steps + stage-2 iterations | all-attribute accuracy | training captions "
        "| held-out captions | FD to the teacher (judge features) | wall time, stage 1 + stage 2 (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for init, method, rs in _groups(args, runs):
        f = [r["final"] for r in rs]
        walls = [r["stage1_seconds"] + r["stage2_seconds"] for r in rs]
        lines.append(
            f"| {init} | {method} | {len(rs)} | {rs[0]['stage1_steps']} + {rs[0]['stage2_iterations']} "
            f"| {_mean_sd([x['shapes_accuracy'] for x in f])} "
            f"| {_mean_sd([x['shapes_accuracy_training_captions'] for x in f])} "
            f"| {_mean_sd([x['shapes_accuracy_held_out_captions'] for x in f])} "
            f"| {_mean_sd([x['shapes_fd'] for x in f], 1)} "
            f"| {statistics.mean(r['stage1_seconds'] for r in rs):.0f} + "
            f"{statistics.mean(r['stage2_seconds'] for r in rs):.0f} = {statistics.mean(walls):.0f} |"
        )
    lines += ["", "Curves: one-step all-attribute accuracy (every caption, the in-training evaluation), mean over "
              "seeds, by stage-2 iteration.", "", *_curve_table(args, runs)]  # fmt: skip
    title = f"# Shapes: DMD, DisBack and the warm control through the {args.spec['name']} script"
    write_section("record", "\n".join(lines), args.report, title)
    write_section("summary", summary(args, teacher, runs), args.report, title)
    print("\n".join(lines))
    plot(args, runs)


NAMES = {"dmd": "DMD", "disback": "DisBack", "warm": "warm control"}


def summary(args, teacher: dict, runs: list[dict]) -> str:
    """Final numbers (means; ± sd of the all-attribute accuracy) next to the teacher's and the undistilled
    generator's, and the curves."""
    mean = statistics.mean
    t = [teacher[f"shapes_accuracy{k}"] for k in ("", "_training_captions", "_held_out_captions")]
    lines = [
        "| init | method | stage-1 steps + stage-2 iterations | all-attribute accuracy (mean ± sd, "
        f"{len(args.seeds)} seeds) | training captions | held-out captions | FD to the teacher | wall time, stage 1 + "
        "stage 2 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| – | teacher, {args.spec['teacher_steps']} steps, CFG 5 | – | {t[0]:.3f} | {t[1]:.3f} | {t[2]:.3f} | – | – |",
    ]
    for init, method, rs in _groups(args, runs):
        if init == "teacher" and method == args.methods[0]:
            before = mean(r["curve"][0]["eval/shapes_accuracy"] for r in runs if r["init"] == "teacher")
            lines.append(f"| teacher | (no training: the teacher in one step) | 0 | {before:.3f} | | | | |")
        f = [r["final"] for r in rs]
        s1, s2 = mean(r["stage1_seconds"] for r in rs), mean(r["stage2_seconds"] for r in rs)
        lines.append(
            f"| {init} | {NAMES[method]} | {rs[0]['stage1_steps']} + {rs[0]['stage2_iterations']:,} "
            f"| {_mean_sd([x['shapes_accuracy'] for x in f])} "
            f"| {mean(x['shapes_accuracy_training_captions'] for x in f):.3f} "
            f"| {mean(x['shapes_accuracy_held_out_captions'] for x in f):.3f} | {mean(x['shapes_fd'] for x in f):.1f} "
            f"| {s1:.0f} + {s2:.0f} s = {mean(r['stage1_seconds'] + r['stage2_seconds'] for r in rs):.0f} s |"
        )
    lines += ["", f"One-step all-attribute accuracy during stage 2 (mean of {len(args.seeds)} seeds; the script's "
              "in-training evaluation):", "", *_curve_table(args, runs, NAMES.get, "{:,}".format)]  # fmt: skip
    return "\n".join(lines)


def plot(args, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.inits), figsize=(5 * len(args.inits), 3.6), squeeze=False)
    colours = {"dmd": "tab:blue", "disback": "tab:red", "warm": "tab:green"}
    for ax, init in zip(axes[0], args.inits):
        for method in args.methods:
            for i, r in enumerate(x for x in runs if x["init"] == init and x["method"] == method):
                xs = [p["stage_step"] for p in r["curve"]]
                ys = [p["eval/shapes_accuracy"] for p in r["curve"]]
                ax.plot(xs, ys, color=colours[method], alpha=0.8, label=method if i == 0 else None)
        ax.set_title(f"generator initialised from the {init}" if init == "teacher" else "random generator")
        ax.set_xlabel("stage-2 iteration")
        ax.set_ylabel("one-step all-attribute accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()
