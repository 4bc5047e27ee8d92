#!/usr/bin/env python
"""What opening a degradation path costs at the start of stage 2, on SDXL-sized node files.

    python benchmarks/path_startup.py --nodes 2 --dir /tmp/sdxl-path   # ~21 GB of disk for two fp32 SDXL nodes

Writes a full-weight path of `--nodes` nodes, each the state dict of a UNet of SDXL's configuration in fp32 (2.57 B
parameters, 10.3 GB per file; random weights), then runs stage 2's start twice in one process:

- before: `DegradationPath.load` (every node hashed) then the fake score's start at the last node, which hashed that
  node again (what the training script did on every process);
- after: the same calls with each node hashed once per process (`DegradationPath` remembers what it checked), and
  once per machine under multi-GPU (`training.load_path_verified_once`: the local main process hashes, the others
  trust it).

Prints the files hashed, bytes hashed and the seconds spent hashing (reading included) of each; the page cache is
dropped between them where the machine allows it (root on Linux), else the second pass may read from memory (said
in the output).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time

import torch

from diffusers_disback.distill import DegradationPath, degradation
from diffusers_disback.testing import SDXL_UNET_CONFIG


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def counted_hashes():
    """Wraps the path's sha256 so a run can count the files, bytes and seconds it hashed."""
    seen = []  # (bytes, seconds) per file hashed
    real = degradation._sha256

    def sha256(file):
        start = time.perf_counter()
        digest = real(file)
        seen.append((os.path.getsize(file), time.perf_counter() - start))
        return digest

    degradation._sha256 = sha256
    return seen, lambda: setattr(degradation, "_sha256", real)


def stage2_start(directory: str, model, old_rule: bool) -> None:
    path = DegradationPath.load(directory)  # verify every node
    if old_rule:
        path._verified.clear()  # the old code hashed the node it read again
    path.node_state_dict(len(path) - 1)  # the fake score starts at the most degraded node


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--dir", default="/tmp/disback-sdxl-path")
    parser.add_argument("--keep", action="store_true", help="keep the path folder (a later run reuses it)")
    args = parser.parse_args()

    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    params = sum(v.numel() for v in meta.state_dict().values())
    try:
        path = DegradationPath.load(args.dir, verify=False)
        if len(path) != args.nodes + 1:
            raise ValueError("another number of nodes")
        print(f"reusing {args.dir}")
    except ValueError:
        shutil.rmtree(args.dir, ignore_errors=True)
        path = DegradationPath.create(args.dir, meta, kind="full")
        g = torch.Generator().manual_seed(0)
        state = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in meta.state_dict().items()}
        for step in range(1, args.nodes + 1):
            path.add_node(state, step)
        del state
    size = path.num_bytes
    print(f"{args.nodes} nodes of {params / 1e9:.3f} B fp32 parameters, {size / 1e9:.1f} GB")

    rows = []
    for label, old in (("before: every node, then the last again", True), ("after: each node once", False)):
        cold = drop_caches()
        seen, restore = counted_hashes()
        stage2_start(args.dir, meta, old)
        restore()
        rows.append((label, len(seen), sum(b for b, _ in seen), sum(t for _, t in seen), cold))
    print("| stage-2 start (one process) | files hashed | GB hashed | seconds hashing | page cache dropped |")
    print("| --- | ---: | ---: | ---: | --- |")
    for label, files, nbytes, seconds, cold in rows:
        print(f"| {label} | {files} | {nbytes / 1e9:.1f} | {seconds:.1f} | {'yes' if cold else 'no'} |")
    per_file = rows[1][3] / max(rows[1][1], 1)
    print(f"sha256 + read: {size / args.nodes / 1e9 / per_file:.2f} GB/s per file; ten SDXL nodes on 8 processes of "
          f"one machine: before {8 * 11} file hashes, after {10} (load_path_verified_once)")  # fmt: skip
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
