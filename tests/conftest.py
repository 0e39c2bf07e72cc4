"""Shared pytest fixtures (plain helpers are in tests/fakes.py; no test module imports another).

- ``test_params_path`` / ``test_params``: the checked-in test profile (tests/params_test.yaml). Tests use it,
  never the live params.yaml, whose values a user may change (e.g. to the full profile).
- ``http_server``: a started loopback HTTP file server with Range support and fault injection
  (see tests/fixtures_http.py for its knobs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from pipeline.config import Params
from tests.fakes import TEST_PARAMS_PATH, load_test_params
from tests.fixtures_http import LoopbackServer


@pytest.fixture(scope="session")
def test_params_path() -> Path:
    """The test profile's file (pass it to a stage CLI's ``--params``)."""
    return TEST_PARAMS_PATH


@pytest.fixture(scope="session")
def test_params() -> Params:
    """The test profile, loaded (frozen: derive variants with ``pipeline.config.replace``)."""
    return load_test_params()


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A started :class:`~tests.fixtures_http.LoopbackServer`, shut down after the test."""
    with LoopbackServer() as srv:
        yield srv
