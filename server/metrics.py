"""Observability: structured JSON logs and a Prometheus text-format metrics endpoint.

Log records of the ``fedquant.server`` logger are written one JSON object per line
(``{"ts": ..., "level": ..., "event": ..., **fields}``); modules pass their fields as
``log.info("round_closed", extra={"fields": {...}})``.

:class:`Metrics` counts pushes (by status), bytes, decode seconds and rounds; ``serve`` with
``--metrics-port`` exposes them at ``http://127.0.0.1:<port>/metrics``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, event (the message) and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 6), "level": record.levelname.lower(),
                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("fedquant.server")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


class Metrics:
    """Thread-safe counters, rendered in the Prometheus text exposition format."""

    __slots__ = ("_lock", "_counters", "started")

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = {}
        self.started = time.time()

    def add(self, name: str, value: float = 1.0, label: str = "") -> None:
        with self._lock:
            self._counters[(name, label)] = self._counters.get((name, label), 0.0) + value

    def get(self, name: str, label: str = "") -> float:
        with self._lock:
            return self._counters.get((name, label), 0.0)

    def render(self, gauges: dict[str, float] | None = None) -> str:
        lines = []
        with self._lock:
            items = sorted(self._counters.items())
        for (name, label), value in items:
            lines.append(f"{name}{{{label}}} {value:g}" if label else f"{name} {value:g}")
        for name, value in sorted((gauges or {}).items()):
            lines.append(f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def serve_metrics(render, host: str, port: int) -> ThreadingHTTPServer:
    """Start a daemon HTTP server answering GET /metrics with `render()`; returns it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path != "/metrics":
                self.send_error(404)
                return
            body = render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep stderr for the JSON logs
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True, name="metrics").start()
    return httpd
