"""A loopback HTTP file server for download tests (no internet needed).

Serves an in-memory ``{path: bytes}`` table on 127.0.0.1 (port 0) from a daemon thread, honours
``Range: bytes=N-`` / ``bytes=N-M`` (206, or 416 past the end), and can be told to misbehave:
``cut_after`` (send only that many body bytes, then drop the connection, ``cut_times`` times),
``ignore_range`` (answer 200 with the whole file), ``wrong_range_start`` (answer every request with a
206 for the bytes from that offset, asked for or not), ``fail_status`` (answer that status ``fail_times``
times). Every request's path and Range header is recorded in ``requests``.

Use it through the ``http_server`` fixture (tests/conftest.py) or as a context manager:
``with LoopbackServer() as srv: srv.files["/a.zip"] = data; url = srv.url("a.zip")``.
"""
from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class LoopbackServer:
    """In-memory static file server; see the module docstring for the knobs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header or None)
        self.cut_after: int | None = None
        self.cut_times: int = 1
        self.ignore_range = False
        self.wrong_range_start: int | None = None
        self.fail_status: int | None = None
        self.fail_times: int = 1
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/name``; returns its URL."""
        self.files["/" + name.lstrip("/")] = data
        return self.url(name)

    def range_requests(self, path: str | None = None) -> list[str]:
        """The Range headers seen (optionally for one path, e.g. ``"/a.zip"``)."""
        return [r for p, r in self.requests if r is not None and (path is None or p == path)]

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ----------------------------------------------------------------------------------------------
    def _take(self, attr_value: str, attr_times: str) -> object:
        """Return the knob's value if it should fire for this request (and count it down)."""
        with self._lock:
            value = getattr(self, attr_value)
            if value is None or getattr(self, attr_times) <= 0:
                return None
            setattr(self, attr_times, getattr(self, attr_times) - 1)
            return value

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                with srv._lock:
                    srv.requests.append((path, rng))
                status = srv._take("fail_status", "fail_times")
                if status is not None:
                    self.send_error(int(status))  # type: ignore[arg-type]
                    return
                data = srv.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start, end = 0, len(data) - 1
                partial = False
                if rng and not srv.ignore_range:
                    m = _RANGE.match(rng.strip())
                    if m:
                        start = int(m.group(1))
                        end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
                        if start >= len(data):
                            self.send_response(416)
                            self.send_header("Content-Range", f"bytes */{len(data)}")
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        partial = True
                if srv.wrong_range_start is not None:  # a lying server: a range nobody asked for
                    start, end, partial = srv.wrong_range_start, len(data) - 1, True
                body = data[start : end + 1]
                self.send_response(206 if partial else 200)
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = srv._take("cut_after", "cut_times")
                if cut is not None:
                    self.wfile.write(body[: int(cut)])  # type: ignore[call-overload]
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler

