"""DMD vs DisBack vs the warm control on real data: scikit-learn's 8x8 handwritten digits, class-conditional.

A class-conditional teacher (`EpsMLP`, 10 classes + a null label, label dropout 0.1 for CFG) and a digit classifier
(a small MLP) are trained on 1297 digits (cached under `benchmarks/.cache/`); 500 held-out digits are never trained
on. Generated digits are scored by the Fréchet distance (`diffusers_disback.evaluation.metrics`) to the training
digits in the classifier's 64-d penultimate features and by class accuracy; each evaluation generates one digit per
held-out label, so the held-out digits' own FD is the floor. The teacher's CFG scale is the measured best (DDIM 50).
Full mode: the three methods of `common.py` from scratch and from the teacher, 3 seeds, and the CFG of intermediate
path nodes (node / teacher / none); `--sweep`: DisBack's knobs from scratch.

    python benchmarks/digits.py [--quick|--sweep]

Full mode and the sweep write `benchmarks/results/digits.md` (full mode's summary also docs/benchmarks.md) and
`docs/images/digits_*.png`; `--quick` (< 60 s, one core) writes nothing and is run by `tests/test_digits_quick.py`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import common
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import HERE, METHODS, EpsMLP, Mode

from diffusers_disback.distill import DegradationPath, NodeSwitcher, NoiseSchedule, Score
from diffusers_disback.evaluation.metrics import feature_statistics, frechet_distance

RESULTS = os.path.join(HERE, "results", "digits.md")
IMAGES = os.path.join(HERE, "..", "docs", "images")
NUM_CLASSES = 10
HELD_OUT = 500
CFG_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)

_DISTILL = dict(learning_rate=1e-3, fake_learning_rate=1e-3, degradation_learning_rate=1e-3, path_node_spacing="log")
# counts in stage-2 iterations at r = fake_score_update_ratio = 5: 400 generator updates, the target advancing and an
# evaluation every 20 of them
FULL = Mode(seeds=(0, 1, 2), inits=("scratch", "teacher"),
            distill=dict(_DISTILL, max_train_steps=2000, train_batch_size=128, degradation_steps=500, num_path_nodes=5,
                         backtrack_interval=100, eval_steps=100),
            data=dict(teacher_hidden=256, teacher_steps=6000, classifier_steps=3000, cache=True))  # fmt: skip
# r = 3: 60 generator updates, the target advancing every 10, an evaluation every 20
QUICK = Mode(seeds=(0,), inits=("scratch",),
             distill=dict(_DISTILL, max_train_steps=180, train_batch_size=64, degradation_steps=30, num_path_nodes=3,
                          backtrack_interval=30, eval_steps=60, fake_score_update_ratio=3),
             data=dict(teacher_hidden=128, teacher_steps=700, classifier_steps=400, cache=False))  # fmt: skip
# 300 generator updates at r = 5, shorter than full mode to fit the sweep's time budget (DMD is rerun at the same
# length); intervals in stage-2 iterations (generator updates x 5)
SWEEP = replace(FULL.updated(max_train_steps=1500), inits=("scratch",))
SWEEP_VARIANTS = {
    "base (5 log nodes, backtrack_interval 100)": {},
    "10 log nodes": {"num_path_nodes": 10},
    "5 uniform nodes (= every 100 steps, the paper's rule)": {"path_node_spacing": "uniform"},
    "backtrack_interval 250": {"backtrack_interval": 250},
    "adaptive rule, threshold 0.5": dict(backtrack_rule="adaptive", backtrack_threshold=0.5, backtrack_interval=500),
    "fake_score_init = teacher": {"fake_score_init": "teacher"},
    "LoRA nodes (rank 8)": {"path_node_type": "lora"},
}


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


def _statistics(features: torch.Tensor):
    return feature_statistics(features.double().numpy())


class Evaluator:
    """FD and accuracy of digits generated for the held-out labels, from noise fixed per seed; keeps the latest grid
    of 8 samples per class as `last`."""

    def __init__(self, classifier: DigitClassifier, data: Digits, seed: int):
        self.classifier = classifier
        self.labels = data.y_test
        g = torch.Generator().manual_seed(10_000 + seed)
        self.noise = torch.randn(len(self.labels), 64, generator=g)
        self.reference = _statistics(classifier.features(data.x_train))
        self.grid_labels = torch.arange(NUM_CLASSES).repeat_interleave(8)
        self.grid_noise = torch.randn(len(self.grid_labels), 64, generator=g)
        self.last: torch.Tensor | None = None

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        feats = self.classifier.features(x)
        accuracy = (self.classifier.head(feats).argmax(1) == labels).float().mean()
        return {"fd": frechet_distance(*_statistics(feats), *self.reference), "acc": float(accuracy)}

    def __call__(self, sample) -> dict:
        self.last = sample(self.grid_noise, self.grid_labels)
        return self.metrics(sample(self.noise, self.labels), self.labels)

    def teacher(self, teacher: EpsMLP, schedule: NoiseSchedule, scale: float) -> dict:
        def draw(noise, labels):
            score = Score(teacher, schedule, uncond=torch.full_like(labels, NUM_CLASSES))
            return common.ddim_sample(score, noise, labels, 50, scale)

        out = self.metrics(draw(self.noise, self.labels), self.labels)
        self.last = draw(self.grid_noise, self.grid_labels)
        return out


class Task:
    """The digits, the class-conditional teacher and the classifier's metrics (the harness's dataset plug)."""

    name, main, final_last = "digits", "fd", 1
    metrics = (("fd", "FD", "{:.2f}"), ("acc", "accuracy", "{:.3f}"))
    summary_metrics = (("fd", "FD", "{:.1f}"), ("acc", "accuracy", "{:.3f}"))

    def __init__(self, *, teacher_hidden: int, teacher_steps: int, classifier_steps: int, cache: bool):
        t0 = time.perf_counter()
        self.data, self.schedule = load_data(), NoiseSchedule.ddpm()
        self.teacher_hidden, self.teacher_steps = teacher_hidden, teacher_steps
        config = {"hidden": teacher_hidden, "depth": 3, "steps": teacher_steps, "lr": 2e-3, "batch": 512, "seed": 0}

        def build():
            d = self.data
            return common.train_teacher(d.x_train, d.y_train, self.schedule, steps=teacher_steps, hidden=teacher_hidden,
                                 num_classes=NUM_CLASSES, label_dropout=0.1, seed=0)  # fmt: skip

        def make():
            return EpsMLP(64, teacher_hidden, 3, NUM_CLASSES, self.schedule.num_train_timesteps)

        self.teacher = common.cached("digits_teacher.pt", config, build, make, cache)
        config = {"arch": "64-256-64-10", "steps": classifier_steps, "noise": 0.1, "seed": 0}
        build = functools.partial(train_classifier, self.data, classifier_steps)
        self.classifier = common.cached("digits_classifier.pt", config, build, DigitClassifier, cache)
        self.evaluators: dict[int, Evaluator] = {}
        print(f"teacher + classifier ready in {time.perf_counter() - t0:.0f} s", flush=True)

    def evaluator(self, seed: int) -> Evaluator:
        if seed not in self.evaluators:
            self.evaluators[seed] = Evaluator(self.classifier, self.data, seed)
        return self.evaluators[seed]

    def sample_cond(self, n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def uncond(self, batch_size: int) -> torch.Tensor:
        # the null label batch for CFG: `run_distillation` hands it to `Score` as is (a callable is not resolved)
        return torch.full((batch_size,), NUM_CLASSES)

    def choose_scale(self, seeds) -> tuple[float, list[list[str]]]:
        """Teacher DDIM-50 FD and accuracy at each of `CFG_SCALES`, mean ± std over the seeds' noise (the table); the
        scale of the lowest mean FD."""
        rows, fds = [], {}
        for scale in CFG_SCALES:
            res = [self.evaluator(seed).teacher(self.teacher, self.schedule, scale) for seed in seeds]
            fds[scale] = statistics.mean(r["fd"] for r in res)
            rows.append([f"{scale:g}", common.mean_std([r["fd"] for r in res], "{:.2f}"),
                         common.mean_std([r["acc"] for r in res], "{:.3f}")])  # fmt: skip
        return min(fds, key=fds.get), rows


def path_of(task: Task, mode: Mode, directory: str, **overrides) -> DegradationPath:
    """Stage 1 exactly as a run does it (same seeds and batches), kept on disk so that the path can be inspected."""
    cfg = mode.config(**overrides)
    run = common.start_run(task.teacher, task.schedule, cfg, task.sample_cond)
    return common.record_path(directory, task.teacher, task.schedule, cfg, run)


@torch.no_grad()
def path_geometry(path: DegradationPath, task: Task) -> dict:
    """RMS eps differences on noised held-out digits: each node to the teacher and to the previous node; also each
    node's unconditional branch (null label, never trained in stage 1) to the teacher's."""
    g = torch.Generator().manual_seed(0)
    x0, labels = task.data.x_test, task.data.y_test
    t = task.schedule.sample_timesteps(len(x0), generator=g)
    x_t = task.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    null = torch.full_like(labels, NUM_CLASSES)
    switcher = NodeSwitcher(path, copy.deepcopy(task.teacher), teacher=task.teacher)
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


def geometry_table(geometry: dict[str, dict]) -> str:
    rows = [[init, str(i), str(step), *(f"{geo[k][i]:.4f}" for k in ("to_teacher", "to_previous", "uncond_to_teacher"))]
            for init, geo in geometry.items() for i, step in enumerate(geo["steps"])]  # fmt: skip
    header = ["G init", "node", "stage-1 step", "to teacher", "to previous node", "uncond branch to teacher's"]
    return common.markdown_table(header, rows)


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


def write(section: str, text: str) -> None:
    common.write_section(section, text, RESULTS, "# Digits benchmark results")


def task_text(task: Task) -> str:
    return (f"teacher `EpsMLP(64, hidden={task.teacher_hidden}, depth=3, num_classes=10)`, {task.teacher_steps} steps, "
            f"label dropout 0.1; classifier 64-256-64-10 MLP; 1297 training / {HELD_OUT} held-out digits")  # fmt: skip


def run_full(mode: Mode) -> None:
    log, task = common.logger(), Task(**mode.data)
    scale, cfg_rows = task.choose_scale(mode.seeds)
    real = task.evaluator(mode.seeds[0]).metrics(task.data.x_test, task.data.y_test)
    ref_rows = [["held-out real digits (floor)", f"{real['fd']:.2f}", f"{real['acc']:.3f}"]]
    ref_rows += [[f"teacher DDIM 50, CFG {w:g}", *row[1:]] for w, row in zip(CFG_SCALES, cfg_rows) if w in {1, scale}]
    task.evaluator(mode.seeds[0]).teacher(task.teacher, task.schedule, scale)
    grids = {f"teacher DDIM50 CFG {scale:g}": task.evaluator(mode.seeds[0]).last}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {i: path_of(task, mode, os.path.join(tmp, i), generator_init=i) for i in mode.inits}
        geometry = {i: path_geometry(path, task) for i, path in paths.items()}

    runs = common.compare(task, mode, log, guidance_scale=scale)
    table = common.method_table(task, runs)
    print(table, flush=True)
    cfg_runs = {"teacher": runs[("scratch", "disback")]}
    variants = {o: dict(method="disback", generator_init="scratch", guidance_scale=scale, intermediate_cfg=o)
                for o in ("node", "none")}  # fmt: skip
    cfg_runs.update(common.run_grid(task, mode, variants, log))
    quarter = {
        "FD at 1/4 of the run": lambda hs: common.mean_std([h.rows[len(h.rows) // 4]["fd"] for h in hs], "{:.2f}")
    }
    dmd = runs[("scratch", "dmd")]
    cfg_table = common.summary_table(task, cfg_runs, lambda key: dmd, ["intermediate CFG"], quarter)
    print(cfg_table, flush=True)

    panels = {f"generator init: {i}": {m: runs[(i, m)] for m in METHODS} for i in mode.inits}
    metrics = [("fd", "FD (classifier features)"), ("acc", "class accuracy")]
    common.plot_curves(panels, metrics, os.path.join(IMAGES, "digits_convergence.png"), log_scale=True)
    grids.update({f"{m} ({i} init)": runs[(i, m)][0].samples for i in mode.inits for m in METHODS})
    plot_grid(grids, os.path.join(IMAGES, "digits_samples.png"))
    minutes = (time.perf_counter() - log.start) / 60
    report = f"""## Full mode (`python benchmarks/digits.py`, {minutes:.1f} min on one CPU thread)

