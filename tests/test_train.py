"""The training script end to end at tiny size: both stages, resume after kill -9, Hub pushes, bad input (2-process
runs: `test_train_distributed.py`)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_disback import DisBackPipeline
from diffusers_disback.distill import DegradationPath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
PROMPTS = os.path.join(ROOT, "examples", "train_disback", "data", "demo_prompts.txt")
# r = 2 with K2 = 2 iterations and a 4-iteration warm-up tell iterations from generator updates; t_c = 499 is not the
# scheduler's default, so the saved pipeline must carry it
TINY = [
    "--resolution", "64", "--degradation_steps", "4", "--path_interval", "2", "--max_train_steps", "6",
    "--fake_score_update_ratio", "2", "--backtrack_interval", "2", "--checkpointing_steps", "2",
    "--validation_steps", "3", "--learning_rate", "1e-4", "--lr_warmup_steps", "4", "--conditioning_timestep", "499",
    "--train_batch_size", "2", "--train_data_files", PROMPTS, "--shuffle_buffer", "4",
]  # fmt: skip


def _cmd(teacher, out, *extra):
    return [sys.executable, SCRIPT, "--pretrained_teacher_model", teacher, "--output_dir", str(out), *TINY, *extra]


def _run(cmd, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kwargs)


def _final_unet(out):
    return load_file(os.path.join(out, "final", "unet", "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(_cmd(teacher, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _scalars(out, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(r, f) for r, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events")]
    acc = EventAccumulator(events[0])
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_both_stages_end_to_end(uninterrupted):
    out, proc = uninterrupted
    path = DegradationPath.load(out / "path")
    assert [n.step for n in path.nodes] == [0, 2, 4]
    a, b = path.node_state_dict(1), path.node_state_dict(2)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the path moved
    state = json.loads((out / "checkpoints" / "checkpoint-10" / "run_state.json").read_text())
    assert state["stage_step"] == 6 and state["backtracking"]["target"] == 2  # walked back to the teacher
    pipe = DisBackPipeline.from_pretrained(out / "final")
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # the saved pipeline samples at the timestep the generator was trained at, not the scheduler's default 399
    assert pipe.scheduler.config.conditioning_timestep == 499
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [499]
    card = (out / "final" / "README.md").read_text()
    assert "| path_nodes | 2 |" in card and "| generator_updates | 3 |" in card
    # stage 1 profiled its path (docs/method.md, "The path profile"); the card shows where the nodes lay
    assert [n["step"] for n in path.profile["nodes"]] == [0, 2, 4] and path.nodes[1].distance > 0
    assert "## Degradation path" in card and "![path profile](path_profile.png)" in card and "| P2 | 4 |" in card
    assert (out / "final" / "path_profile.png").stat().st_size > 5_000
    # the saved settings use the flags' names: one name per setting
    from diffusers_disback.distill import DisBackConfig

    saved = DisBackConfig.from_dict(json.loads((out / "final" / "disback_config.json").read_text()))
    assert (saved.backtrack_interval, saved.fake_score_update_ratio, saved.max_train_steps) == (2, 2, 6)
    assert "| backtrack_interval | 2 |" in card
    assert (out / "validation" / "step-00000007.png").is_file()  # stage-2 step 3 = global step 7
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(out / "logs") for f in files)
    # K2 and the generator's warm-up count stage-2 iterations, as the reference does, and the generator is updated
    # first, on iterations 0, 2, 4 (global steps 5, 7, 9; docs/method.md, "The update order"): the target is P1 for
    # iterations 0-1 and the teacher (P0) from iteration 2 on; the LR after 0, 2, 4 warm-up iterations of 4 is
    # 0, 1/2, 1 of 1e-4 (the reference's first generator update also runs at the warm-up's LR 0)
    assert _scalars(out, "backtracking/target_node") == [(5, 1.0), (7, 0.0), (9, 0.0)]
    lrs = _scalars(out, "backtracking/lr")
    assert [s for s, _ in lrs] == [5, 7, 9] and [v for _, v in lrs] == pytest.approx([0.0, 0.5e-4, 1e-4])
    assert len(_scalars(out, "backtracking/fake_loss")) == 6  # the fake score: every iteration
    # the blank line in the prompt file was counted and skipped, not trained on
    assert json.loads((out / "checkpoints" / "checkpoint-10" / "data_0.json").read_text())["prompts"]["skipped"] >= 1


def _kill_when(cmd, marker: str, timeout: float = 300):
    """Starts the run and kill -9s it once `marker` (a path) exists."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    start = time.time()
    while not os.path.exists(marker):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {marker} appeared")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{marker} did not appear in {timeout}s")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_equals_uninterrupted(teacher, uninterrupted, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(teacher, out)
    _kill_when(cmd, str(out / "checkpoints" / "checkpoint-2"))  # killed mid stage 1 ...
    _kill_when(cmd + ["--resume_from_checkpoint", "latest"], str(out / "checkpoints" / "checkpoint-6"))  # ... stage 2
    proc = _run(cmd + ["--resume_from_checkpoint", "latest"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    expected, got = _final_unet(uninterrupted[0]), _final_unet(out)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert DegradationPath.load(out / "path").nodes == DegradationPath.load(uninterrupted[0] / "path").nodes


def _copy_until(src, dst, last: int):
    """A copy of a finished run without its final pipeline and its checkpoints after `last`."""
    later = [d.name for d in (src / "checkpoints").iterdir() if int(d.name.split("-")[1]) > last]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", *later))
    return dst


def test_a_damaged_newest_checkpoint_is_named_and_skipped(teacher, uninterrupted, tmp_path):
    out = _copy_until(uninterrupted[0], tmp_path / "damaged", 8)
    model = out / "checkpoints" / "checkpoint-8" / "model_1.safetensors"
    model.write_bytes(model.read_bytes()[:1000])  # cut short, as by a full disk or a copy that died
    proc = _run(_cmd(teacher, out, "--resume_from_checkpoint", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stderr.splitlines() if "skipping a damaged checkpoint" in line]
    assert len(skipped) == 1 and "checkpoint-8: model_1.safetensors is 1000 bytes" in skipped[0]
    assert "resumed from" in proc.stderr and "checkpoint-6" in proc.stderr.split("resumed from")[1].splitlines()[0]
    expected, got = _final_unet(uninterrupted[0]), _final_unet(out)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)

    # with nothing good left, the run stops with what to do, and nothing is deleted
    only = _copy_until(uninterrupted[0], tmp_path / "only-damaged", 2)
    noise = only / "checkpoints" / "checkpoint-2" / "noise_rng_0.safetensors"
    noise.write_bytes(noise.read_bytes()[:-1] + b"x")  # same size, other bytes: only the sha256 tells
    proc = _run(_cmd(teacher, only, "--resume_from_checkpoint", "latest"))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "every checkpoint in" in last and "noise_rng_0.safetensors differs from what was written" in last
    assert "--resume_from_checkpoint hub" in last and noise.is_file()


def test_a_pickle_that_would_run_code_is_refused(teacher, uninterrupted, tmp_path):
    import pickle

    from diffusers_disback.training.state import write_manifest

    out = _copy_until(uninterrupted[0], tmp_path / "planted", 6)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = out / "checkpoints" / "checkpoint-6"
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps({"python": Payload()}))
    write_manifest(str(ckpt), 1)  # whoever planted it also rewrote the manifest: the check must not rely on it
    proc = _run(_cmd(teacher, out, "--resume_from_checkpoint", "latest"))
    assert proc.returncode != 0 and not marker.exists()
    assert "random_states_0.pkl holds a pickle that would call posix.system" in proc.stderr


def test_hub_pushes_and_a_failed_push_does_not_stop_training(teacher, uninterrupted, tmp_path, hub_server):
    from huggingface_hub import list_repo_files

    out = tmp_path / "hub"
    # the first pushes (the path so far and checkpoint-4, the 2nd checkpoint) are refused for good; the others must
    # still happen
    hub_server.fail_next("commit", times=2, status=403)
    proc = _run(
        _cmd(teacher, out, "--push_to_hub", "--hub_model_id", "user/disback-run", "--hub_token", "hf_test")
        + ["--hub_push_every", "2", "--checkpoints_total_limit", "1", "--hub_space_id", "user/disback-run-app"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "push to user/disback-run failed, training goes on" in proc.stderr
    files = set(list_repo_files("user/disback-run"))
    assert {"model_index.json", "README.md", "pipeline.py", "unet/diffusion_pytorch_model.safetensors"} <= files
    assert "path/path_manifest.json" in files
    # every 2nd checkpoint went up from a snapshot, although rotation deleted it locally meanwhile
    pushed = {f.split("/")[1] for f in files if f.startswith("checkpoints/")}
    assert "checkpoint-8" in pushed and "checkpoint-4" not in pushed and "checkpoint-2" not in pushed
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["checkpoint-10"]
    assert DegradationPath.load(out / "path")  # the local path is intact
    assert "hf_test" not in proc.stderr and "hf_test" not in (out / "final" / "README.md").read_text()
    pipe = DisBackPipeline.from_pretrained("user/disback-run")
    assert pipe.unet.config.sample_size == 8
    space = set(list_repo_files("user/disback-run-app", repo_type="space"))  # the app of the pushed model
    assert {"app.py", "requirements.txt", "README.md"} <= space

    # a fresh machine resumes from the newest pushed checkpoint (checkpoint-8) and the pushed path
    fresh = tmp_path / "fresh-machine"
    proc = _run(_cmd(teacher, fresh, "--hub_model_id", "user/disback-run", "--resume_from_checkpoint", "hub"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from checkpoint-8 of user/disback-run@" in proc.stderr
    assert sorted(d.name for d in (fresh / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-8"]
    expected, got = _final_unet(uninterrupted[0]), _final_unet(fresh)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)
    assert DegradationPath.load(fresh / "path").nodes == DegradationPath.load(uninterrupted[0] / "path").nodes


def adapter_dtypes(state: dict) -> dict:
    """The dtypes of a shared-base checkpoint's weights, by owner: "base" or the adapter's name."""
    dtypes = {}
    for k, v in state.items():
        dtypes.setdefault(k.split(".lora_")[1].split(".")[1] if "lora_" in k else "base", set()).add(v.dtype)
    return dtypes


def test_one_gpu_lora_mode(teacher, tmp_path):
    out = tmp_path / "lora"
    args = ["--lora_rank", "4", "--path_node_type", "lora", "--path_lora_rank", "4", "--mixed_precision", "bf16"]
    proc = _run(_cmd(teacher, out, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # under bf16 the shared frozen base and the path nodes are bf16, the trained adapters fp32 master weights (peft
    # makes them bf16 by default)
    shared = load_file(out / "checkpoints" / "checkpoint-10" / "model.safetensors")
    assert adapter_dtypes(shared) == {"base": {torch.bfloat16}, "node_1": {torch.bfloat16}, "node_2": {torch.bfloat16},
                      "generator": {torch.float32}, "fake_score": {torch.float32}}  # fmt: skip
    path = DegradationPath.load(out / "path")
    assert path.kind == "lora" and all(n.num_bytes < 400_000 for n in path.nodes[1:])  # a full node: 8 MB
    final = _final_unet(out)
    assert not any("lora" in k for k in final)  # the generator's adapter is merged into plain weights
    base = load_file(os.path.join(teacher, "unet", "diffusion_pytorch_model.safetensors"))
    moved = [k for k in final if not torch.equal(final[k], base[k].to(final[k].dtype))]
    # only the adapted projections, merged into the fp32 weights (not the bf16 training copy of the base)
    assert moved and all(k.endswith(".weight") and ("to_" in k) for k in moved)
    assert "| lora_rank | 4 |" in (out / "final" / "README.md").read_text()
    # the trained adapter itself, in diffusers' LoRA format: the teacher + it is the final generator
    from diffusers_disback.lora_export import export_lora

    exported = export_lora(out / "final", tmp_path / "lora", base_model=teacher, check_prompts=["a cat"])
    assert exported.source == "adapter" and set(exported.ranks) == {4}
    assert exported.one_step_difference["max_abs"] < 1e-5


SHARED = ["--lora_rank", "4", "--path_node_type", "lora", "--path_lora_rank", "4", "--gradient_checkpointing"]


@pytest.fixture(scope="module")
def shared_and_separate(teacher, tmp_path_factory):
    from diffusers_disback.testing import get_tiny_taesd

    taesd = tmp_path_factory.mktemp("taesd")
    get_tiny_taesd().save_pretrained(taesd)
    runs = {}
    for mode in ("shared", "separate"):
        out = tmp_path_factory.mktemp(f"lora-{mode}")
        extra = ["--validation_vae", str(taesd)] if mode == "shared" else []  # decoding never touches training
        proc = _run(_cmd(teacher, out, *SHARED, "--lora_base", mode, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = out
    return runs


def test_shared_base_lora_mode_equals_separate_networks(shared_and_separate):
    """One frozen base with adapters computes what separate networks compute: stage 1 bit for bit (the degrading
    adapter and the frozen generator are the same passes), stage 2 to float32 rounding, because the fake score that
    starts from the last node is `base + node + fake` there and `merge(base, node) + fake` here (measured: losses
    within 6e-7 relative, final weights within 1e-8; a missed adapter or a wrong switch moves them by > 1e-3)."""
    shared, separate = shared_and_separate["shared"], shared_and_separate["separate"]
    for tag in ("degradation/loss", "degradation/distance_to_teacher"):
        assert _scalars(shared, tag) == _scalars(separate, tag)
    for tag in ("backtracking/generator_loss", "backtracking/fake_loss", "backtracking/dm_distance"):
        got, expected = _scalars(shared, tag), _scalars(separate, tag)
        assert [s for s, _ in got] == [s for s, _ in expected] and len(got) >= 3
        for (_, a), (_, b) in zip(got, expected):
            assert abs(a - b) <= 1e-5 * abs(b) + 1e-8, (tag, a, b)
    a, b = _final_unet(shared), _final_unet(separate)
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-6
    # one model in the shared checkpoint (the teacher with every adapter), two in the separate one
    assert sorted(f.name for f in (shared / "checkpoints" / "checkpoint-10").glob("model*")) == ["model.safetensors"]
    assert len(list((separate / "checkpoints" / "checkpoint-10").glob("model*"))) == 2
    state = load_file(shared / "checkpoints" / "checkpoint-10" / "model.safetensors")
    adapters = {k.split(".lora_")[1].split(".")[1] for k in state if "lora_" in k}
    assert adapters == {"generator", "fake_score", "node_1", "node_2"}  # stage 1's adapter was removed
    # --validation_vae (a tiny TAESD-XL here) decoded the shared run's validation images, the teacher's VAE the other's
    from PIL import Image

    grids = [np.asarray(Image.open(out / "validation" / "step-00000007.png")) for out in (shared, separate)]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0].astype(int) - grids[1]).mean() > 5


def test_shared_base_lora_mode_resumes_mid_stage_2(teacher, shared_and_separate, tmp_path):
    out = shared_and_separate["shared"]
    again = tmp_path / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("checkpoint-10", "final"))
    proc = _run(_cmd(teacher, again, *SHARED, "--resume_from_checkpoint", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _final_unet(out), _final_unet(again)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


def test_shared_base_refuses_what_it_cannot_run(teacher, tmp_path):
    proc = _run(_cmd(teacher, tmp_path / "full-nodes", "--lora_rank", "4"))
    assert proc.returncode == 2 and "--path_node_type lora" in proc.stderr
    from test_train_distributed import _launch_fsdp2

    proc = _launch_fsdp2(_cmd(teacher, tmp_path / "fsdp", *SHARED)[2:])
    assert proc.returncode != 0 and "--lora_base shared does not run under FSDP" in proc.stderr


def test_gan_term_with_real_images(teacher, tmp_path):
    from PIL import Image

    real = tmp_path / "real"
    real.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        Image.fromarray(torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()).save(
            real / f"{i}.png"
        )
    (real / "broken.png").write_bytes(b"not a png")
    captions = [{"file_name": f"{i}.png", "text": f"a photo of noise {i}"} for i in range(4)]
    (real / "metadata.jsonl").write_text("\n".join(json.dumps(c) for c in captions + [{"file_name": "broken.png"}]))
    out = tmp_path / "gan"
    proc = _run(_cmd(teacher, out, "--gan_loss_weight", "5e-3", "--degradation_gan", "--real_data_dir", str(real)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stage 1 trained a head with the degrading score, as the reference does; path nodes hold the score alone
    stage1 = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert any(k.startswith("head.") for k in stage1)
    assert DegradationPath.load(out / "path").node_state_dict(1).keys() == _final_unet(out).keys()
    assert "unreadable image skipped" in proc.stderr
    data = json.loads((out / "checkpoints" / "checkpoint-10" / "data_0.json").read_text())
    assert data["real"]["skipped"] >= 1  # the real-image stream's position is checkpointed too
    model = load_file(out / "checkpoints" / "checkpoint-10" / "model_1.safetensors")
    assert any(k.startswith("head.") for k in model)  # the discriminator head trains with the fake score
    proc = _run(_cmd(teacher, tmp_path / "bad", "--gan_loss_weight", "5e-3"))
    assert proc.returncode != 0 and "--gan_loss_weight needs real images" in proc.stderr


def test_in_training_evaluation_logs_fid(teacher, tmp_path):
    """FID through the evaluation package's `Scorer`, with a feature network given as a TorchScript file (here the
    tiny random stand-in; on a cluster without internet, any saved network)."""
    import torch

    from diffusers_disback.testing import TinyFeatureExtractor, write_tiny_caption_set

    data = write_tiny_caption_set(str(tmp_path / "eval_set"), num=8, size=(96, 80))
    extractor = str(tmp_path / "features.pt")
    torch.jit.trace(TinyFeatureExtractor(), torch.zeros(1, 3, 299, 299)).save(extractor)
    out = tmp_path / "run"
    proc = _run(_cmd(teacher, out, "--degradation_steps", "2", "--max_train_steps", "4", "--validation_steps", "0",
                     "--eval_steps", "2", "--eval_dataset", data, "--eval_num_prompts", "8",
                     "--eval_feature_extractor", extractor))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("evaluation at step") == 3  # before the first iteration, after 2 and after 4
    # the reference statistics, computed once, and the evaluations' record
    assert sorted(f.rsplit(".", 1)[-1] for f in os.listdir(out / "eval")) == ["jsonl", "safetensors"]
    fids = [v for _, v in _scalars(out, "eval/fid")]
    assert len(fids) == 3 and all(f > 0 for f in fids)
    records = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage_step"] for r in records] == [0, 2, 4]
    assert [r["eval/fid"] for r in records] == pytest.approx(fids, rel=1e-6)
    assert "eval/clip_score" not in records[0]  # no --eval_clip_model
    seconds = [r["stage2_seconds"] for r in records]
    assert seconds[0] == 0.0 and seconds[0] < seconds[1] < seconds[2]
    bad = _run(_cmd(teacher, tmp_path / "bad_net", "--eval_steps", "2", "--eval_dataset", data,
                    "--eval_feature_extractor", "no-such-network.pt"))  # fmt: skip
    assert bad.returncode == 2 and "neither 'inception' nor a TorchScript file" in bad.stderr

    no_data = _run(_cmd(teacher, tmp_path / "bad", "--eval_steps", "2"))
    assert no_data.returncode != 0 and "--eval_steps needs --eval_dataset" in no_data.stderr


def test_in_training_evaluation_on_the_shapes_world(teacher, tmp_path):
    """`--eval_dataset shapes`: every caption of the shapes world, read back by the shapes judge (the curves of
    benchmarks/shapes_compare.py)."""
    out = tmp_path / "run"
    proc = _run(_cmd(teacher, out, "--degradation_steps", "2", "--max_train_steps", "2", "--validation_steps", "0",
                     "--eval_steps", "2", "--eval_dataset", "shapes"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage_step"] for r in records] == [0, 2]
    for r in records:
        assert 0.0 <= r["eval/shapes_accuracy"] <= r["eval/shapes_accuracy_colour"] <= 1.0
        assert r["eval/shapes_fd"] > 0 and "eval/shapes_accuracy_held_out_captions" in r
    logged = [v for _, v in _scalars(out, "eval/shapes_accuracy")]
    assert logged == pytest.approx([r["eval/shapes_accuracy"] for r in records], rel=1e-6)  # TensorBoard: float32


def test_compile_gives_the_uncompiled_weights(teacher, uninterrupted, tmp_path):
    """`--compile` runs both stages with every UNet compiled in place. CI uses the `aot_eager` backend (dynamo's
    graph capture and AOT autograd, without inductor's C++ build, which takes minutes per graph on two CPU cores);
    `--compile` alone means inductor (docs/benchmarks.md)."""
    out = tmp_path / "compiled"
    proc = _run(_cmd(teacher, out, "--compile", "aot_eager"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = _final_unet(uninterrupted[0]), _final_unet(out)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-6, msg=k)


def test_dmd_and_warm_baselines_through_the_script(teacher, uninterrupted, tmp_path):
    """`--method dmd` skips stage 1 and matches the teacher from the first update with the fake score from the
    teacher; `--method warm` reuses a path but targets the teacher from the start, the fake score from its last node."""
    out = tmp_path / "dmd"
    proc = _run(_cmd(teacher, out, "--method", "dmd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "path").exists() and "stage 1" not in proc.stderr
    assert [v for _, v in _scalars(out, "backtracking/target_node")] == [0.0, 0.0, 0.0]
    assert json.loads((out / "final" / "disback_config.json").read_text())["method"] == "dmd"
    warm = tmp_path / "warm"
    args = ["--method", "warm", "--stage", "backtracking", "--path_dir", str(uninterrupted[0] / "path")]
    proc = _run(_cmd(teacher, warm, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [v for _, v in _scalars(warm, "backtracking/target_node")] == [0.0, 0.0, 0.0]
    # a different start for the fake score than DMD's, the same target: different generators
    assert any(not torch.equal(a, b) for a, b in zip(_final_unet(out).values(), _final_unet(warm).values()))
