"""The training steps written once (`distill.engine`): their update order, and that the SDXL script and the benchmarks
run the same iteration (equal weights on the same tiny inputs)."""

import argparse
import copy
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from diffusers_disback.distill import (
    BacktrackingSchedule,
    BacktrackingStep,
    DegradationPath,
    DisBackConfig,
    NodeSwitcher,
    NoiseSchedule,
    OptimizerUpdate,
    Score,
    one_step_sample,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
PROMPTS = os.path.join(ROOT, "examples", "train_disback", "data", "demo_prompts.txt")


class _Linear(torch.nn.Module):
    """eps(x_t, t, cond) = W x_t: enough to see which samples each update used."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.eye(2) * 0.5)

    def forward(self, x_t, t, cond):
        return x_t @ self.w


def test_generator_first_on_every_rth_iteration_then_the_fake_score_on_the_same_samples():
    schedule = NoiseSchedule.ddpm()
    gen, fake, teacher = _Linear(), _Linear(), _Linear().requires_grad_(False)
    calls, seen = [], {}

    def update(name, loss):
        calls.append(name)
        return True

    def generate(z, cond):
        seen.setdefault(len(calls), []).append(z)
        return one_step_sample(gen, z, cond, schedule)

    real_fake_score = Score(fake, schedule)

    def fake_eps(x_t, t, cond):  # records the samples the fake score is trained on
        return real_fake_score.eps(x_t, t, cond)

    backtracking = BacktrackingSchedule(num_nodes=1)
    step = BacktrackingStep(
        generator=generate,
        fake_score=Score(fake_eps, schedule),
        target=lambda cond: (Score(teacher, schedule), 1.0),
        schedule=backtracking,
        update=update,
        rng=torch.Generator().manual_seed(0),
        fake_score_update_ratio=3,
    )
    for i in range(7):
        step(i, (None, torch.randn(4, 2)))
    # one generator sample per iteration (the generator's update and the fake score's share it), the generator
    # updated first on iterations 0, 3, 6
    assert calls == ["generator", "fake_score", "fake_score", "fake_score", "generator", "fake_score", "fake_score",
                     "fake_score", "generator", "fake_score"]  # fmt: skip
    assert sum(len(v) for v in seen.values()) == 7
    assert backtracking.steps == 7


def test_optimizer_update_skips_non_finite_and_clips():
    net = _Linear()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    update = OptimizerUpdate({"g": opt}, {"g": list(net.parameters())}, max_grad_norm=0.1,
                             finite=lambda name, loss: bool(torch.isfinite(loss)))  # fmt: skip
    before = net.w.detach().clone()
    assert update("g", net.w.sum() * float("nan")) is False and torch.equal(net.w, before)
    assert update("g", (net.w * 100).sum()) is True
    assert torch.linalg.vector_norm(net.w.detach() - before) <= 0.1 + 1e-6  # clipped to 0.1, lr 1
    assert update.updates == {"g": 1}


def test_the_benchmarks_and_the_sdxl_script_run_the_same_iteration(tmp_path):
    """Stage 2 of the SDXL script (accelerate, fp32) and `benchmarks/common.backtrack` (plain PyTorch), from the same
    path, prompts, noise and settings, end with the same generator weights, bit for bit."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import common

    from diffusers_disback.distill import add_config_arguments
    from diffusers_disback.testing import save_tiny_teacher
    from diffusers_disback.training import FrozenSDXL, PromptStream, SDXLConditioner, unet_eps_fn

    teacher_dir = save_tiny_teacher(str(tmp_path / "teacher"))
    frozen = FrozenSDXL.from_pretrained(teacher_dir, 64)
    teacher, noise_schedule = frozen.teacher, frozen.noise_schedule
    # a one-node path: the teacher nudged, so that the first target is not the teacher
    path = DegradationPath.create(tmp_path / "path", teacher)
    node = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in node.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    path.add_node(node, 1)

    settings = ["--max_train_steps", "4", "--fake_score_update_ratio", "2", "--backtrack_interval", "2",
                "--learning_rate", "1e-3", "--lr_warmup_steps", "2", "--train_batch_size", "2", "--guidance_scale",
                "2", "--conditioning_timestep", "499"]  # fmt: skip
    out = tmp_path / "script"
    cmd = [sys.executable, SCRIPT, "--pretrained_teacher_model", teacher_dir, "--output_dir", str(out),
           "--stage", "backtracking", "--path_dir", str(tmp_path / "path"), "--resolution", "64",
           "--train_data_files", PROMPTS, "--shuffle_buffer", "4", "--report_to", "none", "--validation_steps", "0",
           "--checkpointing_steps", "100", "--mixed_precision", "no", *settings]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script_weights = load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))

    # the same run through the benchmarks' loop: the script's data order and noise, the same settings
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)  # the script's DisBack flags
    config = DisBackConfig.from_dict(vars(parser.parse_args(settings)))
    conditioner = frozen.conditioner
    prompts = PromptStream(data_files=PROMPTS, shuffle_buffer=4, seed=0)
    rng = torch.Generator().manual_seed(0)

    def next_batch():
        cond = conditioner(prompts.take(2), "cpu")
        return cond, torch.randn((2, 4, 8, 8), generator=rng)

    generator = frozen.load_generator(None).requires_grad_(True).train()
    fake = frozen.load_unet_fp32()
    fake.load_state_dict(path.merged_state_dict(fake, 1))
    generator_eps = unet_eps_fn(generator)
    common.backtrack(
        generator,
        lambda z, cond: one_step_sample(generator_eps, z, cond, noise_schedule, 499),
        fake,
        lambda cond: Score(unet_eps_fn(teacher), noise_schedule, uncond=SDXLConditioner.uncond(cond)),
        NodeSwitcher(path, copy.deepcopy(teacher), teacher=teacher),
        len(path),
        noise_schedule,
        config,
        next_batch,
        rng,
        eps_fn=unet_eps_fn,
    )
    trained = generator.state_dict()
    assert any(not torch.equal(trained[k], teacher.state_dict()[k]) for k in trained)  # it trained
    for k, v in trained.items():
        torch.testing.assert_close(script_weights[k], v, rtol=0, atol=0, msg=k)
