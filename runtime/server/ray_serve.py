"""The same app as a Ray Serve deployment: each replica holds its own sessions and `Engine`,
encoder clips are batched by `@serve.batch`, and the FastAPI app is the ingress. Scaling out
is `--replicas N` and the cluster's address (RAY_ADDRESS or `--ray-address`)."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.server.engine import AudioJob, Engine, ServeSettings, load_models
from runtime.sessions import SessionOptions


def deployment(
    bundles: Sequence[Path],
    names: Sequence[str] | None,
    settings: ServeSettings,
    session: SessionOptions,
    replicas: int = 1,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
) -> Any:
    """A bound Ray Serve application of the server over `bundles` (absolute paths: replicas
    may start in another working directory or on another node that mounts the same path)."""
    from ray import serve

    bundles = [str(Path(b).resolve()) for b in bundles]

    @serve.deployment(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus, **({"num_gpus": replica_gpus} if replica_gpus else {})},
        max_ongoing_requests=settings.max_queue,
    )
    @serve.ingress()
    class LalmExportServer:
        def __init__(self) -> None:
            from runtime.server.memory import limit_malloc_arenas

            limit_malloc_arenas()  # a replica is a process of its own: as runtime.serve does
            models = load_models([Path(b) for b in bundles], names, session)
            # @serve.batch needs a replica context, which Ray Serve's local testing mode does
            # not set (Ray 2.60): there the engine's own batcher (the same rules) is used.
            self.engine = Engine(models, settings, audio_batch=self.encode_batch if _in_replica() else None)
            self.encode_batch.set_max_batch_size(settings.max_batch_size)
            self.encode_batch.set_batch_wait_timeout_s(settings.max_batch_wait_ms / 1000)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def encode_batch(self, jobs: list[AudioJob]) -> list[Any]:
            return await asyncio.get_running_loop().run_in_executor(self.engine.executor, self.engine.run_audio_jobs, jobs)

        def __serve_build_asgi_app__(self) -> Any:
            from runtime.server.app import build_app

            return build_app(self.engine)

        async def transcribe(self, model: str, audio_bytes: bytes, prompt: str | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
            """For other deployments holding a handle: one audio file's text (greedy), as the HTTP endpoint gives it."""
            return await transcribe_bytes(self.engine, model, audio_bytes, prompt, max_new_tokens)

    return LalmExportServer.bind()


def _in_replica() -> bool:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except (RayServeException, RuntimeError):
        return False
    return True


async def transcribe_bytes(engine: Engine, model_name: str, audio_bytes: bytes, prompt: str | None, max_new_tokens: int | None) -> dict[str, Any]:
    from runtime.generation import GenerationOptions

    model = engine.model(model_name, ("lalm",), "transcribe")
    options = GenerationOptions(max_new_tokens=max_new_tokens or 1)
    with engine.admission():
        work = await engine.transcription(model, audio_bytes, "audio", prompt, options, max_new_tokens, None)
        result = await work(None)
    return {"text": result.text, "tokens": result.tokens}


def serve_on_ray(args: Any, settings: ServeSettings) -> None:
    """Start (or join) Ray, run the deployment behind Ray Serve's proxy on --host/--port, and
    block until interrupted; then shut the application down."""
    import os

    import ray
    from ray import serve

    from runtime.errors import RuntimeUserError

    if args.replicas < 1:
        raise RuntimeUserError(f"--replicas must be at least 1, not {args.replicas}")
    # "local": a new instance, never one a previous run is still tearing down
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=not args.quiet)
    # After ray.init, which installs its own SIGTERM handler (exit 15): a signal during start-up
    # or serving stops the application as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        session = SessionOptions(provider=args.provider, threads=args.threads, max_clip_memory_gb=args.max_clip_memory_gb)
        app = deployment(args.bundles, args.name, settings, session, args.replicas, args.replica_cpus, args.replica_gpus)
        serve.run(app, name="lalm-export", route_prefix="/")
        print(f"runtime.serve: on Ray Serve at http://{args.host}:{args.port} ({args.replicas} replica(s)); Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("runtime.serve: stopping the Ray Serve application", file=sys.stderr, flush=True)
    finally:
        # A signal sent to the whole process group (a container stop) kills Ray's own
        # processes too, and serve.shutdown() then waits for them forever: bound it.
        stopper = threading.Thread(target=serve.shutdown, daemon=True)
        stopper.start()
        stopper.join(timeout=30)
        ray.shutdown()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
