"""One frozen base holding every LoRA adapter (`SharedBase`): views compute base + their adapters, switching never
changes what trains, gradient checkpointing recomputes under the right adapters, and nodes load as adapters of it."""

import copy

import pytest
import torch

from diffusers_disback.distill import (
    DegradationPath,
    NodeSwitcher,
    SharedBase,
    lora_config,
    lora_parameters,
    make_optimizer,
    merge_lora,
)
from diffusers_disback.distill.config import DisBackConfig
from diffusers_disback.testing import get_tiny_sd3_transformer, get_tiny_unet
from diffusers_disback.training import SD3_LORA_TARGETS, SDXL_LORA_TARGETS, transformer_flow_fn, unet_eps_fn

RANK = 4


def _cond(batch=2):
    return {
        "prompt_embeds": torch.randn(batch, 8, 64, generator=torch.Generator().manual_seed(0)),
        "text_embeds": torch.randn(batch, 32, generator=torch.Generator().manual_seed(1)),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1),
    }


def _inputs(batch=2):
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([500] * batch), _cond(batch)


def _randomise(module, name, seed):
    """Non-zero B (peft starts an adapter at B = 0, the base unchanged)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if f".{name}." in n and "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _shared(*names, trainable=("generator",), family="sdxl"):
    model = get_tiny_sd3_transformer() if family == "sd3" else get_tiny_unet()
    teacher = model.eval().requires_grad_(False)
    reference = copy.deepcopy(teacher)
    shared = SharedBase(teacher)
    targets = SD3_LORA_TARGETS if family == "sd3" else SDXL_LORA_TARGETS
    for i, name in enumerate(names):
        shared.add_adapter(lora_config(RANK, targets), name, trainable=name in trainable)
        _randomise(teacher, name, seed=10 + i)
    return shared, reference


def _sd3_inputs(batch=2):
    """An SD3 transformer's inputs at the tiny config: 16 latent channels, a joint sequence and a pooled vector."""
    config = get_tiny_sd3_transformer().config
    g = torch.Generator().manual_seed(3)
    cond = {
        "prompt_embeds": torch.randn(batch, 6, config.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=g),
    }
    return torch.randn(batch, config.in_channels, 8, 8, generator=g), torch.tensor([0.6] * batch), cond


def test_views_compute_the_base_plus_their_adapters_and_a_plain_call_is_the_base():
    shared, reference = _shared("generator", "node_1", "fake_score")
    x, t, cond = _inputs()
    state = shared.module.state_dict()
    with torch.no_grad():
        base = unet_eps_fn(reference)(x, t, cond)
        for adapters in [(), ("generator",), ("node_1", "fake_score")]:
            merged = copy.deepcopy(reference)
            weights = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
            for a in adapters:  # W + B_a A_a for each active adapter, one after the other
                lora = {k: v for k, v in state.items() if f".{a}." in k}
                weights = merge_lora({**weights, **lora}, a)
            merged.load_state_dict(weights)
            got = unet_eps_fn(shared.view(*adapters))(x, t, cond)
            torch.testing.assert_close(got, unet_eps_fn(merged)(x, t, cond), rtol=1e-5, atol=1e-5)
            if adapters:
                assert (got - base).abs().max() > 1e-3  # the adapters do change the output
            # between views the module is the base alone: the teacher
            torch.testing.assert_close(unet_eps_fn(shared.module)(x, t, cond), base, rtol=0, atol=0)
    assert shared.active == ()


def test_adding_and_switching_adapters_never_changes_what_trains():
    """peft's own `set_adapter` marks the active adapter trainable and freezes the others; the shared base keeps
    exactly the trainable adapters' parameters trainable through every add, switch and delete."""
    shared, _ = _shared("generator", "fake_score", trainable=("generator", "fake_score"))
    module = shared.module

    def trainable():
        return {n.split(".lora_")[1].split(".")[1] for n, p in module.named_parameters() if p.requires_grad}

    assert trainable() == {"generator", "fake_score"}
    for name in ("node_1", "node_2"):
        shared.add_adapter(lora_config(RANK, SDXL_LORA_TARGETS), name)
        assert trainable() == {"generator", "fake_score"}
    x, t, cond = _inputs()
    with torch.no_grad():
        for adapters in [("node_2",), ("generator",), (), ("node_1", "fake_score")]:
            unet_eps_fn(shared.view(*adapters))(x, t, cond)
            assert trainable() == {"generator", "fake_score"}
    shared.delete_adapter("node_1")
    assert shared.adapters == {"generator", "fake_score", "node_2"} and trainable() == {"generator", "fake_score"}
    assert all(p.dtype == torch.float32 for p in lora_parameters(module, "generator"))
    with pytest.raises(ValueError, match="holds no adapter"):
        shared.view("node_1")


