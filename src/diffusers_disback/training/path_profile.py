"""The path profile for the training script's teachers (SDXL and SD3; any family with the `FrozenSDXL` interface): the
probe built from the frozen teacher, the initial generator and a few captions; the distance of a live degrading
network to the teacher (stage 1 logs it per node); the profile of a
recorded path (stage 1's end and `disback path-profile`); and, on the shapes world, each node judged as a diffusion
model. The measure is `diffusers_disback.distill.profile`'s (docs/method.md, "The path profile").
"""

from __future__ import annotations

import copy
import os

import torch

from .._io import atomic_write
from ..distill import DegradationPath, DisBackConfig, NodeSwitcher, Score, SharedBase, one_step_sample
from ..distill.profile import PathProfile, ScoreProbe, pairwise_distances, path_targets, sample, score_distance
from .sdxl import FrozenSDXL

PROFILE_PLOT = "path_profile.png"
TEACHER_SAMPLER_STEPS = 25  # DDIM (flow: Euler) steps of the teacher's probe samples
PROBE_FOLDER = "probe"  # subfolder of a candidates path: each candidate's probe predictions, by stage-1 step


class PathProfiler:
    """
    Measures distances between the teacher, path nodes and a live network on one fixed probe.

    Args:
        frozen: the teacher's frozen parts ([`FrozenSDXL`] or `FrozenSD3`).
        generator: the initial generator's UNet (its one-step samples are half the probe).
        prompts: the probe's captions (each gives one generator and one teacher sample).
        config: the run's settings: `guidance_scale`, `intermediate_cfg`, `conditioning_timestep`, the DM loss's
            t-range and `path_profile_timesteps`.
        device: where the networks run.
        seed: the probe's noise (independent of the training noise: measuring never moves a run's randomness).
        shared: the run's [`SharedBase`] (the frozen teacher holding the LoRA adapters), if it has one: a LoRA path's
            nodes are then measured as adapters of it, removed afterwards, instead of on a copy of the teacher.
    """

    def __init__(
        self,
        frozen: FrozenSDXL,
        generator: torch.nn.Module,
        prompts: list[str],
        config: DisBackConfig,
        device: torch.device | str,
        seed: int = 0,
        batch_size: int = 32,
        shared: SharedBase | None = None,
    ):
        if not prompts:
            raise ValueError("the path profile needs at least one caption")
        self.frozen, self.config, self.shared = frozen, config, shared
        schedule = frozen.noise_schedule
        cond = frozen.conditioner(list(prompts), device)
        rng = torch.Generator().manual_seed(seed)
        shape = (len(prompts), *frozen.latent_shape(frozen.conditioner.resolution))
        z_gen, z_teacher = (torch.randn(shape, generator=rng).to(device) for _ in range(2))
        teacher_pred = frozen.score_fn(frozen.teacher, autocast=False)
        self.teacher = lambda c: Score(teacher_pred, schedule, uncond=frozen.conditioner.uncond(c))
        with torch.no_grad():
            gen_pred = frozen.score_fn(generator, autocast=False)
            t_c = frozen.generator_timestep(config.conditioning_timestep)
            x_gen = one_step_sample(gen_pred, z_gen, cond, schedule, t_c).float()
            x_teacher = sample(self.teacher(cond), z_teacher, cond, config.guidance_scale, TEACHER_SAMPLER_STEPS)
        min_step, max_step = config.timestep_range(schedule.num_train_timesteps)
        self.probe = ScoreProbe.build(
            schedule, x_gen, x_teacher, cond, min_step, max_step, config.path_profile_timesteps, seed, batch_size
        )
        self.teacher_predictions = self.probe.predictions(lambda c: (self.teacher(c), config.guidance_scale))

    def predictions(self, unet: torch.nn.Module) -> torch.Tensor:
        """The probe predictions of `unet` guided as an intermediate target is (`--intermediate_cfg`)."""
        pred = self.frozen.score_fn(unet, autocast=False)
        target = path_targets(self.teacher, lambda _: pred, self.config.guidance_scale, self.config.intermediate_cfg)
        return self.probe.predictions(target(1))

    def distance(self, unet: torch.nn.Module) -> float:
        """`d(unet, teacher)` ([`predictions`] against the teacher's)."""
        return score_distance(self.predictions(unet), self.teacher_predictions)

    def node_predictions(self, path: DegradationPath) -> list[torch.Tensor]:
        """The probe predictions of every node of `path` (the teacher first): those [`save_predictions`] kept beside
        it, as measured when the node was recorded; the others computed with each node loaded as stage 2 loads it."""
        kept = [load_predictions(path, node.step) for node in path.nodes[1:]]
        if all(p is not None for p in kept):
            return [self.teacher_predictions, *(p.to(self.teacher_predictions.device) for p in kept)]
        borrow = self.shared is not None and path.kind == "lora"
        base = self.shared if borrow else copy.deepcopy(self.frozen.teacher)
        switcher = NodeSwitcher(path, base, teacher=self.frozen.teacher)
        w, cfg = self.config.guidance_scale, self.config.intermediate_cfg
        score_fn = self.frozen.score_fn
        targets = path_targets(self.teacher, lambda i: score_fn(switcher.activate(i), autocast=False), w, cfg)
        try:
            return [self.teacher_predictions] + [self.probe.predictions(targets(i)) for i in range(1, len(path))]
        finally:
            if borrow:
                switcher.close()

    def profile(
        self,
        path: DegradationPath,
        candidates: DegradationPath | None = None,
        predictions: list[torch.Tensor] | None = None,
    ) -> PathProfile:
        """The profile of every node of `path` (from `predictions` if given: [`node_predictions`]), with the
        distances `candidates` recorded if the path was placed by distance."""
        predictions = predictions or self.node_predictions(path)
        w, cfg = self.config.guidance_scale, self.config.intermediate_cfg
        profile = PathProfile.from_predictions([n.step for n in path.nodes], predictions, w, cfg)
        if candidates is not None:
            profile.candidates = [{"step": n.step, "to_teacher": n.distance} for n in candidates.nodes[1:]]
            matrix = pairwise_distances(self.node_predictions(candidates))  # from the kept predictions: no pass
            profile.candidate_distances = [[round(float(d), 6) for d in row] for row in matrix]
        return profile


