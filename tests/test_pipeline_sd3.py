"""DisBackSD3Pipeline: one step from sigma 1 equals stock SD3 (any shift) and `z - v(z, 1000)` decoded by hand,
few-step re-noising equals a hand-written loop, and the saved folder loads three ways with the same images."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor

import diffusers_disback
from diffusers_disback import DisBackSD3Pipeline, disback_flow_scheduler, disback_flow_sigmas
from diffusers_disback.hub import make_model_card, save_for_hub
from diffusers_disback.pipeline_utils_disback import SD3_REMOTE_FILES
from diffusers_disback.testing import get_sd3_components, save_tiny_sd3_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

PARITY_ATOL = 1e-6  # the same computation: in practice bit-identical
ROUND_TRIP_ATOL = 1e-5  # reloaded weights are equal, a reloaded CLIP's pooled output differs in the last bit
CALL = {"height": 64, "width": 64, "max_sequence_length": 32}
LATENT_SHAPE = (1, 16, 8, 8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def components():
    return get_sd3_components()  # the teacher's FlowMatchEulerDiscreteScheduler(shift=3)


@pytest.fixture
def pipe(components):
    return _quiet(DisBackSD3Pipeline(**{**components, "scheduler": disback_flow_scheduler()}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A DisBackSD3Pipeline folder (no T5), written by `save_pretrained`, and the in-memory pipeline's images."""
    folder = tmp_path_factory.mktemp("disback-sd3") / "folder"
    pipe = _quiet(DisBackSD3Pipeline(**{**get_sd3_components(), "scheduler": disback_flow_scheduler()}))
    pipe.save_pretrained(folder)
    expected = {
        n: pipe("a cat", num_inference_steps=n, generator=_gen(), output_type="np", **CALL).images for n in (1, 4)
    }
    return folder, expected


def _velocity(pipe, x, sigma, prompt="a cat"):
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False, **_seq())
    timestep = torch.full((x.shape[0],), 1000 * sigma, dtype=torch.float32)
    return pipe.transformer(
        hidden_states=x,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        timestep=timestep,
        return_dict=False,
    )[0]


def _seq():
    return {"max_sequence_length": CALL["max_sequence_length"]}


@pytest.mark.parametrize(
    "prompt, size", [("a cat", (64, 64)), (["a cat", "a dog on the moon"], (64, 64)), ("a cat", (64, 96))]
)
@pytest.mark.parametrize("teacher_scheduler", [True, False], ids=["shift3-euler", "student"])
def test_one_step_equals_stock_sd3(pipe, components, prompt, size, teacher_scheduler):
    h, w = size
    kwargs = {**CALL, "height": h, "width": w}
    scheduler = components["scheduler"] if teacher_scheduler else disback_flow_scheduler()
    stock = _quiet(StableDiffusion3Pipeline(**{**components, "scheduler": scheduler}))
    out = pipe(prompt, generator=_gen(), output_type="latent", **kwargs).images
    ref = stock(prompt, num_inference_steps=1, guidance_scale=0, generator=_gen(), output_type="latent", **kwargs)
    assert torch.equal(out, ref.images)  # sigma 1 is a fixed point of every shift
    image = pipe(prompt, generator=_gen(), output_type="np", **kwargs).images
    ref_image = stock(prompt, num_inference_steps=1, guidance_scale=0, generator=_gen(), output_type="np", **kwargs)
    n = 1 if isinstance(prompt, str) else len(prompt)
    assert image.shape == (n, h, w, 3)
    assert np.abs(image - ref_image.images).max() <= PARITY_ATOL
    # the parity is not vacuous: another seed gives another image
    other = pipe(prompt, generator=_gen(1), output_type="np", **kwargs).images
    assert np.abs(image - other).max() > 1e-2


