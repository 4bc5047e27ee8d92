"""DMD vs DisBack vs the warm control on 2-D Gaussian mixtures: how fast a one-step generator reaches the teacher.

A teacher diffusion model (`EpsMLP`, epsilon prediction, SDXL's scaled_linear DDPM schedule, T = 1000) is trained on
a mixture (8 Gaussians on a ring, or a 5x5 grid; data normalised to unit std per dimension) and distilled into a
one-step generator by three methods with the same networks, seeds, learning rates and compute (`common.py`):
`dmd` (target the teacher from the first update), `disback` (degradation path, then backtracking) and `warm` (the
same stage 1, fake score from the last node, target the teacher from the start). Generators start from the teacher
or from scratch. The settings are `DisBackConfig`'s (the SDXL training script's flag names and units: counts in
stage-2 iterations, one fake-score update each, the generator updated on every `fake_score_update_ratio`-th, r = 5
here), and the loop is the library's `DegradationStep` / `BacktrackingStep`. Every `eval_steps` iterations the
generator's samples (fixed noise) are compared with the teacher's 50-step DDIM samples:

- `swd`: sliced Wasserstein-1 distance to the teacher's samples (lower is better);
- `coverage`: the fraction of the mixture's modes that receive at least a quarter of their fair share (1/4K) of the
  samples within 3 component standard deviations;
- `off_mode`: the fraction of samples farther than 3 standard deviations from every mode.

"DMD's final quality" is, per seed, DMD's SWD averaged over its last 2 evaluations, times 1.05. The table gives the
total iterations (stage 1 included, each stage-2 iteration or stage-1 step counts 1) each method needs to reach it,
as a ratio to DMD's on the same seed, and how many seeds never reach it.

    python benchmarks/toy2d.py --quick      # ~30 s: checks the machinery (used by the test suite), writes nothing
    python benchmarks/toy2d.py --lr_scan    # DMD only, a few learning rates: how the frozen LR was chosen
    python benchmarks/toy2d.py              # the record: 2 datasets x 2 generator inits x 3 methods x 3 seeds
    python benchmarks/toy2d.py --sweep      # DisBack's knobs (nodes, interval, fake init, LoRA, spacing, rule)

Teachers and their reference samples are cached in `benchmarks/.cache/`. Tables go to
`benchmarks/results/toy2d.md` (one section per mode), PNGs to `docs/images/toy2d_*.png`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import common  # noqa: E402
from common import (  # noqa: E402
    DistillConfig,
    EpsMLP,
    History,
    ddim_sample,
    run_distillation,
    sliced_wasserstein,
    train_teacher,
)

from diffusers_disback.distill import NoiseSchedule, Score  # noqa: E402

CACHE_DIR = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results", "toy2d.md")
IMAGES = os.path.join(HERE, "..", "docs", "images")
METHODS = ("dmd", "disback", "warm")
INITS = ("teacher", "scratch")
TOLERANCE = 1.05
# Chosen by `--lr_scan` on DMD alone (see the "Learning rate" section of the results), then frozen for all methods.
LR = 3e-4

# ---------------------------------------------------------------------------------------------------------- data


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
    dist = torch.cdist(x.float(), mix.means)
    nearest = dist.min(dim=1)
    near = nearest.values <= 3 * mix.std
    k = mix.means.shape[0]
    counts = torch.bincount(nearest.indices[near], minlength=k).float() / x.shape[0]
    return {"coverage": float((counts >= 0.25 / k).float().mean()), "off_mode": float(1 - near.float().mean())}


# ------------------------------------------------------------------------------------------------------- teacher


@dataclass
class Setup:
    mix: Mixture
    schedule: NoiseSchedule
    teacher: torch.nn.Module
    reference: torch.Tensor  # teacher's DDIM samples, the target of every metric
    eval_noise: torch.Tensor
    floor: dict  # metrics of teacher samples against themselves and against data


def build_setup(name: str, teacher_steps: int, hidden: int, num_eval: int, cache: bool) -> Setup:
    """Trains (or loads from the cache) the teacher of one mixture and draws its 50-step DDIM reference samples."""
    mix = make_mixture(name)
    schedule = NoiseSchedule.ddpm()
    file = os.path.join(CACHE_DIR, f"toy2d_teacher_{name}_h{hidden}_s{teacher_steps}.safetensors")
    if cache and os.path.isfile(file):
        teacher = EpsMLP(2, hidden=hidden)
        teacher.load_state_dict(load_file(file))
        teacher = teacher.eval().requires_grad_(False)
    else:
        teacher = train_teacher(mix.data, None, schedule, steps=teacher_steps, batch_size=512, lr=2e-3, hidden=hidden)
        if cache:
            os.makedirs(CACHE_DIR, exist_ok=True)
            save_file(teacher.state_dict(), file)
    score = Score(teacher, schedule)
    g = torch.Generator().manual_seed(1234)
    reference = ddim_sample(score, torch.randn(num_eval, 2, generator=g), None, steps=50)
    second = ddim_sample(score, torch.randn(num_eval, 2, generator=g), None, steps=50)
    eval_noise = torch.randn(num_eval, 2, generator=g)
    floor = {
        "teacher vs teacher (new noise)": {"swd": sliced_wasserstein(second, reference), **mode_stats(second, mix)},
        "data vs teacher": {"swd": sliced_wasserstein(mix.data[:num_eval], reference), **mode_stats(mix.data, mix)},
    }
    return Setup(mix, schedule, teacher, reference, eval_noise, floor)


# -------------------------------------------------------------------------------------------------------- runs


def run_one(setup: Setup, cfg: DistillConfig) -> tuple[History, torch.Tensor]:
    """One distillation run; returns its history and the generator's final samples on the evaluation noise."""
    last = {}

    def evaluate(sample) -> dict:
        x = sample(setup.eval_noise, None)
        last["x"] = x
        return {"swd": sliced_wasserstein(x, setup.reference), **mode_stats(x, setup.mix)}

    history = run_distillation(setup.teacher, setup.schedule, cfg, lambda n, g: None, evaluate)
    return history, last["x"]


