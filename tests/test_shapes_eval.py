"""The shapes judge through the evaluation API: `CaptionSet.from_shapes`, the `shapes` protocol and metric, and
`disback evaluate --protocol shapes` (docs/evaluation.md)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_disback.evaluation import CaptionSet, evaluate, get_protocol, shapes_metrics
from diffusers_disback.shapes import COLOURS, Scene, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


class RenderingPipeline:
    """A stand-in text-to-image pipeline that draws each caption's scene (a perfect model of the world), with
    `recolour` mapping the colour it draws (a model that gets colours wrong)."""

    def __init__(self, recolour=None):
        self.recolour = recolour or {}
        self.calls = []

    def __call__(self, prompt, num_inference_steps, guidance_scale, height, width, generator, output_type):
        self.calls.append((len(prompt), num_inference_steps, guidance_scale, height))
        images = []
        for caption, g in zip(prompt, generator):
            scene = Scene.from_caption(caption)
            scene = Scene(self.recolour.get(scene.colour, scene.colour), scene.shape, scene.position, scene.background)
            images.append(render(scene, int(torch.randint(0, 2**31, (1,), generator=g)), height))
        return SimpleNamespace(images=images)


def test_caption_set_of_the_shapes_world():
    captions = CaptionSet.from_shapes()
    assert len(captions) == 144 and captions.has_images and captions.source == "shapes:all"
    assert sum(Scene.from_caption(c).held_out for c in captions.captions) == 24
    first, again = list(captions.images()), list(captions.images())
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert CaptionSet.from_shapes().fingerprint == captions.fingerprint
    assert CaptionSet.from_shapes(seed_base=0).fingerprint != captions.fingerprint
    assert len(CaptionSet.from_shapes("held_out")) == 24


def test_shapes_metrics_read_renders_and_split_held_out():
    captions = CaptionSet.from_shapes()
    renders = list(captions.images())
    others = list(CaptionSet.from_shapes(seed_base=12345).images())
    m = shapes_metrics(renders, captions.captions, others)
    assert m["shapes_accuracy"] == 1.0
    assert m["shapes_accuracy_training_captions"] == 1.0 and m["shapes_accuracy_held_out_captions"] == 1.0
    assert {f"shapes_accuracy_{a}" for a in ("colour", "shape", "position", "background")} <= m.keys()
    grey = [Image.new("RGB", (64, 64), (128, 128, 128))] * len(renders)
    far = shapes_metrics(grey, captions.captions, others)
    assert m["shapes_fd"] < 0.2 * far["shapes_fd"]  # fresh renders sit near renders; blank images far away
    # one side of the split only: no split keys
    train_only = [i for i, c in enumerate(captions.captions) if not Scene.from_caption(c).held_out][:10]
    sub = shapes_metrics([renders[i] for i in train_only], [captions.captions[i] for i in train_only], others)
    assert "shapes_accuracy_held_out_captions" not in sub


def test_evaluate_scores_a_pipeline_with_the_shapes_judge(tmp_path):
    protocol = get_protocol("shapes")
    assert (protocol.num_prompts, protocol.resolution, protocol.clip_model) == (144, 64, None)
    perfect = RenderingPipeline()
    record = evaluate(perfect, CaptionSet.from_shapes(), str(tmp_path / "perfect"), protocol, progress=False)
    assert list(record["metrics"]) == [k for k in record["metrics"] if k.startswith("shapes_")]  # the default metric
    assert record["metrics"]["shapes_accuracy"] == 1.0
    assert perfect.calls[0][1:] == (1, 0.0, 64)  # one step, no CFG, 64x64
    assert (tmp_path / "perfect" / "grid.png").exists()
    swap = {"red": "green", "green": "red"}
    wrong = evaluate(RenderingPipeline(swap), CaptionSet.from_shapes(), str(tmp_path / "wrong"), protocol,
                     progress=False)["metrics"]  # fmt: skip
    red_or_green = sum(c in swap for c in COLOURS) / len(COLOURS)
    assert wrong["shapes_accuracy_colour"] == pytest.approx(1 - red_or_green, abs=1e-6)
    assert wrong["shapes_accuracy_shape"] == wrong["shapes_accuracy_position"] == 1.0
    assert wrong["shapes_fd"] > record["metrics"]["shapes_fd"]
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(perfect, CaptionSet.from_shapes(), str(tmp_path / "x"), protocol, metrics=["shape"])


def test_cli_evaluate_protocol_shapes_needs_no_caption_source(tmp_path):
    from diffusers_disback.testing import save_tiny_teacher

    teacher = save_tiny_teacher(str(tmp_path / "teacher"))
    cmd = [sys.executable, "-m", "diffusers_disback.cli", "evaluate", teacher, "--protocol", "shapes",
           "--num-prompts", "4", "--output", str(tmp_path / "out"), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shapes_accuracy:" in proc.stdout and "shapes_fd:" in proc.stdout
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert record["protocol"]["name"] == "shapes" and record["captions"]["source"] == "shapes:all"
    assert record["num_images"] == 4 and 0.0 <= record["metrics"]["shapes_accuracy"] <= 1.0
