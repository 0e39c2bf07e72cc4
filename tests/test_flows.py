"""Prefect flows over a fake DVC project: stage list from dvc.yaml, streamed logs, retries, the workspace
lock, retrain with overrides, and (slow) a real local Prefect server serving the scheduled deployment.

Stage commands are stand-ins (``python -c ...``), so no DVC run happens here:

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_flows.py -q            # the slow server test too: -m slow
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import pipeline  # noqa: F401  (before prefect: Prefect home, analytics off)
from pipeline import PROJECT_ROOT
from pipeline.flows.commands import (
    DEFAULT_REPRO, dvc_stages, exp_command, select_stages, stage_command, stream_command,
)
from pipeline.flows.locking import LockTimeout, lock_path, workspace_lock
from tests.fakes import TEST_PARAMS_PATH, free_port

PY = sys.executable
# A fake stage: prints lines (one via stderr, one as a tqdm-like \r progress), records its time window.
FAKE_STAGE = (
    "import sys, time, os; stage = sys.argv[1]; log = os.environ.get('FAKE_LOG');"
    "t0 = time.time(); print('hello from', stage, flush=True); print('warn', stage, file=sys.stderr, flush=True);"
    "sys.stdout.write('progress 50%\\rprogress 100%\\n'); sys.stdout.flush();"
    "time.sleep(float(os.environ.get('FAKE_SLEEP', '0')));"
    "open(log, 'a').write(f'{stage} {os.environ.get(\"FAKE_TAG\", \"\")} {t0} {time.time()}\\n') if log else None;"
    "sys.exit(int(stage == os.environ.get('FAKE_FAIL', '')))"
)
FAKE_REPRO = [PY, "-c", FAKE_STAGE, "{stage}"]


def make_workspace(root: Path, stages=("prepare", "train")) -> Path:
    """A folder with a valid params.yaml (the test profile) and a dvc.yaml listing ``stages``; returns the params path."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load(TEST_PARAMS_PATH.read_text())
    params["tracking"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["schedule"]["retry_delay_s"] = 0.0
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {s: {"cmd": f"echo {s}"} for s in stages}},
                                                  sort_keys=False))
    return root / "params.yaml"


# --- no Prefect ------------------------------------------------------------------------------------
def test_stage_list_comes_from_dvc_yaml(tmp_path):
    make_workspace(tmp_path, stages=("download", "index", "train", "evaluate", "track"))
    assert dvc_stages(tmp_path) == ["download", "index", "train", "evaluate", "track"]
    assert select_stages(dvc_stages(tmp_path), ["track", "index"]) == ["index", "track"]
    with pytest.raises(ValueError, match="unknown stage.*'nope'"):
        select_stages(dvc_stages(tmp_path), ["nope"])
    with pytest.raises(FileNotFoundError, match="dvc.yaml"):
        dvc_stages(tmp_path / "empty")
    real = dvc_stages(PROJECT_ROOT)
    assert real[0] == "download" and "track" in real


def test_commands():
    assert stage_command(DEFAULT_REPRO, "train") == ["dvc", "repro", "train"]
    assert exp_command(["dvc", "exp", "run"], {"train.lr": 3e-4, "train.methods": ["a", "b"], "x": "y"}) == [
        "dvc", "exp", "run", "-S", "train.lr=0.0003", "-S", 'train.methods=["a", "b"]', "-S", "x=y"]


def test_stream_command_lines_progress_and_exit_code(tmp_path):
    lines: list[str] = []
    code = (
        "import sys, time\n"
        "print('one'); sys.stdout.flush()\n"
        "print('two', file=sys.stderr); sys.stderr.flush()\n"
        "for i in range(50):\n    sys.stdout.write(f'\\rbar {i}'); sys.stdout.flush()\n"
        "sys.stdout.write('\\rbar done\\r\\n'); print('caf\\u00e9'); sys.stdout.write('tail')\n"
        "sys.exit(3)\n"
    )
    rc = stream_command([PY, "-c", code], tmp_path, lines.append, progress_interval_s=3600)
    assert rc == 3
    assert lines[:2] == ["one", "two"]
    bars = [line for line in lines if line.startswith("bar")]
    assert len(bars) <= 3 and "bar done" in bars  # progress redraws are throttled; the final line is kept
    assert lines[-2:] == ["café", "tail"]


