"""kill -9 at random moments, resume, and check the result is bit-identical (docs/training.md, "Faults").

For each mode (a single process, 2-process DDP, the FSDP2 CPU harness) the script trains the tiny test run once
uninterrupted, then again while killing it at random moments: every rank at once (a lost node) or one rank (the
launcher then stops the others), some kills timed to land inside a checkpoint or path-node write. After each kill the
run resumes with `--resume_from_checkpoint latest`; when a run finishes, its final UNet and every path node are
compared with the uninterrupted run's, bit for bit, and a new run starts. Prints the tally and writes it to
benchmarks/results/kill_tally.md.

    python benchmarks/kill_tally.py --modes single ddp fsdp2 --kills 10
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
HARNESS = os.path.join(ROOT, "tests", "fsdp2_cpu_harness.py")


def _tiny_run_args() -> list[str]:
    """The tiny run of tests/test_train.py (its `TINY` flags): the run the fixed-moment kill tests use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("test_train", os.path.join(ROOT, "tests", "test_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TINY)


TINY = _tiny_run_args()


def command(mode: str, teacher: str, out: str, resume: bool) -> list[str]:
    args = ["--pretrained_teacher_model", teacher, "--output_dir", out, *TINY]
    args += ["--resume_from_checkpoint", "latest"] if resume else []
    if mode == "single":
        return [sys.executable, SCRIPT, *args]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    return [*launch, HARNESS if mode == "fsdp2" else SCRIPT, *args]


def environment() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    env.pop("DISBACK_FAILPOINT", None)
    return env


def ranks_of(launcher: int) -> dict[int, int]:
    """{rank: pid} of the training processes below `launcher` (itself, rank 0, in a single process)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == launcher and b"RANK" in env and b"LOCAL_RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found or {0: launcher}


def writing(out: str) -> str | None:
    """What is being written right now: a checkpoint folder still named .tmp, or a path node's temporary file."""
    ckpts = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpts) and any(d.endswith(".tmp") for d in os.listdir(ckpts)):
        return "checkpoint"
    path = os.path.join(out, "path")
    if os.path.isdir(path) and any(f.startswith(".node_") for f in os.listdir(path)):
        return "path node"
    return None


def final_state(out: str):
    from safetensors.torch import load_file

    from diffusers_disback.distill import DegradationPath

    unet = load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))
    return unet, DegradationPath.load(os.path.join(out, "path")).nodes


def same(a, b) -> bool:
    import torch

    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def run_mode(mode: str, teacher: str, kills: int, work: str, rng: random.Random, log) -> dict:
    ref_dir = os.path.join(work, f"{mode}-reference")
    start = time.perf_counter()
    subprocess.run(command(mode, teacher, ref_dir, False), env=environment(), check=True, capture_output=True)
    wall = time.perf_counter() - start
    reference = final_state(ref_dir)
    tally = {"mode": mode, "kills": 0, "one_rank": 0, "in_checkpoint_write": 0, "in_path_write": 0, "runs": 0,
             "identical": 0, "reference_seconds": round(wall, 1)}  # fmt: skip
    while tally["kills"] < kills:
        out = os.path.join(work, f"{mode}-run{tally['runs']}")
        resume = False
        while True:
            proc = subprocess.Popen(
                command(mode, teacher, out, resume), env=environment(), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            resume = True
            aim_at_write = tally["kills"] % 3 == 2  # every third kill waits for a write to begin
            deadline = time.perf_counter() + rng.uniform(2.0, wall)
            what = None
            while proc.poll() is None:
                what = writing(out)
                if (aim_at_write and what) or (not aim_at_write and time.perf_counter() > deadline):
                    if aim_at_write:
                        time.sleep(rng.uniform(0, 0.05))
                    break
                time.sleep(0.005 if aim_at_write else 0.05)
            if proc.poll() is not None:  # the run finished before its kill came
                break
            ranks = ranks_of(proc.pid)
            victims = list(ranks.values())
            one = mode != "single" and rng.random() < 0.5
            if one:
                victims = [ranks[rng.choice(sorted(ranks))]]
            what = writing(out) or what
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            tally["kills"] += 1
            tally["one_rank"] += one
            tally["in_checkpoint_write"] += what == "checkpoint"
            tally["in_path_write"] += what == "path node"
            log(f"{mode}: kill {tally['kills']} ({'one rank' if one else 'every rank'}, during {what or 'training'})")
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}: a resumed run failed (rc {proc.returncode}); see {out}")
        tally["runs"] += 1
        ok = same(final_state(out), reference)
        tally["identical"] += ok
        log(f"{mode}: run {tally['runs']} finished, {'bit-identical' if ok else 'DIFFERENT'} to the reference")
        if ok:
            shutil.rmtree(out, ignore_errors=True)
    return tally


def write_results(tallies: list[dict], modes, kills: int, seed: int, results: str) -> str:
    """The tally as the `summary` section of `results` (and docs/benchmarks.md, "Faults"); returns the table."""
    from common import write_section

    head = "| mode | kills | of one rank | in a checkpoint write | in a path-node write | runs | bit-identical runs |"
    rows = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in tallies:
        rows.append(
            f"| {t['mode']} | {t['kills']} | {t['one_rank']} | {t['in_checkpoint_write']} | {t['in_path_write']} | "
            f"{t['runs']} | {t['identical']} of {t['runs']} |"
        )
    table = "\n".join(rows)
    seconds = ", ".join(f"{t['mode']} {t['reference_seconds']} s" for t in tallies)
    text = (
        f"`python benchmarks/kill_tally.py --modes {' '.join(modes)} --kills {kills} --seed {seed}` on the 2-core CPU "
        "box: each run is killed (SIGKILL) and resumed with `--resume_from_checkpoint latest` until it finishes, then "
        "its final UNet and every path node are compared with the uninterrupted run's, bit for bit. A kill counts as "
        "in a write when a `checkpoint-N.tmp` folder or a node's temporary file existed at that moment. Uninterrupted "
        f"tiny runs: {seconds}.\n\n" + table
    )
    write_section("summary", text, results, "# kill -9 at random moments, and resume")
    print(table)
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["single", "ddp", "fsdp2"], choices=["single", "ddp", "fsdp2"])
    p.add_argument("--kills", type=int, default=10, help="kills per mode (at least)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=None)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "kill_tally.md"))
    args = p.parse_args(argv)
    from diffusers_disback.testing import save_tiny_teacher

    work = args.work_dir or tempfile.mkdtemp(prefix="disback-kills-")
    teacher = save_tiny_teacher(os.path.join(work, "tiny-sdxl"))
    rng = random.Random(args.seed)
    tallies = [run_mode(m, teacher, args.kills, work, rng, lambda s: print(s, flush=True)) for m in args.modes]
    write_results(tallies, args.modes, args.kills, args.seed, args.results)
    return tallies


if __name__ == "__main__":
    main()
