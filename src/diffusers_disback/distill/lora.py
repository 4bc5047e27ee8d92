"""Every LoRA helper of the package, in one place: adapters on any `nn.Module` (peft), their parameters and state
dicts, merging them into plain weights, and the trainable-network setup shared by the training script and the
benchmarks (full fine-tuning or an adapter over a frozen base, always with fp32 master weights).

Three adapters are trained: `degradation` (stage 1's degrading score, when path nodes are LoRA), `generator` and
`fake_score` (stage 2's one-GPU mode, `--lora_rank`). Path nodes loaded for backtracking become adapters
`node_1 ... node_N` ([`NodeSwitcher`]).
"""

from __future__ import annotations

import torch

LORA_ADAPTER = "degradation"
GENERATOR_ADAPTER = "generator"
FAKE_SCORE_ADAPTER = "fake_score"


def lora_config(rank: int, target_modules: list[str], lora_alpha: int | None = None):
    """A peft `LoraConfig` of `rank` on `target_modules`; `lora_alpha = rank` (scaling 1) unless given."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=lora_alpha or rank, target_modules=list(target_modules))


def add_lora_adapter(model: torch.nn.Module, config, adapter_name: str = LORA_ADAPTER) -> torch.nn.Module:
    """Injects a trainable peft LoRA adapter into any `nn.Module` (`B = 0`: the model is unchanged until trained)."""
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(config, model, adapter_name=adapter_name)


def lora_parameters(model: torch.nn.Module, adapter_name: str = LORA_ADAPTER) -> list[torch.nn.Parameter]:
    """The parameters of one LoRA adapter (to hand to the optimizer); the rest of the model stays frozen."""
    return [p for n, p in model.named_parameters() if f".{adapter_name}." in n and "lora_" in n]


def lora_state_dict(full_state: dict[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """One adapter's weights, keyed as peft saves them (`...lora_A.weight`), from a gathered full state dict."""
    return {
        k.replace(f".{adapter_name}.", "."): v
        for k, v in full_state.items()
        if "lora_" in k and f".{adapter_name}." in k
    }


def merge_lora(
    state: dict[str, torch.Tensor], adapter_name: str | None = None, scaling: float = 1.0
) -> dict[str, torch.Tensor]:
    """
    Plain weights from a state dict that holds LoRA pairs on Linear layers: `W + scaling * B @ A` for every
    `X.lora_A.weight` / `X.lora_B.weight` (peft's `.base_layer.` and `.{adapter_name}.` infixes are dropped first;
    `scaling` is `lora_alpha / r`). Merged weights are float32. Works on gathered state dicts, so also after FSDP.
    """
    normalised = {}
    for key, value in state.items():
        key = key.replace(".base_layer.", ".")
        if adapter_name:
            key = key.replace(f".{adapter_name}.", ".")
        normalised[key] = value
    out = {k: v for k, v in normalised.items() if "lora_" not in k}
    for key, a in normalised.items():
        if key.endswith(".lora_A.weight"):
            prefix = key[: -len(".lora_A.weight")]
            b = normalised[f"{prefix}.lora_B.weight"]
            out[f"{prefix}.weight"] = out[f"{prefix}.weight"].float() + scaling * (b.float() @ a.float())
    return out


def make_trainable(
    model: torch.nn.Module,
    config=None,
    weight_dtype: torch.dtype = torch.float32,
    adapter_name: str = LORA_ADAPTER,
    gradient_checkpointing: bool = False,
) -> list[torch.nn.Parameter]:
    """
    Full fine-tuning (`config=None`), or a LoRA adapter (`config`, see [`lora_config`]) over a frozen base held in
    `weight_dtype` (the one-GPU mode). Returns the parameters to optimise, always fp32 master weights: peft creates
    an adapter in its base layer's dtype, and AdamW steps of lr 5e-7 on bf16 weights of size ~0.1 round away
    (docs/method.md, "Differences from the reference code").
    """
    if config is not None:
        model.requires_grad_(False).to(weight_dtype)
        add_lora_adapter(model, config, adapter_name=adapter_name)
        params = lora_parameters(model, adapter_name)
    else:
        model.requires_grad_(True)
        params = list(model.parameters())
    for p in params:
        p.data = p.data.to(torch.float32)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    return params
