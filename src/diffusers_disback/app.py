# Copyright 2026 The diffusers_disback authors. Licensed under the Apache License, Version 2.0.
#
# This file is self-contained (the standard library at import time; torch, diffusers and gradio when used), so that
# it can be uploaded as a Hugging Face Space's `app.py` next to nothing else: `diffusers_disback.hub.push_space`
# does that, writing the model's repo id into DEFAULT_MODEL below. It must never import `diffusers_disback`.
"""
A web app for a DisBack one-step SDXL generator (Gradio): it generates as you type.

    disback app MODEL [--tiny-vae TAESD_XL] [--host 127.0.0.1] [--port 7860]
    python app.py MODEL          # the same, without the package (this file is the Space's app.py)
    DISBACK_MODEL=owner/repo python app.py

MODEL is a DisBack repo id or folder (any SDXL pipeline folder loads: its scheduler is replaced by diffusers' stock
`LCMScheduler` configured to sample the DisBack timesteps, the third loading route of docs/hub.md). One step samples
at timestep 399 from pure noise; N steps at timesteps evenly spaced down from 999 (4 -> 999, 749, 499, 249); never
classifier-free guidance. Fast decode replaces the VAE decoder with an `AutoencoderTiny` (the TAESD-XL layout, e.g.
madebyollin/taesdxl) given with `--tiny-vae` or found in the model repo's `vae_tiny/` folder.

An SD3 / SD3.5 DisBack folder (a `transformer`) loads as a stock `StableDiffusion3Pipeline` with the student's
flow-matching scheduler (no shift, re-noising steps): one step from sigma 1, N steps at sigmas evenly spaced down from
1 (4 -> 1, 0.75, 0.5, 0.25), re-noised with noise from the seed, with the T5 length the folder records; the same
images as `DisBackSD3Pipeline`. Its tiny VAE has the TAESD3 layout (madebyollin/taesd3).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# push_space writes the model (and tiny VAE) repo ids here when it uploads this file as a Space's app.py
DEFAULT_MODEL: str | None = None
DEFAULT_TINY_VAE: str | None = None
MODEL_ENV = "DISBACK_MODEL"
TINY_VAE_ENV = "DISBACK_TINY_VAE"
TINY_VAE_SUBFOLDER = "vae_tiny"  # where a model repo may carry its own tiny VAE
STEP_CHOICES = (1, 2, 4)
HISTORY_SIZE = 8
HISTORY_MERGE_SECONDS = 2.0  # typing pauses shorter than this keep one gallery entry per prompt being typed
DEFAULT_EXAMPLES = (
    "a photo of an astronaut riding a horse on mars",
    "a red fox in a snowy forest, golden hour",
    "a bowl of ramen, studio lighting",
    "a watercolor painting of a lighthouse at dawn",
)

logger = logging.getLogger(__name__)


class _QuietLCM(logging.Filter):
    """Drops LCMScheduler's warning that a custom schedule does not start at 999: one step at 399 is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "first timestep on the custom timestep schedule" not in record.getMessage()


# what a DisBack SD3 folder records (the same key as `diffusers_disback.pipeline_disback_sd3`, copied: this file
# stands alone)
MAX_SEQUENCE_LENGTH_KEY = "_disback_max_sequence_length"

_lcm_logger = logging.getLogger("diffusers.schedulers.scheduling_lcm")
if not any(isinstance(f, _QuietLCM) for f in _lcm_logger.filters):
    _lcm_logger.addFilter(_QuietLCM())

__all__ = [
    "DEFAULT_MODEL",
    "AppEngine",
    "AppResult",
    "add_app_arguments",
    "build_app",
    "disback_timesteps",
    "main",
    "run_app",
    "update_history",
]


