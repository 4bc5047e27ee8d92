"""The package's one image-grid helper: validation grids, model-card samples and evaluation previews all use it."""

from __future__ import annotations

from collections.abc import Iterable

from PIL import Image


def image_grid(images: Iterable[Image.Image], columns: int | None = None, tile: int | None = None) -> Image.Image:
    """
    Images in rows of `columns` (default: all in one row), each resized to `tile` x `tile` pixels if given (else all
    take the first image's size); a last row that is not full is padded with white. Like diffusers'
    `make_image_grid`, without its requirement that the images fill every row.
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if tile is not None:
        images = [im.resize((tile, tile), Image.LANCZOS) for im in images]
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid
