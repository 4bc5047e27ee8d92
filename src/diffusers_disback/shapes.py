"""A captioned image world with ground truth: coloured shapes, rendered procedurally, for a real teacher that fits a CPU.

Every image shows one shape and is described by four attributes, each read back exactly from its caption:

    "a red triangle in the top left on a black background"

6 colours x 3 shapes x 4 positions x 2 backgrounds = 144 captions. A compositional split keeps three colour-shape
pairs (all their positions and backgrounds: 24 captions) out of training, to test whether a model generalises to
combinations it never saw. Rendering is deterministic by seed (size 20-26 px, +-3 px jitter).

The world is exposed through `datasets`' formats so the training script reads it unchanged:
[`write_imagefolder`] writes PNGs and a `metadata.jsonl` whose `text` field is the caption (an `imagefolder` for
`--real_data_dir` / `--eval_dataset`, and a prompt file for `--train_data_files`). [`distill_arguments`] is how
its teacher is distilled: the training script's flags, written once for every caller.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from types import MappingProxyType

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
ATTRIBUTES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# the compositional split: these colour-shape pairs never appear in training captions
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
# captions to show a model with: four trained combinations, then the three held-out pairs
SHOWCASE_CAPTIONS = (
    "a red circle in the top left on a black background",
    "a green triangle in the bottom right on a gray background",
    "a purple square in the top right on a black background",
    "a orange circle in the bottom left on a gray background",
    "a red triangle in the top left on a black background",
    "a blue circle in the bottom right on a gray background",
    "a yellow square in the top right on a gray background",
)
# every word a caption uses: the text encoders' whole-word vocabulary
VOCABULARY = sorted(
    {"a", "in", "the", "on", "background"}
    | set(COLOURS)
    | set(SHAPES)
    | {w for p in POSITIONS for w in p.split()}
    | set(BACKGROUNDS)
)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth."""

    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} in the {self.position} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def labels(self) -> dict[str, int]:
        """Each attribute as its index in [`ATTRIBUTES`] (the judge's classes)."""
        return {k: ATTRIBUTES[k].index(v) for k, v in asdict(self).items()}

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """The scene a caption describes; a caption outside the grammar is a `ValueError` that shows the grammar."""
        words = caption.strip().lower().split()
        try:
            assert words[0] == "a" and words[3:5] == ["in", "the"] and words[-1] == "background"
            scene = cls(words[1], words[2], " ".join(words[5:7]), words[-2])
            assert scene.colour in COLOURS and scene.shape in SHAPES
            assert scene.position in POSITIONS and scene.background in BACKGROUNDS and words[7] == "on"
        except (AssertionError, IndexError):
            raise ValueError(
                f"{caption!r} is not a caption of the shapes world: expected 'a <colour> <shape> in the <position> "
                f"on a <background> background' with colour in {list(COLOURS)}, shape in {list(SHAPES)}, position "
                f"in {list(POSITIONS)}, background in {list(BACKGROUNDS)}"
            ) from None
        return scene


def all_scenes(split: str = "all") -> list[Scene]:
    """Every scene of `split`: `"train"` (120 captions), `"held_out"` (24: the [`HELD_OUT_PAIRS`]) or `"all"`."""
    scenes = [Scene(*combo) for combo in itertools.product(*ATTRIBUTES.values())]
    if split == "train":
        return [s for s in scenes if not s.held_out]
    if split == "held_out":
        return [s for s in scenes if s.held_out]
    if split != "all":
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    return scenes


def render(scene: Scene, seed: int = 0, size: int = 64) -> Image.Image:
    """The image of `scene`: deterministic in `seed` (the shape's size and jitter)."""
    rng = random.Random(seed)
    scale = size / 64
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    half = rng.uniform(10, 13) * scale
    cx = (16 if "left" in scene.position else 48) * scale + rng.uniform(-3, 3) * scale
    cy = (16 if "top" in scene.position else 48) * scale + rng.uniform(-3, 3) * scale
    colour = COLOURS[scene.colour]
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


def sample_scenes(n: int, split: str = "train", seed: int = 0) -> list[Scene]:
    """`n` scenes drawn uniformly from `split`, deterministic in `seed`."""
    rng = random.Random(seed)
    scenes = all_scenes(split)
    return [rng.choice(scenes) for _ in range(n)]


def write_imagefolder(directory: str, n: int, split: str = "train", seed: int = 0, size: int = 64) -> str:
    """
    `n` rendered images of `split` as a `datasets` imagefolder: `img_00000.png ...` and `metadata.jsonl` with
    `file_name` and `text` (the caption). Image `i` is rendered with seed `seed * 1_000_003 + i`. Returns the folder.
    """
    os.makedirs(directory, exist_ok=True)
    lines = []
    for i, scene in enumerate(sample_scenes(n, split, seed)):
        name = f"img_{i:05d}.png"
        render(scene, seed * 1_000_003 + i, size).save(os.path.join(directory, name))
        lines.append(json.dumps({"file_name": name, "text": scene.caption}))
    with open(os.path.join(directory, "metadata.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return directory


def write_prompts(path: str, split: str = "train") -> str:
    """Every caption of `split`, one per line (a `--train_data_files` prompt file)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(s.caption for s in all_scenes(split)) + "\n")
    return path


# How the shapes teacher distils (a 6M-parameter UNet, 64x64 images, batch 16 on a CPU): the flags of
# `examples/train_disback/train_disback_sdxl.py`, in this order. Read through [`distill_arguments`].
DISTILL_RECIPE = MappingProxyType(
    {
        "resolution": 64,
        "train_batch_size": 16,
        "mixed_precision": "no",
        "degradation_steps": 200,
        "path_interval": 50,
        "max_train_steps": 1500,
        "fake_score_update_ratio": 5,
        "backtrack_interval": 250,
        "learning_rate": 5e-5,
        "lr_warmup_steps": 0,
        "guidance_scale": 5,
        "conditioning_timestep": 399,
        "checkpointing_steps": 500,
        "checkpoints_total_limit": 1,
        "validation_steps": 250,
    }
)


def distill_arguments(**overrides) -> list[str]:
    """
    The shapes distillation recipe as training-script arguments: `["--resolution", "64", "--train_batch_size",
    "16", ...]`. It is written only here, and `examples/shapes/distill_and_judge.py` (as it is), `make demo`
    (`examples/demo.py`, a shorter budget), the quality test (`tests/test_shapes_quality.py`) and
    `benchmarks/shapes_compare.py` all use it.

    Each keyword replaces the value of that flag of [`DISTILL_RECIPE`] (in its place); `None` leaves the flag out, to
    the script's default; a keyword the recipe does not have is appended as `--name value`.

        distill_arguments(max_train_steps=300, checkpoints_total_limit=None, report_to="none")
    """
    flags = {**DISTILL_RECIPE, **overrides}
    return [part for name, value in flags.items() if value is not None for part in (f"--{name}", _flag(value))]


def _flag(value) -> str:
    if isinstance(value, float):  # repr's 5e-05 as 5e-5; 0.0001 and 5.0 stay as they are
        return re.sub(r"e([+-]?)0*(\d)", r"e\1\2", repr(value))
    return str(value)
