"""Command line of the Prefect flows.

    python -m pipeline.flows run pipeline [--params params.yaml] [--stages index embed]
    python -m pipeline.flows run retrain  [--params params.yaml] [--set train.lr=3e-4 ...] [--no-promote]
    python -m pipeline.flows serve        [--params params.yaml] [--name weekly]

Without PREFECT_API_URL, ``run`` starts a temporary local Prefect server for the run; ``serve`` needs a
server (``prefect server start --host 127.0.0.1``, then ``export PREFECT_API_URL=http://127.0.0.1:4200/api``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

import pipeline  # noqa: F401  (before prefect)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value (like dvc exp run -S), got {pair!r}")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow once")
    run.add_argument("flow", choices=("pipeline", "retrain"))
    run.add_argument("--params", default="params.yaml")
    run.add_argument("--stages", nargs="*", default=None, help="only these dvc.yaml stages (default all)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="retrain: param override for `dvc exp run -S` (repeatable)")
    run.add_argument("--no-promote", action="store_true", help="retrain: skip champion/challenger promotion")
    srv = sub.add_parser("serve", help="serve the scheduled retrain + manual pipeline deployments")
    srv.add_argument("--params", default="params.yaml")
    srv.add_argument("--name", default="weekly", help="retrain deployment name (default weekly)")
    args = parser.parse_args(argv)

    if args.command == "serve":
        from pipeline.flows.deploy import serve_flows

        serve_flows(args.params, name=args.name)
        return 0
    if args.flow == "pipeline" and args.overrides:
        parser.error("--set is for `run retrain` (it runs `dvc exp run -S ...`)")
    from pipeline.flows.dvc_flows import pipeline_flow, retrain_flow

    try:
        if args.flow == "pipeline":
            result: Any = pipeline_flow(params_path=args.params, stages=args.stages)
        else:
            result = retrain_flow(params_path=args.params, overrides=_overrides(args.overrides) or None,
                                  stages=args.stages, promote=not args.no_promote)
    except Exception as exc:  # the flow's log above has the details
        print(f"flows: {args.flow} failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
