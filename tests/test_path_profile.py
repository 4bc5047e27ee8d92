"""The path profile: the score-space distance, nodes placed by distance, stage 1's profile and resume, the CLI."""

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusers_disback.distill import DegradationPath, DisBackConfig
from diffusers_disback.distill.degradation import candidate_steps
from diffusers_disback.distill.profile import (
    PathProfile,
    ScoreProbe,
    pairwise_distances,
    place_by_distance,
    score_distance,
)
from diffusers_disback.testing import get_tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_disback", "train_disback_sdxl.py")
PROMPTS = os.path.join(ROOT, "examples", "train_disback", "data", "demo_prompts.txt")
# stage 1 only, distance spacing: 3 nodes kept of the candidates of 8 steps (1, 2, 3, 4, 6, 8), a checkpoint every 2
STAGE1 = [
    "--resolution", "64", "--stage", "degradation", "--degradation_steps", "8", "--num_path_nodes", "3",
    "--path_node_spacing", "distance", "--path_candidates", "8", "--path_profile_prompts", "4",
    "--path_profile_timesteps", "3", "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--lr_warmup_steps",
    "0", "--train_batch_size", "2", "--train_data_files", PROMPTS, "--shuffle_buffer", "4", "--guidance_scale", "4",
    "--intermediate_cfg", "node", "--report_to", "tensorboard",
]  # fmt: skip
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def _stage1(teacher, out, *extra):
    return [sys.executable, SCRIPT, "--pretrained_teacher_model", teacher, "--output_dir", str(out), *STAGE1, *extra]


