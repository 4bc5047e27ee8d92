"""An in-process, Hugging Face Hub-compatible HTTP server for tests (stdlib only).

`HubServer` speaks enough of the Hub's HTTP API that the real `huggingface_hub` client (`HfApi`, `hf_hub_download`,
`snapshot_download`, `upload_folder`, `create_commit`, ...) and diffusers' `from_pretrained` / `push_to_hub` work
against it unchanged. State lives in memory; nothing ever contacts huggingface.co.

What it does:

* repos (model, dataset and space) with commits, branches, tags and PR refs (`create_pr=True`); every commit gets a
  new 40-hex sha and moves its branch; commits are atomic: a commit that fails (validation error or injected failure)
  leaves the repo exactly as it was;
* uploads through `preupload` (answers "lfs" for paths matching the repo's `.gitattributes` LFS rules or the server's
  `lfs_patterns`, or bigger than `lfs_threshold`, "regular" otherwise), the git-LFS batch API with the *basic* transfer
  only (single PUT, plus a verify call), and the ndjson `commit` endpoint (`file`, `lfsFile`, `deletedFile`,
  `deletedFolder`). Xet is never offered: see "Xet" below;
* downloads through `HEAD`/`GET /{repo}/resolve/{rev}/{path}` with `X-Repo-Commit`, `ETag`, `X-Linked-Etag`,
  `X-Linked-Size`, `Content-Length` and `Range` support, and the 404s with `X-Error-Code` (`RepoNotFound`,
  `RevisionNotFound`, `EntryNotFound`) that the client turns into its typed exceptions;
* `model_info`/`dataset_info`/`repo_info` (also `/revision/{rev}`), `list_repo_tree`/`list_repo_files`,
  `get_paths_info`, `list_repo_refs`, `list_repo_commits`, `create_branch`/`delete_branch`, `create_tag`/`delete_tag`,
  `update_repo_settings(private=...)`, `delete_repo`, `whoami`, `file_exists`/`repo_exists`;
* failure injection (`fail_next`) and request counters (`count`, `counts`) for tests.

Authentication: writes need `Authorization: Bearer <server.token>` (default ``"hf_test"``); reads of public repos
need nothing; private repos answer 404 `RepoNotFound` to anyone without the token, like the Hub.

Pointing the client at the server
---------------------------------
`huggingface_hub` reads `HF_ENDPOINT` once, when `huggingface_hub.constants` is imported, and bakes it into
`constants.ENDPOINT`, `constants.HUGGINGFACE_CO_URL_TEMPLATE` (used by `hf_hub_download`/`hf_hub_url` unless they
get `endpoint=`) and the module-level `HfApi` instance behind `huggingface_hub.model_info`, `upload_folder`, ... (the
`model_info` diffusers calls). `HfApi(endpoint=url)` alone is therefore NOT enough for diffusers' `from_pretrained`.
Either of these works:

1. Set the environment before anything imports `huggingface_hub` (or diffusers/transformers), at the very top of
   `tests/conftest.py`::

       import os, sys, tempfile
       import pytest
       sys.path.insert(0, os.path.dirname(__file__))  # not needed if tests/ is a package: `from tests.hub_server`
       from hub_server import HubServer, hub_env, reserve_port  # stdlib only: safe to import first

       _HUB_PORT = reserve_port()
       _HF_HOME = tempfile.mkdtemp(prefix="hf_home_")
       os.environ.update(hub_env(f"http://127.0.0.1:{_HUB_PORT}", hf_home=_HF_HOME))

       @pytest.fixture(scope="session")
       def hub_server():
           with HubServer(port=_HUB_PORT) as server:
               yield server

2. Or patch at run time, which works whatever was imported before (the usual case inside a pytest session, where
   test modules import diffusers at collection)::

       @pytest.fixture(scope="module")
       def hub(tmp_path_factory):
           with HubServer() as server, hub_environment(server, tmp_path_factory.mktemp("hf_home")):
               yield server

   `hub_environment` sets the `hub_env` variables (restored on exit) and patches the import-time copies in the
   modules already loaded: `huggingface_hub.constants` (ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, HF_HUB_DISABLE_XET,
   HF_HUB_DISABLE_TELEMETRY, HF_HUB_OFFLINE, HF_HOME, HF_HUB_CACHE, token paths), `huggingface_hub.hf_api.api`'s
   endpoint, diffusers' HF_MODULES_CACHE (where remote code is copied to) and its telemetry/offline flags. It also
   closes `huggingface_hub`'s pooled HTTP client, so no keep-alive connection to a stopped server is reused.

Environment variables that matter (all set by `hub_env`): HF_ENDPOINT; HF_HUB_DISABLE_XET=1 (REQUIRED for uploads:
with `hf_xet` installed, huggingface_hub 2.4 uploads through Xet unconditionally, without asking the server, see
below); HF_HUB_DISABLE_TELEMETRY=1 (otherwise building the user agent fetches `{HF_ENDPOINT}/api/agent-harnesses`
once a day, which the server answers anyway); HF_HOME/HF_HUB_CACHE/HF_MODULES_CACHE (caches in a temp dir);
HF_TOKEN (module-level helpers and diffusers then send the token without `token=`); HF_HUB_OFFLINE=0; NO_PROXY.

Xet: in huggingface_hub 2.4 `_commit_api._upload_files` takes the Xet path whenever `is_xet_available()` is true,
i.e. `hf_xet` is importable and `constants.HF_HUB_DISABLE_XET` is false; the preupload/LFS-batch answers are not
consulted. So HF_HUB_DISABLE_XET=1 (or `constants.HF_HUB_DISABLE_XET = True` at run time: it is read on every call)
is what keeps uploads on plain LFS. Downloads only use Xet when the HEAD response carries `X-Xet-*` headers, which
this server never sends.

Failure injection and counters::

    server.fail_next("commit")                        # next commit answers 500 (the client does not retry it)
    server.fail_next("lfs_upload", status=503)        # one transient error: the client retries after ~1 s
    server.fail_next("lfs_upload", status=403, after=1)  # 2nd LFS PUT fails hard (4xx is not retried)
    server.fail_next("resolve", predicate=lambda r: r.path_in_repo == "model_index.json" and r.method == "GET")
    server.fail_next(lambda r: r.method == "POST", status=0)  # status 0: drop the connection, no answer
    server.count("lfs_upload"); server.count("resolve", "HEAD"); server.counts; server.reset_counts()

Request kinds: whoami, create_repo, delete_repo, repo_settings, info, tree, paths_info, preupload, commit, refs,
commits, branch, tag, lfs_batch, lfs_upload, lfs_verify, resolve, validate_yaml, agent_harnesses, telemetry, unknown.
The client's retry policy (huggingface_hub 2.4): preupload, lfs_batch, lfs_upload, lfs_verify and tree go through
`http_backoff`, which retries 408/429/5xx and dropped connections up to 5 times, sleeping 1, 2, 4, 8, 8 s; commit,
info, create_repo and whoami are not retried. A failed resolve HEAD is retried (with backoff) only when the file is
not cached yet; otherwise `hf_hub_download` silently returns the cached copy.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import datetime
import fnmatch
import hashlib
import json
import os
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "DEFAULT_LFS_PATTERNS",
    "DEFAULT_LFS_THRESHOLD",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "HubServer",
    "Request",
    "hub_env",
    "hub_environment",
    "reserve_port",
]

DEFAULT_TOKEN = "hf_test"
DEFAULT_USER = "user"
DEFAULT_LFS_THRESHOLD = 1024 * 1024  # bytes; anything bigger goes through LFS
# Subset of the `.gitattributes` a new repo gets on the Hub (+ images), matched like gitattributes patterns.
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif",
)  # fmt: skip

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_SPEC = "https://git-lfs.github.com/spec/v1"


# ---------------------------------------------------------------------------------------------------------------------
# Environment helpers
# ---------------------------------------------------------------------------------------------------------------------


def reserve_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now, so `HF_ENDPOINT` can be set before the server starts.

    The port is released before returning (another process could grab it in between; in a test session this does
    not happen in practice). Pass it to `HubServer(port=...)`.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def hub_env(url: str, hf_home: str | os.PathLike | None = None, token: str | None = DEFAULT_TOKEN) -> dict[str, str]:
    """Environment variables that point `huggingface_hub`/diffusers at the server at `url`.

    Apply them (`os.environ.update(...)`) before `huggingface_hub` is imported, or use `hub_environment` at run time.
    """
    env = {
        "HF_ENDPOINT": url.rstrip("/"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    if hf_home is not None:
        home = os.fspath(hf_home)
        env["HF_HOME"] = home
        env["HF_HUB_CACHE"] = os.path.join(home, "hub")
        env["HF_XET_CACHE"] = os.path.join(home, "xet")
        env["HF_MODULES_CACHE"] = os.path.join(home, "modules")
    host = urlsplit(url).hostname or "127.0.0.1"
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), host, "localhost") if x)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    return env


@contextlib.contextmanager
def hub_environment(
    server_or_url: HubServer | str,
    hf_home: str | os.PathLike | None = None,
    token: str | None = None,
) -> Iterator[dict[str, str]]:
    """Point the current process at the server, even if `huggingface_hub`/diffusers are already imported.

    Sets the variables of `hub_env` in `os.environ` and patches the import-time copies of them in the modules that
    are already loaded (see the module docstring). Everything is restored on exit. Yields the environment mapping.
    """
    if isinstance(server_or_url, HubServer):
        url = server_or_url.url
        token = token if token is not None else server_or_url.token
    else:
        url = str(server_or_url).rstrip("/")
        token = token if token is not None else DEFAULT_TOKEN
    env = hub_env(url, hf_home=hf_home, token=token)

    saved_env = {key: os.environ.get(key) for key in env}
    saved_attrs: list[tuple[Any, str, Any]] = []

    def _set(module_name: str, attr: str, value: Any) -> None:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            saved_attrs.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)

    os.environ.update(env)
    try:
        hc = "huggingface_hub.constants"
        _set(hc, "ENDPOINT", env["HF_ENDPOINT"])
        _set(hc, "HUGGINGFACE_CO_URL_TEMPLATE", env["HF_ENDPOINT"] + "/{repo_id}/resolve/{revision}/{filename}")
        _set(hc, "HF_HUB_DISABLE_XET", True)
        _set(hc, "HF_HUB_DISABLE_TELEMETRY", True)
        _set(hc, "HF_HUB_OFFLINE", False)
        _set(hc, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        if hf_home is not None:
            home = os.fspath(hf_home)
            _set(hc, "HF_HOME", home)
            _set(hc, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
            _set(hc, "HUGGINGFACE_HUB_CACHE", env["HF_HUB_CACHE"])
            _set(hc, "HF_XET_CACHE", env["HF_XET_CACHE"])
            _set(hc, "HF_ASSETS_CACHE", os.path.join(home, "assets"))
            _set(hc, "HF_TOKEN_PATH", os.path.join(home, "token"))
            _set(hc, "HF_STORED_TOKENS_PATH", os.path.join(home, "stored_tokens"))
            _set(hc, "AGENT_HARNESSES_PATH", os.path.join(home, ".agent_harnesses.json"))
            # the `diffusers_modules` package is bound to the modules cache it was first created in: once remote
            # code has been loaded in this process, moving the cache would make new modules unimportable
            if "diffusers_modules" not in sys.modules:
                for name in ("diffusers.utils.constants", "diffusers.utils", "diffusers.utils.dynamic_modules_utils"):
                    _set(name, "HF_MODULES_CACHE", env["HF_MODULES_CACHE"])
        api_module = sys.modules.get("huggingface_hub.hf_api")
        if api_module is not None and getattr(api_module, "api", None) is not None:
            saved_attrs.append((api_module.api, "endpoint", api_module.api.endpoint))
            api_module.api.endpoint = env["HF_ENDPOINT"]
        for name in ("diffusers.utils.constants", "diffusers.utils", "diffusers.utils.hub_utils"):
            _set(name, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", env["HF_ENDPOINT"])
        _set("diffusers.utils.hub_utils", "HF_HUB_DISABLE_TELEMETRY", True)
        _set("diffusers.utils.hub_utils", "HF_HUB_OFFLINE", False)
        _close_hf_session()
        yield env
    finally:
        for obj, attr, value in reversed(saved_attrs):
            setattr(obj, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _close_hf_session()


def _close_hf_session() -> None:
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None and hasattr(http, "close_session"):
        with contextlib.suppress(Exception):
            http.close_session()


# ---------------------------------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------------------------------


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclasses.dataclass(frozen=True)
class _Entry:
    size: int
    sha256: str  # sha256 of the content: key in the blob store, LFS oid
    git_oid: str  # git blob id: of the content (regular) or of the LFS pointer file (LFS)
    lfs: bool
    pointer_size: int
    last_commit: str  # sha of the commit that last wrote this path


@dataclasses.dataclass(frozen=True)
class _Commit:
    sha: str
    parents: tuple[str, ...]
    files: Mapping[str, _Entry]
    title: str
    message: str
    date: str
    author: str


@dataclasses.dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    uid: str
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)  # also holds "refs/pr/N"
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    num_prs: int = 0


@dataclasses.dataclass
class Request:
    """What a failure predicate gets to look at."""

    method: str
    path: str  # URL path, still quoted
    query: dict[str, list[str]]
    headers: Mapping[str, str]  # names lower-cased
    kind: str
    repo_type: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    path_in_repo: str | None = None
    body: bytes = b""


@dataclasses.dataclass
class _FailRule:
    kind: str | None  # None: any kind
    predicate: Callable[[Request], bool] | None
    times: int
    status: int
    message: str
    error_code: str | None
    after: int


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclasses.dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = "application/json"
    content_length: int | None = None  # for HEAD: length of the body a GET would send


def _json(data: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status=status, body=json.dumps(data).encode(), content_type=content_type)


class _DropConnection(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # an idle keep-alive connection frees its thread after this many seconds

    def setup(self) -> None:
        super().setup()
        self.server.hub._track_connection(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        with contextlib.suppress(Exception):
            super().finish()
        self.server.hub._track_connection(self.connection, False)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence request lines
        pass

    def _dispatch(self) -> None:
        self.server.hub._handle(self)  # type: ignore[attr-defined]

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:  # no tracebacks on stderr for resets
        pass


# ---------------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------------


class HubServer:
    """A fake Hugging Face Hub on `http://{host}:{port}`, served from daemon threads of the current process.

    Args:
        port: port to bind (0: pick a free one; use `reserve_port()` to choose it before `HF_ENDPOINT` is set).
        host: interface to bind.
        token: the only token accepted for writes and private reads.
        user: the user name `whoami` returns (and the default namespace of `create_repo("name")`).
        lfs_patterns: gitattributes-style patterns of paths uploaded through LFS; also written to the `.gitattributes`
            of new repos.
        lfs_threshold: files bigger than this many bytes go through LFS whatever their name.
        initial_commit: give new repos an "initial commit" holding `.gitattributes`, like the Hub does.

    Use as a context manager (`with HubServer() as server:`) or call `start()`/`shutdown()`.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        token: str = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        lfs_patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        initial_commit: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.user = user
        self.lfs_patterns = tuple(lfs_patterns)
        self.lfs_threshold = lfs_threshold
        self.initial_commit = initial_commit

        self._lock = threading.RLock()  # guards repos, blobs, counters, failure rules
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content (regular files and LFS objects)
        self._lfs_objects: set[str] = set()  # sha256 of objects received through the LFS upload endpoint
        self._counts: collections.Counter[str] = collections.Counter()
        self._rules: list[_FailRule] = []
        self._errors: list[str] = []  # tracebacks of unexpected server-side exceptions
        self._log: collections.deque[tuple[str, str, str, int]] = collections.deque(maxlen=2000)
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"HubServer:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving, close the listening socket and every open connection. Idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        _close_hf_session()  # huggingface_hub's pooled keep-alive connections point at a dead server now

    close = shutdown

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    @property
    def url(self) -> str:
        """The endpoint, e.g. `http://127.0.0.1:54321` (what `HF_ENDPOINT`/`HfApi(endpoint=...)` take)."""
        return f"http://{self.host}:{self.port}"

    endpoint = url

    def env(self, hf_home: str | os.PathLike | None = None) -> dict[str, str]:
        """`hub_env(self.url, hf_home, self.token)`."""
        return hub_env(self.url, hf_home=hf_home, token=self.token)

    # -- failure injection & counters --------------------------------------------------------------------------------

    def fail_next(
        self,
        kind: str | Callable[[Request], bool] | None,
        times: int = 1,
        status: int = 500,
        *,
        after: int = 0,
        predicate: Callable[[Request], bool] | None = None,
        message: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Make the next `times` matching requests fail, after letting `after` matching requests through.

        `kind` is a request kind (see the module docstring), `None`/`"*"` for any, or a predicate on `Request`.
        `predicate` narrows a kind further. `status` is the HTTP status answered (`0`: close the connection without
        answering); `error_code` sets `X-Error-Code`. A failing request changes nothing on the server.
        """
        if callable(kind):
            kind, predicate = None, _both(kind, predicate)
        rule = _FailRule(
            kind=None if kind in (None, "*") else kind,
            predicate=predicate,
            times=times,
            status=status,
            message=message or f"Injected failure ({kind or 'any'})",
            error_code=error_code,
            after=after,
        )
        with self._lock:
            self._rules.append(rule)

    def clear_failures(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def pending_failures(self) -> int:
        with self._lock:
            return sum(rule.times for rule in self._rules)

    def count(self, kind: str, method: str | None = None) -> int:
        """Number of requests of `kind` received so far (failed ones included), optionally of one HTTP method."""
        with self._lock:
            return self._counts[f"{kind}:{method.upper()}" if method else kind]

    @property
    def counts(self) -> dict[str, int]:
        """Snapshot of the counters: `{kind: n, "kind:METHOD": n}`."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._log.clear()

    @property
    def request_log(self) -> list[tuple[str, str, str, int]]:
        """The last requests as `(method, path, kind, status)`."""
        with self._lock:
            return list(self._log)

    @property
    def errors(self) -> list[str]:
        """Tracebacks of unexpected exceptions raised while serving (answered as 500). Should stay empty."""
        with self._lock:
            return list(self._errors)

    # -- direct (non-HTTP) access, for test setup and assertions ----------------------------------------------------

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False):
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                if exist_ok:
                    return
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            self._new_repo(repo_type, repo_id, private)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        """Commit sha `revision` points to."""
        with self._lock:
            return self._get_commit(self._get_repo(repo_type, repo_id), revision).sha

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """`{path: content}` of the repo at `revision`."""
        with self._lock:
            commit = self._get_commit(self._get_repo(repo_type, repo_id), revision)
            return {path: self._blobs[entry.sha256] for path, entry in sorted(commit.files.items())}

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        """Whether `path` is stored as an LFS file at `revision`."""
        with self._lock:
            commit = self._get_commit(self._get_repo(repo_type, repo_id), revision)
            if path not in commit.files:
                raise KeyError(path)
            return commit.files[path].lfs

    def commit_shas(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """History of `revision`, newest first."""
        with self._lock:
            return [c.sha for c in self._history(self._get_repo(repo_type, repo_id), revision)]

    @property
    def lfs_objects(self) -> set[str]:
        """sha256 of every object received through the LFS upload endpoint (committed or not)."""
        with self._lock:
            return set(self._lfs_objects)

    # -- internals: state --------------------------------------------------------------------------------------------

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs.setdefault(sha, data)
        return sha

    def _regular_entry(self, data: bytes, commit_sha: str) -> _Entry:
        sha = self._store(data)
        return _Entry(len(data), sha, _git_blob_oid(data), False, 0, commit_sha)

    def _lfs_entry(self, sha256: str, size: int, commit_sha: str) -> _Entry:
        pointer = f"version {_LFS_SPEC}\noid sha256:{sha256}\nsize {size}\n".encode()
        return _Entry(size, sha256, _git_blob_oid(pointer), True, len(pointer), commit_sha)

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, _now_iso(), uuid.uuid4().hex[:24])
        files: dict[str, _Entry] = {}
        sha = _new_sha()
        if self.initial_commit:
            lines = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in self.lfs_patterns]
            files[".gitattributes"] = self._regular_entry(("\n".join(lines) + "\n").encode(), sha)
        repo.commits[sha] = _Commit(sha, (), files, "initial commit", "", _now_iso(), self.user)
        repo.branches["main"] = sha
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool = True) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str | None) -> str | None:
        rev = revision or "main"
        for prefix, table in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in table:
                return table[rev[len(prefix) :]]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        if len(rev) == 40 and rev in repo.commits:
            return rev
        return None

    def _get_commit(self, repo: _Repo, revision: str | None) -> _Commit:
        sha = self._resolve(repo, revision)
        if sha is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _history(self, repo: _Repo, revision: str | None) -> list[_Commit]:
        out: list[_Commit] = []
        commit: _Commit | None = self._get_commit(repo, revision)
        while commit is not None:
            out.append(commit)
            commit = repo.commits[commit.parents[0]] if commit.parents else None
        return out

    def _is_lfs_path(self, commit: _Commit, path: str, size: int) -> bool:
        if size > self.lfs_threshold:
            return True
        patterns: list[str] = []
        attributes = commit.files.get(".gitattributes")
        if attributes is not None:
            for line in self._blobs[attributes.sha256].decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
                    patterns.append(parts[0])
        else:
            patterns = list(self.lfs_patterns)
        return any(_gitattributes_match(pattern, path) for pattern in patterns)

    # -- internals: HTTP ---------------------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        split = urlsplit(handler.path)
        query = parse_qs(split.query, keep_blank_values=True)
        try:
            body = _read_body(handler)
        except Exception:
            handler.close_connection = True
            return
        headers = {key.lower(): value for key, value in handler.headers.items()}
        request = Request(method, split.path, query, headers, "unknown", body=body)
        try:
            route = self._route(request)
        except _HubError as err:  # malformed URL
            route = None
            response = self._error_response(err)
        with self._lock:
            self._counts[request.kind] += 1
            self._counts[f"{request.kind}:{method}"] += 1
            rule = self._match_rule(request)
        try:
            if rule is not None:
                if rule.status == 0:
                    raise _DropConnection()
                headers = {"X-Error-Message": rule.message}
                if rule.error_code:
                    headers["X-Error-Code"] = rule.error_code
                response = self._error_response(_HubError(rule.status, rule.message, rule.error_code, headers))
            elif route is not None:
                try:
                    response = route()
                except _HubError as err:
                    response = self._error_response(err)
                except Exception:
                    with self._lock:
                        self._errors.append(traceback.format_exc())
                    response = self._error_response(_HubError(500, "Internal error in fake Hub server"))
            with self._lock:
                self._log.append((method, split.path, request.kind, response.status))
            _send(handler, response, head=method == "HEAD")
        except _DropConnection:
            with self._lock:
                self._log.append((method, split.path, request.kind, 0))
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)

    def _match_rule(self, request: Request) -> _FailRule | None:
        for rule in list(self._rules):
            if rule.kind is not None and rule.kind != request.kind:
                continue
            if rule.predicate is not None and not rule.predicate(request):
                continue
            if rule.after > 0:
                rule.after -= 1
                continue
            rule.times -= 1
            if rule.times <= 0:
                self._rules.remove(rule)
            return rule
        return None

    @staticmethod
    def _error_response(err: _HubError) -> _Response:
        response = _json({"error": err.message}, status=err.status)
        response.headers.update(err.headers)
        if err.code:
            response.headers.setdefault("X-Error-Code", err.code)
        response.headers.setdefault("X-Error-Message", err.message)
        return response

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization") or ""
        return auth == f"Bearer {self.token}"

    def _require_auth(self, request: Request) -> None:
        auth = request.headers.get("authorization")
        if not auth:
            raise _HubError(401, "You must be authenticated to access this resource.")
        if auth != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _route(self, request: Request) -> Callable[[], _Response] | None:
        """Classify the request (sets `request.kind` & co.) and return the function that answers it."""
        raw = request.path.split("/")[1:]
        seg = [unquote(s) for s in raw]
        method = request.method
        r = request

        def kind(name: str, fn: Callable[[], _Response] | None) -> Callable[[], _Response] | None:
            r.kind = name
            return fn

        if seg[:1] == ["api"]:
            rest = seg[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return kind("whoami", lambda: self._h_whoami(r))
            if rest == ["repos", "create"] and method == "POST":
                return kind("create_repo", lambda: self._h_create_repo(r))
            if rest == ["repos", "delete"] and method == "DELETE":
                return kind("delete_repo", lambda: self._h_delete_repo(r))
            if rest == ["validate-yaml"] and method == "POST":
                return kind("validate_yaml", lambda: _json({"errors": [], "warnings": []}))
            if rest == ["agent-harnesses"]:
                return kind("agent_harnesses", lambda: _json({"standardEnvVars": [], "harnesses": {}}))
            if rest[:1] == ["telemetry"]:
                return kind("telemetry", lambda: _json({}))
            if len(rest) >= 3 and rest[0] in _REPO_TYPES:
                r.repo_type = _REPO_TYPES[rest[0]]
                r.repo_id = f"{rest[1]}/{rest[2]}"
                tail = rest[3:]
                op = tail[0] if tail else ""
                arg = tail[1] if len(tail) > 1 else None
                if not tail and method == "GET":
                    return kind("info", lambda: self._h_info(r))
                if op == "revision" and arg is not None and method == "GET":
                    r.revision = "/".join(tail[1:])
                    return kind("info", lambda: self._h_info(r))
                if op == "tree" and arg is not None and method == "GET":
                    r.revision, r.path_in_repo = arg, "/".join(tail[2:]).strip("/")
                    return kind("tree", lambda: self._h_tree(r))
                if op == "paths-info" and arg is not None and method == "POST":
                    r.revision = arg
                    return kind("paths_info", lambda: self._h_paths_info(r))
                if op == "preupload" and arg is not None and method == "POST":
                    r.revision = arg
                    return kind("preupload", lambda: self._h_preupload(r))
                if op == "commit" and arg is not None and method == "POST":
                    r.revision = arg
                    return kind("commit", lambda: self._h_commit(r))
                if op == "refs" and method == "GET":
                    return kind("refs", lambda: self._h_refs(r))
                if op == "commits" and arg is not None and method == "GET":
                    r.revision = arg
                    return kind("commits", lambda: self._h_commits(r))
                if op == "branch" and arg is not None and method in ("POST", "DELETE"):
                    r.revision = arg
                    return kind("branch", lambda: self._h_branch(r))
                if op == "tag" and arg is not None and method in ("POST", "DELETE"):
                    r.revision = arg
                    return kind("tag", lambda: self._h_tag(r))
                if op == "settings" and method == "PUT":
                    return kind("repo_settings", lambda: self._h_settings(r))
            return kind("unknown", None) or (lambda: self._h_not_found(r))

        if seg[:1] == ["_lfs"] and len(seg) == 5 and method == "PUT":  # our own "presigned" upload URL
            r.repo_type, r.repo_id = seg[1], f"{seg[2]}/{seg[3]}"
            return kind("lfs_upload", lambda: self._h_lfs_upload(r, seg[4]))

        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = _REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 2 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"]:
            r.repo_type, r.repo_id = repo_type, f"{seg[0]}/{seg[1][: -len('.git')]}"
            if seg[5:] == ["batch"] and method == "POST":
                return kind("lfs_batch", lambda: self._h_lfs_batch(r))
            if seg[5:] == ["verify"] and method == "POST":
                return kind("lfs_verify", lambda: self._h_lfs_verify(r))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            r.repo_type, r.repo_id, r.revision = repo_type, f"{seg[0]}/{seg[1]}", seg[3]
            r.path_in_repo = "/".join(seg[4:])
            return kind("resolve", lambda: self._h_resolve(r))
        return kind("unknown", None) or (lambda: self._h_not_found(r))

    # -- handlers ----------------------------------------------------------------------------------------------------

    def _h_not_found(self, r: Request) -> _Response:
        raise _HubError(404, f"Not found: {r.method} {r.path}")

    def _h_whoami(self, r: Request) -> _Response:
        self._require_auth(r)
        return _json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.user,
                "fullname": "Test User",
                "email": f"{self.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _h_create_repo(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        name = payload.get("name")
        if not name or "/" in name:
            raise _HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        private = payload.get("visibility", "public") in ("private", "protected") or bool(payload.get("private"))
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                response = _json(
                    {"error": f"You already created this {repo_type} repo", "url": self._repo_url(existing)}, 409
                )
                response.headers["X-Error-Message"] = f"You already created this {repo_type} repo"
                return response
            repo = self._new_repo(repo_type, repo_id, private)
        return _json({"url": self._repo_url(repo), "name": repo_id, "id": repo.uid})

    def _h_delete_repo(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        with self._lock:
            self._get_repo(payload.get("type") or "model", repo_id)
            del self._repos[(payload.get("type") or "model", repo_id)]
        return _json({})

    def _h_settings(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id)
            if "visibility" in payload:
                repo.private = payload["visibility"] in ("private", "protected")
            if "private" in payload:
                repo.private = bool(payload["private"])
        return _json({})

    def _file_json(self, path: str, entry: _Entry, expand: bool, repo: _Repo) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            commit = repo.commits[entry.last_commit]
            data["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
            data["securityFileStatus"] = {"status": "safe", "avScan": {"virusFound": False}, "pickleImportScan": None}
        return data

    @staticmethod
    def _folder_json(path: str, commit: _Commit, expand: bool, repo: _Repo) -> dict[str, Any]:
        prefix = path + "/"
        inside = sorted((p, e) for p, e in commit.files.items() if p.startswith(prefix))
        oid = hashlib.sha1(json.dumps([(p, e.git_oid) for p, e in inside]).encode()).hexdigest()
        data: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
        if expand:
            last = max((repo.commits[e.last_commit] for _, e in inside), key=lambda c: c.date)
            data["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
        return data

    def _h_info(self, r: Request) -> _Response:
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            commit = self._get_commit(repo, r.revision)
            blobs = _truthy(r.query.get("blobs"))
            siblings = []
            for path, entry in sorted(commit.files.items()):
                sibling: dict[str, Any] = {"rfilename": path}
                if blobs:
                    sibling.update(size=entry.size, blobId=entry.git_oid)
                    if entry.lfs:
                        sibling["lfs"] = {
                            "size": entry.size,
                            "sha256": entry.sha256,
                            "pointerSize": entry.pointer_size,
                        }
                siblings.append(sibling)
            data: dict[str, Any] = {
                "_id": repo.uid,
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
            if repo.repo_type == "model":
                data["modelId"] = repo.repo_id
                data["spaces"] = []
            if repo.repo_type == "space":
                data["sdk"] = "static"
        return _json(data)

    def _h_tree(self, r: Request) -> _Response:
        recursive = _truthy(r.query.get("recursive"))
        expand = _truthy(r.query.get("expand"))
        base = r.path_in_repo or ""
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            commit = self._get_commit(repo, r.revision)
            prefix = base + "/" if base else ""
            files = {p: e for p, e in commit.files.items() if p.startswith(prefix)}
            if base and not files:
                raise _HubError(404, f"Path {base} does not exist", "EntryNotFound")
            folders: set[str] = set()
            for p in files:
                parts = p[len(prefix) :].split("/")
                for i in range(1, len(parts)):
                    folders.add(prefix + "/".join(parts[:i]))
            entries: list[dict[str, Any]] = []
            for folder in sorted(folders):
                if recursive or "/" not in folder[len(prefix) :]:
                    entries.append(self._folder_json(folder, commit, expand, repo))
            for p in sorted(files):
                if recursive or "/" not in p[len(prefix) :]:
                    entries.append(self._file_json(p, files[p], expand, repo))
        return _json(entries)

    def _h_paths_info(self, r: Request) -> _Response:
        content_type = r.headers.get("content-type") or ""
        if "json" in content_type:
            form = _json_body(r)
            paths, expand = form.get("paths") or [], bool(form.get("expand"))
        else:
            form = parse_qs(r.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy(form.get("expand"))
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            commit = self._get_commit(repo, r.revision)
            out = []
            for path in paths:
                path = path.strip("/")
                if path in commit.files:
                    out.append(self._file_json(path, commit.files[path], expand, repo))
                elif any(p.startswith(path + "/") for p in commit.files):
                    out.append(self._folder_json(path, commit, expand, repo))
        return _json(out)

    def _h_refs(self, r: Request) -> _Response:
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            branches = [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                for n, s in sorted(repo.branches.items())
                if not n.startswith("refs/")
            ]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
            data: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
            if _truthy(r.query.get("include_prs")):
                data["pullRequests"] = [
                    {"name": n[len("refs/") :], "ref": n, "targetCommit": s}
                    for n, s in sorted(repo.branches.items())
                    if n.startswith("refs/pr/")
                ]
        return _json(data)

    def _h_commits(self, r: Request) -> _Response:
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            history = self._history(repo, r.revision)
            data = [
                {"id": c.sha, "title": c.title, "message": c.message, "date": c.date, "authors": [{"user": c.author}]}
                for c in history
            ]
        return _json(data)

    def _h_branch(self, r: Request) -> _Response:
        self._require_auth(r)
        branch = r.revision or ""
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id)
            if r.method == "DELETE":
                if branch not in repo.branches:
                    raise _HubError(404, f"Branch {branch} not found", "RevisionNotFound")
                if branch == "main":
                    raise _HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return _json({})
            if branch in repo.branches:
                raise _HubError(409, f"Branch {branch} already exists")
            starting_point = _json_body(r).get("startingPoint")
            repo.branches[branch] = self._get_commit(repo, starting_point).sha
        return _json({})

    def _h_tag(self, r: Request) -> _Response:
        self._require_auth(r)
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id)
            if r.method == "DELETE":
                if r.revision not in repo.tags:
                    raise _HubError(404, f"Tag {r.revision} not found", "RevisionNotFound")
                del repo.tags[r.revision]
                return _json({})
            tag = _json_body(r).get("tag")
            if not tag:
                raise _HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise _HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._get_commit(repo, r.revision).sha
        return _json({})

    def _h_preupload(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        files = payload.get("files")
        if not isinstance(files, list):
            raise _HubError(400, "Missing 'files'")
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id)
            commit = self._get_commit(repo, r.revision)
            gitignore = payload.get("gitIgnore")
            if gitignore is None and ".gitignore" in commit.files:
                gitignore = self._blobs[commit.files[".gitignore"].sha256].decode(errors="replace")
            ignore_patterns = _gitignore_patterns(gitignore or "")
            out = []
            for f in files:
                path, size = f["path"], int(f.get("size") or 0)
                existing = commit.files.get(path)
                oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
                out.append(
                    {
                        "path": path,
                        "uploadMode": "lfs" if self._is_lfs_path(commit, path, size) else "regular",
                        "shouldIgnore": _gitignored(ignore_patterns, path),
                        "oid": oid,
                    }
                )
        return _json({"files": out, "commitOid": commit.sha})

    def _h_lfs_batch(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        if payload.get("operation") != "upload":
            raise _HubError(400, "Only the 'upload' operation is supported by this fake Hub")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise _HubError(422, f"No supported transfer adapter among {transfers} (this server only offers 'basic')")
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id)
            objects = []
            for obj in payload.get("objects") or []:
                oid, size = str(obj.get("oid")), int(obj.get("size") or 0)
                item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in self._lfs_objects:
                    ns, name = repo.repo_id.split("/")
                    href = f"{self.url}/_lfs/{repo.repo_type}/{quote(ns)}/{quote(name)}/{oid}?size={size}"
                    verify = f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects/verify"
                    item["actions"] = {"upload": {"href": href}, "verify": {"href": verify}}
                objects.append(item)
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _h_lfs_upload(self, r: Request, oid: str) -> _Response:
        size = r.query.get("size", [None])[0]
        digest = hashlib.sha256(r.body).hexdigest()
        if digest != oid or (size is not None and int(size) != len(r.body)):
            raise _HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        with self._lock:
            self._blobs.setdefault(oid, r.body)
            self._lfs_objects.add(oid)
        return _Response(200, b"", content_type="text/plain")

    def _h_lfs_verify(self, r: Request) -> _Response:
        self._require_auth(r)
        payload = _json_body(r)
        with self._lock:
            self._get_repo(r.repo_type, r.repo_id)
            oid = payload.get("oid")
            if oid not in self._lfs_objects or len(self._blobs[oid]) != int(payload.get("size", -1)):
                raise _HubError(404, f"Object {oid} not found")
        return _json({"oid": oid, "size": payload.get("size")}, content_type="application/vnd.git-lfs+json")

    def _h_commit(self, r: Request) -> _Response:
        self._require_auth(r)
        try:
            lines = [json.loads(line) for line in r.body.decode().splitlines() if line.strip()]
        except ValueError as exc:
            raise _HubError(400, f"Invalid ndjson payload: {exc}") from exc
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise _HubError(400, "Missing commit header")
        create_pr = _truthy(r.query.get("create_pr"))
        with self._lock:  # validate + build the new tree, then move the ref: all or nothing
            repo = self._get_repo(r.repo_type, r.repo_id)
            base = self._get_commit(repo, r.revision)
            revision = r.revision or "main"
            if revision.startswith("refs/heads/"):
                revision = revision[len("refs/heads/") :]
            if not create_pr and revision not in repo.branches:
                raise _HubError(400, f"Cannot commit to '{revision}': not a branch")
            parent = header.get("parentCommit")
            if parent and parent != base.sha:
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = _new_sha()
            files = dict(base.files)
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                if key == "header":
                    continue
                path = str(value.get("path", "")).strip("/")
                if key in ("file", "lfsFile") and not path:
                    raise _HubError(400, "Missing path")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HubError(400, f"Unsupported encoding {value.get('encoding')}")
                    files[path] = self._regular_entry(base64.b64decode(value.get("content", "")), sha)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    if oid not in self._lfs_objects:
                        raise _HubError(
                            422,
                            f"Your push was rejected because an LFS pointer pointed to a file that does not exist"
                            f" in our storage ({path}: {oid}).",
                        )
                    files[path] = self._lfs_entry(oid, len(self._blobs[oid]), sha)
                elif key == "deletedFile":
                    if path not in files:
                        raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    doomed = [p for p in files if p.startswith(path + "/")] if path else list(files)
                    if not doomed:
                        raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise _HubError(400, f"Unknown commit operation {key!r}")
            for path in files:  # a path cannot be both a file and a folder
                if any(p.startswith(path + "/") for p in files):
                    raise _HubError(400, f"'{path}' is both a file and a folder")
            summary = header.get("summary") or "Update"
            repo.commits[sha] = _Commit(
                sha, (base.sha,), files, summary, header.get("description") or "", _now_iso(), self.user
            )
            pr_url = None
            if create_pr:
                repo.num_prs += 1
                repo.branches[f"refs/pr/{repo.num_prs}"] = sha
                pr_url = f"{self._repo_url(repo)}/discussions/{repo.num_prs}"
            else:
                repo.branches[revision] = sha
        return _json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(repo)}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _h_resolve(self, r: Request) -> _Response:
        with self._lock:
            repo = self._get_repo(r.repo_type, r.repo_id, self._authorized(r))
            commit = self._get_commit(repo, r.revision)
            entry = commit.files.get(r.path_in_repo or "")
            if entry is None:
                raise _HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
            data = self._blobs[entry.sha256]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status, body = 200, data
        range_header = r.headers.get("range")
        if range_header and r.method == "GET":
            span = _parse_range(range_header, len(data))
            if span is None:
                response = _Response(416, b"", {"Content-Range": f"bytes */{len(data)}"}, "text/plain")
                return response
            start, end = span
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(status, body, headers, "application/octet-stream")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _new_sha() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def _both(a: Callable[[Request], bool], b: Callable[[Request], bool] | None) -> Callable[[Request], bool]:
    return a if b is None else (lambda request: a(request) and b(request))


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes", "on")


def _json_body(r: Request) -> dict[str, Any]:
    if not r.body:
        return {}
    try:
        data = json.loads(r.body)
    except ValueError as exc:
        raise _HubError(400, f"Invalid JSON body: {exc}") from exc
    if not isinstance(data, dict):
        raise _HubError(400, "JSON body must be an object")
    return data


def _gitattributes_match(pattern: str, path: str) -> bool:
    if "/" not in pattern.rstrip("/"):
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


def _gitignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(("#", "!"))]


def _gitignored(patterns: list[str], path: str) -> bool:
    for pattern in patterns:
        if pattern.endswith("/"):
            folder = pattern.strip("/")
            parts = path.split("/")[:-1]
            if ("/" in folder and (path + "/").startswith(folder + "/")) or any(
                fnmatch.fnmatchcase(part, folder) for part in parts
            ):
                return True
        elif _gitattributes_match(pattern, path):
            return True
    return False


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    value = value.strip()
    if not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes=") :].partition("-")
    try:
        if first == "":  # suffix range: last N bytes
            n = int(last)
            return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            line = handler.rfile.readline()
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline().strip():  # trailers
                    pass
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


def _send(handler: BaseHTTPRequestHandler, response: _Response, head: bool) -> None:
    handler.send_response(response.status)
    handler.send_header("Content-Type", response.content_type)
    handler.send_header("Content-Length", str(len(response.body)))
    for key, value in response.headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    if not head and response.body:
        handler.wfile.write(response.body)
    handler.wfile.flush()


def _self_check() -> None:  # pragma: no cover - manual smoke test: python tests/hub_server.py
    with HubServer() as server:
        print(f"fake Hub listening on {server.url} (token {server.token!r}); Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    _self_check()
