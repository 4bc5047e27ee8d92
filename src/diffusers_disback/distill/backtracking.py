"""Stage 2, distribution backtracking: the generator chases targets that walk the recorded path back to the teacher.

With the reversed path `R = [P_N, ..., P_1, P_0]` (`R[0]` the most degraded node, `R[N]` the teacher), the fake score
starts at `R[0]` and the distribution-matching target starts at `R[1]`; every `K` training iterations the target moves
one node toward the teacher, and once it is the teacher it stays there (paper Sec. 3.3, Alg. 1).

The unit of `K` is the loop iteration: [`BacktrackingSchedule.step`] is called once per stage-2 iteration (one
fake-score update each; the generator is updated every r-th), as the released DisBack code counts, so its SDXL value
K = 1000 is 200 generator updates at r = 5 (docs/method.md, "Differences from the reference code").

The public reference loop compares its switch against the running step, so it fires at most once, and its pseudocode
tests `idx // interval == 0` (true only while `idx < interval`) where `idx % interval == 0` was meant. Here the
target is a pure function of the number of steps (fixed rule), or advances on a measured signal (adaptive rule), and
the schedule's state is saved and restored with every checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from .scores import EpsFn, Score


@dataclass
class BacktrackingSchedule:
    """
    Which path node the generator is matched against.

    Args:
        num_nodes: nodes the target walks, the teacher included (`N + 1` for DisBack; 1 means "the teacher only",
            as plain DMD and the warm control run: [`MethodPlan`]).
        backtrack_interval: `K`: calls to [`step`] per node (fixed rule; the adaptive rule's upper bound). The
            training steps call `step` once per stage-2 iteration, as the reference does: SDXL K = 1000 iterations.
        backtrack_rule: `"fixed"` (the paper: advance every `interval` steps) or `"adaptive"` (advance when the generator has
            caught up with the current target: the distance reported to [`step`] fell below `backtrack_threshold` times its
            value when the target was set, after at least `min_interval` steps; and at the latest after
            `backtrack_interval` steps).
        backtrack_threshold: adaptive rule: the fraction of the initial distance at which the target advances.
        min_interval: adaptive rule: the least steps spent on a node.
        ema: adaptive rule: smoothing of the reported distance (weight of the history).

    The target, as an index into the reversed path `R` (`1..N`; `N` is the teacher), is [`target`]; as a node index
    of the recorded path (`N-1..0`; 0 is the teacher) it is [`target_node`].

    Example:
        ```py
        >>> schedule = BacktrackingSchedule(num_nodes=11, backtrack_interval=1000)
        >>> schedule.target_node   # P_9: one step back from the most degraded node P_10
        9
        >>> for _ in range(10_000):
        ...     schedule.step()
        >>> schedule.target_node, schedule.at_teacher
        (0, True)
        ```
    """

    num_nodes: int
    backtrack_interval: int = 1000
    backtrack_rule: str = "fixed"
    backtrack_threshold: float = 0.5
    min_interval: int = 1
    ema: float = 0.9
    # state
    steps: int = 0
    target: int = 1
    steps_on_target: int = 0
    reference_distance: float | None = None
    smoothed_distance: float | None = None

    def __post_init__(self):
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1 (the teacher alone is 1), got {self.num_nodes}")
        if self.backtrack_interval < 1:
            raise ValueError(f"backtrack_interval must be >= 1, got {self.backtrack_interval}")
        if self.backtrack_rule not in ("fixed", "adaptive"):
            raise ValueError(f"backtrack_rule must be 'fixed' or 'adaptive', got {self.backtrack_rule!r}")
        if not 0 < self.backtrack_threshold < 1:
            raise ValueError(f"backtrack_threshold must lie in (0, 1), got {self.backtrack_threshold}")
        if self.num_nodes == 1:
            self.target = 0  # DMD: the teacher is R[0] and the only target

    @classmethod
    def from_config(cls, config, num_nodes: int) -> BacktrackingSchedule:
        """The schedule of a [`DisBackConfig`] (`backtrack_interval`, `backtrack_rule`, `backtrack_threshold`)."""
        return cls(
            num_nodes=num_nodes,
            backtrack_interval=config.backtrack_interval,
            backtrack_rule=config.backtrack_rule,
            backtrack_threshold=config.backtrack_threshold,
        )

    @property
    def last(self) -> int:
        """The index of the teacher in the reversed path (`N`)."""
        return self.num_nodes - 1

    @property
    def target_node(self) -> int:
        """The current target as a node index of the recorded path (`P_i`; 0 is the teacher)."""
        return self.last - self.target

    @property
    def at_teacher(self) -> bool:
        return self.target == self.last

    def step(self, distance: float | None = None) -> bool:
        """
        Records one step (call it after each iteration of the loop) and advances the target if the rule says so.
        `distance`: the adaptive rule's signal, on iterations that measured one (e.g. `dm_distance` of
        `distribution_matching_step` on a generator update); iterations without one only count. Returns whether the
        target changed.
        """
        self.steps += 1
        self.steps_on_target += 1
        if self.at_teacher:
            return False
        if self.backtrack_rule == "fixed":
            advance = self.steps_on_target >= self.backtrack_interval
        else:
            if distance is not None:
                d = float(distance)
                self.smoothed_distance = (
                    d if self.smoothed_distance is None else (self.ema * self.smoothed_distance + (1 - self.ema) * d)
                )
                if self.reference_distance is None:
                    self.reference_distance = self.smoothed_distance
            caught_up = (
                self.reference_distance is not None
                and self.smoothed_distance <= self.backtrack_threshold * self.reference_distance
            )
            advance = self.steps_on_target >= self.backtrack_interval or (
                caught_up and self.steps_on_target >= self.min_interval
            )
        if advance:
            self.target += 1
            self.steps_on_target = 0
            self.reference_distance = None
            self.smoothed_distance = None
        return advance

    def state_dict(self) -> dict:
        """Everything needed to resume mid-path (saved with each checkpoint)."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restores [`state_dict`]; the path length and rule must match the run being resumed."""
        for key in ("num_nodes", "backtrack_rule"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint's backtracking schedule has {key}={state[key]!r}, this run has {getattr(self, key)!r}"
                )
        # the position only: settings such as `backtrack_interval` come from this run's arguments
        for key in ("steps", "target", "steps_on_target", "reference_distance", "smoothed_distance"):
            setattr(self, key, state[key])


