"""Stable-SAM pipeline: frozen SAM + deformable-sampling / dynamic-routing plugins.

Importing the package sets the offline switches below (only where the user has not set them), so
that no tool of the pipeline phones home and Prefect keeps its state inside the project.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    # Two slow cores: the temporary Prefect server can need more than its 20 s default to start.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
for _key, _value in _OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"
