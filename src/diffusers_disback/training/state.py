"""Where a run is, and how it is saved and resumed: [`RunState`], checkpoint save/restore, and the one resume plan.

A checkpoint folder `OUTPUT_DIR/checkpoints/checkpoint-<global step>/` holds accelerate's state (models, optimizers,
LR schedulers, RNGs; sharded under FSDP), `run_state.json` ([`RunState`]), and per rank `data_<rank>.json` (stream
positions) and `noise_rng_<rank>.safetensors` (the training noise generator). It is written as `<name>.tmp` and
renamed, so a run killed mid-write leaves the previous checkpoint as the last good one. The rename happens only
after every rank's part is on disk: the main process checks each rank's files, flushes them, and writes
`checkpoint_manifest.json` (every file's size and sha256) last. A checkpoint is trusted only when it matches its
manifest ([`verify_checkpoint`]); `--resume_from_checkpoint latest` takes the newest one that does
([`newest_good_checkpoint`]) and names every damaged one it skips.

[`plan_resume`] reads a checkpoint once and says what every stage does with it ([`ResumePlan`]); nothing else opens
`run_state.json`. Before accelerate unpickles the optimizer, LR-scheduler and RNG states, [`check_pickles`] makes sure
no pickle in the checkpoint would run code (docs/training.md, "Faults").
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict, dataclass, field

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from .._io import failpoint

logger = logging.getLogger(__name__)

STAGES = ("degradation", "backtracking")
MANIFEST = "checkpoint_manifest.json"
RUN_STATE = "run_state.json"


class DamagedCheckpointError(RuntimeError):
    """A checkpoint that does not match its manifest (a file cut short, changed or missing), or holds a pickle that
    would run code. Its message is one line that names the checkpoint and the file."""


@dataclass
class RunState:
    """Where a run is, written as `run_state.json` into every checkpoint: stage, steps and the backtracking schedule's
    position (the streams' positions and the noise generator are saved per rank beside it). A checkpoint taken at the
    end of stage 1 says `stage="backtracking", stage_step=0`."""

    stage: str = "degradation"
    stage_step: int = 0
    global_step: int = 0
    backtracking: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.stage = state["stage"]
        self.stage_step = int(state["stage_step"])
        self.global_step = int(state["global_step"])
        self.backtracking = dict(state["backtracking"])


def checkpoint_dirs(output_dir: str) -> list[str]:
    """The finished checkpoints of a run, oldest first (named so; whether they are intact is [`verify_checkpoint`])."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return [os.path.join(root, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


def _sha256(path: str, flush: bool = False) -> str:
    with open(path, "rb") as f:
        if flush:  # on disk, not only in the page cache: the checkpoint must survive the machine, not just the process
            os.fsync(f.fileno())
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_of(folder: str) -> list[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files]
    return sorted(f for f in found if f != MANIFEST)


def rank_files(world_size: int) -> list[str]:
    """The files each rank writes into every checkpoint (its RNGs, stream positions and noise generator)."""
    names = ("random_states_{}.pkl", "data_{}.json", "noise_rng_{}.safetensors")
    return [name.format(rank) for rank in range(world_size) for name in names]


def hash_share(folder: str, rank: int = 0, world_size: int = 1) -> dict[str, dict]:
    """This rank's share of a checkpoint's files (every `world_size`-th, from `rank`), each flushed to disk and
    hashed: `{relative path: {"size", "sha256"}}`."""
    share = {}
    for rel in _files_of(folder)[rank::world_size]:
        path = os.path.join(folder, rel)
        share[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path, flush=True)}
    return share


