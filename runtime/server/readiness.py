"""For programs that start `python -m runtime.serve` as a child process (the serving benchmark,
the tests, a user's launcher): a free port to give it, and a wait until it answers /health."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float) -> None:
    """Return once `url`/health answers 200; a `RuntimeError` (with the server's stderr, where
    it is a pipe) if `process` ends or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while its sessions load
        if process.poll() is not None or time.monotonic() > deadline:
            said = process.stderr.read() if process.poll() is not None and process.stderr else ""
            raise RuntimeError(f"runtime.serve at {url} did not become healthy (exit status {process.poll()}){': ' + said.strip() if said else ''}")
        time.sleep(0.1)
