"""The training loop on an SD3-shaped teacher (a flow-matching MMDiT, 16 latent channels, no T5) at tiny size, through
`train_disback_sd3.py`: both stages, the one-step pipeline it writes, the shared-base LoRA mode under bf16, resume
after kill -9, and what the scripts refuse."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_disback.distill import DegradationPath
from diffusers_disback.testing import save_tiny_sd3_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sd3.py")
SDXL_SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
PROMPTS = os.path.join(ROOT, "examples", "train_disback", "data", "demo_prompts.txt")
TINY = [
    "--resolution", "64", "--degradation_steps", "4", "--path_interval", "2", "--max_train_steps", "6",
    "--fake_score_update_ratio", "2", "--backtrack_interval", "2", "--checkpointing_steps", "2",
    "--validation_steps", "3", "--learning_rate", "1e-4", "--lr_warmup_steps", "0", "--train_batch_size", "2",
    "--train_data_files", PROMPTS, "--shuffle_buffer", "4", "--path_profile_prompts", "2",
]  # fmt: skip
SD3_ONLY = ["--max_sequence_length", "16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_sd3_teacher(str(tmp_path_factory.mktemp("teacher") / "tiny-sd3"))


def _cmd(teacher, out, *extra, script=SCRIPT):
    own = SD3_ONLY if script == SCRIPT else []
    return [
        sys.executable,
        script,
        "--pretrained_teacher_model",
        teacher,
        "--output_dir",
        str(out),
        *TINY,
        *own,
        *extra,
    ]


def _run(cmd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _final(out):
    return load_file(os.path.join(out, "final", "transformer", "diffusion_pytorch_model.safetensors"))


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(r, f) for r, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events")]
    acc = EventAccumulator(events[0])
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def full_run(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3-full")
    proc = _run(_cmd(teacher, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_both_stages_on_a_flow_teacher(teacher, full_run):
    out, proc = full_run
    path = DegradationPath.load(out / "path")
    assert [n.step for n in path.nodes] == [0, 2, 4]
    a, b = path.node_state_dict(1), path.node_state_dict(2)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the path moved
    assert path.nodes[1].distance > 0 and path.nodes[2].distance > path.nodes[1].distance * 0.5
    state = json.loads((out / "checkpoints" / "checkpoint-10" / "run_state.json").read_text())
    assert state["stage_step"] == 6 and state["backtracking"]["target"] == 2
    # the generator trained: the final transformer is not the teacher
    base = load_file(os.path.join(teacher, "transformer", "diffusion_pytorch_model.safetensors"))
    final = _final(out)
    assert set(final) == set(base) and any(not torch.equal(final[k], base[k]) for k in base)
    # the flow schedules are logged once, with the shift each use applies (stage 1: the teacher's 3.0)
    assert "'denoising': {'schedule': 'flow'" in proc.stderr and "'shift': 3.0" in proc.stderr
    assert len(_scalars(out, "backtracking/dm_distance")) == 3
    assert all(v > 0 for _, v in _scalars(out, "backtracking/dm_distance"))
    # the saved pipeline: SD3's layout, one step from sigma = 1
    index = json.loads((out / "final" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    assert (out / "validation" / "step-00000007.png").is_file()
    card = (out / "final" / "README.md").read_text()
    assert "Degradation path" in card


def test_final_pipeline_is_the_generator_in_one_step(teacher, full_run):
    """The saved pipeline's one-step image is the generator's `x0 = z - v(z, sigma=1)` decoded: the training loop's
    sample and the pipeline's are the same computation."""
    from diffusers_disback import DisBackSD3Pipeline
    from diffusers_disback.distill import DisBackConfig, one_step_sample
    from diffusers_disback.training import FrozenSD3, transformer_flow_fn

    out, _ = full_run
    pipe = DisBackSD3Pipeline.from_pretrained(out / "final")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.default_max_sequence_length == 16  # the run's --max_sequence_length, recorded in the folder
    z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    image = pipe("a cat", latents=z, output_type="pt").images  # the recorded length, not diffusers' 256
    frozen = FrozenSD3.from_pretrained(teacher, 64, DisBackConfig(), max_sequence_length=16)
    cond = frozen.conditioner(["a cat"], "cpu")
    x0 = one_step_sample(transformer_flow_fn(pipe.transformer), z, cond, frozen.noise_schedule, 1.0)
    vae = pipe.vae
    expected = vae.decode(frozen.decode_latents(vae, x0)).sample.clamp(-1, 1).add(1).div(2)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)


