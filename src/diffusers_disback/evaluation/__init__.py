"""
Evaluation people can compare: COCO FID, patch-FID and CLIP score under DMD2's protocol, for any text-to-image
pipeline (one-step, few-step, or the teacher).

    from diffusers_disback.evaluation import CaptionSet, evaluate, get_protocol, load_pipeline

    pipe = load_pipeline("path/or/hub-id", torch_dtype=torch.float16).to("cuda")
    captions = CaptionSet.from_coco("annotations/captions_val2014.json", "val2014", num=10_000)
    evaluate(pipe, captions, "eval/disback", get_protocol("sdxl-coco10k"))

`disback evaluate` is the same from the command line; see docs/evaluation.md.
"""

from .data import CaptionSet, image_folder
from .evaluate import (
    METRICS,
    ReferenceImages,
    Scorer,
    default_metrics,
    evaluate,
    fid_against,
    fid_transform_name,
    library_versions,
    load_feature_extractor,
    load_pipeline,
    reference_stats_key,
    resolve_metrics,
    sample_grid,
)
from .generation import generate_images, missing_indices
from .metrics import (
    ClipScorer,
    ReferenceStatistics,
    center_crop,
    center_crop_square,
    clean_resizer,
    clip_transform,
    compute_features,
    extractor_id,
    feature_statistics,
    fid_transform,
    frechet_distance,
    inception_feature_extractor,
    patch_fid_transform,
)
from .protocol import PROTOCOLS, EvalProtocol, get_protocol

__all__ = [
    "CaptionSet",
    "ClipScorer",
    "EvalProtocol",
    "METRICS",
    "PROTOCOLS",
    "ReferenceImages",
    "ReferenceStatistics",
    "Scorer",
    "center_crop",
    "center_crop_square",
    "clean_resizer",
    "clip_transform",
    "compute_features",
    "default_metrics",
    "evaluate",
    "extractor_id",
    "feature_statistics",
    "fid_against",
    "fid_transform",
    "fid_transform_name",
    "frechet_distance",
    "generate_images",
    "get_protocol",
    "image_folder",
    "inception_feature_extractor",
    "library_versions",
    "load_feature_extractor",
    "load_pipeline",
    "missing_indices",
    "patch_fid_transform",
    "reference_stats_key",
    "resolve_metrics",
    "sample_grid",
]

# the shapes world's judge (reads colour, shape, position and background back from a generated 64x64 image)
from .shapes_judge import (  # noqa: E402
    ShapesJudge,
    default_judge,
    fd_in_judge_features,
    judge_images,
    shapes_metrics,
    train_judge,
)

__all__ += [
    "ShapesJudge",
    "default_judge",
    "fd_in_judge_features",
    "judge_images",
    "shapes_metrics",
    "train_judge",
]
