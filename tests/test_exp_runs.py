"""Real DVC experiments: every `dvc repro` / `dvc exp run` is one MLflow parent run, and `dvc exp show` in a
120-column terminal shows the headline metrics.

The project is a small git + DVC repository in a temporary folder: the real `track` stage (its command and
`always_changed` read from this repository's dvc.yaml) over fake stage outputs, and a stand-in `report` stage
that writes metrics/eval.json from the `seed` param and metrics/headline.json with the production writer.
MLflow goes to a temporary sqlite store (env MLFLOW_TRACKING_URI). Slow: three pipeline runs, ~1 min.
"""
from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.tracking.mlflow_adapter import Tracker
from pipeline.tracking.track import KIND_TAG
from tests.fakes import load_test_params, write_test_params, write_tiny_base, write_trained_plugin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WIDTH = 120
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LEAD = ("R_noisy_box", "R_point_1", "d_gt_box")

REPORT_SCRIPT = '''\
"""Stand-in report stage: eval.json from the seed param, headline.json by the production writer."""
import json
from pipeline.config import load_params
from pipeline.evaluation.report import write_headline

params = load_params("params.yaml")
gain = 2.0 + params.seed
bench = {"sam": {"gt_box": {"miou": 80.0}, "noisy_box": {"miou": 60.0}, "point_1": {"miou": 50.0}},
         "stable_sam": {"gt_box": {"miou": 80.5}, "noisy_box": {"miou": 60.0 + gain, "recovery": gain / 20},
                        "point_1": {"miou": 50.0 + gain, "recovery": gain / 30}}}
ev = {"DIS5K-VD": bench, "hq_mean": bench}
with open("metrics/eval.json", "w") as fh:
    json.dump(ev, fh)
write_headline("metrics/headline.json", ev, params)
'''


def terminal_view(cmd: list[str], cwd: Path, env: dict[str, str], width: int = WIDTH) -> list[str]:
    """What a ``width``-column terminal shows of ``cmd``'s output: run on a pseudo-terminal (so DVC pages
    its table as it does for a user), with ``cat`` as the pager, each line cut at ``width`` as ``less -S``
    (DVC's default pager) cuts it; ANSI styling removed."""
    master, slave = pty.openpty()
    env = dict(env, COLUMNS=str(width), LINES="50", PAGER="cat", TERM="xterm")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode("utf-8", "replace")
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r", "")
    return [line[:width] for line in text.splitlines()]


def column_values(lines: list[str], header: str) -> list[str]:
    """The cells under ``header`` (right-aligned metric columns end where their header ends)."""
    head = next(line for line in lines if header in line)
    end = head.index(header) + len(header)
    start = head.rfind("  ", 0, head.index(header))
    rows = [line for line in lines[lines.index(head) + 1:] if line.strip() and not set(line.strip()) <= {"─"}]
    return [line[start:end].strip() for line in rows]


def test_terminal_view_cuts_like_less(tmp_path):
    lines = terminal_view([sys.executable, "-c", "print('x' * 300); print('  a   b')"], tmp_path, dict(os.environ))
    assert lines[0] == "x" * WIDTH and lines[1] == "  a   b"
    assert column_values(["  h1   hh2", "   1    22", "   -     -"], "hh2") == ["22", "-"]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", DVC_NO_ANALYTICS="1",
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@example.com")


