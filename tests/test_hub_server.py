"""Tests of the fake Hugging Face Hub in `hub_server.py`, driven by the real `huggingface_hub` client and diffusers.

The server runs in-process; `hub_environment` points the already-imported `huggingface_hub`/diffusers at it (and at a
temporary HF_HOME) for the duration of the module, so this file works standalone and inside a full session whatever
was imported first.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    file_exists,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

try:
    from hub_server import HubServer, hub_environment
except ImportError:  # tests/ is a package
    from tests.hub_server import HubServer, hub_environment


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer() as server, hub_environment(server, tmp_path_factory.mktemp("hf_home")):
        yield server


@pytest.fixture
def api(hub):
    yield HfApi(endpoint=hub.url, token=hub.token)
    assert hub.errors == [], "the fake Hub raised unexpectedly:\n" + "\n".join(hub.errors)
    assert hub.pending_failures == 0, "an injected failure was not consumed"


def _write_folder(path, files: dict[str, bytes]):
    for name, content in files.items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return path


def _safetensors_bytes(tmp_path, name: str, seed: int, numel: int = 512 * 1024) -> bytes:
    """A ~2 MB (512k float32) safetensors file, different for each seed."""
    generator = torch.Generator().manual_seed(seed)
    path = tmp_path / f"{name}-{seed}.safetensors"
    save_file({"weight": torch.randn(numel, generator=generator)}, str(path))
    return path.read_bytes()


def test_env_points_the_client_at_the_server(hub):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.url
    assert constants.HF_HUB_DISABLE_XET is True
    assert HfApi().endpoint == hub.url  # module-level helpers and HfApi() need no endpoint=
    assert HfApi().whoami()["name"] == hub.user  # HF_TOKEN is set: the implicit token is the server's


def test_create_repo_exist_ok_and_private(api, hub):
    url = api.create_repo("user/created")
    assert url.repo_id == "user/created" and url.startswith(hub.url)
    assert api.create_repo("user/created", exist_ok=True).repo_id == "user/created"
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/created")
    assert err.value.response.status_code == 409
    assert api.repo_exists("user/created") and not api.repo_exists("user/missing")
    assert api.list_repo_files("user/created") == [".gitattributes"]  # the Hub's initial commit

    api.create_repo("user/secret", private=True)
    assert api.model_info("user/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/secret", token=False)
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("user/nope")
    assert err.value.response.status_code == 401


def test_upload_download_snapshot_info(api, hub, tmp_path):
    repo = "user/roundtrip"
    api.create_repo(repo)
    weights = _safetensors_bytes(tmp_path, "model", seed=0)
    config = json.dumps({"hidden": 8}).encode()
    folder = _write_folder(
        tmp_path / "upload", {"config.json": config, "model.safetensors": weights, "sub/notes.txt": b"hello\n"}
    )
    hub.reset_counts()
    info = api.upload_folder(repo_id=repo, folder_path=folder, commit_message="add model")
    assert hub.count("lfs_upload") == 1 and hub.count("commit") == 1 and hub.count("preupload") == 1
    assert hub.is_lfs(repo, "model.safetensors") and not hub.is_lfs(repo, "config.json")
    assert info.oid == hub.head(repo) == api.model_info(repo).sha

    snapshot = snapshot_download(repo, allow_patterns=["*.json"])  # before anything else lands in the cache
    assert sorted(os.listdir(snapshot)) == ["config.json"]
    local = snapshot_download(repo, allow_patterns=["sub/*"], local_dir=tmp_path / "local")
    assert sorted(p for p in os.listdir(local) if p != ".cache") == ["sub"]

    assert open(hf_hub_download(repo, "config.json"), "rb").read() == config
    assert open(hf_hub_download(repo, "model.safetensors"), "rb").read() == weights
    assert open(hf_hub_download(repo, "sub/notes.txt", revision=info.oid), "rb").read() == b"hello\n"

    expected = [".gitattributes", "config.json", "model.safetensors", "sub/notes.txt"]
    assert sorted(list_repo_files(repo)) == expected
    assert sorted(s.rfilename for s in model_info(repo).siblings) == expected
    assert model_info(repo, revision=info.oid).sha == info.oid
    meta = {s.rfilename: s for s in api.model_info(repo, files_metadata=True).siblings}
    assert meta["model.safetensors"].lfs.size == len(weights) and meta["config.json"].lfs is None
    tree = {entry.path: entry for entry in api.list_repo_tree(repo)}
    assert set(tree) == {".gitattributes", "config.json", "model.safetensors", "sub"}  # not recursive
    assert tree["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert [e.path for e in api.list_repo_tree(repo, path_in_repo="sub")] == ["sub/notes.txt"]
    assert file_exists(repo, "config.json") and not file_exists(repo, "nope.json")

    snapshot = snapshot_download(repo)
    assert open(os.path.join(snapshot, "model.safetensors"), "rb").read() == weights

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/no-such-repo", "config.json")


def test_failed_commit_changes_nothing_and_retry_succeeds(api, hub, tmp_path):
    repo = "user/atomic"
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=_write_folder(tmp_path / "v1", {"config.json": b'{"v": 1}'}))
    files_before, head_before = list_repo_files(repo), hub.head(repo)
    history_before = hub.commit_shas(repo)

    v2 = _write_folder(
        tmp_path / "v2",
        {"config.json": b'{"v": 2}', "unet/model.safetensors": _safetensors_bytes(tmp_path, "unet", seed=1)},
    )
    hub.reset_counts()
    hub.fail_next("commit", status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(repo_id=repo, folder_path=v2)
    assert err.value.response.status_code == 500
    assert hub.count("lfs_upload") == 1  # the LFS object went up before the commit failed...
    assert list_repo_files(repo) == files_before  # ...but nothing of the push is visible
    assert hub.head(repo) == head_before and hub.commit_shas(repo) == history_before
    assert open(hf_hub_download(repo, "config.json"), "rb").read() == b'{"v": 1}'

    info = api.upload_folder(repo_id=repo, folder_path=v2)
    assert hub.count("lfs_upload") == 1  # already on the server: the batch answer had no upload action
    assert hub.count("commit") == 2
    assert hub.commit_shas(repo) == [info.oid, *history_before]
    assert sorted(list_repo_files(repo)) == [".gitattributes", "config.json", "unet/model.safetensors"]
    assert open(hf_hub_download(repo, "config.json"), "rb").read() == b'{"v": 2}'


def test_lfs_upload_failures_transient_and_hard(api, hub, tmp_path):
    repo = "user/flaky"
    api.create_repo(repo)
    hub.reset_counts()
    hub.fail_next("lfs_upload", status=503)  # transient: huggingface_hub retries (after ~1 s)
    folder = _write_folder(tmp_path / "a", {"a.safetensors": _safetensors_bytes(tmp_path, "a", seed=2, numel=1024)})
    api.upload_folder(repo_id=repo, folder_path=folder)
    assert hub.count("lfs_upload") == 2 and hub.count("commit") == 1
    assert "a.safetensors" in list_repo_files(repo)

    hub.reset_counts()
    head = hub.head(repo)
    hub.fail_next("lfs_upload", status=403)  # 4xx is not retried: the push fails before any commit
    folder = _write_folder(tmp_path / "b", {"b.bin": os.urandom(4096), "b.json": b"{}"})
    with pytest.raises(RuntimeError, match="Error while uploading 'b.bin'"):
        api.upload_folder(repo_id=repo, folder_path=folder)
    assert hub.count("lfs_upload") == 1 and hub.count("commit") == 0
    assert hub.head(repo) == head and "b.json" not in list_repo_files(repo)

    hub.fail_next(lambda r: r.kind == "preupload" and r.repo_id == repo, status=400, message="nope")
    with pytest.raises(HfHubHTTPError, match="nope"):
        api.upload_folder(repo_id=repo, folder_path=folder)
    assert hub.head(repo) == head


def test_deletions_revisions_tags_and_prs(api, hub, tmp_path):
    repo = "user/history"
    api.create_repo(repo)
    first = api.create_commit(
        repo,
        [
            CommitOperationAdd("a.txt", b"a"),
            CommitOperationAdd("dir/b.txt", b"b"),
            CommitOperationAdd("dir/c.txt", b"c"),
        ],
        commit_message="first",
    )
    second = api.create_commit(
        repo,
        [CommitOperationDelete("a.txt"), CommitOperationDelete("dir/", is_folder=True)],
        commit_message="second",
        parent_commit=first.oid,
    )
    assert list_repo_files(repo) == [".gitattributes"]
    assert sorted(list_repo_files(repo, revision=first.oid)) == [".gitattributes", "a.txt", "dir/b.txt", "dir/c.txt"]
    assert open(hf_hub_download(repo, "dir/b.txt", revision=first.oid), "rb").read() == b"b"
    assert [c.commit_id for c in api.list_repo_commits(repo)][:2] == [second.oid, first.oid]

    with pytest.raises(HfHubHTTPError) as err:  # stale parent: rejected, nothing changes
        api.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=first.oid)
    assert err.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo, [CommitOperationDelete("a.txt")], commit_message="delete again")
    assert hub.head(repo) == second.oid

    api.create_tag(repo, tag="v1", revision=first.oid)
    api.create_branch(repo, branch="dev", revision=first.oid)
    refs = api.list_repo_refs(repo)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first.oid}
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert open(hf_hub_download(repo, "a.txt", revision="v1"), "rb").read() == b"a"

    pr = api.create_commit(repo, [CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and pr.pr_revision == "refs/pr/1"
    assert "pr.txt" in list_repo_files(repo, revision="refs/pr/1") and "pr.txt" not in list_repo_files(repo)


def _tiny_ddpm_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler())


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_diffusers_pipeline_roundtrip(api, hub, tmp_path):
    from diffusers import DDPMPipeline, DiffusionPipeline

    repo = "user/tiny-ddpm"
    pipe = _tiny_ddpm_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=tmp_path / "pipe")
    assert hub.is_lfs(repo, "unet/diffusion_pytorch_model.safetensors")

    loaded = DDPMPipeline.from_pretrained(repo)
    _assert_same_weights(pipe.unet, loaded.unet)
    assert loaded.scheduler.config.num_train_timesteps == pipe.scheduler.config.num_train_timesteps

    generic = DiffusionPipeline.from_pretrained(repo)
    assert type(generic).__name__ == "DDPMPipeline"
    _assert_same_weights(pipe.unet, generic.unet)


CUSTOM_PIPELINE = """
from diffusers import DiffusionPipeline

from .helper import MAGIC


class MagicPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self):
        return MAGIC
"""


def test_diffusers_remote_code_with_relative_import(api, hub, tmp_path):
    from diffusers import DiffusionPipeline

    weights_repo, code_repo = "user/tiny-ddpm-for-code", "user/magic-pipeline"
    pipe = _tiny_ddpm_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    api.create_repo(weights_repo)
    api.upload_folder(repo_id=weights_repo, folder_path=tmp_path / "pipe")
    api.create_repo(code_repo)
    api.upload_folder(
        repo_id=code_repo,
        folder_path=_write_folder(
            tmp_path / "code", {"pipeline.py": CUSTOM_PIPELINE.encode(), "helper.py": b"MAGIC = 42\n"}
        ),
    )
    hub.reset_counts()
    loaded = DiffusionPipeline.from_pretrained(weights_repo, custom_pipeline=code_repo, trust_remote_code=True)
    assert type(loaded).__name__ == "MagicPipeline" and loaded() == 42
    _assert_same_weights(pipe.unet, loaded.unet)
    assert hub.count("info") >= 1 and hub.count("resolve", "GET") >= 2
