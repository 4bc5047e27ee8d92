"""The editing pipelines (img2img, inpaint): the strength rule, parity with diffusers' SDXL editing pipelines +
LCMScheduler at the same timesteps, loading routes, explicit `__call__` signatures, LoRA scale, ControlNet."""

import inspect
import json
import os

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    LCMScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from diffusers_disback import DisBackPipeline, DisBackScheduler, disback_timesteps
from diffusers_disback.pipeline_disback_img2img import DisBackImg2ImgPipeline, disback_editing_timesteps
from diffusers_disback.pipeline_disback_inpaint import DisBackInpaintPipeline
from diffusers_disback.testing import get_sdxl_components

SHAPES_TEACHER = os.path.join(os.path.dirname(__file__), "..", "examples", "shapes", "teacher")
PARITY_ATOL = 1e-5  # measured: img2img <= 7.8e-7, inpaint <= 1.1e-6 (float32 order of operations; LCM c_skip ~ 1.6e-8)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def components():
    return get_sdxl_components("tiny", scheduler="disback")


def _lcm(components):
    c = dict(components)
    c["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
    return c


@pytest.fixture(scope="module")
def img2img(components):
    return _quiet(DisBackImg2ImgPipeline(**components))


@pytest.fixture(scope="module")
def inpaint(components):
    return _quiet(DisBackInpaintPipeline(**components))


@pytest.fixture(scope="module")
def image():
    # a smooth image with structure: the tiny VAE's reconstruction of it is not flat
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    return torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x * y)])[None]


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 32:] = 1.0  # repaint the right half (latent columns 4..7)
    return m


# ---------------------------------------------------------------------------------------------- the strength rule


@pytest.mark.parametrize(
    "strength, steps, expected",
    [
        (0.0, 1, []),
        (0.4, 1, [399]),
        (0.5, 1, [399]),
        (0.9999, 1, [399]),
        (1.0, 1, [399]),
        (0.25, 4, [249]),
        (0.5, 4, [499, 249]),
        (0.6, 4, [499, 249]),
        (0.75, 4, [749, 499, 249]),
        (0.9999, 4, [749, 499, 249]),
        (1.0, 4, [999, 749, 499, 249]),
        (0.5, 2, [499]),
        (1.0, 2, [999, 499]),
        (0.7, 3, [666, 333]),
    ],
)
def test_strength_rule(strength, steps, expected):
    assert disback_editing_timesteps(strength, steps) == expected


def test_the_pipelines_share_one_copy_of_the_common_code():
    from diffusers_disback.pipeline_utils_disback import DisBackEditingMixin, DisBackMixin

    for cls in (DisBackImg2ImgPipeline, DisBackInpaintPipeline):
        assert issubclass(cls, DisBackEditingMixin)
        for name in ("from_pretrained", "from_pipe", "save_pretrained", "get_timesteps", "_batch_size", "_decode"):
            assert name not in cls.__dict__, name  # inherited, not written again
    assert issubclass(DisBackPipeline, DisBackMixin) and "from_pretrained" not in DisBackPipeline.__dict__


@pytest.mark.parametrize("strength, steps, minimum", [(0.3, 1, "0.4"), (0.2, 4, "0.25"), (0.45, 2, "0.5")])
def test_strength_below_the_grid_is_a_clear_error(strength, steps, minimum):
    with pytest.raises(ValueError, match=f"strength >= {minimum}"):
        disback_editing_timesteps(strength, steps)
    with pytest.raises(ValueError, match="strength"):
        disback_editing_timesteps(1.5, steps)


@pytest.mark.parametrize("steps", [2, 4])
def test_rule_is_diffusers_rule_on_the_disback_grid(steps):
    # diffusers' img2img keeps the last int(N * strength) timesteps; on a grid with N dividing 1000 that is our rule
    grid = disback_timesteps(steps)
    for strength in np.linspace(0.01, 0.99, 99):
        kept = int(steps * strength)
        if kept == 0:
            with pytest.raises(ValueError):
                disback_editing_timesteps(float(strength), steps)
        else:
            assert disback_editing_timesteps(float(strength), steps) == grid[steps - kept :], strength


