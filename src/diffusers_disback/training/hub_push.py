"""Hub pushes in the background: training never waits on the network, and a failed push never stops it."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading

logger = logging.getLogger(__name__)


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
        from ..hub import HubPushError, push_folder

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
