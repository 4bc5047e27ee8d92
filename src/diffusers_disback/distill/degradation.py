"""Stage 1, degradation recording: fine-tune a copy of the teacher on the initial generator's samples and keep a path.

The path `P_0 = teacher, P_1, ..., P_N` holds snapshots of the degrading score `s_theta'` (paper Sec. 3.2). A node is
either the full state dict of `s_theta'` or, when `s_theta'` is trained as a LoRA adapter on the teacher, that
adapter's weights (a few percent of the bytes; switching nodes is then an adapter switch, not a reload).

On disk::

    path_dir/
      path_manifest.json     format, kind, teacher architecture fingerprint, LoRA config, nodes (index, step, kind,
                             file, sha256, bytes, distance to the teacher when measured), the path's profile
      path_profile.png       where the nodes lie (distance to the teacher vs stage-1 step), when profiled
      node_001.safetensors   P_1 (full state dict, or the LoRA adapter's weights)
      ...

`P_0` is the teacher itself and is never stored. Every write is atomic (temporary file, then rename), so a run killed
mid-write leaves the previous manifest and nodes intact. Loading verifies sha256 and loads strictly.

The public reference code appended the live model to its path list (a reference, not a snapshot) and loaded nodes
with `strict=False` after saving them with wrapper prefixes, so nothing loaded. Here a node is a copy written to
disk, and a node that does not match the model is an error that names the keys.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_text, failpoint
from .lora import LORA_ADAPTER, SharedBase, merge_lora

MANIFEST_NAME = "path_manifest.json"
FORMAT_VERSION = 1
NODE_KINDS = ("full", "lora")


class PathError(ValueError):
    """A degradation path that is missing, corrupt, or does not fit the model it is used with."""


@dataclass
class PathNode:
    """One node of the path: `index` 0 is the teacher (no file); `step` is the stage-1 step it was taken at;
    `distance` its distance to the teacher when it was recorded (`distill.profile`; None if not measured)."""

    index: int
    step: int
    kind: str  # "teacher" | "full" | "lora"
    file: str | None = None
    sha256: str | None = None
    num_bytes: int = 0
    distance: float | None = None


@dataclass
class DegradationPath:
    """
    A recorded degradation path (see the module docstring). Build one with [`DegradationPath.create`] and
    [`DegradationPath.add_node`] during stage 1; open one with [`DegradationPath.load`].
    """

    directory: str
    kind: str
    architecture: dict
    nodes: list[PathNode] = field(default_factory=list)
    lora_config: dict | None = None
    profile: dict | None = None  # `PathProfile.to_dict()`, once the path is profiled
    # node index -> (size, mtime) of its file when its sha256 was last checked: each node is hashed once
    _verified: dict[int, tuple[int, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------------------------------------ writing

    @classmethod
    def create(
        cls, directory: str | os.PathLike, teacher: torch.nn.Module, kind: str = "full", lora_config=None
    ) -> DegradationPath:
        """
        Starts a path whose node 0 is `teacher`. `kind="lora"` needs the peft `LoraConfig` the degrading copy is
        trained with (see [`add_lora_adapter`]). Refuses a folder that already holds a path.
        """
        if kind not in NODE_KINDS:
            raise ValueError(f"kind must be one of {NODE_KINDS}, got {kind!r}")
        if kind == "lora" and lora_config is None:
            raise ValueError("a LoRA path needs the `lora_config` its adapter is trained with")
        directory = os.fspath(directory)
        if os.path.exists(os.path.join(directory, MANIFEST_NAME)):
            raise PathError(
                f"{directory} already holds a degradation path; open it with DegradationPath.load or choose another "
                "folder (nothing was overwritten)."
            )
        os.makedirs(directory, exist_ok=True)
        config = _lora_config_to_dict(lora_config) if lora_config is not None else None
        path = cls(directory, kind, architecture_fingerprint(teacher), [PathNode(0, 0, "teacher")], config)
        path._write_manifest()
        return path

    def add_node(
        self, model: torch.nn.Module | dict[str, torch.Tensor], step: int, distance: float | None = None
    ) -> PathNode:
        """
        Snapshots the degrading copy `s_theta'` as the next node: its full state dict, or for a LoRA path the weights
        of its `degradation` adapter. `model` may also be that state dict already gathered (e.g. by
        `accelerator.get_state_dict` under FSDP). `distance`: its measured distance to the teacher, kept in the
        manifest. Written atomically; returns the new node.
        """
        self._check_next_step(step)
        if isinstance(model, torch.nn.Module):
            if self.kind == "full":
                state = model.state_dict()
            else:
                from peft import get_peft_model_state_dict

                state = get_peft_model_state_dict(model, adapter_name=LORA_ADAPTER)
            _check_architecture(self.architecture, model)
        else:
            state = dict(model)
            if self.kind == "full" and _fingerprint_keys(state)["keys_sha256"] != self.architecture["keys_sha256"]:
                raise PathError("the state dict does not match the teacher architecture this path was started from")
        if self.kind == "full" and any("lora_" in k for k in state):
            raise PathError("this is a full-weight path but the model carries LoRA layers; use kind='lora'")
        if self.kind == "lora" and not state:
            raise PathError(f"the model has no LoRA adapter named {LORA_ADAPTER!r}; see add_lora_adapter")
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
        index = len(self.nodes)
        file = f"node_{index:03d}.safetensors"
        target = os.path.join(self.directory, file)
        atomic_write(target, lambda tmp: save_file(state, tmp))  # no metadata: its order differs per process
        failpoint("path_node")  # a node file the manifest does not list yet: written again on resume
        node = PathNode(index, int(step), self.kind, file, _sha256(target), os.path.getsize(target), distance)
        self.nodes.append(node)
        self._write_manifest()
        return node

    def _check_next_step(self, step: int) -> None:
        if step <= self.nodes[-1].step and len(self.nodes) > 1:
            raise ValueError(f"node steps must increase: last node was at step {self.nodes[-1].step}, got {step}")

    def keep_nodes(self, candidates: DegradationPath, indices: list[int]) -> None:
        """
        Makes candidates `indices` (nodes of `candidates`, a densely recorded path of the same teacher) this path's
        nodes, in order: each file is linked (or copied) after its sha256 is checked, and the manifest is written
        once, after every file is in place. `candidates` is left as it was (remove it once this path is safe).
        """
        if candidates.kind != self.kind or candidates.architecture != self.architecture:
            raise PathError("the candidates were recorded with another node kind or teacher than this path")
        if len(self.nodes) > 1:
            raise PathError(f"{self.directory} already has nodes; keep_nodes fills a path that has only the teacher")
        nodes = list(self.nodes)
        for i in indices:
            source = candidates.nodes[i]
            candidates._verify_node(source)
            if nodes[-1].index and source.step <= nodes[-1].step:
                raise ValueError(f"node steps must increase: {source.step} after {nodes[-1].step}")
            file = f"node_{len(nodes):03d}.safetensors"
            target = os.path.join(self.directory, file)
            _link_or_copy(os.path.join(candidates.directory, source.file), target)
            nodes.append(
                PathNode(len(nodes), source.step, self.kind, file, source.sha256, source.num_bytes, source.distance)
            )
        self.nodes = nodes
        self._write_manifest()

    def set_profile(self, profile) -> None:
        """Stores a `distill.profile.PathProfile` (or its dict) in the manifest."""
        self.profile = profile if isinstance(profile, dict) else profile.to_dict()
        self._write_manifest()

    def truncate(self, after_step: int) -> list[PathNode]:
        """
        Drops the nodes recorded after `after_step` (files and manifest entries) and returns them: a run resumed from
        a checkpoint at that step records them again, so the path equals an uninterrupted run's.
        """
        dropped = [n for n in self.nodes[1:] if n.step > after_step]
        if not dropped:
            return []
        self.nodes = [n for n in self.nodes if n.index == 0 or n.step <= after_step]
        self.profile = None  # of the nodes that were
        self._write_manifest()
        for node in dropped:
            file = os.path.join(self.directory, node.file)
            if os.path.exists(file):
                os.remove(file)
        return dropped

    def _write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "architecture": self.architecture,
            "lora_config": self.lora_config,
            "nodes": [asdict(n) for n in self.nodes],
            "profile": self.profile,
        }
        atomic_write_text(os.path.join(self.directory, MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------------ reading

    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> DegradationPath:
        """Opens a path; with `verify=True` every node file is checked against the manifest's sha256 and size."""
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            raise PathError(f"no degradation path at {directory}: {MANIFEST_NAME} is missing")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            nodes = [PathNode(**n) for n in manifest["nodes"]]
            path = cls(
                directory, manifest["kind"], manifest["architecture"], nodes, manifest.get("lora_config"),
                manifest.get("profile"),
            )  # fmt: skip
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PathError(f"{manifest_path} is not a valid path manifest ({type(e).__name__}: {e})") from e
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PathError(f"{manifest_path} has format_version {manifest.get('format_version')}, expected 1")
        if [n.index for n in nodes] != list(range(len(nodes))) or not nodes or nodes[0].kind != "teacher":
            raise PathError(f"{manifest_path}: nodes must be numbered 0..N with node 0 the teacher")
        if verify:
            path.verify()
        return path

    def verify(self) -> None:
        """Checks that every node file exists and matches the manifest (size and sha256)."""
        for node in self.nodes[1:]:
            self._verify_node(node)

    def mark_verified(self) -> None:
        """Records every node file, as it is now, as checked (another process on this machine verified them, e.g. the
        local main process of a multi-GPU run): reads then hash nothing unless a file changes."""
        for node in self.nodes[1:]:
            stat = os.stat(os.path.join(self.directory, node.file))
            self._verified[node.index] = (stat.st_size, stat.st_mtime_ns)

    def _verify_node(self, node: PathNode) -> None:
        """Checks one node file against the manifest; hashes it only if it changed since its last check (or was
        never checked), so opening a path and then reading its nodes hashes each file once."""
        file = os.path.join(self.directory, node.file)
        if not os.path.isfile(file):
            raise PathError(f"node {node.index} (step {node.step}) is missing: {file} does not exist")
        stat = os.stat(file)
        if self._verified.get(node.index) == (stat.st_size, stat.st_mtime_ns):
            return
        if stat.st_size != node.num_bytes or _sha256(file) != node.sha256:
            raise PathError(
                f"node {node.index} (step {node.step}) at {file} does not match the manifest "
                f"({stat.st_size} bytes vs {node.num_bytes} recorded, or a different sha256): it is corrupt or was "
                "replaced. Re-run degradation recording or restore the file."
            )
        self._verified[node.index] = (stat.st_size, stat.st_mtime_ns)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_bytes(self) -> int:
        """Bytes of all stored nodes."""
        return sum(n.num_bytes for n in self.nodes)

    def node_state_dict(self, index: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of node `index` (>= 1), after checking its sha256 (unless it was checked already and the file
        has not changed since)."""
        if index == 0:
            raise PathError("node 0 is the teacher itself: use the teacher's weights")
        node = self.nodes[index]
        if verify:
            self._verify_node(node)
        return load_file(os.path.join(self.directory, node.file))

    def load_node(self, model: torch.nn.Module, index: int, adapter_name: str = LORA_ADAPTER) -> None:
        """
        Loads node `index` into `model`, strictly: a full node replaces all weights; a LoRA node sets the weights of
        `adapter_name` (which must exist on `model`).
        """
        _check_architecture(self.architecture, model)
        state = self.node_state_dict(index)
        if self.kind == "full":
            _load_strict(model, state, f"node {index}")
        else:
            _load_lora_strict(model, state, adapter_name, f"node {index}")

    def merged_state_dict(self, base: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        """
        The full weights of node `index`, as a plain state dict of `base`'s architecture: a full node's tensors, or
        for a LoRA node `base` (the teacher; pass it in fp32 for exact weights) with the node's adapter merged in.
        `base` itself is not modified. Use it to start the fake score at the most degraded node.
        """
        if self.kind == "full":
            return self.node_state_dict(index)
        scaling = self.lora_config["lora_alpha"] / self.lora_config["r"]
        merged = merge_lora({**base.state_dict(), **self.node_state_dict(index)}, scaling=scaling)
        return {k: v.to(base.state_dict()[k].dtype) for k, v in merged.items()}

    def reversed_nodes(self) -> list[int]:
        """The backtracking order `R = [P_N, ..., P_1, P_0]` as node indices: `R[0]` most degraded, `R[N]` the
        teacher."""
        return [n.index for n in reversed(self.nodes)]


class NodeSwitcher:
    """
    Gives the score network of any path node while holding at most one extra copy of the weights.

    - LoRA path: every node is loaded once as its own adapter (`node_1`, ..., `node_N`) of a [`SharedBase`]: `model`
      itself when it is one (the one frozen base of the shared-base LoRA mode), else a `SharedBase` of `model` (a
      copy of the teacher, or the teacher itself); `activate(i)` returns the view `base + node_i` (`activate(0)`: the
      base alone, the teacher). No tensors move.
    - Full path: `activate(i)` copies node `i`'s weights into `model` (kept in memory after the first read when
      `cache=True`); `activate(0)` returns `teacher`.

    Args:
        path: the [`DegradationPath`].
        model: the module that becomes the target (LoRA: a [`SharedBase`], a copy of the teacher, or the teacher
            itself; full: a module of the teacher's architecture).
        teacher: the teacher module (full paths: the node-0 score).
        cache: full paths: keep every node's tensors in CPU memory after its first read (fast switching back and
            forth, e.g. in benchmarks; off by default: backtracking visits each node once, and an SDXL node is ~10 GB).
    """

    def __init__(
        self,
        path: DegradationPath,
        model: torch.nn.Module | SharedBase,
        teacher: torch.nn.Module | None = None,
        cache: bool = False,
    ):
        self.path = path
        self.teacher = teacher
        self.cache = cache
        self._cached: dict[int, dict[str, torch.Tensor]] = {}
        self.active: int | None = None
        self._loaded: int | None = None  # full paths: the node whose weights `model` holds
        self.shared = None
        if path.kind == "lora":
            from peft import LoraConfig

            self.shared = model if isinstance(model, SharedBase) else SharedBase(model)
            model = self.shared.module
            _check_architecture(path.architecture, model)
            config = LoraConfig(**path.lora_config)
            for node in path.nodes[1:]:
                self.shared.add_adapter(config, f"node_{node.index}")
                state = path.node_state_dict(node.index, verify=False)  # verified when the path was loaded
                _load_lora_strict(model, state, f"node_{node.index}", f"node {node.index}")
        else:
            _check_architecture(path.architecture, model)
            if teacher is None:
                raise ValueError("a full-weight path needs `teacher` for node 0")
        self.model = model

    def activate(self, index: int):
        """Makes node `index` the active target and returns what to call (a LoRA path: an [`AdapterView`])."""
        if not 0 <= index < len(self.path):
            raise IndexError(f"node {index} is not in the path (nodes 0..{len(self.path) - 1})")
        self.active = index
        if self.shared is not None:
            return self.shared.view(*(() if index == 0 else (f"node_{index}",)))
        if index == 0:
            return self.teacher
        if self._loaded != index:
            state = self._cached.get(index) or self.path.node_state_dict(index, verify=False)
            if self.cache:
                self._cached[index] = state
            _load_strict(self.model, state, f"node {index}")
            self._loaded = index
        return self.model

    def close(self) -> None:
        """Removes the node adapters from a borrowed base (a LoRA path on a shared base that outlives the switcher)."""
        if self.shared is not None:
            for node in self.path.nodes[1:]:
                self.shared.delete_adapter(f"node_{node.index}")


# ---------------------------------------------------------------------------------------------------- helpers


def architecture_fingerprint(model: torch.nn.Module) -> dict:
    """Class name, parameter count and a hash of the base (non-LoRA) keys and shapes: what a path must match."""
    return {"class": type(model).__name__, **_fingerprint_keys(model.state_dict())}


def _fingerprint_keys(state: dict[str, torch.Tensor]) -> dict:
    shapes = sorted((_base_key(k), tuple(v.shape)) for k, v in state.items() if "lora_" not in k)
    digest = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()
    return {"num_parameters": sum(math.prod(s) for _, s in shapes), "keys_sha256": digest}


def _base_key(key: str) -> str:
    # peft wraps a target layer: `to_q.weight` becomes `to_q.base_layer.weight`
    return key.replace(".base_layer.", ".")


def _check_architecture(expected: dict, model: torch.nn.Module) -> None:
    found = architecture_fingerprint(model)
    if found["keys_sha256"] != expected["keys_sha256"]:
        raise PathError(
            f"this path was recorded from a different teacher architecture: {expected['class']} with "
            f"{expected['num_parameters']:,} parameters, but the model is {found['class']} with "
            f"{found['num_parameters']:,} (keys/shapes differ). Use the teacher the path was recorded from."
        )


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise PathError(
            f"{what} does not match the model: {len(missing)} missing keys {sorted(missing)[:5]}, "
            f"{len(unexpected)} unexpected keys {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(state[k])


def _load_lora_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], adapter_name: str, what: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if f".{adapter_name}." in k and "lora_" in k]
    if missing or unexpected:
        raise PathError(
            f"{what} does not match adapter {adapter_name!r}: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )


def _link_or_copy(source: str, target: str) -> None:
    """`target` becomes a hard link to `source` (no bytes copied), or an atomic copy where links are not possible."""
    if os.path.exists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:
        import shutil

        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def _sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lora_config_to_dict(config) -> dict:
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "init_lora_weights", "use_rslora")
    out = {}
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, set):
            v = sorted(v)
        out[k] = v
    return out


def node_steps(
    degradation_steps: int,
    path_interval: int | None = None,
    num_path_nodes: int | None = None,
    path_node_spacing: str = "uniform",
) -> list[int]:
    """
    The stage-1 steps after which a node is taken; the last step always ends the path.

    - `path_interval=K1`: every K1 steps and at the end (the paper's rule: N1 = 1000, K1 = 100 gives 10 nodes).
    - `num_path_nodes=N, path_node_spacing="uniform"`: N nodes evenly spaced; `"log"`: N nodes log-spaced, dense
      early, where stage 1 moves fastest (measured: uniform nodes cluster near the initial generator).
    """
    if degradation_steps < 1:
        raise ValueError(f"degradation_steps must be >= 1, got {degradation_steps}")
    if (path_interval is None) == (num_path_nodes is None):
        raise ValueError("give exactly one of `path_interval` and `num_path_nodes`")
    if path_interval is not None:
        if path_interval < 1:
            raise ValueError(f"path_interval must be >= 1, got {path_interval}")
        steps = list(range(path_interval, degradation_steps + 1, path_interval))
    else:
        if not 1 <= num_path_nodes <= degradation_steps:
            raise ValueError(f"num_path_nodes must lie in [1, {degradation_steps}], got {num_path_nodes}")
        if path_node_spacing == "uniform":
            steps = [round(degradation_steps * (i + 1) / num_path_nodes) for i in range(num_path_nodes)]
        elif path_node_spacing == "log":
            steps = [round(degradation_steps ** ((i + 1) / num_path_nodes)) for i in range(num_path_nodes)]
        else:
            raise ValueError(f"path_node_spacing must be 'uniform' or 'log', got {path_node_spacing!r}")
    return sorted({max(1, s) for s in steps} | {degradation_steps})


def candidate_steps(degradation_steps: int, num_candidates: int) -> list[int]:
    """
    The stage-1 steps at which `path_node_spacing="distance"` records a candidate node, dense where stage 1 moves
    fastest, its first steps (docs/method.md, "The path profile"): a quarter of them every step from step 1, half
    log-spaced from there to the end, a quarter evenly spaced, merged (a step given twice is taken once); the last
    step always. [`distill.profile.place_by_distance`] then keeps the nodes among them.
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    n = min(num_candidates, degradation_steps)
    if n == 1:
        return [degradation_steps]
    n_dense, n_uniform = max(1, n // 4), n // 4
    n_log = max(1, n - n_dense - n_uniform)
    dense = range(1, n_dense + 1)
    log = [round(n_dense * (degradation_steps / n_dense) ** ((i + 1) / n_log)) for i in range(n_log)]
    uniform = node_steps(degradation_steps, num_path_nodes=n_uniform, path_node_spacing="uniform") if n_uniform else []
    return sorted(set(dense) | set(log) | set(uniform) | {degradation_steps})