@pytest.fixture(scope="module")
def placed(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("placed")
    proc = subprocess.run(_stage1(teacher, out), capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


# ---------------------------------------------------------------------------------------------- the distance


def test_distance_is_zero_for_the_teacher_and_grows_along_a_recorded_path(teacher, placed):
    from diffusers_disback.training import FrozenSDXL
    from diffusers_disback.training.path_profile import PathProfiler

    frozen = FrozenSDXL.from_pretrained(teacher, 64)
    config = DisBackConfig(guidance_scale=4.0, intermediate_cfg="node", path_profile_timesteps=3)
    profiler = PathProfiler(frozen, frozen.load_generator(None), ["a cat", "a dog", "a car"], config, "cpu")
    assert profiler.distance(frozen.teacher) == 0.0  # the teacher guided as a node is the teacher
    # unguided, the teacher is not its guided self: the CFG gap an unguided node carries (docs/method.md)
    unguided = PathProfiler(
        frozen, frozen.load_generator(None), ["a cat", "a dog", "a car"],
        DisBackConfig(guidance_scale=4.0, intermediate_cfg="none", path_profile_timesteps=3), "cpu",
    )  # fmt: skip
    assert unguided.distance(frozen.teacher) > 0.01
    assert profiler.distance(get_tiny_unet(seed=1)) > 0.01  # another network is not the teacher

    out, _ = placed
    path = DegradationPath.load(out / "path")
    candidates = path.profile["candidates"]
    assert [c["step"] for c in candidates] == [1, 2, 3, 4, 6, 8] == candidate_steps(8, 8)
    distances = [c["to_teacher"] for c in candidates]
    assert 0 < distances[0] < distances[-1]  # stage 1 moves away from the teacher
    profile = PathProfile.from_dict(path.profile)
    assert profile.nodes[0].to_teacher == 0.0 and profile.nodes[-1].to_last == 0.0
    assert all(n.to_teacher > 0 for n in profile.nodes[1:])
    # the triangle inequality holds for the measured gaps
    assert profile.nodes[-1].to_teacher <= sum(profile.gaps) + 1e-9


def test_score_distance_is_a_metric_on_the_probe():
    a, b, c = (torch.randn(3, 5, 4, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3))
    assert score_distance(a, a) == 0.0
    assert score_distance(a, b) == pytest.approx(score_distance(b, a))
    assert score_distance(a, c) <= score_distance(a, b) + score_distance(b, c)
    assert score_distance(a, a + 0.5) == pytest.approx(0.5)
    D = pairwise_distances([a, b, c])
    assert torch.equal(D, D.T) and torch.all(D.diagonal() == 0)


def test_probe_is_fixed_by_its_seed():
    from diffusers_disback.distill import NoiseSchedule

    schedule = NoiseSchedule.ddpm()
    x = torch.randn(2, 4, 2, 2)
    p1 = ScoreProbe.build(schedule, x, x + 1, torch.arange(2), 20, 980, num_timesteps=4, seed=3)
    p2 = ScoreProbe.build(schedule, x, x + 1, torch.arange(2), 20, 980, num_timesteps=4, seed=3)
    assert p1.timesteps.tolist() == [20, 340, 660, 980]
    assert torch.equal(p1.noise, p2.noise) and p1.num_generator == 2 and p1.cond.tolist() == [0, 1, 0, 1]


# ------------------------------------------------------------------------------------------------ placement


def _line(positions):
    x = torch.tensor([0.0, *positions], dtype=torch.float64)
    return (x[:, None] - x[None, :]).abs()


def test_distance_spacing_puts_nodes_at_equal_distance_quantiles():
    # a front-loaded path whose distance is known: candidate j of 60 lies at sqrt(j / 60) of the way
    M, N = 60, 4
    positions = [math.sqrt(j / M) for j in range(1, M + 1)]
    chosen = place_by_distance(_line(positions), N)
    assert chosen[-1] == M and chosen == sorted(set(chosen))
    at = [positions[j - 1] for j in chosen]
    assert at == pytest.approx([0.25, 0.5, 0.75, 1.0], abs=0.03)  # equal quantiles of the distance
    gaps = [b - a for a, b in zip([0.0, *at], at)]
    assert max(gaps) / min(gaps) < 1.25
    # uniform steps put 3 of the 4 nodes in the last half of the distance
    uniform = [positions[j - 1] for j in (15, 30, 45, 60)]
    assert max(b - a for a, b in zip([0.0, *uniform], uniform)) == pytest.approx(0.5)


@pytest.mark.parametrize("tolerance", [0.0, 0.1])
def test_distance_spacing_is_exact_against_every_chain(tolerance):
    # brute force over all chains: the smallest largest gap L; then, among the chains whose largest gap is within
    # the tolerance of L, the most even (tolerance 0: the largest smallest gap). A choice made per prefix, as the
    # first version did, missed the second criterion on 4 of these 40.
    rng = torch.Generator().manual_seed(0)
    for trial in range(40):
        M, N = 9, 3 + trial % 3
        x = torch.randn(M + 1, 3, generator=rng, dtype=torch.float64)  # snapshots anywhere: stage 1 can turn
        D = torch.cdist(x, x)
        chains = []
        for inner in itertools.combinations(range(1, M), N - 1):
            chain = [0, *inner, M]
            chains.append([float(D[a, b]) for a, b in zip(chain, chain[1:])])
        L = min(max(g) for g in chains)
        best = min((max(g) / min(g), max(g)) for g in chains if max(g) <= L * (1 + tolerance))
        chosen = place_by_distance(D, N, tolerance)
        gaps = [float(D[a, b]) for a, b in zip([0, *chosen], chosen)]
        assert chosen[-1] == M and chosen == sorted(set(chosen))
        assert (max(gaps) / min(gaps), max(gaps)) == pytest.approx(best), trial


def test_a_small_tolerance_buys_an_even_path():
    # a path in the plane that turns back (the teacher at the origin): the smallest largest gap is sqrt(2), reached
    # only with gaps of 0.5 beside it; 6% more on the largest gap makes every gap 1.5
    x = torch.tensor([[0, 0], [1.5, 0], [2, 1], [1, 1], [0.5, 1], [1.5, 1.5], [0, 1.5]], dtype=torch.float64)
    D = torch.cdist(x, x)

    def spread(chosen):
        gaps = [float(D[a, b]) for a, b in zip([0, *chosen], chosen)]
        return max(gaps) / min(gaps), max(gaps)

    strict, even = place_by_distance(D, 3), place_by_distance(D, 3, tolerance=0.1)
    assert spread(strict) == pytest.approx((2 * math.sqrt(2), math.sqrt(2)))
    assert spread(even) == pytest.approx((1.0, 1.5)) and even[-1] == 6
    with pytest.raises(ValueError, match="tolerance"):
        place_by_distance(D, 3, tolerance=-1)


def test_distance_spacing_on_a_path_that_turns_back():
    # out to 1.0, then back toward the teacher to 0.6: the neighbour gaps, not the distance to the teacher, decide
    positions = [0.2, 0.4, 0.6, 0.8, 1.0, 0.9, 0.8, 0.7, 0.6]
    chosen = place_by_distance(_line(positions), 3)
    assert chosen[-1] == len(positions) and chosen == sorted(chosen)
    gaps = [abs(b - a) for a, b in zip([0.0, *(positions[j - 1] for j in chosen)], (positions[j - 1] for j in chosen))]
    assert max(gaps) <= 0.6 + 1e-9
    with pytest.raises(ValueError, match="num_nodes"):
        place_by_distance(_line(positions), 10)


def test_candidate_steps_are_dense_early_and_end_at_the_last_step():
    steps = candidate_steps(200, 16)
    assert steps[0] == 1 and steps[-1] == 200 and steps == sorted(set(steps))
    assert sum(s <= 20 for s in steps) >= 4  # where stage 1 moves fastest
    assert DisBackConfig(degradation_steps=200, num_path_nodes=4, path_node_spacing="distance").node_steps() == steps
    with pytest.raises(ValueError, match="num_path_nodes"):
        DisBackConfig(path_node_spacing="distance")
    with pytest.raises(ValueError, match="path_spacing_tolerance"):
        DisBackConfig(num_path_nodes=4, path_node_spacing="distance", path_spacing_tolerance=-0.1)
    with pytest.raises(ValueError, match="path_profile_prompts"):
        DisBackConfig(num_path_nodes=4, path_node_spacing="distance", path_profile_prompts=0)


# --------------------------------------------------------------------------------------- stage 1 and the CLI


def test_stage1_keeps_nodes_by_distance_and_logs_the_profile(placed):
    out, proc = placed
    path = DegradationPath.load(out / "path")
    assert len(path) == 4 and path.nodes[-1].step == 8
    assert all(n.distance is not None and n.distance > 0 for n in path.nodes[1:])
    assert not (out / "path" / "candidates").exists()  # thinned: only the kept nodes remain
    assert sorted(os.listdir(out / "path")) == [
        "node_001.safetensors", "node_002.safetensors", "node_003.safetensors", "path_manifest.json",
        "path_profile.png",
    ]  # fmt: skip
    # the kept nodes are the best-spaced choice among the candidates the profile recorded
    profile = PathProfile.from_dict(path.profile)
    assert [n.step for n in profile.nodes] == [n.step for n in path.nodes]
    assert profile.gap_ratio == pytest.approx(max(profile.gaps) / min(profile.gaps))
    assert "path profile" in proc.stderr and "| P3 | 8 |" in proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(r, f) for r, _, fs in os.walk(out / "logs") for f in fs if f.startswith("events")]
    acc = EventAccumulator(events[0])
    acc.Reload()
    logged = [(e.step, round(e.value, 5)) for e in acc.Scalars("degradation/distance_to_teacher")]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 6, 8]
    assert [v for _, v in logged] == [round(c["to_teacher"], 5) for c in profile.candidates]
    assert len(acc.Scalars("path_profile/to_teacher")) == 3
    # the candidates' pairwise distances, from the probe predictions kept as each was recorded (no second pass)
    D = torch.tensor(profile.candidate_distances, dtype=torch.float64)
    assert D.shape == (7, 7) and torch.allclose(D, D.T) and torch.all(D.diagonal() == 0)
    assert D[0, 1:].tolist() == pytest.approx([c["to_teacher"] for c in profile.candidates], abs=1e-6)
    kept = [candidate_steps(8, 8)[i - 1] for i in place_by_distance(D, 3, DisBackConfig().path_spacing_tolerance)]
    assert kept == [n.step for n in path.nodes[1:]]


