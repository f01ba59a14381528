"""`python -m runtime.serve BUNDLE [BUNDLE ...]`: an OpenAI-compatible HTTP server over
lalm-export bundles (ONNX Runtime, no PyTorch), in this process or on Ray Serve (`--ray`)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from runtime.flags import PREFILL_POSITIONS_PER_STEP, add_session_flags

EPILOG = """endpoints:
  GET  /health                   200 once every bundle's sessions exist; 503 "draining" after SIGINT/SIGTERM while
                                 requests in flight finish (and for --shutdown-delay); then the port closes
  GET  /v1/models                the bundles (id = folder name or --name), with role, precision, provider
  POST /v1/audio/transcriptions  audio LLM bundles: OpenAI's form (file, model, prompt, response_format, stream)
  POST /v1/chat/completions      decoder and audio LLM bundles: text and input_audio parts, stream, usage
  POST /v1/audio/features        encoder bundles (not an OpenAI endpoint): file in, .npy (or JSON) out
  GET  /metrics                  Prometheus text format

examples:
  python -m runtime.serve bundles/lalm bundles/wav2vec2 --port 8000
  python -m runtime.serve bundles/lalm --ray --replicas 2          # Ray Serve; RAY_ADDRESS picks the cluster

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.audio.transcriptions.create(model="lalm", file=open("a.wav", "rb"))

exit status: 0 stopped (SIGINT/SIGTERM: in-flight requests finish first); 1 user error; 2 bad flags."""


def port_number(text: str) -> int:
    """A TCP port: the socket layer would take 70000 modulo 65536 and listen on another one."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; choose one in 1-65535")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description="Serve lalm-export bundles over an OpenAI-compatible HTTP API with dynamic batching.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE", help="bundle folders written by lalm-export")
    parser.add_argument("--name", action="append", metavar="ID", help="model id of each bundle, in order (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    load = parser.add_argument_group("batching and limits")
    load.add_argument("--max-batch-size", type=int, default=8, help="clips per encoder batch (default: 8)")
    load.add_argument(
        "--max-batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a lone clip waits for others to batch with; clips that arrive while a batch runs form the next one (default: 2)",
    )
    load.add_argument("--max-queue", type=int, default=64, help="requests in flight (waiting or running) before new ones get 503 (default: 64)")
    load.add_argument(
        "--decode-slots",
        type=int,
        default=16,
        help="generations that run at once, their decode steps batched into one decoder call; more wait for a free row (default: 16)",
    )
    load.add_argument(
        "--prefill-budget",
        type=int,
        default=PREFILL_POSITIONS_PER_STEP,
        help="prompt positions prefilled between two decode steps: a prompt longer than this, sent while generations run, is "
        "prefilled in chunks of this many, so running streams wait for one chunk a step, not a whole prompt; smaller: smoother "
        f"streams, a slower first token for long prompts (default: {PREFILL_POSITIONS_PER_STEP})",
    )
    load.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request is ended with 504 (default: 300)")
    load.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body in MiB; larger get 413 (default: 25, OpenAI's upload limit)")
    load.add_argument(
        "--max-new-tokens",
        type=int,
        help="the most tokens a request that does not say (no max_tokens) generates (default: the rest of the decoder's context after "
        "the prompt, vLLM's rule; generation ends at EOS before that)",
    )
    load.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM (default: 30)")
    load.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        help="seconds the server keeps listening after SIGTERM, answering /health and new requests with 503, so a load balancer "
        "sees it draining before the port closes (default: 0: close once the requests in flight are done)",
    )
    run = parser.add_argument_group("sessions")
    add_session_flags(run)
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (batching by @serve.batch) instead of in this process")
    ray.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (default: 1)")
    ray.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs each replica reserves (default: 1)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves (default: 0; 1 with --provider cuda)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no access log")
    return parser


def settings_from(args: argparse.Namespace):
    from runtime.errors import RuntimeUserError
    from runtime.server.engine import ServeSettings

    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_queue=args.max_queue,
        decode_slots=args.decode_slots,
        prefill_budget=args.prefill_budget,
        request_timeout_s=args.request_timeout,
        max_body_mb=args.max_body_mb,
        max_new_tokens=args.max_new_tokens,
    )
    settings.validate()
    for flag, value in (("--shutdown-timeout", args.shutdown_timeout), ("--shutdown-delay", args.shutdown_delay)):
        if not 0 <= value < float("inf"):
            raise RuntimeUserError(f"{flag} must be a number of seconds, 0 or more, not {value}")
    return settings