def write_manifest(folder: str, world_size: int, digests: dict[str, dict] | None = None) -> dict:
    """
    The main process, once every rank has written its part: checks that each rank's files are there and records
    every file's size and sha256 (`digests`, from [`hash_share`] on each rank; hashed here if None) in
    `checkpoint_manifest.json`, written last (atomically).
    """
    from .._io import atomic_write_text

    missing = [f for f in rank_files(world_size) if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DamagedCheckpointError(f"{folder} lacks {', '.join(missing)}: a rank's part was not written")
    files = dict(digests) if digests is not None else hash_share(folder)
    unhashed = sorted(set(_files_of(folder)) - set(files))
    if unhashed:
        raise DamagedCheckpointError(f"{folder}: {', '.join(unhashed)} appeared after the ranks hashed the folder")
    manifest = {"format": 1, "world_size": world_size, "files": dict(sorted(files.items()))}
    atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(folder: str, hashes: bool = True) -> bool:
    """
    Checks `folder` against its manifest: every listed file present, of its size and (with `hashes`) its sha256.
    Returns True when verified, False for a checkpoint written before manifests existed (trusted as it is, with a
    warning by the caller).

    Raises:
        DamagedCheckpointError: one line naming the checkpoint and the first file that is wrong.
    """
    name = os.path.basename(os.path.normpath(folder))
    if not os.path.isfile(os.path.join(folder, RUN_STATE)):
        raise DamagedCheckpointError(f"{name} is not a checkpoint of this script (no {RUN_STATE})")
    manifest_file = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_file):
        return False
    try:
        with open(manifest_file, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise DamagedCheckpointError(f"{name}: its {MANIFEST} is unreadable ({e})") from None
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise DamagedCheckpointError(f"{name}: {rel} is missing")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise DamagedCheckpointError(f"{name}: {rel} is {size} bytes, {want['size']} were written (cut short?)")
        if hashes and _sha256(path) != want["sha256"]:
            raise DamagedCheckpointError(f"{name}: {rel} differs from what was written (sha256 mismatch)")
    return True


def newest_good_checkpoint(output_dir: str, hashes: bool = True) -> str | None:
    """
    The newest checkpoint of `output_dir` that matches its manifest (None if there is none at all). Each damaged one
    it passes over is named in one warning line; if every checkpoint is damaged, raises with what to do.
    """
    found = checkpoint_dirs(output_dir)
    damaged = []
    for folder in reversed(found):
        try:
            if not verify_checkpoint(folder, hashes):
                logger.warning(f"{folder} has no {MANIFEST} (written by an older version): resuming it unverified")
            return folder
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            logger.warning(f"skipping a damaged checkpoint: {e}")
    if damaged:
        raise DamagedCheckpointError(
            f"every checkpoint in {os.path.join(output_dir, 'checkpoints')} is damaged ({'; '.join(damaged)}); "
            "restore one from a copy (or the Hub: --resume_from_checkpoint hub), or start afresh in a new "
            "--output_dir"
        )
    return None


# The globals a checkpoint's pickles may name: tensors and their storages, accelerate's numpy RNG state, and the
# dataclasses of torch.distributed.checkpoint's `.metadata` (which torch reads with plain `pickle.load`).
_SAFE_PICKLE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
_SAFE_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.dtypes", "UInt32DType"),
    ("_codecs", "encode"),
}


class _Inert:
    """Stands in for every allowed global while checking: it takes any arguments and state and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _RefusingUnpickler(pickle.Unpickler):
    """Walks a pickle calling nothing: each allowed global is an [`_Inert`], any other stops it (tensor storages are
    not read: `persistent_load` returns None)."""

    def find_class(self, module: str, name: str):
        allowed = (module, name) in _SAFE_PICKLE_GLOBALS or module.startswith(_SAFE_PICKLE_MODULES)
        allowed = allowed or (module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return _Inert

    def persistent_load(self, pid):
        return None


_TORCH_DTYPES = {str(d).split(".")[1] for d in vars(torch).values() if isinstance(d, torch.dtype)}


def _pickle_streams(path: str):
    """The pickles inside one checkpoint file: the `data.pkl` of a `torch.save` zip, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if entry.endswith(".pkl"):
                    yield z.read(entry)
    else:
        with open(path, "rb") as f:
            yield f.read()


