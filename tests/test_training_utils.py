"""The training glue in-process: prompt stream, conditioning, run state, background pushes; the script's arguments
through its command line."""

import os
import re
import subprocess
import sys

import pytest
import torch

from diffusers_disback.distill import DisBackConfig, lora_config, make_optimizer, make_trainable
from diffusers_disback.testing import get_sdxl_components
from diffusers_disback.training import (
    SDXL_LORA_TARGETS,
    BackgroundPusher,
    EmptyStreamError,
    FrozenSDXL,
    ImageStream,
    PromptStream,
    RunState,
    SDXLConditioner,
    finite_or_skip,
    plan_resume,
    prepare_trainable,
    save_checkpoint,
    unet_eps_fn,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")


def _script(*argv: str) -> subprocess.CompletedProcess:
    """The training script run as a program (it is not a library)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=300, env=env)


def _prompts(tmp_path, lines):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def test_stream_skips_empty_captions_and_repeats_epochs(tmp_path):
    stream = PromptStream(data_files=_prompts(tmp_path, ["a", "", "b", "   ", "c"]), shuffle_buffer=0)
    assert stream.take(7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert stream.skipped == 4 and stream.epoch == 2


def test_stream_resumes_exactly_mid_epoch_with_shuffling(tmp_path):
    files = _prompts(tmp_path, [f"prompt {i}" for i in range(23)])
    full = PromptStream(data_files=files, shuffle_buffer=8, seed=3)
    reference = full.take(60)
    first = PromptStream(data_files=files, shuffle_buffer=8, seed=3)
    head = first.take(37)
    resumed = PromptStream(data_files=files, shuffle_buffer=8, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(23) == reference
    assert reference[:23] != reference[23:46]  # each epoch is reshuffled


def test_stream_splits_by_rank(tmp_path):
    files = _prompts(tmp_path, [f"p{i}" for i in range(10)])
    shards = [PromptStream(data_files=files, shuffle_buffer=0, rank=r, world_size=2).take(5) for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1]) and len(set(shards[0]) | set(shards[1])) == 10


def test_stream_errors(tmp_path):
    with pytest.raises(EmptyStreamError, match="no usable caption"):
        PromptStream(data_files=_prompts(tmp_path, ["", "  "])).take(1)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,other\na cat,1\n")
    with pytest.raises(
        KeyError, match=r"caption column 'text' not in the dataset; its columns are \['other', 'prompt'\]"
    ):
        PromptStream(data_files=str(csv)).take(1)
    assert PromptStream(data_files=str(csv), caption_column="prompt").take(2) == ["a cat", "a cat"]
    with pytest.raises(FileNotFoundError, match="not found"):
        PromptStream(data_files=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="exactly one"):
        PromptStream()


def test_conditioner_equals_the_pipeline_encoding():
    from diffusers_disback import DisBackPipeline

    c = get_sdxl_components("tiny", scheduler="disback")
    conditioner = SDXLConditioner(c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"], 64)
    cond = conditioner(["a cat", "a dog"], "cpu")
    pipe = DisBackPipeline(**c)
    embeds, _, pooled, _ = pipe.encode_prompt(
        ["a cat", "a dog"], device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    assert cond["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    uncond = SDXLConditioner.uncond(cond)
    assert uncond["prompt_embeds"].abs().sum() == 0 and torch.equal(uncond["time_ids"], cond["time_ids"])
    eps = unet_eps_fn(c["unet"])(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
    assert eps.shape == (2, 4, 8, 8) and eps.dtype == torch.float32
    with pytest.raises(ValueError, match="divisible by 8"):
        SDXLConditioner(c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"], 60)


def test_offloaded_text_encoders_visit_the_device_for_each_batch_only(monkeypatch):
    """`--offload_text_encoders`: the same conditioning, with each encoder moved to the device before the encoding
    and back to the CPU after it (also when the encoding fails)."""
    c = get_sdxl_components("tiny")
    parts = (c["tokenizer"], c["tokenizer_2"], c["text_encoder"], c["text_encoder_2"], 64)
    expected = SDXLConditioner(*parts)(["a cat"], "cpu")
    moves = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = c[name]
        monkeypatch.setattr(encoder, "to", lambda device, _e=encoder, _n=name: moves.append((_n, str(device))) or _e)
    offloaded = SDXLConditioner(*parts, offload=True)
    got = offloaded(["a cat"], "cpu")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert moves == [("text_encoder", "cpu"), ("text_encoder_2", "cpu")] * 2  # to the device, then back
    moves.clear()
    monkeypatch.setattr(offloaded.encoder, "encode_prompt", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        offloaded(["a cat"], "meta")
    assert moves == [("text_encoder", "meta"), ("text_encoder_2", "meta"), ("text_encoder", "cpu"),
                     ("text_encoder_2", "cpu")]  # fmt: skip


def test_run_state_round_trip():
    s = RunState(stage="backtracking", stage_step=7, global_step=17, backtracking={"target": 2})
    t = RunState()
    t.load_state_dict(s.state_dict())
    assert t == s


def test_background_pusher_snapshots_and_survives_failures(hub_server, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    pusher = BackgroundPusher("user/pusher-test", retry_wait=0.01, max_retries=1)
    hub_server.fail_next("commit", times=2, status=500)
    pusher.submit(str(folder), path_in_repo="checkpoints/c1")
    pusher.wait()
    assert len(pusher.failures) == 1 and (folder / "a.txt").read_text() == "one"  # nothing local lost
    pusher.submit(str(folder), path_in_repo="checkpoints/c2")
    (folder / "a.txt").write_text("changed after submit")  # the push uploads the snapshot taken at submit
    pusher.close()
    assert pusher.pushed == ["checkpoints/c2"]
    assert hub_server.files("user/pusher-test")["checkpoints/c2/a.txt"] in (b"one", b"changed after submit")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resolution", "60"], "divisible by 8"),
        (["--dataset_name", "x/y"], "exactly one of --dataset_name and --train_data_files"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--min_step_percent", "0.9", "--max_step_percent", "0.1"], "min_step_percent"),
    ],
)
def test_script_argument_errors(extra, message):
    proc = _script("--pretrained_teacher_model", "x", "--train_data_files", "p.txt", *extra)
    assert proc.returncode == 2 and message in proc.stderr


def test_script_defaults_are_the_reference_hyperparameters():
    config = DisBackConfig()  # the script's flags take their defaults from it
    assert (config.learning_rate, config.guidance_scale, config.conditioning_timestep) == (5e-7, 8.0, 399)
    assert (config.degradation_steps, config.path_interval, config.backtrack_interval) == (1000, 100, 1000)
    assert (config.fake_score_update_ratio, config.max_grad_norm, config.lr_warmup_steps) == (5, 10.0, 500)
    assert (config.adam_weight_decay, config.train_batch_size) == (0.01, 1)
    assert (config.min_step_percent, config.max_step_percent) == (0.02, 0.98)
    proc = _script("--help")
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())  # --help names every default
    for flag, default in (("--resolution RESOLUTION", "1024"), ("--learning_rate LEARNING_RATE", "5e-07"),
                          ("--backtrack_interval BACKTRACK_INTERVAL", "1000"), ("--method", "disback")):  # fmt: skip
        # the flag, its help text, then its own default (the first "(default: ...)" after it)
        assert re.search(
            re.escape(flag) + r" (?:(?!\(default: ).)*\(default: " + re.escape(default) + r"\)", help_text
        )


def test_nan_policy():
    import types

    from accelerate import PartialState

    PartialState()  # accelerate's logger needs the process state
    single_process = types.SimpleNamespace(gather=lambda t: t, process_index=0)
    assert finite_or_skip(single_process, torch.tensor(1.0), "generator DM", "abort", 12) is True
    with pytest.raises(FloatingPointError, match="generator DM loss is nan on rank 0 .* at global step 12"):
        finite_or_skip(single_process, torch.tensor(float("nan")), "generator DM", "abort", 12)
    assert finite_or_skip(single_process, torch.tensor(float("inf")), "fake-score DSM", "skip", 12) is False


def _image_folder(tmp_path, n=5, corrupt=True, captions=True):
    import json

    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        pixels = torch.randint(0, 256, (72, 80, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i}.png")
        names.append(f"img_{i}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"not a png")
        names.append("broken.png")
    if captions:  # an image folder's captions: the `text` field of metadata.jsonl
        lines = [json.dumps({"file_name": name, "text": f"a photo of image {name[4:-4]}"}) for name in names]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_image_stream_crops_scales_and_skips_unreadable(tmp_path):
    from diffusers_disback.training import ImageStream

    stream = ImageStream(64, data_dir=str(_image_folder(tmp_path)), shuffle_buffer=0)
    items = stream.take(7)
    assert all(x.shape == (3, 64, 64) and x.min() >= -1 and x.max() <= 1 for x, _ in items)
    assert [caption for _, caption in items[:5]] == [f"a photo of image {i}" for i in range(5)]
    assert stream.skipped >= 1  # the broken file, every epoch
    with pytest.raises(ValueError, match="exactly one"):
        ImageStream(64)


def test_real_images_are_encoded_with_their_own_captions(tmp_path, caplog):
    """The GAN term's real images carry their captions by default, as the fakes carry their prompts (DMD2 pairs real
    latents with their captions); a dataset without the caption column is an error unless the empty prompt is asked
    for, which is warned about."""
    captioned = _image_folder(tmp_path, corrupt=False)
    stream = ImageStream(64, data_dir=str(captioned), caption_column="text", shuffle_buffer=0)
    assert [caption for _, caption in stream.take(5)] == [f"a photo of image {i}" for i in range(5)]

    (tmp_path / "bare").mkdir()
    bare = _image_folder(tmp_path / "bare", corrupt=False, captions=False)
    with pytest.raises(
        ValueError, match=r"no caption column 'text'; its columns are \['image'\].*--real_caption_column"
    ):
        ImageStream(64, data_dir=str(bare), caption_column="text")
    with caplog.at_level("WARNING"):
        stream = ImageStream(64, data_dir=str(bare), caption_column=None)
    assert "discriminator can tell them apart by the text alone" in caplog.text
    assert {caption for _, caption in stream.take(5)} == {""}
    # the script's flag: the `text` captions by default (here missing: an error before any training)
    from diffusers_disback.testing import save_tiny_teacher

    teacher = save_tiny_teacher(str(tmp_path / "teacher"))
    prompts = _prompts(tmp_path, ["a prompt"])
    proc = _script("--pretrained_teacher_model", teacher, "--train_data_files", prompts, "--gan_loss_weight", "5e-3",
                   "--real_data_dir", str(bare), "--resolution", "64", "--report_to", "none", "--output_dir",
                   str(tmp_path / "run"))  # fmt: skip
    assert proc.returncode != 0 and "no caption column 'text'" in proc.stderr


def test_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_one(tmp_path):
    import types

    from accelerate import PartialState

    PartialState()
    good = tmp_path / "checkpoints" / "checkpoint-2"
    good.mkdir(parents=True)
    (good / "run_state.json").write_text("{}")

    def full_disk(path):
        os.makedirs(path, exist_ok=True)
        (tmp_path / "checkpoints" / "checkpoint-4.tmp" / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    acc = types.SimpleNamespace(
        is_main_process=True,
        process_index=0,
        device="cpu",
        wait_for_everyone=lambda: None,
        save_state=full_disk,
        gather=lambda t: t,
    )
    with pytest.raises(RuntimeError, match=r"No space left on device.*last good checkpoint is .*checkpoint-2"):
        save_checkpoint(acc, str(tmp_path), RunState(global_step=4), torch.Generator(), {"prompts": None})
    assert (good / "run_state.json").is_file()
    assert (
        not (tmp_path / "checkpoints" / "checkpoint-4.tmp").exists()
        and not (tmp_path / "checkpoints" / "checkpoint-4").exists()
    )


def test_prepared_dataset_reshuffles_per_epoch_and_resumes(tmp_path):
    files = _prompts(tmp_path, [f"prompt {i}" for i in range(11)])
    full = PromptStream(data_files=files, streaming=False, shuffle_buffer=1, seed=5).take(33)
    assert full[:11] != full[11:22] and sorted(full[:11]) == sorted(full[11:22])
    first = PromptStream(data_files=files, streaming=False, shuffle_buffer=1, seed=5)
    head = first.take(15)
    resumed = PromptStream(data_files=files, streaming=False, shuffle_buffer=1, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + resumed.take(18) == full


# ------------------------------------------------------------------ precision of what trains (bf16 mixed precision)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_trainable_weights_are_fp32_masters_and_move_at_the_sdxl_learning_rate(lora):
    """Under bf16 mixed precision the frozen base is bf16 but every trained weight is fp32, so AdamW steps of lr 5e-7
    change it (peft makes an adapter in its base layer's dtype; bf16 weights of size ~0.1 would round such steps
    away)."""

    from diffusers_disback.distill import NoiseSchedule, Score, denoising_score_matching_loss
    from diffusers_disback.testing import get_tiny_unet

    unet = get_tiny_unet().to(torch.bfloat16 if not lora else torch.float32)  # full: even a bf16 copy gets fp32
    config = lora_config(4, SDXL_LORA_TARGETS) if lora else None
    params = make_trainable(unet, config, torch.bfloat16, "generator")
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    trained = {id(p) for p in params}
    frozen = [p for p in unet.parameters() if id(p) not in trained]
    if lora:
        assert len(params) == 2 * sum("lora_A" in n for n, _ in unet.named_parameters())
        assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)  # the base stays bf16

    optimizer = make_optimizer(params, 5e-7, DisBackConfig())  # the script's AdamW settings
    named = {n: p for n, p in unet.named_parameters() if id(p) in trained}
    watch = {n: p.detach().clone() for n, p in named.items() if ("lora_A" in n if lora else n.endswith("to_q.weight"))}
    score = Score(unet_eps_fn(unet), NoiseSchedule.ddpm())
    cond = {
        "prompt_embeds": torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0)),
        "text_embeds": torch.randn(2, 32, generator=torch.Generator().manual_seed(1)),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(2, 1),
    }
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    noise = torch.Generator().manual_seed(3)
    for _ in range(5):  # lora_A has no gradient while B = 0: it moves from the second step on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = denoising_score_matching_loss(score, x0, cond, generator=noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    changed = torch.cat([(named[n] != before).flatten() for n, before in watch.items()]).float().mean().item()
    assert changed > 0.9, changed  # fp32: 0.97; bf16 adapters (the earlier code): 0.0002


def _tiny_cond(batch=2):
    return {
        "prompt_embeds": torch.randn(batch, 8, 64, generator=torch.Generator().manual_seed(0)),
        "text_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1),
    }


def test_fake_score_dm_pass_runs_in_fp32_inside_an_autocast_region():
    """DMD2 runs the fake score's pass of the DM loss in fp32; the loop's generator update sits in a bf16 autocast
    region, which `unet_eps_fn(..., autocast=False)` leaves."""
    from diffusers_disback.testing import get_tiny_unet

    unet = get_tiny_unet().eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 900])
    with torch.no_grad():
        exact = unet_eps_fn(unet)(x, t, _tiny_cond())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32 = unet_eps_fn(unet, autocast=False)(x, t, _tiny_cond())
            bf16 = unet_eps_fn(unet)(x, t, _tiny_cond())
    assert torch.equal(fp32, exact)
    assert not torch.equal(bf16, exact)


def test_prepared_models_carry_no_hidden_autocast():
    """Under mixed precision accelerate wraps a prepared model's forward in autocast, which would override the fp32
    pass above; the script's `prepare_trainable` removes it, so only the loop's autocast regions decide precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from diffusers_disback.testing import get_tiny_unet

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc = Accelerator(cpu=True, mixed_precision="bf16")
        unet = get_tiny_unet()
        reference = get_tiny_unet().eval()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        model, _, _ = prepare_trainable(acc, unet, opt, sched)
        model.eval()
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 900])
        with torch.no_grad():
            exact = unet_eps_fn(reference)(x, t, _tiny_cond())
            assert torch.equal(unet_eps_fn(model)(x, t, _tiny_cond()), exact)
            with acc.autocast():  # the loop's own regions still compute in bf16
                assert not torch.equal(unet_eps_fn(model)(x, t, _tiny_cond()), exact)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_text_encoders_stay_fp32_and_the_teacher_takes_the_mixed_precision_dtype(tmp_path):
    from diffusers_disback.testing import save_tiny_teacher

    frozen = FrozenSDXL.from_pretrained(save_tiny_teacher(str(tmp_path / "teacher")), 64, torch.bfloat16)
    encoders = (frozen.text_encoder, frozen.text_encoder_2)
    assert {p.dtype for m in encoders for p in m.parameters()} == {torch.float32}  # as DMD2's text encoders
    assert {p.dtype for p in frozen.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in frozen.load_generator(None).parameters()} == {torch.float32}