{common.settings_text(mode, task_text(task))}

### CFG scale of the teacher (DDIM 50 steps, mean ± std over the seeds' noise); chosen: {scale:g} (lowest FD)

{common.markdown_table(["CFG scale", "teacher FD", "teacher accuracy"], cfg_rows)}

### Reference

{common.markdown_table(["reference", "FD", "accuracy"], ref_rows)}

### DMD vs DisBack vs warm (CFG {scale:g})

{table}

### CFG on intermediate nodes (DisBack, scratch init)

{cfg_table}

### Path geometry (seed 0): RMS eps difference on noised held-out digits

{geometry_table(geometry)}

![convergence](../../docs/images/digits_convergence.png)
![samples](../../docs/images/digits_samples.png)
"""
    write("full", report)
    write(
        "summary",
        common.docs_summary(task, [(i, {m: runs[(i, m)] for m in METHODS}, "") for i in mode.inits], "G init"),
    )


def run_sweep(mode: Mode, intermediate_cfg: str) -> None:
    log, task = common.logger(), Task(**mode.data)
    scale, _ = task.choose_scale(mode.seeds)
    tables = common.sweep(task, mode, SWEEP_VARIANTS, log, guidance_scale=scale, intermediate_cfg=intermediate_cfg)
    text = f"""## Sweep (`python benchmarks/digits.py --sweep`, {(time.perf_counter() - log.start) / 60:.1f} min)