def disback_timesteps(
    num_inference_steps: int, conditioning_timestep: int = 399, num_train_timesteps: int = 1000
) -> list[int]:
    """
    The timesteps a DisBack generator is sampled at (the same rule as `diffusers_disback.disback_timesteps`, copied
    so that this file stands alone): one step at the conditioning timestep, `N > 1` steps evenly spaced down from the
    last training timestep, `4 -> [999, 749, 499, 249]`.
    """
    steps = int(num_inference_steps)
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {num_inference_steps!r}")
    if steps == 1:
        return [int(conditioning_timestep)]
    return [num_train_timesteps - 1 - (k * num_train_timesteps) // steps for k in range(steps)]


@dataclass
class AppResult:
    """One generated image and how it was made."""

    image: Any  # PIL.Image.Image
    seconds: float
    prompt: str
    seed: int
    steps: int
    timesteps: list[int]
    width: int
    height: int
    fast_decode: bool
    finished: float = field(default_factory=time.monotonic)  # when it was done (time.monotonic)

    @property
    def key(self) -> tuple:
        """The settings apart from the prompt (two results with the same key differ only by prompt)."""
        return (self.seed, self.steps, self.width, self.height, self.fast_decode)

    def describe(self, device: str = "") -> str:
        where = f" on {device}" if device else ""
        step_word = "step" if self.steps == 1 else "steps"
        decoder = "tiny VAE" if self.fast_decode else "full VAE"
        return (
            f"**{self.seconds * 1000:.0f} ms** per image{where} · {self.steps} {step_word} "
            f"(t = {', '.join(map(str, self.timesteps))}) · {self.width}x{self.height} · {decoder} · seed {self.seed}"
        )


@dataclass
class AppEngine:
    """
    The generation behind the UI: a `StableDiffusionXLPipeline` sampled the DisBack way, and an optional tiny VAE.

    Build it with [`AppEngine.from_pretrained`], or from a loaded SDXL pipeline (its scheduler is replaced by an
    `LCMScheduler` with `original_inference_steps = num_train_timesteps`, which computes what `DisBackScheduler` does
    at these timesteps). `generate` is thread-safe (one image at a time).
    """

    pipe: Any
    tiny_vae: Any = None
    name: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    max_sequence_length: int = 256  # SD3: T5 tokens of the prompt embedding

    @property
    def is_sd3(self) -> bool:
        return getattr(self.pipe, "transformer", None) is not None

    def __post_init__(self):
        from diffusers import LCMScheduler

        config = dict(self.pipe.scheduler.config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        if self.is_sd3:
            return self._init_sd3(config)
        self.conditioning_timestep = int(config.get("conditioning_timestep", 399))
        stock = type(self.pipe.scheduler).__name__ == "LCMScheduler"
        if not stock or config.get("original_inference_steps") != self.num_train_timesteps:
            keep = set(inspect.signature(LCMScheduler.__init__).parameters)
            config = {k: v for k, v in config.items() if k in keep}
            config["original_inference_steps"] = self.num_train_timesteps
            self.pipe.scheduler = LCMScheduler.from_config(config)
        self.pipe.set_progress_bar_config(disable=True)
        unet = self.pipe.unet.config
        self.vae_scale_factor = int(self.pipe.vae_scale_factor)
        self.native_size = int(unet.sample_size) * self.vae_scale_factor
        # latents must halve cleanly at every UNet down block
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet.block_out_channels) - 1)

    def _init_sd3(self, config: dict) -> None:
        # the student's sampler: diffusers' flow-matching Euler, unshifted, re-noising the x0 prediction between steps
        from diffusers import FlowMatchEulerDiscreteScheduler

        student = {"shift": 1.0, "use_dynamic_shifting": False, "stochastic_sampling": True}
        if type(self.pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or any(
            config.get(k) != v for k, v in student.items()
        ):
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=self.num_train_timesteps, **student
            )
        self.pipe.set_progress_bar_config(disable=True)
        self.conditioning_timestep = self.num_train_timesteps
        self.vae_scale_factor = int(self.pipe.vae_scale_factor)
        transformer = self.pipe.transformer.config
        self.native_size = int(transformer.sample_size) * self.vae_scale_factor
        self.size_multiple = self.vae_scale_factor * int(transformer.patch_size)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        *,
        tiny_vae: str | os.PathLike | Any | None = None,
        device: str | None = None,
        dtype: Any = None,
        variant: str | None = None,
        revision: str | None = None,
    ) -> AppEngine:
        """
        Loads a DisBack repo id or folder with plain diffusers, on `device` (default: cuda if available, else cpu) in
        `dtype` (default: float16 on cuda, float32 elsewhere). `tiny_vae`: an `AutoencoderTiny` repo id or folder (or
        model); by default the model's own `vae_tiny/` folder is used when it has one.
        """
        import torch
        from diffusers import StableDiffusionXLPipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
        model = os.fspath(model)
        index = StableDiffusionXLPipeline.load_config(model, revision=revision)
        extra = {}
        if "transformer" in index:  # SD3 / SD3.5; a folder without T5 loads with text_encoder_3=None
            from diffusers import StableDiffusion3Pipeline

            missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if (index.get(k) or [None])[0] is None}
            pipe = StableDiffusion3Pipeline.from_pretrained(
                model, torch_dtype=dtype, variant=variant, revision=revision, **missing
            )
            extra["max_sequence_length"] = int(index.get(MAX_SEQUENCE_LENGTH_KEY) or 256)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(
                model, torch_dtype=dtype, variant=variant, revision=revision
            )
        vae = _load_tiny_vae(tiny_vae, model, dtype, revision)
        pipe.to(device)
        if vae is not None and vae.dtype != dtype:  # only a model given as such; diffusers warns on needless casts
            vae.to(dtype=dtype)
        if vae is not None:
            vae.to(device)
        return cls(pipe, vae, name=model, **extra)

    @property
    def device(self) -> str:
        return str(self.pipe.device)

    def size_choices(self) -> list[str]:
        """`WxH` sizes around the model's native one (SDXL: 1024x1024, 896x1152, 1152x896, 768x768, 512x512)."""
        n, m = self.native_size, self.size_multiple

        def fit(x: float) -> int:
            return max(m, int(round(x / m)) * m)

        sizes = [(n, n), (fit(n * 7 / 8), fit(n * 9 / 8)), (fit(n * 9 / 8), fit(n * 7 / 8))]
        sizes += [(fit(n * 3 / 4), fit(n * 3 / 4)), (fit(n / 2), fit(n / 2))]
        return list(dict.fromkeys(f"{w}x{h}" for w, h in sizes))

    def parse_size(self, size: str | tuple[int, int] | None) -> tuple[int, int]:
        if size is None or size == "":
            return self.native_size, self.native_size
        if isinstance(size, str):
            w, _, h = size.lower().replace("×", "x").partition("x")
            size = (int(w), int(h))
        width, height = (int(v) for v in size)
        if width % self.size_multiple or height % self.size_multiple or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {self.size_multiple}, got {size}")
        return width, height

    def generate(
        self,
        prompt: str,
        seed: int = 0,
        steps: int = 1,
        size: str | tuple[int, int] | None = None,
        fast_decode: bool = False,
    ) -> AppResult:
        """One image: `steps` 1 (t = 399) or N (evenly spaced from 999), seeded by a CPU generator as
        `DisBackPipeline` and `disback generate` are, so the same seed gives the same image as they do."""
        import torch

        if fast_decode and self.tiny_vae is None:
            raise ValueError("fast decode needs a tiny VAE (AutoencoderTiny): pass tiny_vae= / --tiny-vae")
        seed, steps = int(seed), int(steps)
        # the DisBack timesteps (SDXL), and the check that `steps` is valid (both families)
        timesteps = disback_timesteps(steps, self.conditioning_timestep, self.num_train_timesteps)
        width, height = self.parse_size(size)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        call = {"timesteps": timesteps}
        if self.is_sd3:  # sigmas 1, (N-1)/N, ..., 1/N; transformer timesteps 1000 sigma
            sigmas = [1.0 - k / steps for k in range(steps)]
            timesteps = [round(self.num_train_timesteps * s) for s in sigmas]
            call = {"sigmas": sigmas, "max_sequence_length": self.max_sequence_length}
        with self._lock, torch.inference_mode(), self._renoise_from(generator):
            start = time.perf_counter()
            out = self.pipe(
                prompt,
                **call,
                guidance_scale=0.0,
                width=width,
                height=height,
                generator=generator,
                output_type="latent" if fast_decode else "pil",
            ).images
            image = self._tiny_decode(out) if fast_decode else out[0]
            if torch.device(self.pipe.device).type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return AppResult(image, seconds, prompt, seed, steps, timesteps, width, height, bool(fast_decode))

    @contextlib.contextmanager
    def _renoise_from(self, generator):
        """SD3: diffusers' loop calls `scheduler.step` without the generator; hand it the call's, so that N > 1 steps
        re-noise from the seed, as `DisBackSD3Pipeline` does (SDXL's LCM step gets it from the pipeline)."""
        scheduler = self.pipe.scheduler
        if not self.is_sd3:
            yield
            return
        scheduler.step = functools.partial(type(scheduler).step, scheduler, generator=generator)
        try:
            yield
        finally:
            del scheduler.step

    def _tiny_decode(self, latents):
        vae = self.tiny_vae
        latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        latents = latents + (getattr(vae.config, "shift_factor", None) or 0.0)  # TAESD3: SD3's latents are shifted
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


