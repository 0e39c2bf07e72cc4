"""Prefect 3 orchestration of the DVC pipeline (no ML logic): :mod:`.dvc_flows` (flows and tasks),
:mod:`.commands` (stage list, commands, streamed subprocesses), :mod:`.locking` (one DVC run per
workspace), :mod:`.deploy` (scheduled deployment). ``python -m pipeline.flows --help``."""