def test_shared_base_lora_bf16_on_a_flow_teacher(teacher, tmp_path):
    """LoRA on one shared base under bf16: the base and the path nodes are bf16, the trained adapters fp32; the
    adapters sit on SD3's DreamBooth targets (the context stream's projections too) and the generator moves at the
    real learning rate."""
    from test_train import adapter_dtypes

    out = tmp_path / "lora"
    args = ["--lora_rank", "4", "--path_node_type", "lora", "--path_lora_rank", "4", "--mixed_precision", "bf16"]
    proc = _run(_cmd(teacher, out, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = load_file(out / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert adapter_dtypes(shared) == {"base": {torch.bfloat16}, "node_1": {torch.bfloat16}, "node_2": {torch.bfloat16},
                      "generator": {torch.float32}, "fake_score": {torch.float32}}  # fmt: skip
    targets = {k.split(".lora_")[0].split("attn.")[1] for k in shared if ".generator." in k}
    assert targets == {"add_k_proj", "add_q_proj", "add_v_proj", "to_add_out", "to_k", "to_out.0", "to_q", "to_v"}
    base = load_file(os.path.join(teacher, "transformer", "diffusion_pytorch_model.safetensors"))
    final = _final(out)
    moved = [k for k in final if not torch.equal(final[k], base[k])]
    assert moved and all(".attn." in k and k.endswith(".weight") for k in moved)
    # three generator updates at lr 1e-4 with Adam move a merged weight by about 3e-4 (B starts at zero)
    largest = max((final[k] - base[k]).abs().max().item() for k in moved)
    assert 1e-5 < largest < 1e-2
    # the generator's adapter in diffusers' SD3 LoRA format: the stock teacher pipeline + it is the final generator
    from diffusers import StableDiffusion3Pipeline

    from diffusers_disback import DisBackSD3Pipeline
    from diffusers_disback.lora_export import RUN_ADAPTER_DIR

    stock = StableDiffusion3Pipeline.from_pretrained(teacher, text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(out / "final" / RUN_ADAPTER_DIR))
    ours = DisBackSD3Pipeline.from_pretrained(out / "final")
    kwargs = dict(num_inference_steps=1, guidance_scale=0.0, max_sequence_length=16, output_type="np")
    a = stock("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = ours("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(a - b).max() < 1e-4
    # `disback export-lora` copies that adapter as it is and writes the SD3 card
    from diffusers_disback.cli import main

    assert main(["export-lora", str(out / "final"), "--output", str(tmp_path / "exported"), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "exported" / "lora_export.json").read_text())
    assert report["source"] == "adapter" and report["settings"]["family"] == "sd3" and report["kohya_file"] is None
    assert report["summary"]["layers"] == len({k.split(".lora_")[0] for k in shared if ".generator." in k})
    assert "stable-diffusion-3" in (tmp_path / "exported" / "README.md").read_text()


def test_export_lora_extracts_an_sd3_generator_by_svd(teacher, full_run, tmp_path):
    """A fully fine-tuned SD3 generator as a transformer LoRA over its teacher: at full energy with biases, the stock
    teacher pipeline with the LoRA gives the generator's one-step image."""
    from diffusers_disback.lora_export import export_lora

    out, _ = full_run
    result = export_lora(out / "final", tmp_path / "lora", base_model=teacher, energy=1.0, biases=True,
                         check_prompts=["a cat", "a red car"])  # fmt: skip
    assert result.source == "svd" and result.kohya_file is None and result.layers
    assert not (tmp_path / "lora" / "pytorch_lora_weights_kohya.safetensors").exists()
    assert max(layer.relative_error for layer in result.layers) < 1e-4
    assert result.one_step_difference["max_abs"] < 1e-3, (result.one_step_difference, result.not_representable)
    low = export_lora(out / "final", tmp_path / "low", base_model=teacher, rank=1, check_prompts=["a cat"])
    assert low.size_bytes < result.size_bytes and max(low.ranks) == 1


def test_kill_and_resume_equals_uninterrupted(teacher, full_run, tmp_path):
    from test_train import _kill_when

    out = tmp_path / "run"
    cmd = _cmd(teacher, out)
    _kill_when(cmd, str(out / "checkpoints" / "checkpoint-6"))  # stage 2 begun
    proc = _run(cmd + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _final(full_run[0]), _final(out)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_scripts_name_the_family_they_need(teacher, tmp_path):
    proc = _run(_cmd(teacher, tmp_path / "wrong", script=SDXL_SCRIPT))
    assert proc.returncode != 0
    assert "is a StableDiffusion3Pipeline (SD3/SD3.5) teacher" in proc.stderr and "train_disback_sd3.py" in proc.stderr
    proc = _run(_cmd(teacher, tmp_path / "gan", "--gan_loss_weight", "0.01", "--real_data_dir", str(tmp_path)))
    assert proc.returncode == 2 and "not available for SD3/SD3.5" in proc.stderr
    proc = _run(_cmd(teacher, tmp_path / "tc", "--conditioning_timestep", "1200"))
    assert proc.returncode != 0 and "--conditioning_timestep must be in (0, 1000]" in proc.stderr


def test_cli_generates_and_evaluates_an_sd3_folder(teacher, full_run, tmp_path):
    """`disback generate` and `disback evaluate` take the SD3 one-step folder (and the T5-less teacher) as they are."""
    import numpy as np
    from PIL import Image

    from diffusers_disback import DisBackSD3Pipeline
    from diffusers_disback.cli import main
    from diffusers_disback.evaluation import load_pipeline

    out, _ = full_run
    png = tmp_path / "cat.png"
    # no --max-sequence-length: the folder's recorded 16 T5 tokens
    assert main(["generate", str(out / "final"), "a cat", "--output", str(png), "--device", "cpu"]) == 0
    pipe = DisBackSD3Pipeline.from_pretrained(out / "final")
    expected = pipe("a cat", generator=torch.Generator().manual_seed(0), max_sequence_length=16).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected))
    assert type(load_pipeline(str(out / "final"))).__name__ == "DisBackSD3Pipeline"
    assert load_pipeline(str(out / "final")).default_max_sequence_length == 16
    assert type(load_pipeline(teacher)).__name__ == "StableDiffusion3Pipeline"  # a teacher: stock, without T5
    assert main(["evaluate", str(out / "final"), "--protocol", "shapes", "--output", str(tmp_path / "eval"),
                 "--max-sequence-length", "16", "--device", "cpu"]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["shapes_accuracy"] <= 1


def test_path_profile_cli_and_node_judge_on_a_flow_teacher(teacher, full_run, tmp_path, capsys):
    """`disback path-profile` reads an SD3 run's path with the SD3 script's defaults (CFG 4.5, sigma 1), and the
    shapes judge samples each node with the SD3 pipeline."""
    from diffusers_disback.cli import main
    from diffusers_disback.training.path_profile import judge_nodes

    out, _ = full_run
    prompts = tmp_path / "probe.txt"
    prompts.write_text("a cat\na dog\na red car\n")
    assert main(["path-profile", str(out / "path"), "--teacher", teacher, "--prompts", str(prompts), "--timesteps",
                 "2", "--max-sequence-length", "16", "--output", str(tmp_path / "profile"), "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| P0 (teacher) | 0 | 0.0000 |" in printed and "| P2 | 4 |" in printed
    saved = json.loads((tmp_path / "profile" / "path_profile.json").read_text())
    assert saved["guidance_scale"] == 4.5 and saved["nodes"][0]["to_teacher"] == 0.0
    assert all(n["to_teacher"] > 0 for n in saved["nodes"][1:])
    assert (tmp_path / "profile" / "path_profile.png").stat().st_size > 5_000
    judged = judge_nodes(DegradationPath.load(out / "path"), teacher, str(tmp_path / "judge"), num_inference_steps=2,
                         max_sequence_length=16)  # fmt: skip
    assert sorted(judged) == [0, 1, 2] and judged[0]["fd"] == 0.0
    assert all(0.0 <= j["accuracy"] <= 1.0 for j in judged.values()) and judged[2]["fd"] > 0


DISTANCE = ["--path_node_spacing", "distance", "--num_path_nodes", "2", "--path_candidates", "4"]


def test_fsdp2_with_checkpointing_and_distance_spacing_resumes_from_a_sharded_checkpoint(teacher, tmp_path):
    """FSDP2 on 2 processes (gloo, `tests/fsdp2_cpu_harness.py` wraps SD3's JointTransformerBlocks) with gradient
    checkpointing and nodes placed by distance; resumed mid stage 2 from its sharded checkpoint, it ends with the same
    transformer and path, bit for bit."""
    import shutil

    from test_train_distributed import _launch_fsdp2

    out = tmp_path / "fsdp2"
    args = _cmd(teacher, out, "--gradient_checkpointing", *DISTANCE)[2:]
    proc = _launch_fsdp2(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "checkpoint-8"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_1").is_dir()  # sharded
    path = DegradationPath.load(out / "path")
    candidates = {c["step"] for c in path.profile["candidates"]}
    assert (
        len(path) == 3 and len(candidates) > 2 and {n.step for n in path.nodes[1:]} <= candidates
    )  # kept by distance
    assert 0 < path.nodes[1].distance <= path.nodes[2].distance

    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-10", "final"))
    proc = _launch_fsdp2(args[:3] + [str(again)] + args[4:] + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    expected, got = _final(out), _final(again)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert DegradationPath.load(again / "path").nodes == path.nodes


def test_ddp_shared_base_lora_with_checkpointing_distance_spacing_and_pushes(teacher, tmp_path, hub_server):
    """DDP on 2 processes with every network an adapter of one frozen SD3 base, gradient checkpointing and a
    distance-spaced LoRA path, pushing to the loopback Hub: both stages run, each rank keeps its own stream, and the
    pushed repo loads as the one-step SD3 pipeline with the run's T5 length."""
    from huggingface_hub import list_repo_files
    from test_train_distributed import _launch

    from diffusers_disback import DisBackSD3Pipeline
    from diffusers_disback.lora_export import RUN_ADAPTER_DIR

    out = tmp_path / "ddp"
    lora = ["--lora_rank", "4", "--path_node_type", "lora", "--path_lora_rank", "4", "--gradient_checkpointing"]
    hub = ["--push_to_hub", "--hub_model_id", "user/sd3-ddp-run", "--hub_token", "hf_test", "--hub_push_every", "2"]
    proc = _launch(_cmd(teacher, out, *lora, *DISTANCE, *hub)[2:], script=SCRIPT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints" / "checkpoint-10"
    assert (ckpt / "data_0.json").is_file() and (ckpt / "data_1.json").is_file()
    path = DegradationPath.load(out / "path")
    candidates = {c["step"] for c in path.profile["candidates"]}
    assert path.kind == "lora" and len(path) == 3 and {n.step for n in path.nodes[1:]} <= candidates
    base = load_file(os.path.join(teacher, "transformer", "diffusion_pytorch_model.safetensors"))
    final = _final(out)
    moved = [k for k in final if not torch.equal(final[k], base[k])]
    assert moved and all(".attn." in k for k in moved)
    assert (out / "final" / RUN_ADAPTER_DIR / "pytorch_lora_weights.safetensors").is_file()
    files = set(list_repo_files("user/sd3-ddp-run"))
    assert {"model_index.json", "README.md", "pipeline.py", "transformer/diffusion_pytorch_model.safetensors",
            "path/path_manifest.json"} <= files  # fmt: skip
    assert any(f.startswith("checkpoints/checkpoint-") and f.endswith("checkpoint_manifest.json") for f in files)
    pushed = DisBackSD3Pipeline.from_pretrained("user/sd3-ddp-run")
    assert pushed.default_max_sequence_length == 16  # read from the repo's model_index.json
    torch.testing.assert_close(dict(pushed.transformer.state_dict()), _final(out), rtol=0, atol=0)