def _load_tiny_vae(spec, model: str, dtype, revision: str | None):
    """An `AutoencoderTiny` from `spec` (repo id, folder or model), else from `model`'s `vae_tiny/`, else None."""
    from diffusers import AutoencoderTiny

    if spec is not None and not isinstance(spec, (str, os.PathLike)):
        return spec  # a model already built
    if spec:
        return AutoencoderTiny.from_pretrained(os.fspath(spec), torch_dtype=dtype)
    if os.path.isdir(model) and not os.path.isdir(os.path.join(model, TINY_VAE_SUBFOLDER)):
        return None
    try:
        return AutoencoderTiny.from_pretrained(
            model, subfolder=TINY_VAE_SUBFOLDER, torch_dtype=dtype, revision=revision
        )
    except Exception as e:  # noqa: BLE001 - any failure means "no tiny VAE in this repo"; the app runs without
        logger.info("No tiny VAE in %s/%s (%s): fast decode is off.", model, TINY_VAE_SUBFOLDER, type(e).__name__)
        return None


def update_history(history: list[AppResult], result: AppResult, limit: int = HISTORY_SIZE) -> list[AppResult]:
    """
    The recent images, newest first. A result that follows the newest one within `HISTORY_MERGE_SECONDS` of idle time
    (from the end of one generation to the start of the next) with the same settings replaces it: while a prompt is
    being typed the gallery keeps one image, of the prompt as it stands, not one per keystroke.
    """
    history = list(history or [])
    if history:
        last = history[0]
        idle = (result.finished - result.seconds) - last.finished
        if last.key == result.key and idle < HISTORY_MERGE_SECONDS:
            history = history[1:]
    return [result, *history][:limit]


