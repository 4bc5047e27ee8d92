"""PyTorch operators dispatched per stage-2 iteration of the SDXL training script, at tiny size on CPU.

The script (`examples/train_disback/train_disback_sdxl.py`) is driven only through its command-line flags: it is run
as a program in-process (`runpy.run_path(..., run_name="__main__")` with `sys.argv` set), so the count stays valid
however the script is restructured. For each mode:

1. a tiny teacher (`diffusers_disback.testing.save_tiny_teacher`) and one stage-1 run (`--stage degradation`, 4 steps,
   a node every 2) give a degradation path (one per `--mixed_precision`, shared by the modes that use it);
2. stage 2 alone (`--stage backtracking --path_dir ...`, a fresh `--output_dir` each time) runs twice, with
   `--max_train_steps A` and `--max_train_steps B`, each under `torch.profiler.profile(activities=[CPU])`;
3. per-iteration figures are `(count_B - count_A) / (B - A)`: model loading, the optimiser setup, the checkpoint at
   the end and the final pipeline save are the same in both runs and cancel out.

Counted: every profiler event whose name starts with `aten::` (nested ones included, so an `aten::_to_copy` and the
`aten::copy_` it calls are two), `aten::copy_` and `aten::_to_copy`. The wall time per iteration comes from the same
difference, measured under the profiler: it is noisy and inflated, read it as a rough figure only. The aten ops and
`_to_copy`s are also split by where they run: inside the optimiser's step (`Optimizer.step#...` profiler ranges),
inside the backward passes (`autograd::engine::evaluate_function` ranges), or elsewhere. On CPU torch's AdamW runs
its for-loop implementation (a handful of ops per parameter tensor, several of them casting a Python scalar with
`_to_copy`); on CUDA it defaults to the `foreach` one, so the optimiser's share here overstates a GPU's. With
`--fake_score_update_ratio 2` and `--backtrack_interval 2` on a 2-node path the target reaches the teacher after 2
iterations, so with A >= 2 the difference covers steady-state iterations only (half of them with a generator update).

    python benchmarks/launches.py                                    # modes no, bf16, bf16-lora; one thread
    python benchmarks/launches.py --modes bf16 --label after --output /tmp/launches.md
    python benchmarks/launches.py --steps 4 12 --threads 2

Results go to a `<!-- LABEL -->...<!-- /LABEL -->` section of `--output` (default `benchmarks/results/launches.md`),
replaced if present, with a table (mode | aten ops / iteration | copy_ / iteration | _to_copy / iteration |
s / iteration), the split by region and the most frequent aten ops per iteration of each mode. It measures the
script next to this file with the `diffusers_disback` Python imports (the editable install); to measure a git
worktree's own library, run it there with `PYTHONPATH=src`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import runpy
import subprocess
import sys
import tempfile
import time

import torch
from common import write_section

import diffusers_disback
from diffusers_disback.testing import save_tiny_teacher

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
PROMPTS = os.path.join(ROOT, "examples", "train_disback", "data", "demo_prompts.txt")
RESULTS = os.path.join(HERE, "results", "launches.md")

# mode name -> (--mixed_precision, extra stage-2 flags)
MODES = {
    "no": ("no", []),
    "bf16": ("bf16", []),
    "bf16-lora": ("bf16", ["--lora_rank", "4"]),
}
COMMON = [
    "--resolution", "64", "--train_batch_size", "2", "--train_data_files", PROMPTS, "--shuffle_buffer", "4",
    "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "1000", "--learning_rate", "1e-4",
    "--lr_warmup_steps", "0",
]  # fmt: skip
STAGE1 = ["--stage", "degradation", "--degradation_steps", "4", "--path_interval", "2"]
STAGE2 = ["--stage", "backtracking", "--fake_score_update_ratio", "2", "--backtrack_interval", "2"]
COUNTED = ("aten::copy_", "aten::_to_copy")
REGIONS = ("optimizer", "backward", "forward")


def run_script(argv: list[str]) -> None:
    """One in-process run of the script as a program (`python SCRIPT argv...`), with accelerate's singletons reset so
    the next run may change the precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    saved = sys.argv
    sys.argv = [SCRIPT, *argv]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = saved
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def profiled(argv: list[str]) -> tuple[collections.Counter, float]:
    """aten op counts (by name) and wall seconds of one profiled run of the script."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_script(argv)
        wall = time.perf_counter() - start
    counts = collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})
    region = {}  # id(event) -> region, memoised along each chain of parents
    for e in prof.events():
        if e.name.startswith("aten::"):
            where = region_of(e, region)
            counts[(where, "aten")] += 1
            if e.name in COUNTED:
                counts[(where, e.name)] += 1
    return counts, wall


def region_of(event, memo: dict) -> str:
    """ "optimizer", "backward" or "forward": the innermost enclosing optimiser step or autograd node, if any."""
    chain, e, found = [], event, "forward"
    while e is not None:
        if id(e) in memo:
            found = memo[id(e)]
            break
        if e.name.startswith("Optimizer.step"):
            found = "optimizer"
            break
        if e.name.startswith("autograd::engine::evaluate_function"):
            found = "backward"
            break
        chain.append(e)
        e = e.cpu_parent
    for c in chain:
        memo[id(c)] = found
    return found


def measure(teacher: str, work: str, mode: str, steps: tuple[int, int], paths: dict) -> dict:
    precision, extra = MODES[mode]
    base = ["--pretrained_teacher_model", teacher, *COMMON, "--mixed_precision", precision]
    if precision not in paths:  # stage 1 once per precision
        out = os.path.join(work, f"stage1-{precision}")
        run_script([*base, "--output_dir", out, *STAGE1])
        paths[precision] = os.path.join(out, "path")
    runs = []
    for n in steps:
        out = os.path.join(work, f"stage2-{mode}-{n}")
        argv = [*base, "--output_dir", out, *STAGE2, "--path_dir", paths[precision], "--max_train_steps", str(n)]
        argv += extra
        counts, wall = profiled(argv)
        total = sum(v for k, v in counts.items() if isinstance(k, str))
        print(f"[launches] {mode} max_train_steps={n}: {total} aten ops, {wall:.1f} s", flush=True)
        runs.append((counts, wall))
    (ca, wa), (cb, wb) = runs
    iters = steps[1] - steps[0]
    per = {k: (cb[k] - ca[k]) / iters for k in set(ca) | set(cb)}
    ops = {k: v for k, v in per.items() if isinstance(k, str)}
    return {
        "aten": sum(ops.values()),
        **{k: ops.get(k, 0.0) for k in COUNTED},
        "seconds": (wb - wa) / iters,
        "per_op": ops,
        "regions": {k: v for k, v in per.items() if isinstance(k, tuple)},
    }


def commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return "unknown"


def render(label: str, results: dict, steps: tuple[int, int], threads: int, top: int) -> str:
    a, b = steps
    lines = [
        f"### {label}",
        "",
        f"Commit {commit()}, torch {torch.__version__}, CPU, {threads} thread(s); tiny SDXL teacher, resolution 64, "
        f"batch 2, r = 2, K2 = 2; per iteration = (run with --max_train_steps {b} - run with {a}) / {b - a}. "
        "Wall time measured under the profiler: noisy.",
        "",
        "| mode | aten ops / iteration | copy_ / iteration | _to_copy / iteration | s / iteration |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['aten']:.1f} | {r['aten::copy_']:.1f} | {r['aten::_to_copy']:.1f} | {r['seconds']:.3f} |"
        )
    lines += [
        "",
        "Where (per iteration; aten ops / _to_copy): the optimiser's step (`Optimizer.step#...`), the backward passes "
        "(`autograd::engine::evaluate_function`), and the rest (forward passes, losses, data, logging).",
        "",
        "| mode | optimizer.step | backward | forward and other |",
        "|---|---:|---:|---:|",
    ]
    for mode, r in results.items():
        g = r["regions"]
        cells = [f"{g.get((w, 'aten'), 0.0):.1f} / {g.get((w, 'aten::_to_copy'), 0.0):.1f}" for w in REGIONS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for mode, r in results.items():
        ranked = sorted(r["per_op"].items(), key=lambda kv: -kv[1])[:top]
        lines += ["", f"Top {top} aten ops / iteration, {mode}: " + ", ".join(f"`{k}` {v:.1f}" for k, v in ranked)]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--label", default="before")
    p.add_argument("--steps", nargs=2, type=int, default=[4, 12], metavar=("A", "B"), help="stage-2 iterations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=10, help="most frequent aten ops listed per mode")
    args = p.parse_args(argv)
    if not 2 <= args.steps[0] < args.steps[1]:
        p.error("--steps A B needs 2 <= A < B (the target reaches the teacher after 2 iterations)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"[launches] diffusers_disback from {diffusers_disback.__file__}, script {SCRIPT}", flush=True)
    results, paths = {}, {}
    with tempfile.TemporaryDirectory(prefix="launches-") as work:
        teacher = save_tiny_teacher(os.path.join(work, "teacher"))
        for mode in args.modes:
            results[mode] = measure(teacher, work, mode, tuple(args.steps), paths)
    text = render(args.label, results, tuple(args.steps), args.threads, args.top)
    write_section(args.label, text, args.output, "# Operators per stage-2 iteration (`benchmarks/launches.py`)")
    print(text)
    print(f"[launches] written to {args.output}")


if __name__ == "__main__":
    main()
