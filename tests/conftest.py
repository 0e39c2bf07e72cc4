"""Shared pytest fixtures.

``http_server``: a started loopback HTTP file server with Range support and fault injection
(see tests/fixtures_http.py for its knobs); available to every test module without an import.
"""
from tests.fixtures_http import http_server  # noqa: F401 - registers the fixture
