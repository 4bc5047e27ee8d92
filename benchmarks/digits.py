"""
DMD vs DisBack vs the warm control on real data: scikit-learn's 8x8 handwritten digits, class-conditional.

What it measures (all through `common.run_distillation`, so through the library's training steps, the ones the SDXL
script runs, with its settings: `DisBackConfig` names and units, every count in stage-2 iterations, the generator
updated on every `fake_score_update_ratio`-th):

- A class-conditional teacher (`EpsMLP`, 10 classes + a null label, label dropout 0.1 for CFG) and a digit classifier
  (a small MLP) are trained on 1297 digits and cached under `benchmarks/.cache/`; 500 held-out digits are never used
  for training.
- Metrics of generated digits: the Frechet distance (FD) to the training digits in the classifier's penultimate
  features (64-d), and class accuracy (does the classifier predict the requested label). Each evaluation generates
  one digit per held-out digit, with the held-out labels, so the held-out digits' own FD is the floor.
- The teacher's CFG scale is chosen by measurement (DDIM 50 steps at a few scales, lowest FD).
- One-step students by DMD, DisBack and warm (stage 1 counted in iterations and wall time), generators initialised
  from the teacher and from scratch, 3 seeds; the CFG of intermediate path nodes (node / teacher / none).
- `--sweep`: DisBack's knobs (nodes, spacing, backtrack interval and rule, fake-score init, LoRA nodes) from scratch.

Run: `python benchmarks/digits.py [--quick|--sweep]`. Full mode and the sweep write their tables into
`benchmarks/results/digits.md` and PNGs into `docs/images/digits_*.png`; `--quick` (< 60 s, one core) trains tiny
networks in-process, writes nothing, and is run by `tests/test_digits_quick.py`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (  # noqa: E402
    DistillConfig,
    EpsMLP,
    History,
    _make_generator,
    ddim_sample,
    frechet_distance,
    run_distillation,
    train_teacher,
)

from diffusers_disback.distill import (  # noqa: E402
    DegradationPath,
    NodeSwitcher,
    NoiseSchedule,
    Score,
    one_step_sample,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
RESULTS = os.path.join(HERE, "results", "digits.md")
IMAGES = os.path.join(ROOT, "docs", "images")
NUM_CLASSES = 10
HELD_OUT = 500
TOLERANCE = 1.05  # "DMD's final quality": 1.05 x DMD's FD averaged over its last 2 evaluations (per seed)
METHODS = ("dmd", "disback", "warm")


@dataclass
class Settings:
    teacher_hidden: int = 256
    teacher_steps: int = 6000
    classifier_steps: int = 3000
    cfg_scales: tuple = (1.0, 1.5, 2.0, 3.0, 4.0)
    seeds: tuple = (0, 1, 2)
    distill: dict = dataclasses.field(default_factory=dict)  # DistillConfig (DisBackConfig) overrides of every run
    cache: bool = True


# counts in stage-2 iterations at r = fake_score_update_ratio = 5: 400 generator updates, the target advancing and an
# evaluation every 20 of them
FULL = Settings(
    distill=dict(
        max_train_steps=2000,
        train_batch_size=128,
        learning_rate=1e-3,
        fake_learning_rate=1e-3,
        degradation_learning_rate=1e-3,
        degradation_steps=500,
        num_path_nodes=5,
        path_node_spacing="log",
        backtrack_interval=100,
        eval_steps=100,
    )
)
QUICK = Settings(
    teacher_hidden=128,
    teacher_steps=700,
    classifier_steps=400,
    cfg_scales=(1.0, 2.0),
    seeds=(0,),
    cache=False,
    distill=dict(  # r = 3: 60 generator updates, the target advancing every 10, an evaluation every 20
        max_train_steps=180,
        train_batch_size=64,
        learning_rate=1e-3,
        fake_learning_rate=1e-3,
        degradation_learning_rate=1e-3,
        degradation_steps=30,
        num_path_nodes=3,
        path_node_spacing="log",
        backtrack_interval=30,
        eval_steps=60,
        fake_score_update_ratio=3,
    ),
)


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int = 0) -> Digits:
    """The 1797 sklearn digits scaled from 0..16 to [-1, 1]; a fixed random split keeps 500 held out."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(raw.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = perm[:HELD_OUT], perm[HELD_OUT:]
    return Digits(x[train], y[train], x[test], y[test])


