"""`evaluate`: generate a pipeline's images for a caption set and report FID, patch-FID and CLIP score."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from huggingface_hub import constants as hf_constants
from PIL import Image

from .._io import atomic_write, atomic_write_text
from .data import CaptionSet
from .generation import generate_images, image_path
from .metrics import (
    ClipScorer,
    FeatureExtractor,
    ReferenceStatistics,
    compute_features,
    extractor_id,
    feature_statistics,
    fid_transform,
    frechet_distance,
    inception_feature_extractor,
    patch_fid_transform,
)
from .protocol import EvalProtocol

logger = logging.getLogger(__name__)

METRICS = ("fid", "patch_fid", "clip_score", "shapes")


def default_metrics(protocol: EvalProtocol) -> tuple[str, ...]:
    """What `evaluate` computes unless told: the shapes judge for the `shapes` protocol, else FID, patch-FID and CLIP."""
    return ("shapes",) if protocol.name == "shapes" else ("fid", "patch_fid", "clip_score")


RESULTS_FILE = "metrics.json"


class ReferenceImages:
    """Reference images for FID: a fingerprint (keys the statistics cache), a loader and a count."""

    def __init__(self, fingerprint: str, loader: Callable[[], Iterator[Image.Image]], count: int | None, source: str):
        self.fingerprint, self.loader, self.count, self.source = fingerprint, loader, count, source

    @classmethod
    def from_caption_set(cls, captions: CaptionSet, num: int | None = None) -> ReferenceImages:
        """The images of the first `num` captions (all by default): the references of exactly the prompts used."""
        import itertools

        num = len(captions) if num is None else min(num, len(captions))
        fingerprint = captions.fingerprint if num == len(captions) else f"{captions.fingerprint}[:{num}]"
        return cls(fingerprint, lambda: itertools.islice(captions.images(), num), num, captions.source)

    @classmethod
    def from_folder(cls, path: str, num: int | None = None) -> ReferenceImages:
        from .data import image_folder

        fingerprint, loader, count = image_folder(path, num)
        return cls(fingerprint, loader, count, f"folder:{path}")


def load_pipeline(
    model: str,
    checkpoint: str | None = None,
    torch_dtype=None,
    revision: str | None = None,
    variant: str | None = None,
):
    """
    The pipeline to evaluate: a diffusers folder or Hub id, loaded with `DiffusionPipeline.from_pretrained` and its
    saved scheduler; a DisBack repo (docs/hub.md) as a `DisBackPipeline` over those components, so that
    `num_inference_steps` samples the DisBack timesteps (1 step: the conditioning timestep); an SD3 one through
    [`load_sd3_pipeline`]. With `checkpoint`, a
    released raw UNet checkpoint put into `model` (the SDXL base) through the conversion path.
    """
    if checkpoint is not None:
        from ..pipeline_disback import DisBackPipeline

        return DisBackPipeline.from_unet_checkpoint(checkpoint, base_model=model, torch_dtype=torch_dtype)
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model, revision=revision)
    if index.get("_class_name") in ("StableDiffusion3Pipeline", "DisBackSD3Pipeline"):
        return load_sd3_pipeline(model, torch_dtype, revision, variant)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, revision=revision, variant=variant)
    if _is_disback_layout(pipe):
        # A DisBack repo names a stock LCMScheduler, whose own one-step rule samples t = 999, not the generator's
        # conditioning timestep: sample through DisBackPipeline, which hands any scheduler the DisBack timesteps.
        from ..pipeline_disback import DisBackPipeline

        pipe = DisBackPipeline.from_pipe(pipe)
    return pipe


def load_sd3_pipeline(model: str, torch_dtype=None, revision: str | None = None, variant: str | None = None):
    """An SD3 folder or repo: a `DisBackSD3Pipeline` when it holds the student's scheduler (docs/inference.md), else
    a stock `StableDiffusion3Pipeline` (a teacher); a pipeline without T5 loads with `text_encoder_3=None`. A
    `DisBackSD3Pipeline` samples with the T5 length its folder records, unless a call passes another."""
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    from ..pipeline_disback_sd3 import MAX_SEQUENCE_LENGTH_KEY, DisBackSD3Pipeline, is_disback_flow_scheduler

    index = DiffusionPipeline.load_config(model, revision=revision)
    missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if (index.get(k) or [None])[0] is None}
    pipe = StableDiffusion3Pipeline.from_pretrained(
        model, torch_dtype=torch_dtype, revision=revision, variant=variant, **missing
    )
    if not is_disback_flow_scheduler(pipe.scheduler):
        return pipe
    pipe = DisBackSD3Pipeline.from_pipe(pipe)
    if index.get(MAX_SEQUENCE_LENGTH_KEY) is not None:  # the T5 length the generator was trained with
        pipe.default_max_sequence_length = index[MAX_SEQUENCE_LENGTH_KEY]
    return pipe


def _is_disback_layout(pipe) -> bool:
    """A folder written by `DisBackPipeline.save_pretrained`: an SDXL pipeline whose LCMScheduler has
    `original_inference_steps == num_train_timesteps` (docs/hub.md)."""
    scheduler = getattr(pipe, "scheduler", None)
    if type(scheduler).__name__ != "LCMScheduler" or type(pipe).__name__ != "StableDiffusionXLPipeline":
        return False
    config = scheduler.config
    return config.get("original_inference_steps") == config.get("num_train_timesteps")


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("diffusers_disback", "torch", "diffusers", "transformers", "numpy", "scipy", "pillow", "clean-fid",
                 "open_clip_torch", "datasets"):  # fmt: skip
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _generated_images(images_dir: str, count: int) -> Iterator[Image.Image]:
    """The generated images, opened lazily: pixels are decoded (and the file closed) where they are first used."""
    for i in range(count):
        yield Image.open(image_path(images_dir, i))


def sample_grid(images_dir: str, count: int, columns: int = 4, size: int = 256, max_images: int = 16) -> Image.Image:
    """The first `max_images` generated images in a grid of `size`-pixel tiles."""
    from ..images import image_grid

    return image_grid(_generated_images(images_dir, min(count, max_images)), columns, tile=size)


def fid_transform_name(resolution: int | None) -> str:
    return f"square-crop+lanczos{resolution}"


def reference_stats_key(fingerprint: str, transform_name: str, extractor_name: str) -> str:
    """The cache key of a reference set's statistics: the set, the transform and the feature network."""
    return hashlib.sha256(f"{fingerprint}|{transform_name}|{extractor_name}".encode()).hexdigest()[:32]


