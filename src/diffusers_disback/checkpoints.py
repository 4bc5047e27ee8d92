"""Loading released raw UNet checkpoints (DisBack's `SDXL_DisBack.bin`, DMD2 UNets, training dumps) strictly and safely.

Pickled checkpoints are read with `torch.load(..., weights_only=True)`; safetensors files as they are. Wrapper
prefixes that training code adds (`module.` from DDP, `_orig_mod.` from `torch.compile`, `feedforward_model.` /
`fake_unet.` from DMD2's wrappers, ...) are stripped, and the weights are loaded strictly: a checkpoint that does not
match the UNet config is an error that names the keys, never a silent partial load.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping

import torch

__all__ = ["CheckpointError", "WRAPPER_PREFIXES", "load_state_dict", "strip_wrapper_prefixes", "load_unet_checkpoint"]

# Prefixes that wrappers put in front of a UNet's own keys, stripped repeatedly in any order.
WRAPPER_PREFIXES = (
    "module.",
    "_orig_mod.",
    "feedforward_model.",
    "fake_unet.",
    "real_unet.",
    "generator.",
    "unet.",
    "model.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)
# Containers that hold the state dict one level down.
_NESTED_KEYS = ("state_dict", "model", "module", "unet", "ema", "generator")
_MAX_NAMED_KEYS = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""


def _name_keys(keys, limit: int = _MAX_NAMED_KEYS) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """
    Reads a state dict from a `.safetensors` file or a pickled `.bin`/`.pt`/`.pth`/`.ckpt` file (with
    `weights_only=True`), unwrapping a `{"state_dict": ...}`-style container.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: the file is corrupt or truncated, holds Python objects other than tensors, or holds no
            tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"Checkpoint {path!r} is empty (0 bytes): the download or copy was interrupted.")

    if path.endswith(".safetensors") or _looks_like_safetensors(path, size):
        state = _load_safetensors(path, size)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own message suggests weights_only=False: never passed on (that would run the file's code)
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found:
                raise CheckpointError(
                    f"Checkpoint {path!r} holds Python objects besides tensors ({found.group(1)}), which are not "
                    "loaded. Re-save it as a plain state dict of tensors or as safetensors."
                ) from None
            raise CheckpointError(
                f"Checkpoint {path!r} ({size} bytes) is corrupt or truncated, or not a PyTorch state dict: it does "
                "not read as a pickle of tensors. Check that it is the checkpoint file itself (not an HTML page or a Git LFS "
                "pointer) and download it again."
            ) from None
        except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways; all mean the same here
            raise CheckpointError(
                f"Checkpoint {path!r} ({size} bytes) is corrupt or truncated and cannot be read "
                f"({type(e).__name__}). Download it again."
            ) from None

    state = _unwrap_container(state, path)
    return state


def _looks_like_safetensors(path: str, size: int) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length followed by a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{"


def _load_safetensors(path: str, size: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {path!r} ({size} bytes) is not a readable safetensors file: it is corrupt or truncated "
            f"({e}). Download it again."
        ) from e


def _unwrap_container(state, path: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            break
        nested = [k for k in _NESTED_KEYS if isinstance(state.get(k), Mapping)]
        if not nested:
            break
        state = state[nested[0]]
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, Mapping) else f"keys {_name_keys(state.keys())}"
        raise CheckpointError(f"Checkpoint {path!r} holds no tensors (found {found}); expected a UNet state dict.")
    non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise CheckpointError(
            f"Checkpoint {path!r} mixes tensors with {len(non_tensors)} non-tensor entries ({_name_keys(non_tensors)})."
        )
    return dict(state)


def strip_wrapper_prefixes(
    state_dict: Mapping[str, torch.Tensor], expected_keys=None, prefixes=WRAPPER_PREFIXES
) -> dict[str, torch.Tensor]:
    """
    Removes wrapper prefixes (`module.`, `_orig_mod.`, `feedforward_model.`, ...) from every key.

    A prefix is stripped only where all keys carry it; when `expected_keys` is given, stripping also stops as soon as
    the keys match them (so a model whose own keys start with e.g. `model.` is left alone).
    """
    expected = set(expected_keys) if expected_keys is not None else None
    state = dict(state_dict)
    changed = True
    while changed and state:
        changed = False
        if expected is not None and set(state) == expected:
            break
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
                break
    return state


def _resolve_unet_config(config, revision: str | None = None) -> dict:
    from diffusers import UNet2DConditionModel

    if config is None:
        raise CheckpointError(
            "A raw UNet checkpoint carries no architecture: pass `config=` (a UNet config dict, a UNet, a folder "
            "with config.json, or a pipeline folder / Hub repo with a `unet/` subfolder)."
        )
    if isinstance(config, UNet2DConditionModel):
        return dict(config.config)
    if isinstance(config, Mapping):
        return dict(config)
    config = os.fspath(config)
    if os.path.isfile(config) or os.path.isfile(os.path.join(config, "config.json")):  # config.json or a UNet folder
        return UNet2DConditionModel.load_config(config)
    return UNet2DConditionModel.load_config(config, subfolder="unet", revision=revision)


def load_unet_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    config=None,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    checkpoint_revision: str | None = None,
):
    """
    Loads a raw UNet checkpoint into a [`UNet2DConditionModel`], strictly.

    Args:
        checkpoint: a local file (`.safetensors`, `.bin`, `.pt`, ...), a Hub file `owner/repo/path/in/repo.bin`, or a
            state dict.
        config: the UNet architecture: a config dict, a `UNet2DConditionModel` (its config is used; the model itself
            is not modified), a `config.json`, a UNet folder, or a pipeline folder / Hub repo id with a `unet/`
            subfolder (e.g. `"stabilityai/stable-diffusion-xl-base-1.0"`).
        torch_dtype: cast the weights to this dtype (default: keep the checkpoint's dtype).
        revision: the revision of a Hub `config`.
        checkpoint_revision: the revision of a Hub `checkpoint` (its repo is usually not the config's).

    Returns:
        `UNet2DConditionModel` in eval mode.

    Raises:
        CheckpointError: unreadable file, or keys/shapes that do not match the config (the error names them).

    Example:
        ```py
        >>> from diffusers_disback import load_unet_checkpoint
        >>> unet = load_unet_checkpoint("SDXL_DisBack.bin", config="stabilityai/stable-diffusion-xl-base-1.0")
        ```
    """
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    source = "<state dict>"
    if isinstance(checkpoint, Mapping):
        state = _unwrap_container(checkpoint, source)
    else:
        source = os.fspath(checkpoint)
        if not os.path.exists(source):
            from .hub import download_checkpoint

            source = download_checkpoint(source, revision=checkpoint_revision)
        state = load_state_dict(source)

    unet_config = _resolve_unet_config(config, revision=revision)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    expected = unet.state_dict()
    state = strip_wrapper_prefixes(state, expected_keys=expected.keys())

    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        lines = [f"Checkpoint {source!r} does not match the UNet config ({len(expected)} keys expected):"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {_name_keys(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {_name_keys(unexpected)}")
        lines.append(
            "Check that `config` is the architecture the checkpoint was trained with (e.g. SDXL base for an SDXL "
            "DisBack/DMD2 UNet) and that the file is a UNet state dict."
        )
        raise CheckpointError("\n".join(lines))
    mismatched = {k: (tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape}
    if mismatched:
        shown = "; ".join(
            f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in list(mismatched.items())[:_MAX_NAMED_KEYS]
        )
        raise CheckpointError(
            f"Checkpoint {source!r}: {len(mismatched)} tensors have the wrong shape ({shown}). "
            "The checkpoint was trained with a different UNet config."
        )

    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    unet.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:
        raise CheckpointError(f"UNet tensors left uninitialised after loading {source!r}: {_name_keys(meta)}")
    return unet.eval()
