"""The web app (`diffusers_disback.app`) and its Space (`hub.push_space`).

- the generation behind the UI: same seed -> same image, equal to `DisBackPipeline`'s; steps 1/2/4 -> the DisBack
  timesteps; fast decode through an (untrained) `AutoencoderTiny`; the shapes teacher, whose repo names Euler;
- the Space: pushed to the loopback Hub, its `app.py` downloaded and run against the model repo on that Hub;
- a real browser (marker `browser`): the app on 127.0.0.1 with the committed shapes teacher, driven through Debian's
  chromium and chromedriver by selenium: type a prompt, see its image, change the prompt, see the new image, switch to
  4 steps. It never skips: without chromium it fails and says how to install it (`make browser`).

`DISBACK_APP_SCREENSHOT=docs/images/app.png pytest tests/test_app.py -m browser` also writes the screenshot the
docs show.
"""

import ast
import importlib.util
import io
import os
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderTiny
from huggingface_hub import hf_hub_download, list_repo_files

from diffusers_disback import DisBackPipeline
from diffusers_disback.app import (
    AppEngine,
    AppResult,
    add_app_arguments,
    build_app,
    disback_timesteps,
    main,
    update_history,
)
from diffusers_disback.hub import SPACE_SDK_VERSION, HubPushError, push_folder, push_space
from diffusers_disback.scheduling_disback import disback_timesteps as package_timesteps
from diffusers_disback.shapes import SHOWCASE_CAPTIONS
from diffusers_disback.testing import get_sdxl_components, get_tiny_taesd

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # gradio reads it when a Blocks is built: never phone home

