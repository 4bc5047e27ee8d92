"""SDXL glue for DisBack training: prompts to conditioning, UNets as scores, a resumable prompt stream, the run's
resumable state, and Hub pushes in the background.

The training script (`examples/train_disback/train_disback_sdxl.py`) is the loop; what can be tested on its own lives
here. The method itself is in `diffusers_disback.distill`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

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


# ------------------------------------------------------------------------------------------------ conditioning


class SDXLConditioner:
    """
    Prompts to SDXL conditioning, exactly as `StableDiffusionXLPipeline.encode_prompt` computes it at inference:
    penultimate hidden states of both text encoders concatenated, encoder 2's pooled projection, and
    `add_time_ids = (H, W, 0, 0, H, W)`. The unconditional branch for CFG is all zeros (SDXL's
    `force_zeros_for_empty_prompt`, and what DMD2 trains with).
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2, resolution: int):
        from diffusers import StableDiffusionXLPipeline

        if resolution % 8:
            raise ValueError(f"--resolution must be divisible by 8, got {resolution}")
        self.encoder = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=None,
            scheduler=None,
        )
        self.resolution = resolution

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        prompt_embeds, _, pooled, _ = self.encoder.encode_prompt(
            prompts, device=torch.device(device), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=prompt_embeds.dtype)
        return {"prompt_embeds": prompt_embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}

    @staticmethod
    def uncond(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional conditioning of a batch: zero embeddings, same time ids."""
        return {
            "prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
            "text_embeds": torch.zeros_like(cond["text_embeds"]),
            "time_ids": cond["time_ids"],
        }


def unet_eps_fn(unet: torch.nn.Module, autocast: bool = True):
    """
    An SDXL UNet as the score callable `eps(x_t, t, cond)` of `diffusers_disback.distill` (float32 out).

    `autocast=False` runs it in its own weights' dtype even inside an autocast region: the fake score's pass in the
    distribution-matching loss runs in fp32, as DMD2's does (docs/method.md, "Differences from the reference code").
    """

    def eps(x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = _dtype_of(unet)
        with torch.autocast(x_t.device.type, enabled=False) if not autocast else contextlib.nullcontext():
            return unet(
                x_t.to(dtype),
                t,
                encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                added_cond_kwargs={
                    "text_embeds": cond["text_embeds"].to(dtype),
                    "time_ids": cond["time_ids"].to(dtype),
                },
                return_dict=False,
            )[0].float()

    return eps


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def is_fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) sharded the model's parameters into DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """
    The model's full (unsharded) state dict on the main process, under any distributed setup. Under FSDP2 accelerate's
    `get_state_dict` hands back sharded DTensors with a sharded state-dict config, so the full one is gathered with
    `torch.distributed.checkpoint` (other ranks get an empty dict; every rank must call this).
    """
    if is_fsdp2_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def lora_state_dict(full_state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights, keyed as peft saves them (`...lora_A.weight`), from a gathered full state dict."""
    return {
        k.replace(f".{adapter_name}.", "."): v
        for k, v in full_state.items()
        if "lora_" in k and f".{adapter_name}." in k
    }


class DiscriminatorHead(torch.nn.Module):
    """
    DMD2's "classifier on clean image": a conv head on the fake score's mid-block features -> one logit per sample.

    As DMD2 builds it for SDXL at 1024 (mid-block features 32x32): stride-2 4x4 convs (each with GroupNorm and SiLU)
    while the features are larger than 4x4, one conv whose kernel and stride are the remaining size (4x4 -> 1x1),
    then a 1x1 conv to the logit. `size` is the mid-block's spatial size (the latent size / 2^(down blocks - 1)).
    """

    def __init__(self, channels: int, size: int, groups: int = 32):
        super().__init__()
        groups = min(groups, channels)
        layers = []
        while size > 4:
            layers += [
                torch.nn.Conv2d(channels, channels, 4, 2, 1),
                torch.nn.GroupNorm(groups, channels),
                torch.nn.SiLU(),
            ]
            size //= 2
        layers += [
            torch.nn.Conv2d(channels, channels, size, size),
            torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(),
        ]
        self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1).squeeze(1)