def test_one_step_grid_follows_the_conditioning_timestep():
    assert disback_editing_timesteps(0.5, 1, conditioning_timestep=300) == [300]
    assert disback_editing_timesteps(0.31, 1, conditioning_timestep=300) == [300]
    with pytest.raises(ValueError, match="strength >= 0.301"):
        disback_editing_timesteps(0.3, 1, conditioning_timestep=300)


# ------------------------------------------------------------------------------------------------------ img2img


@pytest.mark.parametrize("strength, steps", [(0.5, 1), (0.9, 1), (0.5, 4), (0.8, 4), (0.6, 2)])
def test_img2img_equals_sdxl_img2img_with_lcm(img2img, components, image, strength, steps):
    ref = _quiet(StableDiffusionXLImg2ImgPipeline(**_lcm(components)))
    run = dict(image=image, num_inference_steps=steps, output_type="np")
    out = img2img("a cat", strength=strength, generator=_gen(), **run).images
    timesteps = disback_editing_timesteps(strength, steps)
    assert img2img.scheduler.timesteps.tolist() == timesteps
    # diffusers with the same explicit timesteps, all kept (strength 1 in its own rule)
    expected = ref(
        "a cat", image=image, strength=1.0, timesteps=timesteps, guidance_scale=0.0, generator=_gen(), output_type="np"
    ).images
    assert np.abs(out - expected).max() <= PARITY_ATOL
    if steps > 1:  # and diffusers' own strength rule on the DisBack grid
        expected = ref(
            "a cat",
            image=image,
            strength=strength,
            timesteps=disback_timesteps(steps),
            guidance_scale=0.0,
            generator=_gen(),
            output_type="np",
        ).images
        assert np.abs(out - expected).max() <= PARITY_ATOL
    # not vacuous: another seed is another image
    other = img2img("a cat", strength=strength, generator=_gen(1), **run).images
    assert np.abs(out - other).max() > 1e-2


@pytest.mark.parametrize("steps", [1, 4])
def test_img2img_strength_one_is_text_to_image(img2img, components, image, steps):
    out = img2img("a cat", image=image, strength=1.0, num_inference_steps=steps, generator=_gen(), output_type="np")
    t2i = _quiet(DisBackPipeline(**components))
    expected = t2i("a cat", num_inference_steps=steps, generator=_gen(), output_type="np").images
    assert np.abs(out.images - expected).max() <= PARITY_ATOL
    # the input only sets the size
    wide = img2img("a cat", image=torch.rand(1, 3, 64, 96), strength=1.0, generator=_gen(), output_type="np")
    assert wide.images.shape == (1, 64, 96, 3)


