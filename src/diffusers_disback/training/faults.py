"""What a multi-process run does when something fails (docs/training.md, "Faults").

- A rank that dies or hangs never leaves a hung job: collectives time out after `--ddp_timeout` seconds, and the
  survivors end with one line naming the lost rank(s) (from a heartbeat each rank keeps in the process group's store)
  and how to resume ([`RankWatch`]). A rank stopped by its launcher (SIGTERM, sent when another rank died) says so in
  one line too.
- `--resume_from_checkpoint hub[:REVISION]` downloads the newest complete checkpoint the run pushed, and the path,
  into an empty output folder, verified against the checkpoint's manifest ([`download_hub_checkpoint`]).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time

import torch

from .state import DamagedCheckpointError, checkpoint_dirs, verify_checkpoint

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
_HEARTBEAT_KEY = "disback/heartbeat/{}"


def resume_hint(output_dir: str) -> str:
    """The last complete checkpoint and the command that resumes from it, in words."""
    found = checkpoint_dirs(output_dir)
    last = os.path.basename(found[-1]) if found else "none yet (the run restarts from the beginning)"
    return f"last complete checkpoint: {last}; rerun the same command with --resume_from_checkpoint latest"


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank is gone (closed connection, timeout)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("connection closed by peer", "connection reset", "timed out", "timeout", "gloo", "nccl")
    )


class RankWatch:
    """
    Every rank's sign of life in a multi-process run: a daemon thread bumps `disback/heartbeat/<rank>` in the process
    group's store every [`HEARTBEAT_SECONDS`]; a survivor whose collective failed asks which counters stopped. Also
    turns the launcher's SIGTERM into one line. A no-op in a single process.
    """

    def __init__(self, accelerator, output_dir: str):
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.output_dir = output_dir
        self.store = None
        if self.world < 2:
            return
        from torch.distributed.distributed_c10d import _get_default_store

        try:
            self.store = _get_default_store()
        except (RuntimeError, ValueError):  # no store to beat into: the lost rank cannot be named, nothing else
            return
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="disback-heartbeat", daemon=True).start()
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _beat(self) -> None:
        key = _HEARTBEAT_KEY.format(self.rank)
        while not self._stop.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store went away with the job: nothing left to tell
                return
            self._stop.wait(HEARTBEAT_SECONDS)

    def _counts(self) -> dict[int, int]:
        counts = {}
        for r in range(self.world):
            if r != self.rank:
                counts[r] = self.store.add(_HEARTBEAT_KEY.format(r), 0)
        return counts

    def lost_ranks(self) -> list[int] | None:
        """The ranks whose heartbeat stopped (watched for three beats); None if the store cannot be read."""
        if self.store is None:
            return None
        try:
            before = self._counts()
            time.sleep(3 * HEARTBEAT_SECONDS)
            after = self._counts()
        except Exception:  # noqa: BLE001
            return None
        return [r for r in before if after[r] == before[r]]

    def report(self, error: BaseException, where: str) -> str:
        """The one line a survivor ends with when a collective failed."""
        lost = self.lost_ranks()
        who = (
            f"lost rank {', '.join(map(str, lost))}"
            if lost
            else "lost contact with another rank"
            if lost is None
            else "a collective failed although every rank is alive"
        )
        kind = (
            "no reply within --ddp_timeout"
            if "timed out" in str(error).lower() or "timeout" in str(error).lower()
            else "its connection closed"
        )
        return f"rank {self.rank}: {who} ({kind}) {where}; {resume_hint(self.output_dir)}"

    def _on_sigterm(self, signum, frame) -> None:
        sys.stderr.write(
            f"rank {self.rank}: stopped by the launcher (SIGTERM): another rank failed or the job was cancelled (the "
            f"launcher's summary names it); {resume_hint(self.output_dir)}\n"
        )
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)

    def close(self) -> None:
        if self.store is not None:
            self._stop.set()


# ------------------------------------------------------------------------------------------------ resume from Hub


def parse_hub_resume(value: str | None) -> str | None:
    """`hub` -> "main", `hub:REV` -> "REV"; None for anything else (a folder or `latest`)."""
    if value is None or not (value == "hub" or value.startswith("hub:")):
        return None
    return value.split(":", 1)[1] if ":" in value else "main"


def hub_checkpoints(repo_id: str, revision: str, token: str | None = None) -> tuple[str, list[str]]:
    """The commit `revision` points to and the checkpoint names pushed to `repo_id` there, newest first (only those
    with a manifest: a push is one commit, but a checkpoint of an older version has none)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    sha = api.repo_info(repo_id, revision=revision).sha
    files = api.list_repo_files(repo_id, revision=sha)
    names = {
        f.split("/")[1] for f in files if f.startswith("checkpoints/") and f.endswith("/checkpoint_manifest.json")
    }
    names = [n for n in names if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()]
    return sha, sorted(names, key=lambda n: int(n.split("-")[1]), reverse=True)


def download_hub_checkpoint(
    repo_id: str, revision: str, output_dir: str, path_dir: str, token: str | None = None
) -> str:
    """
    Downloads the newest checkpoint pushed to `repo_id` at `revision` that verifies against its manifest into
    `output_dir/checkpoints/`, with the pushed path (`path/`) into `path_dir`; a damaged one is named in one line and
    the next older tried. Returns the local checkpoint folder.

    Raises:
        FileNotFoundError: the repo holds no checkpoint (pushes need `--hub_push_every N`).
        DamagedCheckpointError: every pushed checkpoint failed verification.
    """
    from huggingface_hub import snapshot_download

    sha, names = hub_checkpoints(repo_id, revision, token)
    if not names:
        raise FileNotFoundError(
            f"{repo_id}@{revision} holds no pushed checkpoint under checkpoints/ (the script pushes every N-th "
            "checkpoint with --push_to_hub --hub_push_every N); resume from a local folder or start afresh"
        )
    staging = os.path.join(output_dir, ".hub-resume")
    damaged = []
    for name in names:
        shutil.rmtree(staging, ignore_errors=True)
        logger.info(f"downloading {name} of {repo_id}@{sha[:12]} and its path")
        snapshot_download(
            repo_id, revision=sha, local_dir=staging, token=token, allow_patterns=[f"checkpoints/{name}/*", "path/*"]
        )
        folder = os.path.join(staging, "checkpoints", name)
        try:
            verify_checkpoint(folder)
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            logger.warning(f"skipping a damaged checkpoint on the Hub: {e}")
            continue
        target = os.path.join(output_dir, "checkpoints", name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(folder, target)
        pushed_path = os.path.join(staging, "path")
        if os.path.isdir(pushed_path) and not os.path.exists(os.path.join(path_dir, "path_manifest.json")):
            shutil.rmtree(path_dir, ignore_errors=True)
            os.makedirs(os.path.dirname(os.path.abspath(path_dir)), exist_ok=True)
            os.replace(pushed_path, path_dir)
        shutil.rmtree(staging, ignore_errors=True)
        logger.info(f"resuming from {name} of {repo_id}@{sha[:12]} (verified against its manifest)")
        return target
    shutil.rmtree(staging, ignore_errors=True)
    raise DamagedCheckpointError(f"every checkpoint pushed to {repo_id}@{revision} is damaged ({'; '.join(damaged)})")