def fid_against(
    stats: ReferenceStatistics,
    images: Callable[[], Iterator[Image.Image]],
    extractor: FeatureExtractor,
    transform,
    batch_size: int = 64,
    device="cpu",
    progress: bool = False,
    total: int | None = None,
) -> float:
    """FID of `images` against cached reference statistics."""
    feats = compute_features(images(), extractor, transform, batch_size, device, progress, "generated features", total)
    return frechet_distance(*feature_statistics(feats), stats.mu, stats.sigma)


def load_feature_extractor(name: str = "inception", device="cpu") -> FeatureExtractor:
    """
    The FID feature network by name: `"inception"` (clean-fid's, the published protocol) or the path of a TorchScript
    file mapping float32 `[N, 3, 299, 299]` in [0, 255] to `[N, D]` features (any other network; its FIDs are not
    comparable to published ones). The file's hash keys the reference-statistics cache.
    """
    if name == "inception":
        return inception_feature_extractor(device)
    if not os.path.isfile(name):
        raise ValueError(f"feature extractor {name!r} is neither 'inception' nor a TorchScript file")
    import torch

    model = torch.jit.load(name, map_location=device).eval()
    with open(name, "rb") as f:
        model.name = f"torchscript {os.path.basename(name)} sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}"
    return model


def resolve_metrics(protocol: EvalProtocol, metrics: Sequence[str] | None, clip_scorer=None) -> list[str]:
    """The metrics to compute, in [`METRICS`] order: `metrics` (default [`default_metrics`]) less patch-FID when the
    protocol has none and the CLIP score when there is no CLIP model."""
    metrics = default_metrics(protocol) if metrics is None else metrics
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)}")
    metrics = [m for m in METRICS if m in metrics and (m != "patch_fid" or protocol.patch_fid)]
    if "clip_score" in metrics and clip_scorer is None and protocol.clip_model is None:
        metrics.remove("clip_score")
    if not metrics:
        raise ValueError("no metric left to compute (check --metrics, --no-patch-fid and --clip-model)")
    return metrics


