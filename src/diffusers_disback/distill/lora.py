"""Every LoRA helper of the package, in one place: adapters on any `nn.Module` (peft), their parameters and state
dicts, merging them into plain weights, and the trainable-network setup shared by the training script and the
benchmarks (full fine-tuning or an adapter over a frozen base, always with fp32 master weights).

Three adapters are trained: `degradation` (stage 1's degrading score, when path nodes are LoRA), `generator` and
`fake_score` (stage 2's one-GPU mode, `--lora_rank`). Path nodes loaded for backtracking become adapters
`node_1 ... node_N` ([`NodeSwitcher`]).
"""

from __future__ import annotations

import contextlib

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


# -------------------------------------------------------------------------------------------- one shared base


class SharedBase:
    """
    One frozen base module (e.g. the teacher's UNet in the compute dtype) holding named peft LoRA adapters, so that
    the teacher, the path nodes, the fake score and the generator are one set of base weights (docs/training.md,
    "One frozen base"). Each network is a [`view`](SharedBase.view) of it: a set of adapters active on top of the
    base (the empty set is the base itself: the teacher).

    - Adapters are switched by setting each peft tuner layer's active-adapter list, which never touches
      `requires_grad` (peft's `set_adapter` would mark the active adapters trainable and freeze the others); the
      adapters named `trainable` keep `requires_grad=True` throughout, every other adapter and the base stay frozen.
    - A view activates its adapters for its own call and restores the base afterwards, so a plain call of `module`
      is always the teacher.
    - Gradient checkpointing recomputes a block during backward, when another view may be active:
      [`SharedBase.enable_gradient_checkpointing`] makes each recomputation run with the adapters of the forward that
      saved it.

    Several adapters active at once add up (peft sums active adapters): the fake score initialised from the last
    path node is `base + node_N + fake_score`, which is the separate-networks fake score `merge(base, node_N) +
    fake_score` up to floating-point rounding.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.active: tuple[str, ...] = ()
        self.trainable: set[str] = set()
        self._layers: list | None = None

    @property
    def layers(self) -> list:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.module.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    @property
    def adapters(self) -> set[str]:
        """The names of every adapter the base holds."""
        return {name for layer in self.layers for name in layer.lora_A.keys()}

    def add_adapter(self, config, name: str, trainable: bool = False) -> list[torch.nn.Parameter]:
        """Injects adapter `name` (`B = 0`). A trainable adapter gets fp32 master weights (see [`make_trainable`]) and
        is returned as the parameters to optimise; a frozen one stays in the base's dtype (a path node's weights are
        loaded into it)."""
        import warnings

        if name in self.adapters:
            raise ValueError(f"the shared base already holds an adapter named {name!r}")
        with warnings.catch_warnings():  # peft warns on every adapter after the first: that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            add_lora_adapter(self.module, config, adapter_name=name)
        self._layers = None
        if trainable:
            self.trainable.add(name)
        params = lora_parameters(self.module, name)
        if trainable:
            for p in params:
                p.data = p.data.to(torch.float32)
        self._restore_requires_grad()
        self.set_active(self.active)
        return params if trainable else []

    def delete_adapter(self, name: str) -> None:
        """Removes adapter `name` from every layer (e.g. stage 1's degrading adapter once its nodes are saved)."""
        for layer in self.layers:
            if name in layer.lora_A.keys():
                layer.delete_adapter(name)
        self.trainable.discard(name)
        self.active = tuple(a for a in self.active if a != name)
        self._restore_requires_grad()
        self.set_active(self.active)

    def _restore_requires_grad(self) -> None:
        for n, p in self.module.named_parameters():
            p.requires_grad_("lora_" in n and any(f".{a}." in n for a in self.trainable))

    def set_active(self, names: tuple[str, ...]) -> None:
        """Makes exactly `names` active in every tuner layer (the empty tuple: adapters off, the base alone)."""
        names = tuple(names)
        for layer in self.layers:
            present = [n for n in names if n in layer.lora_A.keys()]
            layer._active_adapter = present  # peft's own attribute: set directly so requires_grad stays as it is
            layer._disable_adapters = not present
        self.active = names

    @contextlib.contextmanager
    def using(self, names: tuple[str, ...]):
        """Adapters `names` active inside the block, the previous set restored after it."""
        previous = self.active
        if tuple(names) != previous:
            self.set_active(names)
        try:
            yield
        finally:
            if self.active != previous:
                self.set_active(previous)

    def view(self, *names: str, caller: torch.nn.Module | None = None) -> AdapterView:
        """The network `base + names` as a callable; `caller` is what to call instead of `module` (the module as
        `accelerator.prepare` wrapped it, so DDP sees the trainable pass)."""
        unknown = set(names) - self.adapters
        if unknown:
            raise ValueError(f"the shared base holds no adapter {sorted(unknown)}; it holds {sorted(self.adapters)}")
        return AdapterView(self, tuple(names), caller)

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' gradient checkpointing with the recomputation run under the forward's adapters."""
        from torch.utils.checkpoint import checkpoint

        def checkpoint_with_adapters(block, *args):
            adapters = self.active

            def run(*inputs):
                with self.using(adapters):
                    return block(*inputs)

            return checkpoint(run, *args, use_reentrant=False)

        self.module.enable_gradient_checkpointing(checkpoint_with_adapters)


class AdapterView:
    """One network of a [`SharedBase`]: calling it runs the base with exactly `adapters` active."""

    def __init__(self, shared: SharedBase, adapters: tuple[str, ...], caller: torch.nn.Module | None = None):
        self.shared, self.adapters = shared, adapters
        self.caller = caller if caller is not None else shared.module

    def __call__(self, *args, **kwargs):
        with self.shared.using(self.adapters):
            return self.caller(*args, **kwargs)

    def parameters(self):
        """The base module's parameters (its dtype is the dtype of the view's pass)."""
        return self.shared.module.parameters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of this view's trainable adapters."""
        return [p for a in self.adapters if a in self.shared.trainable for p in lora_parameters(self.shared.module, a)]

    @property
    def config(self):
        return self.shared.module.config

    def __repr__(self) -> str:
        return f"AdapterView(adapters={list(self.adapters)})"