def serve_here(args: argparse.Namespace) -> None:
    import uvicorn

    from runtime.server.app import build_app
    from runtime.server.engine import Engine, load_models
    from runtime.server.memory import limit_malloc_arenas
    from runtime.sessions import SessionOptions

    limit_malloc_arenas()  # before the engine's threads exist
    settings = settings_from(args)
    models = load_models(args.bundles, args.name, SessionOptions(provider=args.provider, threads=args.threads, max_clip_memory_gb=args.max_clip_memory_gb))
    engine = Engine(models, settings)
    for model in models.values():
        card = model.card()
        print(f"runtime.serve: {card['id']}: {card['family']} {card['role']} ({card['precision']}), provider {card['provider']}", file=sys.stderr)
    config = uvicorn.Config(build_app(engine), host=args.host, port=args.port, log_level="warning" if args.quiet else "info", access_log=not args.quiet)
    try:
        draining_server(config, engine, args.shutdown_timeout, args.shutdown_delay).run()
    finally:
        engine.close()


def draining_server(config, engine, grace_s: float, delay_s: float = 0.0):
    """A uvicorn server that drains on SIGINT/SIGTERM (the class is made here: uvicorn is an optional dependency)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On SIGINT/SIGTERM, stop admitting (new requests and /health get 503 with Retry-After),
        keep listening for at least `delay_s`, let the requests in flight finish (up to the
        shutdown timeout), then stop. A second signal stops at once."""

        def handle_exit(self, sig: int, frame) -> None:
            if engine.draining:  # the second signal: stop now, in-flight requests or not (uvicorn would re-raise it at exit)
                self.should_exit = self.force_exit = True
                return
            engine.draining = True
            held = f", listening {delay_s:g} s more" if delay_s else ""
            print(f"runtime.serve: stopping; {engine.pending} request(s) in flight get up to {grace_s:g} s to finish{held}", file=sys.stderr)
            threading.Thread(target=self._exit_when_idle, daemon=True).start()

        def _exit_when_idle(self) -> None:
            start = time.monotonic()
            while time.monotonic() < start + delay_s or (engine.pending and time.monotonic() < start + max(grace_s, delay_s)):
                time.sleep(0.05)
            self.should_exit = True

    return DrainingServer(config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.errors import RuntimeUserError

    try:
        _check_extra(args.ray)
        check_bundles(args.bundles)
        check_port_free(args.host, args.port)
        if args.ray:
            from runtime.server.ray_serve import serve_on_ray

            serve_on_ray(args, settings_from(args))
        else:
            serve_here(args)
    except RuntimeUserError as err:
        print(f"runtime.serve: error: {err}", file=sys.stderr)
        return 1
    except PermissionError as err:
        from runtime.manifest import denied

        print(f"runtime.serve: error: {denied('path', err.filename)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def check_bundles(bundles: list[Path]) -> None:
    """Each bundle's manifest, read before a server or Ray starts: a wrong path is one line, not
    a replica's traceback in Ray's logs."""
    from runtime.manifest import read_manifest

    for bundle in bundles:
        read_manifest(bundle)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on before loading anything (uvicorn would log the
    failure and exit with its own status 3)."""
    import socket

    from runtime.errors import RuntimeUserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as err:
            raise RuntimeUserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port, or stop the program that holds it") from None


def _check_extra(ray: bool) -> None:
    """The server's libraries come with the `serve` extra: say so instead of an ImportError."""
    import importlib.util

    from runtime.errors import RuntimeUserError

    needed = ["fastapi", "uvicorn", "multipart", "prometheus_client"] + (["ray"] if ray else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        extra = "serve,ray" if ray else "serve"
        raise RuntimeUserError(f"the server needs {', '.join(missing)}; install them with: pip install 'lalm-export[{extra}]'")


if __name__ == "__main__":
    sys.exit(main())