class Scorer:
    """
    The metrics of one protocol against one reference set, set up once (the feature network, the reference
    statistics, computed once and cached, the CLIP model and the shapes judge) and then computed for any images:
    what [`evaluate`] runs on the images it generated, and what the training script runs during training.

    Args:
        protocol: the [`EvalProtocol`] (FID resolution, patch-FID, CLIP model and prefix).
        metrics: any of [`METRICS`] (default [`default_metrics`]; see [`resolve_metrics`]).
        reference: the reference images of FID, patch-FID and the shapes FD.
        feature_extractor: the FID network (default clean-fid's Inception; see [`load_feature_extractor`]).
        clip_scorer: the CLIP scorer (default the protocol's open_clip model).
        stats_cache: folder for reference statistics (default `$HF_HOME/diffusers_disback/fid_stats`).
        clip_device: where the CLIP model lives between calls (default `device`; `"cpu"` keeps a large one off the
            GPU while training and moves it to `device` for each call).
    """

    def __init__(
        self,
        protocol: EvalProtocol,
        metrics: Sequence[str] | None = None,
        reference: ReferenceImages | None = None,
        feature_extractor: FeatureExtractor | None = None,
        clip_scorer: ClipScorer | None = None,
        stats_cache: str | None = None,
        device="cpu",
        feature_batch_size: int = 64,
        progress: bool = False,
        clip_device=None,
    ):
        self.metrics = resolve_metrics(protocol, metrics, clip_scorer)
        if any(m in self.metrics for m in ("fid", "patch_fid", "shapes")) and reference is None:
            raise ValueError(
                "FID needs reference images (the shapes FD too): pass a reference folder or a dataset with images "
                "(or evaluate the CLIP score alone)"
            )
        self.device = device
        self.feature_batch_size, self.progress = feature_batch_size, progress
        self.details: dict = {}
        self.fid: dict[str, tuple] = {}  # metric -> (transform, reference statistics)
        if any(m in self.metrics for m in ("fid", "patch_fid")):
            self.extractor = (
                feature_extractor if feature_extractor is not None else inception_feature_extractor(device)
            )
            extractor_name = extractor_id(self.extractor)
            cache = stats_cache or os.path.join(hf_constants.HF_HOME, "diffusers_disback", "fid_stats")
            for metric, transform, transform_name in (
                ("fid", fid_transform(protocol.fid_resolution), fid_transform_name(protocol.fid_resolution)),
                ("patch_fid", patch_fid_transform(299), "center-crop299"),
            ):
                if metric not in self.metrics:
                    continue
                key = reference_stats_key(reference.fingerprint, transform_name, extractor_name)
                stats, cached = ReferenceStatistics.get_or_compute(
                    cache, key, reference.loader, self.extractor, transform, feature_batch_size, device, progress,
                    reference.count,
                    metadata={"source": reference.source, "transform": transform_name, "feature_extractor": extractor_name},
                )  # fmt: skip
                self.fid[metric] = (transform, stats)
                self.details[metric] = {
                    "transform": transform_name,
                    "reference_images": stats.count,
                    "reference_stats": stats.path,
                    "reference_stats_reused": cached,
                }
            self.details["feature_extractor"] = extractor_name
        self.clip_scorer, self.clip_device = None, clip_device
        if "clip_score" in self.metrics:
            self.clip_scorer = clip_scorer or ClipScorer.from_open_clip(
                protocol.clip_model, protocol.clip_pretrained, clip_device or device, protocol.clip_prefix,
                protocol.clip_resolution,
            )  # fmt: skip
            s = self.clip_scorer
            self.details["clip_score"] = {"model": s.name, "prefix": s.prefix, "resolution": s.resolution}
        self.judge, self.reference_images = None, None
        if "shapes" in self.metrics:
            from .shapes_judge import default_judge

            self.judge, self.reference_images = default_judge(device), list(reference.loader())
            self.details["shapes"] = {
                "judge": "diffusers_disback.evaluation.default_judge",
                "reference": reference.source,
            }

    def __call__(self, images: Callable[[], Iterator[Image.Image]], prompts: Sequence[str]) -> dict[str, float]:
        """The metrics of the images `images()` yields (one per prompt, in order; called once per metric)."""
        n, results = len(prompts), {}
        for metric, (transform, stats) in self.fid.items():
            results[metric] = fid_against(
                stats, images, self.extractor, transform, self.feature_batch_size, self.device, self.progress, n
            )
        if self.clip_scorer is not None:
            scorer = self.clip_scorer.to(self.device) if self.clip_device is not None else self.clip_scorer
            results["clip_score"] = scorer.score(images(), list(prompts), self.feature_batch_size, self.progress)
            if self.clip_device is not None:
                scorer.to(self.clip_device)
        if self.judge is not None:
            from .shapes_judge import shapes_metrics

            results.update(shapes_metrics(list(images()), list(prompts), self.reference_images, self.judge))
        return results


