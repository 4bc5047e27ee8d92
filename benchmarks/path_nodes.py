"""What a degradation-path node costs: bytes on disk and the time to switch the backtracking target between nodes.

Full-weight nodes against LoRA-delta nodes (peft adapters on the attention projections, `to_q/to_k/to_v/to_out.0`,
the targets diffusers' LoRA scripts use), measured on the tiny SDXL-shaped UNet of `diffusers_disback.testing` and,
for SDXL, counted on paper from the real architecture (built on the meta device, no weights). Goals from the issue:
a LoRA node <= 5% of a full one, a switch <= 50 ms.

    python benchmarks/path_nodes.py            # tiny UNet measured, SDXL on paper
    python benchmarks/path_nodes.py --quick    # fewer repeats (test suite)
    python benchmarks/path_nodes.py --sdxl_switch   # also time switches on a real SDXL-sized UNet (needs ~12 GB RAM)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from diffusers_disback.distill import AdapterView, DegradationPath, NodeSwitcher, add_lora_adapter
from diffusers_disback.testing import SDXL_UNET_CONFIG, TINY_UNET_CONFIG

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_numel(unet: torch.nn.Module, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on every attention projection: `r * (in + out)` per Linear."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS):
            total += rank * (module.in_features + module.out_features)
    return total


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))


def record_path(directory: str, teacher: UNet2DConditionModel, kind: str, num_nodes: int, rank: int):
    degrading = UNet2DConditionModel.from_config(teacher.config)
    degrading.load_state_dict(teacher.state_dict())
    config = None
    if kind == "lora":
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
        degrading.requires_grad_(False)
        add_lora_adapter(degrading, config)
    path = DegradationPath.create(directory, teacher, kind=kind, lora_config=config)
    for step in range(1, num_nodes + 1):
        _perturb(degrading, step)
        path.add_node(degrading, step * 100)
    return path


def time_switches(switcher: NodeSwitcher, num_nodes: int, repeats: int) -> float:
    """Median ms of `activate(i)` over a cycle through all nodes (the first pass, which reads files, excluded). A LoRA
    node's view switches adapters when it is called; that switch is timed with it."""

    def switch(i):
        target = switcher.activate(i)
        if isinstance(target, AdapterView):
            target.shared.set_active(target.adapters)

    order = list(range(num_nodes, -1, -1))
    for i in order:  # warm: full nodes read and cache their tensors once
        switch(i)
    times = []
    for _ in range(repeats):
        for i in order:
            start = time.perf_counter()
            switch(i)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(config: dict, num_nodes: int, rank: int, repeats: int, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**config).to(dtype).eval()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for kind in ("full", "lora"):
            path = record_path(os.path.join(d, kind), teacher, kind, num_nodes, rank)
            target = UNet2DConditionModel.from_config(teacher.config).to(dtype)
            target.load_state_dict(teacher.state_dict())
            switcher = NodeSwitcher(path, target, teacher=teacher, cache=True)
            out[kind] = {
                "node_bytes": path.nodes[1].num_bytes,
                "switch_ms": time_switches(switcher, num_nodes, repeats),
            }
    out["params"] = sum(p.numel() for p in teacher.parameters())
    out["lora_params"] = lora_numel(teacher, rank)
    return out


def on_paper(rank: int, bytes_per_param: int) -> dict:
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    params = sum(p.numel() for p in unet.parameters())
    lora = lora_numel(unet, rank)
    return {
        "params": params,
        "lora_params": lora,
        "full_bytes": params * bytes_per_param,
        "lora_bytes": lora * bytes_per_param,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_nodes", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sdxl_switch", action="store_true", help="time switches on a real SDXL-sized UNet (bf16)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.ranks = 3, [4]

    rows = []
    results = {}
    for rank in args.ranks:
        m = measure(TINY_UNET_CONFIG, args.num_nodes, rank, args.repeats)
        results[("tiny", rank)] = m
        rows.append(_measured_row("tiny UNet (measured, fp32)", rank, m))
    for rank in args.ranks:
        p = on_paper(rank, bytes_per_param=4)
        results[("sdxl", rank)] = p
        rows.append(("SDXL UNet (on paper, fp32)", rank, p["params"], p["full_bytes"], p["lora_bytes"], None, None))
    if args.sdxl_switch:
        for rank in args.ranks[-1:]:
            m = measure(SDXL_UNET_CONFIG, 2, rank, max(3, args.repeats // 5), dtype=torch.bfloat16)
            results[("sdxl-measured", rank)] = m
            rows.append(_measured_row("SDXL UNet (measured, bf16)", rank, m))

    print(
        f"\npath nodes: {args.num_nodes} nodes, LoRA on {'/'.join(TARGETS)}, switch = median over "
        f"{args.repeats} cycles through all nodes (CPU)"
    )
    print("| UNet | LoRA rank | parameters | full node | LoRA node | LoRA / full | full switch | LoRA switch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rank, params, full_b, lora_b, full_ms, lora_ms in rows:
        fs = f"{full_ms:.2f} ms" if full_ms is not None else "-"
        ls = f"{lora_ms:.2f} ms" if lora_ms is not None else "-"
        print(
            f"| {name} | {rank} | {params / 1e6:,.1f} M | {_fmt_bytes(full_b)} | {_fmt_bytes(lora_b)} | "
            f"{lora_b / full_b:.2%} | {fs} | {ls} |"
        )
    return results


def _measured_row(name: str, rank: int, m: dict) -> tuple:
    full, lora = m["full"], m["lora"]
    return (name, rank, m["params"], full["node_bytes"], lora["node_bytes"], full["switch_ms"], lora["switch_ms"])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


if __name__ == "__main__":
    main()