def _sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _project(root: Path) -> None:
    """Fake stage outputs + the stand-in report stage + the real track stage, committed."""
    params = load_test_params(**{"train.methods": ["sam", "stable_sam"], "evaluate.methods": ["sam", "stable_sam"],
                                 "seeds.methods": [], "tracking.registered_model": "exp-runs-test"})
    write_test_params(root / "params.yaml", params)
    sam, sha = write_tiny_base(root / "models/base", img=64, grid=16)
    (root / "models/plugins").mkdir(parents=True)
    for method in params.train.methods:
        write_trained_plugin(root / f"models/plugins/{method}.pt", method, sam, params.plugin, sha)
        (root / "metrics/train").mkdir(parents=True, exist_ok=True)
        (root / f"metrics/train/{method}.json").write_text(json.dumps({"final_loss": 0.2, "steps": 3}))
        (root / "metrics/eval/DIS5K-VD").mkdir(parents=True, exist_ok=True)
        (root / f"metrics/eval/DIS5K-VD/{method}.json").write_text("{}")
        (root / "plots/train").mkdir(parents=True, exist_ok=True)
        (root / f"plots/train/{method}_loss.csv").write_text("step,loss,lr\n0,1.0,0.001\n3,0.2,0.001\n")
    (root / "plots/eval").mkdir(parents=True, exist_ok=True)
    (root / "plots/eval/miou.png").write_bytes(b"\x89PNG fake")
    (root / "reports").mkdir()
    (root / "reports/summary.md").write_text("# summary\n")
    (root / "make_report.py").write_text(REPORT_SCRIPT)
    real = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["track"]
    track = {k: v for k, v in real.items() if k != "deps"}
    track["deps"] = [d for d in real["deps"] if (root / d).exists() or d in ("metrics/eval.json", "metrics/headline.json")]
    stages = {
        "report": {"cmd": "python make_report.py", "deps": ["make_report.py"], "params": ["seed"],
                   "outs": [{"metrics/eval.json": {"cache": False}}],
                   "metrics": [{"metrics/headline.json": {"cache": False}}]},
        "track": track,
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\n")


@pytest.fixture(scope="module")
def exp_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp_runs")
    root, env = tmp / "proj", _env(tmp)
    root.mkdir()
    _project(root)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _sh(cmd, root, env)
    _sh(["dvc", "repro"], root, env)
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "first run"], root, env)
    for seed in (10, 20):  # not in the test profile's seeds.extra
        _sh(["dvc", "exp", "run", "-S", f"seed={seed}"], root, env)
    return root, env


def test_every_repro_and_exp_run_is_one_mlflow_parent_run(exp_project):
    root, env = exp_project
    exps = json.loads(_sh(["dvc", "exp", "show", "--json"], root, env).splitlines()[-1])
    names = {e["name"] for base in exps for e in (base.get("experiments") or [])}
    assert len(names) == 2, exps
    tracker = Tracker(env["MLFLOW_TRACKING_URI"], load_test_params().tracking.experiment)
    parents = tracker.find_runs({KIND_TAG: "pipeline"})
    assert len(parents) == 3  # dvc repro + two dvc exp run: none skipped, none doubled
    assert {tracker.get_run(p.run_id).tags.get("dvc.exp_name") for p in parents} == names | {None}
    for p in parents:
        run = tracker.get_run(p.run_id)
        assert run.status == "FINISHED"
        md5_tags = {k for k in run.tags if k.startswith("dvc.md5.")}
        assert all(k.split(".")[2] in ("report", "track") for k in md5_tags), md5_tags  # no stale stages


def test_dvc_exp_show_fits_the_headline_in_120_columns(exp_project):
    root, env = exp_project
    lines = terminal_view(["dvc", "exp", "show"], root, env)
    header = next(line for line in lines if "Experiment" in line)
    assert all(key in header for key in LEAD), header
    values = column_values(lines, "R_noisy_box")
    # the committed run (seed 0) and both experiments (seeds 10, 20): recovery = (2 + seed) / 20
    assert {"0.1", "0.6", "1.1"} <= set(values), lines


def test_this_repository_exp_show_leads_with_the_headline(tmp_path):
    """The committed metrics/headline.json, as `dvc exp show` shows it here, in 120 columns."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.fail("needs the project's git checkout (CI runs on one)")
    lines = terminal_view([str(BIN / "dvc"), "exp", "show"], ROOT, _env(tmp_path))
    header = next(line for line in lines if "Experiment" in line)
    assert all(key in header for key in LEAD), "\n".join(lines)
    committed = json.loads((ROOT / "metrics/headline.json").read_text())
    shown = column_values(lines, "R_noisy_box")
    assert f"{committed['R_noisy_box']:g}" in shown, "\n".join(lines)
