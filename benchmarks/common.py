"""Shared engine of the convergence benchmarks (toy2d.py, digits.py): DMD vs DisBack vs the warm control on vector data.

Everything the method does goes through `diffusers_disback.distill` (losses, degradation path on disk, node switcher,
backtracking schedule); this file only supplies small networks, the training loops and the bookkeeping, so that the
benchmarks measure the library the SDXL script uses.

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
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from diffusers_disback.distill import (
    BacktrackingSchedule,
    DegradationPath,
    NodeSwitcher,
    NoiseSchedule,
    Score,
    add_lora_adapter,
    denoising_score_matching_loss,
    distribution_matching_step,
    lora_parameters,
    node_steps,
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
class DistillConfig:
    method: str = "disback"  # dmd | disback | warm
    generator_init: str = "teacher"  # teacher | scratch
    generator_updates: int = 2000
    fake_updates_per_generator_update: int = 5  # r, the two-time-scale ratio
    lr_generator: float = 1e-4
    lr_fake: float = 1e-4
    batch_size: int = 256
    guidance_scale: float = 1.0
    conditioning_timestep: int = 399
    min_step: int = 20
    max_step: int = 980
    # stage 1
    stage1_steps: int = 500
    stage1_lr: float = 1e-4
    num_nodes: int = 5
    node_spacing: str = "uniform"  # uniform | log | interval
    node_kind: str = "full"  # full | lora
    lora_rank: int = 8
    # stage 2
    switch_interval: int = 100
    switch_rule: str = "fixed"  # fixed | adaptive
    switch_threshold: float = 0.5
    fake_init: str = "last_node"  # last_node | teacher (DisBack only; dmd always starts from the teacher)
    # CFG on intermediate nodes: node | teacher (the recorded digits runs' default) | none (measured best on digits)
    intermediate_cfg: str = "teacher"
    eval_every: int = 100
    seed: int = 0


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


def run_distillation(
    teacher: EpsMLP,
    schedule: NoiseSchedule,
    cfg: DistillConfig,
    sample_cond: Callable[[int, torch.Generator], object],
    evaluate: Callable[[Callable[[torch.Tensor, object], torch.Tensor]], dict],
    uncond=None,
) -> History:
    """
    Runs one method end to end and evaluates the generator every `eval_every` generator updates.

    Args:
        sample_cond: `(batch_size, generator) -> cond` for training batches (labels, or None).
        evaluate: called with `sample(noise, cond) -> x0` (the current one-step generator); returns metrics.
        uncond: the unconditional cond for CFG (e.g. a tensor of null labels of the batch size), or None.
    """
    if cfg.method not in ("dmd", "disback", "warm"):
        raise ValueError(f"method must be dmd, disback or warm, got {cfg.method!r}")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generator = _make_generator(teacher, cfg)
    history = History(config=asdict(cfg))

    def gen_fn(noise, cond):
        return one_step_sample(generator, noise, cond, schedule, cfg.conditioning_timestep)

    def evaluate_now(gen_updates: int, iterations: int, seconds: float, target_node: int):
        generator.eval()
        with torch.no_grad():
            metrics = evaluate(lambda noise, cond: gen_fn(noise, cond))
        generator.train()
        history.rows.append(
            {
                "generator_updates": gen_updates,
                "iterations": iterations,
                "seconds": seconds,
                "target_node": target_node,
                **metrics,
            }
        )

    # ---------------------------------------------------------------- stage 1: degradation recording
    workdir = tempfile.TemporaryDirectory(prefix="disback-path-")
    path = None
    start = time.perf_counter()
    if cfg.method in ("disback", "warm"):
        degrading = copy.deepcopy(teacher).requires_grad_(False)
        if cfg.node_kind == "lora":
            from peft import LoraConfig

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS)
            add_lora_adapter(degrading, lora)
            params = lora_parameters(degrading)
            for p in params:
                p.requires_grad_(True)
        else:
            lora = None
            degrading.requires_grad_(True)
            params = list(degrading.parameters())
        path = DegradationPath.create(workdir.name, teacher, kind=cfg.node_kind, lora_config=lora)
        opt1 = torch.optim.AdamW(params, lr=cfg.stage1_lr, weight_decay=0.0)
        if cfg.node_spacing == "interval":
            steps_at = node_steps(cfg.stage1_steps, interval=max(1, cfg.stage1_steps // cfg.num_nodes))
        else:
            steps_at = node_steps(cfg.stage1_steps, num_nodes=cfg.num_nodes, spacing=cfg.node_spacing)
        history.node_steps = steps_at
        degrading_score = Score(degrading, schedule)
        for step in range(1, cfg.stage1_steps + 1):
            cond = sample_cond(cfg.batch_size, g)
            with torch.no_grad():
                x0 = gen_fn(torch.randn(cfg.batch_size, teacher.dim, generator=g), cond)
            loss = denoising_score_matching_loss(degrading_score, x0, cond, generator=g)  # Eq. 7
            opt1.zero_grad(set_to_none=True)
            loss.backward()
            opt1.step()
            if step in steps_at:
                path.add_node(degrading, step)
        history.stage1_iterations = cfg.stage1_steps
        del degrading, opt1
    history.stage1_seconds = time.perf_counter() - start

    # ---------------------------------------------------------------- stage 2: backtracking (or plain DMD)
    teacher_score = Score(teacher, schedule, uncond=uncond)
    if cfg.method == "dmd":
        fake = copy.deepcopy(teacher)
        schedule_ = BacktrackingSchedule(num_nodes=1, interval=cfg.switch_interval)
        switcher = None
    else:
        target_model = copy.deepcopy(teacher).requires_grad_(False)
        switcher = NodeSwitcher(path, target_model, teacher=teacher)
        last = len(path) - 1
        if cfg.method == "disback" and cfg.fake_init == "teacher":
            fake = copy.deepcopy(teacher)
        else:  # s_phi <- R[0], the most degraded node
            fake = copy.deepcopy(teacher)
            fake.load_state_dict(path.merged_state_dict(teacher, last))
        nodes = 1 if cfg.method == "warm" else len(path)
        schedule_ = BacktrackingSchedule(
            num_nodes=nodes,
            interval=cfg.switch_interval,
            rule=cfg.switch_rule,
            threshold=cfg.switch_threshold,
        )
    fake = fake.train().requires_grad_(True)
    fake_score = Score(fake, schedule)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=cfg.lr_fake, weight_decay=0.0)
    opt_gen = torch.optim.AdamW(generator.parameters(), lr=cfg.lr_generator, weight_decay=0.0)

    iterations = history.stage1_iterations
    train_seconds = history.stage1_seconds
    gen_updates = 0
    evaluate_now(0, iterations, train_seconds, schedule_.target_node if schedule_.num_nodes > 1 else 0)
    r = cfg.fake_updates_per_generator_update
    while gen_updates < cfg.generator_updates:
        t0 = time.perf_counter()
        for _ in range(r):  # (a) the fake score tracks the generator (Eq. 7 on detached samples)
            cond = sample_cond(cfg.batch_size, g)
            with torch.no_grad():
                x0 = gen_fn(torch.randn(cfg.batch_size, teacher.dim, generator=g), cond)
            loss_fake = denoising_score_matching_loss(fake_score, x0, cond, generator=g)
            opt_fake.zero_grad(set_to_none=True)
            loss_fake.backward()
            opt_fake.step()
            iterations += 1
        # (b) the generator moves toward the current target (Eq. 8)
        cond = sample_cond(cfg.batch_size, g)
        x0 = gen_fn(torch.randn(cfg.batch_size, teacher.dim, generator=g), cond)
        target, w = target_score(
            schedule_, switcher.activate if switcher else None, teacher_score, cfg.guidance_scale, cfg.intermediate_cfg
        )
        fake.eval()
        loss_gen, info = distribution_matching_step(
            x0,
            cond,
            target,
            fake_score,
            guidance_scale=w,
            min_step=cfg.min_step,
            max_step=cfg.max_step,
            generator=g,
        )
        fake.train()
        opt_gen.zero_grad(set_to_none=True)
        loss_gen.backward()
        opt_gen.step()
        gen_updates += 1
        schedule_.step(distance=float(info["dm_distance"]))
        train_seconds += time.perf_counter() - t0
        if gen_updates % cfg.eval_every == 0 or gen_updates == cfg.generator_updates:
            evaluate_now(
                gen_updates, iterations, train_seconds, schedule_.target_node if schedule_.num_nodes > 1 else 0
            )
    workdir.cleanup()
    return history


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
