"""
A judge for the shapes world ([`diffusers_disback.shapes`]): a small CNN that reads the four attributes (colour, shape,
position, background) back from a 64x64 image, to score what a text-to-image model generated from a shapes caption.

    from diffusers_disback.evaluation import default_judge, fd_in_judge_features, judge_images

    judge = default_judge()  # the committed weights (examples/shapes/train_judge.py writes them)
    judge_images(judge, images, captions)  # {"accuracy/colour": ..., ..., "accuracy/all": ...}
    fd_in_judge_features(judge, generated, real)  # Fréchet distance in the judge's penultimate features

The judge is trained on fresh renders of every scene (the compositional held-out pairs included: it must read every
combination) under augmentation that mimics what a VAE does to an image: Gaussian blur, additive noise, a slight colour
shift, an occasional down-up resampling, stray specks and a small translation. Training renders use seeds below
`2**40`; [`EVAL_SEED_BASE`] and above are reserved for evaluation, so an evaluation image is never one it trained on.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..shapes import ATTRIBUTES, Scene, all_scenes, render
from .metrics import feature_statistics, frechet_distance

IMAGE_SIZE = 64
# render seeds >= this are never used in training (training draws them from [0, 2**32))
EVAL_SEED_BASE = 1 << 40
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# the committed judge, installed with the package (examples/shapes/train_judge.py writes it)
DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent / "shapes_judge_weights"

__all__ = [
    "DEFAULT_JUDGE_DIR",
    "EVAL_SEED_BASE",
    "ShapesJudge",
    "augment_like_vae",
    "default_judge",
    "evaluate_judge",
    "fd_in_judge_features",
    "judge_images",
    "shapes_metrics",
    "train_judge",
]


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesJudge(nn.Module):
    """
    A ~0.6M-parameter CNN on 64x64 RGB in [0, 1], with one linear head per attribute of [`ATTRIBUTES`].

    `forward(x)` returns `{attribute: logits}`; `features(x)` the penultimate features (`feature_dim`, for a Fréchet
    distance); `predict(x)` the class indices; `read(x)` the [`Scene`]s. `x` is a PIL image, a list of them, or a
    float tensor (CHW or NCHW, in [0, 1]; uint8 is divided by 255); other sizes are resized to 64x64.
    """

    def __init__(self, widths: tuple[int, ...] = (24, 32, 64, 96, 128, 128), feature_dim: int = 128):
        super().__init__()
        strides = (2, 1, 2, 2, 1, 2)  # 64 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4
        if len(widths) != len(strides):
            raise ValueError(f"widths must have {len(strides)} entries, got {widths}")
        self.config = {"widths": list(widths), "feature_dim": feature_dim, "image_size": IMAGE_SIZE}
        layers, cin = [], 3
        for width, stride in zip(widths, strides):
            layers.append(_conv(cin, width, stride))
            cin = width
        self.body = nn.Sequential(*layers)
        # flatten the 4x4 map rather than pool it: the position is where the shape is
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_input(self, images) -> torch.Tensor:
        """`images` (PIL, list of PIL, CHW/NCHW tensor, or list of CHW tensors) as an NCHW float batch in [0, 1] at 64x64."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("no images")
            if isinstance(images[0], Image.Image):
                arrays = []
                for image in images:
                    image = image.convert("RGB")
                    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
                    arrays.append(np.asarray(image))
                x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
            else:
                x = torch.stack([torch.as_tensor(image) for image in images])
        else:
            x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W), got shape {tuple(x.shape)}")
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.device)

    def features(self, x) -> torch.Tensor:
        """The penultimate features (N, feature_dim) of `x` (see the class docstring for what `x` may be)."""
        return self.neck(self.body(self.to_input(x) - 0.5))

    def forward(self, x) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """The class index of each attribute (indices into [`ATTRIBUTES`]), `{attribute: (N,) long}`, on the CPU."""
        x = self.to_input(images)
        out: dict[str, list[torch.Tensor]] = {name: [] for name in ATTRIBUTES}
        for i in range(0, len(x), batch_size):
            for name, logits in self(x[i : i + batch_size]).items():
                out[name].append(logits.argmax(-1).cpu())
        return {name: torch.cat(v) for name, v in out.items()}

    def read(self, images) -> list[Scene]:
        """The scene the judge sees in each image."""
        pred = self.predict(images)
        n = len(next(iter(pred.values())))
        return [Scene(**{name: ATTRIBUTES[name][int(pred[name][i])] for name in ATTRIBUTES}) for i in range(n)]

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float16, **info) -> None:
        """`model.safetensors` (in `dtype`) and `config.json` (architecture, attributes, and any `info`)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "architecture": type(self).__name__,
            **self.config,
            "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        }
        config.update(info)
        with open(os.path.join(directory, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ShapesJudge:
        """The judge saved in `directory` by [`save_pretrained`], in float32 and eval mode (safetensors only)."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        attributes = {k: tuple(v) for k, v in config.get("attributes", {}).items()}
        if attributes != ATTRIBUTES:
            raise ValueError(
                f"the judge in {directory} was trained for attributes {attributes}, but the shapes world now has "
                f"{ATTRIBUTES}; retrain it with examples/shapes/train_judge.py"
            )
        judge = cls(widths=tuple(config["widths"]), feature_dim=config["feature_dim"])
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        judge.load_state_dict({k: v.float() for k, v in state.items()})
        return judge.to(device).eval()


