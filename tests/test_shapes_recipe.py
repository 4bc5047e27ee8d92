"""The shapes distillation recipe, written once (`diffusers_disback.shapes.distill_arguments`) and used by
`examples/shapes/distill_and_judge.py`, `make demo`, the quality test and `benchmarks/shapes_compare.py`."""

import importlib.util
import os

from diffusers_disback.shapes import DISTILL_RECIPE, distill_arguments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the recipe as examples/shapes/distill_and_judge.py wrote it out before it moved into the package
RECIPE = [
    "--resolution", "64", "--train_batch_size", "16", "--mixed_precision", "no",
    "--degradation_steps", "200", "--path_interval", "50", "--max_train_steps", "1500",
    "--fake_score_update_ratio", "5", "--backtrack_interval", "250", "--learning_rate", "5e-5",
    "--lr_warmup_steps", "0", "--guidance_scale", "5", "--conditioning_timestep", "399",
    "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--validation_steps", "250",
]  # fmt: skip


def test_the_recipe_is_the_distill_and_judge_settings():
    assert distill_arguments() == RECIPE
    assert list(DISTILL_RECIPE) == [flag[2:] for flag in RECIPE[::2]]
    spec = importlib.util.spec_from_file_location(
        "distill_and_judge", os.path.join(ROOT, "examples", "shapes", "distill_and_judge.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SETTINGS == RECIPE  # what benchmarks/shapes_compare.py imports today


def test_overrides_replace_in_place_drop_with_none_and_append_new_flags():
    args = distill_arguments(max_train_steps=300, learning_rate=1e-4, checkpoints_total_limit=None, report_to="none")
    flags = dict(zip(args[::2], args[1::2]))
    assert len(flags) * 2 == len(args)
    assert flags["--max_train_steps"] == "300" and float(flags["--learning_rate"]) == 1e-4
    assert "--checkpoints_total_limit" not in flags
    assert args[-2:] == ["--report_to", "none"]  # a flag the recipe does not have comes last
    assert args.index("--max_train_steps") == RECIPE.index("--max_train_steps")  # a replaced value keeps its place
    expected = dict(zip(RECIPE[::2], RECIPE[1::2]))
    changed = {"--max_train_steps", "--learning_rate", "--checkpoints_total_limit", "--report_to"}
    assert {k: v for k, v in flags.items() if k not in changed} == {
        k: v for k, v in expected.items() if k not in changed
    }
    assert distill_arguments(learning_rate=5e-5, resolution=64) == RECIPE  # the recipe's own values, written the same
    assert distill_arguments() == RECIPE  # overrides never change the recipe itself


def test_path_regimes_hands_shapes_compare_helpers_the_sdxl_family(monkeypatch):
    """`benchmarks/path_regimes.py` runs through `shapes_compare`'s helpers, which read the teacher family from the
    arguments (a missing family once broke it at its first call)."""
    import sys

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("path_regimes", None)
    import path_regimes
    import shapes_compare

    args = path_regimes.parse_args(["--inits", "teacher", "--seeds", "0"])
    assert args.family == "sdxl" and args.spec is shapes_compare.FAMILIES["sdxl"]
    assert args.spec["script"] == "train_disback_sdxl.py" and args.spec["teacher_steps"] == 25


def test_path_regimes_report_merges_committed_records_and_keeps_regimes_without_runs(monkeypatch, tmp_path):
    """Run folders die with the machine: the report merges the committed records with OUTPUT's runs (OUTPUT wins),
    writes the merged list back, and rewrites only the regimes it has records for."""
    import json
    import sys

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    sys.modules.pop("path_regimes", None)
    import common
    import path_regimes

    monkeypatch.setattr(common, "update_docs", lambda *a, **k: False)  # docs/benchmarks.md is not touched

    def record(init, seed, method, final):
        curve = [{"stage_step": s, "eval/shapes_accuracy": final * s / 1000} for s in (0, 500, 1000)]
        return {"init": init, "seed": seed, "method": method, "stage1_steps": 0, "stage2_iterations": 1000,
                "stage1_seconds": 0.0, "stage2_seconds": 10.0, "node_steps": [], "gap_ratio": None, "curve": curve,
                "final": {"shapes_accuracy_held_out_captions": 0.1, "shapes_fd": 50.0}}  # fmt: skip

    records = tmp_path / "runs.json"
    records.write_text(json.dumps([record("teacher", 0, "dmd", 0.8), record("random", 0, "dmd", 0.1)]))
    out = tmp_path / "out"
    (out / "random-s0-dmd").mkdir(parents=True)
    (out / "random-s0-dmd" / "run.json").write_text(json.dumps(record("random", 0, "dmd", 0.4)))
    report = tmp_path / "report.md"
    report.write_text(
        "# title\n\n<!-- summary -->\nTeacher (25 Euler steps, CFG 5): all-attribute accuracy 0.868. More.\n"
        "<!-- /summary -->\n\n<!-- regime-weak -->\nkept as it is\n<!-- /regime-weak -->\n"
    )
    args = path_regimes.parse_args(["--report_only", "--output_dir", str(out), "--report", str(report),
                                    "--records", str(records), "--plots", str(tmp_path / "images")])  # fmt: skip
    path_regimes.report(args)
    merged = json.loads(records.read_text())
    assert [(r["init"], r["curve"][-1]["eval/shapes_accuracy"]) for r in merged] == [("teacher", 0.8), ("random", 0.4)]
    text = report.read_text()
    assert "kept as it is" in text and "first ≥ 0.43" in text
    assert "| DMD | 1 | 0 + 1,000 | 0.400 |" in text and "| DMD | 1 | 0 + 1,000 | 0.800 |" in text
    assert sorted(os.listdir(tmp_path / "images")) == ["path_regimes_random.png", "path_regimes_teacher.png"]
