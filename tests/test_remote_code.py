"""The remote code of a DisBack folder without the package: a fresh interpreter in which `diffusers_disback` cannot
be imported loads the folder the Hub push writes with `custom_pipeline=...` (text-to-image, img2img, inpaint), samples
the images the installed pipelines sample, and saves the DisBack layout again, all from the folder's files alone."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_disback import DisBackImg2ImgPipeline, DisBackInpaintPipeline, DisBackPipeline
from diffusers_disback.hub import save_for_hub
from diffusers_disback.pipeline_utils_disback import REMOTE_FILES
from diffusers_disback.testing import get_sdxl_components

PARITY_ATOL = 1e-5  # the remote route keeps the folder's stock LCMScheduler (see tests/test_editing.py)

# Run as a script in a fresh interpreter: argv[1] the folder, argv[2] where to write what it found.
CHILD = r'''
import importlib.abc
import sys


class HidePackage(importlib.abc.MetaPathFinder):
    """`diffusers_disback` (the editable install included) does not exist in this interpreter."""

    def find_spec(self, name, path=None, target=None):
        if name == "diffusers_disback" or name.startswith("diffusers_disback."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, HidePackage())
try:
    import diffusers_disback  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("diffusers_disback is importable: the test would prove nothing")

import json
import os

import numpy as np
import torch
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
image = torch.from_numpy(np.load(os.path.join(out, "image.npy")))
mask = torch.from_numpy(np.load(os.path.join(out, "mask.npy")))


def load(custom_pipeline):
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=custom_pipeline, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


t2i, img2img, inpaint = load(folder), load("pipeline_img2img"), load("pipeline_inpaint")
images = {
    "t2i": t2i("a cat", generator=torch.Generator().manual_seed(0), output_type="np").images,
    "img2img": img2img("a cat", image=image, generator=torch.Generator().manual_seed(0), output_type="np").images,
    "inpaint": inpaint(
        "a cat", image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images,
}
np.savez(os.path.join(out, "images.npz"), **images)
img2img.save_pretrained(os.path.join(out, "saved_by_remote_img2img"))
with open(os.path.join(out, "child.json"), "w") as f:
    json.dump(
        {
            "classes": {k: [type(p).__module__, type(p).__name__] for k, p in zip(images, (t2i, img2img, inpaint))},
            "package_modules": sorted(m for m in sys.modules if m.split(".")[0] == "diffusers_disback"),
        },
        f,
    )
'''


def _gen():
    return torch.Generator().manual_seed(0)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    folder, out = root / "disback-tiny", root / "out"
    out.mkdir()
    pipe = DisBackPipeline(**get_sdxl_components("tiny", scheduler="disback"))
    save_for_hub(pipe, folder, "user/disback-tiny", sample_prompts=None)  # the folder `push_pipeline` uploads

    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    image = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x * y)])[None]
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1.0
    np.save(out / "image.npy", image.numpy())
    np.save(out / "mask.npy", mask.numpy())
    (root / "child.py").write_text(CHILD)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), DIFFUSERS_VERBOSITY="warning")
    done = subprocess.run(
        [sys.executable, str(root / "child.py"), str(folder), str(out)],
        cwd=root,  # not the repository: nothing of it is on the child's path
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, out, image, mask, done.stderr


def test_the_folder_loads_and_samples_without_the_package(remote_run):
    folder, out, image, mask, stderr = remote_run
    child = json.loads((out / "child.json").read_text())
    assert child["package_modules"] == []
    # diffusers tries to import every package a remote file names (even inside a function) and warns when one is
    # missing: the files name none but diffusers, torch and transformers
    assert "might require the following packages" not in stderr, stderr[-2000:]
    assert child["classes"] == {
        "t2i": ["diffusers_modules.local.pipeline", "DisBackPipeline"],
        "img2img": ["diffusers_modules.local.pipeline_img2img", "DisBackImg2ImgPipeline"],
        "inpaint": ["diffusers_modules.local.pipeline_inpaint", "DisBackInpaintPipeline"],
    }

    got = np.load(out / "images.npz")
    expected = {
        "t2i": _quiet(DisBackPipeline.from_pretrained(folder))("a cat", generator=_gen(), output_type="np").images,
        "img2img": _quiet(DisBackImg2ImgPipeline.from_pretrained(folder))(
            "a cat", image=image, generator=_gen(), output_type="np"
        ).images,
        "inpaint": _quiet(DisBackInpaintPipeline.from_pretrained(folder))(
            "a cat", image=image, mask_image=mask, generator=_gen(), output_type="np"
        ).images,
    }
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, atol=PARITY_ATOL, err_msg=name)


def test_the_remote_code_saves_the_layout_the_package_saves(remote_run, tmp_path):
    folder, out, _, _, _ = remote_run
    by_remote = out / "saved_by_remote_img2img"
    by_package = tmp_path / "saved_by_package_img2img"
    DisBackImg2ImgPipeline.from_pretrained(folder).save_pretrained(by_package)
    for name in REMOTE_FILES:  # the repo's own files, not the installed package's
        assert (by_remote / name).read_bytes() == (folder / name).read_bytes(), name
    for name in ("model_index.json", os.path.join("scheduler", "scheduler_config.json")):
        assert json.loads((by_remote / name).read_text()) == json.loads((by_package / name).read_text()), name
    loaded = _quiet(DisBackPipeline.from_pretrained(by_remote))
    reference = _quiet(DisBackPipeline.from_pretrained(folder))
    np.testing.assert_allclose(
        loaded("a cat", generator=_gen(), output_type="np").images,
        reference("a cat", generator=_gen(), output_type="np").images,
        atol=1e-6,
    )


def test_the_remote_class_never_reaches_for_the_installed_package(remote_run):
    # here the package is installed, and the remote `DisBackPipeline` still does not use it
    folder = remote_run[0]
    remote = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
    assert type(remote).__module__.startswith("diffusers_modules.")
    with pytest.raises(ImportError, match="needs the `diffusers_disback` package"):
        type(remote).from_unet_checkpoint(folder / "unet" / "diffusion_pytorch_model.safetensors", base_model=folder)