def test_one_step_is_z_minus_v_at_1000_decoded_by_hand(pipe):
    out = pipe("a cat", generator=_gen(), output_type="latent", **CALL).images
    image = pipe("a cat", generator=_gen(), output_type="np", **CALL).images
    assert pipe.scheduler.timesteps.tolist() == [1000.0]

    z = randn_tensor(LATENT_SHAPE, generator=_gen(), dtype=torch.float32)
    with torch.no_grad():
        x0 = z - _velocity(pipe, z, 1.0)
        vae = pipe.vae.config
        assert (vae.scaling_factor, vae.shift_factor) == (1.5035, 0.0609)
        decoded = pipe.vae.decode(x0 / vae.scaling_factor + vae.shift_factor, return_dict=False)[0]
    by_hand = pipe.image_processor.postprocess(decoded, output_type="np")
    assert (out - x0).abs().max().item() <= PARITY_ATOL
    assert np.abs(image - by_hand).max() <= PARITY_ATOL


@pytest.mark.parametrize("steps, sigmas", [(4, None), (None, [1.0, 0.5]), (None, [0.8, 0.3])])
def test_few_steps_renoise_like_a_hand_written_loop(pipe, steps, sigmas):
    rungs = disback_flow_sigmas(steps) if sigmas is None else sigmas
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(float(t))
        return kwargs

    kwargs = {"num_inference_steps": steps} if sigmas is None else {"sigmas": sigmas}
    torch.manual_seed(123)  # the re-noising draws from `generator`, not from torch's global RNG
    out = pipe("a cat", generator=_gen(), output_type="latent", callback_on_step_end=callback, **kwargs, **CALL)

    g = _gen()
    x = randn_tensor(LATENT_SHAPE, generator=g, dtype=torch.float32)
    with torch.no_grad():
        for i, sigma in enumerate(rungs):
            x0 = x - sigma * _velocity(pipe, x, sigma)
            s_next = rungs[i + 1] if i + 1 < len(rungs) else 0.0
            x = (1 - s_next) * x0 + s_next * randn_tensor(LATENT_SHAPE, generator=g, dtype=torch.float32)
    assert seen == [1000 * s for s in rungs]
    assert (out.images - x).abs().max().item() <= PARITY_ATOL
    torch.manual_seed(7)
    again = pipe("a cat", generator=_gen(), output_type="latent", **kwargs, **CALL).images
    assert torch.equal(again, out.images)


def test_default_rungs_and_bad_sigmas():
    assert disback_flow_sigmas(1) == [1.0]
    assert disback_flow_sigmas(2) == [1.0, 0.5]
    assert disback_flow_sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            disback_flow_sigmas(bad)


@pytest.mark.parametrize(
    "sigmas, message",
    [
        ([], "must not be empty"),
        ([1.2, 0.5], r"lie in \(0, 1\]"),
        ([1.0, 0.0], r"lie in \(0, 1\]"),
        ([0.5, 0.75], "decreasing"),
    ],
)
def test_bad_sigmas_are_a_clear_error(pipe, sigmas, message):
    with pytest.raises(ValueError, match=message):
        pipe("a cat", sigmas=sigmas, **CALL)


