"""Shared engine of the convergence benchmarks (toy2d.py, digits.py): DMD vs DisBack vs the warm control on vector data.

Everything the method does goes through `diffusers_disback.distill`: the training steps (`DegradationStep`,
`BacktrackingStep`, the ones the SDXL training script runs), the settings (`DisBackConfig`, the script's flag names
and units), the degradation path on disk, the node switcher and the backtracking schedule. This file only supplies
small networks, the batches, the evaluation cadence and the bookkeeping, so that the benchmarks measure the loop
users run.

Methods (same networks, seeds, learning rates; compute counted in iterations and wall time, stage 1 included):

- `dmd`: fake score from the teacher, target the teacher from the first update (DMD / DMD2 without GAN).
- `disback`: stage 1 records the degradation path from the teacher toward the initial generator; stage 2 starts the
  fake score at the most degraded node and walks the target back to the teacher.
- `warm`: stage 1 as DisBack (same cost), fake score from the last node, but the target is the teacher from the first
  update. It separates what the path buys from what a better-initialised fake score buys.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

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


# ------------------------------------------------------------------------------------------------------- teacher


def train_teacher(
    data: torch.Tensor,
    labels: torch.Tensor | None,
    schedule: NoiseSchedule,
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

    def first_reaching(self, metric: str, value: float, lower_is_better: bool = True, x: str = "iterations"):
        """The first `x` (iterations, generator_updates or seconds) at which `metric` reaches `value`."""
        for row in self.rows:
            ok = row[metric] <= value if lower_is_better else row[metric] >= value
            if ok:
                return row[x]
        return None


def _make_generator(teacher: EpsMLP, cfg: DistillConfig) -> EpsMLP:
    if cfg.generator_init == "teacher":
        gen = copy.deepcopy(teacher)
    elif cfg.generator_init == "scratch":
        torch.manual_seed(cfg.seed + 1000)
        gen = EpsMLP(
            teacher.dim, teacher.net[0].out_features, (len(teacher.net) - 1) // 2, teacher.num_classes, teacher.T
        )
    else:
        raise ValueError(f"generator_init must be 'teacher' or 'scratch', got {cfg.generator_init!r}")
    return gen.train().requires_grad_(True)


def record_path(
    directory: str,
    teacher: EpsMLP,
    generate: Callable[[torch.Tensor, object], torch.Tensor],
    schedule: NoiseSchedule,
    cfg: DistillConfig,
    next_batch: Callable[[], tuple[object, torch.Tensor]],
    rng: torch.Generator,
) -> DegradationPath:
    """Stage 1 through the library's [`DegradationStep`]: `cfg.degradation_steps` steps, a node at each of
    `cfg.node_steps()`."""
    degrading = copy.deepcopy(teacher).requires_grad_(False)
    lora = lora_config(cfg.path_lora_rank, LORA_TARGETS) if cfg.path_node_type == "lora" else None
    params = make_trainable(degrading, lora, adapter_name=LORA_ADAPTER)
    path = DegradationPath.create(directory, teacher, kind=cfg.path_node_type, lora_config=lora)
    optimizer = make_optimizer(params, cfg.degradation_learning_rate, cfg)
    update = OptimizerUpdate({"degrading": optimizer}, {"degrading": params}, cfg.max_grad_norm)
    step = DegradationStep(generate, Score(degrading, schedule), update, rng)
    steps_at = cfg.node_steps()
    for i in range(1, cfg.degradation_steps + 1):
        step(next_batch())
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
    rng = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = _make_generator(teacher, cfg)
    history = History(config=asdict(cfg))

    def generate(z, cond):
        return one_step_sample(generator, z, cond, schedule, cfg.conditioning_timestep)

    def next_batch():
        cond = sample_cond(cfg.train_batch_size, rng)
        return cond, torch.randn(cfg.train_batch_size, teacher.dim, generator=rng)

    def evaluate_now(iterations: int, seconds: float, target_node: int):
        generator.eval()
        with torch.no_grad():
            metrics = evaluate(generate)
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
        path = record_path(workdir.name, teacher, generate, schedule, cfg, next_batch, rng)
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
    backtrack(generator, generate, fake, lambda cond: teacher_score, switcher, num_nodes, schedule, cfg, next_batch,
              rng, after_iteration)  # fmt: skip
    workdir.cleanup()
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


# ---------------------------------------------------------------------------------------------------- results


def write_section(section: str, text: str, path: str, title: str, markers: tuple[str, str] = ("", "/")) -> None:
    """
    Replaces (or appends) the block `<!-- {markers[0]}section -->...<!-- {markers[1]}section -->` of the markdown
    results file `path` (created with the heading `title`), leaving the other blocks alone.
    """
    begin, end = f"<!-- {markers[0]}{section} -->", f"<!-- {markers[1]}{section} -->"
    old = open(path, encoding="utf-8").read() if os.path.isfile(path) else title.rstrip() + "\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


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


def frechet_distance(feat_x: torch.Tensor, feat_y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula), in float64."""
    x, y = feat_x.double(), feat_y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    # sqrt of cov_x cov_y via the symmetric form sqrt(A^1/2 B A^1/2)
    vals, vecs = torch.linalg.eigh(cov_x)
    sqrt_x = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    mid = sqrt_x @ cov_y @ sqrt_x
    mid_vals = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0)
    return float(((mu_x - mu_y) ** 2).sum() + torch.trace(cov_x) + torch.trace(cov_y) - 2 * mid_vals.sqrt().sum())
