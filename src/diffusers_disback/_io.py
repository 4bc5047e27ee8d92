"""Atomic writes: a file appears whole under its name or not at all (a crash or a full disk leaves no half file).

The package's one writer. The remote code (`pipeline_utils_disback.py`, which travels to the Hub without the package)
does not use it: it only rewrites the two JSON files diffusers' `save_pretrained` has just written, and does so in
place as diffusers does.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Calls `write(tmp)` with a temporary path next to `path`, then renames it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp{ext}")  # keeps the extension: PIL picks the format by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str, text: str) -> str:
    def write(tmp: str):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