@pytest.mark.parametrize(("size", "strides"), [(32, [2, 2, 2, 4, 1]), (4, [4, 1]), (24, [2, 2, 2, 3, 1])])
def test_discriminator_head_follows_dmd2(size, strides):
    """DMD2's SDXL head at 1024 (mid-block 32x32): three stride-2 4x4 convs, a 4x4 stride-4 conv, a 1x1 conv."""
    from diffusers_disback.training import DiscriminatorHead

    head = DiscriminatorHead(64, size)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == strides and convs[-1].out_channels == 1
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in head.modules()) == len(strides) - 1
    assert head(torch.randn(3, 64, size, size)).shape == (3,)


def test_resume_plan_reads_the_checkpoint_once_and_never_changes(tmp_path):
    import json

    from accelerate import PartialState

    from diffusers_disback.training import restore_checkpoint

    PartialState()
    assert plan_resume(None, str(tmp_path)).stages == ("degradation", "backtracking")
    assert plan_resume("latest", str(tmp_path), "backtracking").checkpoint is None  # nothing saved yet: a fresh run

    def checkpoint(step, state):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "run_state.json").write_text(json.dumps(state))
        (folder / "data_0.json").write_text(json.dumps({"prompts": {"epoch": 0, "consumed": 5, "skipped": 1}}))
        from safetensors.torch import save_file

        save_file(
            {"noise_rng": torch.Generator().manual_seed(step).get_state()}, str(folder / "noise_rng_0.safetensors")
        )
        return folder

    checkpoint(2, {"stage": "degradation", "stage_step": 2, "global_step": 2, "backtracking": {}})
    plan = plan_resume("latest", str(tmp_path))
    assert plan.stages == ("degradation", "backtracking") and plan.path_truncation == 2
    assert plan.resumes("degradation") and plan.restores_models("degradation") and not plan.resumes("backtracking")
    with pytest.raises(ValueError, match="stage-1 checkpoint .* --stage degradation or --stage all"):
        plan_resume("latest", str(tmp_path), "backtracking")
    # the state a stage continues from is a copy: stage 1 moving on does not make the plan resume stage 2 again
    acc = types_namespace(process_index=0, load_state=lambda path: None)
    stream = PromptStream(data_files=_prompts(tmp_path, ["a", "b", "c"]), shuffle_buffer=0)
    state = restore_checkpoint(acc, plan, "degradation", torch.Generator(), {"prompts": stream, "real": None})
    assert stream.state_dict() == {"epoch": 0, "consumed": 5, "skipped": 1}
    state.stage, state.stage_step = "backtracking", 0
    assert plan.state.stage == "degradation" and not plan.resumes("backtracking")

    checkpoint(4, {"stage": "backtracking", "stage_step": 0, "global_step": 4, "backtracking": {}})
    plan = plan_resume("latest", str(tmp_path))
    assert plan.stages == ("backtracking",) and plan.resumes("backtracking")
    assert not plan.restores_models("backtracking")  # stage-1 models in it: stage 2 starts its own
    with pytest.raises(FileNotFoundError, match="not a checkpoint of this script"):
        plan_resume(str(tmp_path), str(tmp_path))


