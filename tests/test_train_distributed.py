"""The training script on 2 processes on CPU (gloo): DDP, and FSDP2 through `tests/fsdp2_cpu_harness.py`; resume bit
for bit after kill -9 of one rank or all, resume from the Hub on an empty folder, a hung rank. Split from
`test_train.py` (whose tiny run and helpers it shares) so the two can run on separate test workers."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, SCRIPT, _cmd, _final_unet

from diffusers_disback import DisBackPipeline
from diffusers_disback.distill import DegradationPath


def _launch(args, harness=None, failpoint=None, script=SCRIPT):
    """A 2-process run on CPU (gloo): DDP of `script`, or FSDP2 through tests/fsdp2_cpu_harness.py (`harness`, which
    picks the script by the teacher's family); `failpoint` (DISBACK_FAILPOINT, docs/training.md "Faults") makes a
    rank fail at a named moment."""
    target = [os.path.join(ROOT, "tests", "fsdp2_cpu_harness.py")] if harness else [script]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           *target, *args]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DISBACK_FAILPOINT", None)
    if failpoint:
        env["DISBACK_FAILPOINT"] = failpoint
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _launch_fsdp2(args, failpoint=None):
    return _launch(args, harness=True, failpoint=failpoint)


HUB = ["--push_to_hub", "--hub_token", "hf_test", "--hub_push_every", "1"]


@pytest.fixture(scope="module")
def ddp_reference(teacher, tmp_path_factory, hub_server):
    """An uninterrupted 2-process DDP run, pushing every checkpoint to user/ddp-run."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _launch(_cmd(teacher, out, *HUB, "--hub_model_id", "user/ddp-run")[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_process_ddp_on_cpu(ddp_reference):
    ckpt = ddp_reference / "checkpoints" / "checkpoint-10"
    assert (ckpt / "data_0.json").is_file() and (ckpt / "data_1.json").is_file()  # each rank's stream position
    # the checkpoint was completed once both ranks' parts were on disk: the manifest lists them
    files = json.loads((ckpt / "checkpoint_manifest.json").read_text())["files"]
    assert {"random_states_1.pkl", "noise_rng_1.safetensors", "model_1.safetensors"} <= set(files)
    assert DisBackPipeline.from_pretrained(ddp_reference / "final").unet is not None


def _assert_same_run(got, expected):
    """The final UNet and every path node bit-identical to the uninterrupted run's."""
    a, b = _final_unet(expected), _final_unet(got)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert DegradationPath.load(got / "path").nodes == DegradationPath.load(expected / "path").nodes


def _kill_chain(launch, args, out, failpoints):
    """Launches once per failpoint (each launch fails there; the later ones resume), then once to the end."""
    for i, failpoint in enumerate(failpoints):
        proc = launch(args + (["--resume_from_checkpoint", "latest"] if i else []), failpoint=failpoint)
        assert proc.returncode != 0, f"{failpoint} did not fail the run"
        assert "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]
    proc = launch(args + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_resumes_bit_identically_after_kills_of_one_rank_or_all(teacher, ddp_reference, tmp_path):
    out = tmp_path / "killed"
    # failpoints count from each launch's start: stage 1 runs steps 1-4 (nodes at 2 and 4, checkpoints at 2 and 4)
    failpoints = [
        "path_node:1:0",  # rank 0 dies writing node 1 (before any checkpoint: stage 1 starts again)
        "path_node:2:1",  # rank 1 dies while rank 0 writes node 2, after checkpoint-2
        "checkpoint:1",  # every rank dies inside the checkpoint-4 write (the end of stage 1)
        "iteration:3:0",  # rank 0 dies in stage-2 iteration 1 (resumed from checkpoint-2: 2 stage-1 steps first)
        "checkpoint:2",  # every rank dies inside the checkpoint-8 write (resumed from checkpoint-4)
        "checkpoint:2:1",  # rank 1 dies inside the last checkpoint's (checkpoint-10) write (resumed from checkpoint-6)
    ]
    proc = _kill_chain(
        lambda a, failpoint=None: _launch(a, failpoint=failpoint), _cmd(teacher, out)[2:], out, failpoints
    )
    assert "resumed from" in proc.stderr
    _assert_same_run(out, ddp_reference)


def test_a_hung_rank_ends_the_job_within_the_timeout(teacher, tmp_path):
    out = tmp_path / "hung"
    # rank 1 freezes (SIGSTOP: a hung node) in stage-2 iteration 2; rank 0 waits in the gradient all-reduce
    proc = _launch(_cmd(teacher, out, "--ddp_timeout", "10")[2:], failpoint="iteration:6:1:stop")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rank 0: lost rank 1")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "no reply within --ddp_timeout" in lines[0] and "last complete checkpoint: checkpoint-4" in lines[0]
    assert "--resume_from_checkpoint latest" in lines[0]
    assert "Traceback" not in proc.stderr.split("rank 0: lost rank 1")[0]  # no stack of gloo traces before it


def test_ddp_resumes_from_the_hub_on_an_empty_output_folder(teacher, ddp_reference, hub_server, tmp_path):
    from huggingface_hub import list_repo_commits

    commits = {c.title: c.commit_id for c in list_repo_commits("user/ddp-run")}
    out = tmp_path / "fresh-machine"  # nothing on disk: the checkpoint at the end of stage 1 and the path come down
    args = _cmd(teacher, out, "--hub_model_id", "user/ddp-run", "--hub_token", "hf_test")[2:]
    proc = _launch(args + ["--resume_from_checkpoint", f"hub:{commits['Checkpoint checkpoint-4']}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified against its manifest" in proc.stderr
    _assert_same_run(out, ddp_reference)


@pytest.fixture(scope="module")
def fsdp2_reference(teacher, tmp_path_factory, hub_server):
    """An uninterrupted FSDP2 run with gradient checkpointing, pushing every checkpoint to user/fsdp2-run."""
    out = tmp_path_factory.mktemp("fsdp2")
    proc = _launch_fsdp2(_cmd(teacher, out, "--gradient_checkpointing", *HUB, "--hub_model_id", "user/fsdp2-run")[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_fsdp2_with_gradient_checkpointing_and_sharded_resume(teacher, fsdp2_reference, tmp_path):
    out = fsdp2_reference
    ckpt = out / "checkpoints" / "checkpoint-8"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_1").is_dir()  # sharded, optimizers kept
    files = json.loads((ckpt / "checkpoint_manifest.json").read_text())["files"]
    assert any(f.startswith("pytorch_model_fsdp_0/") and f.endswith(".distcp") for f in files)  # every shard listed
    assert len(DegradationPath.load(out / "path")) == 3  # nodes gathered to full state dicts

    # resume mid stage 2 from the sharded checkpoint: the same final weights
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-10", "final"))
    proc = _launch_fsdp2(_cmd(teacher, again, "--gradient_checkpointing", "--resume_from_checkpoint", "latest")[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(again, out)
    assert DisBackPipeline.from_pretrained(again / "final").unet.config.sample_size == 8


def test_fsdp2_resumes_bit_identically_after_kills_and_from_the_hub(teacher, fsdp2_reference, tmp_path):
    from huggingface_hub import list_repo_commits

    out = tmp_path / "killed"
    args = _cmd(teacher, out, "--gradient_checkpointing")[2:]
    failpoints = [
        "iteration:2",  # every rank dies in stage-1 step 2, before any checkpoint: stage 1 starts again
        "path_node:2:1",  # rank 1 dies while rank 0 writes node 2 (stage 1, after checkpoint-2)
        "checkpoint:2",  # every rank dies inside the checkpoint-6 write (stage 2; resumed from checkpoint-2)
    ]
    _kill_chain(_launch_fsdp2, args, out, failpoints)
    _assert_same_run(out, fsdp2_reference)

    # a fresh machine: the sharded checkpoint-6 and the path from the Hub, nothing local
    commits = {c.title: c.commit_id for c in list_repo_commits("user/fsdp2-run")}
    fresh = tmp_path / "fresh-machine"
    args = _cmd(teacher, fresh, "--gradient_checkpointing", "--hub_model_id", "user/fsdp2-run")[2:]
    proc = _launch_fsdp2(
        args + ["--hub_token", "hf_test", "--resume_from_checkpoint", "hub:" + commits["Checkpoint checkpoint-6"]]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(fresh, fsdp2_reference)