def test_student_scheduler_is_diffusers_flow_match_euler():
    scheduler = disback_flow_scheduler({"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True})
    assert type(scheduler) is FlowMatchEulerDiscreteScheduler
    assert scheduler.config.shift == 1.0 and scheduler.config.use_dynamic_shifting is False
    assert scheduler.config.stochastic_sampling is True
    scheduler.set_timesteps(sigmas=disback_flow_sigmas(4))
    assert scheduler.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert scheduler.sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("patch_size, height, message", [(1, 60, "divisible by 8"), (2, 72, "divisible by 16")])
def test_size_not_divisible_by_vae_and_patch_is_a_clear_error(patch_size, height, message):
    components = get_sd3_components(transformer={"patch_size": patch_size})
    pipe = _quiet(DisBackSD3Pipeline(**{**components, "scheduler": disback_flow_scheduler()}))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", height=height, width=64, max_sequence_length=32)
    if patch_size == 2:  # 8 * 2 = 16 divides 80: it samples
        assert pipe("a cat", height=80, width=64, output_type="latent", **_seq()).images.shape == (1, 16, 10, 8)


def test_saved_layout_is_what_stock_diffusers_needs(saved):
    folder, _ = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (sched["shift"], sched["use_dynamic_shifting"], sched["stochastic_sampling"]) == (1.0, False, True)
    package = os.path.dirname(diffusers_disback.__file__)
    for remote_name, package_name in SD3_REMOTE_FILES.items():
        with open(os.path.join(package, package_name), "rb") as f:
            assert (folder / remote_name).read_bytes() == f.read(), remote_name
    assert not (folder / "pipeline_img2img.py").exists() and not (folder / "text_encoder_3").exists()
    # why the card tells plain diffusers to pass them: without, diffusers 0.42.1 refuses a folder with no T5
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(folder)


def test_three_loading_routes_give_identical_images(saved):
    """Routes 1 and 3 here; route 2 (remote code) runs in a fresh interpreter in
    `test_the_folder_loads_as_remote_code_without_the_package`: diffusers imports every local `pipeline.py` as one
    module, `diffusers_modules.local.pipeline`, so in a process that already loaded the SDXL repo's remote pipeline
    that module would hold both classes and diffusers refuses to choose."""
    folder, expected = saved
    ours = _quiet(DisBackSD3Pipeline.from_pretrained(folder))  # no T5 and no text_encoder_3=None needed
    plain = _quiet(StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None))
    assert type(plain) is StableDiffusion3Pipeline and ours.text_encoder_3 is None
    for p in (ours, plain):
        assert type(p.scheduler) is FlowMatchEulerDiscreteScheduler and p.scheduler.config.stochastic_sampling

    a = ours("a cat", generator=_gen(), output_type="np", **CALL).images
    b = plain("a cat", num_inference_steps=1, guidance_scale=0, generator=_gen(), output_type="np", **CALL).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - expected[1]).max() <= ROUND_TRIP_ATOL

    a4 = ours("a cat", num_inference_steps=4, generator=_gen(), output_type="np", **CALL).images
    assert np.abs(a4 - expected[4]).max() <= ROUND_TRIP_ATOL
    # plain diffusers samples the same rungs with `sigmas=`; its loop draws the re-noising from torch's global RNG
    torch.manual_seed(0)
    b4 = plain("a cat", sigmas=disback_flow_sigmas(4), guidance_scale=0, output_type="np", **CALL).images
    assert plain.scheduler.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    torch.manual_seed(0)
    np.testing.assert_array_equal(b4, ours("a cat", num_inference_steps=4, output_type="np", **CALL).images)


def test_the_folder_records_the_t5_length_the_generator_was_trained_with(tmp_path, caplog):
    """A generator trained with L T5 tokens (the training script records its `--max_sequence_length`) samples with L
    by default after a save and reload; stock diffusers loads the folder without a word about the private key, and
    the card's plain-diffusers snippets pass L."""
    import logging

    from diffusers_disback.evaluation import load_pipeline
    from diffusers_disback.pipeline_disback_sd3 import MAX_SEQUENCE_LENGTH_KEY

    pipe = _quiet(DisBackSD3Pipeline(**{**get_sd3_components(), "scheduler": disback_flow_scheduler()}))
    assert pipe.default_max_sequence_length == 256  # diffusers' default until one is recorded
    pipe.default_max_sequence_length = 8
    expected = pipe("a cat", generator=_gen(), output_type="np", height=64, width=64).images
    explicit = pipe("a cat", generator=_gen(), output_type="np", height=64, width=64, max_sequence_length=8).images
    longer = pipe("a cat", generator=_gen(), output_type="np", height=64, width=64, max_sequence_length=32).images
    np.testing.assert_array_equal(expected, explicit)
    assert np.abs(expected - longer).max() > 1e-3  # the length changes the image: recording it matters
    save_for_hub(pipe, tmp_path / "repo", "me/sd3-seq8")
    assert json.loads((tmp_path / "repo" / "model_index.json").read_text())[MAX_SEQUENCE_LENGTH_KEY] == 8
    for loaded in (DisBackSD3Pipeline.from_pretrained(tmp_path / "repo"), load_pipeline(str(tmp_path / "repo"))):
        assert loaded.default_max_sequence_length == 8
        image = _quiet(loaded)("a cat", generator=_gen(), output_type="np", height=64, width=64).images
        assert np.abs(image - expected).max() <= ROUND_TRIP_ATOL
    with caplog.at_level(logging.WARNING):
        StableDiffusion3Pipeline.from_pretrained(tmp_path / "repo", text_encoder_3=None, tokenizer_3=None)
    assert "max_sequence_length" not in caplog.text
    card = (tmp_path / "repo" / "README.md").read_text()
    assert card.count("max_sequence_length=8") == 3  # routes 2 and 3 (one and four steps)
    with pytest.raises(ValueError, match="positive integer"):
        pipe.default_max_sequence_length = 0