def _vae_round_trip(vae, pixels, generator):
    latents = vae.encode(pixels * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return latents, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_img2img_strength_zero_returns_the_input_latents_decoded(img2img, components, image):
    out = img2img("a cat", image=image, strength=0.0, generator=_gen(), output_type="np").images
    with torch.no_grad():
        latents, expected = _vae_round_trip(components["vae"], image, _gen())
    assert np.abs(out - expected).max() <= 1e-5
    got_latents = img2img("a cat", image=image, strength=0.0, generator=_gen(), output_type="latent").images
    torch.testing.assert_close(got_latents, latents, atol=1e-6, rtol=0)
    # batched like every other strength
    batch = img2img(["a cat", "a dog"], image=image, strength=0.0, num_images_per_prompt=2, output_type="np")
    assert batch.images.shape == (4, 64, 64, 3)
    pil = img2img("a cat", image=image, strength=0.0, return_dict=False)[0][0]
    assert pil.size == (64, 64)


def test_img2img_explicit_timesteps_and_errors(img2img, components, image):
    ref = _quiet(StableDiffusionXLImg2ImgPipeline(**_lcm(components)))
    out = img2img("a cat", image=image, timesteps=[299], generator=_gen(), output_type="np").images
    assert img2img.scheduler.timesteps.tolist() == [299]
    expected = ref(
        "a cat", image=image, strength=1.0, timesteps=[299], guidance_scale=0.0, generator=_gen(), output_type="np"
    ).images
    assert np.abs(out - expected).max() <= PARITY_ATOL
    with pytest.raises(ValueError, match="strength >= 0.4"):
        img2img("a cat", image=image, strength=0.3)
    with pytest.raises(ValueError, match="strength"):
        img2img("a cat", image=image, strength=1.2)


def test_img2img_denoising_start_cuts_the_grid_as_diffusers_does(img2img, components, image):
    seen = []

    def record(pipe, i, t, kwargs):
        seen.append(int(t))
        return kwargs

    latents = torch.randn(1, 4, 8, 8, generator=_gen(7))
    out = img2img(
        "a cat",
        image=latents,
        num_inference_steps=4,
        denoising_start=0.6,
        callback_on_step_end=record,
        generator=_gen(),
        output_type="np",
    ).images
    assert seen == [249]  # the grid below (1 - 0.6) * 1000
    ref = _quiet(StableDiffusionXLImg2ImgPipeline(**_lcm(components)))
    expected = ref(
        "a cat",
        image=latents,
        timesteps=disback_timesteps(4),
        denoising_start=0.6,
        guidance_scale=0.0,
        generator=_gen(),
        output_type="np",
    ).images
    assert np.abs(out - expected).max() <= PARITY_ATOL


# ------------------------------------------------------------------------------------------------------ inpaint


@pytest.mark.parametrize(
    "strength, steps, ref_timesteps, ref_strength",
    [
        # diffusers keeps the last int(len * strength) of its timesteps: [999, 399] at 0.5 keeps [399]
        (0.9999, 1, [999, 399], 0.5),
        (0.5, 1, [999, 399], 0.5),
        (1.0, 1, [399], 1.0),
        (0.5, 4, [999, 749, 499, 249], 0.5),
        (0.9999, 4, [999, 749, 499, 249], 0.9999),  # the default strength: [749, 499, 249] both ways
        (1.0, 4, [999, 749, 499, 249], 1.0),
    ],
)
def test_inpaint_equals_sdxl_inpaint_with_lcm(
    inpaint, components, image, mask, strength, steps, ref_timesteps, ref_strength
):
    ref = _quiet(StableDiffusionXLInpaintPipeline(**_lcm(components)))
    kwargs = dict(image=image, mask_image=mask, output_type="np")
    out = inpaint("a cat", strength=strength, num_inference_steps=steps, generator=_gen(), **kwargs).images
    assert inpaint.scheduler.timesteps.tolist() == disback_editing_timesteps(strength, steps)
    expected = ref(
        "a cat", strength=ref_strength, timesteps=ref_timesteps, guidance_scale=0.0, generator=_gen(), **kwargs
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.abs(out - expected).max() <= PARITY_ATOL


def test_inpaint_strength_zero_returns_the_input_latents_decoded(inpaint, components, image, mask):
    out = inpaint("a cat", image=image, mask_image=mask, strength=0.0, generator=_gen(), output_type="np").images
    with torch.no_grad():
        _, expected = _vae_round_trip(components["vae"], image, _gen())
    assert np.abs(out - expected).max() <= 1e-5


@pytest.mark.parametrize("strength, steps", [(0.5, 1), (0.9999, 1), (1.0, 1), (0.5, 4), (1.0, 4)])
def test_inpaint_keeps_the_unmasked_latents_exactly(inpaint, image, mask, strength, steps):
    kwargs = dict(image=image, mask_image=mask, output_type="latent")
    kept = inpaint("a cat", strength=0.0, generator=_gen(), **kwargs).images  # the input's latents
    out = inpaint("a cat", strength=strength, num_inference_steps=steps, generator=_gen(), **kwargs).images
    assert (out[..., :4] - kept[..., :4]).abs().max().item() == 0.0  # latent columns 0..3: outside the mask
    assert (out[..., 4:] - kept[..., 4:]).abs().mean().item() > 0.1


# Pixels: the VAE decoder mixes all latents (group norms, mid-block attention), so the kept region's pixels move
# when the masked latents change. Measured with the shapes teacher (trained UNet and VAE, 64x64; mask: the
# bottom-right quadrant), mean |output - input| over the kept pixels and channels, in [0, 1]:
#     strength 0 (the VAE's own round trip): 0.024; 0.9999 x 1 step: 0.061; 1.0 x 4 steps: 0.072
# and in the masked region |output - strength-0 output|: 0.071 / 0.157 (outside it: 0.059 / 0.069). Bounds:
KEPT_MEAN_BOUND = 0.15
MASKED_MIN_CHANGE = 0.05


@pytest.fixture(scope="module")
def shapes_inpaint():
    return _quiet(DisBackInpaintPipeline.from_pretrained(SHAPES_TEACHER))


@pytest.mark.parametrize("strength, steps", [(0.9999, 1), (1.0, 4)])
def test_inpaint_keeps_the_unmasked_pixels_close_with_a_trained_vae(shapes_inpaint, strength, steps):
    from diffusers_disback.shapes import Scene, render

    source = render(Scene("blue", "square", "top left", "gray"), seed=0)
    pixels = np.asarray(source, dtype=np.float32) / 255.0
    quadrant = torch.zeros(1, 1, 64, 64)
    quadrant[..., 32:, 32:] = 1.0
    inside = quadrant[0, 0].numpy() > 0
    kwargs = dict(image=source, mask_image=quadrant, output_type="np")
    prompt = "a yellow circle in the bottom right on a gray background"
    untouched = shapes_inpaint(prompt, strength=0.0, generator=_gen(), **kwargs).images[0]
    out = shapes_inpaint(prompt, strength=strength, num_inference_steps=steps, generator=_gen(), **kwargs).images[0]
    assert np.abs(out - pixels)[~inside].mean() <= KEPT_MEAN_BOUND
    assert np.abs(out - untouched)[inside].mean() >= MASKED_MIN_CHANGE
    assert np.abs(out - untouched)[inside].mean() > np.abs(out - untouched)[~inside].mean()


# ------------------------------------------------------------------------------------------------ loading routes


@pytest.fixture(scope="module")
def saved(components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("disback-editing")
    DisBackPipeline(**components).save_pretrained(folder)
    return folder


def _img2img_images(pipe, image):
    return _quiet(pipe)("a cat", image=image, generator=_gen(), output_type="np").images


def _inpaint_images(pipe, image, mask):
    return _quiet(pipe)("a cat", image=image, mask_image=mask, generator=_gen(), output_type="np").images


def test_layout_carries_the_editing_pipelines(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"] == ["diffusers", "LCMScheduler"]
    for name in ("pipeline.py", "pipeline_img2img.py", "pipeline_inpaint.py", "scheduling_disback.py"):
        assert (saved / name).is_file(), name
    import diffusers_disback.pipeline_disback_img2img as package_file

    assert (saved / "pipeline_img2img.py").read_text() == open(package_file.__file__).read()


def test_from_pretrained_and_from_pipe(saved, img2img, inpaint, image, mask):
    expected_i2i = _img2img_images(img2img, image)
    expected_inp = _inpaint_images(inpaint, image, mask)
    t2i = DisBackPipeline.from_pretrained(saved)
    for cls, expected, run in (
        (DisBackImg2ImgPipeline, expected_i2i, lambda p: _img2img_images(p, image)),
        (DisBackInpaintPipeline, expected_inp, lambda p: _inpaint_images(p, image, mask)),
    ):
        loaded = cls.from_pretrained(saved)  # model_index names StableDiffusionXLPipeline and an LCMScheduler
        assert type(loaded) is cls and isinstance(loaded.scheduler, DisBackScheduler)
        np.testing.assert_allclose(run(loaded), expected, atol=PARITY_ATOL)
        shared = cls.from_pipe(t2i)
        assert shared.unet is t2i.unet and shared.vae is t2i.vae
        assert isinstance(shared.scheduler, DisBackScheduler)
        np.testing.assert_allclose(run(shared), expected, atol=PARITY_ATOL)
        # from a plain diffusers pipeline (stock LCMScheduler): the scheduler becomes a DisBackScheduler
        plain = StableDiffusionXLPipeline.from_pretrained(saved)
        from_plain = cls.from_pipe(plain)
        assert isinstance(plain.scheduler, LCMScheduler) and isinstance(from_plain.scheduler, DisBackScheduler)
        np.testing.assert_allclose(run(from_plain), expected, atol=PARITY_ATOL)
        kept = cls.from_pretrained(saved, scheduler=LCMScheduler.from_config(loaded.scheduler.config))
        assert isinstance(kept.scheduler, LCMScheduler)  # a scheduler you pass is kept, and gives the same images
        np.testing.assert_allclose(run(kept), expected, atol=PARITY_ATOL)


def test_editing_pipeline_saves_the_disback_layout(img2img, image, tmp_path):
    expected = _img2img_images(img2img, image)
    img2img.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert (tmp_path / "pipeline_img2img.py").is_file()
    loaded = DisBackImg2ImgPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(_img2img_images(loaded, image), expected, atol=PARITY_ATOL)


def test_remote_code_routes_from_a_folder(saved, img2img, inpaint, image, mask):
    remote_i2i = DiffusionPipeline.from_pretrained(saved, custom_pipeline="pipeline_img2img", trust_remote_code=True)
    remote_inp = DiffusionPipeline.from_pretrained(saved, custom_pipeline="pipeline_inpaint", trust_remote_code=True)
    remote_t2i = DiffusionPipeline.from_pretrained(saved, custom_pipeline=str(saved), trust_remote_code=True)
    assert type(remote_i2i).__name__ == "DisBackImg2ImgPipeline" and type(remote_i2i) is not DisBackImg2ImgPipeline
    assert type(remote_inp).__name__ == "DisBackInpaintPipeline" and type(remote_inp) is not DisBackInpaintPipeline
    assert type(remote_t2i).__name__ == "DisBackPipeline"
    # DiffusionPipeline.from_pretrained builds the class itself (no class-level from_pretrained): the stock
    # LCMScheduler stays, and the explicit DisBack timesteps make it sample the same images
    assert type(remote_i2i.scheduler).__name__ == "LCMScheduler"
    # the file path works as well
    by_path = DiffusionPipeline.from_pretrained(
        saved, custom_pipeline=str(saved / "pipeline_img2img.py"), trust_remote_code=True
    )
    assert type(by_path).__name__ == "DisBackImg2ImgPipeline"
    np.testing.assert_allclose(_img2img_images(remote_i2i, image), _img2img_images(img2img, image), atol=PARITY_ATOL)
    np.testing.assert_allclose(_img2img_images(by_path, image), _img2img_images(img2img, image), atol=PARITY_ATOL)
    np.testing.assert_allclose(
        _inpaint_images(remote_inp, image, mask), _inpaint_images(inpaint, image, mask), atol=PARITY_ATOL
    )


def test_remote_code_route_through_the_hub(hub_server, saved, img2img, image):
    from diffusers_disback.hub import push_folder

    push_folder(saved, "user/disback-editing")
    remote = DiffusionPipeline.from_pretrained(
        "user/disback-editing", custom_pipeline="pipeline_img2img", trust_remote_code=True
    )
    assert type(remote).__name__ == "DisBackImg2ImgPipeline" and type(remote) is not DisBackImg2ImgPipeline
    np.testing.assert_allclose(_img2img_images(remote, image), _img2img_images(img2img, image), atol=PARITY_ATOL)


# ---------------------------------------------------------------------------------------- signatures, LoRA scale


@pytest.mark.parametrize(
    "ours, parent",
    [
        (DisBackPipeline, StableDiffusionXLPipeline),
        (DisBackImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline),
        (DisBackInpaintPipeline, StableDiffusionXLInpaintPipeline),
    ],
)
def test_call_names_every_parent_parameter(ours, parent):
    theirs = inspect.signature(parent.__call__).parameters
    mine = inspect.signature(ours.__call__).parameters
    assert set(theirs) <= set(mine)
    named = [n for n, p in mine.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(theirs) - {"kwargs"} <= set(named)
    # in the parent's order, so positional calls mean the same
    assert [n for n in mine if n in theirs] == list(theirs)
    assert mine["num_inference_steps"].default == 1 and mine["guidance_scale"].default == 0.0


def _add_lora(unet):
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )


@pytest.mark.parametrize("cls", [DisBackPipeline, DisBackImg2ImgPipeline, DisBackInpaintPipeline])
def test_lora_scale_by_name(cls, image, mask):
    pipe = _quiet(cls(**get_sdxl_components("tiny", scheduler="disback")))
    kwargs = {"image": image} if cls is not DisBackPipeline else {}
    if cls is DisBackInpaintPipeline:
        kwargs["mask_image"] = mask

    def run(**extra):
        return pipe("a cat", generator=_gen(), output_type="np", **kwargs, **extra).images

    base = run()
    _add_lora(pipe.unet)
    full = run(cross_attention_kwargs={"scale": 1.0})
    off = run(cross_attention_kwargs={"scale": 0.0})
    half = run(cross_attention_kwargs={"scale": 0.5})
    assert np.abs(off - base).max() <= 1e-5  # scale 0 switches the LoRA off
    assert np.abs(full - base).max() > 1e-3 and np.abs(half - full).max() > 1e-4 and np.abs(half - base).max() > 1e-4


# ------------------------------------------------------------------------------------------------------ ControlNet


def test_controlnet_with_the_disback_unet_and_scheduler(components):
    controlnet = ControlNetModel.from_unet(components["unet"])
    torch.manual_seed(0)
    for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(block.weight, std=0.02)  # the zero convolutions, so the control shows
    pipe = _quiet(StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet))
    assert isinstance(pipe.scheduler, DisBackScheduler)
    control = torch.rand(1, 3, 64, 64, generator=_gen(3))
    run = dict(image=control, timesteps=[399], guidance_scale=0.0, output_type="np")
    out = pipe("a cat", generator=_gen(), **run).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert pipe.scheduler.timesteps.tolist() == [399]
    # without the control it is DisBackPipeline's one-step image; with it, another
    off = pipe("a cat", controlnet_conditioning_scale=0.0, generator=_gen(), **run).images
    t2i = _quiet(DisBackPipeline(**components))("a cat", generator=_gen(), output_type="np").images
    assert np.abs(off - t2i).max() <= PARITY_ATOL
    assert np.abs(out - off).max() > 1e-3
    # the DisBack timesteps come from the scheduler too when none are passed
    run.pop("timesteps")
    np.testing.assert_allclose(
        pipe("a cat", num_inference_steps=1, generator=_gen(), **run).images, out, atol=PARITY_ATOL
    )
    latents = randn_tensor((1, 4, 8, 8), generator=_gen(9))
    four = pipe("a cat", num_inference_steps=4, latents=latents, **{**run, "output_type": "latent"}).images
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249] and four.shape == (1, 4, 8, 8)
