"""Distributed helpers: what DDP, FSDP1 and FSDP2 need from the training loop (full state dicts, gradient clipping of
sharded models, preparing a trainable model without accelerate's hidden autocast)."""

from __future__ import annotations

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)


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


def prepare_trainable(accelerator, model, *optimizers_and_schedulers):
    """
    `accelerator.prepare` for one trainable model with its optimizer(s) and LR schedule(s), without the autocast that
    accelerate wraps around the model's forward under mixed precision: precision is decided by the loop's own
    autocast regions, as in DMD2, so the fake score's pass in the DM loss can run in fp32. Under FSDP each trainable
    model is prepared with its own optimizer, in its own call; the shared base of the LoRA mode is one model with two
    optimizers (the generator's and the fake score's adapters).
    """
    prepared = accelerator.prepare(model, *optimizers_and_schedulers)
    accelerator.unwrap_model(prepared[0], keep_fp32_wrapper=False)  # restores the module's own forward, in place
    return prepared


def clip_grad_norm(accelerator, model: torch.nn.Module, optimizer, max_grad_norm: float, parameters=None) -> None:
    """Gradient-norm clipping of one prepared model (or of `parameters` of it: one adapter of a shared base), under
    any distributed setup (after `accelerator.backward`)."""
    if not accelerator.sync_gradients:
        return
    parameters = list(model.parameters() if parameters is None else parameters)
    if is_fsdp2_sharded(model):
        # accelerate's clip_grad_norm_ matches the parameters against each prepared model with `==`, which fails on
        # DTensors when two prepared models share an architecture (the generator and the fake score); torch clips
        # DTensor gradients itself
        accelerator.unscale_gradients(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    else:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)


def finite_or_skip(accelerator, loss: torch.Tensor, what: str, nan_policy: str, global_step: int) -> bool:
    """
    Whether to apply this update: `loss` is finite on every rank. Decided together by all ranks (a rank that skipped
    backward alone would leave the others waiting in the gradient all-reduce). A non-finite loss is skipped with a
    warning (`nan_policy="skip"`) or stops the run (`"abort"`, a `FloatingPointError`).
    """
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if bool(accelerator.gather(finite).min() > 0):
        return True
    msg = f"{what} loss is {loss.item()} on rank {accelerator.process_index} (or another rank) at global step {global_step}"
    if nan_policy == "abort":
        raise FloatingPointError(msg + "; stopping (--nan_policy abort). Lower the learning rate or check data.")
    logger.warning(msg + "; skipping this update (--nan_policy skip)")
    return False


def load_path_verified_once(accelerator, path_dir: str):
    """
    Opens the degradation path at `path_dir` on every process, with each node file hashed once per machine: the local
    main process verifies every node (sha256, [`DegradationPath.verify`]) and the other processes on its machine
    trust its check. A failed check stops every process (they agree through one collective, so none is left waiting).
    """
    from ..distill import DegradationPath, PathError

    path = DegradationPath.load(path_dir, verify=False)  # the manifest only
    error = None
    if accelerator.is_local_main_process:
        try:
            path.verify()
        except PathError as e:
            error = e
    failed = bool(accelerator.gather(torch.tensor([float(error is not None)], device=accelerator.device)).max() > 0)
    if error is not None:
        raise error
    if failed:
        raise PathError(f"another process found the path at {path_dir} corrupt or incomplete (its error says how)")
    if not accelerator.is_local_main_process:
        path.mark_verified()
    return path
