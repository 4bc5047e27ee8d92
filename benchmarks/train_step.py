"""Cost of one DisBack training iteration against the sum of the passes it is made of, and peak memory.

One stage-2 iteration (`r = 1`, so both updates run every iteration) through the library's `BacktrackingStep`, the
step `examples/train_disback/train_disback_sdxl.py` runs (on `training.unet_eps_fn` scores, AdamW, grad-norm
clipping, the teacher held in the compute dtype outside autocast), is timed against the same work done as bare
passes: text encoding, the generator's forward with grad, the target's two CFG passes and the fake score's pass
without grad, the generator's backward + step, and the fake score's forward + backward + step on the same samples.
The ratio is the overhead of the library's glue (goal: <= 1.10x). Both are measured interleaved in one process.

    python benchmarks/train_step.py                        # tiny components, CPU
    python benchmarks/train_step.py --quick                # a few repeats (test suite)
    python benchmarks/train_step.py --size sdxl --device cuda --dtype bfloat16 --resolution 1024   # GPU
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

from diffusers_disback.distill import (
    BacktrackingSchedule,
    BacktrackingStep,
    NoiseSchedule,
    OptimizerUpdate,
    Score,
    one_step_sample,
)
from diffusers_disback.testing import get_sdxl_components
from diffusers_disback.training import SDXLConditioner, unet_eps_fn

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red fox in a snowy forest"]


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def build(size: str, device: str, dtype: torch.dtype, resolution: int, gradient_checkpointing: bool):
    c = get_sdxl_components(size)
    teacher = c["unet"].to(device, dtype).requires_grad_(False)
    generator = copy.deepcopy(c["unet"]).to(device, torch.float32).requires_grad_(True).train()
    fake = copy.deepcopy(c["unet"]).to(device, torch.float32).requires_grad_(True).train()
    if gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    conditioner = SDXLConditioner(
        c["tokenizer"],
        c["tokenizer_2"],
        c["text_encoder"].to(device, torch.float32),  # fp32, as the script (and DMD2) keeps them
        c["text_encoder_2"].to(device, torch.float32),
        resolution,
    )
    opt_g = torch.optim.AdamW(generator.parameters(), lr=1e-6)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=1e-6)
    return teacher, generator, fake, conditioner, opt_g, opt_f


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["tiny", "sdxl"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="autocast dtype of the passes; the teacher is stored in it",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 1024 sdxl")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's top ops for one iteration and one round of passes",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 2
    resolution = args.resolution or (64 if args.size == "tiny" else 1024)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher, generator, fake, conditioner, opt_g, opt_f = build(
        args.size, device, dtype, resolution, args.gradient_checkpointing
    )
    schedule = NoiseSchedule.ddpm()
    shape = (args.batch_size, 4, resolution // 8, resolution // 8)
    prompts = (PROMPTS * args.batch_size)[: args.batch_size]
    noise_gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    g_eps, f_eps = unet_eps_fn(generator), unet_eps_fn(fake)
    t_eps = unet_eps_fn(teacher, autocast=False)  # frozen, held in the compute dtype: no autocast casts, as the script
    f_eps_fp32 = unet_eps_fn(fake, autocast=False)  # the fake score's DM pass runs in fp32, as in the script
    params = {"generator": list(generator.parameters()), "fake_score": list(fake.parameters())}
    step = BacktrackingStep(
        generator=lambda z, cond: one_step_sample(g_eps, z, cond, schedule),
        fake_score=Score(f_eps, schedule),
        target=lambda cond: (Score(t_eps, schedule, uncond=SDXLConditioner.uncond(cond)), 8.0),
        schedule=BacktrackingSchedule(num_nodes=1),
        update=OptimizerUpdate({"generator": opt_g, "fake_score": opt_f}, params, max_grad_norm=10.0),
        rng=noise_gen,
        fake_score_update_ratio=1,
        autocast=lambda: autocast,
        fake_score_dm=Score(f_eps_fp32, schedule),
    )

    def iteration():
        """What the script does per iteration with r = 1: the library's `BacktrackingStep` on a fresh batch."""
        cond = conditioner(prompts, device)
        z = torch.randn(shape, generator=noise_gen).to(device)
        step(0, (cond, z))

    def passes() -> dict:
        """The same work as bare passes, each timed on its own."""
        times = {}

        def timed(name, fn):
            _sync(device)
            start = time.perf_counter()
            out = fn()
            _sync(device)
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            return out

        cond = timed("text encoders", lambda: conditioner(prompts, device))
        z = torch.randn(shape).to(device)
        t = torch.full((shape[0],), 399, device=device)
        tt = torch.randint(20, 980, (shape[0],), device=device)
        uncond = SDXLConditioner.uncond(cond)

        def fwd(eps, c, ts):
            with autocast:
                return eps(z, ts, c)

        out = timed("generator forward (grad)", lambda: fwd(g_eps, cond, t))
        with torch.no_grad():
            timed("teacher forward x2 (CFG)", lambda: (fwd(t_eps, cond, tt), fwd(t_eps, uncond, tt)))
            timed("fake score forward (no grad, fp32)", lambda: fwd(f_eps_fp32, cond, tt))

        def gen_update():
            out.pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), 10.0)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

        def fake_update():
            fwd(f_eps, cond, tt).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 10.0)
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)

        timed("generator backward + step", gen_update)
        timed("fake score forward + backward + step", fake_update)
        return times

    iteration()  # warm-up: optimizer states, kernels, allocations
    passes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    it_times, pass_times = [], []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        iteration()
        _sync(device)
        it_times.append(time.perf_counter() - start)
        pass_times.append(passes())
    if args.profile:
        profile(iteration, passes, device)
    it = statistics.median(it_times) * 1000
    parts = {k: statistics.median(p[k] for p in pass_times) * 1000 for k in pass_times[0]}
    total = sum(parts.values())
    print(
        f"\ntraining iteration, {args.size} components, {resolution}x{resolution}, batch {args.batch_size}, "
        f"{device}, {args.dtype}, {args.repeats} repeats (medians), seed 0"
    )
    print("| figure | ms | ratio |")
    print("| --- | ---: | ---: |")
    for name, ms in parts.items():
        print(f"| {name} | {ms:.1f} | {ms / total:.1%} of the passes |")
    print(f"| sum of the passes | {total:.1f} | 1.000x |")
    print(f"| one iteration (library glue, as the script) | {it:.1f} | {it / total:.3f}x |")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"| peak GPU memory | {peak:.2f} GiB | |")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"| peak process memory (RSS) | {peak:.2f} GiB | |")
    return {"iteration_ms": it, "passes_ms": total, "ratio": it / total, "peak_gib": peak, "parts": parts}


def profile(iteration, passes, device):
    """torch.profiler's top ops for one iteration and for one round of passes; operators dispatched per iteration
    (all `aten::` ops, and the `copy_`s among them: mostly dtype casts); on a GPU, how busy one iteration keeps it
    (kernel time over wall time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    for what, fn in (("one iteration", iteration), ("one round of passes", passes)):
        _sync(device)
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            fn()
            _sync(device)
        wall = time.perf_counter() - start
        events = prof.key_averages()
        aten = sum(e.count for e in events if e.key.startswith("aten::"))
        copies = sum(e.count for e in events if e.key == "aten::copy_")
        print(f"\ntorch.profiler, {what}: {aten} aten ops dispatched, {copies} aten::copy_")
        if device.type == "cuda":
            kernels = sum(e.self_device_time_total for e in events) / 1e6  # microseconds -> seconds
            print(f"GPU busy {kernels:.3f} s of {wall:.3f} s wall ({kernels / wall:.0%}, profiler overhead included)")
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
