"""Where a degradation path's nodes lie: a distance between scores, the path's profile, and nodes placed by distance.

DisBack's premise is a path of targets each a small step from the last (paper Sec. 3.2). Whether a recorded path is
one is measured here, in score space, so it works for any teacher (docs/method.md, "The path profile"):

    d(A, B) = sqrt( mean over the probe of (x0_hat_A(x_t, t, c) - x0_hat_B(x_t, t, c))^2 )

`x0_hat` is a score's clean-sample estimate with the guidance stage 2 gives it (the teacher with CFG; an intermediate
node as `--intermediate_cfg` says), and the probe is fixed: samples of the initial generator (one step) and of the
teacher (a few-step sampler with CFG), each with its caption, noised at a grid of `t` over the distribution-matching
loss's range with fixed noise. The DM gradient (Eq. 8) is the difference of two such estimates at noised generator
samples, so replacing target B by target A changes the generator's update by `x0_hat_B - x0_hat_A` there (before
DMD2's per-sample normalisation); the teacher's samples add the points the generator has to reach. On a fixed probe
`d` is an L2 distance between functions: zero for a score against itself, symmetric, with the triangle inequality.

- [`ScoreProbe`]: the fixed points, and the `x0_hat` of a score at them.
- [`sample`]: the deterministic DDIM sampler that draws the teacher's probe samples.
- [`PathProfile`]: every node's distance to the teacher, to the last node (the stage-1 fit of the initial
  generator's distribution) and to its predecessor; a table and a plot.
- [`place_by_distance`]: which of densely recorded candidates become the nodes, evenly spaced in distance between
  neighbours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .backtracking import node_target
from .scores import EpsFn, Schedule, Score

TargetFn = Callable[[Any], tuple[Score, float]]  # `cond -> (score, guidance_scale)`, as stage 2's target


def index_cond(cond: Any, index: torch.Tensor | slice) -> Any:
    """Rows `index` of a batch of conditioning: a tensor, a dict or list of tensors (e.g. SDXL's), or a list of
    prompts."""
    if isinstance(cond, torch.Tensor):
        return cond[index]
    if isinstance(cond, dict):
        return {k: index_cond(v, index) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        if cond and isinstance(cond[0], torch.Tensor):
            return type(cond)(index_cond(v, index) for v in cond)
        rows = range(len(cond))[index] if isinstance(index, slice) else index.tolist()
        return [cond[i] for i in rows]
    raise TypeError(f"cannot index conditioning of type {type(cond).__name__}")


def cat_cond(conds: Sequence[Any]) -> Any:
    """Batches of conditioning joined along the batch dimension (the inverse of [`index_cond`])."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds))
    if isinstance(first, dict):
        return {k: cat_cond([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], torch.Tensor):
        return type(first)(cat_cond([c[i] for c in conds]) for i in range(len(first)))
    return [x for c in conds for x in c]


@torch.no_grad()
def sample(
    score: Score,
    noise: torch.Tensor,
    cond: Any,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 25,
) -> torch.Tensor:
    """
    Deterministic DDIM (eta = 0) from `x_{T-1} = noise` over `num_inference_steps` evenly spaced timesteps, each step
    `x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t') eps_hat`; returns the final `x0_hat` (float32). On a flow
    schedule the same step, `x_{s'} = (1 - s') x0_hat + s' eps_hat`, is the Euler step over the schedule's shifted
    grid from `sigma = 1`. The teacher's probe samples are drawn with it, with the CFG scale the target uses.
    """
    schedule = score.schedule
    steps = schedule.sampling_timesteps(num_inference_steps)
    x = noise.float()
    for i, t in enumerate(steps):
        tt = schedule.timesteps_of(t, x.shape[0], x.device)
        pred = score.predict(x, tt, cond, guidance_scale).float()
        x0 = schedule.x0_from_prediction(x, pred, tt)
        if i == len(steps) - 1:
            return x0
        eps = schedule.eps_from_prediction(x, pred, tt)
        x = schedule.add_noise(x0, eps, schedule.timesteps_of(steps[i + 1], x.shape[0], x.device))
    return x


@dataclass
class ScoreProbe:
    """
    The fixed points at which scores are compared: `samples` (the initial generator's, then the teacher's) noised at
    `timesteps` with fixed noise. Build one with [`ScoreProbe.build`]; [`predictions`] gives a score's `x0_hat` there.

    Args:
        samples: `(M, C, H, W)` clean latents.
        cond: their conditioning (batch `M`).
        timesteps: the `t` grid, `(G,)`.
        noise: `(G, M, C, H, W)`, one fixed draw per grid point and sample.
        schedule: the teacher's schedule ([`NoiseSchedule`] or [`FlowSchedule`]).
        num_generator: how many of `samples` (the first) are the generator's.
        batch_size: samples per network call.
    """

    samples: torch.Tensor
    cond: Any
    timesteps: torch.Tensor
    noise: torch.Tensor
    schedule: Schedule
    num_generator: int
    batch_size: int = 64

    @classmethod
    def build(
        cls,
        schedule: Schedule,
        generator_samples: torch.Tensor,
        teacher_samples: torch.Tensor,
        cond: Any,
        min_step: int,
        max_step: int,
        num_timesteps: int = 8,
        seed: int = 0,
        batch_size: int = 64,
    ) -> ScoreProbe:
        """
        The probe of `generator_samples` and `teacher_samples` (both of the captions `cond`, so the probe's
        conditioning is `cond` twice), noised at `num_timesteps` timesteps evenly spaced over `[min_step, max_step]`
        with noise drawn from `seed`.
        """
        if generator_samples.shape != teacher_samples.shape:
            raise ValueError(
                f"generator and teacher samples must have one shape, got {tuple(generator_samples.shape)} and "
                f"{tuple(teacher_samples.shape)}"
            )
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        samples = torch.cat([generator_samples, teacher_samples]).float()
        timesteps = schedule.timestep_grid(min_step, max_step, num_timesteps)
        rng = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_timesteps, *samples.shape), generator=rng).to(samples.device)
        return cls(samples, cat_cond([cond, cond]), timesteps, noise, schedule, generator_samples.shape[0], batch_size)

    @torch.no_grad()
    def predictions(self, target: TargetFn) -> torch.Tensor:
        """`x0_hat` at every probe point of the score `target(cond)` gives, with the CFG scale it gives (`cond ->
        (score, guidance_scale)`, the form of stage 2's target): `(G, M, C, H, W)`, float32 on the CPU."""
        out = torch.empty(self.noise.shape, dtype=torch.float32)
        M = self.samples.shape[0]
        for g, t in enumerate(self.timesteps.tolist()):
            for start in range(0, M, self.batch_size):
                rows = slice(start, min(start + self.batch_size, M))
                x0 = self.samples[rows]
                tt = self.schedule.timesteps_of(t, x0.shape[0], x0.device)
                x_t = self.schedule.add_noise(x0, self.noise[g, rows], tt)
                score, guidance_scale = target(index_cond(self.cond, rows))
                out[g, rows] = score.x0(x_t, tt, index_cond(self.cond, rows), guidance_scale).float().cpu()
        return out