def _generator_grads(shared, checkpointing, family="sdxl"):
    """Backward of a generator pass after a fake-score pass ran in between (the DM loss's order)."""
    if checkpointing == "shared":
        shared.enable_gradient_checkpointing()
    elif checkpointing == "plain":  # diffusers' default: recomputes under whatever adapters are active then
        shared.module.enable_gradient_checkpointing()
    x, t, cond = _sd3_inputs() if family == "sd3" else _inputs()
    score_fn = transformer_flow_fn if family == "sd3" else unet_eps_fn
    out = score_fn(shared.view("generator"))(x, t, cond)
    with torch.no_grad():
        score_fn(shared.view("fake_score"))(x, t, cond)
    with shared.using(("fake_score",)):  # another view is active while backward recomputes
        out.square().mean().backward()
    return {n: p.grad.clone() for n, p in shared.module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_gradient_checkpointing_recomputes_under_the_adapters_of_the_forward(family):
    """The UNet's blocks and the SD3 MMDiT's JointTransformerBlocks alike."""
    reference = _generator_grads(_shared("generator", "fake_score", family=family)[0], None, family)
    got = _generator_grads(_shared("generator", "fake_score", family=family)[0], "shared", family)
    assert set(got) == set(reference) and all(".generator." in n for n in got)
    for n in reference:
        torch.testing.assert_close(got[n], reference[n], rtol=1e-5, atol=1e-7, msg=n)
    # the control: diffusers' default checkpointing recomputes the blocks under the fake score's adapter
    try:
        plain = _generator_grads(_shared("generator", "fake_score", family=family)[0], "plain", family)
        wrong = max((plain[n] - reference[n]).abs().max().item() for n in reference)
    except Exception:  # torch's checkpoint may notice the recomputation differs
        wrong = float("inf")
    assert wrong > 1e-4


def test_trained_adapters_are_fp32_masters_on_a_bf16_base_and_move_at_the_sdxl_learning_rate():
    """The one-GPU mode's dtypes: the shared base and the path nodes bf16, the generator's and the fake score's
    adapters fp32, so AdamW steps of lr 5e-7 move them; only the updated adapter moves."""
    teacher = get_tiny_unet().to(torch.bfloat16).eval().requires_grad_(False)
    shared = SharedBase(teacher)
    config = lora_config(RANK, SDXL_LORA_TARGETS)
    params = shared.add_adapter(config, "generator", trainable=True)
    shared.add_adapter(config, "fake_score", trainable=True)
    shared.add_adapter(config, "node_1")
    _randomise(teacher, "node_1", seed=3)
    dtypes = {}
    for n, p in teacher.named_parameters():
        dtypes.setdefault("base" if "lora_" not in n else n.split(".lora_")[1].split(".")[1], set()).add(p.dtype)
    assert dtypes == {"base": {torch.bfloat16}, "node_1": {torch.bfloat16}, "generator": {torch.float32},
                      "fake_score": {torch.float32}}  # fmt: skip
    before = {n: p.detach().clone() for n, p in teacher.named_parameters() if "lora_" in n}
    optimizer = make_optimizer(params, 5e-7, DisBackConfig())
    x, t, cond = _inputs()
    for _ in range(5):  # lora_A has no gradient while B = 0: it moves from the second step on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = unet_eps_fn(shared.view("node_1", "generator"))(x, t, cond).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = {n: (p != before[n]).float().mean().item() for n, p in teacher.named_parameters() if "lora_" in n}
    generator_a = [v for n, v in moved.items() if ".generator." in n and "lora_A" in n]
    assert sum(generator_a) / len(generator_a) > 0.9  # fp32 masters: nearly every entry moved
    assert all(v == 0 for n, v in moved.items() if ".generator." not in n)  # the others did not


def test_lora_nodes_load_as_adapters_of_a_shared_base_and_close_removes_them(tmp_path):
    teacher = get_tiny_unet().eval().requires_grad_(False)
    config = lora_config(RANK, SDXL_LORA_TARGETS)
    path = DegradationPath.create(tmp_path, teacher, kind="lora", lora_config=config)
    degrading = copy.deepcopy(teacher)
    recording = SharedBase(degrading)
    recording.add_adapter(config, "degradation", trainable=True)
    for step, seed in ((2, 5), (4, 6)):
        _randomise(degrading, "degradation", seed)
        state = {k.replace(".degradation.", "."): v for k, v in degrading.state_dict().items() if ".degradation." in k}
        path.add_node(state, step)
    x, t, cond = _inputs()
    shared = SharedBase(teacher)
    shared.add_adapter(config, "generator", trainable=True)
    switcher = NodeSwitcher(DegradationPath.load(tmp_path), shared, teacher=teacher)
    assert shared.adapters == {"generator", "node_1", "node_2"}
    with torch.no_grad():
        _randomise(degrading, "degradation", 6)
        expected = unet_eps_fn(recording.view("degradation"))(x, t, cond)
        torch.testing.assert_close(unet_eps_fn(switcher.activate(2))(x, t, cond), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(unet_eps_fn(switcher.activate(0))(x, t, cond), unet_eps_fn(teacher)(x, t, cond))
    switcher.close()
    assert shared.adapters == {"generator"} and shared.trainable == {"generator"}


def test_memory_accounting_at_the_sdxl_configuration(tmp_path):
    """benchmarks/memory.py on the meta device: the shared-base LoRA mode holds at most 12 GiB between iterations at
    the SDXL configuration (rank 64, 10 nodes, bf16), less than half of the separate networks; its adapter counts are
    the peft adapters' own (r * (in + out) per targeted Linear)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import memory

    held, n, _ = memory.main(["--no_activations", "--report", str(tmp_path / "memory.md")])
    total = {mode: sum(b for _, b in stages["stage 2"]) / 2**30 for mode, stages in held.items()}
    assert total["lora, shared"] <= 12 and total["lora, separate"] > 2 * total["lora, shared"]
    assert 2.56e9 < n["unet"] < 2.58e9  # SDXL's UNet
    with torch.device("meta"):
        unet = memory.get_sdxl_models("sdxl")["unet"]
    targets = [m for name, m in unet.named_modules() if name.endswith(tuple(SDXL_LORA_TARGETS))]
    assert n["adapter"] == sum(64 * (m.in_features + m.out_features) for m in targets)