def final_metric(history: History, metric: str = "swd", last: int = 2) -> float:
    return statistics.fmean(row[metric] for row in history.rows[-last:])


@dataclass
class Comparison:
    """DMD and one other run on the same seed: when the other reaches DMD's final quality."""

    ratio_iterations: float | None
    ratio_seconds: float | None


def compare(dmd: History, other: History) -> Comparison:
    goal = TOLERANCE * final_metric(dmd)
    ours, base = other.first_reaching("swd", goal), dmd.first_reaching("swd", goal)
    if ours is None:
        return Comparison(None, None)
    ours_s, base_s = other.first_reaching("swd", goal, x="seconds"), dmd.first_reaching("swd", goal, x="seconds")
    return Comparison(ours / base, ours_s / base_s)


def mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


# ------------------------------------------------------------------------------------------------------- tables


def summary_row(label: str, runs: list[History], dmd_runs: list[History] | None) -> list[str]:
    """Ratio to DMD (per seed, mean ± std, never-reached count), final metrics (mean ± std) and wall time."""
    cells = [label]
    if dmd_runs is None:
        cells += ["1 (reference)", "1 (reference)", "—", "0"]
    else:
        comps = [compare(d, r) for d, r in zip(dmd_runs, runs)]
        ratios = [c.ratio_iterations for c in comps if c.ratio_iterations is not None]
        seconds = [c.ratio_seconds for c in comps if c.ratio_seconds is not None]
        per_seed = ", ".join("never" if c.ratio_iterations is None else f"{c.ratio_iterations:.2f}" for c in comps)
        cells += [mean_std(ratios, "{:.2f}"), mean_std(seconds, "{:.2f}"), per_seed, str(len(runs) - len(ratios))]
    cells += [
        mean_std([final_metric(r) for r in runs]),
        mean_std([r.rows[-1]["coverage"] for r in runs], "{:.2f}"),
        mean_std([r.rows[-1]["off_mode"] for r in runs], "{:.3f}"),
        mean_std([r.rows[0]["swd"] for r in runs]),
        mean_std([r.rows[-1]["seconds"] for r in runs], "{:.1f}"),
        f"{runs[0].rows[-1]['iterations']}",
    ]
    return cells


