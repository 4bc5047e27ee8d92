"""The toy 2-D benchmark's quick mode checks the distillation machinery: generators improve, the backtracking target
walks back to the teacher, the compute bookkeeping counts stage 1, path nodes are distinct snapshots, the table prints.
"""

import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy2d():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import toy2d
    finally:
        sys.path.pop(0)
    return toy2d


@pytest.fixture(scope="module")
def quick(toy2d, tmp_path_factory):
    images = tmp_path_factory.mktemp("toy2d_images")
    return toy2d.main(["--quick", "--images", str(images)]), images


def test_generators_improve(toy2d, quick):
    (out, _) = quick
    for case, by_method in out["results"].items():
        assert set(by_method) == {"dmd", "disback", "warm"}
        for method, runs in by_method.items():
            assert len(runs) == len(toy2d.QUICK.seeds)
            for history in runs:
                first, last = history.rows[0]["swd"], toy2d.common.final(history, "swd", 2)
                assert last < first, f"{case} {method}: SWD {first:.3f} -> {last:.3f}"
                if method != "disback":  # DisBack spends a third of the quick run on intermediate targets
                    assert last < 0.9 * first, f"{case} {method}: SWD {first:.3f} -> {last:.3f}"


def test_backtracking_walks_to_the_teacher_and_counts_stage1(toy2d, quick):
    (out, _) = quick
    budget = toy2d.QUICK.config()  # the quick mode's settings, in DisBackConfig's names
    r = budget.fake_score_update_ratio
    for by_method in out["results"].values():
        for history in by_method["disback"]:
            targets = [row["target_node"] for row in history.rows]
            assert targets[0] == len(history.node_steps) - 1  # P_{N-1}: one node back from the most degraded
            assert targets[-1] == 0  # the teacher
            assert all(a >= b for a, b in zip(targets, targets[1:]))
            assert history.node_steps[-1] == budget.degradation_steps
        for method in ("disback", "warm"):
            for history in by_method[method]:
                assert history.rows[0]["iterations"] == budget.degradation_steps
                assert history.rows[-1]["iterations"] == budget.degradation_steps + budget.max_train_steps
                assert history.rows[-1]["seconds"] > history.stage1_seconds > 0
        for history in by_method["warm"] + by_method["dmd"]:
            assert all(row["target_node"] == 0 for row in history.rows)
        for history in by_method["dmd"]:
            assert history.rows[-1]["iterations"] == budget.max_train_steps
            assert history.stage1_iterations == 0
        for history in by_method["dmd"] + by_method["disback"] + by_method["warm"]:
            # evaluations every eval_steps iterations = every eval_steps / r generator updates (updates on 0, r, ...)
            assert [row["generator_updates"] for row in history.rows] == [
                i * budget.eval_steps // r for i in range(budget.max_train_steps // budget.eval_steps + 1)
            ]
            assert history.rows[-1]["generator_updates"] == budget.max_train_steps // r


def test_table_and_images(quick, capsys):
    (out, images) = quick
    table = out["tables"]
    for text in ("iters to DMD final ÷ DMD", "| dmd | 1 (reference)", "| disback | ", "| warm | "):
        assert text in table
    for name in ("toy2d_quick_swd.png", "toy2d_quick_coverage.png", "toy2d_quick_samples.png"):
        assert (images / name).stat().st_size > 1000


def test_mode_stats(toy2d):
    mix = toy2d.make_mixture("8gaussians", n=4000)
    on_data = toy2d.mode_stats(mix.data, mix)
    assert on_data["coverage"] == 1.0 and on_data["off_mode"] < 0.03
    one_mode = mix.means[:1] + mix.std * torch.randn(1000, 2)
    collapsed = toy2d.mode_stats(one_mode, mix)
    assert collapsed["coverage"] == 1 / 8
    assert toy2d.mode_stats(torch.zeros(100, 2), mix)["off_mode"] == 1.0


def test_degradation_path_nodes_are_distinct_snapshots(toy2d, quick, tmp_path):
    """Stage 1 by hand: the denoising loss falls, and every node differs from the teacher and from the others."""
    from common import EpsMLP

    from diffusers_disback.distill import DegradationPath, Score, denoising_score_matching_loss, one_step_sample

    (out, _) = quick
    setup = out["setups"]["8gaussians"]
    teacher, schedule = setup.teacher, setup.schedule
    torch.manual_seed(0)
    generator = EpsMLP(2, toy2d.QUICK.data["hidden"]).eval()  # a scratch generator: far from the teacher
    degrading = copy.deepcopy(teacher).requires_grad_(True)
    path = DegradationPath.create(tmp_path / "path", teacher)
    opt = torch.optim.AdamW(degrading.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def sample(n):
        with torch.no_grad():
            return one_step_sample(generator, torch.randn(n, 2, generator=g), None, schedule)

    held_out = sample(4096), torch.randint(0, 1000, (4096,), generator=g), torch.randn(4096, 2, generator=g)

    def held_out_loss():  # Eq. 7 on fixed samples, timesteps and noise: the stage-1 objective without its noise
        with torch.no_grad():
            return denoising_score_matching_loss(Score(degrading, schedule), *held_out[:1], None, *held_out[1:]).item()

    before = held_out_loss()
    for step in range(1, 61):
        loss = denoising_score_matching_loss(Score(degrading, schedule), sample(256), None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            path.add_node(degrading, step)
    assert held_out_loss() < 0.95 * before
    assert len(path) == 4
    states = [teacher.state_dict()] + [path.node_state_dict(i) for i in range(1, 4)]
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            diff = max((states[i][k] - states[j][k]).abs().max().item() for k in states[i])
            assert diff > 1e-4, f"nodes {i} and {j} are identical"
    reloaded = copy.deepcopy(teacher)
    DegradationPath.load(path.directory).load_node(reloaded, 2)
    assert all(torch.equal(reloaded.state_dict()[k], states[2][k]) for k in states[2])
