"""Run every benchmark in benchmarks/ and write one report: the machine, each ratio, its goal, pass/fail.

    python -m benchmarks.run_all                                   # -> reports/benchmarks.json
    python -m benchmarks.run_all --only train_step eval_image --out /tmp/bench.json
    python -m benchmarks.run_all --modules mypkg.bench_a --timeout 600

Each benchmark runs as its own subprocess (``python -m benchmarks.<name>``, nothing shared), with its output
echoed as it comes; its last stdout line that is a JSON object is its result. A benchmark that exits
nonzero, times out or prints no JSON is recorded as failed (with its stderr tail) and the run goes on.
The report (written atomically): ``machine`` (platform, CPU model, cores, load average, torch version,
CUDA device, date) and per benchmark ``ratio``, ``goal``, ``passed`` (the ratio against the goal's
``<=``/``>=`` bound; null when there is no parsable goal), ``seconds``, ``returncode`` and its ``result``.
Exit status: 1 when a benchmark failed to run (or, with ``--strict``, missed its goal), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from pipeline.common.atomic import atomic_write_json  # noqa: E402

PACKAGE = "benchmarks"
SELF = "run_all"
GOAL_RE = re.compile(r"(<=|>=)\s*([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
STDERR_TAIL_LINES = 20


def discover(folder: Path = PROJECT / PACKAGE) -> list[str]:
    """Module names of the benchmarks in ``folder``: every ``*.py`` but ``__init__``, this runner and ``_*``."""
    return [f"{PACKAGE}.{p.stem}" for p in sorted(folder.glob("*.py"))
            if p.stem not in ("__init__", SELF) and not p.stem.startswith("_")]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Where the benchmarks ran: platform, CPU, cores, load, Python, torch and the CUDA device (if any), date."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"], info["cuda_device"] = None, None
    return info


def parse_goal(goal: Any) -> tuple[str, float] | None:
    """``"<= 1.3"``, ``"ratio >= 0.90"`` -> (op, bound); None when the goal names no bound."""
    m = GOAL_RE.search(str(goal)) if goal is not None else None
    return (m.group(1), float(m.group(2))) if m else None


def meets(ratio: Any, goal: Any) -> bool | None:
    """Whether ``ratio`` meets ``goal`` (None when either is missing or not a number)."""
    bound = parse_goal(goal)
    if bound is None or not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio != ratio:
        return None
    op, value = bound
    return ratio <= value if op == "<=" else ratio >= value


def last_json(lines: Sequence[str]) -> dict[str, Any] | None:
    """The last line of ``lines`` that is a JSON object, parsed."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def run_one(module: str, timeout: float, echo: bool = True) -> dict[str, Any]:
    """Run ``python -m module`` from the project root; its stdout is echoed and its last JSON line kept."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), *filter(None, [env.get("PYTHONPATH")])])
    lines: list[str] = []
    t0 = time.perf_counter()
    timed_out = False
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen([sys.executable, "-m", module], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True, errors="replace", start_new_session=True)

        def pump() -> None:  # echo stdout as it comes, keep it for the JSON line
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if echo:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the benchmark and any child it started
            proc.wait()
        reader.join()
        rc = proc.returncode
        err.seek(0)
        stderr_tail = err.read().splitlines()[-STDERR_TAIL_LINES:]
    seconds = round(time.perf_counter() - t0, 1)
    result = last_json(lines)
    entry: dict[str, Any] = {"module": module, "returncode": rc, "seconds": seconds}
    if timed_out:
        entry["error"] = f"timed out after {timeout:g} s"
    elif rc != 0:
        entry["error"] = f"exited with status {rc}"
    elif result is None:
        entry["error"] = "printed no JSON object on stdout"
    if "error" in entry:
        entry["stderr_tail"] = stderr_tail
        if echo:
            print(f"!! {module}: {entry['error']}\n" + "\n".join(stderr_tail), file=sys.stderr, flush=True)
    else:
        entry.update(ratio=result.get("ratio"), goal=result.get("goal"), passed=meets(result.get("ratio"), result.get("goal")),
                     result=result)
    entry.setdefault("ratio", None)
    entry.setdefault("goal", None)
    entry.setdefault("passed", False)
    return entry


def run_all(modules: Sequence[str], out: Path, *, timeout: float, echo: bool = True) -> dict[str, Any]:
    """Run ``modules`` one after the other and write the report to ``out``; returns it."""
    report: dict[str, Any] = {"machine": machine_info(), "benchmarks": {}}
    for module in modules:
        if echo:
            print(f"== {module}", flush=True)
        report["benchmarks"][module.rsplit(".", 1)[-1]] = run_one(module, timeout, echo)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    entries = report["benchmarks"].values()
    report["failed_to_run"] = sorted(k for k, e in report["benchmarks"].items() if "error" in e)
    report["missed_goal"] = sorted(k for k, e in report["benchmarks"].items() if "error" not in e and e["passed"] is False)
    report["all_passed"] = all(e["passed"] is not False for e in entries) and not report["failed_to_run"]
    atomic_write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/benchmarks.json"), help="report path (JSON)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="benchmark names in benchmarks/ (default: all)")
    ap.add_argument("--modules", nargs="+", metavar="MODULE", help="dotted module names to run instead")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark (default 3600)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a benchmark misses its goal too")
    args = ap.parse_args(argv)
    available = discover()
    if args.modules:
        modules = list(args.modules)
    elif args.only:
        unknown = [n for n in args.only if f"{PACKAGE}.{n}" not in available]
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; known: {[m.rsplit('.', 1)[-1] for m in available]}")
        modules = [f"{PACKAGE}.{n}" for n in args.only]
    else:
        modules = available
    report = run_all(modules, args.out, timeout=args.timeout)
    print(f"== report: {args.out}")
    for name, e in report["benchmarks"].items():
        verdict = "FAILED TO RUN" if "error" in e else {True: "pass", False: "MISSED", None: "no goal"}[e["passed"]]
        print(f"  {name:16s} ratio {e['ratio']!s:>8s}  goal {e['goal']!s:12s} {verdict}")
    if report["failed_to_run"] or (args.strict and report["missed_goal"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