SUMMARY_HEADER = [
    "method",
    "iters to DMD final ÷ DMD (mean ± std)",
    "wall to DMD final ÷ DMD",
    "per seed",
    "never reached",
    "final SWD",
    "final coverage",
    "final off-mode",
    "initial SWD",
    "wall s (total)",
    "total iters",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def floor_table(setups: dict[str, Setup]) -> str:
    rows = []
    for name, setup in setups.items():
        for label, m in setup.floor.items():
            rows.append([name, label, f"{m['swd']:.3f}", f"{m['coverage']:.2f}", f"{m['off_mode']:.3f}"])
    return markdown_table(["dataset", "samples", "SWD to teacher", "coverage", "off-mode"], rows)


def write_section(section: str, text: str, path: str = RESULTS) -> None:
    """One `<!-- section -->` block of the results file (`common.write_section`)."""
    common.write_section(section, text, path, "# Toy 2-D benchmark (`benchmarks/toy2d.py`)")


def plot_curves(results: dict, file: str, metric: str = "swd") -> None:
    """Metric vs total iterations (stage 1 included), mean over seeds with a min-max band; one panel per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for method, runs in results[case].items():
            xs = [row["iterations"] for row in runs[0].rows]
            ys = torch.tensor([[row[metric] for row in r.rows] for r in runs])
            line = ax.plot(xs, ys.mean(0), label=method)[0]
            ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=line.get_color(), alpha=0.2)
        ax.set_title(" / ".join(case), fontsize=9)
        ax.set_xlabel("total iterations (stage 1 included)")
        ax.set_ylabel(metric)
        if metric == "swd":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_samples(samples: dict, setups: dict[str, Setup], file: str) -> None:
    """Final samples (seed 0): teacher, then each method; one row per (dataset, generator init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(samples)
    cols = ["teacher", *METHODS]
    fig, axes = plt.subplots(len(cases), len(cols), figsize=(2.6 * len(cols), 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        setup = setups[case[0]]
        for ax, col in zip(row, cols):
            x = setup.reference if col == "teacher" else samples[case][col]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
            ax.scatter(setup.mix.means[:, 0], setup.mix.means[:, 1], s=8, c="red", marker="x")
            ax.set_xlim(-2.5, 2.5)
            ax.set_ylim(-2.5, 2.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{col} ({' / '.join(case)})", fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------- modes


@dataclass
class Budget:
    """
    Sizes of one mode, in `DisBackConfig`'s names and units: `max_train_steps`, `eval_steps` and
    `backtrack_interval` count stage-2 iterations (generator updates x r, r = `fake_score_update_ratio` = 5).
    """

    datasets: tuple[str, ...]
    inits: tuple[str, ...]
    seeds: int
    max_train_steps: int
    eval_steps: int
    teacher_steps: int
    hidden: int
    num_eval: int
    degradation_steps: int
    num_path_nodes: int
    backtrack_interval: int
    train_batch_size: int = 128
    learning_rate: float = LR


# generator updates = max_train_steps / 5: quick 60, record 300, sweep 120; target switches every 10, 25, 10 of them
QUICK = Budget(("8gaussians",), ("scratch",), 2, 300, 100, 800, 64, 1000, 40, 3, 50, 64, 1e-3)
FULL = Budget(("8gaussians", "grid"), INITS, 3, 1500, 75, 4000, 128, 2000, 300, 5, 125)
SWEEP = Budget(("8gaussians",), INITS, 3, 600, 50, 4000, 128, 2000, 150, 5, 50)


def base_config(budget: Budget) -> DistillConfig:
    return DistillConfig(
        max_train_steps=budget.max_train_steps,
        learning_rate=budget.learning_rate,
        fake_learning_rate=budget.learning_rate,
        degradation_learning_rate=budget.learning_rate,
        train_batch_size=budget.train_batch_size,
        degradation_steps=budget.degradation_steps,
        num_path_nodes=budget.num_path_nodes,
        backtrack_interval=budget.backtrack_interval,
        eval_steps=budget.eval_steps,
    )


def run_seeds(setup: Setup, cfg: DistillConfig, seeds: int, log) -> tuple[list[History], torch.Tensor]:
    runs, first_samples = [], None
    for seed in range(seeds):
        t0 = time.perf_counter()
        history, x = run_one(setup, replace(cfg, seed=seed))
        runs.append(history)
        first_samples = x if first_samples is None else first_samples
        log(
            f"  {cfg.method:8s} {cfg.generator_init:8s} seed {seed}: swd {history.rows[0]['swd']:.3f} -> "
            f"{final_metric(history):.3f}, coverage {history.rows[-1]['coverage']:.2f}, "
            f"{time.perf_counter() - t0:.1f} s"
        )
    return runs, first_samples


def record(budget: Budget, cache: bool, log) -> tuple[dict, dict, dict[str, Setup]]:
    """Every (dataset, init, method) over `budget.seeds` seeds; returns histories, seed-0 samples and setups."""
    results, samples, setups = {}, {}, {}
    for name in budget.datasets:
        setups[name] = build_setup(name, budget.teacher_steps, budget.hidden, budget.num_eval, cache)
        for init in budget.inits:
            case = (name, init)
            results[case], samples[case] = {}, {}
            for method in METHODS:
                cfg = replace(base_config(budget), method=method, generator_init=init)
                results[case][method], samples[case][method] = run_seeds(setups[name], cfg, budget.seeds, log)
    return results, samples, setups


def record_tables(results: dict) -> str:
    parts = []
    for case, by_method in results.items():
        rows = [summary_row(m, runs, None if m == "dmd" else by_method["dmd"]) for m, runs in by_method.items()]
        parts.append(f"**{case[0]}, generator from {case[1]}**\n\n" + markdown_table(SUMMARY_HEADER, rows))
    return "\n\n".join(parts)


def sweep_variants(budget: Budget) -> list[tuple[str, dict]]:
    """DisBack's knobs, one at a time from the mode's default (uniform nodes, fixed rule); intervals in iterations."""
    k = budget.backtrack_interval
    return [
        (f"DisBack default ({budget.num_path_nodes} uniform nodes, backtrack_interval {k})", {}),
        ("2 nodes", {"num_path_nodes": 2}),
        ("10 nodes", {"num_path_nodes": 10}),
        (f"backtrack_interval {k // 2}", {"backtrack_interval": k // 2}),
        (f"backtrack_interval {k * 2}", {"backtrack_interval": k * 2}),
        ("fake_score_init = teacher", {"fake_score_init": "teacher"}),
        ("LoRA nodes (rank 8)", {"path_node_type": "lora"}),
        ("log-spaced nodes", {"path_node_spacing": "log"}),
        ("adaptive rule, threshold 0.5", {"backtrack_rule": "adaptive", "backtrack_threshold": 0.5}),
    ]


def sweep(budget: Budget, cache: bool, log) -> str:
    """Each knob on DisBack vs DMD and warm (same seeds); returns the markdown tables."""
    setup = build_setup(budget.datasets[0], budget.teacher_steps, budget.hidden, budget.num_eval, cache)
    parts = []
    for init in budget.inits:
        base = replace(base_config(budget), generator_init=init)
        dmd, _ = run_seeds(setup, replace(base, method="dmd"), budget.seeds, log)
        rows = [summary_row("DMD", dmd, None)]
        warm, _ = run_seeds(setup, replace(base, method="warm"), budget.seeds, log)
        rows.append(summary_row("warm control", warm, dmd))
        for label, change in sweep_variants(budget):
            log(f" {label}")
            runs, _ = run_seeds(setup, replace(base, method="disback", **change), budget.seeds, log)
            steps = runs[0].node_steps
            rows.append(summary_row(f"{label}; stage-1 nodes at {steps}", runs, dmd))
        parts.append(f"**{setup.mix.name}, generator from {init}**\n\n" + markdown_table(SUMMARY_HEADER, rows))
    return "\n\n".join(parts)


def lr_scan(budget: Budget, lrs: list[float], cache: bool, log) -> str:
    """DMD alone at several learning rates (seed 0, first dataset): the choice of the frozen LR (the settings
    line above the table shows the rest of the configuration; its seed count does not apply)."""
    rows = []
    for name in budget.datasets[:1]:
        setup = build_setup(name, budget.teacher_steps, budget.hidden, budget.num_eval, cache)
        for init in budget.inits:
            for lr in lrs:
                cfg = replace(base_config(replace(budget, learning_rate=lr)), method="dmd", generator_init=init)
                (h,), _ = run_seeds(setup, cfg, 1, log)
                curve = ", ".join(f"{row['swd']:.3f}" for row in h.rows[:: max(1, len(h.rows) // 6)])
                rows.append(
                    [
                        name,
                        init,
                        f"{lr:g}",
                        f"{final_metric(h):.3f}",
                        f"{h.rows[-1]['coverage']:.2f}",
                        f"{h.rows[-1]['off_mode']:.3f}",
                        curve,
                    ]
                )
    return markdown_table(["dataset", "generator init", "lr", "final SWD", "coverage", "off-mode", "SWD curve"], rows)


def settings_text(budget: Budget) -> str:
    cfg = asdict(base_config(budget))
    keys = (
        "max_train_steps",
        "fake_score_update_ratio",
        "train_batch_size",
        "learning_rate",
        "fake_learning_rate",
        "degradation_learning_rate",
        "degradation_steps",
        "num_path_nodes",
        "path_node_spacing",
        "backtrack_interval",
        "backtrack_rule",
        "fake_score_init",
        "path_node_type",
        "min_step_percent",
        "max_step_percent",
        "conditioning_timestep",
        "eval_steps",
    )
    shown = ", ".join(f"`{k}={cfg[k]}`" for k in keys)
    r = cfg["fake_score_update_ratio"]
    return (
        f"Settings (`DisBackConfig` names; counts in stage-2 iterations, the generator updated on every {r}th: "
        f"{cfg['max_train_steps'] // r} generator updates, the target advancing every "
        f"{cfg['backtrack_interval'] // r}, evaluation every {cfg['eval_steps'] // r}): {shown}; "
        f"teacher EpsMLP hidden {budget.hidden}, depth 3, {budget.teacher_steps} steps; "
        f"{budget.num_eval} evaluation samples; seeds 0..{budget.seeds - 1} (generator init and training noise)."
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, 8 Gaussians, scratch init: the machinery")
    mode.add_argument("--sweep", action="store_true", help="DisBack's knobs on 8 Gaussians, both generator inits")
    mode.add_argument("--lr_scan", action="store_true", help="DMD alone at several learning rates")
    parser.add_argument(
        "--learning_rate", "--lr", type=float, default=None, help=f"all three optimisers; default {LR:g} (quick: 1e-3)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="override the mode's number of seeds")
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="override the mode's stage-2 iterations (generator updates x 5; record: 1500)",
    )
    parser.add_argument("--images", default=IMAGES, help="folder for the PNGs")
    parser.add_argument("--results", default=RESULTS, help="markdown file the tables go into (not in --quick)")
    parser.add_argument("--no_cache", action="store_true", help="retrain the teachers instead of using the cache")
    args = parser.parse_args(argv)

    budget = QUICK if args.quick else SWEEP if args.sweep else FULL
    budget = replace(
        budget,
        seeds=args.seeds or budget.seeds,
        max_train_steps=args.max_train_steps or budget.max_train_steps,
        learning_rate=args.learning_rate or budget.learning_rate,
    )
    cache = not (args.quick or args.no_cache)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s]{msg}", flush=True)

    if args.lr_scan:
        table = lr_scan(budget, [1e-4, 3e-4, 1e-3], cache, log)
        print(table)
        write_section(
            "lr_scan",
            f"## Learning rate (DMD only, seed 0)\n\n{settings_text(budget)}\n\n{table}",
            args.results,
        )
        return {"table": table}
    if args.sweep:
        tables = sweep(budget, cache, log)
        print(tables)
        write_section(
            "sweep",
            f"## Sweep (`--sweep`, {time.perf_counter() - start:.0f} s wall)\n\n{settings_text(budget)}\n\n{tables}",
            args.results,
        )
        return {"tables": tables}

    results, samples, setups = record(budget, cache, log)
    tables = record_tables(results)
    print(floor_table(setups))
    print(tables)
    os.makedirs(args.images, exist_ok=True)
    prefix = "toy2d_quick" if args.quick else "toy2d"
    plot_curves(results, os.path.join(args.images, f"{prefix}_swd.png"))
    plot_curves(results, os.path.join(args.images, f"{prefix}_coverage.png"), metric="coverage")
    plot_samples(samples, setups, os.path.join(args.images, f"{prefix}_samples.png"))
    if not args.quick:
        write_section(
            "record",
            f"## Record (default mode, {time.perf_counter() - start:.0f} s wall)\n\n"
            f"{settings_text(budget)}\n\nReference points (what 'perfect' looks like):\n\n"
            f"{floor_table(setups)}\n\n{tables}",
            args.results,
        )
    return {"results": results, "tables": tables, "setups": setups}


if __name__ == "__main__":
    torch.set_num_threads(1)  # the benchmark runs beside other work on a 2-core box; not when imported by tests
    main()
