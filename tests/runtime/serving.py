"""Running `runtime.serve` on 127.0.0.1 inside a test: its app on a real uvicorn server in a
thread (`running_server`), or the command itself in a child process (`serve_process`)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from runtime.serve import draining_server
from runtime.server.app import build_app
from runtime.server.engine import Engine, ServeSettings, load_models
from runtime.server.readiness import free_port, wait_until_healthy
from runtime.sessions import SessionOptions
from tests.helpers import REPO, SUBPROCESS_TIMEOUT_S


@contextmanager
def running_server(bundles: dict[str, Path], settings: ServeSettings) -> Iterator[tuple[str, Engine]]:
    """(base URL, engine) of a server over `bundles` (model id -> folder)."""
    engine = Engine(load_models(list(bundles.values()), list(bundles), SessionOptions(provider="cpu")), settings)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    with _started(server, engine) as url:
        yield url, engine


@contextmanager
def running_draining_server(bundles: dict[str, Path], settings: ServeSettings, grace_s: float) -> Iterator[tuple[str, Engine, uvicorn.Server]]:
    """(base URL, engine, server) of `runtime.serve`'s draining server: `server.handle_exit(signal.SIGTERM, None)`
    is what the signal does in the command."""
    engine = Engine(load_models(list(bundles.values()), list(bundles), SessionOptions(provider="cpu")), settings)
    server = draining_server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"), engine, grace_s)
    with _started(server, engine) as url:
        yield url, engine, server


@contextmanager
def _started(server: uvicorn.Server, engine: Engine) -> Iterator[str]:
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SUBPROCESS_TIMEOUT_S)
        engine.close()


@contextmanager
def serve_process(*args: object, env: dict[str, str] | None = None, stdout: int | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """(base URL, process) of `python -m runtime.serve ARGS --port P` once its /health answers
    200; its stderr is a text pipe. Killed at the end of the block if still running."""
    port = free_port()
    command = [sys.executable, "-m", "runtime.serve", *map(str, args), "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, SUBPROCESS_TIMEOUT_S)  # a loaded machine may take minutes to start Ray
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
