"""Training data, streamed with `datasets`: prompts for both stages and real images for the optional GAN term. Each
stream is split by rank, shuffled with a buffer, repeated over epochs, and resumable exactly."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


class EmptyStreamError(RuntimeError):
    """The prompt stream produced no usable caption."""


# ------------------------------------------------------------------------------------------------------ prompts


class PromptStream:
    """
    Captions from a `datasets` source, streamed, split by rank, shuffled with a buffer, repeated over epochs, and
    resumable exactly: its state is the epoch and the number of raw examples consumed in it, and a resumed stream
    replays the (seeded, deterministic) order up to that point.

    Empty or non-string captions and examples without the caption column are counted and skipped (with a warning
    every `warn_every` skips); an epoch without a single usable caption is an [`EmptyStreamError`].

    Args:
        dataset_name / dataset_config_name: a Hub dataset (e.g. a prompt set) and its config.
        data_files: local files instead (`.txt` one prompt a line, `.csv`, `.json`/`.jsonl`, `.parquet`).
        caption_column: the column holding the prompt (`"text"` for `.txt` files).
        streaming: stream (default) instead of downloading/preparing the whole dataset.
        shuffle_buffer: examples in the shuffle buffer (0: no shuffling).
        seed: shuffling seed (each epoch reshuffles with `seed + epoch`).
        rank / world_size: this process's share (`datasets.distributed.split_dataset_by_node`).
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        data_files: str | list[str] | None = None,
        caption_column: str = "text",
        split: str = "train",
        streaming: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        cache_dir: str | None = None,
        warn_every: int = 100,
        dataset_kwargs: dict | None = None,
    ):
        if (dataset_name is None) == (data_files is None):
            raise ValueError(
                "give exactly one of `dataset_name` and `data_files` (`--dataset_name`/`--train_data_files`)"
            )
        self.caption_column = caption_column
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.warn_every = warn_every
        self.dataset = self._load(
            dataset_name, dataset_config_name, data_files, split, streaming, cache_dir, dataset_kwargs or {}
        )
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            self.dataset = split_dataset_by_node(self.dataset, rank=rank, world_size=world_size)
        self._unshuffled = self.dataset
        if shuffle_buffer > 0 and streaming:  # a prepared dataset is reshuffled per epoch in _epoch_iterator
            self.dataset = self.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.epoch = 0
        self.consumed = 0  # raw examples consumed in this epoch, skipped ones included
        self.skipped = 0
        self._usable = 0  # usable captions seen in this epoch (an epoch without one means an empty stream)
        self._iterator: Iterator | None = None

    @staticmethod
    def _load(dataset_name, dataset_config_name, data_files, split, streaming, cache_dir, dataset_kwargs):
        from datasets import load_dataset

        if dataset_name is not None:
            return load_dataset(
                dataset_name,
                dataset_config_name,
                split=split,
                streaming=streaming,
                cache_dir=cache_dir,
                **dataset_kwargs,
            )
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"--train_data_files not found: {missing}")
        ext = os.path.splitext(os.fspath(files[0]))[1].lower().lstrip(".")
        builder = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        if builder not in ("text", "csv", "json", "parquet"):
            raise ValueError(f"cannot read {files[0]!r}: use .txt, .csv, .json/.jsonl or .parquet prompt files")
        return load_dataset(builder, data_files=[os.fspath(f) for f in files], split=split, streaming=streaming)

    def _epoch_iterator(self) -> Iterator:
        if hasattr(self.dataset, "set_epoch"):  # streaming: the shuffle buffer reseeds with seed + epoch
            self.dataset.set_epoch(self.epoch)
        elif self.shuffle_buffer > 0:  # prepared (map-style): a full reshuffle per epoch
            self.dataset = self._unshuffled.shuffle(seed=self.seed + self.epoch)
        return itertools.islice(iter(self.dataset), self.consumed, None)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        while True:
            if self._iterator is None:
                self._iterator = self._epoch_iterator()
            try:
                example = next(self._iterator)
            except StopIteration:
                if self._usable == 0:
                    raise EmptyStreamError(
                        f"the prompt stream has no usable caption in column {self.caption_column!r} "
                        f"({self.skipped} examples skipped); check --caption_column and the data files"
                    ) from None
                self.epoch, self.consumed, self._usable, self._iterator = self.epoch + 1, 0, 0, None
                continue
            self.consumed += 1
            if not isinstance(example, dict) or self.caption_column not in example:
                raise KeyError(
                    f"{self._what} column {self.caption_column!r} not in the dataset; its columns are "
                    f"{sorted(example) if isinstance(example, dict) else type(example).__name__}. "
                    f"Set {self._column_flag}."
                )
            item = self._convert(example)
            if item is None:
                self.skipped += 1
                if self.skipped % self.warn_every == 1:
                    logger.warning("skipped %d examples with an unusable %s so far", self.skipped, self._what)
                continue
            self._usable += 1
            return item

    _what = "caption"
    _column_flag = "--caption_column"

    def _convert(self, example: dict):
        """The item an example yields, or None to skip it (counted)."""
        caption = example[self.caption_column]
        return caption.strip() if isinstance(caption, str) and caption.strip() else None

    def take(self, n: int) -> list[str]:
        """The next `n` captions."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed, self.skipped = int(state["epoch"]), int(state["consumed"]), int(state["skipped"])
        self._usable = 1 if self.consumed else 0  # resumed mid-epoch: the replayed part held captions
        self._iterator = None


class ImageStream(PromptStream):
    """
    Real images (and their captions, if the dataset has them) for the optional GAN term: the same streaming, rank
    split, shuffling and exact resume as [`PromptStream`]. Images are converted to RGB, resized on the short side and
    centre-cropped to `resolution`, and scaled to [-1, 1]; unreadable images are counted and skipped.

    `data_dir` is an image folder (`datasets`' `imagefolder`; a `metadata.jsonl` with a `text` field adds captions).
    Each real image is conditioned on its own caption, as the fakes are on theirs (DMD2 pairs real latents with their
    captions): a `caption_column` the dataset does not have is an error. `caption_column=None` conditions every real
    image on the empty prompt, which lets the discriminator tell real from fake by the text alone; it is allowed, with
    a warning.
    """

    _what = "image"
    _column_flag = "--real_image_column"

    def __init__(
        self, resolution: int, dataset_name=None, data_dir=None, image_column="image", caption_column="text", **kwargs
    ):
        if (dataset_name is None) == (data_dir is None):
            raise ValueError("give exactly one of `--real_dataset_name` and `--real_data_dir` for the GAN term")
        self.resolution = resolution
        self.text_column = caption_column
        if data_dir is not None:
            if not os.path.isdir(data_dir):
                raise FileNotFoundError(f"--real_data_dir {data_dir!r} is not a folder")
            super().__init__(
                dataset_name="imagefolder",
                caption_column=image_column,
                dataset_kwargs={"data_dir": data_dir},
                **kwargs,
            )
        else:
            super().__init__(dataset_name=dataset_name, caption_column=image_column, **kwargs)
        columns = self.dataset.column_names  # None when a streamed source does not declare its features
        if caption_column is None:
            logger.warning(
                "real images are conditioned on the empty prompt (no caption column), while generated images carry "
                "their prompts: the discriminator can tell them apart by the text alone. Give the captions with "
                "--real_caption_column if the dataset has them."
            )
        elif columns is not None and caption_column not in columns:
            raise self._no_caption_column(columns)
        from datasets import Image as ImageFeature

        # decode here, not in the datasets iterator, so one unreadable file is skipped instead of ending the stream
        self.dataset = self.dataset.cast_column(image_column, ImageFeature(decode=False))
        self._unshuffled = self._unshuffled.cast_column(image_column, ImageFeature(decode=False))

    def _no_caption_column(self, columns) -> ValueError:
        return ValueError(
            f"the real-image dataset has no caption column {self.text_column!r}; its columns are {sorted(columns)}. "
            "Pass --real_caption_column with the column that holds each image's caption (an image folder takes them "
            "from a `text` field in metadata.jsonl), or --real_caption_column none to condition real images on the "
            "empty prompt."
        )

    def _convert(self, example: dict):
        from PIL import Image

        if self.text_column and self.text_column not in example:  # a stream that did not declare its columns
            raise self._no_caption_column(example)

        image = example[self.caption_column]
        try:
            if isinstance(image, dict):  # undecoded: {"bytes": ..., "path": ...}
                import io

                image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
            image = image.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any unreadable image is skipped and counted
            logger.warning("unreadable image skipped: %s", e)
            return None
        r = self.resolution
        scale = r / min(image.size)
        size = (max(r, round(image.width * scale)), max(r, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - r) // 2, (image.height - r) // 2
        image = image.crop((left, top, left + r, top + r))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(r, r, 3)
        caption = example[self.text_column] if self.text_column else None
        return pixels.permute(2, 0, 1).float().div(127.5).sub(1), caption.strip() if isinstance(caption, str) else ""
