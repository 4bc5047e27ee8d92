#!/usr/bin/env python
"""What a training run holds in accelerator memory, counted without a GPU (docs/benchmarks.md, "Memory").

    python benchmarks/memory.py                              # SDXL, 1024², batch 1, bf16, LoRA rank 64, 10 nodes
    python benchmarks/memory.py --family sd3.5-medium        # SD3.5-Medium (MMDiT-X, CLIP-L/G, T5-XXL)
    python benchmarks/memory.py --lora_rank 16 --use_8bit_adam --pretrained_generator

Every component is built at the real SDXL configuration under `torch.device("meta")` (shapes, no storage; the
adapters are injected by the package's own `SharedBase`, so their parameter counts are the script's), and the
bytes a run holds *between iterations* are summed per component for three modes, at the flags a user would pass:

- `full`: full fine-tuning (`--lora_rank 0`, full-weight path nodes): the frozen teacher and a copy for the node
  target in the compute dtype, generator and fake score as fp32 masters with AdamW states;
- `lora, separate` (`--lora_rank R --lora_base separate`, the LoRA mode before the shared base): the teacher, a
  copy of it holding the node adapters, and a base each for the generator and the fake score, all in the compute
  dtype, plus the adapters (fp32 masters + AdamW states);
- `lora, shared` (`--lora_rank R`, the default): one frozen teacher base holding every adapter.

Gradients are not held between iterations (each update sets them to None after its step); the gradients of the
largest update are listed as what an update adds. Stage 1 is counted as well, and a run needs the larger stage.
The activation memory of one trainable UNet pass (1024², batch 1) is an *estimate*: the bytes autograd saves in a
forward on the meta device, with and without gradient checkpointing (with it, the saved block inputs plus the
largest recomputed block), counted through `torch.autograd.graph.saved_tensors_hooks` (tensors saved twice are
counted twice).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from common import write_section

from diffusers_disback.distill import SharedBase, lora_config
from diffusers_disback.testing import get_sd35_medium_models, get_sdxl_models
from diffusers_disback.training import SD3_LORA_TARGETS, SDXL_LORA_TARGETS

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "no": 4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=["sdxl", "sd3.5-medium"], default="sdxl", help="the teacher's configuration")
    p.add_argument("--lora_rank", type=int, default=64, help="generator and fake-score adapters")
    p.add_argument("--path_lora_rank", type=int, default=64, help="stage 1's degrading adapter and the path nodes")
    p.add_argument("--num_path_nodes", type=int, default=10, help="path nodes held in stage 2 (the paper's 10)")
    p.add_argument("--mixed_precision", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--use_8bit_adam", action="store_true", help="AdamW states in 8 bits (bitsandbytes)")
    p.add_argument(
        "--pretrained_generator", action="store_true", help="the generator starts from another UNet (its own base)"
    )
    p.add_argument("--offload_text_encoders", action="store_true", help="the encoders between batches in CPU memory")
    p.add_argument("--no_t5", action="store_true", help="SD3: without T5 (train_disback_sd3.py --no_t5)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--no_activations", action="store_true", help="skip the activation estimate")
    p.add_argument("--report", default=os.path.join(HERE, "results", "memory.md"))
    return p.parse_args(argv)


def numel(module: torch.nn.Module, adapter: str | None = None) -> int:
    """Parameters of the base (`adapter=None`) or of one adapter."""
    if adapter is None:
        return sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    return sum(p.numel() for n, p in module.named_parameters() if "lora_" in n and f".{adapter}." in n)


def build(args) -> dict:
    """Parameter counts of every component, from modules built at the family's configuration on the meta device.
    SD3: CLIP-L and CLIP-G are fp32 (as SDXL's encoders), T5-XXL is held in the compute dtype (as `FrozenSD3`)."""
    sd3 = args.family != "sdxl"
    targets = SD3_LORA_TARGETS if sd3 else SDXL_LORA_TARGETS
    with torch.device("meta"):
        models = get_sd35_medium_models() if sd3 else get_sdxl_models("sdxl")
        unet = models["transformer" if sd3 else "unet"].requires_grad_(False)
        shared = SharedBase(unet)
        shared.add_adapter(lora_config(args.lora_rank, targets), "generator", trainable=True)
        shared.add_adapter(lora_config(args.path_lora_rank, targets), "node_1")
    t5 = 0 if not sd3 or args.no_t5 else numel(models["text_encoder_3"])
    return {
        "unet": numel(unet),
        "adapter": numel(unet, "generator"),
        "node_adapter": numel(unet, "node_1"),
        "text_encoders": numel(models["text_encoder"]) + numel(models["text_encoder_2"]),
        "t5": t5,
        "vae": numel(models["vae"]),
        "models": models,
        "shared": shared,
        "net": "transformer" if sd3 else "UNet",
    }


def holdings(args, n: dict) -> dict[str, dict[str, list[tuple[str, float]]]]:
    """mode -> stage -> [(component, bytes)] held between iterations."""
    w = DTYPE_BYTES[args.mixed_precision]  # frozen weights: the compute dtype
    adam = 2 if args.use_8bit_adam else 8  # two AdamW states per trained parameter
    trained = 4 + adam  # an fp32 master and its states
    P, A, A_node, N = n["unet"], n["adapter"], n["node_adapter"], args.num_path_nodes
    encoders = 0 if args.offload_text_encoders else 4 * n["text_encoders"]
    where = "in CPU memory: --offload_text_encoders" if args.offload_text_encoders else "fp32, one pass per batch"
    common = [(f"CLIP text encoders ({where})", encoders)]
    if n["t5"]:
        t5_where = "in CPU memory" if args.offload_text_encoders else "compute dtype"
        common.append(
            (f"T5-XXL encoder ({t5_where})", 0 if args.offload_text_encoders else (2 if w == 2 else 4) * n["t5"])
        )
    common.append(("VAE (validation only; bf16 or fp32)", (2 if w == 2 else 4) * n["vae"]))
    net = n["net"]
    own_base = [("generator's own base (--pretrained_generator)", w * P)] if args.pretrained_generator else []
    generator_frozen = [("initial generator, frozen (stage 1)", w * P)]
    return {
        "full": {
            "stage 1": [(f"teacher {net} (frozen)", w * P), *generator_frozen,
                        (f"degrading {net}: fp32 weights + AdamW", trained * P), *common],
            "stage 2": [(f"teacher {net} (frozen)", w * P), ("node target: a copy of the teacher", w * P),
                        (f"generator {net}: fp32 weights + AdamW", trained * P),
                        (f"fake score {net}: fp32 weights + AdamW", trained * P), *common],
            "update adds": [(f"gradients of one {net} (fp32)", 4 * P)],
        },
        "lora, separate": {
            "stage 1": [(f"teacher {net} (frozen)", w * P), *generator_frozen, ("degrading base", w * P),
                        ("degrading adapter + AdamW", trained * A_node), *common],
            "stage 2": [(f"teacher {net} (frozen)", w * P), ("node target: a copy of the teacher", w * P),
                        (f"{N} node adapters", w * N * A_node), ("generator base", w * P),
                        ("generator adapter + AdamW", trained * A), ("fake score base", w * P),
                        ("fake score adapter + AdamW", trained * A), *common],
            "update adds": [("gradients of one adapter (fp32)", 4 * A)],
        },
        "lora, shared": {
            "stage 1": [(f"shared base: the teacher {net} (frozen)", w * P),
                        *(generator_frozen if args.pretrained_generator else []),
                        ("degrading adapter + AdamW", trained * A_node), *common],
            "stage 2": [(f"shared base: the teacher {net} (frozen)", w * P), (f"{N} node adapters", w * N * A_node),
                        *own_base, ("generator adapter + AdamW", trained * A),
                        ("fake score adapter + AdamW", trained * A), *common],
            "update adds": [("gradients of one adapter (fp32)", 4 * A)],
        },
    }  # fmt: skip


def activations(args, n: dict) -> dict[str, float]:
    """Bytes autograd saves in one generator pass (LoRA active, base frozen) at the run's resolution, on meta."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[args.mixed_precision]
    shared = n["shared"]
    unet = shared.module.to(dtype)
    b, h = args.batch_size, args.resolution // 8
    if n["net"] == "transformer":  # SD3: 77 CLIP + 256 T5 tokens of width 4096, pooled 2048, 16 latent channels
        kwargs = dict(
            encoder_hidden_states=torch.zeros(b, 77 + 256, 4096, device="meta", dtype=dtype),
            pooled_projections=torch.zeros(b, 2048, device="meta", dtype=dtype),
        )
        x, t = torch.zeros(b, 16, h, h, device="meta", dtype=dtype), torch.full((b,), 500.0, device="meta")
    else:
        kwargs = dict(
            encoder_hidden_states=torch.zeros(b, 77, 2048, device="meta", dtype=dtype),
            added_cond_kwargs={
                "text_embeds": torch.zeros(b, 1280, device="meta", dtype=dtype),
                "time_ids": torch.zeros(b, 6, device="meta", dtype=dtype),
            },
        )
        x, t = torch.zeros(b, 4, h, h, device="meta", dtype=dtype), torch.full((b,), 500, device="meta")
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    units: list[int] = []  # bytes saved inside each checkpointed unit (a resnet or a transformer block)
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D | BasicTransformerBlock | JointTransformerBlock):
            m.register_forward_pre_hook(lambda mod, inp: setattr(mod, "_saved_before", saved[0]))
            m.register_forward_hook(lambda mod, inp, out: units.append(saved[0] - mod._saved_before))
    generator = shared.view("generator")
    call = (lambda: generator(hidden_states=x, timestep=t, **kwargs)) if n["net"] == "transformer" else (
        lambda: generator(x, t, **kwargs))  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    plain, largest = saved[0], max(units)
    saved[0] = 0
    shared.enable_gradient_checkpointing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    return {"no checkpointing": plain, "checkpointing": saved[0] + largest, "largest unit": largest}


def table(args, n: dict, held: dict, act: dict | None) -> str:
    flags = (f"`--lora_rank {args.lora_rank} --path_node_type lora --path_lora_rank {args.path_lora_rank}`, "
             f"{args.num_path_nodes} path nodes, `--mixed_precision {args.mixed_precision}`"
             + (", `--use_8bit_adam`" if args.use_8bit_adam else "")
             + (", `--pretrained_generator` (a generator of its own)" if args.pretrained_generator else ""))  # fmt: skip
    name, net = ("SDXL", "UNet") if args.family == "sdxl" else ("SD3.5-Medium", "transformer")
    t5 = f", T5-XXL {n['t5'] / 1e9:.2f} B" if n["t5"] else ""
    lines = [
        f"{name} configuration ({net} {n['unet'] / 1e9:.3f} B parameters; CLIP text encoders "
        f"{n['text_encoders'] / 1e6:.0f} M{t5}; "
        f"VAE {n['vae'] / 1e6:.1f} M; a rank-{args.lora_rank} adapter on the attention projections "
        f"{n['adapter'] / 1e6:.1f} M, a rank-{args.path_lora_rank} node {n['node_adapter'] / 1e6:.1f} M), {flags}. "
        "GiB held between iterations, counted on the meta device (`python benchmarks/memory.py`):",
        "",
        "| mode | stage 1 | stage 2 | an update adds | the run holds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, stages in held.items():
        s1, s2, up = (sum(b for _, b in stages[k]) / GiB for k in ("stage 1", "stage 2", "update adds"))
        lines.append(f"| {mode} | {s1:.2f} | {s2:.2f} | {up:.2f} | **{max(s1, s2):.2f}** |")
    if not args.offload_text_encoders:  # what the one flag more gives
        encoders = sum(b for c, b in held["lora, shared"]["stage 2"] if "encoder" in c) / GiB
        s1, s2 = (sum(b for _, b in held["lora, shared"][k]) / GiB - encoders for k in ("stage 1", "stage 2"))
        up = sum(b for _, b in held["lora, shared"]["update adds"]) / GiB
        lines.append(
            f"| lora, shared, `--offload_text_encoders` | {s1:.2f} | {s2:.2f} | {up:.2f} | **{max(s1, s2):.2f}** |"
        )
    for mode in ("lora, separate", "lora, shared"):
        lines += ["", f"Stage 2, `{mode}`, per component:", "", "| component | GiB |", "| --- | ---: |"]
        lines += [f"| {c} | {b / GiB:.3f} |" for c, b in held[mode]["stage 2"]]
    if act:
        lines += [
            "",
            f"Activation memory of one trainable {net} pass at {args.resolution}², batch {args.batch_size} (an "
            "estimate: bytes autograd saves, counted on the meta device; a DM-loss update also runs the target and "
            "the fake score without gradients, whose transient buffers are not counted):",
            "",
            f"- without gradient checkpointing: {act['no checkpointing'] / GiB:.1f} GiB;",
            f"- with `--gradient_checkpointing`: {act['checkpointing'] / GiB:.2f} GiB (saved block inputs, plus "
            f"{act['largest unit'] / GiB:.2f} GiB for the largest block while it is recomputed).",
        ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    n = build(args)
    held = holdings(args, n)
    act = None if args.no_activations else activations(args, n)
    text = table(args, n, held, act)
    given = sys.argv[1:] if argv is None else argv
    default = {(): "sdxl", ("--family", "sd3.5-medium"): "sd35-medium"}.get(tuple(given))
    if default:  # the defaults of a family: the table docs/benchmarks.md shows
        write_section(default, text, args.report, "# Memory held by a training run (benchmarks/memory.py)")
    print(text)
    return held, n, act


if __name__ == "__main__":
    main()
