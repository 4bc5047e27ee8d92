"""Captions to generate from and reference images to compare against.

One type, [`CaptionSet`], from five kinds of source:

- a text file, one caption per line (e.g. the 10k-caption list a paper used): captions only;
- COCO annotations (`captions_val2014.json`) and the image folder: one caption per image (the annotation with the
  lowest id), images in id order, or a seeded random subset of them;
- a dataset with `datasets`: a Hub id, or a local folder in the `imagefolder` layout (images + `metadata.jsonl`
  with a caption column), streamed, first `num` rows;
- the shapes world (`CaptionSet.from_shapes`): every caption with a fresh render;
- a folder of images (reference only, e.g. a paper's reference set): [`image_folder`].

Every set carries a `fingerprint` of what it was built from, which keys the cache of reference statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions", "sentences", "sentences_raw")


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class CaptionSet:
    """
    Captions, optionally paired with reference images.

    Attributes:
        captions: the prompts, in order; image `i` of an evaluation is generated from `captions[i]`.
        source: where they came from (for the result file).
        fingerprint: a hash of the source and the selection (keys cached reference statistics).
        image_loader: `None` for captions only; else a callable returning an iterator of RGB PIL images, the
            reference image of each caption, in the same order.
    """

    captions: list[str]
    source: str
    fingerprint: str
    image_loader: Callable[[], Iterator[Image.Image]] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_images(self) -> bool:
        return self.image_loader is not None

    def images(self) -> Iterator[Image.Image]:
        if self.image_loader is None:
            raise ValueError(f"{self.source} has captions only; pass reference images (a folder or a dataset)")
        return self.image_loader()

    @classmethod
    def from_text_file(cls, path: str, num: int | None = None) -> CaptionSet:
        """One caption per line; blank lines are skipped; the first `num` are used."""
        with open(path, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()]
        if not captions:
            raise ValueError(f"{path} holds no captions (one per line expected)")
        captions = _first(captions, num, path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return cls(captions, source=path, fingerprint=_sha("text", digest, len(captions)))

    @classmethod
    def from_shapes(cls, split: str = "all", seed_base: int | None = None) -> CaptionSet:
        """
        Every caption of the shapes world's `split` (`diffusers_disback.shapes`; 144 for "all"), each with a fresh
        render (seed `seed_base + i`; default the judge's evaluation seeds, never used to train it) as its reference
        image. What `disback evaluate --protocol shapes` scores against (docs/evaluation.md).
        """
        from ..shapes import all_scenes, render
        from .shapes_judge import EVAL_SEED_BASE

        base = EVAL_SEED_BASE if seed_base is None else seed_base
        scenes = all_scenes(split)

        def load() -> Iterator[Image.Image]:
            for i, scene in enumerate(scenes):
                yield render(scene, base + i)

        return cls(
            [s.caption for s in scenes],
            source=f"shapes:{split}",
            fingerprint=_sha("shapes", split, base, [s.caption for s in scenes]),
            image_loader=load,
        )

    @classmethod
    def from_coco(cls, annotations: str, images_dir: str, num: int | None = None, seed: int = 0) -> CaptionSet:
        """
        COCO captions: `annotations` is `captions_val2014.json` (or any file of that format), `images_dir` the
        folder its `file_name`s are in. One caption per image (the lowest annotation id); with `num` smaller than
        the number of images, a random subset drawn with `seed`, kept in image-id order.
        """
        with open(annotations, encoding="utf-8") as f:
            coco = json.load(f)
        if "images" not in coco or "annotations" not in coco:
            raise ValueError(f"{annotations} is not a COCO captions file (needs 'images' and 'annotations' keys)")
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        first: dict[int, tuple[int, str]] = {}
        for ann in coco["annotations"]:
            image_id = ann["image_id"]
            if image_id in files and (image_id not in first or ann["id"] < first[image_id][0]):
                first[image_id] = (ann["id"], ann["caption"].strip())
        ids = sorted(first)
        if num is not None and num < len(ids):
            ids = sorted(random.Random(seed).sample(ids, num))
        else:
            ids = _first(ids, num, annotations)
        missing = [files[i] for i in ids[:1000] if not os.path.exists(os.path.join(images_dir, files[i]))]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of the first {min(len(ids), 1000)} COCO images are not in {images_dir} "
                f"(e.g. {missing[0]}); point images_dir at the folder that holds the val2014 images"
            )
        paths = [os.path.join(images_dir, files[i]) for i in ids]
        with open(annotations, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()

        def load() -> Iterator[Image.Image]:
            for p in paths:
                with Image.open(p) as im:
                    yield im.convert("RGB")

        files_key = [(p, os.path.getsize(p)) for p in paths]  # a resized copy of the images is another reference set
        return cls(
            [first[i][1] for i in ids],
            source=f"coco:{annotations}",
            fingerprint=_sha("coco", digest, seed, ids, os.path.abspath(images_dir), files_key),
            image_loader=load,
        )

    @classmethod
    def from_dataset(
        cls,
        name: str,
        split: str | None = None,
        num: int | None = None,
        caption_column: str | None = None,
        image_column: str | None = "image",
        revision: str | None = None,
    ) -> CaptionSet:
        """
        The first `num` rows of a `datasets` dataset, streamed: a Hub id, or a local folder (`imagefolder` layout:
        images and a `metadata.jsonl` with `file_name` and a caption column). `caption_column` defaults to the first
        of caption/text/prompt/captions/sentences that exists; a list of captions gives its first. With
        `image_column=None` only captions are read. `split` defaults to "train" for a local folder (the only split
        an imagefolder has) and "validation" for a Hub id.
        """
        import datasets

        local = os.path.isdir(name)
        if split is None:  # a local imagefolder has one split, "train"; COCO on the Hub is usually "validation"
            split = "train" if local else "validation"
        if local:
            ds = datasets.load_dataset("imagefolder", data_dir=name, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True, revision=revision)
        columns = list(ds.features) if ds.features is not None else list(next(iter(ds.take(1))).keys())
        if caption_column is None:
            caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption_column not in columns:
            raise ValueError(f"{name} has no caption column {caption_column!r}; its columns are {columns}")
        if image_column is not None and image_column not in columns:
            raise ValueError(
                f"{name} has no image column {image_column!r}; its columns are {columns} "
                "(pass image_column=None for captions only)"
            )
        rows = ds.take(num) if num is not None else ds
        captions = [_caption(row[caption_column]) for row in rows.select_columns([caption_column])]
        captions = _first(captions, num, name)
        loader = None
        if image_column is not None:

            def loader() -> Iterator[Image.Image]:
                for row in rows.select_columns([image_column]):
                    yield row[image_column].convert("RGB")

        key = _folder_digest(name) if local else _dataset_commit(name, revision)
        return cls(
            captions,
            source=f"dataset:{name}[{split}]",
            fingerprint=_sha("dataset", name if not local else "local", key, split, caption_column, len(captions)),
            image_loader=loader,
        )


def image_folder(path: str, num: int | None = None) -> tuple[str, Callable[[], Iterator[Image.Image]], int]:
    """
    A folder of reference images (recursive, sorted by relative path; the first `num`). Returns the fingerprint,
    a loader of RGB PIL images, and the count.
    """
    files = sorted(
        os.path.relpath(os.path.join(root, f), path)
        for root, _, names in os.walk(path)
        for f in names
        if f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    files = _first(files, num, path)

    def load() -> Iterator[Image.Image]:
        for f in files:
            with Image.open(os.path.join(path, f)) as im:
                yield im.convert("RGB")

    return _folder_digest(path, files), load, len(files)


def _dataset_commit(name: str, revision: str | None) -> str:
    """The commit a Hub dataset's revision points to (so a dataset updated on `main` gets new statistics)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, revision=revision).sha or revision or "main"
    except Exception:  # offline, or not a Hub dataset: the revision name is the best key there is
        return revision or "main"


def _folder_digest(path: str, files: list[str] | None = None) -> str:
    """Path, names, sizes and modification times of `files` under `path` (default: every file there)."""
    if files is None:
        files = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
    stats = (os.stat(os.path.join(path, f)) for f in files)
    return _sha("folder", os.path.abspath(path), *((f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)))


def _caption(value) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, dict):  # e.g. {"raw": ...}
        value = value.get("raw", next(iter(value.values()), ""))
    return str(value).strip()


def _first(items: list, num: int | None, source: str) -> list:
    if num is None:
        return items
    if num > len(items):
        raise ValueError(f"asked for {num} captions but {source} has only {len(items)}; lower the number")
    return items[:num]
