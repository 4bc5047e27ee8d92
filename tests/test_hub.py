"""Hub round trips through the loopback server: push, then load by repo id three ways; failed pushes."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import hf_hub_download, list_repo_files

from diffusers_disback import DisBackPipeline, load_unet_checkpoint
from diffusers_disback.cli import main as cli_main
from diffusers_disback.hub import HubPushError, make_model_card, push_folder, push_pipeline
from diffusers_disback.testing import TINY_UNET_CONFIG, get_sdxl_components, get_tiny_unet


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    p = DisBackPipeline(**get_sdxl_components("tiny", scheduler="disback"))
    p.set_progress_bar_config(disable=True)
    return p


def _images(p, **kwargs):
    p.set_progress_bar_config(disable=True)
    return p("a cat", generator=_gen(), output_type="np", **kwargs).images


def test_push_then_load_three_ways(hub_server, pipe, tmp_path):
    expected = _images(pipe)
    url = push_pipeline(
        pipe,
        "user/disback-tiny",
        save_directory=tmp_path / "folder",
        base_model="stabilityai/stable-diffusion-xl-base-1.0",
        training={"stage": "all", "num_path_nodes": 10, "hub_token": "hf_secret"},
        sample_prompts=["a cat", "a dog"],
        fp16_variant=True,
    )
    assert "user/disback-tiny" in url
    files = set(list_repo_files("user/disback-tiny"))
    assert {"model_index.json", "pipeline.py", "scheduling_disback.py", "pipeline_utils_disback.py"} <= files
    assert {"pipeline_img2img.py", "pipeline_inpaint.py", "README.md", "samples.png"} <= files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files

    ours = DisBackPipeline.from_pretrained("user/disback-tiny")
    plain = StableDiffusionXLPipeline.from_pretrained("user/disback-tiny")
    remote = DiffusionPipeline.from_pretrained(
        "user/disback-tiny", custom_pipeline="user/disback-tiny", trust_remote_code=True
    )
    assert type(ours.scheduler).__name__ == "DisBackScheduler"
    assert type(plain) is StableDiffusionXLPipeline
    assert type(remote).__name__ == "DisBackPipeline" and type(remote) is not DisBackPipeline
    a = _images(ours)
    b = _images(plain, timesteps=[399], guidance_scale=0.0)
    c = _images(remote)
    for got in (a, b, c):
        assert np.abs(got - expected).max() <= 1e-5

    card = open(hf_hub_download("user/disback-tiny", "README.md"), encoding="utf-8").read()
    for needle in (
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "base_model: stabilityai/stable-diffusion-xl-base-1.0",
        "- disback",
        "- one-step",
        'custom_pipeline="user/disback-tiny", trust_remote_code=True',
        "timesteps=[399], guidance_scale=0",
        'DisBackPipeline.from_pretrained("user/disback-tiny"',
        "![samples](samples.png)",
        "| num_path_nodes | 10 |",
    ):
        assert needle in card, needle
    assert "hf_secret" not in card and "hub_token" not in card


def test_save_pretrained_push_to_hub(hub_server, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "f", push_to_hub=True, repo_id="user/disback-save-push")
    assert "README.md" in list_repo_files("user/disback-save-push")
    out = _images(DisBackPipeline.from_pretrained("user/disback-save-push"))
    assert np.abs(out - _images(pipe)).max() <= 1e-5


def test_unet_only_repo(hub_server, pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "base")
    push_folder(tmp_path / "base", "user/tiny-base")
    push_pipeline(pipe, "user/disback-unet", kind="unet", base_model="user/tiny-base", sample_prompts=None)
    assert {f.split("/")[0] for f in list_repo_files("user/disback-unet")} == {".gitattributes", "README.md", "unet"}
    unet = UNet2DConditionModel.from_pretrained("user/disback-unet", subfolder="unet")
    loaded = DisBackPipeline.from_pretrained("user/tiny-base", unet=unet)
    assert np.abs(_images(loaded) - _images(pipe)).max() <= 1e-5
    card = open(hf_hub_download("user/disback-unet", "README.md"), encoding="utf-8").read()
    assert 'from_pretrained("user/disback-unet", subfolder="unet"' in card and "base_model: user/tiny-base" in card


def test_push_that_fails_midway_leaves_repo_and_folder_intact(hub_server, pipe, tmp_path):
    folder = tmp_path / "f"
    push_pipeline(pipe, "user/disback-fail", save_directory=folder, sample_prompts=None)
    head = hub_server.head("user/disback-fail")
    before = hub_server.files("user/disback-fail")

    # change the weights, then every commit of the next push fails after the LFS uploads went through
    changed = DisBackPipeline(**{**pipe.components, "unet": get_tiny_unet(seed=5)})
    hub_server.reset_counts()
    hub_server.fail_next("commit", times=4, status=500)
    with pytest.raises(HubPushError, match="local folder is intact") as err:
        push_pipeline(changed, "user/disback-fail", save_directory=folder, sample_prompts=None, retry_wait=0.01)
    assert str(folder) in str(err.value)
    assert hub_server.count("commit") == 4  # 1 try + 3 retries
    assert hub_server.count("lfs_upload") >= 1  # it did fail midway
    assert hub_server.head("user/disback-fail") == head and hub_server.files("user/disback-fail") == before
    local = DisBackPipeline.from_pretrained(folder)  # the local copy is complete
    assert np.abs(_images(local) - _images(changed)).max() <= 1e-5

    # the same folder pushes once the server is back
    push_folder(folder, "user/disback-fail")
    assert hub_server.head("user/disback-fail") != head
    fresh = DisBackPipeline.from_pretrained("user/disback-fail", force_download=True)
    assert np.abs(_images(fresh) - _images(changed)).max() <= 1e-5


def test_transient_failure_is_retried_and_auth_failure_is_not(hub_server, pipe, tmp_path):
    folder = tmp_path / "f"
    pipe.save_pretrained(folder)
    hub_server.reset_counts()
    hub_server.fail_next("commit", times=1, status=503)
    push_folder(folder, "user/disback-retry", retry_wait=0.01)
    assert hub_server.count("commit") == 2
    assert "model_index.json" in list_repo_files("user/disback-retry")

    hub_server.reset_counts()
    hub_server.fail_next("commit", times=1, status=403)
    (folder / "extra.txt").write_text("x")
    with pytest.raises(HubPushError, match="1 attempt"):
        push_folder(folder, "user/disback-retry", retry_wait=0.01)
    assert hub_server.count("commit") == 1


def test_convert_push_and_hub_checkpoint(hub_server, pipe, tmp_path):
    unet = get_tiny_unet(seed=11)
    ckpt = tmp_path / "SDXL_DisBack.bin"
    torch.save({"module." + k: v for k, v in unet.state_dict().items()}, ckpt)
    push_folder(tmp_path, "user/raw-checkpoints", commit_message="raw")
    from_hub = load_unet_checkpoint("user/raw-checkpoints/SDXL_DisBack.bin", config=TINY_UNET_CONFIG)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(from_hub.state_dict()[k], v, rtol=0, atol=0)

    pipe.save_pretrained(tmp_path / "base")
    out = tmp_path / "converted"
    rc = cli_main(
        ["convert", str(ckpt), "--base-model", str(tmp_path / "base"), "--output", str(out)]
        + ["--push-to-hub", "user/disback-converted", "--no-samples"]
    )
    assert rc == 0
    loaded = DisBackPipeline.from_pretrained("user/disback-converted")
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[k], v, rtol=0, atol=0)


def test_card_metadata_parses():
    card = make_model_card("user/x", base_model="user/base", training={"steps": 3})
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["base_model"] == "user/base" and "disback" in data["tags"] and data["license"] == "openrail++"
    assert json.loads(json.dumps(data))  # serialisable


def test_card_tells_how_to_use_it_as_a_lora_and_for_editing():
    card = make_model_card("user/x", base_model="user/base").text
    assert "disback export-lora user/x --output disback-lora --base-model user/base" in card
    assert "adapter_weights=[1.0]" in card and "timesteps=[399]" in card
    assert 'custom_pipeline="pipeline_img2img"' in card
    unet_only = make_model_card("user/x", base_model="user/base", kind="unet").text
    assert "disback export-lora" in unet_only and "pipeline_img2img" not in unet_only  # no pipeline files there


def test_append_card_section_adds_a_table_to_the_card(tmp_path):
    from diffusers_disback.hub import append_card_section

    make_model_card("me/model").save(str(tmp_path / "README.md"))
    path = append_card_section(tmp_path, "Evaluation: the shapes judge", {"accuracy": 0.79166, "images": 144}, "n")
    text = open(path, encoding="utf-8").read()
    assert text.rstrip().endswith("| accuracy | 0.792 |\n| images | 144 |\n\nn")
    assert text.count("## Evaluation: the shapes judge") == 1 and text.startswith("---")
