"""The convergence harness of toy2d.py and digits.py (DMD vs DisBack vs the warm control on vector data) and the
results-file helpers of every benchmark.

The method runs through `diffusers_disback.distill`: the training steps the SDXL script runs (`DegradationStep`,
`BacktrackingStep`), its settings (`DisBackConfig`: the script's flag names and units), the path, the node switcher
and the schedule. This file adds small networks, batches, evaluation cadence, bookkeeping, tables and plots; a
benchmark adds a task and its modes. Methods (same networks, seeds and learning rates; stage 1 counted):

- `dmd`: fake score from the teacher, target the teacher from the first update (DMD / DMD2 without GAN);
- `disback`: stage 1 records the path from the teacher toward the initial generator; stage 2 starts the fake score
  at the most degraded node and walks the target back to the teacher;
- `warm`: stage 1 as DisBack, fake score from the last node, target the teacher from the first update: what a better
  initialised fake score buys without the path.

"DMD's final quality" is, per seed, DMD's main metric (lower is better) over its last 2 evaluations, times 1.05; a
method's ratio is the first iteration count (or second) at which it reaches it, over DMD's own.

A task has `name`, `teacher`, `schedule`, `main` (the ratios' metric), `final_last` (evaluations its "final"
averages), `metrics` and `summary_metrics` (`(key, label, format)`: the tables' and the docs summary's columns),
`evaluator(seed)` (the `evaluate` hook of `run_distillation`, keeping its latest samples as `.last`),
`sample_cond(n, generator)` and `uncond(batch_size)`.

`write_section` replaces one block of a `benchmarks/results/*.md` file and then `update_docs` copies the marked
results blocks into docs/benchmarks.md (alone: `python benchmarks/common.py --update-docs`, `make docs-results`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import statistics
import tempfile
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from diffusers_disback.distill import (
    LORA_ADAPTER,
    BacktrackingSchedule,
    BacktrackingStep,
    DegradationPath,
    DegradationStep,
    DisBackConfig,
    MethodPlan,
    NodeSwitcher,
    NoiseSchedule,
    OptimizerUpdate,
    Score,
    denoising_score_matching_loss,
    generator_updates,
    lora_config,
    make_lr_scheduler,
    make_optimizer,
    make_trainable,
    one_step_sample,
    target_score,
)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
CACHE_DIR = os.path.join(HERE, ".cache")
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")
METHODS = ("dmd", "disback", "warm")
TOLERANCE = 1.05

# ------------------------------------------------------------------------------------------------------ networks


class EpsMLP(nn.Module):
    """An epsilon-predicting MLP for vector data, optionally class-conditional (label `num_classes` = unconditional)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0, num_train_timesteps=1000):
        super().__init__()
        self.dim, self.num_classes, self.T = dim, num_classes, num_train_timesteps
        self.time_proj = nn.Linear(32, hidden)
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        layers: list[nn.Module] = [nn.Linear(dim + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        half = 16
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x_t.device) / half)
        angles = (t.float() / self.T * 1000.0)[:, None] * freqs[None]
        h = self.time_proj(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.class_emb is not None:
            labels = cond if cond is not None else torch.full_like(t, self.num_classes)
            h = h + self.class_emb(labels)
        return self.net(torch.cat([x_t, h], dim=1))


LORA_TARGETS = ["net.0", "net.2", "net.4", "net.6"]


def train_teacher(
    data: torch.Tensor,
    labels: torch.Tensor | None,
    schedule: NoiseSchedule,
    *,
    steps: int = 4000,
    batch_size: int = 512,
    lr: float = 2e-3,
    hidden: int = 256,
    depth: int = 3,
    num_classes: int = 0,
    label_dropout: float = 0.1,
    seed: int = 0,
) -> EpsMLP:
    """Trains the teacher with denoising score matching (Eq. 5); class labels are dropped at `label_dropout` for CFG."""
    torch.manual_seed(seed)
    model = EpsMLP(data.shape[1], hidden, depth, num_classes, schedule.num_train_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    score = Score(model, schedule)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        cond = None
        if labels is not None:
            cond = labels[idx].clone()
            cond[torch.rand(batch_size, generator=g) < label_dropout] = num_classes
        loss = denoising_score_matching_loss(score, data[idx], cond, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


def cached(name: str, config: dict, build: Callable[[], nn.Module], make: Callable[[], nn.Module], use_cache: bool):
    """Loads `name` from `benchmarks/.cache` when its stored config matches, else builds it (stored if `use_cache`)."""
    file = os.path.join(CACHE_DIR, name)
    if use_cache and os.path.isfile(file):
        blob = torch.load(file, weights_only=True)
        if blob["config"] == json.dumps(config, sort_keys=True):
            model = make()
            model.load_state_dict(blob["state"], strict=True)
            return model.eval().requires_grad_(False)
    model = build()
    if use_cache:
        os.makedirs(CACHE_DIR, exist_ok=True)
        torch.save({"config": json.dumps(config, sort_keys=True), "state": model.state_dict()}, file)
    return model


@torch.no_grad()
def ddim_sample(score: Score, noise: torch.Tensor, cond, steps: int = 50, guidance_scale: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM sampling from the teacher: the multi-step reference the one-step students are held to."""
    T = score.schedule.num_train_timesteps
    ts = torch.linspace(T - 1, 0, steps).round().long()
    abar = score.schedule.alphas_cumprod.float()
    x = noise
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        x0 = score.x0(x, tt, cond, guidance_scale=guidance_scale)
        if i + 1 < len(ts):
            a_next = abar[ts[i + 1]]
            eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        else:
            x = x0
    return x


# -------------------------------------------------------------------------------------------------- distillation


@dataclass
class DistillConfig(DisBackConfig):
    """
    One benchmark run: the method's settings ([`DisBackConfig`], the same names and units as the SDXL training
    script's flags; every count in stage-2 iterations) with toy-scale defaults, plus what only a benchmark chooses.
    """

    generator_init: str = "teacher"  # teacher | scratch
    eval_steps: int = 500  # evaluate every this many stage-2 iterations
    # toy-scale defaults of the method's settings
    max_train_steps: int = 10000  # 2000 generator updates at r = 5
    learning_rate: float = 1e-4
    train_batch_size: int = 256
    guidance_scale: float = 1.0
    degradation_steps: int = 500
    num_path_nodes: int | None = 5
    path_lora_rank: int = 8
    backtrack_interval: int = 500  # 100 generator updates at r = 5
    intermediate_cfg: str = "teacher"  # what the recorded digits runs used; "none" measured best
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 0.0


@dataclass
class History:
    config: dict
    rows: list[dict] = field(default_factory=list)  # generator_updates, iterations, seconds, target_node, metrics
    stage1_iterations: int = 0
    stage1_seconds: float = 0.0
    node_steps: list[int] = field(default_factory=list)
    samples: object = None  # the task's samples at the last evaluation

    def first_reaching(self, metric: str, value: float, x: str = "iterations"):
        """The first `x` (iterations, generator_updates or seconds) at which `metric` is at or below `value`."""
        return next((row[x] for row in self.rows if row[metric] <= value), None)


Run = namedtuple("Run", "rng generator generate next_batch")  # the seeded start of one run


def start_run(teacher: EpsMLP, schedule: NoiseSchedule, cfg: DistillConfig, sample_cond) -> Run:
    """The batches' RNG, the generator, its one-step sampler and the batch stream (conditions from
    `sample_cond(batch_size, generator)`: labels, or None) of one run."""
    rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.generator_init == "teacher":
        generator = copy.deepcopy(teacher)
    elif cfg.generator_init == "scratch":
        torch.manual_seed(cfg.seed + 1000)
        hidden, depth = teacher.net[0].out_features, (len(teacher.net) - 1) // 2
        generator = EpsMLP(teacher.dim, hidden, depth, teacher.num_classes, teacher.T)
    else:
        raise ValueError(f"generator_init must be 'teacher' or 'scratch', got {cfg.generator_init!r}")
    generator.train().requires_grad_(True)

    def generate(z, cond):
        return one_step_sample(generator, z, cond, schedule, cfg.conditioning_timestep)

    def next_batch():
        cond = sample_cond(cfg.train_batch_size, rng)
        return cond, torch.randn(cfg.train_batch_size, teacher.dim, generator=rng)

    return Run(rng, generator, generate, next_batch)


def record_path(directory: str, teacher: EpsMLP, schedule: NoiseSchedule, cfg: DistillConfig, run: Run):
    """Stage 1 through the library's [`DegradationStep`]: `cfg.degradation_steps` steps, a node at each of
    `cfg.node_steps()`."""
    degrading = copy.deepcopy(teacher).requires_grad_(False)
    lora = lora_config(cfg.path_lora_rank, LORA_TARGETS) if cfg.path_node_type == "lora" else None
    params = make_trainable(degrading, lora, adapter_name=LORA_ADAPTER)
    path = DegradationPath.create(directory, teacher, kind=cfg.path_node_type, lora_config=lora)
    optimizer = make_optimizer(params, cfg.degradation_learning_rate, cfg)
    update = OptimizerUpdate({"degrading": optimizer}, {"degrading": params}, cfg.max_grad_norm)
    step = DegradationStep(run.generate, Score(degrading, schedule), update, run.rng)
    steps_at = cfg.node_steps()
    for i in range(1, cfg.degradation_steps + 1):
        step(run.next_batch())
        if i in steps_at:
            path.add_node(degrading, i)
    return path


def run_distillation(
    teacher: EpsMLP,
    schedule: NoiseSchedule,
    cfg: DistillConfig,
    sample_cond: Callable[[int, torch.Generator], object],
    evaluate: Callable[[Callable[[torch.Tensor, object], torch.Tensor]], dict],
    uncond=None,
) -> History:
    """
    Runs one method end to end through the library's training steps ([`DegradationStep`], [`BacktrackingStep`]:
    the SDXL script's) and evaluates the generator every `eval_steps` stage-2 iterations.

    Args:
        sample_cond: `(batch_size, generator) -> cond` for training batches (labels, or None).
        evaluate: called with `sample(noise, cond) -> x0` (the current one-step generator); returns metrics.
        uncond: the unconditional cond for CFG (e.g. a tensor of null labels of the batch size), or None.
    """
    run = start_run(teacher, schedule, cfg, sample_cond)
    generator = run.generator
    history = History(config=asdict(cfg))

    def evaluate_now(iterations: int, seconds: float, target_node: int):
        generator.eval()
        with torch.no_grad():
            metrics = evaluate(run.generate)
        generator.train()
        row = {
            "generator_updates": generator_updates(iterations, cfg.fake_score_update_ratio),
            "iterations": history.stage1_iterations + iterations,
            "seconds": seconds,
            "target_node": target_node,
        }
        history.rows.append({**row, **metrics})

    # ---------------------------------------------------------------- stage 1: degradation recording
    workdir = tempfile.TemporaryDirectory(prefix="disback-path-")
    start = time.perf_counter()
    path = None
    if MethodPlan.uses_path(cfg.method):
        path = record_path(workdir.name, teacher, schedule, cfg, run)
        history.node_steps = [n.step for n in path.nodes[1:]]
        history.stage1_iterations = cfg.degradation_steps
    history.stage1_seconds = time.perf_counter() - start

    # ---------------------------------------------------------------- stage 2: backtracking (or plain DMD)
    teacher_score = Score(teacher, schedule, uncond=uncond)
    fake = copy.deepcopy(teacher)
    method = MethodPlan.of(cfg.method, len(path) if path is not None else 1, cfg.fake_score_init)
    switcher, num_nodes = None, method.num_targets
    if path is not None:
        switcher = NodeSwitcher(path, copy.deepcopy(teacher).requires_grad_(False), teacher=teacher)
    if method.fake_score_node is not None:  # s_phi <- R[0], the most degraded node
        fake.load_state_dict(path.merged_state_dict(teacher, method.fake_score_node))
    seconds = [history.stage1_seconds]
    clock = [time.perf_counter()]

    def after_iteration(done: int, backtracking: BacktrackingSchedule):
        seconds[0] += time.perf_counter() - clock[0]
        if done % cfg.eval_steps == 0 or done == cfg.max_train_steps:
            evaluate_now(done, seconds[0], backtracking.target_node if backtracking.num_nodes > 1 else 0)
        clock[0] = time.perf_counter()

    evaluate_now(0, seconds[0], (num_nodes - 2) if num_nodes > 1 else 0)
    clock[0] = time.perf_counter()
    backtrack(generator, run.generate, fake, lambda cond: teacher_score, switcher, num_nodes, schedule, cfg,
              run.next_batch, run.rng, after_iteration)  # fmt: skip
    workdir.cleanup()
    history.samples = getattr(evaluate, "last", None)
    return history


def backtrack(
    generator: nn.Module,
    generate: Callable[[torch.Tensor, object], torch.Tensor],
    fake: nn.Module,
    teacher: Callable[[object], Score],
    switcher: NodeSwitcher | None,
    num_nodes: int,
    schedule: NoiseSchedule,
    cfg: DisBackConfig,
    next_batch: Callable[[], tuple[object, torch.Tensor]],
    rng: torch.Generator,
    after_iteration: Callable[[int, BacktrackingSchedule], None] | None = None,
    eps_fn: Callable[[nn.Module], Callable] = lambda net: net,
) -> BacktrackingSchedule:
    """
    Stage 2 through the library's [`BacktrackingStep`], in plain PyTorch (AdamW, clipping and LR schedules from
    `cfg`): `cfg.max_train_steps` iterations; `after_iteration(done, schedule)` after each. Network-agnostic:
    `teacher(cond)` gives the teacher's score for a batch, `eps_fn(net)` makes a network an eps callable (identity
    for the toy MLPs; `training.unet_eps_fn` for SDXL UNets, which is how a test runs this on the SDXL script's
    inputs and gets the script's weights).
    """
    backtracking = BacktrackingSchedule.from_config(cfg, num_nodes)
    params = {"generator": [p for p in generator.parameters() if p.requires_grad], "fake_score": make_trainable(fake)}
    optimizers = {
        "generator": make_optimizer(params["generator"], cfg.learning_rate, cfg),
        "fake_score": make_optimizer(params["fake_score"], cfg.fake_learning_rate, cfg),
    }
    lr_schedulers = [make_lr_scheduler(opt, cfg, cfg.max_train_steps) for opt in optimizers.values()]
    min_step, max_step = cfg.timestep_range(schedule.num_train_timesteps)

    def node_eps(index):
        return eps_fn(switcher.activate(index))

    step = BacktrackingStep(
        generator=generate,
        fake_score=Score(eps_fn(fake), schedule),
        target=lambda cond: target_score(
            backtracking, node_eps, teacher(cond), cfg.guidance_scale, cfg.intermediate_cfg
        ),
        schedule=backtracking,
        update=OptimizerUpdate(optimizers, params, cfg.max_grad_norm),
        rng=rng,
        fake_score_update_ratio=cfg.fake_score_update_ratio,
        min_step=min_step,
        max_step=max_step,
    )
    for iteration in range(cfg.max_train_steps):
        step(iteration, next_batch())
        for lr_scheduler in lr_schedulers:
            lr_scheduler.step()
        if after_iteration is not None:
            after_iteration(iteration + 1, backtracking)
    return backtracking


# ------------------------------------------------------------------------------------------------------- harness


@dataclass
class Mode:
    """One mode of a convergence benchmark, by keyword: seeds, generator inits, the `DistillConfig` settings of every
    run (`DisBackConfig` names and units: counts in stage-2 iterations) and the task's own settings."""

    seeds: tuple[int, ...] = (0, 1, 2)
    inits: tuple[str, ...] = ("teacher", "scratch")
    distill: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # the task's settings (teacher size, evaluation size, cache, ...)
    datasets: tuple[str, ...] = ()  # toy2d: which mixtures

    def config(self, **overrides) -> DistillConfig:
        return DistillConfig(**{**self.distill, **overrides})

    def updated(self, **distill) -> Mode:
        """The mode with some `DistillConfig` settings changed (those given as None are kept)."""
        return replace(self, distill={**self.distill, **{k: v for k, v in distill.items() if v is not None}})


def distill(task, cfg: DistillConfig) -> History:
    """One run of `task` through [`run_distillation`]; the history keeps the task's final samples."""
    sample_cond, uncond = task.sample_cond, task.uncond(cfg.train_batch_size)
    return run_distillation(task.teacher, task.schedule, cfg, sample_cond, task.evaluator(cfg.seed), uncond)


def run_grid(task, mode: Mode, variants: dict, log) -> dict[object, list[History]]:
    """Each variant (`DistillConfig` overrides of the mode) over the mode's seeds, the variants interleaved per seed so
    that a change in machine load hits all of them alike."""
    runs = {key: [] for key in variants}
    for seed in mode.seeds:
        for key, overrides in variants.items():
            t0 = time.perf_counter()
            h = distill(task, mode.config(**{"seed": seed, **overrides}))
            runs[key].append(h)
            first, last, took = h.rows[0][task.main], final(h, task.main, task.final_last), time.perf_counter() - t0
            log(f"{task.name} {key} seed {seed}: {task.main} {first:.3f} -> {last:.3f} ({took:.1f} s)")
    return runs


def compare(task, mode: Mode, log, **overrides) -> dict[tuple[str, str], list[History]]:
    """The three methods from each of the mode's generator inits: `{(init, method): [History per seed]}`."""
    variants = {(i, m): {"method": m, "generator_init": i, **overrides} for i in mode.inits for m in METHODS}
    return run_grid(task, mode, variants, log)


def final(history: History, metric: str, last: int = 1) -> float:
    return statistics.fmean(row[metric] for row in history.rows[-last:])


def mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def reach_ratios(task, dmd: list[History], runs: list[History], x: str = "iterations") -> list[float | None]:
    """Per seed: the first `x` (iterations or seconds) at which a run reaches DMD's final quality, over DMD's own."""
    out = []
    for base, run in zip(dmd, runs):
        goal = TOLERANCE * final(base, task.main, 2)
        mine = run.first_reaching(task.main, goal, x=x)
        out.append(None if mine is None else mine / base.first_reaching(task.main, goal, x=x))
    return out


def summary_cells(task, runs: list[History], dmd: list[History] | None) -> list[str]:
    """Ratios to DMD (mean ± std, per seed, never-reached count), final metrics (mean ± std) and wall time."""
    if dmd is None:
        cells = ["1 (reference)", "1 (reference)", "—", "0"]
    else:
        ratios, seconds = reach_ratios(task, dmd, runs), reach_ratios(task, dmd, runs, "seconds")
        reached = [r for r in ratios if r is not None]
        per_seed = ", ".join("never" if r is None else f"{r:.2f}" for r in ratios)
        cells = [mean_std(reached, "{:.2f}"), mean_std([s for s in seconds if s is not None], "{:.2f}"), per_seed]
        cells.append(str(len(ratios) - len(reached)))
    for key, _, fmt in task.metrics:
        cells.append(mean_std([final(h, key, task.final_last if key == task.main else 1) for h in runs], fmt))
    cells.append(mean_std([h.rows[0][task.main] for h in runs], task.metrics[0][2]))
    cells += [mean_std([h.rows[-1]["seconds"] for h in runs], "{:.1f}"), str(runs[0].rows[-1]["iterations"])]
    return cells


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary_table(task, runs: dict, dmd: Callable, first: list[str], extra: dict | None = None) -> str:
    """One row per key of `runs` (its first cells: the key, or the items of a tuple key) against the DMD runs
    `dmd(key)` (None: the row is the reference); `extra` maps more columns to `runs -> cell`."""
    extra = extra or {}
    header = [*first, "iters to DMD final ÷ DMD (mean ± std)", "wall to DMD final ÷ DMD", "per seed", "never reached",
              *[f"final {label}" for _, label, _ in task.metrics], f"initial {task.metrics[0][1]}", "wall s (total)",
              "total iters", *extra]  # fmt: skip
    rows = [[*(key if isinstance(key, tuple) else (key,)), *summary_cells(task, hs, dmd(key)),
             *(cell(hs) for cell in extra.values())] for key, hs in runs.items()]  # fmt: skip
    return markdown_table(header, rows)


def method_table(task, runs: dict[tuple[str, str], list[History]]) -> str:
    """The runs of [`compare`]: per generator init, DMD (the reference), DisBack and warm."""
    return summary_table(task, runs, lambda k: None if k[1] == "dmd" else runs[(k[0], "dmd")], ["G init", "method"])


def _until_teacher(hs: list[History]) -> str:
    """Generator updates until the target is the teacher (the first evaluation there), and how many runs never."""
    updates = [next((r["generator_updates"] for r in h.rows if r["target_node"] == 0), None) for h in hs]
    reached = [float(u) for u in updates if u is not None]
    return mean_std(reached, "{:.0f}") + (f", {len(hs) - len(reached)} never" if len(reached) < len(hs) else "")


SWEEP_COLUMNS = {"stage-1 nodes": lambda hs: str(hs[0].node_steps), "updates until target = teacher": _until_teacher}


def sweep(task, mode: Mode, variants: dict[str, dict], log, **base) -> str:
    """DMD and each variant of DisBack (`DistillConfig` overrides, e.g. `{"method": "warm"}` for the warm control)
    from each of the mode's generator inits; the markdown tables."""
    parts = []
    for init in mode.inits:
        rows = {"DMD": {"method": "dmd"}, **variants}
        grid = {label: {"method": "disback", "generator_init": init, **base, **ov} for label, ov in rows.items()}
        runs = run_grid(task, mode, grid, log)
        dmd = runs["DMD"]
        table = summary_table(task, runs, lambda k, dmd=dmd: None if k == "DMD" else dmd, ["variant"], SWEEP_COLUMNS)
        parts.append(f"**{task.name}, generator from {init}**\n\n{table}")
    return "\n\n".join(parts)


def reach_cell(task, dmd: list[History], runs: list[History]) -> str:
    ratios = reach_ratios(task, dmd, runs)
    reached = [r for r in ratios if r is not None]
    never = len(ratios) - len(reached)
    if not reached:
        return f"never ({never} of {never} seeds)"
    return mean_std(reached, "{:.2f}") + (f" ({never} of {len(ratios)} seeds never reached it)" if never else "")


def docs_summary(task, rows: list[tuple[str, dict[str, list[History]], str]], first: str = "case") -> str:
    """The table docs/benchmarks.md shows: per `(label, {method: runs}, note)`, DisBack's and warm's iterations to
    DMD's final quality over DMD's and the mean final `task.summary_metrics` of the three methods."""
    header = [first, "DisBack / DMD (iterations)", "warm / DMD"]
    header += [f"final {label} DMD / DisBack / warm" for _, label, _ in task.summary_metrics]
    table = []
    for label, runs, note in rows:
        cells = [label, reach_cell(task, runs["dmd"], runs["disback"]), reach_cell(task, runs["dmd"], runs["warm"])]
        for key, _, fmt in task.summary_metrics:
            last = task.final_last if key == task.main else 1
            means = [statistics.fmean(final(h, key, last) for h in runs[m]) for m in METHODS]
            cells.append(" / ".join(fmt.format(v) for v in means))
        cells[-1] += note
        table.append(cells)
    return markdown_table(header, table)


def settings_text(mode: Mode, task_text: str) -> str:
    cfg = asdict(mode.config())
    keys = ("max_train_steps", "fake_score_update_ratio", "train_batch_size", "learning_rate", "fake_learning_rate",
            "degradation_learning_rate", "degradation_steps", "num_path_nodes", "path_node_spacing",
            "backtrack_interval", "backtrack_rule", "fake_score_init", "path_node_type", "intermediate_cfg",
            "min_step_percent", "max_step_percent", "conditioning_timestep", "eval_steps")  # fmt: skip
    shown = ", ".join(f"`{k}={cfg[k]}`" for k in keys)
    r = cfg["fake_score_update_ratio"]
    return (
        f"Settings (`DisBackConfig` names; counts in stage-2 iterations, the generator updated on every {r}th: "
        f"{cfg['max_train_steps'] // r} generator updates, the target advancing every "
        f"{cfg['backtrack_interval'] // r}, evaluation every {cfg['eval_steps'] // r}): {shown}; {task_text}; "
        f"seeds {list(mode.seeds)} (generator init and training noise). The loop is the library's (`DegradationStep`, "
        f"`BacktrackingStep`) in the reference code's order: on every {r}th iteration the generator is updated first, "
        "then the fake score on the same samples, detached; the schedule ticks once per iteration. Iterations count "
        "stage-2 iterations + stage-1 steps; wall time includes stage 1 (evaluation excluded)."
    )


def plot_curves(panels: dict[str, dict], metrics: list[tuple[str, str]], file: str, log_scale: bool = False) -> None:
    """`metrics` (`(key, label)`, one row each; the first on a log scale if `log_scale`) vs total iterations (stage 1
    included), mean over seeds with a min-max band; one column per panel (`{title: {method: runs}}`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.5 * len(panels), 3.4 * len(metrics)), squeeze=False)
    for col, (title, by_method) in enumerate(panels.items()):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row, col]
            for method, runs in by_method.items():
                xs = [r["iterations"] for r in runs[0].rows]
                ys = torch.tensor([[r[key] for r in h.rows] for h in runs])
                line = ax.plot(xs, ys.mean(0), label=method)[0]
                ax.fill_between(xs, ys.min(0).values, ys.max(0).values, color=line.get_color(), alpha=0.2)
            if row == 0 and log_scale:
                ax.set_yscale("log")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("total iterations (stage 1 included)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def logger():
    """`log(message)`, prefixed with the seconds since this call."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    log.start = start
    return log


# ---------------------------------------------------------------------------------------------------- metrics


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equal-size point clouds (random unit directions, fixed seed)."""
    n = min(x.shape[0], y.shape[0])
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], num_projections, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px = torch.sort(x[:n].float() @ dirs, dim=0).values
    py = torch.sort(y[:n].float() @ dirs, dim=0).values
    return float((px - py).abs().mean())


# ---------------------------------------------------------------------------------------------------- results


def write_section(section: str, text: str, path: str, title: str) -> None:
    """
    Replaces (or appends) the block `<!-- section -->...<!-- /section -->` of the markdown results file `path`
    (created with the heading `title`), leaving the other blocks alone; then `update_docs()`.
    """
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    old = open(path, encoding="utf-8").read() if os.path.isfile(path) else title.rstrip() + "\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    update_docs()


def read_section(path: str, section: str) -> str:
    text = open(path, encoding="utf-8").read()
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    if begin not in text or end not in text:
        raise KeyError(f"{path} has no section {section!r}")
    return text[text.index(begin) + len(begin) : text.index(end)].strip()


# <!-- generated from benchmarks/results/NAME.md#SECTION ... -->, the block, <!-- end of benchmarks/results/NAME.md#SECTION -->
_DOCS_BLOCK = re.compile(
    r"(<!-- generated from benchmarks/results/([\w.-]+)#([\w-]+)[^>]*-->\n)(.*?)(\n<!-- end of benchmarks/results/\2#\3 -->)",
    re.S,
)


def update_docs(docs: str = DOCS) -> bool:
    """Rewrites every generated block of `docs` from the results section it names; True if the file changed."""
    old = open(docs, encoding="utf-8").read()
    new = _DOCS_BLOCK.sub(lambda m: m[1] + read_section(os.path.join(RESULTS_DIR, m[2]), m[3]) + m[5], old)
    if new != old:
        with open(docs, "w", encoding="utf-8") as f:
            f.write(new)
    return new != old


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="benchmarks' shared code; run it to regenerate the docs' tables")
    parser.add_argument("--update-docs", action="store_true", help=f"copy the results tables into {DOCS}")
    if parser.parse_args().update_docs:
        print(f"{DOCS}: {'updated' if update_docs() else 'unchanged'}")
