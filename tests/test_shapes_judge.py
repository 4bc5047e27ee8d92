"""The shapes-world judge: the committed weights read fresh renders, and its scores and Fréchet distance mean what they say."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import ImageFilter

from diffusers_disback.evaluation import ShapesJudge, default_judge, fd_in_judge_features, judge_images, train_judge
from diffusers_disback.evaluation.shapes_judge import EVAL_SEED_BASE
from diffusers_disback.shapes import ATTRIBUTES, Scene, all_scenes, render

# seeds neither the training (< 2**32) nor the recipe's evaluation (EVAL_SEED_BASE + i) use
SEED_BASE = 2 * EVAL_SEED_BASE


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def judge():
    return default_judge()


@pytest.fixture(scope="module")
def fresh():
    """Every scene, rendered with 3 seeds the judge never saw: (scenes, images)."""
    scenes = all_scenes("all") * 3
    return scenes, [render(s, SEED_BASE + i) for i, s in enumerate(scenes)]


def test_committed_judge_reads_fresh_renders(judge, fresh):
    scenes, images = fresh
    captions = [s.caption for s in scenes]
    crisp = judge_images(judge, images, captions)
    assert crisp["accuracy/all"] >= 0.99, crisp
    assert all(crisp[f"accuracy/{name}"] >= 0.99 for name in ATTRIBUTES), crisp
    blurred = judge_images(judge, [image.filter(ImageFilter.GaussianBlur(1)) for image in images], captions)
    assert blurred["accuracy/all"] >= 0.97, blurred


def test_judge_reads_every_input_form(judge, fresh):
    scenes, images = fresh
    scenes, images = scenes[:16], images[:16]
    as_tensor = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    assert judge.read(images) == scenes
    assert judge.read(as_tensor) == scenes  # uint8
    assert judge.read(as_tensor.float() / 255) == scenes
    assert judge.read(list(as_tensor.float() / 255)) == scenes
    assert judge.read(images[0]) == scenes[:1]
    assert judge.read([im.resize((128, 128)) for im in images]) == scenes  # other sizes are resized to 64


def test_judge_images_scores_each_attribute(judge, fresh):
    scenes, images = fresh
    scenes, images = scenes[:144], images[:144]
    right = judge_images(judge, images, [s.caption for s in scenes])
    assert right == {f"accuracy/{name}": 1.0 for name in [*ATTRIBUTES, "all"]}
    colours = ATTRIBUTES["colour"]
    wrong_colour = [
        Scene(colours[(colours.index(s.colour) + 1) % len(colours)], s.shape, s.position, s.background) for s in scenes
    ]
    scores = judge_images(judge, images, [s.caption for s in wrong_colour])
    assert scores["accuracy/colour"] == 0.0 and scores["accuracy/all"] == 0.0
    assert scores["accuracy/shape"] == scores["accuracy/position"] == scores["accuracy/background"] == 1.0
    # half the backgrounds wrong: background and all at 1/2, the rest right
    half = [
        Scene(s.colour, s.shape, s.position, "gray" if s.background == "black" else "black") if i % 2 else s
        for i, s in enumerate(scenes)
    ]
    scores = judge_images(judge, images, [s.caption for s in half])
    assert scores["accuracy/background"] == scores["accuracy/all"] == 0.5
    assert scores["accuracy/colour"] == 1.0
    with pytest.raises(ValueError, match="captions"):
        judge_images(judge, images[:3], [s.caption for s in scenes[:4]])
    with pytest.raises(ValueError, match="not a caption"):
        judge_images(judge, images[:1], ["a photo of a cat"])


def test_fd_in_judge_features(judge):
    def renders(colour, seed_base, n=160):
        rng = random.Random(seed_base)
        pool = [s for s in all_scenes("all") if s.colour == colour]
        return [render(rng.choice(pool), seed_base + i) for i in range(n)]

    red, red_again, blue = renders("red", SEED_BASE), renders("red", SEED_BASE + 1000), renders("blue", SEED_BASE)
    assert abs(fd_in_judge_features(judge, red, red)) < 1e-4
    same = fd_in_judge_features(judge, red, red_again)
    different = fd_in_judge_features(judge, red, blue)
    assert different > 0 and different > 5 * same, (same, different)


def test_save_load_round_trip(judge, fresh, tmp_path):
    _, images = fresh
    x = judge.to_input(images[:32])
    judge.save_pretrained(tmp_path / "fp16")  # the committed weights are fp16: saving them again loses nothing
    reloaded = ShapesJudge.from_pretrained(tmp_path / "fp16")
    with torch.no_grad():
        assert torch.equal(judge.features(x), reloaded.features(x))
        assert all(torch.equal(a, b) for a, b in zip(judge(x).values(), reloaded(x).values()))
    fresh_judge = ShapesJudge().eval()
    fresh_judge.save_pretrained(tmp_path / "fp32", dtype=torch.float32, note="untrained")
    with torch.no_grad():
        assert torch.equal(fresh_judge.features(x), ShapesJudge.from_pretrained(tmp_path / "fp32").features(x))
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["note"] == "untrained" and config["attributes"] == {k: list(v) for k, v in ATTRIBUTES.items()}
    # a judge for another world is refused
    config["attributes"]["colour"] = ["red", "green"]
    (tmp_path / "fp32" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="retrain"):
        ShapesJudge.from_pretrained(tmp_path / "fp32")


def test_train_judge_runs_and_is_deterministic():
    a, b = train_judge(steps=3, batch_size=8, seed=1), train_judge(steps=3, batch_size=8, seed=1)
    assert not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