def test_from_pretrained_swaps_a_teachers_scheduler(tmp_path):
    save_tiny_sd3_teacher(str(tmp_path))
    assert json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    p = DisBackSD3Pipeline.from_pretrained(tmp_path)
    assert type(p.scheduler) is FlowMatchEulerDiscreteScheduler
    assert (p.scheduler.config.shift, p.scheduler.config.stochastic_sampling) == (1.0, True)
    kept = DisBackSD3Pipeline.from_pretrained(tmp_path, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert kept.scheduler.config.shift == 3.0


def test_save_for_hub_writes_the_sd3_card(pipe, tmp_path):
    folder = save_for_hub(
        pipe, tmp_path / "repo", "user/disback-sd3-tiny", base_model="user/sd3-base", sample_prompts=["a cat"]
    )
    assert {"model_index.json", "pipeline.py", "README.md", "samples.png"} <= set(os.listdir(folder))
    assert (
        json.loads((tmp_path / "repo" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    )
    card = (tmp_path / "repo" / "README.md").read_text()
    for needle in (
        "base_model: user/sd3-base",
        "- stable-diffusion-3",
        "license: other",
        "license_name: stabilityai-ai-community",
        'DisBackSD3Pipeline.from_pretrained("user/disback-sd3-tiny"',
        'custom_pipeline="user/disback-sd3-tiny", trust_remote_code=True',
        '"user/disback-sd3-tiny", text_encoder_3=None, tokenizer_3=None',
        "num_inference_steps=1, guidance_scale=0",
        "sigmas=[1.0, 0.75, 0.5, 0.25], guidance_scale=0",
        "This repo has no T5 encoder",
    ):
        assert needle in card, needle
    assert "stable-diffusion-xl" not in card and "timesteps=[399]" not in card and "export-lora" not in card
    with pytest.raises(ValueError, match="no UNet"):
        save_for_hub(pipe, tmp_path / "unet", "user/x", kind="unet", sample_prompts=None)


def test_sd3_card_with_t5_loads_plainly():
    card = make_model_card("user/x", base_model="user/base", family="sd3").text
    assert 'StableDiffusion3Pipeline.from_pretrained(\n    "user/x", torch_dtype' in card
    assert "text_encoder_3=None" not in card and "no T5" not in card


# Run as a script in a fresh interpreter (and a fresh remote-code cache): argv[1] the folder, argv[2] the output.
CHILD = r"""
import importlib.abc
import sys


class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers_disback" or name.startswith("diffusers_disback."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, HidePackage())
import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(height=64, width=64, max_sequence_length=32, output_type="np")
images = {f"steps{n}": pipe("a cat", num_inference_steps=n, generator=torch.Generator().manual_seed(0), **kwargs).images for n in (1, 4)}
assert not [m for m in sys.modules if m.split(".")[0] == "diffusers_disback"]
np.savez(out, cls=np.array(type(pipe).__module__ + "." + type(pipe).__name__), **images)
"""


def test_the_folder_loads_as_remote_code_without_the_package(saved, tmp_path):
    folder, expected = saved
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), DIFFUSERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(folder), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = np.load(tmp_path / "out.npz")
    assert str(got["cls"]) == "diffusers_modules.local.pipeline.DisBackSD3Pipeline"
    for n in (1, 4):
        assert np.abs(got[f"steps{n}"] - expected[n]).max() <= ROUND_TRIP_ATOL
