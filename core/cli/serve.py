"""`kvyard serve`: load the model in the scheduler process, then run the HTTP server.

    kvyard serve --model-path PATH [--host 127.0.0.1] [--port 30000] [--config server.yaml] ...

With --nnodes > 1, node 0 (``--node-rank 0``) serves HTTP and runs its share of the
tensor-parallel ranks; every other node runs only its ranks (``serve_node``) and exits when
they do (node 0 shut down, or a rank failed).

Every flag of ServerArgs applies (grouped by topic in --help); a --config YAML file gives
defaults that flags override. Exit code 0 after a clean shutdown (Ctrl-C / SIGTERM), 1 when
start-up fails (bad flag value, model, busy port, failed warmup).
"""
from __future__ import annotations

import logging
import signal
import socket

from kvyard.cli.common import engine_parser, err, run_reporting_errors, server_args_from
from kvyard.server_args import ServerArgs

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
logger = logging.getLogger("kvyard.serve")


def build_parser():
    return engine_parser("kvyard serve", "Serve a model over HTTP: OpenAI-compatible and native APIs.")


def run_serve(argv: list[str]) -> int:
    from kvyard.cli.diffusion import model_type_of, run_diffusion_serve

    kind: list[str] = []
    rc = run_reporting_errors(lambda: kind.append(model_type_of(argv)) or 0)
    if rc or kind[0] == "diffusion":
        return rc or run_diffusion_serve(argv)
    ns = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: serve(server_args_from(ns)))


def serve(args: ServerArgs) -> int:
    from kvyard.frontend.launch import make_tokenizer_manager, start_engine_process
    from kvyard.frontend.limits import RequestLimits
    from kvyard.server.admin import warn_if_exposed
    from kvyard.server.app import create_app, warmup_names
    from kvyard.server.limits import header_timeout_protocol
    from kvyard.server.context import ServerContext
    from kvyard.server.metrics import ServerMetrics

    logging.basicConfig(level=args.log_level.upper(), format="[kvyard] %(levelname)s %(message)s")
    if args.node_rank > 0:
        return serve_node(args)
    http_level = _http_log_level(args)
    warmup_names(args.warmups)
    check_port_free(args.host, args.port)
    warn_if_exposed(args)
    logger.info("loading the model…")
    engine = start_engine_process(args)
    try:
        args = engine.args  # with the defaults resolved (model path)
        metrics = ServerMetrics(args.served_model_name or args.model_path, args.enable_sglang_metrics,
                                ttft_buckets=args.bucket_time_to_first_token,
                                tpot_buckets=args.bucket_inter_token_latency,
                                e2e_buckets=args.bucket_e2e_request_latency) if args.enable_metrics else None
        tm = make_tokenizer_manager(engine, on_finish=metrics.on_finish if metrics else None,
                                    limits=RequestLimits.from_args(args))
        ctx = ServerContext(args=args, engine=engine, tm=tm, metrics=metrics)
        app = create_app(ctx)
    except BaseException:
        engine.stop()
        raise
    return run_app(app, ctx, args.host, args.port, http_level, cleanup=engine.stop,
                   http=header_timeout_protocol(args.http_header_timeout))


def serve_node(args: ServerArgs) -> int:
    """A node other than 0: starts its ranks, reports them ready, waits until they exit
    (0 when every rank ended cleanly) or until SIGINT/SIGTERM stops them."""
    import threading

    from kvyard.frontend.launch import start_engine_process

    logger.info("node %d of %d: starting ranks, joining %s", args.node_rank, args.nnodes, args.dist_init_addr)
    engine = start_engine_process(args)
    world = args.tp_size * args.pp_size
    ranks = world // args.nnodes
    first = args.node_rank * ranks
    print(f"kvyard node {args.node_rank} ready: ranks {first}..{first + ranks - 1} of {world} joined "
          f"{args.dist_init_addr}; node 0 serves HTTP", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while engine.is_alive() and not stop.wait(0.5):
            pass
    finally:
        engine.stop()
    codes = [p.exitcode for p in engine.processes]
    return 0 if stop.is_set() or all(c == 0 for c in codes) else 1


def run_app(app, ctx, host: str, port: int, http_level: str, cleanup, http="auto") -> int:
    """Runs the app under uvicorn until a stop signal; ``cleanup()`` runs after it in any case.
    ctx gets request_shutdown/listening; 0 after a clean stop, 1 when start-up failed. ``http``:
    uvicorn's HTTP protocol (the LLM server's adds a header-read deadline)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=http_level,
                            access_log=http_level in ("info", "debug", "trace"), timeout_keep_alive=5,
                            lifespan="on", http=http)
    server = uvicorn.Server(config)
    ctx.request_shutdown = lambda: setattr(server, "should_exit", True)
    ctx.listening = lambda: server.started
    _quiet_stop_signals()
    try:
        server.run()
    finally:
        cleanup()
    if ctx.failed:
        err.print(f"[red]error:[/] {ctx.failed}", highlight=False)
        return 1
    return 0 if server.started else 1


def _quiet_stop_signals() -> None:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
    handler that was installed before it; make that a no-op so a requested stop exits 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def _http_log_level(args: ServerArgs) -> str:
    level = (args.log_level_http or args.log_level).lower()
    if level not in UVICORN_LOG_LEVELS:
        raise ValueError(f"log_level_http must be one of {', '.join(UVICORN_LOG_LEVELS)}, got {level!r}")
    return level


def check_port_free(host: str, port: int) -> None:
    """Fail in a second, not after the model has loaded."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"port: cannot listen on {host}:{port} ({exc.strerror})") from None