def _predictions_file(path: DegradationPath, step: int) -> str:
    return os.path.join(path.directory, PROBE_FOLDER, f"step_{step:06d}.safetensors")


def save_predictions(path: DegradationPath, step: int, predictions: torch.Tensor) -> str:
    """Keeps a node's probe predictions (measured on the live network as it was recorded) beside `path`, so that
    placing nodes by distance needs no second probe pass; written atomically, replacing a file of the same step (a
    resumed stage 1 records its nodes after the checkpoint again)."""
    from safetensors.torch import save_file

    file = _predictions_file(path, step)
    return atomic_write(file, lambda tmp: save_file({"predictions": predictions.detach().cpu().contiguous()}, tmp))


def load_predictions(path: DegradationPath, step: int) -> torch.Tensor | None:
    """The probe predictions [`save_predictions`] kept for the node of stage-1 step `step`, or None."""
    from safetensors.torch import load_file

    file = _predictions_file(path, step)
    return load_file(file)["predictions"] if os.path.isfile(file) else None


def write_profile(path: DegradationPath, profile: PathProfile) -> str:
    """Stores `profile` in the path's manifest and its plot next to it; returns the plot's file."""
    path.set_profile(profile)
    return profile.plot(os.path.join(path.directory, PROFILE_PLOT))


def judge_nodes(path: DegradationPath, teacher: str, output_dir: str, num_inference_steps: int = 25,
                guidance_scale: float = 5.0, **call) -> dict[int, dict]:  # fmt: skip
    """
    Shapes world: every node of `path` sampled as a diffusion model (`num_inference_steps` Euler steps, CFG
    `guidance_scale`, every caption of the world, image i seeded i) and read back by the shapes judge: `{index:
    {"accuracy", "fd"}}`, FD in the judge's features to the teacher's own samples (node 0). `teacher` is an SDXL or
    an SD3 pipeline (the latter sampled by its own flow-matching scheduler; `call` passes e.g. `max_sequence_length`).
    """
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from ..evaluation import CaptionSet, ReferenceImages, evaluate, get_protocol

    protocol = get_protocol("shapes").replace(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    index = DiffusionPipeline.load_config(teacher)
    if "transformer" in index:  # SD3 / SD3.5; a folder without T5 loads with text_encoder_3=None
        missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if (index.get(k) or [None])[0] is None}
        pipe = StableDiffusion3Pipeline.from_pretrained(teacher, torch_dtype=torch.float32, **missing)
        denoiser = pipe.transformer
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(teacher, torch_dtype=torch.float32)
        denoiser = pipe.unet
    pipe.set_progress_bar_config(disable=True)
    base = copy.deepcopy(denoiser)
    results, reference = {}, None
    for node in path.nodes:
        if node.index:
            denoiser.load_state_dict(path.merged_state_dict(base, node.index))
        out = os.path.join(output_dir, f"node_{node.index:03d}")
        record = evaluate(pipe, CaptionSet.from_shapes(), out, protocol, reference=reference, progress=False, **call)
        if reference is None:
            reference = ReferenceImages.from_folder(os.path.join(out, "images"))
        metrics = record["metrics"]
        results[node.index] = {
            "accuracy": metrics["shapes_accuracy"],
            "fd": metrics["shapes_fd"] if node.index else 0.0,
        }
    return results
