"""FID, patch-FID and CLIP score, computed the way DMD2's evaluation computes them.

FID follows clean-fid's "clean" mode: each image (uint8 RGB) gets the protocol's crop/resize, then clean-fid's own
resizer (`cleanfid.resize.build_resizer("clean")`: PIL bicubic per channel in float32 to 299×299, no quantisation)
and the Inception feature extractor clean-fid builds (`cleanfid.features.build_feature_extractor("clean")`, the
TensorFlow-ported FID Inception in TorchScript). Features → mean and covariance → the Fréchet distance (Eq. 6 of
Heusel et al. 2017). Any callable `float32 [N, 3, 299, 299] in [0, 255] -> [N, D]` can stand in for Inception (the
tests use a tiny random one).

The crops reproduce torchvision's `center_crop` arithmetic exactly (offsets `int(round((size - crop) / 2))`, with
Python's round-half-to-even), which DMD2's transforms use, without importing torchvision.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .._io import atomic_write

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------- transforms
def center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Centre crop to `size` (h, w), offsets rounded as torchvision's `center_crop` rounds them."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    w, h = image.size
    if crop_h > h or crop_w > w:
        raise ValueError(f"cannot centre-crop a {w}x{h} image to {crop_w}x{crop_h}; the image is too small")
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def center_crop_square(image: Image.Image) -> Image.Image:
    """Centre crop to a square of the short side (BigGAN's `CenterCropLongEdge`)."""
    return center_crop(image, min(image.size))


def fid_transform(resolution: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 HWC → square centre crop → LANCZOS resize to `resolution` (if given) → uint8 HWC."""

    def transform(image: np.ndarray) -> np.ndarray:
        pil = center_crop_square(Image.fromarray(image))
        if resolution is not None:
            pil = pil.resize((resolution, resolution), Image.LANCZOS)
        return np.asarray(pil)

    return transform


def patch_fid_transform(size: int = 299) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 HWC → the centre `size`×`size` crop at full resolution (no resizing)."""

    def transform(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if h < size or w < size:
            raise ValueError(f"patch-FID needs images of at least {size}x{size}; got {w}x{h}")
        return np.asarray(center_crop(Image.fromarray(image), size))

    return transform


def clip_transform(resolution: int = 256) -> Callable[[Image.Image], Image.Image]:
    """PIL → square centre crop → LANCZOS resize to `resolution` (before the CLIP model's own preprocessing)."""

    def transform(image: Image.Image) -> Image.Image:
        return center_crop_square(image).resize((resolution, resolution), Image.LANCZOS)

    return transform


def clean_resizer() -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's "clean" resizer (uint8 HWC → float32 HWC 299×299 in [0, 255])."""
    try:
        from cleanfid.resize import build_resizer
    except ImportError as e:
        raise ImportError(
            "FID needs clean-fid: pip install 'diffusers_disback[eval]' (or pip install clean-fid)"
        ) from e
    return build_resizer("clean")


# ------------------------------------------------------------------------------------------------------ features
def inception_feature_extractor(device: str | torch.device = "cuda") -> FeatureExtractor:
    """
    clean-fid's Inception-v3 (the TensorFlow FID network as TorchScript, 2048-d pool features). clean-fid downloads
    its weights on first use (about 100 MB) into its cache.
    """
    try:
        from cleanfid.features import build_feature_extractor
    except ImportError as e:
        raise ImportError(
            "the FID Inception network comes from clean-fid (which needs torchvision): "
            "pip install 'diffusers_disback[eval]'"
        ) from e
    model = build_feature_extractor("clean", torch.device(device), use_dataparallel=False)
    model.name = "clean-fid inception_v3 (clean mode)"
    return model


@torch.no_grad()
def compute_features(
    images: Iterable[Image.Image | np.ndarray],
    extractor: FeatureExtractor,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
    description: str = "features",
    total: int | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """
    Features of `images` as clean-fid computes them: uint8 RGB → `transform` → clean resize to 299² (float32,
    [0, 255]) → `extractor` in batches. Returns `[N, D]` in the extractor's dtype (float32 for Inception).

    Decoding, cropping and resizing run on `workers` threads (default: up to 8; PIL releases the GIL there), one
    batch at a time, so memory holds one batch; the order of the images is kept.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    resize = clean_resizer()

    def prepare(image) -> np.ndarray:
        arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
        if transform is not None:
            arr = transform(arr)
        return resize(arr).astype(np.float32)

    feats, chunk = [], []

    def flush(pool):
        batch = np.stack(list(pool.map(prepare, chunk)))
        chunk.clear()
        # NCHW contiguous, as clean-fid's ToTensor gives it (a channels-last view would change the conv's arithmetic)
        x = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).to(device)
        feats.append(extractor(x).detach().cpu().numpy())  # as clean-fid: statistics of the extractor's dtype

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        for image in tqdm(images, desc=description, total=total, disable=not progress):
            chunk.append(image)
            if len(chunk) == batch_size:
                flush(pool)
        if chunk:
            flush(pool)
    if not feats:
        raise ValueError(f"no images to compute {description} from")
    return np.concatenate(feats)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (in the features' dtype) and unbiased covariance (float64) of `[N, D]` features, as clean-fid takes them."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """
    The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6):
    `|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`, as clean-fid and pytorch-fid compute it
    (scipy's `sqrtm`; `eps` on the diagonals if the product is singular; a negligible imaginary part dropped).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape} (different feature extractors?)")
    diff = mu1 - mu2
    # the same square root clean-fid takes (it passes disp=False, which SciPy 1.18 removes; the value is the same)
    covmean = _sqrtm(linalg, sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm(linalg, (sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance product has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(linalg, matrix: np.ndarray) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular": handled by the caller's eps retry
        out = linalg.sqrtm(matrix)
    return out[0] if isinstance(out, tuple) else out


def extractor_id(extractor: FeatureExtractor) -> str:
    """
    What identifies a feature network in cache keys: its `name` plus, for a module, a hash of its weights (so two
    networks of one class never share reference statistics).
    """
    import hashlib

    name = getattr(extractor, "name", None) or type(extractor).__name__
    if isinstance(extractor, torch.nn.Module):
        h = hashlib.sha256()
        for key, tensor in sorted(extractor.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        name = f"{name} [{h.hexdigest()[:16]}]"
    return name


# ---------------------------------------------------------------------------------------------- reference cache
class ReferenceStatistics:
    """
    Mean and covariance of a reference set's features, cached as safetensors under `cache_dir`, keyed by the
    reference set's fingerprint, the transform and the feature extractor: computed once, reused by every later
    evaluation against the same references.
    """

    def __init__(self, mu: np.ndarray, sigma: np.ndarray, count: int, path: str | None = None):
        self.mu, self.sigma, self.count, self.path = mu, sigma, count, path

    @staticmethod
    def cache_path(cache_dir: str, key: str) -> str:
        return os.path.join(cache_dir, f"{key}.safetensors")

    @classmethod
    def load(cls, path: str) -> ReferenceStatistics:
        from safetensors import safe_open

        try:
            with safe_open(path, "np") as f:
                meta = f.metadata() or {}
                return cls(f.get_tensor("mu"), f.get_tensor("sigma"), int(meta.get("count", 0)), path)
        except Exception as e:  # truncated or foreign file
            raise ValueError(
                f"{path} is not a reference-statistics file (safetensors with 'mu' and 'sigma'): {e}; "
                "delete it to recompute"
            ) from e

    def save(self, path: str, **metadata):
        from safetensors.torch import save_file

        tensors = {"mu": torch.from_numpy(np.ascontiguousarray(self.mu)), "sigma": torch.from_numpy(self.sigma)}
        meta = {"count": str(self.count), **{k: json.dumps(v) for k, v in metadata.items()}}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.path = path

    @classmethod
    def get_or_compute(
        cls,
        cache_dir: str | None,
        key: str,
        images: Callable[[], Iterator[Image.Image]],
        extractor: FeatureExtractor,
        transform: Callable[[np.ndarray], np.ndarray],
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = False,
        total: int | None = None,
        metadata: dict | None = None,
    ) -> tuple[ReferenceStatistics, bool]:
        """Loads `key` from `cache_dir`, or computes and stores it. Returns the statistics and whether they were cached."""
        path = cls.cache_path(cache_dir, key) if cache_dir else None
        if path and os.path.exists(path):
            return cls.load(path), True
        feats = compute_features(
            images(), extractor, transform, batch_size, device, progress, "reference features", total
        )
        stats = cls(*feature_statistics(feats), count=len(feats))
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            stats.save(path, **(metadata or {}))
        return stats, False


# ----------------------------------------------------------------------------------------------------- CLIP score
class ClipScorer:
    """
    CLIP score: mean cosine similarity between image and caption embeddings.

    Images go through `clip_transform(resolution)` then `preprocess` (the model's own transform, PIL → CHW tensor);
    captions get `prefix` ("A photo depicts ", as in GigaGAN and DMD2) and go through `tokenizer`. Build the
    published one with [`ClipScorer.from_open_clip`]; tests pass tiny callables.
    """

    def __init__(
        self,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
        encode_text: Callable[[torch.Tensor], torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        prefix: str = "A photo depicts ",
        resolution: int = 256,
        device: str | torch.device = "cpu",
        name: str = "custom",
    ):
        self.encode_image, self.encode_text = encode_image, encode_text
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.prefix, self.resolution, self.device, self.name = prefix, resolution, device, name
        self.model: torch.nn.Module | None = None  # set by from_open_clip; lets `to` move it
        self._resize = clip_transform(resolution)

    def to(self, device: str | torch.device) -> ClipScorer:
        """Moves the CLIP model (when this scorer holds one) and the inputs to `device`."""
        if self.model is not None:
            self.model.to(device)
        self.device = device
        return self

    @classmethod
    def from_open_clip(
        cls,
        model_name: str = "ViT-g-14",
        pretrained: str = "laion2b_s12b_b42k",
        device: str | torch.device = "cuda",
        prefix: str = "A photo depicts ",
        resolution: int = 256,
    ) -> ClipScorer:
        """The protocol's scorer: an open_clip model in float32 (DMD2 casts it with `.float()`)."""
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("the CLIP score needs open_clip: pip install 'diffusers_disback[eval]'") from e
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        model = model.to(device).float().eval()
        tokenizer = open_clip.get_tokenizer(model_name)
        scorer = cls(
            model.encode_image,
            model.encode_text,
            preprocess,
            tokenizer,
            prefix,
            resolution,
            device,
            name=f"open_clip {model_name} {pretrained}",
        )
        scorer.model = model
        return scorer

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Tokens of `prefix + caption`, truncated to the model's context with the end token kept last."""
        return self.tokenizer([self.prefix + c for c in captions])

    @torch.no_grad()
    def similarities(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """Per-pair cosine similarities (float32, on the CPU)."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        pixels = torch.stack([self.preprocess(self._resize(im.convert("RGB"))) for im in images]).to(self.device)
        tokens = self.tokenize(captions).to(self.device)
        img = self.encode_image(pixels).float()
        txt = self.encode_text(tokens).float()
        return torch.nn.functional.cosine_similarity(img, txt, dim=1).cpu()

    def score(
        self,
        images: Iterable[Image.Image],
        captions: Sequence[str],
        batch_size: int = 64,
        progress: bool = False,
    ) -> float:
        """Mean cosine similarity over all (image, caption) pairs."""
        from tqdm.auto import tqdm

        sims, batch, done = [], [], 0
        captions = list(captions)

        def flush():
            nonlocal done
            sims.append(self.similarities(batch, captions[done : done + len(batch)]))
            done += len(batch)
            batch.clear()

        for image in tqdm(images, desc="CLIP score", total=len(captions), disable=not progress):
            batch.append(image)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not sims:
            raise ValueError("no images to score")
        if done != len(captions):
            raise ValueError(f"{done} images were scored against {len(captions)} captions")
        return float(torch.cat(sims).mean())