# ---------------------------------------------------------------------------------------------------- classifier


class DigitClassifier(nn.Module):
    """64 -> 256 -> 64 -> 10 MLP; `features` (the 64-d penultimate activations) define the FD."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.clamp(-1, 1))  # generated digits are clipped to the pixel range, like saved images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(data: Digits, steps: int, seed: int = 0) -> DigitClassifier:
    """Cross-entropy with light Gaussian-noise augmentation (sigma 0.1) so that slightly noisy samples stay in range."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(data.x_train), (256,), generator=g)
        x = data.x_train[idx] + 0.1 * torch.randn(256, 64, generator=g)
        loss = F.cross_entropy(model(x), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def cached(name: str, config: dict, build, make, use_cache: bool):
    """Loads `name` from the cache when its stored config matches, else builds it (and stores it if `use_cache`)."""
    file = os.path.join(CACHE, name)
    if use_cache and os.path.isfile(file):
        blob = torch.load(file, weights_only=True)
        if blob["config"] == json.dumps(config, sort_keys=True):
            model = make()
            model.load_state_dict(blob["state"], strict=True)
            return model.eval().requires_grad_(False)
    model = build()
    if use_cache:
        os.makedirs(CACHE, exist_ok=True)
        torch.save({"config": json.dumps(config, sort_keys=True), "state": model.state_dict()}, file)
    return model


def get_teacher(data: Digits, schedule: NoiseSchedule, s: Settings) -> EpsMLP:
    config = {"hidden": s.teacher_hidden, "depth": 3, "steps": s.teacher_steps, "lr": 2e-3, "batch": 512, "seed": 0}

    def build():
        return train_teacher(
            data.x_train,
            data.y_train,
            schedule,
            steps=s.teacher_steps,
            hidden=s.teacher_hidden,
            num_classes=NUM_CLASSES,
            label_dropout=0.1,
            seed=0,
        )

    return cached(
        "digits_teacher.pt",
        config,
        build,
        lambda: EpsMLP(64, s.teacher_hidden, 3, NUM_CLASSES, schedule.num_train_timesteps),
        s.cache,
    )


def get_classifier(data: Digits, s: Settings) -> DigitClassifier:
    config = {"arch": "64-256-64-10", "steps": s.classifier_steps, "noise": 0.1, "seed": 0}
    return cached(
        "digits_classifier.pt", config, lambda: train_classifier(data, s.classifier_steps), DigitClassifier, s.cache
    )


# ------------------------------------------------------------------------------------------------------- metrics


class Evaluator:
    """FD and accuracy of digits generated for the held-out labels, from noise fixed per seed."""

    def __init__(self, classifier: DigitClassifier, data: Digits, seed: int):
        self.classifier = classifier
        self.labels = data.y_test
        g = torch.Generator().manual_seed(10_000 + seed)
        self.noise = torch.randn(len(self.labels), 64, generator=g)
        self.reference = classifier.features(data.x_train)
        self.grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
        self.grid_noise = torch.randn(len(self.grid_labels), 64, generator=g)
        self.last_grid: torch.Tensor | None = None

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        feats = self.classifier.features(x)
        accuracy = (self.classifier.head(feats).argmax(1) == labels).float().mean()
        return {"fd": frechet_distance(feats, self.reference), "acc": float(accuracy)}

    def __call__(self, sample) -> dict:
        """The `evaluate` hook of `run_distillation`; keeps the latest sample grid (the final one after a run)."""
        self.last_grid = sample(self.grid_noise, self.grid_labels)
        return self.metrics(sample(self.noise, self.labels), self.labels)

    def teacher(self, teacher: EpsMLP, schedule: NoiseSchedule, scale: float) -> dict:
        score = Score(teacher, schedule, uncond=torch.full((len(self.labels),), NUM_CLASSES))
        out = self.metrics(ddim_sample(score, self.noise, self.labels, 50, scale), self.labels)
        grid_score = Score(teacher, schedule, uncond=torch.full((len(self.grid_labels),), NUM_CLASSES))
        self.last_grid = ddim_sample(grid_score, self.grid_noise, self.grid_labels, 50, scale)
        return out


# -------------------------------------------------------------------------------------------------- distillation


def sample_labels(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (n,), generator=g)


def distill(teacher, schedule, evaluator: Evaluator, s: Settings, **overrides) -> tuple[History, torch.Tensor]:
    """One `run_distillation` with the shared settings; returns its History and the final sample grid."""
    cfg = DistillConfig(**{**s.distill, **overrides})
    # the null label batch for CFG: `run_distillation` hands `uncond` to `Score` as is (a callable is not resolved)
    uncond = torch.full((cfg.train_batch_size,), NUM_CLASSES)
    history = run_distillation(teacher, schedule, cfg, sample_labels, evaluator, uncond=uncond)
    return history, evaluator.last_grid


def record_path(teacher, schedule, s: Settings, directory: str, **overrides) -> DegradationPath:
    """Stage 1 exactly as `run_distillation` does it (`common.record_path`, the library's `DegradationStep`; same
    seeds and batches), kept on disk so that the path itself can be inspected."""
    cfg = DistillConfig(**{**s.distill, **overrides})
    rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = _make_generator(teacher, cfg)

    def generate(z, cond):
        return one_step_sample(generator, z, cond, schedule, cfg.conditioning_timestep)

    def next_batch():
        cond = sample_labels(cfg.train_batch_size, rng)
        return cond, torch.randn(cfg.train_batch_size, teacher.dim, generator=rng)

    return common.record_path(directory, teacher, generate, schedule, cfg, next_batch, rng)


@torch.no_grad()
def path_geometry(path: DegradationPath, teacher, schedule, data: Digits) -> dict:
    """RMS eps differences on noised held-out digits: each node to the teacher and to the previous node; also each
    node's unconditional branch (null label, never trained in stage 1) to the teacher's."""
    g = torch.Generator().manual_seed(0)
    x0, labels = data.x_test, data.y_test
    t = schedule.sample_timesteps(len(x0), generator=g)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    null = torch.full_like(labels, NUM_CLASSES)
    switcher = NodeSwitcher(path, copy.deepcopy(teacher), teacher=teacher)
    eps = [switcher.activate(i)(x_t, t, labels) for i in range(len(path))]
    eps_u = [switcher.activate(i)(x_t, t, null) for i in range(len(path))]

    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    return {
        "steps": [n.step for n in path.nodes],
        "to_teacher": [rms(e, eps[0]) for e in eps],
        "to_previous": [0.0] + [rms(eps[i], eps[i - 1]) for i in range(1, len(eps))],
        "uncond_to_teacher": [rms(e, eps_u[0]) for e in eps_u],
    }


# ----------------------------------------------------------------------------------------------------- reporting


def mean_std(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(sd)}"


def dmd_final(history: History) -> float:
    """DMD's final quality: its FD averaged over its last 2 evaluations."""
    return statistics.mean(row["fd"] for row in history.rows[-2:])


def reach_ratio(dmd: History, other: History, x: str) -> float | None:
    """`other`'s first `x` (iterations or seconds) at FD <= 1.05 x DMD's final FD, over DMD's own; None if never."""
    threshold = TOLERANCE * dmd_final(dmd)
    mine, theirs = other.first_reaching("fd", threshold, x=x), dmd.first_reaching("fd", threshold, x=x)
    return None if mine is None else mine / theirs


def ratio_cell(dmds: list[History], others: list[History], x: str) -> str:
    ratios = [reach_ratio(d, o, x) for d, o in zip(dmds, others)]
    reached = [r for r in ratios if r is not None]
    per_seed = ", ".join("never" if r is None else f"{r:.2f}" for r in ratios)
    never = len(ratios) - len(reached)
    return f"{mean_std(reached)} ({per_seed})" + (f", {never} never" if never else "")


def final_cells(histories: list[History]) -> tuple[str, str, str]:
    fd = mean_std([h.rows[-1]["fd"] for h in histories])
    acc = mean_std([h.rows[-1]["acc"] for h in histories], "{:.3f}")
    secs = mean_std([h.rows[-1]["seconds"] for h in histories], "{:.0f}")
    return fd, acc, secs


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def method_table(runs: dict, inits: list[str]) -> str:
    """Ratios to DMD's final quality (iterations and seconds, stage 1 included) and final metrics per method."""
    rows = []
    for init in inits:
        dmds = runs[(init, "dmd")]
        for method in METHODS:
            hs = runs[(init, method)]
            iters = "1 (reference)" if method == "dmd" else ratio_cell(dmds, hs, "iterations")
            secs = "1 (reference)" if method == "dmd" else ratio_cell(dmds, hs, "seconds")
            rows.append([init, method, iters, secs, *final_cells(hs), str(hs[0].rows[-1]["iterations"])])
    header = [
        "G init",
        "method",
        "iterations to DMD's final FD, / DMD (per seed)",
        "wall time, / DMD (per seed)",
        "final FD",
        "final accuracy",
        "wall s",
        "iterations",
    ]
    return markdown_table(header, rows)


def write_section(name: str, text: str) -> None:
    """The section `name` of results/digits.md (`common.write_section`, `begin`/`end` markers)."""
    common.write_section(name, text, RESULTS, "# Digits benchmark results", markers=("begin ", "end "))


def plot_curves(runs: dict, inits: list[str], file: str) -> None:
    """FD and accuracy vs total iterations (stage 1 included): mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(inits), figsize=(5.5 * len(inits), 7), squeeze=False)
    for col, init in enumerate(inits):
        for row, (metric, label) in enumerate([("fd", "FD (classifier features)"), ("acc", "class accuracy")]):
            ax = axes[row, col]
            for method in METHODS:
                hs = runs[(init, method)]
                xs = [r["iterations"] for r in hs[0].rows]
                ys = torch.tensor([[r[metric] for r in h.rows] for h in hs])
                line = ax.plot(xs, ys.mean(0), label=method)[0]
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=line.get_color(), alpha=0.2)
            if metric == "fd":
                ax.set_yscale("log")
            ax.set_title(f"generator init: {init}")
            ax.set_xlabel("iterations (fake-score updates + stage-1 steps)")
            ax.set_ylabel(label)
            ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def plot_grid(grids: dict[str, torch.Tensor], file: str) -> None:
    """Panels of 10 rows (one per class) x 8 samples, one panel per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.6))
    for ax, (name, x) in zip(axes, grids.items()):
        img = x.clamp(-1, 1).reshape(NUM_CLASSES, 8, 8, 8).permute(0, 2, 1, 3).reshape(NUM_CLASSES * 8, 64)
        ax.imshow(img, cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- studies


def choose_cfg_scale(teacher, schedule, evaluators: list[Evaluator], scales) -> tuple[float, list[list[str]]]:
    """Teacher DDIM-50 FD and accuracy at each scale (mean over seeds' noise); the lowest mean FD wins."""
    rows, fds = [], {}
    for scale in scales:
        res = [e.teacher(teacher, schedule, scale) for e in evaluators]
        fds[scale] = statistics.mean(r["fd"] for r in res)
        rows.append([f"{scale:g}", mean_std([r["fd"] for r in res]), mean_std([r["acc"] for r in res], "{:.3f}")])
    return min(fds, key=fds.get), rows


def setup(s: Settings):
    data = load_data()
    schedule = NoiseSchedule.ddpm()
    t0 = time.perf_counter()
    teacher = get_teacher(data, schedule, s)
    classifier = get_classifier(data, s)
    evaluators = {seed: Evaluator(classifier, data, seed) for seed in s.seeds}
    print(f"teacher + classifier ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return data, schedule, teacher, classifier, evaluators


def compare_methods(teacher, schedule, evaluators, s: Settings, inits, scale) -> tuple[dict, dict]:
    runs, grids = {}, {}
    for init in inits:
        for seed in s.seeds:  # methods interleaved, so that a change in machine load hits all of them alike
            for method in METHODS:
                t0 = time.perf_counter()
                h, grid = distill(
                    teacher,
                    schedule,
                    evaluators[seed],
                    s,
                    method=method,
                    generator_init=init,
                    seed=seed,
                    guidance_scale=scale,
                )
                runs.setdefault((init, method), []).append(h)
                grids.setdefault((init, method), grid)
                print(
                    f"{init:8s} {method:8s} seed {seed}: FD {h.rows[0]['fd']:.2f} -> {h.rows[-1]['fd']:.2f}, "
                    f"acc {h.rows[-1]['acc']:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return runs, grids


def reference_rows(teacher, schedule, data, classifier, evaluators, scale) -> list[list[str]]:
    real = evaluators[min(evaluators)].metrics(data.x_test, data.y_test)
    rows = [["held-out real digits (floor)", f"{real['fd']:.2f}", f"{real['acc']:.3f}"]]
    for w in sorted({1.0, scale}):
        res = [e.teacher(teacher, schedule, w) for e in evaluators.values()]
        rows.append(
            [
                f"teacher DDIM 50, CFG {w:g}",
                mean_std([r["fd"] for r in res]),
                mean_std([r["acc"] for r in res], "{:.3f}"),
            ]
        )
    return rows


def run_full(s: Settings) -> None:
    start = time.perf_counter()
    data, schedule, teacher, classifier, evaluators = setup(s)
    scale, cfg_rows = choose_cfg_scale(teacher, schedule, list(evaluators.values()), s.cfg_scales)
    ref_rows = reference_rows(teacher, schedule, data, classifier, evaluators, scale)
    evaluators[s.seeds[0]].teacher(teacher, schedule, scale)
    teacher_grid = evaluators[s.seeds[0]].last_grid
    print(markdown_table(["CFG scale", "teacher FD", "teacher accuracy"], cfg_rows))
    print(markdown_table(["reference", "FD", "accuracy"], ref_rows), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        geometry = {
            init: path_geometry(
                record_path(teacher, schedule, s, os.path.join(tmp, init), generator_init=init),
                teacher,
                schedule,
                data,
            )
            for init in ("scratch", "teacher")
        }
    inits = ["scratch", "teacher"]
    runs, grids = compare_methods(teacher, schedule, evaluators, s, inits, scale)
    table = method_table(runs, inits)
    print(table, flush=True)

    cfg_runs = {"teacher": runs[("scratch", "disback")]}
    for option in ("node", "none"):
        cfg_runs[option] = [
            distill(
                teacher,
                schedule,
                evaluators[seed],
                s,
                method="disback",
                generator_init="scratch",
                seed=seed,
                guidance_scale=scale,
                intermediate_cfg=option,
            )[0]
            for seed in s.seeds
        ]
    cfg_table = intermediate_cfg_table(runs[("scratch", "dmd")], cfg_runs)
    print(cfg_table, flush=True)

    plot_curves(runs, inits, os.path.join(IMAGES, "digits_convergence.png"))
    panels = {f"teacher DDIM50 CFG {scale:g}": teacher_grid}
    panels.update({f"{m} ({init} init)": grids[(init, m)] for init in inits for m in METHODS})
    plot_grid(panels, os.path.join(IMAGES, "digits_samples.png"))
    elapsed = time.perf_counter() - start
    write_section("full", full_report(s, scale, cfg_rows, ref_rows, geometry, table, cfg_table, elapsed))
    print(f"full mode done in {elapsed:.0f} s")


def intermediate_cfg_table(dmds: list[History], cfg_runs: dict) -> str:
    rows = []
    for option, hs in cfg_runs.items():
        rows.append(
            [
                option,
                ratio_cell(dmds, hs, "iterations"),
                *final_cells(hs)[:2],
                mean_std([h.rows[len(h.rows) // 4]["fd"] for h in hs]),
            ]
        )
    header = [
        "intermediate CFG",
        "iterations to DMD's final FD, / DMD (per seed)",
        "final FD",
        "final accuracy",
        "FD at 1/4 of the run",
    ]
    return markdown_table(header, rows)


def full_report(s, scale, cfg_rows, ref_rows, geometry, table, cfg_table, elapsed) -> str:
    d = s.distill
    geo_rows = []
    for init, geo in geometry.items():
        for i, step in enumerate(geo["steps"]):
            geo_rows.append(
                [
                    init,
                    str(i),
                    str(step),
                    f"{geo['to_teacher'][i]:.4f}",
                    f"{geo['to_previous'][i]:.4f}",
                    f"{geo['uncond_to_teacher'][i]:.4f}",
                ]
            )
    cfg = DistillConfig(**d)
    r = cfg.fake_score_update_ratio
    return f"""## Full mode (`python benchmarks/digits.py`, {elapsed / 60:.1f} min on one CPU thread)

Setup: teacher `EpsMLP(64, hidden={s.teacher_hidden}, depth=3, num_classes=10)`, {s.teacher_steps} steps, label
dropout 0.1; classifier 64-256-64-10 MLP; 1297 training / {HELD_OUT} held-out digits. Distillation (all methods;
`DisBackConfig` names, counts in stage-2 iterations): `max_train_steps={cfg.max_train_steps}` iterations at
`fake_score_update_ratio={r}` ({cfg.max_train_steps // r} generator updates), batch {cfg.train_batch_size},
AdamW `learning_rate={cfg.learning_rate:g}`, `fake_learning_rate={cfg.fake_learning_rate:g}` (chosen on DMD, frozen
for all methods; weight decay {cfg.adam_weight_decay:g}, no clipping, constant), stage 1
`degradation_steps={cfg.degradation_steps}` at `degradation_learning_rate={cfg.degradation_learning_rate:g}`,
`num_path_nodes={cfg.num_path_nodes}` `{cfg.path_node_spacing}`-spaced, `backtrack_interval={cfg.backtrack_interval}`
iterations ({cfg.backtrack_interval // r} generator updates), `min_step_percent={cfg.min_step_percent:g}`,
`max_step_percent={cfg.max_step_percent:g}`; seeds {list(s.seeds)}. The loop is the library's (`DegradationStep`,
`BacktrackingStep`) in the reference code's order: each iteration draws a batch that the generator samples; on every
{r}th the generator is updated first, then the fake score on the same samples, detached; the backtracking schedule
ticks once per iteration. Iterations = stage-2 iterations + stage-1 steps; wall time includes stage 1 (evaluation
excluded). "DMD's final FD" = per seed, DMD's FD averaged over its last 2 evaluations (`eval_steps={cfg.eval_steps}`
iterations = every {cfg.eval_steps // r} generator updates), times {TOLERANCE}; the ratio is the first iteration count
(or second) at which a method's FD is at or below it, over DMD's own.

### CFG scale of the teacher (DDIM 50 steps, mean ± std over the seeds' noise); chosen: {scale:g} (lowest FD)

{markdown_table(["CFG scale", "teacher FD", "teacher accuracy"], cfg_rows)}

### Reference

{markdown_table(["reference", "FD", "accuracy"], ref_rows)}

### DMD vs DisBack vs warm (CFG {scale:g})

{table}

### CFG on intermediate nodes (DisBack, scratch init)

{cfg_table}

### Path geometry (seed 0): RMS eps difference on noised held-out digits

{
        markdown_table(
            ["G init", "node", "stage-1 step", "to teacher", "to previous node", "uncond branch to teacher's"],
            geo_rows,
        )
    }

![convergence](../../docs/images/digits_convergence.png)
![samples](../../docs/images/digits_samples.png)
"""


# 300 generator updates at r = 5: shorter than full mode to fit the sweep's time budget (DMD is rerun at the same
# length)
SWEEP_STEPS = 1500
SWEEP = {  # intervals in stage-2 iterations (generator updates x 5)
    "base (5 log nodes, backtrack_interval 100)": {},
    "10 log nodes": {"num_path_nodes": 10},
    "5 uniform nodes (= every 100 steps, the paper's rule)": {"path_node_spacing": "uniform"},
    "backtrack_interval 250": {"backtrack_interval": 250},
    "adaptive rule, threshold 0.5": {
        "backtrack_rule": "adaptive",
        "backtrack_threshold": 0.5,
        "backtrack_interval": 500,
    },
    "fake_score_init = teacher": {"fake_score_init": "teacher"},
    "LoRA nodes (rank 8)": {"path_node_type": "lora"},
}


def run_sweep(s: Settings, intermediate_cfg: str) -> None:
    start = time.perf_counter()
    _, schedule, teacher, _, evaluators = setup(s)
    scale, _ = choose_cfg_scale(teacher, schedule, list(evaluators.values()), s.cfg_scales)
    runs = {}
    for seed in s.seeds:  # variants interleaved per seed, so that a change in machine load hits all of them alike
        for name, overrides in {"DMD": {"method": "dmd"}, **SWEEP}.items():
            kwargs = {
                "method": "disback",
                "generator_init": "scratch",
                "seed": seed,
                "guidance_scale": scale,
                "intermediate_cfg": intermediate_cfg,
            }
            h, _ = distill(teacher, schedule, evaluators[seed], s, **{**kwargs, **overrides})
            runs.setdefault(name, []).append(h)
            print(f"seed {seed} {name}: FD {h.rows[0]['fd']:.2f} -> {h.rows[-1]['fd']:.2f}", flush=True)
    rows = []
    for name, hs in runs.items():
        if name == "DMD":
            continue
        switches = [float(u) for u in map(first_teacher_update, hs) if u is not None]
        never = len(hs) - len(switches)
        rows.append(
            [
                name,
                ratio_cell(runs["DMD"], hs, "iterations"),
                ratio_cell(runs["DMD"], hs, "seconds"),
                *final_cells(hs)[:2],
                mean_std(switches, "{:.0f}") + (f", {never} never" if never else ""),
            ]
        )
    header = [
        "DisBack variant (scratch init)",
        "iterations to DMD's final FD, / DMD",
        "wall time, / DMD",
        "final FD",
        "final accuracy",
        "generator updates until target = teacher",
    ]
    table = markdown_table(header, rows)
    dmd = final_cells(runs["DMD"])
    elapsed = time.perf_counter() - start
    text = f"""## Sweep (`python benchmarks/digits.py --sweep`, {elapsed / 60:.1f} min)

Generator from scratch, CFG {scale:g}, settings of full mode unless named but `max_train_steps={SWEEP_STEPS}`
({SWEEP_STEPS // 5} generator updates); intervals in stage-2 iterations (generator updates x 5); intermediate-node CFG
`{intermediate_cfg}`; seeds {list(s.seeds)}; DMD baseline rerun here: final FD {dmd[0]}, accuracy {dmd[1]}. Ratios as
in full mode (per seed in brackets). The adaptive rule advances when the smoothed `dm_distance` (measured on generator
updates) falls below the threshold times its value at the last switch, at the latest after 500 iterations (100
generator updates).

{table}
"""
    print(text)
    write_section("sweep", text)


def first_teacher_update(history: History) -> int | None:
    """The first evaluated generator-update count at which the target was the teacher (None: never)."""
    return next((r["generator_updates"] for r in history.rows if r["target_node"] == 0), None)


def run_quick(s: Settings) -> dict:
    """The machinery at toy sizes: returns the numbers `tests/test_digits_quick.py` checks."""
    data, schedule, teacher, classifier, evaluators = setup(s)
    evaluator = evaluators[s.seeds[0]]
    real = evaluator.metrics(data.x_test, data.y_test)
    with tempfile.TemporaryDirectory() as tmp:
        geometry = path_geometry(
            record_path(teacher, schedule, s, tmp, generator_init="scratch"), teacher, schedule, data
        )
    runs = {
        ("scratch", m): [
            distill(teacher, schedule, evaluator, s, method=m, generator_init="scratch", guidance_scale=2.0)[0]
        ]
        for m in METHODS
    }
    table = method_table(runs, ["scratch"])
    print(table)
    return {"real": real, "geometry": geometry, "runs": runs, "table": table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny run that checks the machinery (< 60 s)")
    mode.add_argument("--sweep", action="store_true", help="DisBack's knobs from a scratch generator")
    parser.add_argument(
        "--intermediate_cfg",
        default="none",
        choices=["node", "teacher", "none"],
        help="sweep: CFG of intermediate nodes (full mode measures all three)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        return run_quick(QUICK)
    if args.sweep:
        settings = dataclasses.replace(FULL, distill={**FULL.distill, "max_train_steps": SWEEP_STEPS})
        return run_sweep(settings, args.intermediate_cfg)
    return run_full(FULL)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the benchmark runs beside other work on a 2-core box; not when imported by tests
    main()