def test_placed_path_resumes_bit_identically_after_kill_9(teacher, placed, tmp_path):
    out = tmp_path / "run"
    cmd = _stage1(teacher, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    marker, start = out / "checkpoints" / "checkpoint-4", time.time()
    while not marker.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {marker} appeared"
        assert time.time() - start < 300, f"{marker} did not appear"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # mid stage 1: candidates recorded, none kept yet
    proc.wait()
    resumed = subprocess.run(
        [*cmd, "--resume_from_checkpoint", "latest"], capture_output=True, text=True, timeout=600, env=ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = DegradationPath.load(placed[0] / "path"), DegradationPath.load(out / "path")
    assert got.nodes == expected.nodes  # steps, sha256 of every node file, distances
    assert got.profile["nodes"] == expected.profile["nodes"]


def test_cli_prints_the_table_and_writes_the_plot(teacher, placed, tmp_path):
    out, _ = placed
    prompts = tmp_path / "probe.txt"
    prompts.write_text("a cat\na dog\na red car\n")
    proc = subprocess.run(
        [sys.executable, "-m", "diffusers_disback.cli", "path-profile", str(out / "path"), "--teacher", teacher,
         "--prompts", str(prompts), "--guidance-scale", "4", "--intermediate-cfg", "node", "--timesteps", "3",
         "--output", str(tmp_path / "profile")],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| P0 (teacher) | 0 | 0.0000 |" in proc.stdout and "| P3 | 8 |" in proc.stdout
    assert "Largest gap between neighbours / smallest" in proc.stdout
    plot = tmp_path / "profile" / "path_profile.png"
    assert plot.stat().st_size > 5_000
    saved = json.loads((tmp_path / "profile" / "path_profile.json").read_text())
    assert [n["step"] for n in saved["nodes"]] == [0, *(n.step for n in DegradationPath.load(out / "path").nodes[1:])]
    assert saved["intermediate_cfg"] == "node" and saved["nodes"][0]["to_teacher"] == 0.0
    missing = subprocess.run(
        [sys.executable, "-m", "diffusers_disback.cli", "path-profile", str(out / "path"), "--teacher", teacher],
        capture_output=True, text=True, timeout=300, env=ENV,
    )  # fmt: skip
    assert missing.returncode == 2 and "--prompts" in missing.stderr


def test_keep_nodes_links_the_chosen_candidates(tmp_path):
    unet = get_tiny_unet()
    candidates = DegradationPath.create(tmp_path / "path" / "candidates", unet)
    for step in (1, 2, 3):
        with torch.no_grad():
            next(unet.parameters()).add_(1.0)
        candidates.add_node(unet, step, distance=float(step))
    path = DegradationPath.create(tmp_path / "path", unet)
    path.keep_nodes(candidates, [1, 3])
    assert [(n.step, n.distance) for n in path.nodes[1:]] == [(1, 1.0), (3, 3.0)]
    assert path.nodes[2].sha256 == candidates.nodes[3].sha256
    import shutil

    shutil.rmtree(candidates.directory)
    reopened = DegradationPath.load(tmp_path / "path")  # verified: the files are there without the candidates
    assert torch.equal(reopened.node_state_dict(2)["conv_in.weight"], unet.state_dict()["conv_in.weight"])
    path.set_profile({"nodes": []})
    path.truncate(1)
    assert DegradationPath.load(tmp_path / "path").profile is None  # a profile of nodes that are gone is dropped
