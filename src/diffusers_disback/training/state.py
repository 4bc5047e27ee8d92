"""Where a run is, and how it is saved and resumed: [`RunState`], checkpoint save/restore, and the one resume plan.

A checkpoint folder `OUTPUT_DIR/checkpoints/checkpoint-<global step>/` holds accelerate's state (models, optimizers,
LR schedulers, RNGs; sharded under FSDP), `run_state.json` ([`RunState`]), and per rank `data_<rank>.json` (stream
positions) and `noise_rng_<rank>.safetensors` (the training noise generator). It is written as `<name>.tmp` and
renamed, so a run killed mid-write leaves the previous checkpoint as the last good one.

[`plan_resume`] reads a checkpoint once and says what every stage does with it ([`ResumePlan`]); nothing else opens
`run_state.json`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

STAGES = ("degradation", "backtracking")


@dataclass
class RunState:
    """Where a run is, written as `run_state.json` into every checkpoint: stage, steps and the backtracking schedule's
    position (the streams' positions and the noise generator are saved per rank beside it). A checkpoint taken at the
    end of stage 1 says `stage="backtracking", stage_step=0`."""

    stage: str = "degradation"
    stage_step: int = 0
    global_step: int = 0
    backtracking: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.stage = state["stage"]
        self.stage_step = int(state["stage_step"])
        self.global_step = int(state["global_step"])
        self.backtracking = dict(state["backtracking"])


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The finished checkpoints of a run, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("checkpoint-") and not d.endswith(".tmp")]
    return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


@dataclass(frozen=True)
class ResumePlan:
    """
    What a run does with its checkpoint, decided once from `run_state.json` ([`plan_resume`]).

    Attributes:
        checkpoint: the checkpoint folder, or None (a fresh run).
        state: the run state saved in it (a fresh [`RunState`] without one).
        stages: the stages this run executes, in order.
    """

    checkpoint: str | None = None
    state: RunState = field(default_factory=RunState)
    stages: tuple[str, ...] = STAGES

    def resumes(self, stage: str) -> bool:
        """Whether `stage` continues from the checkpoint (its streams and noise; models too if [`restores_models`])."""
        return self.checkpoint is not None and self.state.stage == stage

    def restores_models(self, stage: str) -> bool:
        """Whether the checkpoint holds `stage`'s models and optimizers: it was taken inside that stage. A checkpoint
        at the end of stage 1 (stage 2, step 0) holds stage-1 models: stage 2 starts them afresh."""
        return self.resumes(stage) and self.state.stage_step > 0

    @property
    def path_truncation(self) -> int | None:
        """Stage 1 resumed: the path nodes recorded after this step are dropped and recorded again."""
        return self.state.stage_step if self.resumes("degradation") else None


def plan_resume(resume_from_checkpoint: str | None, output_dir: str, stage: str = "all") -> ResumePlan:
    """
    Reads the checkpoint once (`"latest"`: the newest of `output_dir`, or a fresh run if there is none) and returns
    the plan: which stages run and which of them resume. Refuses a mid-stage-1 checkpoint with `stage="backtracking"`.
    """
    stages = STAGES if stage == "all" else (stage,)
    if resume_from_checkpoint is None:
        return ResumePlan(stages=stages)
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            return ResumePlan(stages=stages)
        checkpoint = found[-1]
    else:
        checkpoint = resume_from_checkpoint
    state_file = os.path.join(checkpoint, "run_state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint of this script (no run_state.json)")
    state = RunState()
    with open(state_file, encoding="utf-8") as f:
        state.load_state_dict(json.load(f))
    if state.stage == "degradation" and stages == ("backtracking",):
        raise ValueError(
            f"{checkpoint} is a stage-1 checkpoint that did not finish the path; resume it with --stage "
            "degradation or --stage all, not --stage backtracking"
        )
    if state.stage == "backtracking":  # stage 1 is done
        stages = tuple(s for s in stages if s != "degradation")
    return ResumePlan(checkpoint, state, stages)


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    accelerator,
    output_dir: str,
    state: RunState,
    rng: torch.Generator,
    streams: dict,
    total_limit: int | None = None,
) -> str:
    """
    `accelerator.save_state` (models, optimizers, schedulers, RNGs; sharded under FSDP) plus the run state, this
    rank's stream positions (`streams`: name -> object with `state_dict`, or None) and noise generator, into
    `checkpoint-<global step>.tmp`, then an atomic rename and rotation to `total_limit`. A failed write (full disk,
    quota) on any rank removes the partial folder on every rank and raises, naming the last good checkpoint.
    Returns the checkpoint folder.
    """
    acc = accelerator
    name = f"checkpoint-{state.global_step}"
    final = os.path.join(output_dir, "checkpoints", name)
    tmp = final + ".tmp"
    if acc.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    rank, error = acc.process_index, None
    try:
        acc.save_state(tmp)
        save_file({"noise_rng": rng.get_state()}, os.path.join(tmp, f"noise_rng_{rank}.safetensors"))
        positions = {k: (v.state_dict() if v is not None else None) for k, v in streams.items()}
        with open(os.path.join(tmp, f"data_{rank}.json"), "w") as f:
            json.dump(positions, f)
    except OSError as e:  # a full disk, a quota, a vanished mount
        error = e
    if bool(acc.gather(torch.tensor([float(error is not None)], device=acc.device)).max() > 0):
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        good = checkpoint_dirs(output_dir)
        raise RuntimeError(
            f"writing {name} failed ({error or 'on another rank'}); the run stops here. The last good checkpoint "
            f"is {good[-1] if good else 'none (nothing was saved yet)'}: free space and resume with "
            "--resume_from_checkpoint latest."
        ) from error
    acc.wait_for_everyone()
    if acc.is_main_process:
        with open(os.path.join(tmp, "run_state.json"), "w") as f:
            json.dump(state.state_dict(), f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def restore_checkpoint(accelerator, plan: ResumePlan, stage: str, rng: torch.Generator, streams: dict) -> RunState:
    """
    Restores what `plan` says `stage` takes from its checkpoint: the accelerate state if [`ResumePlan.restores_models`],
    and always this rank's stream positions and noise generator. Returns the run state to continue from (a copy: the
    plan itself never changes as the run goes on).
    """
    checkpoint = plan.checkpoint
    if plan.restores_models(stage):
        accelerator.load_state(checkpoint)
    rank = accelerator.process_index
    with open(os.path.join(checkpoint, f"data_{rank}.json"), encoding="utf-8") as f:
        positions = json.load(f)
    for key, stream in streams.items():
        if stream is not None and positions.get(key):
            stream.load_state_dict(positions[key])
    rng.set_state(load_file(os.path.join(checkpoint, f"noise_rng_{rank}.safetensors"))["noise_rng"])
    logger.info(f"resumed from {checkpoint}: stage {plan.state.stage}, stage step {plan.state.stage_step}")
    state = RunState()
    state.load_state_dict(plan.state.state_dict())
    return state