def score_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """`d(A, B)`: the root-mean-square difference of two scores' [`ScoreProbe.predictions`]."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@dataclass
class NodeProfile:
    """One node's place: `d` to the teacher, to the last node and to the node before it (0 for the teacher)."""

    index: int
    step: int
    to_teacher: float
    to_last: float
    to_previous: float


@dataclass
class PathProfile:
    """
    Where a path's nodes lie in the distance of this module (see the module docstring). Build one with
    [`PathProfile.from_predictions`]; `judge` optionally holds, per node, a shapes-world judge's reading of the node
    sampled as a diffusion model (`{"accuracy": ..., "fd": ...}`).
    """

    nodes: list[NodeProfile]
    guidance_scale: float
    intermediate_cfg: str
    candidates: list[dict] = field(default_factory=list)  # densely recorded steps: {"step", "to_teacher"}
    judge: dict[int, dict] = field(default_factory=dict)
    candidate_distances: list[list[float]] = field(default_factory=list)  # D[i][j] of teacher + candidates

    @classmethod
    def from_predictions(
        cls, steps: Sequence[int], predictions: Sequence[torch.Tensor], guidance_scale: float, intermediate_cfg: str
    ) -> PathProfile:
        """The profile of nodes `0..N` (node 0 the teacher) from their probe predictions, in node order."""
        if len(steps) != len(predictions) or not predictions:
            raise ValueError("need one stage-1 step and one prediction tensor per node, the teacher first")
        last = predictions[-1]
        nodes = [
            NodeProfile(
                index=i,
                step=int(steps[i]),
                to_teacher=score_distance(p, predictions[0]),
                to_last=score_distance(p, last),
                to_previous=score_distance(p, predictions[i - 1]) if i else 0.0,
            )
            for i, p in enumerate(predictions)
        ]
        return cls(nodes, float(guidance_scale), intermediate_cfg)

    @property
    def gaps(self) -> list[float]:
        """`d(P_{i-1}, P_i)` for `i = 1..N`: the step each switch of the backtracking target takes."""
        return [n.to_previous for n in self.nodes[1:]]

    @property
    def gap_ratio(self) -> float:
        """The largest gap over the smallest (1 is an evenly spaced path; `inf` if two neighbours coincide)."""
        gaps = self.gaps
        if not gaps:
            return 1.0
        return max(gaps) / min(gaps) if min(gaps) > 0 else math.inf

    def to_dict(self) -> dict:
        return {
            "measure": "rms difference of x0 estimates on the probe (docs/method.md, 'The path profile')",
            "guidance_scale": self.guidance_scale,
            "intermediate_cfg": self.intermediate_cfg,
            "nodes": [asdict(n) for n in self.nodes],
            "gap_ratio": self.gap_ratio,
            "candidates": self.candidates,
            "candidate_distances": self.candidate_distances,
            "judge": {str(k): v for k, v in self.judge.items()},
        }

    @classmethod
    def from_dict(cls, values: dict) -> PathProfile:
        return cls(
            [NodeProfile(**n) for n in values["nodes"]],
            values["guidance_scale"],
            values["intermediate_cfg"],
            list(values.get("candidates", [])),
            {int(k): v for k, v in values.get("judge", {}).items()},
            [list(row) for row in values.get("candidate_distances", [])],
        )

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        """A markdown table: one row per node."""
        judged = bool(self.judge)
        head = "| node | stage-1 step | d to teacher | d to last node | d to previous |"
        rule = "| ---: | ---: | ---: | ---: | ---: |"
        if judged:
            head += " judge accuracy | FD to teacher |"
            rule += " ---: | ---: |"
        lines = [head, rule]
        for n in self.nodes:
            name = "P0 (teacher)" if n.index == 0 else f"P{n.index}"
            row = f"| {name} | {n.step} | {n.to_teacher:.4f} | {n.to_last:.4f} | " + (
                f"{n.to_previous:.4f} |" if n.index else "– |"
            )
            if judged:
                j = self.judge.get(n.index, {})
                acc, fd = j.get("accuracy"), j.get("fd")
                row += f" {acc:.3f} |" if acc is not None else " |"
                row += f" {fd:.1f} |" if fd is not None else " |"
            lines.append(row)
        cfg = f"CFG {self.guidance_scale:g} on the teacher, intermediate nodes {self.intermediate_cfg!r}"
        lines.append("")
        lines.append(f"Largest gap between neighbours / smallest: {self.gap_ratio:.2f} ({cfg}).")
        return "\n".join(lines)

    def plot(self, file: str, title: str | None = None) -> str:
        """Distance to the teacher against the stage-1 step: the candidates' curve (if recorded) and the nodes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        if self.candidates:
            cs = sorted(self.candidates, key=lambda c: c["step"])
            ax.plot(
                [0] + [c["step"] for c in cs], [0.0] + [c["to_teacher"] for c in cs], color="0.6", lw=1,
                marker=".", label="recorded (candidates)",
            )  # fmt: skip
        xs, ys = [n.step for n in self.nodes], [n.to_teacher for n in self.nodes]
        ax.plot(xs, ys, color="tab:red", marker="o", lw=1.5, label="path nodes")
        for n in self.nodes:
            ax.annotate(f"P{n.index}", (n.step, n.to_teacher), textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.set_xlabel("stage-1 step")
        ax.set_ylabel("distance to the teacher")
        ax.set_title(title or f"path profile (gap ratio {self.gap_ratio:.2f})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(file, dpi=100)
        plt.close(fig)
        return file


def pairwise_distances(predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """`D[i, j] = d(i, j)` for scores given by their [`ScoreProbe.predictions`] (float64, symmetric, zero diagonal)."""
    n = len(predictions)
    D = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            D[i, j] = D[j, i] = score_distance(predictions[i], predictions[j])
    return D


def place_by_distance(
    distances: torch.Tensor | Sequence[Sequence[float]], num_nodes: int, tolerance: float = 0.0
) -> list[int]:
    """
    Which of densely recorded candidates become the path's `num_nodes` nodes, evenly spaced in distance.

    `distances` is the matrix `D[i, j]` ([`pairwise_distances`]) of the teacher (index 0) and the candidates
    `1..M` in recording order. The last candidate always ends the path; the others are chosen, in recording order:

    1. `L`: the smallest largest gap between neighbouring nodes (the teacher included) any choice can have;
    2. among the choices whose largest gap is at most `(1 + tolerance) * L`, the most even one: the smallest ratio
       of largest to smallest gap (ties: the smaller largest gap). With `tolerance=0` that is the choice with the
       largest smallest gap among those that reach `L`. A small tolerance (the training script's
       `--path_spacing_tolerance`) buys a much more even path when one unavoidable gap sets `L`.

    Every switch of the backtracking target is then about the same step. Both steps are exact (bottleneck dynamic
    programmes over the chains). Returns the chosen candidates' indices (`1..M`, increasing, `M` last).

    Stage 1 does not move along a straight line (its distance to the teacher can rise, then fall), so the spacing is
    measured between neighbours, not as each node's distance to the teacher.
    """
    D = torch.as_tensor(distances, dtype=torch.float64)
    M = D.shape[0] - 1
    if D.shape != (M + 1, M + 1):
        raise ValueError(f"distances must be a square matrix (teacher + candidates), got {tuple(D.shape)}")
    if not 1 <= num_nodes <= M:
        raise ValueError(f"need 1 <= num_nodes <= {M} candidates, got {num_nodes}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    forward = torch.ones_like(D, dtype=torch.bool).triu(1)  # a chain goes i -> j with i < j
    largest = _bottleneck(torch.where(forward, D, math.inf), num_nodes, minimise_largest=True)[0]
    bound = largest * (1 + tolerance)
    best = None
    for limit in sorted({float(v) for v in D[forward & (D >= largest) & (D <= bound)]}):
        allowed = torch.where(forward & (D <= limit), D, -math.inf)
        smallest, chain = _bottleneck(allowed, num_nodes, minimise_largest=False)
        gaps = [float(D[a, b]) for a, b in zip([0, *chain], chain)]
        key = (max(gaps) / smallest if smallest > 0 else math.inf, max(gaps))
        if best is None or key < best[0]:
            best = (key, chain)
    return best[1]


def _bottleneck(gap: torch.Tensor, num_nodes: int, minimise_largest: bool) -> tuple[float, list[int]]:
    """The chain `0 -> i_1 -> ... -> i_k = M` (`k = num_nodes`, indices increasing) whose largest gap is smallest
    (`minimise_largest`; disallowed steps `+inf`) or whose smallest gap is largest (disallowed `-inf`), as
    `(that gap, [i_1, ..., i_k])`."""
    M = gap.shape[0] - 1
    worst = math.inf if minimise_largest else -math.inf
    value = torch.full((M + 1,), worst, dtype=torch.float64)
    value[0] = -math.inf if minimise_largest else math.inf
    came = []
    for _ in range(num_nodes):
        if minimise_largest:
            value, prev = torch.maximum(value[:, None], gap).min(dim=0)
        else:
            value, prev = torch.minimum(value[:, None], gap).max(dim=0)
        came.append(prev)
    chain, j = [], M
    for prev in reversed(came):
        chain.append(j)
        j = int(prev[j])
    return float(value[M]), chain[::-1]


def path_targets(
    teacher: Callable[[Any], Score],
    node_eps: Callable[[int], EpsFn],
    guidance_scale: float,
    intermediate_cfg: str = "node",
) -> Callable[[int], TargetFn]:
    """
    `index -> (cond -> (score, guidance))`: node `index` of a path as stage 2 uses it as its target (node 0, the
    teacher, with `guidance_scale`; an intermediate node as `intermediate_cfg` says, [`node_target`]). `teacher(cond)`
    gives the teacher's [`Score`] with the unconditional conditioning of `cond`.
    """

    def of(index: int) -> TargetFn:
        def target(cond):
            score = teacher(cond)
            if index == 0:
                return score, guidance_scale
            return node_target(node_eps(index), score, guidance_scale, intermediate_cfg)

        return target

    return of