METHODS = ("disback", "dmd", "warm")


@dataclass(frozen=True)
class MethodPlan:
    """
    What a method (`DisBackConfig.method`) means for stage 2: the one place that decides it, for the training script
    and the benchmarks alike.

    - `"disback"`: the target walks the whole reversed path back to the teacher; the fake score starts at the most
      degraded node `R[0]` (or at the teacher with `fake_score_init="teacher"`).
    - `"dmd"`: no path (stage 1 is skipped); the fake score and the target are the teacher from the start (DMD2).
    - `"warm"`: the control: the fake score starts at the path's last node, but the target is the teacher from the
      start (what the path buys beyond a better-initialised fake score).

    Args:
        method: one of [`METHODS`].
        num_targets: the nodes the target walks, the teacher included ([`BacktrackingSchedule`]'s `num_nodes`).
        fake_score_node: the recorded-path node the fake score starts from (`P_N`, the most degraded), or `None`
            for the teacher.

    Example:
        ```py
        >>> MethodPlan.of("disback", path_length=11)
        MethodPlan(method='disback', num_targets=11, fake_score_node=10)
        >>> MethodPlan.of("warm", path_length=11)
        MethodPlan(method='warm', num_targets=1, fake_score_node=10)
        >>> MethodPlan.of("dmd")
        MethodPlan(method='dmd', num_targets=1, fake_score_node=None)
        ```
    """

    method: str
    num_targets: int
    fake_score_node: int | None

    @staticmethod
    def uses_path(method: str) -> bool:
        """Whether `method` needs a recorded path (stage 1 runs for it)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        return method != "dmd"

    @classmethod
    def of(cls, method: str, path_length: int = 1, fake_score_init: str = "last_node") -> MethodPlan:
        """The plan of `method` on a recorded path of `path_length` nodes (the teacher included; 1 for `"dmd"`)."""
        if not cls.uses_path(method):
            return cls(method, num_targets=1, fake_score_node=None)
        if path_length < 1:
            raise ValueError(f"path_length must be >= 1 (the teacher alone is 1), got {path_length}")
        last = path_length - 1 if path_length > 1 else None  # a path of the teacher alone has no degraded node
        if method == "warm":
            return cls(method, num_targets=1, fake_score_node=last)
        return cls(method, num_targets=path_length, fake_score_node=last if fake_score_init == "last_node" else None)

    def schedule(self, config) -> BacktrackingSchedule:
        """The stage-2 schedule of this plan with a [`DisBackConfig`]'s `backtrack_*` settings."""
        return BacktrackingSchedule.from_config(config, num_nodes=self.num_targets)


INTERMEDIATE_CFG = ("none", "node", "teacher")


def target_score(
    schedule: BacktrackingSchedule,
    node_eps: Callable[[int], EpsFn],
    teacher: Score,
    guidance_scale: float,
    intermediate_cfg: str = "node",
) -> tuple[Score, float]:
    """
    The distribution-matching target of the schedule's current node and the CFG scale to use with it.

    The teacher is always guided with `guidance_scale`. An intermediate node (`node_eps(i)` gives its eps callable)
    was fine-tuned on conditional inputs only, so its guidance is a choice (docs/method.md, "CFG on intermediate nodes"):
    `"node"` (the node's own unconditional branch, the default: unguided nodes measure next to the generator on a
    text-to-image teacher with CFG), `"none"` (no CFG; the best of the three on 8x8 digits) or `"teacher"` (the
    teacher's unconditional branch; it collapsed DisBack on digits).
    """
    if intermediate_cfg not in INTERMEDIATE_CFG:
        raise ValueError(f"intermediate_cfg must be one of {INTERMEDIATE_CFG}, got {intermediate_cfg!r}")
    if schedule.at_teacher:
        return teacher, guidance_scale
    return node_target(node_eps(schedule.target_node), teacher, guidance_scale, intermediate_cfg)


def node_target(node: EpsFn, teacher: Score, guidance_scale: float, intermediate_cfg: str) -> tuple[Score, float]:
    """An intermediate path node `node` (its eps callable) as a distribution-matching target, with the CFG scale
    `intermediate_cfg` gives it (see [`target_score`]); the path profile measures nodes the same way."""
    if intermediate_cfg not in INTERMEDIATE_CFG:
        raise ValueError(f"intermediate_cfg must be one of {INTERMEDIATE_CFG}, got {intermediate_cfg!r}")
    if intermediate_cfg == "none":
        return Score(node, teacher.schedule), 1.0
    uncond_fn = teacher.eps_fn if intermediate_cfg == "teacher" else None
    return Score(node, teacher.schedule, uncond=teacher.uncond, uncond_fn=uncond_fn), guidance_scale
