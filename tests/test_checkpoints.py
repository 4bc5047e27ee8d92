"""Loading raw UNet checkpoints: formats, wrapper prefixes, strictness, bad files."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from diffusers_disback import CheckpointError, DisBackPipeline, load_unet_checkpoint
from diffusers_disback.checkpoints import load_state_dict, strip_wrapper_prefixes
from diffusers_disback.testing import TINY_UNET_CONFIG, get_tiny_unet


@pytest.fixture(scope="module")
def trained_unet():
    return get_tiny_unet(seed=123)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    "prefix", ["", "module.", "feedforward_model.", "_orig_mod.", "module._orig_mod.feedforward_model.", "fake_unet."]
)
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_released_formats_load_strictly(tmp_path, trained_unet, prefix, fmt):
    state = {prefix + k: v.clone() for k, v in trained_unet.state_dict().items()}
    path = tmp_path / f"SDXL_DisBack.{fmt}"
    if fmt == "bin":
        torch.save(state, path)
    else:
        save_file(state, path)
    unet = load_unet_checkpoint(path, config=TINY_UNET_CONFIG)
    _assert_same_weights(unet, trained_unet)
    assert not unet.training


def test_nested_state_dict_container(tmp_path, trained_unet):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in trained_unet.state_dict().items()}}, path)
    _assert_same_weights(load_unet_checkpoint(path, config=TINY_UNET_CONFIG), trained_unet)


def test_config_forms(tmp_path, trained_unet):
    path = tmp_path / "unet.bin"
    torch.save(trained_unet.state_dict(), path)
    trained_unet.save_pretrained(tmp_path / "pipe" / "unet")
    for config in (trained_unet, tmp_path / "pipe" / "unet", tmp_path / "pipe", tmp_path / "pipe/unet/config.json"):
        _assert_same_weights(load_unet_checkpoint(path, config=config), trained_unet)
    with pytest.raises(CheckpointError, match="carries no architecture"):
        load_unet_checkpoint(path)


def test_dtype_cast(tmp_path, trained_unet):
    path = tmp_path / "unet.bin"
    torch.save(trained_unet.state_dict(), path)
    unet = load_unet_checkpoint(path, config=TINY_UNET_CONFIG, torch_dtype=torch.float16)
    assert unet.dtype == torch.float16


def test_missing_and_unexpected_keys_are_named(tmp_path, trained_unet):
    state = dict(trained_unet.state_dict())
    removed = sorted(state)[:3]
    for k in removed:
        del state[k]
    state["discriminator.head.weight"] = torch.zeros(1)
    path = tmp_path / "partial.bin"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_unet_checkpoint(path, config=TINY_UNET_CONFIG)
    msg = str(err.value)
    assert "3 missing keys" in msg and "1 unexpected keys" in msg
    assert all(repr(k) in msg for k in removed) and "'discriminator.head.weight'" in msg


def test_a_different_architecture_is_named(tmp_path, trained_unet):
    path = tmp_path / "unet.bin"
    torch.save(trained_unet.state_dict(), path)
    other = dict(TINY_UNET_CONFIG, cross_attention_dim=48)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_unet_checkpoint(path, config=other)
    many_missing = dict(TINY_UNET_CONFIG, layers_per_block=3)
    with pytest.raises(CheckpointError, match=r"missing keys: .*\(\d+ more\)"):
        load_unet_checkpoint(path, config=many_missing)


def test_prefix_stripping_stops_at_the_expected_keys():
    state = {"model.weight": torch.zeros(1), "model.bias": torch.zeros(1)}
    assert set(strip_wrapper_prefixes(state, expected_keys=state.keys())) == set(state)
    assert set(strip_wrapper_prefixes(state)) == {"weight", "bias"}
    mixed = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert strip_wrapper_prefixes(mixed).keys() == mixed.keys()  # only a prefix every key has


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_file_says_so(tmp_path, trained_unet, fmt):
    path = tmp_path / f"unet.{fmt}"
    state = trained_unet.state_dict()
    torch.save(state, path) if fmt == "bin" else save_file(dict(state), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_unet_checkpoint(path, config=TINY_UNET_CONFIG)


def test_garbage_empty_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state_dict(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(empty)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.bin")
    with pytest.raises(FileNotFoundError, match="owner/repo"):
        load_unet_checkpoint(str(tmp_path / "nope.bin"), config=TINY_UNET_CONFIG)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "with_args.bin"
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        load_state_dict(path)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "mixed.bin"
    torch.save({"w": torch.zeros(1), "step": 10}, path)
    with pytest.raises(CheckpointError, match="non-tensor"):
        load_state_dict(path)


def test_from_unet_checkpoint(tmp_path, trained_unet):
    from diffusers import StableDiffusionXLPipeline

    from diffusers_disback.testing import get_sdxl_components

    base = tmp_path / "base"
    StableDiffusionXLPipeline(**get_sdxl_components("tiny")).save_pretrained(base)
    path = tmp_path / "SDXL_DisBack.bin"
    torch.save({"module." + k: v for k, v in trained_unet.state_dict().items()}, path)
    pipe = DisBackPipeline.from_unet_checkpoint(path, base_model=base)
    _assert_same_weights(pipe.unet, trained_unet)
    assert type(pipe.scheduler).__name__ == "DisBackScheduler"
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
