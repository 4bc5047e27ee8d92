"""The method library: losses pinned to hand-computed values, the schedule's switching and resume, path nodes."""

import json
import os

import pytest
import torch
import torch.nn as nn
from diffusers import DDPMScheduler
from peft import LoraConfig

from diffusers_disback import DisBackScheduler
from diffusers_disback.distill import (
    BacktrackingSchedule,
    DegradationPath,
    DisBackConfig,
    MethodPlan,
    NodeSwitcher,
    NoiseSchedule,
    PathError,
    Score,
    add_lora_adapter,
    denoising_score_matching_loss,
    distribution_matching_gradient,
    distribution_matching_loss,
    distribution_matching_step,
    gan_discriminator_loss,
    gan_generator_loss,
    lora_parameters,
    node_steps,
    one_step_sample,
)

# ---------------------------------------------------------------------------------------------------- scores


def test_schedule_matches_diffusers_and_inverts():
    s = NoiseSchedule.ddpm()
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(s.alphas_cumprod.float(), ddpm.alphas_cumprod, rtol=1e-5, atol=1e-6)
    assert NoiseSchedule.from_scheduler(ddpm).num_train_timesteps == 1000
    x0, eps, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 399, 999])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, ddpm.add_noise(x0, eps, t))
    torch.testing.assert_close(s.x0_from_eps(x_t, eps, t), x0, rtol=1e-4, atol=1e-3)