def check_pickles(folder: str) -> None:
    """
    Refuses a checkpoint holding a pickle that would run code: every `*.pkl`, `*.bin` and torch.distributed
    `.metadata` file in `folder` is read with an unpickler that builds nothing but tensors, numpy RNG states and
    torch.distributed.checkpoint's metadata. (accelerate loads the first two with `weights_only=True`, which refuses
    them too; torch reads `.metadata` with plain `pickle.load`, which does not.)

    Raises:
        DamagedCheckpointError: naming the file and the global it would have called.
    """
    name = os.path.basename(os.path.normpath(folder))
    for rel in _files_of(folder):
        if not rel.endswith((".pkl", ".bin", ".metadata")):
            continue
        try:
            for data in _pickle_streams(os.path.join(folder, rel)):
                _RefusingUnpickler(io.BytesIO(data)).load()
        except pickle.UnpicklingError as e:
            raise DamagedCheckpointError(
                f"{name}: {rel} holds a pickle that would call {e}, which a checkpoint of this script never does; "
                "not loading it. Delete this checkpoint and resume from an older one."
            ) from None
        except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways; all mean the same here
            raise DamagedCheckpointError(f"{name}: {rel} is not a readable pickle ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ResumePlan:
    """
    What a run does with its checkpoint, decided once from `run_state.json` ([`plan_resume`]).

    Attributes:
        checkpoint: the checkpoint folder, or None (a fresh run).
        state: the run state saved in it (a fresh [`RunState`] without one).
        stages: the stages this run executes, in order.
    """

    checkpoint: str | None = None
    state: RunState = field(default_factory=RunState)
    stages: tuple[str, ...] = STAGES

    def resumes(self, stage: str) -> bool:
        """Whether `stage` continues from the checkpoint (its streams and noise; models too if [`restores_models`])."""
        return self.checkpoint is not None and self.state.stage == stage

    def restores_models(self, stage: str) -> bool:
        """Whether the checkpoint holds `stage`'s models and optimizers: it was taken inside that stage. A checkpoint
        at the end of stage 1 (stage 2, step 0) holds stage-1 models: stage 2 starts them afresh."""
        return self.resumes(stage) and self.state.stage_step > 0

    @property
    def path_truncation(self) -> int | None:
        """Stage 1 resumed: the path nodes recorded after this step are dropped and recorded again."""
        return self.state.stage_step if self.resumes("degradation") else None


def plan_resume(resume_from_checkpoint: str | None, output_dir: str, stage: str = "all") -> ResumePlan:
    """
    Reads the checkpoint once (`"latest"`: the newest of `output_dir`, or a fresh run if there is none) and returns
    the plan: which stages run and which of them resume. Refuses a mid-stage-1 checkpoint with `stage="backtracking"`.
    """
    stages = STAGES if stage == "all" else (stage,)
    if resume_from_checkpoint is None:
        return ResumePlan(stages=stages)
    if resume_from_checkpoint == "latest":
        checkpoint = newest_good_checkpoint(output_dir)
        if checkpoint is None:
            return ResumePlan(stages=stages)
    else:
        checkpoint = resume_from_checkpoint
    state_file = os.path.join(checkpoint, RUN_STATE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint of this script (no run_state.json)")
    state = RunState()
    with open(state_file, encoding="utf-8") as f:
        state.load_state_dict(json.load(f))
    if state.stage == "degradation" and stages == ("backtracking",):
        raise ValueError(
            f"{checkpoint} is a stage-1 checkpoint that did not finish the path; resume it with --stage "
            "degradation or --stage all, not --stage backtracking"
        )
    if state.stage == "backtracking":  # stage 1 is done
        stages = tuple(s for s in stages if s != "degradation")
    return ResumePlan(checkpoint, state, stages)


# ---------------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    accelerator,
    output_dir: str,
    state: RunState,
    rng: torch.Generator,
    streams: dict,
    total_limit: int | None = None,
) -> str:
    """
    `accelerator.save_state` (models, optimizers, schedulers, RNGs; sharded under FSDP) plus the run state, this
    rank's stream positions (`streams`: name -> object with `state_dict`, or None) and noise generator, into
    `checkpoint-<global step>.tmp`, then an atomic rename and rotation to `total_limit`. A failed write (full disk,
    quota) on any rank removes the partial folder on every rank and raises, naming the last good checkpoint.
    Returns the checkpoint folder.
    """
    acc = accelerator
    name = f"checkpoint-{state.global_step}"
    final = os.path.join(output_dir, "checkpoints", name)
    tmp = final + ".tmp"
    if acc.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    rank, error = acc.process_index, None
    try:
        acc.save_state(tmp)
        save_file({"noise_rng": rng.get_state()}, os.path.join(tmp, f"noise_rng_{rank}.safetensors"))
        positions = {k: (v.state_dict() if v is not None else None) for k, v in streams.items()}
        with open(os.path.join(tmp, f"data_{rank}.json"), "w") as f:
            json.dump(positions, f)
    except OSError as e:  # a full disk, a quota, a vanished mount
        error = e
    if bool(acc.gather(torch.tensor([float(error is not None)], device=acc.device)).max() > 0):
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        good = checkpoint_dirs(output_dir)
        raise RuntimeError(
            f"writing {name} failed ({error or 'on another rank'}); the run stops here. The last good checkpoint "
            f"is {good[-1] if good else 'none (nothing was saved yet)'}: free space and resume with "
            "--resume_from_checkpoint latest."
        ) from error
    if acc.is_main_process:
        with open(os.path.join(tmp, RUN_STATE), "w") as f:
            json.dump(state.state_dict(), f, indent=2)
    failpoint("checkpoint")  # this rank's part written, the checkpoint not complete
    acc.wait_for_everyone()
    digests = {}  # every rank flushes and hashes a share of the files: the manifest costs 1/world of the hashing
    for share in gather_object([hash_share(tmp, acc.process_index, acc.num_processes)]):
        digests.update(share)
    if acc.is_main_process:
        write_manifest(tmp, acc.num_processes, digests)  # last: a folder with a manifest holds every rank's part
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def restore_checkpoint(accelerator, plan: ResumePlan, stage: str, rng: torch.Generator, streams: dict) -> RunState:
    """
    Restores what `plan` says `stage` takes from its checkpoint: the accelerate state if [`ResumePlan.restores_models`],
    and always this rank's stream positions and noise generator. Returns the run state to continue from (a copy: the
    plan itself never changes as the run goes on).
    """
    checkpoint = plan.checkpoint
    if plan.restores_models(stage):
        check_pickles(checkpoint)
        accelerator.load_state(checkpoint)
    rank = accelerator.process_index
    with open(os.path.join(checkpoint, f"data_{rank}.json"), encoding="utf-8") as f:
        positions = json.load(f)
    for key, stream in streams.items():
        if stream is not None and positions.get(key):
            stream.load_state_dict(positions[key])
    rng.set_state(load_file(os.path.join(checkpoint, f"noise_rng_{rank}.safetensors"))["noise_rng"])
    logger.info(f"resumed from {checkpoint}: stage {plan.state.stage}, stage step {plan.state.stage_step}")
    state = RunState()
    state.load_state_dict(plan.state.state_dict())
    return state
