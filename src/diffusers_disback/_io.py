"""Atomic writes: a file appears whole under its name or not at all (a crash or a full disk leaves no half file).

The package's one writer. The remote code (`pipeline_utils_disback.py`, which travels to the Hub without the package)
does not use it: it only rewrites the two JSON files diffusers' `save_pretrained` has just written, and does so in
place as diffusers does. It also holds the training script's fault-injection points ([`failpoint`]).
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


# ------------------------------------------------------------------------------------------------- fault injection

FAILPOINT_ENV = "DISBACK_FAILPOINT"
_failpoint_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """
    A named moment where tests and `benchmarks/kill_tally.py` make this process fail (docs/training.md, "Faults").

    `DISBACK_FAILPOINT="NAME:N[:RANKS[:ACTION]]"` makes the `N`-th time this process reaches `NAME` (counted from 1)
    kill it with SIGKILL (`ACTION` "kill", the default) or freeze it with SIGSTOP ("stop": a hung node), on the ranks
    listed in `RANKS` ("0", "0+1"; empty or "all": every rank). The points: `iteration` (an update computed, the step
    not yet counted), `checkpoint` (this rank's part of a checkpoint written, the checkpoint not yet complete) and
    `path_node` (a node's weights written, the path's manifest not yet updated). Unset, it costs one dict lookup.
    """
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    where, count, ranks, action = (spec.split(":") + ["", "", "", ""])[:4]
    if where != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    rank = os.environ.get("RANK", "0")
    if _failpoint_hits[name] != int(count) or (ranks not in ("", "all") and rank not in ranks.split("+")):
        return
    import signal

    os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
