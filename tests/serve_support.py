"""A hiermem server on a free loopback port, in a thread of the test process (tests/test_serve_*.py)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

import uvicorn

from hiermem.eval.run import Run
from hiermem.serve.app import create_app, listen

MODEL = "tiny"


@contextlib.contextmanager
def running_server(run_dir, overrides=(), **options):
    """Yields (base url, run, app); the server stops when the block ends."""
    run = Run(run_dir, device="cpu", overrides=list(overrides))
    app = create_app(run, MODEL, **options)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", run, app
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def http(url: str, body: bytes | dict | None = None, method: str | None = None, headers: dict | None = None,
         timeout: float = 60):
    """(status, parsed JSON or text) of one request; an HTTP error status is returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, kind = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
    return status, (json.loads(raw) if "json" in kind else raw.decode())


def metric(base: str, name: str) -> float:
    """The sum of a metric's samples in /metrics (0 when absent)."""
    _, text = http(base + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))
