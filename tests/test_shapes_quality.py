"""Quality, not only mechanics: the SDXL training script distills the shapes teacher (a real text-to-image model in the
SDXL architecture, `examples/shapes/teacher`) into a one-step generator whose images match their prompts, as read
by the shapes judge. A silent error in the SDXL glue (conditioning, time ids, CFG, VAE scaling, timesteps, the path)
makes this fail. The same for the SD3 script on the flow-matching shapes teacher (`examples/shapes/teacher_sd3`)."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_disback import DisBackPipeline, DisBackSD3Pipeline
from diffusers_disback.evaluation import default_judge, judge_images
from diffusers_disback.shapes import all_scenes, distill_arguments, write_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
TEACHER = os.path.join(ROOT, "examples", "shapes", "teacher")
SD3_SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sd3.py")
SD3_TEACHER = os.path.join(ROOT, "examples", "shapes", "teacher_sd3")


def _one_step_metrics(pipe) -> dict[str, float]:
    pipe.set_progress_bar_config(disable=True)
    captions = [s.caption for s in all_scenes()]
    images = []
    for start in range(0, len(captions), 48):
        chunk = captions[start : start + 48]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(chunk, generator=generators, height=64, width=64).images
    return judge_images(default_judge(), images, captions)


def _one_step_accuracy(pipe) -> float:
    return _one_step_metrics(pipe)["accuracy/all"]


def _distill(tmp_path, script: str, teacher: str, **recipe):
    """`script` on the shapes world's training captions with the shapes recipe (`recipe` replaces its flags), without
    checkpoints or validation; returns the run's folder."""
    out = tmp_path / "run"
    args = distill_arguments(**recipe, checkpointing_steps=1000, checkpoints_total_limit=None, validation_steps=0,
                             report_to="none")  # fmt: skip
    prompts = write_prompts(str(tmp_path / "prompts.txt"), "train")
    cmd = [sys.executable, script, "--pretrained_teacher_model", teacher, "--output_dir", str(out),
           "--train_data_files", prompts, *args]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# the one-GPU mode (every network an adapter of the frozen teacher, docs/training.md "One frozen base") needs a 10x
# learning rate and twice the iterations to clear the same bar: at 300 iterations rank 64 reaches 0.39 at lr 1e-3 and
# 0.18 at lr 1e-4; at 600 iterations 0.49-0.50 at lr 1e-3, 0.40 at lr 2e-3 (measured on the 2-core CPU machine)
MODES = {
    "full": dict(max_train_steps=300, backtrack_interval=100, learning_rate=1e-4),
    "lora": dict(max_train_steps=600, backtrack_interval=200, learning_rate=1e-3, lora_rank=64,
                 path_node_type="lora", path_lora_rank=64),
}  # fmt: skip


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_script_distills_the_shapes_teacher_into_a_one_step_generator_that_follows_prompts(tmp_path, mode):
    # the shapes recipe on make demo's budget; t_c: the script's default, 399
    out = _distill(tmp_path, SCRIPT, TEACHER, degradation_steps=40, path_interval=20, **MODES[mode],
                   conditioning_timestep=None)  # fmt: skip
    distilled = _one_step_accuracy(DisBackPipeline.from_pretrained(out / "final"))
    # the same teacher used as a one-step generator before distillation: 0.15 (measured), the distilled one 0.73
    teacher = DisBackPipeline.from_pretrained(out / "final")
    teacher.unet.load_state_dict(UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet").state_dict())
    before = _one_step_accuracy(teacher)
    assert before < 0.3, before
    assert distilled >= 0.45 and distilled - before >= 0.25, (distilled, before)


def test_the_sd3_script_distills_the_flow_matching_shapes_teacher(tmp_path):
    """DMD through `train_disback_sd3.py` (400 iterations, the shapes recipe, sigma 1, the teacher's 8 zero T5 tokens).
    The teacher is weak at colour (0.61 at 28 steps, CFG 5) and its undistilled one-step image, the prompt-conditional
    mean, already gets colour, position and background: all-attribute accuracy 0.417 before, 0.521 for the teacher,
    too small a gap for a threshold with a margin. Shape is where the one step fails: 0.722 before, 0.88-0.92 after
    250-500 DMD iterations on every seed measured (benchmarks/shapes_compare.py --family sd3; the teacher 0.917).
    Measured here on the 2-core CPU machine: shape 0.722 -> 0.910, all attributes 0.417 -> 0.472."""
    out = _distill(tmp_path, SD3_SCRIPT, SD3_TEACHER, max_train_steps=400, conditioning_timestep=1000,
                   max_sequence_length=8, method="dmd", stage="backtracking")  # fmt: skip
    distilled = DisBackSD3Pipeline.from_pretrained(out / "final")
    assert distilled.default_max_sequence_length == 8
    after = _one_step_metrics(distilled)
    from diffusers import SD3Transformer2DModel

    distilled.transformer.load_state_dict(
        SD3Transformer2DModel.from_pretrained(SD3_TEACHER, subfolder="transformer").state_dict()
    )
    before = _one_step_metrics(distilled)  # the teacher as a one-step generator
    assert before["accuracy/shape"] < 0.78, before
    assert after["accuracy/shape"] >= 0.82 and after["accuracy/shape"] - before["accuracy/shape"] >= 0.1, (
        after,
        before,
    )
    assert after["accuracy/all"] >= before["accuracy/all"] - 0.03, (after, before)  # and nothing else got worse