def evaluate(
    pipeline,
    captions: CaptionSet,
    output_dir: str,
    protocol: EvalProtocol,
    reference: ReferenceImages | None = None,
    metrics: Sequence[str] | None = None,
    batch_size: int = 8,
    feature_extractor: FeatureExtractor | None = None,
    clip_scorer: ClipScorer | None = None,
    stats_cache: str | None = None,
    device=None,
    model_id: str | None = None,
    feature_batch_size: int = 64,
    progress: bool = True,
    **pipeline_kwargs,
) -> dict | None:
    """
    Generates `protocol.num_prompts` images (resumable, data-parallel under `accelerate launch`), then on the main
    process computes `metrics` ([`Scorer`]) and writes `output_dir/metrics.json` (the numbers and everything needed
    to reproduce them) and `output_dir/grid.png`. Returns the result dict on the main process and `None` on the
    others.

    Args:
        pipeline: a text-to-image pipeline on its device.
        captions: what to generate; the first `protocol.num_prompts` are used.
        reference: reference images for FID/patch-FID and the shapes FD (default: the caption set's own images, if
            it has them).
        metrics: any of `METRICS` (default [`default_metrics`]). `shapes` scores a shapes-world model with the shapes
            judge: `shapes_accuracy` (all four attributes right), `shapes_accuracy_<attribute>`, and `shapes_fd`, the
            Fréchet distance in the judge's features to `reference` (renders, or e.g. a teacher's images).
        feature_extractor: stands in for clean-fid's Inception (default), e.g. a tiny one in tests.
        clip_scorer: stands in for the protocol's open_clip model (default).
        stats_cache: folder for reference statistics (default `$HF_HOME/diffusers_disback/fid_stats`).
    """
    from accelerate import PartialState

    state = PartialState()
    metrics = resolve_metrics(protocol, metrics, clip_scorer)
    if len(captions) < protocol.num_prompts:
        raise ValueError(
            f"the protocol asks for {protocol.num_prompts} prompts but {captions.source} gave {len(captions)}"
        )
    prompts = captions.captions[: protocol.num_prompts]
    if reference is None and captions.has_images:
        reference = ReferenceImages.from_caption_set(captions, protocol.num_prompts)
    if any(m in metrics for m in ("fid", "patch_fid", "shapes")) and reference is None:
        raise ValueError(
            f"FID needs reference images (the shapes FD too), and {captions.source} has captions only: pass a "
            "reference folder or a dataset with images (or evaluate the CLIP score alone)"
        )
    device = device if device is not None else state.device
    images_dir = os.path.join(output_dir, "images")

    gen = generate_images(
        pipeline,
        prompts,
        images_dir,
        seed=protocol.seed,
        num_inference_steps=protocol.num_inference_steps,
        guidance_scale=protocol.guidance_scale,
        resolution=protocol.resolution,
        batch_size=batch_size,
        model_id=model_id,
        progress=progress,
        **pipeline_kwargs,
    )
    if not state.is_main_process:
        return None

    n = len(prompts)
    scorer = Scorer(
        protocol, metrics, reference, feature_extractor, clip_scorer, stats_cache, device, feature_batch_size,
        progress and state.is_local_main_process,
    )  # fmt: skip
    results = scorer(lambda: _generated_images(images_dir, n), prompts)

    grid = sample_grid(images_dir, n)
    atomic_write(os.path.join(output_dir, "grid.png"), grid.save)
    record = {
        "metrics": results,
        "model": model_id,
        "protocol": protocol.to_dict(),
        "num_images": n,
        "captions": {"source": captions.source, "fingerprint": captions.fingerprint},
        "reference": None if reference is None else {"source": reference.source, "fingerprint": reference.fingerprint},
        "seeds": {"base": protocol.seed, "rule": "image i from torch.Generator('cpu').manual_seed(seed + i)"},
        "details": scorer.details,
        "generation": {**gen, "processes": state.num_processes, "batch_size_per_process": batch_size},
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2, default=_jsonable)
    atomic_write_text(os.path.join(output_dir, RESULTS_FILE), text)
    logger.info("evaluation %s: %s", protocol.name, results)
    return record


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)
