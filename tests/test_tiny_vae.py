"""Fast preview decode: diffusers' `AutoencoderTiny` (the TAESD-XL layout: 4 latent channels, 8x, scaling factor 1)
with every DisBack pipeline, the Hub-loaded ones included (docs/inference.md, "Faster decoding").

A small untrained `AutoencoderTiny` of that layout stands in for madebyollin/taesdxl (no downloads here): what is
checked is that each pipeline decodes (and, for editing, encodes) through it, the way the real one would be used.
"""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline
from PIL import Image

from diffusers_disback import DisBackImg2ImgPipeline, DisBackInpaintPipeline, DisBackPipeline
from diffusers_disback.hub import push_pipeline
from diffusers_disback.testing import get_sdxl_components, get_tiny_taesd

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    p = DisBackPipeline(**get_sdxl_components("tiny", scheduler="disback"))
    p.set_progress_bar_config(disable=True)
    return p


def _gen():
    return torch.Generator().manual_seed(0)


@torch.no_grad()
def _decoded_by_tiny(p, tiny, **kwargs):
    """The pipeline's latents, decoded by `tiny` directly, as [0, 1] HWC arrays."""
    latents = p("a cat", generator=_gen(), output_type="latent", **kwargs).images
    image = tiny.decode(latents / tiny.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()


def test_text_to_image_decodes_through_the_tiny_vae(pipe):
    tiny = get_tiny_taesd()
    assert tiny.config.scaling_factor == 1.0 and tiny.config.latent_channels == 4
    fast = DisBackPipeline(**{**pipe.components, "vae": tiny})
    fast.set_progress_bar_config(disable=True)
    images = fast("a cat", generator=_gen(), output_type="np").images
    np.testing.assert_allclose(images, _decoded_by_tiny(fast, tiny), atol=1e-5)
    full = pipe("a cat", generator=_gen(), output_type="np").images
    assert images.shape == full.shape and np.abs(images - full).max() > 0.01  # another decoder was used


def test_editing_pipelines_encode_and_decode_through_it(pipe):
    tiny = get_tiny_taesd()
    source = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), ((0, 32), (0, 32))))
    for cls, extra in ((DisBackImg2ImgPipeline, {}), (DisBackInpaintPipeline, {"mask_image": mask})):
        edit = cls.from_pipe(pipe, vae=tiny)
        edit.set_progress_bar_config(disable=True)
        assert edit.vae is tiny
        out = edit("a cat", image=source, generator=_gen(), output_type="np", **extra).images
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
        kept = edit("a cat", image=source, strength=0.0, generator=_gen(), output_type="np").images
        assert kept.shape == (1, 64, 64, 3)


def test_hub_loaded_pipelines_take_the_tiny_vae(hub_server, pipe, tmp_path):
    push_pipeline(pipe, "user/disback-taesd", save_directory=tmp_path / "folder", sample_prompts=None)
    tiny = get_tiny_taesd()
    tiny.save_pretrained(tmp_path / "taesdxl")
    loaded_tiny = AutoencoderTiny.from_pretrained(tmp_path / "taesdxl")
    routes = {
        "ours": DisBackPipeline.from_pretrained("user/disback-taesd", vae=loaded_tiny),
        "remote": DiffusionPipeline.from_pretrained(
            "user/disback-taesd", custom_pipeline="user/disback-taesd", trust_remote_code=True, vae=loaded_tiny
        ),
        "img2img": DisBackImg2ImgPipeline.from_pretrained("user/disback-taesd", vae=loaded_tiny),
    }
    expected = _decoded_by_tiny(routes["ours"], loaded_tiny)
    for name, p in routes.items():
        p.set_progress_bar_config(disable=True)
        assert isinstance(p.vae, AutoencoderTiny), name
        if name != "img2img":
            got = p("a cat", generator=_gen(), output_type="np").images
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)
    # img2img at strength 1 is text-to-image: the same image through the same tiny decoder
    source = Image.new("RGB", (64, 64), (128, 64, 32))
    got = routes["img2img"]("a cat", image=source, strength=1.0, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(got, expected, atol=1e-5)