{common.settings_text(mode, task_text(task))} CFG {scale:g}; intermediate-node CFG `{intermediate_cfg}`. The adaptive rule
advances when the smoothed `dm_distance` (measured on generator updates) falls below the threshold times its value at
the last switch, at the latest after 500 iterations (100 generator updates).

{tables}
"""
    print(text)
    write("sweep", text)


def run_quick(mode: Mode) -> dict:
    """The machinery at toy sizes: returns the numbers `tests/test_digits_quick.py` checks."""
    log, task = common.logger(), Task(**mode.data)
    real = task.evaluator(mode.seeds[0]).metrics(task.data.x_test, task.data.y_test)
    with tempfile.TemporaryDirectory() as tmp:
        geometry = path_geometry(path_of(task, mode, tmp, generator_init="scratch"), task)
    runs = common.compare(task, mode, log, guidance_scale=2.0)
    table = common.method_table(task, runs)
    print(table)
    return {"real": real, "geometry": geometry, "runs": runs, "table": table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="tiny run that checks the machinery (< 60 s)")
    group.add_argument("--sweep", action="store_true", help="DisBack's knobs from a scratch generator")
    parser.add_argument("--intermediate_cfg", default="none", choices=["node", "teacher", "none"],
                        help="sweep: CFG of intermediate nodes (full mode measures all three)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        return run_quick(QUICK)
    if args.sweep:
        return run_sweep(SWEEP, args.intermediate_cfg)
    return run_full(FULL)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the benchmark runs beside other work on a 2-core box; not when imported by tests
    main()
