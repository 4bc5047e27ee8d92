"""DMD vs DisBack vs the warm control on 2-D Gaussian mixtures: how fast a one-step generator reaches the teacher.

A teacher (`EpsMLP`, eps prediction, SDXL's DDPM schedule) is trained on 8 Gaussians on a ring or a 5x5 grid (unit std
per dimension) and distilled by the three methods of `common.py`, from the teacher or from scratch. Every
`eval_steps` iterations the generator's samples (fixed noise) are compared with the teacher's 50-step DDIM samples:
`swd`, the sliced Wasserstein-1 distance (lower is better; "final" = its last 2 evaluations); `coverage`, the share
of modes given at least a quarter of their fair share (1/4K) of the samples within 3 component stds; `off_mode`, the
share of samples farther than 3 stds from every mode.

    python benchmarks/toy2d.py --quick      # ~30 s: checks the machinery (used by the test suite), writes nothing
    python benchmarks/toy2d.py --lr_scan    # DMD only, a few learning rates: how the frozen LR was chosen
    python benchmarks/toy2d.py              # the record: 2 datasets x 2 generator inits x 3 methods x 3 seeds
    python benchmarks/toy2d.py --sweep      # DisBack's knobs (nodes, interval, fake init, LoRA, spacing, rule)

Teachers are cached in `benchmarks/.cache/`; tables go to `benchmarks/results/toy2d.md` (the record's summary also to
docs/benchmarks.md), PNGs to `docs/images/toy2d_*.png`.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, replace

import common
import torch
from common import HERE, METHODS, EpsMLP, Mode

from diffusers_disback.distill import NoiseSchedule, Score

RESULTS = os.path.join(HERE, "results", "toy2d.md")
IMAGES = os.path.join(HERE, "..", "docs", "images")
LR = 3e-4  # chosen by `--lr_scan` on DMD alone (the "Learning rate" section of the results), frozen for all methods
NAMES = {"8gaussians": "8 Gaussians", "grid": "grid"}


def _mode(*, datasets, inits, seeds, teacher_steps, hidden, num_eval, lr=LR, batch=128, **distill) -> Mode:
    """A mode in the record's terms: one learning rate for the three optimisers, the rest `DistillConfig`'s."""
    lrs = dict(learning_rate=lr, fake_learning_rate=lr, degradation_learning_rate=lr)
    data = dict(teacher_steps=teacher_steps, hidden=hidden, num_eval=num_eval)
    return Mode(tuple(range(seeds)), inits, {**lrs, "train_batch_size": batch, **distill}, data, datasets)


# generator updates = max_train_steps / 5: quick 60, record 300, sweep 120; target switches every 10, 25, 10 of them
QUICK = _mode(
    datasets=("8gaussians",), inits=("scratch",), seeds=2, teacher_steps=800, hidden=64, num_eval=1000, lr=1e-3,
    batch=64, max_train_steps=300, eval_steps=100, degradation_steps=40, num_path_nodes=3, backtrack_interval=50,
)  # fmt: skip
FULL = _mode(
    datasets=("8gaussians", "grid"), inits=("teacher", "scratch"), seeds=3, teacher_steps=4000, hidden=128,
    num_eval=2000, max_train_steps=1500, eval_steps=75, degradation_steps=300, num_path_nodes=5, backtrack_interval=125,
)  # fmt: skip
SWEEP = _mode(
    datasets=("8gaussians",), inits=("teacher", "scratch"), seeds=3, teacher_steps=4000, hidden=128, num_eval=2000,
    max_train_steps=600, eval_steps=50, degradation_steps=150, num_path_nodes=5, backtrack_interval=50,
)  # fmt: skip


@dataclass
class Mixture:
    name: str
    means: torch.Tensor  # (K, 2), normalised
    std: float  # per-component std, normalised
    data: torch.Tensor  # (n, 2), normalised


def make_mixture(name: str, n: int = 20000, seed: int = 0) -> Mixture:
    """8 Gaussians on a ring of radius 2 (std 0.1), or a 5x5 grid with spacing 1 (std 0.1); unit std per dim."""
    if name == "8gaussians":
        angles = torch.arange(8) * (2 * math.pi / 8)
        means, std = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1), 0.1
    elif name == "grid":
        axis = torch.arange(-2.0, 3.0)
        means, std = torch.cartesian_prod(axis, axis), 0.1
    else:
        raise ValueError(f"dataset must be '8gaussians' or 'grid', got {name!r}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, means.shape[0], (n,), generator=g)
    data = means[idx] + std * torch.randn(n, 2, generator=g)
    scale = data.std(dim=0)  # per-dimension; both mixtures are symmetric, so the two scales agree to ~1%
    return Mixture(name, means / scale, std / float(scale.mean()), data / scale)


def mode_stats(x: torch.Tensor, mix: Mixture) -> dict[str, float]:
    """Mode coverage (modes with >= 1/(4K) of the samples within 3 std) and the off-mode fraction."""
    nearest = torch.cdist(x.float(), mix.means).min(dim=1)
    near = nearest.values <= 3 * mix.std
    k = mix.means.shape[0]
    counts = torch.bincount(nearest.indices[near], minlength=k).float() / x.shape[0]
    return {"coverage": float((counts >= 0.25 / k).float().mean()), "off_mode": float(1 - near.float().mean())}


class Task:
    """A mixture, its teacher and the evaluation against the teacher's DDIM samples (the harness's dataset plug)."""

    main, final_last = "swd", 2
    metrics = (("swd", "SWD", "{:.3f}"), ("coverage", "coverage", "{:.2f}"), ("off_mode", "off-mode", "{:.3f}"))
    summary_metrics = (("swd", "SWD", "{:.3f}"),)

    def __init__(self, name: str, *, teacher_steps: int, hidden: int, num_eval: int, cache: bool):
        self.mix, self.name, self.schedule = make_mixture(name), name, NoiseSchedule.ddpm()

        def build():
            return common.train_teacher(self.mix.data, None, self.schedule, steps=teacher_steps, hidden=hidden)

        config = {"dataset": name, "hidden": hidden, "steps": teacher_steps, "lr": 2e-3, "batch": 512}
        self.teacher = common.cached(f"toy2d_teacher_{name}.pt", config, build, lambda: EpsMLP(2, hidden), cache)
        score, g = Score(self.teacher, self.schedule), torch.Generator().manual_seed(1234)
        self.reference = common.ddim_sample(score, torch.randn(num_eval, 2, generator=g), None, steps=50)
        second = common.ddim_sample(score, torch.randn(num_eval, 2, generator=g), None, steps=50)
        self.eval_noise = torch.randn(num_eval, 2, generator=g)
        self.floor = {  # what 'perfect' looks like
            "teacher vs teacher (new noise)": self.measure(second),
            "data vs teacher": {**self.measure(self.mix.data[:num_eval]), **mode_stats(self.mix.data, self.mix)},
        }

    def measure(self, x: torch.Tensor) -> dict:
        return {"swd": common.sliced_wasserstein(x, self.reference), **mode_stats(x, self.mix)}

    def evaluator(self, seed: int):
        def evaluate(sample) -> dict:
            evaluate.last = sample(self.eval_noise, None)
            return self.measure(evaluate.last)

        return evaluate

    def sample_cond(self, n: int, g: torch.Generator):
        return None

    def uncond(self, batch_size: int):
        return None


def floor_table(tasks: dict[str, Task]) -> str:
    rows = [[name, label, f"{m['swd']:.3f}", f"{m['coverage']:.2f}", f"{m['off_mode']:.3f}"]
            for name, t in tasks.items() for label, m in t.floor.items()]  # fmt: skip
    return common.markdown_table(["dataset", "samples", "SWD to teacher", "coverage", "off-mode"], rows)


def plot_samples(results: dict, tasks: dict[str, Task], file: str) -> None:
    """Final samples (seed 0): teacher, then each method; one row per (dataset, generator init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["teacher", *METHODS]
    fig, axes = plt.subplots(len(results), len(cols), figsize=(2.6 * len(cols), 2.6 * len(results)), squeeze=False)
    for row, (case, by_method) in zip(axes, results.items()):
        task = tasks[case[0]]
        for ax, col in zip(row, cols):
            x = task.reference if col == "teacher" else by_method[col][0].samples
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.scatter(task.mix.means[:, 0], task.mix.means[:, 1], s=8, c="red", marker="x")
            ax.set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal", xticks=[], yticks=[])
            ax.set_title(f"{col} ({' / '.join(case)})", fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def sweep_variants(mode: Mode) -> dict[str, dict]:
    """The warm control and DisBack's knobs, one at a time from the mode's default (uniform nodes, fixed rule)."""
    k, n = mode.distill["backtrack_interval"], mode.distill["num_path_nodes"]
    return {
        "warm control": {"method": "warm"},
        f"DisBack default ({n} uniform nodes, backtrack_interval {k})": {},
        "2 nodes": {"num_path_nodes": 2},
        "10 nodes": {"num_path_nodes": 10},
        f"backtrack_interval {k // 2}": {"backtrack_interval": k // 2},
        f"backtrack_interval {k * 2}": {"backtrack_interval": k * 2},
        "fake_score_init = teacher": {"fake_score_init": "teacher"},
        "LoRA nodes (rank 8)": {"path_node_type": "lora"},
        "log-spaced nodes": {"path_node_spacing": "log"},
        "adaptive rule, threshold 0.5": {"backtrack_rule": "adaptive", "backtrack_threshold": 0.5},
    }


def lr_scan(task: Task, mode: Mode, lrs: list[float], log) -> str:
    """DMD alone at several learning rates (seed 0): the choice of the frozen LR."""
    variants = {(init, lr): dict(method="dmd", generator_init=init, learning_rate=lr, fake_learning_rate=lr,
                                 degradation_learning_rate=lr) for init in mode.inits for lr in lrs}  # fmt: skip
    rows = []
    for (init, lr), (h,) in common.run_grid(task, replace(mode, seeds=(0,)), variants, log).items():
        curve = ", ".join(f"{row['swd']:.3f}" for row in h.rows[:: max(1, len(h.rows) // 6)])
        last = h.rows[-1]
        rows.append([task.name, init, f"{lr:g}", f"{common.final(h, 'swd', 2):.3f}", f"{last['coverage']:.2f}",
                     f"{last['off_mode']:.3f}", curve])  # fmt: skip
    return common.markdown_table(
        ["dataset", "generator init", "lr", "final SWD", "coverage", "off-mode", "SWD curve"], rows
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="tiny sizes, 8 Gaussians, scratch init: the machinery")
    group.add_argument("--sweep", action="store_true", help="DisBack's knobs on 8 Gaussians, both generator inits")
    group.add_argument("--lr_scan", action="store_true", help="DMD alone at several learning rates")
    parser.add_argument("--learning_rate", "--lr", type=float, help=f"all three optimisers (default {LR:g})")
    parser.add_argument("--seeds", type=int, help="override the mode's number of seeds")
    parser.add_argument("--max_train_steps", type=int, help="override the mode's stage-2 iterations (record: 1500)")
    parser.add_argument("--images", default=IMAGES, help="folder for the PNGs")
    parser.add_argument("--results", default=RESULTS, help="markdown file the tables go into (not in --quick)")
    parser.add_argument("--no_cache", action="store_true", help="retrain the teachers instead of using the cache")
    args = parser.parse_args(argv)

    mode = QUICK if args.quick else SWEEP if args.sweep else FULL
    lr = args.learning_rate
    mode = mode.updated(max_train_steps=args.max_train_steps, learning_rate=lr, fake_learning_rate=lr,
                        degradation_learning_rate=lr)  # fmt: skip
    mode = replace(mode, seeds=tuple(range(args.seeds)) if args.seeds else mode.seeds)
    log, cache = common.logger(), not (args.quick or args.no_cache)
    tasks = {name: Task(name, **mode.data, cache=cache) for name in mode.datasets}
    d = mode.data
    task_text = f"teacher EpsMLP hidden {d['hidden']}, depth 3, {d['teacher_steps']} steps; {d['num_eval']} samples"
    settings = common.settings_text(mode, task_text)

    def write(section: str, heading: str, text: str) -> None:
        text = f"## {heading} ({time.perf_counter() - log.start:.0f} s wall)\n\n{settings}\n\n{text}"
        common.write_section(section, text, args.results, "# Toy 2-D benchmark (`benchmarks/toy2d.py`)")

    if args.lr_scan:
        table = lr_scan(tasks[mode.datasets[0]], mode, [1e-4, 3e-4, 1e-3], log)
        print(table)
        write("lr_scan", "Learning rate (DMD only, seed 0; the seeds above do not apply)", table)
        return {"table": table}
    if args.sweep:
        tables = common.sweep(tasks[mode.datasets[0]], mode, sweep_variants(mode), log)
        print(tables)
        write("sweep", "Sweep (`--sweep`)", tables)
        return {"tables": tables}

    runs = {name: common.compare(task, mode, log) for name, task in tasks.items()}
    results = {(name, i): {m: runs[name][(i, m)] for m in METHODS} for name in tasks for i in mode.inits}
    tables = "\n\n".join(f"**{name}**\n\n{common.method_table(tasks[name], runs[name])}" for name in tasks)
    print(floor_table(tasks), tables, sep="\n\n")
    os.makedirs(args.images, exist_ok=True)
    prefix = os.path.join(args.images, "toy2d_quick" if args.quick else "toy2d")
    panels = {" / ".join(case): by_method for case, by_method in results.items()}
    common.plot_curves(panels, [("swd", "SWD")], f"{prefix}_swd.png", log_scale=True)
    common.plot_curves(panels, [("coverage", "coverage")], f"{prefix}_coverage.png")
    plot_samples(results, tasks, f"{prefix}_samples.png")
    if not args.quick:
        write("record", "Record (default mode)", f"Reference points:\n\n{floor_table(tasks)}\n\n{tables}")
        rows = [(f"{NAMES[name]}, G from {init}", by, _collapsed(by)) for (name, init), by in results.items()]
        common.write_section("summary", common.docs_summary(tasks[mode.datasets[0]], rows), args.results, "")
    return {"results": results, "tables": tables, "setups": tasks}


def _collapsed(by_method: dict) -> str:
    collapsed = all(h.rows[-1]["coverage"] == 0 for runs in by_method.values() for h in runs)
    return " (all collapsed, coverage 0)" if collapsed else ""


if __name__ == "__main__":
    torch.set_num_threads(1)  # the benchmark runs beside other work on a 2-core box; not when imported by tests
    main()
