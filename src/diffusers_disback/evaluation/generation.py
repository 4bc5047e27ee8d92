"""Batched, seeded, resumable, data-parallel image generation for evaluation.

Image `i` is generated from caption `i` with its own CPU `torch.Generator` seeded `seed + i` (the initial latents
and any re-noising noise come from it), so an image does not depend on the batch size, the number of processes or
the device, and a run can stop and go on. Images are written as `images/00000.png` ... atomically; those that
exist are skipped. `images/generation.json` records the settings; going on with different ones is an error.

Under `accelerate launch`, the missing indices are split between the processes.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .._io import atomic_write, atomic_write_text
from .data import _sha

SETTINGS_FILE = "generation.json"


def image_path(images_dir: str, index: int) -> str:
    return os.path.join(images_dir, f"{index:05d}.png")


def missing_indices(images_dir: str, count: int) -> list[int]:
    return [i for i in range(count) if not os.path.exists(image_path(images_dir, i))]


def _check_settings(images_dir: str, settings: dict, is_main: bool):
    path = os.path.join(images_dir, SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        keys = list(settings) + [k for k in previous if k not in settings]  # a dropped setting is a change too
        changed = {k: (previous.get(k), settings.get(k)) for k in keys if previous.get(k) != settings.get(k)}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"{images_dir} holds images generated with other settings ({detail}); "
                "use another output folder, or delete the images to start over"
            )
    elif is_main:
        atomic_write_text(path, json.dumps(settings, indent=2))


def generate_images(
    pipeline,
    captions: Sequence[str],
    images_dir: str,
    seed: int = 0,
    num_inference_steps: int = 1,
    guidance_scale: float = 0.0,
    resolution: int = 1024,
    batch_size: int = 8,
    model_id: str | None = None,
    progress: bool = True,
    writer_threads: int | None = None,
    **pipeline_kwargs,
) -> dict:
    """
    Generates `captions[i]` → `images_dir/{i:05d}.png` for every missing `i`, in batches of `batch_size` per process.

    Images are written by `writer_threads` threads (default: up to 8) while the next batch generates.
    Returns `{"generated": n, "skipped": m}` for this process. The pipeline is used as given (move it to the
    device first; under `accelerate launch` each process should hold its own copy on its own device).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    scheduler = getattr(pipeline, "scheduler", None)
    settings = {
        "model": model_id,
        "pipeline": type(pipeline).__name__,
        "dtype": str(getattr(pipeline, "dtype", None)),
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": dict(scheduler.config) if scheduler is not None else None,
        "count": len(captions),
        "seed": seed,
        "seed_rule": "image i: torch.Generator('cpu').manual_seed(seed + i)",
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "captions_sha256": _sha(*captions),
        **{k: v for k, v in pipeline_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    settings = json.loads(json.dumps(settings, default=str))  # as it will read back from the file
    os.makedirs(images_dir, exist_ok=True)
    _check_settings(images_dir, settings, state.is_main_process)
    # the main process lists what is missing and tells the others (nodes may see a shared folder differently)
    todo = missing_indices(images_dir, len(captions)) if state.is_main_process else None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        todo = broadcast_object_list([todo], from_process=0)[0]
    skipped = len(captions) - len(todo)
    # PNG encoding of a 1024² image costs ~0.2 s of CPU, about what one SDXL step costs on an H200; PIL releases the
    # GIL while encoding, so writer threads overlap it with the next batch's generation
    writers = writer_threads or min(8, os.cpu_count() or 1)
    with state.split_between_processes(todo) as mine, ThreadPoolExecutor(writers) as pool:
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        pending: deque = deque()
        for batch in tqdm(batches, desc="generating", disable=not (progress and state.is_local_main_process)):
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
            images = pipeline(
                prompt=[captions[i] for i in batch],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=resolution,
                width=resolution,
                generator=generators,
                output_type="pil",
                **pipeline_kwargs,
            ).images
            for i, image in zip(batch, images):
                pending.append(pool.submit(atomic_write, image_path(images_dir, i), image.save))
            while len(pending) > 2 * max(batch_size, writers):  # bounded: at most two batches held in memory
                pending.popleft().result()
        for future in pending:
            future.result()  # a failed write is an error here, not a silently missing image
        generated = len(mine)
    state.wait_for_everyone()
    return {"generated": generated, "skipped": skipped if state.is_main_process else 0}
