"""The digits benchmark's quick mode exercises the DMD / DisBack / warm machinery on real data and reports it."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_quick(capsys):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import digits
    finally:
        sys.path.pop(0)
    out = digits.main(["--quick"])

    # the classifier that defines the metrics recognises real held-out digits
    assert out["real"]["acc"] > 0.9

    # the path: node 0 is the teacher; every recorded node differs from the teacher and from the node before it
    geometry = out["geometry"]
    assert geometry["to_teacher"][0] == 0.0
    assert len(geometry["steps"]) >= 3
    assert all(d > 1e-3 for d in geometry["to_teacher"][1:])
    assert all(d > 1e-4 for d in geometry["to_previous"][1:])
    assert geometry["to_teacher"][-1] > geometry["to_teacher"][1]  # the path moves away from the teacher

    runs = out["runs"]
    for method in ("dmd", "disback", "warm"):
        (history,) = runs[("scratch", method)]
        # the one-step generator improves from its random start
        assert history.rows[-1]["fd"] < 0.8 * history.rows[0]["fd"]
        # compute is counted with stage 1: DisBack and warm start at the stage-1 step count
        assert history.rows[0]["iterations"] == history.stage1_iterations
        assert history.rows[-1]["seconds"] >= history.stage1_seconds
        # settings in DisBackConfig's units: 180 stage-2 iterations at r = 3 are 60 generator updates, evaluated
        # every 60 iterations = 20 generator updates
        assert history.rows[-1]["iterations"] == history.stage1_iterations + digits.QUICK.distill["max_train_steps"]
        assert [row["generator_updates"] for row in history.rows] == [0, 20, 40, 60]

    disback = runs[("scratch", "disback")][0]
    targets = [row["target_node"] for row in disback.rows]
    assert targets[0] == len(disback.node_steps) - 1  # P_{N-1}: one node back from the most degraded one
    assert targets[-1] == 0  # ... and walks back to the teacher
    assert targets == sorted(targets, reverse=True)
    assert all(row["target_node"] == 0 for row in runs[("scratch", "warm")][0].rows)

    printed = capsys.readouterr().out
    assert "| scratch | disback |" in printed and "| scratch | warm |" in printed
    assert out["table"] in printed