def test_stream_command_lines_arrive_while_running(tmp_path):
    seen: list[tuple[float, str]] = []
    code = "import time\nprint('early', flush=True)\ntime.sleep(1.0)\nprint('late', flush=True)\n"
    stream_command([PY, "-c", code], tmp_path, lambda s: seen.append((time.monotonic(), s)))
    assert [s for _, s in seen] == ["early", "late"]
    assert seen[1][0] - seen[0][0] > 0.5  # streamed, not collected at the end


def test_workspace_lock_serialises_and_times_out(tmp_path):
    assert lock_path(tmp_path) == tmp_path / ".pipeline-flow.lock"
    (tmp_path / ".dvc").mkdir()
    assert lock_path(tmp_path) == tmp_path / ".dvc" / "tmp" / "pipeline-flow.lock"
    waits: list[str] = []
    events: list[str] = []
    with workspace_lock(tmp_path, owner="first"):
        with pytest.raises(LockTimeout, match="first"):
            with workspace_lock(tmp_path, timeout_s=0.2, poll_s=0.05, on_wait=waits.append):
                pass
        assert len(waits) == 1 and "busy" in waits[0]

        def second() -> None:
            with workspace_lock(tmp_path, poll_s=0.05):
                events.append("second in")

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        events.append("first out")
    t.join(timeout=10)
    assert events == ["first out", "second in"]