def types_namespace(**kwargs):
    import types

    return types.SimpleNamespace(**kwargs)


def test_a_checkpoint_counts_only_as_written_and_every_rank_is_in_it(tmp_path):
    from safetensors.torch import save_file

    from diffusers_disback.training.state import (
        DamagedCheckpointError,
        newest_good_checkpoint,
        verify_checkpoint,
        write_manifest,
    )

    def checkpoint(step, ranks=2):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
        (folder / "run_state.json").write_text("{}")
        (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard 0")
        (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"shard 1")
        for rank in range(ranks):
            (folder / f"data_{rank}.json").write_text("{}")
            (folder / f"random_states_{rank}.pkl").write_bytes(b"")
            save_file({"noise_rng": torch.Generator().get_state()}, str(folder / f"noise_rng_{rank}.safetensors"))
        return folder

    with pytest.raises(DamagedCheckpointError, match="lacks random_states_1.pkl, data_1.json, noise_rng_1"):
        write_manifest(str(checkpoint(2, ranks=1)), world_size=2)  # rank 1's part never arrived
    good = checkpoint(4)
    manifest = write_manifest(str(good), world_size=2)
    assert set(manifest["files"]) >= {"pytorch_model_fsdp_0/__1_0.distcp", "run_state.json", "data_1.json"}
    assert verify_checkpoint(str(good)) is True
    newest = checkpoint(6)
    write_manifest(str(newest), world_size=2)
    (newest / "pytorch_model_fsdp_0" / "__1_0.distcp").unlink()  # a shard lost
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint-6: pytorch_model_fsdp_0/__1_0.distcp is missing"):
        verify_checkpoint(str(newest))
    # checkpoint-2 has no manifest (its write never finished, or an older version wrote it); 6 is damaged: 4 it is
    assert newest_good_checkpoint(str(tmp_path)) == str(good)
    (good / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"shard X")  # same size, other bytes
    with pytest.raises(DamagedCheckpointError, match="sha256 mismatch"):
        verify_checkpoint(str(good))
    assert verify_checkpoint(str(good), hashes=False) is True  # sizes alone cannot tell


def test_the_pickle_check_passes_real_states_and_refuses_code(tmp_path):
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from diffusers_disback.training.state import DamagedCheckpointError, check_pickles

    model = torch.nn.Linear(3, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=str(tmp_path / "sharded"))
    torch.save(opt.state_dict(), tmp_path / "optimizer.bin")
    import random

    import numpy as np

    state = {
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(state, tmp_path / "random_states_0.pkl")  # as accelerate writes them
    check_pickles(str(tmp_path))  # torch.distributed.checkpoint's .metadata, an optimizer, RNG states: all fine

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))  # torch reads this with pickle.load
    with pytest.raises(DamagedCheckpointError, match=r"sharded/.metadata holds a pickle that would call posix.system"):
        check_pickles(str(tmp_path))
    assert not marker.exists()


def test_failpoints_fire_on_their_hit_and_rank_only(monkeypatch):
    from diffusers_disback import _io

    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(_io, "_failpoint_hits", {})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(_io.FAILPOINT_ENV, "checkpoint:2:0+1:stop")
    _io.failpoint("iteration")
    _io.failpoint("checkpoint")
    assert killed == []
    _io.failpoint("checkpoint")  # the 2nd time, on a listed rank
    import signal

    assert killed == [signal.SIGSTOP]
    monkeypatch.setenv(_io.FAILPOINT_ENV, "iteration:1:0")
    _io.failpoint("iteration")  # rank 1 is not listed
    assert killed == [signal.SIGSTOP]
