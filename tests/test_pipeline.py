"""DisBackPipeline, in the spirit of diffusers' PipelineTesterMixin, plus parity with SDXL + LCMScheduler."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline

from diffusers_disback import DisBackPipeline, DisBackScheduler
from diffusers_disback.testing import get_sdxl_components

PARITY_ATOL = 1e-5


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def components():
    return get_sdxl_components("tiny", scheduler="disback")


@pytest.fixture
def pipe(components):
    p = DisBackPipeline(**components)
    p.set_progress_bar_config(disable=True)
    return p


def _lcm_reference(components):
    c = dict(components)
    c["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    ref = StableDiffusionXLPipeline(**c)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.mark.parametrize(
    "prompt, size",
    [("a cat", (64, 64)), (["a cat", "a dog on the moon"], (64, 64)), (["a cat", "a dog"], (64, 96))],
)
def test_one_step_equals_sdxl_with_lcm_at_399(pipe, components, prompt, size):
    h, w = size
    out = pipe(prompt, height=h, width=w, generator=_gen(), output_type="np").images
    ref = _lcm_reference(components)(
        prompt, height=h, width=w, timesteps=[399], guidance_scale=0.0, generator=_gen(), output_type="np"
    ).images
    n = 1 if isinstance(prompt, str) else len(prompt)
    assert out.shape == (n, h, w, 3)
    assert np.abs(out - ref).max() <= PARITY_ATOL
    # the parity is not vacuous: another seed gives another image
    other = pipe(prompt, height=h, width=w, generator=_gen(1), output_type="np").images
    assert np.abs(out - other).max() > 1e-2


def test_one_step_latents_equal_lcm(pipe, components):
    out = pipe("a cat", generator=_gen(), output_type="latent").images
    ref = _lcm_reference(components)(
        "a cat", timesteps=[399], guidance_scale=0.0, generator=_gen(), output_type="latent"
    ).images
    assert out.shape == (1, 4, 8, 8)
    assert (out - ref).abs().max().item() <= PARITY_ATOL


def test_four_steps_equal_lcm(pipe, components):
    out = pipe("a cat", num_inference_steps=4, generator=_gen(), output_type="np").images
    ref = _lcm_reference(components)(
        "a cat", timesteps=[999, 749, 499, 249], guidance_scale=0.0, generator=_gen(), output_type="np"
    ).images
    assert np.abs(out - ref).max() <= PARITY_ATOL
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]


def test_defaults_hold_with_a_stock_scheduler(pipe, components):
    expected = pipe("a cat", generator=_gen(), output_type="np").images
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    out = pipe("a cat", generator=_gen(), output_type="np").images
    assert pipe.scheduler.timesteps.tolist() == [399]
    assert np.abs(out - expected).max() <= PARITY_ATOL


def test_batch_consistency(pipe):
    batch = pipe(["a cat", "a dog"], generator=[_gen(0), _gen(1)], output_type="np").images
    single = [pipe(p, generator=_gen(s), output_type="np").images[0] for p, s in (("a cat", 0), ("a dog", 1))]
    assert np.abs(batch[0] - single[0]).max() < 1e-4
    assert np.abs(batch[1] - single[1]).max() < 1e-4


def test_num_images_per_prompt(pipe):
    images = pipe(["a cat", "a dog"], num_images_per_prompt=3, generator=_gen(), output_type="np").images
    assert images.shape == (6, 64, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different noise per image


def test_dict_and_tuple_outputs(pipe):
    as_dict = pipe("a cat", generator=_gen(), output_type="np").images
    as_tuple = pipe("a cat", generator=_gen(), output_type="np", return_dict=False)[0]
    np.testing.assert_array_equal(as_dict, as_tuple)


def test_pil_output(pipe):
    image = pipe("a cat", generator=_gen()).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"


def test_prompt_embeds_equal_prompt(pipe):
    prompt_embeds, _, pooled, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    from_text = pipe("a cat", generator=_gen(), output_type="np").images
    from_embeds = pipe(
        prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, generator=_gen(), output_type="np"
    ).images
    np.testing.assert_allclose(from_text, from_embeds, atol=1e-6)


def test_given_latents_are_used(pipe):
    latents = torch.randn((1, 4, 8, 8), generator=_gen(3))
    a = pipe("a cat", latents=latents.clone(), output_type="np").images
    b = pipe("a cat", latents=latents.clone(), generator=_gen(99), output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_negative_prompt_and_guidance_change_the_image(pipe):
    base = pipe("a cat", generator=_gen(), output_type="np").images
    guided = pipe("a cat", negative_prompt="blurry", guidance_scale=3.0, generator=_gen(), output_type="np").images
    assert np.abs(base - guided).max() > 1e-3


def test_callback_on_step_end(pipe):
    seen = []

    def callback(p, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        return kwargs

    pipe("a cat", num_inference_steps=4, callback_on_step_end=callback, output_type="latent")
    assert seen == [(i, t, (1, 4, 8, 8)) for i, t in enumerate([999, 749, 499, 249])]


def test_size_not_divisible_by_8_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe("a cat", height=60, width=64)


def test_save_load_round_trip_and_layout(pipe, tmp_path):
    expected = pipe("a cat", generator=_gen(), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sched = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 1000
    assert (tmp_path / "pipeline.py").is_file() and (tmp_path / "scheduling_disback.py").is_file()

    loaded = DisBackPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DisBackScheduler)
    out = loaded("a cat", generator=_gen(), output_type="np").images
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_three_loading_routes_give_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    ours = DisBackPipeline.from_pretrained(tmp_path)
    plain = StableDiffusionXLPipeline.from_pretrained(tmp_path)
    remote = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(tmp_path), trust_remote_code=True)
    assert type(plain) is StableDiffusionXLPipeline and isinstance(plain.scheduler, LCMScheduler)
    assert type(remote).__name__ == "DisBackPipeline" and type(remote) is not DisBackPipeline
    for p in (ours, plain, remote):
        p.set_progress_bar_config(disable=True)
    a = ours("a cat", generator=_gen(), output_type="np").images
    b = plain("a cat", timesteps=[399], guidance_scale=0.0, generator=_gen(), output_type="np").images
    c = remote("a cat", generator=_gen(), output_type="np").images
    assert np.abs(a - b).max() <= PARITY_ATOL and np.abs(a - c).max() <= PARITY_ATOL
    # four steps: plain diffusers gets the DisBack timesteps from num_inference_steps alone
    a4 = ours("a cat", num_inference_steps=4, generator=_gen(), output_type="np").images
    b4 = plain("a cat", num_inference_steps=4, guidance_scale=0.0, generator=_gen(), output_type="np").images
    assert plain.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert np.abs(a4 - b4).max() <= PARITY_ATOL


def test_from_pretrained_swaps_a_base_models_scheduler(tmp_path):
    StableDiffusionXLPipeline(**get_sdxl_components("tiny", scheduler="euler")).save_pretrained(tmp_path)
    p = DisBackPipeline.from_pretrained(tmp_path)
    assert isinstance(p.scheduler, DisBackScheduler)
    kept = DisBackPipeline.from_pretrained(tmp_path, scheduler=LCMScheduler.from_config(p.scheduler.config))
    assert isinstance(kept.scheduler, LCMScheduler)


def test_fp16_variant_save(pipe, tmp_path):
    from diffusers_disback.hub import write_fp16_variant

    pipe.save_pretrained(tmp_path)
    written = write_fp16_variant(tmp_path)
    assert any(f.endswith(os.path.join("unet", "diffusion_pytorch_model.fp16.safetensors")) for f in written)
    assert any(f.endswith(os.path.join("text_encoder_2", "model.fp16.safetensors")) for f in written)
    p16 = DisBackPipeline.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert p16.unet.dtype == torch.float16
    ref = DisBackPipeline.from_pretrained(tmp_path)
    for (name, a), b in zip(p16.unet.state_dict().items(), ref.unet.state_dict().values()):
        torch.testing.assert_close(a, b.half(), msg=name)


def test_non_default_conditioning_timestep_survives_the_layout(components, tmp_path):
    components["scheduler"] = DisBackScheduler(conditioning_timestep=300)
    DisBackPipeline(**components).save_pretrained(tmp_path)
    sched = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["conditioning_timestep"] == 300
    loaded = DisBackPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    loaded("a cat", output_type="latent")
    assert loaded.scheduler.timesteps.tolist() == [300]


def test_execution_device_agrees_with_diffusers_with_and_without_hooks(pipe):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    stock = StableDiffusionXLPipeline._execution_device.fget
    assert pipe._execution_device == stock(pipe) == torch.device("cpu")
    add_hook_to_module(pipe.unet, AlignDevicesHook(execution_device="meta"))
    add_hook_to_module(pipe.vae, AlignDevicesHook(execution_device="meta"))
    add_hook_to_module(pipe.text_encoder, AlignDevicesHook(execution_device="meta"))
    add_hook_to_module(pipe.text_encoder_2, AlignDevicesHook(execution_device="meta"))
    try:
        assert pipe._execution_device == stock(pipe) == torch.device("meta")
    finally:
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            remove_hook_from_module(m)
