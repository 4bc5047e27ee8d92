#!/usr/bin/env python
"""DMD, DisBack with step-spaced and with distance-spaced nodes (the latter also with the adaptive switch rule), and
the warm control, in three regimes of initial mismatch, through the SDXL training script on the shapes teacher
(docs/benchmarks.md, "Three regimes").

    python benchmarks/path_regimes.py                                   # 4 methods x 3 seeds x 3 regimes
    python benchmarks/path_regimes.py --inits teacher --seeds 0 1 2     # one regime (runs can go in parallel:
    python benchmarks/path_regimes.py --inits weak --seeds 0 1 2        #   each run keeps its own run.json)
    python benchmarks/path_regimes.py --report_only                     # tables and plots of every finished run

Every finished run's record (its curve included) is merged into `benchmarks/results/path_regimes_runs.json`, so a
report covers the runs of earlier sessions and machines without their run folders; a regime with no record keeps its
table as it is.

Regimes (the generator's starting point; the teacher is always `examples/shapes/teacher`):

- `teacher`: the teacher's own UNet (as every earlier comparison);
- `weak`: the teacher's recipe stopped early (`examples/shapes/train_teacher.py --unet_steps 250`, the same VAE and
  text encoders, saved like the teacher): a real mid-sized mismatch;
- `random`: a freshly initialised UNet of the teacher's config, with a longer budget (`--random_train_steps`).

Every method runs the same script with the shapes recipe (`diffusers_disback.shapes.distill_arguments`), the same
stage-2 iterations and `--intermediate_cfg node` (the path profile's finding: unguided nodes sit next to the generator,
docs/method.md). Stage 1 runs once per seed and regime for each spacing (200 steps; step-spaced: a node every 50;
distance-spaced: 4 nodes kept of 15 candidates); the warm control reuses the step-spaced path, the adaptive arm the
distance-spaced one with `--backtrack_rule adaptive` (switch once half the DM distance is closed), and each method is
charged the stage 1 it used. The in-training evaluation scores the one-step generator on every caption of the world,
4 images each (576; a 0.05 difference in accuracy is ~2 standard errors), every 250 iterations; the final pipeline
is also judged through the evaluation API (FD to the teacher's 25-step samples).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

from common import read_section, write_section
from shapes_compare import FAMILIES, ROOT, curve, judge_final, random_generator, run_script, teacher_samples

from diffusers_disback.shapes import write_prompts

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("dmd", "disback", "disback_distance", "disback_adaptive", "warm")
NAMES = {"dmd": "DMD", "disback": "DisBack, step-spaced", "disback_distance": "DisBack, distance-spaced",
         "disback_adaptive": "DisBack, distance-spaced, adaptive switch", "warm": "warm control"}  # fmt: skip
# beyond the recipe: the adaptive rule switches once the generator closed half its DM distance to the node (at most
# every --backtrack_interval iterations)
METHOD_FLAGS = {"disback_adaptive": ["--backtrack_rule", "adaptive"]}
INITS = ("teacher", "weak", "random")
REGIME_TITLES = {
    "teacher": "generator initialised from the teacher",
    "weak": "from a weak model (the teacher's recipe stopped early)",
    "random": "from a random generator",
}
TITLE = "# Three regimes: DMD, DisBack (step- and distance-spaced) and the warm control"
STAGE1 = {  # spacing -> stage-1 flags beyond the recipe's (200 steps, a node every 50)
    "step": [],
    "distance": ["--num_path_nodes", "4", "--path_node_spacing", "distance"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=os.path.join(ROOT, "examples", "shapes", "teacher"))
    p.add_argument("--output_dir", default="path-regimes")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    p.add_argument("--max_train_steps", type=int, default=1500, help="stage-2 iterations, teacher and weak regimes")
    p.add_argument("--random_train_steps", type=int, default=6000, help="stage-2 iterations, random regime")
    p.add_argument("--weak_unet_steps", type=int, default=250, help="UNet steps of the weak model's recipe")
    p.add_argument("--eval_steps", type=int, default=250)
    p.add_argument("--random_eval_steps", type=int, default=500, help="--eval_steps of the random regime")
    p.add_argument("--eval_images_per_prompt", type=int, default=4)
    p.add_argument("--intermediate_cfg", default="node", choices=("none", "node", "teacher"))
    p.add_argument("--report_only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--report", default=os.path.join(HERE, "results", "path_regimes.md"))
    p.add_argument(
        "--records", default=os.path.join(HERE, "results", "path_regimes_runs.json"),
        help="every finished run's record (curve included), merged with OUTPUT's: a report needs no earlier run dirs",
    )  # fmt: skip
    p.add_argument("--plots", default=os.path.join(ROOT, "docs", "images"), help="path_regimes_<regime>.png go here")
    args = p.parse_args(argv)
    # shapes_compare's helpers (the script, the teacher's sampler, the final judge) read the family: SDXL here
    args.family, args.spec = "sdxl", FAMILIES["sdxl"]
    return args


def weak_generator(args) -> str:
    """The teacher's recipe stopped early, in `OUTPUT/weak` (trained once, ~10 min on one core; the teacher's VAE is
    reused, the text encoders are rebuilt from the same seed)."""
    folder = os.path.join(args.output_dir, "weak")
    if not os.path.isfile(os.path.join(folder, "unet", "config.json")):
        os.makedirs(folder, exist_ok=True)
        if not os.path.isdir(os.path.join(folder, "vae")):
            shutil.copytree(os.path.join(args.teacher, "vae"), os.path.join(folder, "vae"))
        script = os.path.join(ROOT, "examples", "shapes", "train_teacher.py")
        subprocess.run([sys.executable, script, "--output_dir", folder, "--unet_steps", str(args.weak_unet_steps)],
                       check=True)  # fmt: skip
    return folder


def steps_of(args, init: str) -> int:
    return args.random_train_steps if init == "random" else args.max_train_steps


def run_all(args) -> None:
    args.prompts = write_prompts(os.path.join(args.output_dir, "prompts.txt"), "train")
    teacher_images, teacher_metrics = teacher_samples(args)
    with open(os.path.join(args.output_dir, "teacher.json"), "w") as f:
        json.dump(teacher_metrics, f)
    for init in args.inits:
        for seed in args.seeds:
            common = ["--seed", str(seed), "--intermediate_cfg", args.intermediate_cfg]
            if init == "random":
                common += ["--pretrained_generator", random_generator(args, seed)]
            elif init == "weak":
                common += ["--pretrained_generator", weak_generator(args)]
            run_args = argparse.Namespace(**{**vars(args), "max_train_steps": steps_of(args, init)})
            stage1 = {}
            for spacing, flags in STAGE1.items():
                needed = {"step": {"disback", "warm"}, "distance": {"disback_distance", "disback_adaptive"}}[spacing]
                if needed & set(args.methods):
                    folder = os.path.join(args.output_dir, f"{init}-s{seed}-stage1-{spacing}")
                    seconds = run_script(run_args, folder, [*common, "--stage", "degradation", *flags])
                    stage1[spacing] = (folder, seconds)
            for method in args.methods:
                run_dir = os.path.join(args.output_dir, f"{init}-s{seed}-{method}")
                if os.path.exists(os.path.join(run_dir, "run.json")):
                    continue
                script_method = "disback" if method.startswith("disback") else method
                extra = [*common, "--stage", "backtracking", "--method", script_method,
                         "--eval_steps", str(args.random_eval_steps if init == "random" else args.eval_steps),
                         "--eval_dataset", "shapes",
                         "--eval_images_per_prompt", str(args.eval_images_per_prompt), *METHOD_FLAGS.get(method, [])]  # fmt: skip
                spacing = "distance" if method in ("disback_distance", "disback_adaptive") else "step"
                if method != "dmd":
                    extra += ["--path_dir", os.path.join(stage1[spacing][0], "path")]
                stage2 = run_script(run_args, run_dir, extra)
                manifest = {}
                if method != "dmd":
                    with open(os.path.join(stage1[spacing][0], "path", "path_manifest.json")) as f:
                        manifest = json.load(f)
                record = {
                    "init": init, "seed": seed, "method": method,
                    "stage1_steps": 0 if method == "dmd" else 200, "stage2_iterations": steps_of(args, init),
                    "stage1_seconds": 0.0 if method == "dmd" else stage1[spacing][1], "stage2_seconds": stage2,
                    "node_steps": [n["step"] for n in manifest.get("nodes", [])[1:]],
                    "gap_ratio": (manifest.get("profile") or {}).get("gap_ratio"),
                    "final": judge_final(args, run_dir, teacher_images), "curve": curve(run_dir),
                }  # fmt: skip
                with open(os.path.join(run_dir, "run.json"), "w") as f:
                    json.dump(record, f, indent=2)
                print(f"{init} seed {seed} {method}: final accuracy {record['curve'][-1]['eval/shapes_accuracy']:.3f}",
                      flush=True)  # fmt: skip


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def first_reaching(run: dict, level: float) -> int | None:
    """The first evaluated stage-2 iteration whose accuracy is >= `level`."""
    return next((p["stage_step"] for p in run["curve"] if p["eval/shapes_accuracy"] >= level), None)


def load_records(args) -> list[dict]:
    """The committed records (`--records`), replaced by any run of OUTPUT with the same regime, seed and method; the
    merged list is written back, so runs of later sessions add to the comparison."""
    merged = {}
    if os.path.isfile(args.records):
        with open(args.records) as f:
            merged = {(r["init"], r["seed"], r["method"]): r for r in json.load(f)}
    for file in sorted(glob.glob(os.path.join(args.output_dir, "*", "run.json"))):
        with open(file) as f:
            r = json.load(f)
        merged[(r["init"], r["seed"], r["method"])] = r
    runs = [merged[k] for k in sorted(merged, key=lambda k: (INITS.index(k[0]), k[1], METHODS.index(k[2])))]
    os.makedirs(os.path.dirname(os.path.abspath(args.records)), exist_ok=True)
    with open(args.records, "w") as f:
        json.dump(runs, f, indent=1)
    return runs


def report(args) -> None:
    runs = load_records(args)
    teacher_file = os.path.join(args.output_dir, "teacher.json")
    if os.path.isfile(teacher_file):
        with open(teacher_file) as f:
            teacher = json.load(f)
        intro = (
            f"Teacher (25 Euler steps, CFG 5): all-attribute accuracy {teacher['shapes_accuracy']:.3f}. One-step "
            f"accuracy from the in-training evaluation ({args.eval_images_per_prompt} images per caption, every "
            "caption); mean ± sd over seeds; wall times of whole script invocations on the 2-core CPU machine (runs in "
            "parallel, one thread each). `--intermediate_cfg " + args.intermediate_cfg + "`."
        )
        write_section("summary", intro, args.report, TITLE)
    teacher_accuracy = float(re.search(r"accuracy (\d+\.\d+)", read_section(args.report, "summary"))[1])
    for init in INITS:
        rs_init = [r for r in runs if r["init"] == init]
        if rs_init:  # a regime without records keeps its section as it is
            table = regime_table(init, rs_init, 0.5 * teacher_accuracy)
            write_section(f"regime-{init}", table, args.report, TITLE)
            print(table)
            plot(args, init, rs_init, 0.5 * teacher_accuracy)


def regime_table(init: str, rs_init: list[dict], half: float) -> str:
    """One regime's table; the accuracy on the way is read at a third and two thirds of the stage-2 budget."""
    budget = max(r["stage2_iterations"] for r in rs_init)
    marks = (budget // 3, 2 * budget // 3)
    lines = [f"### Regime: {REGIME_TITLES[init]}", "",
             f"| method | seeds | stage-1 steps + stage-2 iterations | final accuracy | at {marks[0]:,} | at "
             f"{marks[1]:,} | first "
             f"≥ {half:.2f} (iteration) | held-out captions (final, API) | FD to teacher (API) | wall time "
             "stage 1 + stage 2 (s) | node steps (seed 0) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for method in METHODS:
        rs = sorted((r for r in rs_init if r["method"] == method), key=lambda r: r["seed"])
        if not rs:
            continue

        def at(step, rs=rs):
            vals = [p["eval/shapes_accuracy"] for r in rs for p in r["curve"] if p["stage_step"] == step]
            return _mean_sd(vals) if vals else ""

        reach = [first_reaching(r, half) for r in rs]
        reach_s = ", ".join("–" if x is None else f"{x:,}" for x in reach)
        lines.append(
            f"| {NAMES[method]} | {len(rs)} | {rs[0]['stage1_steps']} + {rs[0]['stage2_iterations']:,} "
            f"| {_mean_sd([r['curve'][-1]['eval/shapes_accuracy'] for r in rs])} | {at(marks[0])} | {at(marks[1])} "
            f"| {reach_s} | {_mean_sd([r['final']['shapes_accuracy_held_out_captions'] for r in rs])} "
            f"| {_mean_sd([r['final']['shapes_fd'] for r in rs], 1)} "
            f"| {statistics.mean(r['stage1_seconds'] for r in rs):.0f} + "
            f"{statistics.mean(r['stage2_seconds'] for r in rs):.0f} | {rs[0]['node_steps'] or '–'} |"
        )
    return "\n".join(lines)


def plot(args, init: str, runs: list[dict], half: float) -> None:
    """`docs/images/path_regimes_<init>.png`: one-step accuracy during stage 2, every seed and method (dotted: half
    the teacher's accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colours = {"dmd": "tab:blue", "disback": "tab:red", "disback_distance": "tab:purple",
               "disback_adaptive": "tab:orange", "warm": "tab:green"}  # fmt: skip
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        for i, r in enumerate(rs):
            xs = [p["stage_step"] for p in r["curve"]]
            ys = [p["eval/shapes_accuracy"] for p in r["curve"]]
            ax.plot(xs, ys, color=colours[method], alpha=0.7, lw=1.2, label=NAMES[method] if i == 0 else None)
    ax.axhline(half, color="0.5", ls=":", lw=1, label="half the teacher")
    ax.set_title(REGIME_TITLES[init], fontsize=10)
    ax.set_xlabel("stage-2 iteration")
    ax.set_ylabel("one-step all-attribute accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.plots, exist_ok=True)
    fig.savefig(os.path.join(args.plots, f"path_regimes_{init}.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.report_only:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