# --- Prefect (temporary local API, started once) ----------------------------------------------------
@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def flow_logs(flow_run_id) -> list[str]:
    """Messages the flow run (and its tasks) sent to the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [log.message for log in logs]


def test_pipeline_flow_runs_stages_in_order_and_streams(prefect_api, tmp_path, monkeypatch):
    from pipeline.flows.dvc_flows import pipeline_flow

    params = make_workspace(tmp_path)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.log"))
    state = pipeline_flow(str(params), repro_command=FAKE_REPRO, return_state=True)
    assert state.is_completed()
    assert state.result() == ["prepare", "train"]
    calls = (tmp_path / "calls.log").read_text().split("\n")
    assert [c.split()[0] for c in calls if c] == ["prepare", "train"]
    messages = flow_logs(state.state_details.flow_run_id)
    for stage in ("prepare", "train"):
        assert f"hello from {stage}" in messages and f"warn {stage}" in messages
    assert any(m.startswith("$ ") and "prepare" in m for m in messages)


def test_pipeline_flow_failure_and_network_retries(prefect_api, tmp_path, monkeypatch):
    from pipeline.flows.dvc_flows import pipeline_flow

    params = make_workspace(tmp_path, stages=("download", "index"))
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL", "download")  # a network stage: retried schedule.network_retries times
    state = pipeline_flow(str(params), repro_command=FAKE_REPRO, return_state=True)
    assert state.is_failed()
    runs = [c.split()[0] for c in log.read_text().splitlines()]
    assert runs == ["download"] * 3  # 1 + network_retries (2); index never ran
    log.unlink()
    monkeypatch.setenv("FAKE_FAIL", "index")  # not a network stage: no retry
    state = pipeline_flow(str(params), repro_command=FAKE_REPRO, return_state=True)
    assert state.is_failed() and "index" in str(state.message) + repr(state.result(raise_on_failure=False))
    assert [c.split()[0] for c in log.read_text().splitlines()] == ["download", "index"]
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline_flow(str(params), stages=["nope"], repro_command=FAKE_REPRO)


def test_flow_waits_while_another_run_holds_the_workspace(prefect_api, tmp_path, monkeypatch):
    from pipeline.flows.dvc_flows import pipeline_flow

    params = make_workspace(tmp_path)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    states = {}
    with workspace_lock(tmp_path, owner="another flow run"):
        t = threading.Thread(target=lambda: states.setdefault(
            "s", pipeline_flow(str(params), repro_command=FAKE_REPRO, return_state=True)))
        t.start()
        time.sleep(3.0)
        assert not log.exists()  # no stage ran while the workspace was held
        released = time.time()
    t.join(timeout=60)
    assert states["s"].is_completed()
    starts = [float(line.split()[-2]) for line in log.read_text().splitlines()]
    assert len(starts) == 2 and min(starts) >= released
    assert any("busy" in m and "another flow run" in m for m in flow_logs(states["s"].state_details.flow_run_id))


# Two flow runs in two processes on one workspace. Each stage first waits for a "go" file that the test
# writes once both processes are up, so that without the lock their stages would certainly overlap.
TWO_PROCESS_FLOW = """
import sys, pathlib, pipeline
from pipeline.flows.dvc_flows import pipeline_flow
params, tag, ready, stage_code = sys.argv[1:5]
pathlib.Path(ready).write_text("ready")
state = pipeline_flow(params, repro_command=[sys.executable, "-c", stage_code, "{stage}", tag], return_state=True)
sys.exit(0 if state.is_completed() else 1)
"""
GATED_STAGE = (
    "import sys, time, os, pathlib; go = pathlib.Path(os.environ['GO_FILE']);"
    "[time.sleep(0.05) for _ in iter(lambda: go.exists(), True)];"
    "t0 = time.time(); time.sleep(0.5);"
    "open(os.environ['FAKE_LOG'], 'a').write(f'{sys.argv[1]} {sys.argv[2]} {t0} {time.time()}\\n')"
)


@pytest.mark.slow
def test_concurrent_flow_runs_are_serialised(prefect_api, tmp_path):
    from prefect.settings import PREFECT_API_URL

    params = make_workspace(tmp_path)
    log, go = tmp_path / "calls.log", tmp_path / "go"
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "FAKE_LOG": str(log),
           "GO_FILE": str(go), "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen([PY, "-c", TWO_PROCESS_FLOW, str(params), tag, str(tmp_path / f"ready-{tag}"),
                               GATED_STAGE], env=env, cwd=tmp_path) for tag in ("A", "B")]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{tag}").exists() for tag in ("A", "B")):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        time.sleep(3.0)  # both flows reach their first stage (or the lock)
        go.write_text("go")
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    windows: dict[str, list[float]] = {}
    for line in log.read_text().splitlines():
        stage, tag, t0, t1 = line.split()
        w = windows.setdefault(tag, [float("inf"), float("-inf")])
        w[0], w[1] = min(w[0], float(t0)), max(w[1], float(t1))
    assert set(windows) == {"A", "B"}
    (a0, a1), (b0, b1) = sorted(windows.values())
    assert a1 <= b0, windows  # all of one flow run's stages ran before any of the other's


def test_retrain_with_overrides_runs_dvc_exp(prefect_api, tmp_path):
    from pipeline.flows.dvc_flows import retrain_flow

    params = make_workspace(tmp_path)
    fake_exp = [PY, "-c", "import sys; print('exp argv', *sys.argv[1:])"]
    state = retrain_flow(str(params), overrides={"train.lr": 3e-4, "train.methods": ["sam", "stable_sam", "pt_sam"]},
                         promote=False, exp_command_prefix=fake_exp, return_state=True)
    assert state.is_completed()
    assert state.result() == {"promote": False, "reason": "promotion disabled"}
    messages = flow_logs(state.state_details.flow_run_id)
    assert 'exp argv -S train.lr=0.0003 -S train.methods=["sam", "stable_sam", "pt_sam"]' in messages


def test_a_bad_override_fails_at_once_and_leaves_the_workspace_as_it_was(prefect_api, tmp_path):
    """``train.lr=abc`` is refused by the config before any command runs; params.yaml is untouched and the
    next plain run succeeds."""
    from pipeline.flows.dvc_flows import pipeline_flow, retrain_flow

    params = make_workspace(tmp_path)
    before = params.read_bytes()
    ran = tmp_path / "exp-ran"
    fake_exp = [PY, "-c", f"open({str(ran)!r}, 'w').write('ran')"]
    state = retrain_flow(str(params), overrides={"train.lr": "abc"}, promote=False, exp_command_prefix=fake_exp,
                         return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"train\.lr"):
        state.result()
    assert not ran.exists() and params.read_bytes() == before
    assert pipeline_flow(str(params), repro_command=FAKE_REPRO) == ["prepare", "train"]


def test_an_override_run_that_fails_cannot_leave_its_values_in_params(prefect_api, tmp_path):
    """Whatever the experiment command does to params.yaml (here: writes the override into it, then fails),
    the file is restored byte for byte; the command gets the workspace's MLflow URI."""
    from pipeline.flows.commands import DEFAULT_EXP
    from pipeline.flows.dvc_flows import retrain_flow

    params = make_workspace(tmp_path)
    before = params.read_bytes()
    seen = tmp_path / "env.txt"
    poison = (f"import os, sys; open({str(seen)!r}, 'w').write(os.environ.get('MLFLOW_TRACKING_URI', ''));"
              f"open({str(params)!r}, 'a').write('poison: 1\\n'); sys.exit(3)")
    state = retrain_flow(str(params), overrides={"train.lr": "3e-4"}, promote=False,
                         exp_command_prefix=[PY, "-c", poison], return_state=True)
    assert state.is_failed()
    assert params.read_bytes() == before
    assert seen.read_text() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "--temp" in DEFAULT_EXP  # the real command runs in DVC's temporary folder, not the workspace


