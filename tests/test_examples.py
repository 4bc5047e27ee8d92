"""The demo and the benchmarks' quick modes run and report what they claim."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_benchmark_quick(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import inference
    finally:
        sys.path.pop(0)
    png = tmp_path / "inference.png"
    medians = inference.main(["--quick", "--output", str(png)])
    assert set(medians) == {
        "bare passes (text enc + 1 UNet + VAE)",
        "DisBack 1-step",
        "DisBack 1-step, stock _execution_device",
        "DisBack 1-step + tiny VAE",
        "teacher 5-step CFG 5",
    }
    assert all(v > 0 for v in medians.values())
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("family, pipeline", [("sdxl", "DisBackPipeline"), ("sd3", "DisBackSD3Pipeline")])
def test_demo(tmp_path, family, pipeline):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--output_dir", str(tmp_path)]
        + ["--degradation_steps", "4", "--max_train_steps", "4", "--family", family],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "samples_one_step.png").is_file()
    assert out.stdout.count(f"max pixel difference to {pipeline} = 0/255") == 2
    assert out.stdout.count("all-attribute accuracy") == 2  # the judge scores the teacher and the generator
    assert (tmp_path / "run" / "final" / "README.md").is_file()
    assert (tmp_path / "run" / "path" / "path_manifest.json").is_file()
    assert any(
        f.startswith("events.out.tfevents") for _, _, files in os.walk(tmp_path / "run" / "logs") for f in files
    )


def test_path_nodes_benchmark_quick():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import path_nodes
    finally:
        sys.path.pop(0)
    results = path_nodes.main(["--quick", "--num_nodes", "2"])
    tiny, sdxl = results[("tiny", 4)], results[("sdxl", 4)]
    assert tiny["lora"]["node_bytes"] < 0.05 * tiny["full"]["node_bytes"]
    assert tiny["lora_params"] == path_nodes.lora_numel(
        path_nodes.UNet2DConditionModel(**path_nodes.TINY_UNET_CONFIG), 4
    )
    assert sdxl["params"] == 2_567_463_684  # SDXL base UNet
    assert sdxl["lora_bytes"] < 0.05 * sdxl["full_bytes"]


def test_train_step_benchmark_quick():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train_step
    finally:
        sys.path.pop(0)
    result = train_step.main(["--quick"])
    assert result["iteration_ms"] > 0 and result["passes_ms"] > 0 and result["peak_gib"] > 0
    assert set(result["parts"]) >= {"text encoders", "teacher forward x2 (CFG)", "generator backward + step"}