def default_judge(device: str | torch.device = "cpu") -> ShapesJudge:
    """The committed judge (installed with the package at [`DEFAULT_JUDGE_DIR`])."""
    if not (DEFAULT_JUDGE_DIR / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"no committed shapes judge at {DEFAULT_JUDGE_DIR}: train one with `python examples/shapes/train_judge.py` "
            "(it writes there), or load another with ShapesJudge.from_pretrained(directory)"
        )
    return ShapesJudge.from_pretrained(DEFAULT_JUDGE_DIR, device)


# --- training -------------------------------------------------------------------------------------------------------


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, 2 radius + 1) normalised 1-D Gaussian kernels; sigma 0 is the identity."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigmas.clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    return k / k.sum(-1, keepdim=True)


def _blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur of an NCHW batch, with reflected borders."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    k = _gaussian_kernels(sigmas, radius).repeat_interleave(c, 0)  # (n c, taps)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment_like_vae(x: torch.Tensor, generator: torch.Generator | None = None, max_blur: float = 1.5) -> torch.Tensor:
    """
    What a VAE round trip and an imperfect generator do to a crisp render, at random per image: a translation of up
    to 3 px, a Gaussian blur of sigma 0-`max_blur` px, a down-up resampling (1 in 5), a colour shift (per-channel gain
    +-8%, offset +-0.04), additive noise (std 0-0.04) and a few stray specks (1 in 3). `x`: NCHW in [0, 1].
    """
    g = generator
    n, _, h, w = x.shape

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    # translate by up to 3 px (edges replicated: the background colour)
    pad = 3
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])
    # soft edges
    x = _blur(x, uniform(0.0, max_blur, n))
    # JPEG-/VAE-like softening: down to 32-48 px and back, for 1 image in 5
    soften = torch.rand(n, generator=g) < 0.2
    if soften.any():
        size = int(torch.randint(32, 49, (1,), generator=g))
        low = F.interpolate(x[soften], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x[soften] = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    # colour shift
    x = x * uniform(0.92, 1.08, n, 3, 1, 1) + uniform(-0.04, 0.04, n, 3, 1, 1)
    # additive noise
    x = x + torch.randn(x.shape, generator=g) * uniform(0.0, 0.04, n, 1, 1, 1)
    # specks: 1-4 small blobs of a random colour, for 1 image in 3
    for i in torch.nonzero(torch.rand(n, generator=g) < 1 / 3).flatten().tolist():
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            py, px = torch.randint(0, h - 1, (2,), generator=g).tolist()
            sz = int(torch.randint(1, 3, (1,), generator=g))
            x[i, :, py : py + sz, px : px + sz] = torch.rand(3, 1, 1, generator=g)
    return x.clamp(0, 1)


def _render_batch(scenes: list[Scene], seeds: list[int]) -> torch.Tensor:
    arrays = np.stack([np.asarray(render(s, seed, IMAGE_SIZE)) for s, seed in zip(scenes, seeds)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def train_judge(
    steps: int = 600,
    batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float = 2e-3,
    log_every: int = 0,
) -> ShapesJudge:
    """
    A judge trained from scratch on fresh renders of every scene (`all_scenes("all")`: the held-out pairs too),
    augmented by [`augment_like_vae`]; AdamW, one-cycle learning rate. Deterministic in `seed` on the CPU. Returns it in
    eval mode.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    scenes = all_scenes("all")
    judge = ShapesJudge().to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    judge.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = [rng.choice(scenes) for _ in range(batch_size)]
        x = augment_like_vae(_render_batch(batch, [rng.randrange(1 << 32) for _ in batch]), generator)
        labels = [s.labels() for s in batch]
        logits = judge(x.to(device))
        loss = sum(
            F.cross_entropy(logits[name], torch.tensor([lab[name] for lab in labels], device=device))
            for name in ATTRIBUTES
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    return judge.eval()


# --- scoring --------------------------------------------------------------------------------------------------------


def judge_images(judge: ShapesJudge, images, captions: list[str], batch_size: int = 256) -> dict[str, float]:
    """
    How often the judge reads each attribute of `captions` (parsed by [`Scene.from_caption`]) back from `images`:
    `accuracy/<attribute>` for each attribute of [`ATTRIBUTES`] and `accuracy/all` (all four right).
    """
    truth = [Scene.from_caption(c).labels() for c in captions]
    pred = judge.predict(images, batch_size)
    n = len(next(iter(pred.values())))
    if n != len(truth):
        raise ValueError(f"{n} images but {len(truth)} captions")
    all_right = torch.ones(n, dtype=torch.bool)
    result = {}
    for name in ATTRIBUTES:
        right = pred[name] == torch.tensor([t[name] for t in truth])
        all_right &= right
        result[f"accuracy/{name}"] = right.float().mean().item()
    result["accuracy/all"] = all_right.float().mean().item()
    return result


@torch.no_grad()
def _feature_statistics(judge: ShapesJudge, images, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    x = judge.to_input(images)
    features = torch.cat([judge.features(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])
    return feature_statistics(features.double().numpy())


def fd_in_judge_features(judge: ShapesJudge, images_a, images_b, batch_size: int = 256) -> float:
    """The Fréchet distance ([`frechet_distance`], FID's) between `images_a` and `images_b` in the judge's penultimate
    features, their statistics in float64."""
    a, b = (_feature_statistics(judge, images, batch_size) for images in (images_a, images_b))
    return frechet_distance(*a, *b)


def shapes_metrics(
    images, captions: list[str], reference_images, judge: ShapesJudge | None = None
) -> dict[str, float]:
    """
    What `evaluate(..., metrics=["shapes"])` reports for generated `images` of `captions`: `shapes_accuracy` (all four
    attributes read back right), `shapes_accuracy_<attribute>`, the first split over training and held-out captions
    (`shapes_accuracy_training_captions`, `shapes_accuracy_held_out_captions`) when both are there, and `shapes_fd`, the Fréchet distance in the judge's
    features to `reference_images` (renders of the captions, or another model's images). Default: the committed judge.
    """
    judge = default_judge() if judge is None else judge
    read = judge_images(judge, images, captions)
    out = {"shapes_accuracy": read.pop("accuracy/all")}
    out.update({f"shapes_{k.replace('/', '_')}": v for k, v in read.items()})
    held_out = [Scene.from_caption(c).held_out for c in captions]
    if any(held_out) and not all(held_out):  # the compositional split, when both sides are there
        for name, keep in (("training", False), ("held_out", True)):
            pick = [i for i, h in enumerate(held_out) if h == keep]
            subset = judge_images(judge, [images[i] for i in pick], [captions[i] for i in pick])
            out[f"shapes_accuracy_{name}_captions"] = subset["accuracy/all"]
    out["shapes_fd"] = fd_in_judge_features(judge, images, reference_images)
    return out


def evaluate_judge(judge: ShapesJudge, n: int = 2000, seed_base: int = EVAL_SEED_BASE, blur: float = 0.0) -> dict:
    """
    [`judge_images`] on `n` fresh renders of scenes drawn from every scene (seeds `seed_base + i`, never used in
    training), each blurred by a PIL Gaussian blur of radius `blur` if `blur > 0`.
    """
    rng = random.Random(seed_base)
    scenes = [rng.choice(all_scenes("all")) for _ in range(n)]
    images = [render(s, seed_base + i, IMAGE_SIZE) for i, s in enumerate(scenes)]
    if blur > 0:
        images = [image.filter(ImageFilter.GaussianBlur(blur)) for image in images]
    return judge_images(judge, images, [s.caption for s in scenes])
