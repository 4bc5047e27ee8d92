"""Inference cost of DisBackPipeline against the teacher and against the passes one step cannot avoid.

Side by side in one process, on the same components and prompt, interleaved so that drift hits every variant alike:

- `bare passes`: text encoders (with tokenization) + one UNet forward + VAE decode, called directly: the floor.
- `DisBack 1-step`: `DisBackPipeline(prompt)`, everything a user gets.
- `DisBack 1-step, stock _execution_device`: the same with diffusers' own device look-up (what our override saves).
- `DisBack 1-step + tiny VAE`: the same with an `AutoencoderTiny` decoder (TAESD-XL shaped; random weights here).
- `teacher 25-step CFG`: `StableDiffusionXLPipeline` with Euler, 25 steps, guidance 5.

Prints one table (median ms, ratio to the bare passes, ratio of the teacher to DisBack) and writes a PNG.

    python benchmarks/inference.py                  # tiny components on CPU, full repeats
    python benchmarks/inference.py --quick          # a few repeats (used by the test suite)
    python benchmarks/inference.py --size sdxl --device cuda --dtype float16   # SDXL-sized random weights, GPU
    python benchmarks/inference.py --size sdxl --resolution 512 --repeats 3 --teacher_steps 2  # SDXL-sized, CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from diffusers_disback import DisBackPipeline
from diffusers_disback.testing import SDXL_SCHEDULER_CONFIG, get_sdxl_components, get_tiny_taesd

PROMPT = "a photo of an astronaut riding a horse on mars"


class _StockExecutionDevice(DisBackPipeline):
    """DisBackPipeline with diffusers' own `_execution_device` (which walks every submodule with hasattr)."""

    _execution_device = StableDiffusionXLPipeline._execution_device


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def bare_passes(pipe: DisBackPipeline, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Text encoders + one UNet forward + VAE decode, without any pipeline machinery."""
    device = pipe.unet.device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False)
    latents = torch.randn(
        (1, 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor), generator=generator
    ).to(device, prompt_embeds.dtype)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=prompt_embeds.dtype)
    t = torch.tensor(399, device=device)
    eps = pipe.unet(
        latents, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False
    )[0]
    a = pipe.scheduler.alphas_cumprod[399].to(device)
    x0 = (latents.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()
    vae = pipe.vae
    return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]


def run(
    size: str,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    teacher_steps: int,
    out_png: str | None,
    resolution: int | None = None,
) -> dict:
    components = get_sdxl_components(size, scheduler="disback")
    pipe = DisBackPipeline(**components).to(device, dtype)
    if dtype == torch.float16:
        pipe.vae.config.force_upcast = False  # random weights do not overflow; measure the fp16 decode
    pipe.set_progress_bar_config(disable=True)
    teacher = StableDiffusionXLPipeline(
        **{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)}
    )
    teacher.set_progress_bar_config(disable=True)
    fast = DisBackPipeline(**{**pipe.components, "vae": get_tiny_taesd(size=size).to(device, dtype)})
    fast.set_progress_bar_config(disable=True)
    stock = _StockExecutionDevice(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    size_px = resolution or (64 if size == "tiny" else 1024)
    if size_px % 8:
        raise ValueError(f"--resolution must be divisible by 8, got {size_px}")

    def gen():
        return torch.Generator().manual_seed(0)

    variants = {
        "bare passes (text enc + 1 UNet + VAE)": lambda: bare_passes(pipe, size_px, size_px, gen()),
        "DisBack 1-step": lambda: pipe(PROMPT, height=size_px, width=size_px, generator=gen(), output_type="pt"),
        "DisBack 1-step, stock _execution_device": lambda: stock(
            PROMPT, height=size_px, width=size_px, generator=gen(), output_type="pt"
        ),
        "DisBack 1-step + tiny VAE": lambda: fast(
            PROMPT, height=size_px, width=size_px, generator=gen(), output_type="pt"
        ),
        f"teacher {teacher_steps}-step CFG 5": lambda: teacher(
            PROMPT,
            height=size_px,
            width=size_px,
            num_inference_steps=teacher_steps,
            guidance_scale=5.0,
            generator=gen(),
            output_type="pt",
        ),
    }
    for fn in variants.values():  # warm-up (allocations, kernels, caches)
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) * 1000 for name, v in times.items()}
    bare = median["bare passes (text enc + 1 UNet + VAE)"]
    one = median["DisBack 1-step"]
    rows = []
    for name, ms in median.items():
        rows.append((name, ms, ms / bare, ms / one))
    print(
        f"\ninference, {size} components, {size_px}x{size_px}, {device}, {str(dtype).replace('torch.', '')}, "
        f"{repeats} repeats, seed 0"
    )
    print(f"| {'figure':<40} | {'median ms':>10} | {'/ bare':>7} | {'/ DisBack':>9} |")
    print(f"| {'-' * 40} | {'-' * 10} | {'-' * 7} | {'-' * 9} |")
    for name, ms, r_bare, r_one in rows:
        print(f"| {name:<40} | {ms:>10.2f} | {r_bare:>6.3f}x | {r_one:>8.2f}x |")
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if out_png:
        _plot(rows, out_png, f"{size} components, {device}, {str(dtype).replace('torch.', '')}")
    return {name: ms for name, ms, _, _ in rows}


def _plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    names = [r[0] for r in rows]
    values = [r[1] for r in rows]
    bars = ax.barh(names[::-1], values[::-1], color=["#888", "#c44", "#d99", "#e88", "#48c"][::-1])
    for bar, row in zip(bars, rows[::-1]):
        ax.text(
            bar.get_width(),
            bar.get_y() + bar.get_height() / 2,
            f" {row[1]:.1f} ms ({row[2]:.2f}x bare)",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel("median time per image (ms)")
    ax.set_title(f"DisBack inference: {title}", fontsize=10)
    ax.set_xlim(0, max(values) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default 64 tiny, 1024 sdxl)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--teacher_steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 5 teacher steps: checks the machinery")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "inference.png"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.teacher_steps = 3, 5
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    return run(args.size, args.device, dtype, args.repeats, args.teacher_steps, args.output, args.resolution)


if __name__ == "__main__":
    main()