def _caption(result: AppResult) -> str:
    step_word = "step" if result.steps == 1 else "steps"
    return f"{result.prompt} (seed {result.seed}, {result.steps} {step_word}, {result.seconds * 1000:.0f} ms)"


def build_app(
    model: str | os.PathLike | AppEngine,
    device: str | None = None,
    *,
    tiny_vae: str | os.PathLike | Any | None = None,
    dtype: Any = None,
    variant: str | None = None,
    title: str | None = None,
    examples: list[str] | tuple[str, ...] | None = DEFAULT_EXAMPLES,
    warmup: bool = True,
):
    """
    The Gradio app: a prompt that generates as you type, seed, steps (1/2/4), size, fast decode (tiny VAE), the time
    per image and a gallery of recent images. `model`: a repo id or folder, or an [`AppEngine`] already loaded.
    Returns a `gr.Blocks`; call `.launch()` on it.
    """
    gr = _gradio()
    engine = (
        model
        if isinstance(model, AppEngine)
        else AppEngine.from_pretrained(model, tiny_vae=tiny_vae, device=device, dtype=dtype, variant=variant)
    )
    if warmup:  # the first call pays one-off costs; the times shown are then those of the next ones
        engine.generate("warm-up", seed=0, steps=1)
    name = engine.name or "a DisBack model"
    sizes = engine.size_choices()
    has_tiny = engine.tiny_vae is not None

    def run(prompt, seed, steps, size, fast, history):
        if not (prompt or "").strip():
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        result = engine.generate(prompt, seed=int(seed or 0), steps=int(steps), size=size, fast_decode=bool(fast))
        history = update_history(history, result)
        gallery = [(r.image, _caption(r)) for r in history]
        return result.image, result.describe(engine.device), gallery, history

    # generated images are files in gradio's cache: drop those older than an hour, every ten minutes
    with gr.Blocks(title=title or f"DisBack: {name}", delete_cache=(600, 3600)) as app:
        gr.HTML(f"<style>{_CSS}</style>")
        gr.Markdown(
            f"# {title or 'DisBack one-step text-to-image'}\n"
            f"Model: `{name}`. Type a prompt: images are generated as you type, in one step "
            + (
                "from sigma 1 (or 2 / 4 steps down from it)"
                if engine.is_sd3
                else "at timestep 399 (or 2 / 4 steps from 999)"
            )
            + ", without classifier-free guidance."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(
                    label="Prompt", elem_id="prompt", lines=2, placeholder="type a prompt", autofocus=True
                )
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    dice = gr.Button("Random seed", elem_id="random-seed", size="sm")
                steps = gr.Radio(list(STEP_CHOICES), value=1, label="Steps", elem_id="steps")
                size = gr.Dropdown(sizes, value=sizes[0], label="Size (width x height)", elem_id="size")
                fast = gr.Checkbox(
                    value=False,
                    label="Fast decode (tiny VAE)" if has_tiny else "Fast decode (no tiny VAE given)",
                    interactive=has_tiny,
                    elem_id="fast-decode",
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                image = gr.Image(
                    label="Image", type="pil", format="png", elem_id="output", interactive=False, height=420
                )
                timing = gr.Markdown("", elem_id="timing")
        thumbnails = {"fit_columns": False} if "fit_columns" in inspect.signature(gr.Gallery).parameters else {}
        gallery = gr.Gallery(
            label="Recent images",
            elem_id="history",
            columns=HISTORY_SIZE,
            height=190,
            object_fit="contain",
            preview=False,
            **thumbnails,  # gradio 6 otherwise stretches a few images over the whole width
        )
        if examples:
            gr.Examples([[e] for e in examples], inputs=[prompt])

        gr.on(
            [prompt.change, prompt.submit, seed.change, steps.change, size.change, fast.change, button.click],
            run,
            inputs=[prompt, seed, steps, size, fast, history],
            outputs=[image, timing, gallery, history],
            trigger_mode="always_last",  # while an image is being made, only the latest edit waits: debounced typing
            concurrency_limit=1,
            concurrency_id="generate",
            show_progress="minimal",
        )
        dice.click(lambda: random.randint(0, 2**31 - 1), outputs=[seed])
    return app


# small models make small images: show them scaled up, with sharp pixels
_CSS = (
    "#output img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"
    " #history img { image-rendering: pixelated; }"
)


def _gradio():
    try:
        import gradio as gr
    except ImportError as e:
        raise RuntimeError(
            "The app needs gradio: `pip install 'diffusers_disback[app]'` (or `pip install gradio`)."
        ) from e
    return gr


# ------------------------------------------------------------------------------------------------------------ CLI


def add_app_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `disback app` (and of `python app.py`). Needs neither torch nor gradio."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help=f"DisBack repo id or folder (default: ${MODEL_ENV}, or the model this Space was made for)",
    )
    parser.add_argument(
        "--tiny-vae",
        default=None,
        help=f"AutoencoderTiny (TAESD-XL layout) repo id or folder for fast decode, e.g. madebyollin/taesdxl "
        f"(default: ${TINY_VAE_ENV}, or the model's {TINY_VAE_SUBFOLDER}/ if it has one)",
    )
    parser.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float16 on cuda)")
    parser.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16")
    parser.add_argument("--title", default=None, help="page title")
    parser.add_argument(
        "--example", action="append", default=None, help="an example prompt shown under the app (repeatable)"
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up image at start")
    return parser


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16"}


def run_app(args: argparse.Namespace) -> int:
    """Builds and serves the app from parsed `add_app_arguments` arguments; blocks until interrupted."""
    model = args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    if not model:
        raise ValueError(f"no model: give MODEL (a DisBack repo id or folder) or set ${MODEL_ENV}")
    if args.dtype is not None and args.dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {args.dtype!r}; choose from {sorted(set(_DTYPES))}")
    app = build_app(
        model,
        args.device,
        tiny_vae=args.tiny_vae or os.environ.get(TINY_VAE_ENV) or DEFAULT_TINY_VAE,
        dtype=_DTYPES.get(args.dtype) if args.dtype else None,
        variant=args.variant,
        title=args.title,
        examples=args.example or DEFAULT_EXAMPLES,
        warmup=not args.no_warmup,
    )
    launch: dict[str, Any] = {"server_name": args.host, "server_port": args.port, "share": args.share}
    if "GRADIO_SSR_MODE" not in os.environ:
        launch["ssr_mode"] = False  # server-side rendering needs Node.js; the plain app needs nothing more
    app.launch(**launch)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python app.py [MODEL] [options]`: the Space's entry point, and a package-free way to run the app."""
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.strip().splitlines()[0])
    add_app_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_app(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