def test_overrides_are_parsed_as_dvc_reads_them(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.flows.dvc_flows import parse_override, validated_overrides

    assert parse_override("3e-4") == 3e-4 and parse_override("[1, 2]") == [1, 2] and parse_override(5) == 5
    params = make_workspace(tmp_path)
    assert validated_overrides(params, {"train.lr": "3e-4"}) == {"train.lr": 3e-4}
    with pytest.raises(ConfigError, match="train"):
        validated_overrides(params, {"train.no_such_key": 1})


# --- slow: a real server, the served cron deployment, a triggered run --------------------------------
def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
def test_served_cron_deployment_runs_on_a_real_server(tmp_path):
    """prefect server (127.0.0.1, random port) + `serve` of the retrain deployment (cron from params) with a
    fake pipeline + promotion against an empty MLflow store; trigger it and see it complete."""
    params = make_workspace(tmp_path / "ws")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(PROJECT_ROOT),
           "FAKE_LOG": str(tmp_path / "calls.log")}
    env.pop("PREFECT_API_KEY", None)
    prefect = str(Path(PY).with_name("prefect"))
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    served = None
    try:
        _wait_http(f"{api}/health", 180, server)
        serve_code = (
            "import sys, json; import pipeline; from pipeline.flows.deploy import serve_flows; "
            "serve_flows(sys.argv[1], name='test', parameters={'repro_command': json.loads(sys.argv[2])})"
        )
        served = subprocess.Popen([PY, "-c", serve_code, str(params), json.dumps(FAKE_REPRO)], env=env,
                                  cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 120
        while True:  # wait until the deployment is registered
            out = subprocess.run([prefect, "deployment", "inspect", "retrain/test"], env=env, capture_output=True,
                                 text=True)
            if out.returncode == 0:
                break
            assert served.poll() is None, "serve process died"
            assert time.monotonic() < deadline, out.stdout + out.stderr
            time.sleep(2)
        schedule = yaml.safe_load(params.read_text())["schedule"]
        assert schedule["cron"] in out.stdout and schedule["timezone"] in out.stdout  # cron + timezone from params
        run = subprocess.run([prefect, "deployment", "run", "retrain/test", "--watch", "--watch-timeout", "240"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        assert re.search(r"Completed", run.stdout + run.stderr), run.stdout + run.stderr
        calls = (tmp_path / "calls.log").read_text().split()
        assert calls[0] == "prepare" and "train" in calls
        assert (tmp_path / "ws" / "mlflow.db").is_file()  # the promotion step ran against the workspace store
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
        shutil.rmtree(tmp_path / "prefect-home", ignore_errors=True)
