"""Running `runtime.serve`'s app on 127.0.0.1 inside a test: a real uvicorn server on a free
port, in a thread, stopped when the block ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from runtime.server.app import build_app
from runtime.server.engine import Engine, ServeSettings, load_models
from runtime.sessions import SessionOptions


@contextmanager
def running_server(bundles: dict[str, Path], settings: ServeSettings) -> Iterator[tuple[str, Engine]]:
    """(base URL, engine) of a server over `bundles` (model id -> folder)."""
    engine = Engine(load_models(list(bundles.values()), list(bundles), SessionOptions(provider="cpu")), settings)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
