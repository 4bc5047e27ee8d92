"""`disback convert | generate` end to end on a tiny teacher."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from diffusers_disback import DisBackPipeline
from diffusers_disback.cli import build_parser, main
from diffusers_disback.testing import get_sdxl_components, get_tiny_unet


@pytest.fixture(scope="module")
def base_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    StableDiffusionXLPipeline(**get_sdxl_components("tiny")).save_pretrained(root / "base")
    unet = get_tiny_unet(seed=7)
    torch.save({"feedforward_model." + k: v for k, v in unet.state_dict().items()}, root / "dmd2_unet.bin")
    return root, unet


def test_convert_writes_a_loadable_pipeline_with_card(base_and_checkpoint, tmp_path):
    root, unet = base_and_checkpoint
    out = tmp_path / "converted"
    rc = main(["convert", str(root / "dmd2_unet.bin"), "--base-model", str(root / "base"), "--output", str(out)])
    assert rc == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "library_name: diffusers" in card and "disback" in card
    assert (out / "samples.png").is_file()
    pipe = DisBackPipeline.from_pretrained(out)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[k], v, rtol=0, atol=0)


def test_convert_unet_only_with_fp16_variant(base_and_checkpoint, tmp_path):
    root, unet = base_and_checkpoint
    out = tmp_path / "unet_only"
    args = ["convert", str(root / "dmd2_unet.bin"), "--base-model", str(root / "base"), "--output", str(out)]
    assert main(args + ["--unet-only", "--fp16-variant", "--no-samples"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "unet"]
    loaded = UNet2DConditionModel.from_pretrained(out, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    assert loaded.dtype == torch.float16
    pipe = DisBackPipeline.from_pretrained(root / "base", unet=UNet2DConditionModel.from_pretrained(out / "unet"))
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_convert_bad_checkpoint_is_an_error_not_a_traceback(base_and_checkpoint, tmp_path, capsys):
    root, _ = base_and_checkpoint
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 100)
    rc = main(["convert", str(bad), "--base-model", str(root / "base"), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate(base_and_checkpoint, tmp_path):
    root, _ = base_and_checkpoint
    out = tmp_path / "converted"
    main(["convert", str(root / "dmd2_unet.bin"), "--base-model", str(root / "base"), "--output", str(out)])
    png = tmp_path / "img.png"
    assert main(["generate", str(out), "a cat", "--output", str(png), "--device", "cpu", "--seed", "3"]) == 0
    image = np.asarray(Image.open(png))
    pipe = DisBackPipeline.from_pretrained(out)
    expected = pipe("a cat", generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(image / 255.0 - expected).max() <= 1 / 255 + 1e-6


def test_help_lists_the_commands():
    text = build_parser().format_help()
    assert all(cmd in text for cmd in ("generate", "convert", "push"))


def test_a_model_that_is_neither_a_folder_nor_a_repo_id_says_so(tmp_path, capsys):
    missing = str(tmp_path / "no-such-folder")
    for args in (["generate", missing, "x"], ["evaluate", missing, "--output", str(tmp_path / "e")]):
        with pytest.raises(SystemExit, match="no such file or folder exists here, and it is not a Hub repo id"):
            main(args)
    with pytest.raises(SystemExit, match="not a folder here"):
        main(["push", missing, "owner/name"])


def test_a_corrupt_pickle_is_called_corrupt_without_unsafe_advice(tmp_path):
    from diffusers_disback.checkpoints import CheckpointError, load_state_dict

    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"garbage\x80\x02notapickle")
    with pytest.raises(CheckpointError) as err:
        load_state_dict(bad)
    assert "corrupt" in str(err.value) and "weights_only" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # torch's hint is not chained either