REPO = Path(__file__).resolve().parents[1]
APP_FILE = REPO / "src" / "diffusers_disback" / "app.py"
SHAPES_TEACHER = REPO / "examples" / "shapes" / "teacher"
PROMPT = "a red circle"


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny DisBack pipeline folder (the Hub layout) that carries its own tiny VAE in `vae_tiny/`."""
    folder = tmp_path_factory.mktemp("app") / "disback-tiny"
    DisBackPipeline(**get_sdxl_components("tiny", scheduler="disback")).save_pretrained(folder)
    get_tiny_taesd().save_pretrained(folder / "vae_tiny")
    return folder


@pytest.fixture(scope="module")
def engine(model_folder):
    return AppEngine.from_pretrained(model_folder)


@pytest.fixture(scope="module")
def reference(model_folder):
    pipe = DisBackPipeline.from_pretrained(model_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------------ generation


def test_timesteps_follow_the_disback_rule():
    assert disback_timesteps(1) == [399]
    assert disback_timesteps(2) == [999, 499]
    assert disback_timesteps(4) == [999, 749, 499, 249]
    assert disback_timesteps(1, conditioning_timestep=299) == [299]
    for n in range(1, 9):  # the app's copy (app.py must stand alone) equals the package's rule
        assert disback_timesteps(n) == package_timesteps(n)
    with pytest.raises(ValueError):
        disback_timesteps(0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_steps_reach_the_scheduler_and_match_disback_pipeline(engine, reference, steps):
    result = engine.generate(PROMPT, seed=3, steps=steps)
    assert result.timesteps == disback_timesteps(steps)
    assert engine.pipe.scheduler.timesteps.tolist() == disback_timesteps(steps)  # what the pipeline sampled at
    assert type(engine.pipe.scheduler).__name__ == "LCMScheduler"
    expected = reference(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(3)).images[0]
    # LCMScheduler and DisBackScheduler agree to ~1e-6 (docs/inference.md): at most a rounding step in uint8
    assert np.abs(_pixels(result.image) - _pixels(expected)).max() <= 1
    assert result.image.size == (64, 64) and result.seconds > 0
    assert f"{steps} step" in result.describe("cpu") and "ms** per image on cpu" in result.describe("cpu")


def test_same_seed_same_image_other_seed_other_image(engine):
    a = engine.generate(PROMPT, seed=7)
    b = engine.generate(PROMPT, seed=7)
    c = engine.generate(PROMPT, seed=8)
    d = engine.generate("a blue square", seed=7)
    assert np.array_equal(_pixels(a.image), _pixels(b.image))
    assert not np.array_equal(_pixels(a.image), _pixels(c.image))
    assert not np.array_equal(_pixels(a.image), _pixels(d.image))


def test_fast_decode_uses_the_tiny_vae(engine, reference, model_folder):
    assert isinstance(engine.tiny_vae, AutoencoderTiny)  # found in the model's vae_tiny/
    fast = engine.generate(PROMPT, seed=1, fast_decode=True)
    full = engine.generate(PROMPT, seed=1, fast_decode=False)
    assert fast.image.size == full.image.size == (64, 64) and fast.fast_decode and "tiny VAE" in fast.describe()
    assert not np.array_equal(_pixels(fast.image), _pixels(full.image))
    assert np.array_equal(_pixels(fast.image), _pixels(engine.generate(PROMPT, seed=1, fast_decode=True).image))

    # the same latents, decoded by hand: the tiny VAE takes the UNet's scaled latents as they are (scaling factor 1)
    latents = reference(PROMPT, generator=torch.Generator().manual_seed(1), output_type="latent").images
    with torch.no_grad():
        decoded = engine.tiny_vae.decode(latents / engine.tiny_vae.config.scaling_factor).sample
    by_hand = reference.image_processor.postprocess(decoded, output_type="pil")[0]
    assert np.abs(_pixels(fast.image) - _pixels(by_hand)).max() <= 1

    # given explicitly (a folder, or a model), and absent
    explicit = AppEngine(reference, tiny_vae=get_tiny_taesd())
    assert np.array_equal(_pixels(explicit.generate(PROMPT, seed=1, fast_decode=True).image), _pixels(fast.image))
    loaded = AppEngine.from_pretrained(model_folder, tiny_vae=model_folder / "vae_tiny")
    assert isinstance(loaded.tiny_vae, AutoencoderTiny)
    with pytest.raises(ValueError, match="tiny VAE"):
        AppEngine(reference).generate(PROMPT, fast_decode=True)


def test_an_sd3_folder_samples_as_disback_sd3_pipeline(tmp_path):
    """An SD3 DisBack folder: the app loads it with stock diffusers and the student's scheduler, and gives
    `DisBackSD3Pipeline`'s images for the same seed at 1 and 4 steps (the re-noising drawn from the seed), with the
    T5 length the folder records; fast decode goes through a TAESD3-shaped tiny VAE, shift factor included."""
    from diffusers_disback import DisBackSD3Pipeline, disback_flow_scheduler
    from diffusers_disback.testing import get_sd3_components

    folder = tmp_path / "disback-sd3"
    pipe = DisBackSD3Pipeline(**{**get_sd3_components(), "scheduler": disback_flow_scheduler()})
    pipe.default_max_sequence_length = 16
    pipe.save_pretrained(folder)
    torch.manual_seed(0)
    taesd3 = AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
        scaling_factor=1.5305, shift_factor=0.0609,
    ).eval()  # fmt: skip
    taesd3.save_pretrained(folder / "vae_tiny")
    engine = AppEngine.from_pretrained(folder)
    assert engine.is_sd3 and engine.max_sequence_length == 16 and isinstance(engine.tiny_vae, AutoencoderTiny)
    assert type(engine.pipe).__name__ == "StableDiffusion3Pipeline"  # stock diffusers: the Space needs nothing else
    reference = DisBackSD3Pipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    for steps, timesteps in ((1, [1000]), (4, [1000, 750, 500, 250])):
        result = engine.generate(PROMPT, seed=3, steps=steps)
        assert result.timesteps == timesteps and result.image.size == (64, 64)
        expected = reference(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(3)).images[0]
        assert np.abs(_pixels(result.image) - _pixels(expected)).max() <= 1, steps
    assert not np.array_equal(_pixels(engine.generate(PROMPT, seed=3, steps=4).image),
                              _pixels(engine.generate(PROMPT, seed=4, steps=4).image))  # fmt: skip
    assert "step" not in engine.pipe.scheduler.__dict__  # the generator hand-over is undone after each call
    fast = engine.generate(PROMPT, seed=3, fast_decode=True)
    latents = reference(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent").images
    with torch.no_grad():
        decoded = taesd3.decode(latents / 1.5305 + 0.0609).sample
    by_hand = reference.image_processor.postprocess(decoded, output_type="pil")[0]
    assert np.abs(_pixels(fast.image) - _pixels(by_hand)).max() <= 1
    assert all(int(w) % 8 == 0 and int(h) % 8 == 0 for w, h in (c.split("x") for c in engine.size_choices()))


def test_shapes_teacher_loads_the_plain_way_and_sizes(reference):
    shapes = AppEngine.from_pretrained(SHAPES_TEACHER)  # its repo names EulerDiscreteScheduler
    assert type(shapes.pipe.scheduler).__name__ == "LCMScheduler"
    assert shapes.pipe.scheduler.config.original_inference_steps == 1000
    assert shapes.tiny_vae is None  # no vae_tiny/ in the folder: fast decode is off
    assert shapes.size_choices() == ["64x64", "48x48", "32x32"]
    caption = SHOWCASE_CAPTIONS[0]
    ours = shapes.generate(caption, seed=0, steps=1)
    plain = DisBackPipeline.from_pretrained(SHAPES_TEACHER)  # DisBackScheduler built from the Euler config
    plain.set_progress_bar_config(disable=True)
    expected = plain(caption, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(_pixels(ours.image) - _pixels(expected)).max() <= 1
    assert shapes.generate(caption, size="48x48").image.size == (48, 48)
    assert shapes.generate(caption, size=(32, 64)).image.size == (32, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        shapes.generate(caption, size="50x50")
    sdxl_like = AppEngine.__new__(AppEngine)  # the choices an SDXL-sized model gets
    sdxl_like.native_size, sdxl_like.size_multiple = 1024, 32
    assert sdxl_like.size_choices() == ["1024x1024", "896x1152", "1152x896", "768x768", "512x512"]


def _result(prompt, seed=0, seconds=0.1, finished=100.0):
    return AppResult(None, seconds, prompt, seed, 1, [399], 64, 64, False, finished=finished)


def test_history_keeps_one_entry_per_prompt_being_typed():
    history = []
    for i, prefix in enumerate(["a", "a re", "a red", "a red ci"]):  # keystrokes 0.3 s apart
        history = update_history(history, _result(prefix, finished=100.0 + 0.3 * i))
    assert [r.prompt for r in history] == ["a red ci"]
    history = update_history(history, _result("a blue square", finished=110.0))  # after a pause: a new entry
    history = update_history(history, _result("a blue square", seed=5, finished=110.2))  # other settings: new entry
    assert [(r.prompt, r.seed) for r in history] == [("a blue square", 5), ("a blue square", 0), ("a red ci", 0)]
    for i in range(20):
        history = update_history(history, _result(f"p{i}", finished=200.0 + 10 * i), limit=5)
    assert len(history) == 5 and history[0].prompt == "p19"


def test_build_app_wires_the_controls(engine, reference):
    import gradio as gr

    app = build_app(engine, warmup=False)
    assert isinstance(app, gr.Blocks)
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert {"prompt", "seed", "steps", "size", "fast-decode", "generate", "output", "timing", "history"} <= set(by_id)
    assert by_id["fast-decode"].interactive is True
    assert by_id["steps"].choices == [("1", 1), ("2", 2), ("4", 4)]
    no_tiny = build_app(AppEngine(reference), warmup=False, examples=None)
    assert {b.elem_id: b for b in no_tiny.blocks.values()}["fast-decode"].interactive is False


def test_cli_helpers(monkeypatch, capsys):
    import argparse

    parser = add_app_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["owner/model", "--port", "7861", "--tiny-vae", "madebyollin/taesdxl", "--no-warmup"])
    assert (args.model, args.port, args.tiny_vae, args.no_warmup, args.host) == (
        "owner/model",
        7861,
        "madebyollin/taesdxl",
        True,
        None,
    )
    monkeypatch.delenv("DISBACK_MODEL", raising=False)
    assert main([]) == 2 and "no model" in capsys.readouterr().err
    assert main(["owner/model", "--dtype", "float64"]) == 2 and "unknown dtype" in capsys.readouterr().err

    from diffusers_disback.cli import build_parser  # `disback app`; "demo" names only `make demo` (examples/demo.py)

    cli = build_parser()
    assert cli.parse_args(["app", "owner/model", "--port", "7861"]).port == 7861
    with pytest.raises(SystemExit):
        cli.parse_args(["demo", "owner/model"])
    assert "invalid choice" in capsys.readouterr().err


def test_app_file_stands_alone():
    """app.py is uploaded as the Space's app.py: stdlib-only imports at module level, no diffusers_disback."""
    tree = ast.parse(APP_FILE.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: the file must run on its own"
            imported.add(node.module.split(".")[0])
    assert "diffusers_disback" not in imported
    assert imported - set(sys.stdlib_module_names) <= {"torch", "diffusers", "gradio"}
    top_level = {
        a.name.split(".")[0]
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])
    }
    assert top_level <= set(sys.stdlib_module_names), top_level  # `disback --help` stays fast

    import subprocess

    out = subprocess.run(
        [sys.executable, "-I", str(APP_FILE), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--tiny-vae" in out.stdout and "DISBACK_MODEL" in out.stdout


# ----------------------------------------------------------------------------------------------------------- Space


def test_push_space_and_run_its_app_from_the_hub(hub_server, model_folder, engine, tmp_path):
    push_folder(model_folder, "user/disback-app-model")
    url = push_space("user/disback-app-model", "user/disback-app", hardware="t4-small")
    assert "spaces/user/disback-app" in url
    files = set(list_repo_files("user/disback-app", repo_type="space"))
    assert {"app.py", "requirements.txt", "README.md"} <= files

    readme = Path(hf_hub_download("user/disback-app", "README.md", repo_type="space")).read_text(encoding="utf-8")
    meta = yaml.safe_load(readme.split("---")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"] == SPACE_SDK_VERSION
    assert meta["models"] == ["user/disback-app-model"] and meta["title"] and meta["suggested_hardware"] == "t4-small"
    assert "disback app user/disback-app-model" in readme
    requirements = Path(hf_hub_download("user/disback-app", "requirements.txt", repo_type="space")).read_text()
    assert "diffusers" in requirements and "diffusers_disback" not in requirements and "gradio" not in requirements

    # the Space's app.py, run as the Space runs it (no package import), loads the model repo from the Hub
    app_path = hf_hub_download("user/disback-app", "app.py", repo_type="space")
    assert "DEFAULT_MODEL: str | None = 'user/disback-app-model'" in Path(app_path).read_text(encoding="utf-8")
    spec = importlib.util.spec_from_file_location("disback_space_app", app_path)
    app = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = app  # as for any module (dataclasses look their module up there)
    try:
        spec.loader.exec_module(app)
    finally:
        del sys.modules[spec.name]
    space_engine = app.AppEngine.from_pretrained(app.DEFAULT_MODEL)
    assert space_engine.tiny_vae is not None  # found in the model repo's vae_tiny/ on the Hub
    for fast in (False, True):
        got = space_engine.generate(PROMPT, seed=2, steps=4, fast_decode=fast).image
        assert np.array_equal(_pixels(got), _pixels(engine.generate(PROMPT, seed=2, steps=4, fast_decode=fast).image))

    # pushing again updates the same Space (a new commit), e.g. with a tiny VAE repo for fast decode
    head = hub_server.head("user/disback-app", repo_type="space")
    push_space("user/disback-app-model", "user/disback-app", tiny_vae="madebyollin/taesdxl")
    assert hub_server.head("user/disback-app", repo_type="space") != head
    app_text = hub_server.files("user/disback-app", repo_type="space")["app.py"].decode()
    assert "DEFAULT_TINY_VAE: str | None = 'madebyollin/taesdxl'" in app_text


def test_cli_push_with_a_space(hub_server, model_folder, capsys):
    from diffusers_disback.cli import main

    assert main(["push", str(model_folder), "user/disback-cli-model", "--space", "user/disback-cli-app"]) == 0
    assert "spaces/user/disback-cli-app" in capsys.readouterr().out
    assert "model_index.json" in set(list_repo_files("user/disback-cli-model"))
    assert {"app.py", "requirements.txt", "README.md"} <= set(
        list_repo_files("user/disback-cli-app", repo_type="space")
    )


def test_failed_space_push_raises_and_leaves_everything_as_it_was(hub_server, tmp_path, monkeypatch):
    push_space("user/disback-app-model", "user/disback-app-fail", retry_wait=0.01)
    head = hub_server.head("user/disback-app-fail", repo_type="space")
    before = hub_server.files("user/disback-app-fail", repo_type="space")
    monkeypatch.chdir(tmp_path)

    hub_server.reset_counts()
    hub_server.fail_next("commit", times=4, status=500)
    with pytest.raises(HubPushError, match="after 4 attempt"):
        push_space("user/other-model", "user/disback-app-fail", retry_wait=0.01)
    assert hub_server.count("commit") == 4  # 1 try + 3 retries
    assert hub_server.head("user/disback-app-fail", repo_type="space") == head
    assert hub_server.files("user/disback-app-fail", repo_type="space") == before
    assert list(tmp_path.iterdir()) == []  # nothing written locally

    hub_server.reset_counts()
    hub_server.fail_next("commit", times=1, status=403)  # not retried
    with pytest.raises(HubPushError, match="1 attempt"):
        push_space("user/other-model", "user/disback-app-fail", retry_wait=0.01)
    assert hub_server.count("commit") == 1

    hub_server.reset_counts()
    hub_server.fail_next("commit", times=1, status=503)  # transient: the retry goes through
    push_space("user/other-model", "user/disback-app-fail", retry_wait=0.01)
    assert hub_server.count("commit") == 2
    assert b"user/other-model" in hub_server.files("user/disback-app-fail", repo_type="space")["app.py"]


# --------------------------------------------------------------------------------------------------------- browser


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.path.exists(p)]
    if missing:
        pytest.fail(
            f"the browser test needs Debian's chromium and chromedriver; missing: {missing}. Install them with "
            "`make browser` (apt-get install chromium chromium-driver).",
            pytrace=False,
        )
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.browser
def test_browser_types_a_prompt_and_sees_the_image(tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    chromium, chromedriver = _browser_binaries()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never try to download a driver or browser

    # DISBACK_APP_MODEL points the page at another model, e.g. a distilled shapes generator for the docs' screenshot
    engine = AppEngine.from_pretrained(os.environ.get("DISBACK_APP_MODEL", SHAPES_TEACHER))
    engine.name = os.environ.get("DISBACK_APP_LABEL", "examples/shapes/teacher")  # as the page shows it
    first, second = SHOWCASE_CAPTIONS[0], SHOWCASE_CAPTIONS[1]
    expected = {
        (first, 1): _pixels(engine.generate(first, seed=0, steps=1).image),
        (second, 1): _pixels(engine.generate(second, seed=0, steps=1).image),
        (second, 4): _pixels(engine.generate(second, seed=0, steps=4).image),
    }
    app = build_app(engine, examples=SHOWCASE_CAPTIONS[:4], warmup=False)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1040")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        prompt = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#prompt textarea"), 30, "the page")[0]
        seen: dict[str, np.ndarray] = {}

        def shown(key) -> bool:
            """Whether the output image is now the one expected for `key` (fetched from the app's server)."""
            images = driver.find_elements(By.CSS_SELECTOR, "#output img")
            src = images[0].get_attribute("src") if images else None
            if not src:
                return False
            if src not in seen:
                from PIL import Image, UnidentifiedImageError

                with urllib.request.urlopen(src, timeout=10) as response:
                    data = response.read()
                try:
                    seen[src] = _pixels(Image.open(io.BytesIO(data)).convert("RGB"))
                except (UnidentifiedImageError, OSError):
                    # the page can point at a file the server is still writing: not cached, asked again next poll
                    return False
            return np.array_equal(seen[src], expected[key])

        prompt.send_keys(first)  # generates as you type
        _wait(lambda: shown((first, 1)), 30, "the image of the first prompt")
        first_src = driver.find_element(By.CSS_SELECTOR, "#output img").get_attribute("src")
        assert "ms per image" in driver.find_element(By.ID, "timing").text

        time.sleep(2.2)  # a pause: the next prompt gets its own gallery entry
        prompt.clear()
        prompt.send_keys(second)
        _wait(lambda: shown((second, 1)), 30, "the image to change with the prompt")
        assert driver.find_element(By.CSS_SELECTOR, "#output img").get_attribute("src") != first_src
        assert not np.array_equal(expected[(first, 1)], expected[(second, 1)])

        driver.find_element(By.CSS_SELECTOR, "#steps input[value='4']").click()
        _wait(lambda: shown((second, 4)), 30, "the 4-step image")
        _wait(lambda: "4 steps (t = 999, 749, 499, 249)" in driver.find_element(By.ID, "timing").text, 10, "timing")
        _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#history img")) >= 2, 10, "the gallery")
        driver.find_element(By.CSS_SELECTOR, "#steps input[value='1']").click()  # back to one step
        _wait(lambda: shown((second, 1)), 30, "the one-step image again")
        _wait(lambda: "1 step" in driver.find_element(By.ID, "timing").text, 10, "timing")

        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("DISBACK_APP_SCREENSHOT"):
            shutil.copyfile(screenshot, os.environ["DISBACK_APP_SCREENSHOT"])
    finally:
        driver.quit()
        app.close()