class FakeScoreWithHead(torch.nn.Module):
    """
    The fake score with the discriminator head, as one module (so DDP/FSDP see one model and one optimizer). Called
    like a UNet it returns `(eps,)`; with `classify=True` it returns `(eps, logits)` from the same forward pass, the
    head reading the mid-block output through a forward hook.
    """

    def __init__(self, unet: torch.nn.Module, latent_size: int):
        super().__init__()
        self.unet = unet
        mid_size = latent_size // 2 ** (len(unet.config.down_block_types) - 1)
        self.head = DiscriminatorHead(unet.config.block_out_channels[-1], mid_size)
        self._features: list[torch.Tensor] = []
        unet.mid_block.register_forward_hook(lambda module, args, output: self._features.append(output))

    @property
    def config(self):
        return self.unet.config

    @staticmethod
    def unet_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's part of a (gathered) state dict of this module, keyed as the bare UNet's: what a path node
        stores."""
        return {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        added_cond_kwargs=None,
        return_dict=False,
        classify: bool = False,
    ):
        self._features.clear()
        eps = self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if not classify:
            return (eps,)
        return eps, self.head(self._features[-1].float())


# ------------------------------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """Where a run is, written as `run_state.json` into every checkpoint: stage, steps and the backtracking schedule
    (the prompt stream's position and the noise generator are saved per rank beside it)."""

    stage: str = "degradation"
    stage_step: int = 0
    global_step: int = 0
    schedule: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.stage = state["stage"]
        self.stage_step = int(state["stage_step"])
        self.global_step = int(state["global_step"])
        self.schedule = dict(state["schedule"])


# ---------------------------------------------------------------------------------------------------- pushing


class BackgroundPusher:
    """
    Pushes folders to the Hub from a background thread so training never waits on the network.

    Each push first snapshots the folder (hard links where possible, else copies) so checkpoint rotation can delete
    the original meanwhile; the snapshot is removed after the push, the original is never touched. Failures are
    retried by `hub.push_folder`, then logged and kept in `failures`; training goes on.
    """

    def __init__(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        max_retries: int = 3,
        retry_wait: float = 2.0,
    ):
        self.repo_id = repo_id
        self.private = private
        self._token = token  # never logged
        self.max_retries = max_retries
        self.retry_wait = retry_wait
        self.failures: list[str] = []
        self.pushed: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="disback-hub-push", daemon=True)
        self._thread.start()

    def submit(self, folder: str, path_in_repo: str | None = None, commit_message: str = "Upload") -> None:
        # next to the folder: same filesystem, so the snapshot is hard links, not a copy of tens of GB
        staging = tempfile.mkdtemp(prefix="disback-push-", dir=os.path.dirname(os.path.abspath(folder)))
        snapshot = os.path.join(staging, os.path.basename(os.path.normpath(folder)))
        try:
            shutil.copytree(folder, snapshot, copy_function=_link_or_copy)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            self.failures.append(f"{folder}: could not snapshot for pushing ({e})")
            logger.error("not pushing %s: could not snapshot it (%s)", folder, e)
            return
        self._queue.put((snapshot, staging, path_in_repo, commit_message))

    def _work(self) -> None:
        from .hub import HubPushError, push_folder

        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            snapshot, staging, path_in_repo, message = item
            try:
                push_folder(
                    snapshot,
                    self.repo_id,
                    private=self.private,
                    token=self._token,
                    commit_message=message,
                    path_in_repo=path_in_repo,
                    max_retries=self.max_retries,
                    retry_wait=self.retry_wait,
                )
                self.pushed.append(path_in_repo or ".")
                logger.info("pushed %s to %s", path_in_repo or "the output folder", self.repo_id)
            except HubPushError as e:
                self.failures.append(str(e))
                logger.error("push to %s failed, training goes on: %s", self.repo_id, e)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
                self._queue.task_done()

    def wait(self) -> None:
        """Blocks until every submitted push finished (successfully or not)."""
        self._queue.join()

    def close(self) -> None:
        self.wait()
        self._queue.put(None)
        self._thread.join(timeout=60)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst
