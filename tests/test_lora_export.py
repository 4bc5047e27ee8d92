"""`disback export-lora`: a DisBack generator as a LoRA that `load_lora_weights` puts on SDXL models (docs/lora.md).

Tiny SDXL components, fp32, CPU. A "generator" is the base plus a known weight difference, so what the LoRA should
reproduce is known exactly.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from huggingface_hub import list_repo_files
from safetensors.torch import load_file
from torch import nn

from diffusers_disback import DisBackPipeline, DisBackScheduler
from diffusers_disback.cli import main
from diffusers_disback.lora_export import (
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    compare_one_step,
    export_lora,
    extract_lora,
    save_lora,
)
from diffusers_disback.testing import get_sdxl_components

PROMPTS = ["a cat", "a red circle"]
BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")


pytestmark = pytest.mark.usefixtures("one_thread")


def _pipe(components, unet):
    pipe = DisBackPipeline(**{**components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _perturb(unet, seed, low_rank=2, noise=0.0005, where=None, biases=False):
    """A copy of `unet` whose Linear/Conv2d weights (in modules whose name passes `where`) moved by a rank-`low_rank`
    difference plus small full-rank noise (and its biases by noise if asked)."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(unet)
    for name, m in out.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (where is None or where(name)):
            rows, cols = m.weight.shape[0], m.weight[0].numel()
            u, v = torch.randn(rows, low_rank, generator=g), torch.randn(low_rank, cols, generator=g)
            delta = 0.05 * (u @ v) / cols**0.5 + noise * torch.randn(rows, cols, generator=g)
            m.weight += delta.reshape(m.weight.shape)
            if biases and m.bias is not None:
                m.bias += 0.01 * torch.randn(m.bias.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base pipeline and a full "generator" saved as folders, as `export_lora` reads them."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    components = get_sdxl_components("tiny")
    components["scheduler"] = DisBackScheduler()
    base = components["unet"]
    generator = _perturb(base, 1)
    _pipe(components, base).save_pretrained(root / "base")
    _pipe(components, generator).save_pretrained(root / "generator")
    return root, components, base, generator


def test_full_rank_is_exact_and_error_falls_with_rank(world, tmp_path):
    root, components, base, generator = world
    full = export_lora(root / "generator", tmp_path / "full", base_model=str(root / "base"), energy=1.0,
                       check_prompts=PROMPTS)  # fmt: skip
    assert full.source == "svd" and full.not_representable == {}
    assert max(layer.relative_error for layer in full.layers) < 1e-5
    assert full.one_step_difference["max_abs"] < 1e-5  # base + LoRA = the generator, one step, images in [0, 1]
    errors = {}
    for rank in (1, 2, 4):
        r = export_lora(root / "generator", tmp_path / f"r{rank}", base_model=str(root / "base"), rank=rank,
                        kohya=False, check_prompts=PROMPTS)  # fmt: skip
        assert all(layer.rank == min(rank, min(layer.shape[0], int(np.prod(layer.shape[1:])))) for layer in r.layers)
        errors[rank] = (
            np.median([x.relative_error for x in r.layers]),
            r.one_step_difference["max_abs"],
            r.size_bytes,
        )
    # the difference is rank 2 plus noise: rank 2 captures almost all of it, rank 1 about half
    assert errors[1][0] > 0.4 and errors[2][0] < 0.15 and errors[4][0] < errors[2][0]
    assert errors[1][1] > 2 * errors[2][1] and errors[4][1] < 1.1 * errors[2][1]  # mean |image difference|
    assert errors[4][1] > full.one_step_difference["mean_abs"]
    assert errors[1][2] < errors[2][2] < errors[4][2] < full.size_bytes
    report = json.loads((tmp_path / "r2" / "lora_export.json").read_text())
    assert report["summary"]["rank_max"] == 2 and report["settings"]["rank"] == 2


def test_rank_is_capped_by_the_difference_it_factors(world):
    _, _, base, _ = world
    exactly_rank_2 = _perturb(base, 5, low_rank=2, noise=0.0)
    _, layers, _ = extract_lora(exactly_rank_2, base, rank=64)
    assert {layer.rank for layer in layers} <= {1, 2} and max(layer.relative_error for layer in layers) < 1e-3


def test_energy_picks_the_rank_per_layer(world):
    _, _, base, generator = world
    _, layers, _ = extract_lora(generator, base, energy=0.9)
    assert {layer.rank for layer in layers} <= {1, 2, 3}  # 0.9 of a rank-2-plus-noise difference
    assert all(layer.relative_error <= 0.9**-0.5 * (1 - 0.9) ** 0.5 + 1e-6 for layer in layers)
    with pytest.raises(ValueError, match="exactly one of rank"):
        extract_lora(generator, base)
    with pytest.raises(ValueError, match="energy must be in"):
        extract_lora(generator, base, energy=1.5)


def test_biases_are_reported_or_carried(world, tmp_path):
    _, components, base, _ = world
    generator = _perturb(base, 2, biases=True)
    _, _, lost = extract_lora(generator, base, energy=1.0)
    assert lost and all(k.endswith(".bias") for k in lost)
    state, _, lost = extract_lora(generator, base, energy=1.0, biases=True)
    assert lost == {}
    save_lora(state, tmp_path / "lora", kohya=False)
    pipe = _pipe(components, copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="disback")
    assert compare_one_step(_pipe(components, generator), pipe, PROMPTS)["max_abs"] < 1e-5


def test_fuse_unfuse_round_trip(world, tmp_path):
    root, components, base, generator = world
    export_lora(root / "generator", tmp_path / "lora", base_model=str(root / "base"), energy=1.0, kohya=False)
    pipe = _pipe(components, copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHTS_NAME, adapter_name="disback")
    reference = _pipe(components, generator)
    assert compare_one_step(reference, pipe, PROMPTS)["max_abs"] < 1e-5
    pipe.fuse_lora(lora_scale=1.0)
    assert compare_one_step(reference, pipe, PROMPTS)["max_abs"] < 1e-5
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert compare_one_step(_pipe(components, base), pipe, PROMPTS)["max_abs"] < 1e-5
    assert not any("lora" in k for k in pipe.unet.state_dict())


def test_a_lora_from_one_base_on_another_fine_tune(world, tmp_path):
    """Applied to a different model of the same architecture, the fused LoRA adds the generator's difference to that
    model's weights."""
    root, components, base, generator = world
    export_lora(root / "generator", tmp_path / "lora", base_model=str(root / "base"), energy=1.0, kohya=False)
    fine_tune = _perturb(base, 7, low_rank=3)
    pipe = _pipe(components, copy.deepcopy(fine_tune))
    pipe.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHTS_NAME, adapter_name="disback")
    image = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(image).all()
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    expected = fine_tune.state_dict()[name] + 0.5 * (generator.state_dict()[name] - base.state_dict()[name])
    torch.testing.assert_close(pipe.unet.state_dict()[name], expected, rtol=0, atol=1e-5)


