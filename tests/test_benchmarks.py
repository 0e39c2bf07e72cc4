"""The throughput benchmarks run at a tiny size and report what run_all needs; run_all records every outcome.

No timed assertions: only that the numbers exist, are finite and positive, and that the report is complete.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import eval_image, grid_cost, run_all, train_step
from tests.fakes import TEST_PARAMS_PATH, write_test_params

TRAIN_PARTS = {"batch_assembly", "prompt_encoding", "forward", "loss", "backward", "optimizer", "other"}
EVAL_PARTS = {"load", "prompts", "prompt_encoding", "decode", "postprocess", "iou", "boundary_iou", "rle",
              "stability", "write", "other"}


def _printed_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert lines, "the benchmark printed nothing on stdout"
    return json.loads(lines[-1])


def _check_timings(result: dict[str, Any], times: tuple[str, str], parts: set[str], total: str) -> None:
    for key in ("ratio", "paired_ratio_median"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert run_all.parse_goal(result["goal"]) is not None
    for key in times:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert set(result["breakdown_s"]) == parts
    assert all(math.isfinite(v) for v in result["breakdown_s"].values())
    assert math.isclose(sum(result["breakdown_s"].values()), result[total], rel_tol=0.05, abs_tol=1e-3)


def test_train_step_tiny_run_prints_ratio_and_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    rc = train_step.main(["--params", str(TEST_PARAMS_PATH), "--batch", "2", "--train-views", "4",
                          "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    result = _printed_json(capsys)
    assert result["benchmark"] == "train_step" and result["batch_size"] == 2
    _check_timings(result, ("stage_step_s", "bare_step_s"), TRAIN_PARTS, "instrumented_step_s")
    assert result["breakdown_s"]["forward"] > 0 and result["breakdown_s"]["backward"] > 0


def test_grid_cost_times_both_grids_and_states_no_goal(capsys: pytest.CaptureFixture[str]) -> None:
    result = grid_cost.main(["--params", str(TEST_PARAMS_PATH), "--batch", "1", "--repeats", "1"])
    assert _printed_json(capsys) == result
    keys = {"stable_sam_step_s", "dt_sam_step_s", "encoder_forward_s", "encoder_step_s"}
    for grid, img_size in ((32, 256), (64, 512)):
        block = result[f"grid_{grid}"]
        assert block["img_size"] == img_size and keys <= set(block)
        assert all(math.isfinite(block[k]) and block[k] > 0 for k in keys)
    assert set(result["ratios"]) == keys and result["ratio"] == result["ratios"]["stable_sam_step_s"]
    assert run_all.parse_goal(result["goal"]) is None  # a measurement for the report, not a pass/fail goal


def test_eval_image_tiny_run_prints_ratio_and_breakdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = write_test_params(tmp_path / "params.yaml", **{"prompts.eval_draws": 2})
    rc = eval_image.main(["--params", str(params), "--images", "1", "--repeats", "1", "--warmup", "0"])
    assert rc == 0
    result = _printed_json(capsys)
    assert result["benchmark"] == "eval_image" and result["images"] == 1
    # gt_box + oracle_point once, the 6 random types twice each
    assert result["prompts_per_image"] == 2 + 2 * (len(result["eval_types"]) - 2)
    _check_timings(result, ("stage_image_s", "bare_image_s"), EVAL_PARTS, "instrumented_image_s")
    assert result["breakdown_s"]["decode"] > 0 and result["breakdown_s"]["boundary_iou"] > 0
    # the bf16 speed option is measured beside the ratio, on the same workload
    assert result["bf16_stage_image_s"] > 0 and result["bf16_speedup"] > 0
    assert 0 <= result["bf16_max_abs_miou_change"] < 100 and isinstance(result["bf16_native"], bool)
    assert result["bf16_auto"] is False  # tests/params_test.yaml: evaluate.bf16 false


def test_part_clock_patches_are_exclusive_and_restored() -> None:
    import torch

    class Owner:
        @staticmethod
        def inner() -> int:
            return 1

    def outer() -> int:
        return Owner.inner() + 1

    clock = train_step.PartClock(torch.device("cpu"))
    original = Owner.inner
    with clock.patch(Owner, "inner", "inner"):
        with clock.time("outer"):
            assert outer() == 2
    assert Owner.inner is original and isinstance(vars(Owner)["inner"], staticmethod)
    assert set(clock.parts) == {"inner", "outer"}
    assert clock.parts["inner"] >= 0 and clock.parts["outer"] >= 0


def _stub_package(root: Path) -> None:
    pkg = root / "stubbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text('import json\nprint("warming up")\nprint(json.dumps({"ratio": 1.2, "goal": "<= 1.3"}))\n')
    (pkg / "missed.py").write_text('import json\nprint(json.dumps({"ratio": 0.5, "goal": "ratio >= 0.9"}))\n')
    (pkg / "crash.py").write_text('import sys\nprint("broken input", file=sys.stderr)\nsys.exit(3)\n')
    (pkg / "silent.py").write_text('print("no json here")\n')


def test_run_all_records_results_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _stub_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "reports" / "benchmarks.json"
    mods = ["stubbench.good", "stubbench.missed", "stubbench.crash", "stubbench.silent"]
    rc = run_all.main(["--modules", *mods, "--out", str(out), "--timeout", "120"])
    assert rc == 1  # a benchmark failed to run
    assert '{"ratio": 1.2, "goal": "<= 1.3"}' in capsys.readouterr().out  # each benchmark's JSON is echoed
    report = json.loads(out.read_text())
    b = report["benchmarks"]
    assert b["good"]["passed"] is True and b["good"]["ratio"] == 1.2 and b["good"]["goal"] == "<= 1.3"
    assert b["missed"]["passed"] is False and "error" not in b["missed"]
    assert b["crash"]["returncode"] == 3 and b["crash"]["passed"] is False
    assert "status 3" in b["crash"]["error"] and "broken input" in b["crash"]["stderr_tail"]
    assert b["silent"]["returncode"] == 0 and "no JSON" in b["silent"]["error"]
    assert report["failed_to_run"] == ["crash", "silent"] and report["missed_goal"] == ["missed"]
    assert report["all_passed"] is False
    m = report["machine"]
    for key in ("date", "platform", "cpu_model", "cpu_count", "torch", "cuda_device"):
        assert key in m, key


def test_run_all_exit_status_on_missed_goals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stub_package(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = tmp_path / "r.json"
    assert run_all.main(["--modules", "stubbench.good", "stubbench.missed", "--out", str(out)]) == 0
    assert run_all.main(["--modules", "stubbench.good", "stubbench.missed", "--out", str(out), "--strict"]) == 1
    assert run_all.main(["--modules", "stubbench.good", "--out", str(out), "--strict"]) == 0
    assert json.loads(out.read_text())["all_passed"] is True


def test_run_all_discovers_every_benchmark_but_itself() -> None:
    names = run_all.discover()
    assert {"benchmarks.train_step", "benchmarks.eval_image", "benchmarks.train_cache"} <= set(names)
    assert "benchmarks.run_all" not in names and "benchmarks.__init__" not in names


@pytest.mark.parametrize("ratio, goal, want", [
    (1.2, "<= 1.3", True), (1.4, "<= 1.3", False), (0.95, "ratio >= 0.90", True), (59.0, ">= 60", False),
    (1.0, None, None), (None, "<= 2.0", None), (float("nan"), "<= 2.0", None), (1.0, "fast", None),
])
def test_goal_check(ratio: Any, goal: Any, want: bool | None) -> None:
    assert run_all.meets(ratio, goal) is want


def test_last_json_line_wins() -> None:
    assert run_all.last_json(['{"ratio": 1}\n', "text\n", '{"ratio": 2}\n', "{not json\n"]) == {"ratio": 2}
    assert run_all.last_json(["[1, 2]\n", "done\n"]) is None
