"""Test session setup: offline, CPU, and a Hugging Face-compatible Hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT when it is first imported, so the endpoint (a port reserved now, served by the
`hub_server` fixture) and a throw-away HF_HOME are set here, before any test module imports diffusers. Every Hub call
a test makes, deliberate or accidental, reaches the loopback server and nothing else.
"""

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer, hub_env, reserve_port  # noqa: E402  (stdlib only: safe before huggingface_hub)

_HUB_PORT = reserve_port()
_HF_HOME = tempfile.mkdtemp(prefix="disback-hf-home-")
os.environ.update(hub_env(f"http://127.0.0.1:{_HUB_PORT}", hf_home=_HF_HOME))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def hub_server():
    """The loopback Hub every test in the session talks to (HF_ENDPOINT points here)."""
    with HubServer(port=_HUB_PORT) as server:
        yield server


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): small tensors are as
    fast on one, and far faster than on two beside other work on 2 cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny SDXL-shaped teacher folder, one per test module (a module that needs another, e.g. an SD3 one,
    defines its own `teacher`)."""
    from diffusers_disback.testing import save_tiny_teacher

    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "tiny-sdxl"))