def test_timestep_sampling_range():
    s = NoiseSchedule.ddpm()
    t = s.sample_timesteps(10_000, 20, 980, generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 980
    with pytest.raises(ValueError, match="min_step"):
        s.sample_timesteps(1, 500, 100)


def test_cfg_and_unconditional_source():
    s = NoiseSchedule.ddpm()
    node = Score(lambda x, t, c: x * 0 + (2.0 if c == "c" else 1.0), s, uncond="u")
    x, t = torch.zeros(1, 2), torch.tensor([10])
    torch.testing.assert_close(node.eps(x, t, "c", guidance_scale=3.0), torch.full((1, 2), 1.0 + 3.0 * (2.0 - 1.0)))
    teacher_uncond = Score(node.eps_fn, s, uncond="u", uncond_fn=lambda x, t, c: x * 0 + 0.5)
    torch.testing.assert_close(teacher_uncond.eps(x, t, "c", guidance_scale=3.0), torch.full((1, 2), 0.5 + 3 * 1.5))
    assert torch.equal(node.eps(x, t, "c"), torch.full((1, 2), 2.0))  # w = 1: conditional only
    with pytest.raises(ValueError, match="uncond"):
        Score(node.eps_fn, s).eps(x, t, "c", guidance_scale=2.0)


def test_one_step_sample_equals_the_scheduler():
    s = NoiseSchedule.ddpm()
    net = nn.Linear(4, 4)
    z = torch.randn(2, 4)
    x0 = one_step_sample(lambda x, t, c: net(x), z, None, s, conditioning_timestep=399)
    sched = DisBackScheduler()
    sched.set_timesteps(1)
    with torch.no_grad():
        expected = sched.step(net(z), 399, z).prev_sample
    torch.testing.assert_close(x0.detach(), expected, rtol=1e-5, atol=1e-5)
    assert x0.requires_grad  # differentiable w.r.t. the generator


# ---------------------------------------------------------------------------------------------------- losses


def test_denoising_score_matching_hand_computed():
    s = NoiseSchedule.ddpm()
    zero_score = Score(lambda x, t, c: torch.zeros_like(x), s)
    noise = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss = denoising_score_matching_loss(zero_score, torch.ones(2, 2), None, t=torch.tensor([5, 500]), noise=noise)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # a perfect noise predictor has zero loss: eps_hat = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    x0 = torch.randn(4, 3)
    abar = s.alphas_cumprod.float()
    oracle = Score(lambda x, t, c: (x - abar[t].sqrt()[:, None] * x0) / (1 - abar[t]).sqrt()[:, None], s)
    assert denoising_score_matching_loss(oracle, x0, None, generator=torch.Generator().manual_seed(0)).item() < 1e-8


def test_distribution_matching_hand_computed():
    x0 = torch.tensor([[1.0, 2.0]], requires_grad=True)
    x0_target, x0_fake = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    # p_tgt = [1, 2], p_fake = [0, 1], mean|p_tgt| = 1.5  ->  g = [2/3, 2/3]
    g = distribution_matching_gradient(x0, x0_target, x0_fake)
    torch.testing.assert_close(g, torch.tensor([[2 / 3, 2 / 3]]))
    loss = distribution_matching_loss(x0, x0_target, x0_fake)
    assert loss.item() == pytest.approx(0.5 * (4 / 9))  # 1/2 mean(g^2)
    loss.backward()
    torch.testing.assert_close(x0.grad, torch.tensor([[1 / 3, 1 / 3]]))  # g / numel
    # descent moves x0 toward the target's estimate (0, 0) and away from the fake's (1, 1)
    assert (x0 - 0.1 * x0.grad).norm() < x0.norm()


def test_distribution_matching_normalises_per_sample_and_survives_zero():
    x0 = torch.tensor([[1.0, 1.0], [10.0, 10.0]])
    g = distribution_matching_gradient(x0, torch.zeros(2, 2), x0 * 0.5)
    torch.testing.assert_close(g, torch.full((2, 2), 0.5))  # same direction at any scale
    same = distribution_matching_gradient(x0, x0, x0)  # p_tgt = 0: 0/0 becomes 0, not NaN
    assert torch.equal(same, torch.zeros(2, 2))


def test_distribution_matching_step_is_zero_when_target_equals_fake():
    s = NoiseSchedule.ddpm()
    net = nn.Linear(3, 3)
    score = Score(lambda x, t, c: net(x), s)
    x0 = torch.randn(5, 3, requires_grad=True)
    loss, info = distribution_matching_step(x0, None, score, score, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert x0.grad.abs().max() == 0 and info["dm_distance"] == 0


def test_gan_losses_hand_computed():
    zero = torch.zeros(4)
    assert gan_generator_loss(zero).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert gan_discriminator_loss(zero, zero).item() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item())
    assert gan_discriminator_loss(torch.full((4,), -20.0), torch.full((4,), 20.0)).item() < 1e-8


# ------------------------------------------------------------------------------------------- backtracking


def test_fixed_schedule_walks_back_and_holds_the_teacher():
    s = BacktrackingSchedule(num_nodes=4, backtrack_interval=3)  # P_3 (fake init), targets P_2, P_1, P_0 = teacher
    seen = [s.target_node]
    for _ in range(15):
        s.step()
        seen.append(s.target_node)
    assert seen == [2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert s.at_teacher
    # it switched every interval, not once (the reference loop's switch fired at most once)
    again, targets = BacktrackingSchedule(num_nodes=4, backtrack_interval=3), []
    for _ in range(10):
        targets.append(again.target)
        again.step()
    assert targets == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_schedule_resume_mid_path_equals_uninterrupted():
    full = BacktrackingSchedule(num_nodes=11, backtrack_interval=100)
    for _ in range(1234):
        full.step()
    first = BacktrackingSchedule(num_nodes=11, backtrack_interval=100)
    for _ in range(567):
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = BacktrackingSchedule(num_nodes=11, backtrack_interval=100)
    resumed.load_state_dict(state)
    for _ in range(1234 - 567):
        resumed.step()
    assert resumed.state_dict() == full.state_dict()
    assert full.target == 10
    with pytest.raises(ValueError, match="num_nodes"):
        BacktrackingSchedule(num_nodes=5, backtrack_interval=100).load_state_dict(state)


def test_method_plan_says_what_each_method_walks_and_where_the_fake_score_starts():
    assert MethodPlan.of("disback", path_length=4) == MethodPlan("disback", num_targets=4, fake_score_node=3)
    assert MethodPlan.of("disback", 4, fake_score_init="teacher").fake_score_node is None
    warm = MethodPlan.of("warm", path_length=4)  # fake at the last node, target the teacher at once
    assert (warm.num_targets, warm.fake_score_node) == (1, 3)
    assert MethodPlan.of("dmd", fake_score_init="last_node") == MethodPlan("dmd", num_targets=1, fake_score_node=None)
    assert MethodPlan.of("disback", path_length=1).fake_score_node is None  # a path of the teacher alone
    assert [MethodPlan.uses_path(m) for m in ("disback", "dmd", "warm")] == [True, False, True]
    with pytest.raises(ValueError, match="method must be one of"):
        MethodPlan.of("dmd2")
    config = DisBackConfig(backtrack_interval=10)
    for method, path_length in (("dmd", 1), ("warm", 4)):
        schedule = MethodPlan.of(method, path_length).schedule(config)
        assert schedule.at_teacher and schedule.target_node == 0 and schedule.backtrack_interval == 10
    assert MethodPlan.of("disback", 4).schedule(config).target_node == 2


def test_adaptive_rule_advances_when_caught_up():
    s = BacktrackingSchedule(
        num_nodes=3,
        backtrack_interval=1000,
        backtrack_rule="adaptive",
        backtrack_threshold=0.5,
        min_interval=2,
        ema=0.0,
    )
    assert not s.step(distance=1.0)  # reference distance 1.0
    assert not s.step(distance=0.8)
    assert s.step(distance=0.4)  # below half of the reference after >= 2 steps
    assert s.target_node == 0 and s.steps == 3
    capped = BacktrackingSchedule(num_nodes=3, backtrack_interval=5, backtrack_rule="adaptive", ema=0.0)
    for _ in range(5):
        capped.step(distance=1.0)  # never catches up: the interval still bounds the time on a node
    assert capped.target_node == 0
    # iterations without a generator update carry no distance: they count toward the interval and nothing else
    sparse = BacktrackingSchedule(
        num_nodes=3,
        backtrack_interval=1000,
        backtrack_rule="adaptive",
        backtrack_threshold=0.5,
        min_interval=4,
        ema=0.0,
    )
    moved = [sparse.step(distance=d) for d in (1.0, None, None, 0.4)]
    assert moved == [False, False, False, True] and sparse.steps == 4
    assert not BacktrackingSchedule(
        num_nodes=3, backtrack_interval=3, backtrack_rule="adaptive"
    ).step()  # no signal yet: no advance


# -------------------------------------------------------------------------------------------------- paths


class Tiny(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 4)

    def forward(self, x, t=None, cond=None):
        return self.fc2(torch.tanh(self.fc1(x)))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_full_path_snapshots_verifies_and_loads_strictly(tmp_path):
    teacher = Tiny()
    degrading = Tiny()
    degrading.load_state_dict(teacher.state_dict())
    path = DegradationPath.create(tmp_path, teacher, kind="full")
    snapshots = []
    for step in (10, 20, 30):
        _perturb(degrading, step)
        path.add_node(degrading, step)
        snapshots.append({k: v.clone() for k, v in degrading.state_dict().items()})
    _perturb(degrading, 99)  # mutating the live model must not change recorded nodes (a snapshot, not a reference)

    loaded = DegradationPath.load(tmp_path)
    assert [(n.index, n.step, n.kind) for n in loaded.nodes] == [
        (0, 0, "teacher"),
        (1, 10, "full"),
        (2, 20, "full"),
        (3, 30, "full"),
    ]
    assert loaded.reversed_nodes() == [3, 2, 1, 0]
    target = Tiny()
    for i, snap in enumerate(snapshots, start=1):
        loaded.load_node(target, i)
        for k, v in target.state_dict().items():
            torch.testing.assert_close(v, snap[k], rtol=0, atol=0)
    # nodes differ from each other and from the teacher
    w = [loaded.node_state_dict(i)["fc1.weight"] for i in (1, 2, 3)]
    assert all(not torch.equal(a, b) for a, b in [(w[0], w[1]), (w[1], w[2]), (w[0], teacher.fc1.weight)])
    manifest = json.loads((tmp_path / "path_manifest.json").read_text())
    assert all(len(n["sha256"]) == 64 for n in manifest["nodes"][1:])
    with pytest.raises(PathError, match="already holds"):
        DegradationPath.create(tmp_path, teacher)


def test_corrupt_missing_and_mismatched_paths_are_errors(tmp_path):
    teacher = Tiny()
    path = DegradationPath.create(tmp_path, teacher, kind="full")
    path.add_node(teacher, 1)
    path.add_node(teacher, 2)
    node2 = tmp_path / "node_002.safetensors"
    data = node2.read_bytes()
    node2.write_bytes(data[:-8] + b"\x00" * 8)
    with pytest.raises(PathError, match="node 2 .* does not match the manifest"):
        DegradationPath.load(tmp_path)
    os.remove(node2)
    with pytest.raises(PathError, match="node 2 .* is missing"):
        DegradationPath.load(tmp_path)
    with pytest.raises(PathError, match="different teacher architecture"):
        DegradationPath.load(tmp_path, verify=False).load_node(Tiny(width=16), 1)
    with pytest.raises(PathError, match="no degradation path"):
        DegradationPath.load(tmp_path / "elsewhere")
    (tmp_path / "path_manifest.json").write_text("{not json")
    with pytest.raises(PathError, match="not a valid path manifest"):
        DegradationPath.load(tmp_path)
    with pytest.raises(ValueError, match="steps must increase"):
        p = DegradationPath.create(tmp_path / "p2", teacher)
        p.add_node(teacher, 5)
        p.add_node(teacher, 5)


def test_stage2_start_hashes_each_node_once_and_a_changed_file_again(tmp_path, monkeypatch):
    """Opening a path (verify), starting the fake score at the last node and switching to each node hash every node
    file once; a file replaced after its check is hashed again and refused."""
    from diffusers_disback.distill import degradation

    teacher = Tiny()
    path = DegradationPath.create(tmp_path, teacher, kind="full")
    for step in (1, 2, 3):
        _perturb(teacher, step)
        path.add_node(teacher, step)
    hashed = []
    real_sha256 = degradation._sha256
    monkeypatch.setattr(
        degradation, "_sha256", lambda file: hashed.append(os.path.basename(file)) or real_sha256(file)
    )
    loaded = DegradationPath.load(tmp_path)
    loaded.merged_state_dict(Tiny(), len(loaded) - 1)  # s_phi <- R[0]
    switcher = NodeSwitcher(loaded, Tiny(), teacher=Tiny())
    for index in (2, 1, 0):
        switcher.activate(index)
    assert sorted(hashed) == ["node_001.safetensors", "node_002.safetensors", "node_003.safetensors"]
    node3 = tmp_path / "node_003.safetensors"
    data = node3.read_bytes()
    node3.write_bytes(data[:-8] + b"\x00" * 8)
    os.utime(node3, ns=(1, 1))  # a different mtime, as any rewrite gives
    with pytest.raises(PathError, match="node 3 .* does not match the manifest"):
        loaded.node_state_dict(3)


def _lora_path(tmp_path, teacher, steps=(5, 10, 15)):
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    degrading = Tiny()
    degrading.load_state_dict(teacher.state_dict())
    add_lora_adapter(degrading, config)
    path = DegradationPath.create(tmp_path, teacher, kind="lora", lora_config=config)
    merged = []
    for step in steps:
        _perturb(degrading, step)  # stands in for training: only the LoRA weights are trainable
        path.add_node(degrading, step)
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            merged.append(degrading(x))
    return path, merged, degrading


def test_lora_nodes_switch_as_adapters(tmp_path):
    teacher = Tiny()
    path, outputs, degrading = _lora_path(tmp_path, teacher)
    assert len(lora_parameters(degrading)) == 4 and all(p.requires_grad for p in lora_parameters(degrading))
    assert all(not p.requires_grad for n, p in degrading.named_parameters() if "lora_" not in n)
    target = Tiny()
    target.load_state_dict(teacher.state_dict())
    switcher = NodeSwitcher(DegradationPath.load(tmp_path), target)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in (3, 1, 2, 0, 3):  # back and forth
            out = switcher.activate(i)(x)
            expected = teacher(x) if i == 0 else outputs[i - 1]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # a LoRA node stores r * (in + out) per layer instead of in * out
    lora_numel = sum(v.numel() for v in path.node_state_dict(1).values())
    assert lora_numel == 2 * (4 + 8) + 2 * (8 + 4)


def test_full_switcher_caches_and_returns_the_teacher_for_node_zero(tmp_path):
    teacher = Tiny()
    degrading = Tiny()
    path = DegradationPath.create(tmp_path, teacher)
    path.add_node(degrading, 1)
    switcher = NodeSwitcher(path, Tiny(), teacher=teacher)
    assert switcher.activate(0) is teacher
    node = switcher.activate(1)
    torch.testing.assert_close(node.fc1.weight, degrading.fc1.weight)
    with pytest.raises(IndexError):
        switcher.activate(2)
    with pytest.raises(ValueError, match="teacher"):
        NodeSwitcher(path, Tiny())


def test_node_steps():
    assert node_steps(1000, path_interval=100) == list(range(100, 1001, 100))
    assert node_steps(1000, path_interval=300) == [300, 600, 900, 1000]  # the last step always ends the path
    assert node_steps(500, num_path_nodes=5, path_node_spacing="uniform") == [100, 200, 300, 400, 500]
    assert node_steps(500, num_path_nodes=5, path_node_spacing="log") == [3, 12, 42, 144, 500]
    with pytest.raises(ValueError, match="exactly one"):
        node_steps(10)


def test_merge_lora_equals_the_adapter_model(tmp_path):
    from diffusers_disback.distill import merge_lora

    teacher = Tiny()
    path, outputs, degrading = _lora_path(tmp_path, teacher)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    plain = Tiny()
    plain.load_state_dict(merge_lora(degrading.state_dict(), "degradation"))  # scaling = alpha / r = 1
    with torch.no_grad():
        torch.testing.assert_close(plain(x), degrading(x), rtol=1e-5, atol=1e-6)
        for index in (1, 3):  # a recorded LoRA node as full weights of the teacher's architecture
            plain.load_state_dict(path.merged_state_dict(teacher, index))
            torch.testing.assert_close(plain(x), outputs[index - 1], rtol=1e-5, atol=1e-6)


def test_target_score_guides_the_teacher_and_chooses_cfg_on_nodes():
    from diffusers_disback.distill import target_score

    s = NoiseSchedule.ddpm()
    teacher = Score(lambda x, t, c: x * 0 + (2.0 if c == "c" else 1.0), s, uncond="u")
    node_out = {1: 5.0}
    node_eps = lambda i: lambda x, t, c: x * 0 + (node_out[i] if c == "c" else 4.0)  # noqa: E731
    x, t = torch.zeros(1, 2), torch.tensor([10])
    schedule = BacktrackingSchedule(num_nodes=3, backtrack_interval=10)  # target P1 first
    expected = {"none": (5.0, 1.0), "node": (4.0 + 3 * (5.0 - 4.0), 3.0), "teacher": (1.0 + 3 * (5.0 - 1.0), 3.0)}
    for cfg, (eps, w) in expected.items():
        score, scale = target_score(schedule, node_eps, teacher, 3.0, cfg)
        assert scale == w and score.eps(x, t, "c", guidance_scale=scale)[0, 0].item() == pytest.approx(eps)
    for _ in range(10):
        schedule.step()
    score, scale = target_score(schedule, node_eps, teacher, 3.0, "none")
    assert score is teacher and scale == 3.0  # the teacher is always guided
    with pytest.raises(ValueError, match="intermediate_cfg"):
        target_score(schedule, node_eps, teacher, 3.0, "both")