def test_the_kohya_file_reads_back_through_diffusers(world, tmp_path):
    """The kohya-style file holds the block layers; diffusers' own reader turns it back into the same LoRA."""
    root, components, base, _ = world
    generator = _perturb(base, 3, where=lambda name: name.startswith(BLOCKS))
    _pipe(components, generator).save_pretrained(tmp_path / "blocks_generator")
    result = export_lora(tmp_path / "blocks_generator", tmp_path / "lora", base_model=str(root / "base"), energy=1.0)
    assert result.kohya_file == KOHYA_WEIGHTS_NAME and result.kohya_left_out == []
    keys = load_file(tmp_path / "lora" / KOHYA_WEIGHTS_NAME).keys()
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    pipe = _pipe(components, copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path / "lora", weight_name=KOHYA_WEIGHTS_NAME, adapter_name="kohya")
    assert compare_one_step(_pipe(components, generator), pipe, PROMPTS)["max_abs"] < 1e-5


def test_plain_diffusers_samples_the_card_snippet(world, tmp_path):
    """The model card's route: stock StableDiffusionXLPipeline + LCMScheduler + load_lora_weights, timesteps=[399]."""
    from diffusers import LCMScheduler

    root, components, base, generator = world
    export_lora(root / "generator", tmp_path / "lora", base_model=str(root / "base"), energy=1.0, kohya=False)
    plain = StableDiffusionXLPipeline(**{**components, "unet": copy.deepcopy(base)})
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config, original_inference_steps=1000)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(tmp_path / "lora", adapter_name="disback")
    plain.set_adapters(["disback"], adapter_weights=[1.0])
    ours = _pipe(components, generator)
    diff = compare_one_step(ours, plain, PROMPTS, timesteps=[399], guidance_scale=0.0)
    assert diff["max_abs"] < 1e-4


def test_cli_export_lora_writes_a_card_and_pushes_its_own_repo(world, hub_server, tmp_path, capsys):
    root, *_ = world
    out = tmp_path / "lora"
    rc = main(["export-lora", str(root / "generator"), "--output", str(out), "--base-model", str(root / "base"),
               "--rank", "2", "--check-prompt", "a cat", "--device", "cpu", "--push-to-hub", "user/disback-lora"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank_max: 2" in printed and "one_step_max_abs:" in printed
    card = (out / "README.md").read_text()
    assert "## Use on your own SDXL model" in card and 'load_lora_weights("user/disback-lora"' in card
    assert "timesteps=[399]" in card and "rank 2 for every layer" in card
    files = set(list_repo_files("user/disback-lora"))
    assert {LORA_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, "README.md", "lora_export.json"} <= files
    # a full fine-tune without a base is an error that says what to give
    assert main(["export-lora", str(root / "generator"), "--output", str(tmp_path / "x")]) == 2
    assert "--base-model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not both"):
        main(["export-lora", str(root / "generator"), "--output", str(tmp_path / "y"), "--base-model",
              str(root / "base"), "--rank", "2", "--energy", "0.9"])  # fmt: skip
    assert not os.path.exists(tmp_path / "y")
