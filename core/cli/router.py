"""`kvyard router`: a load balancer in front of `kvyard serve` workers (flags: SGLang router names).

    kvyard router --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002 --policy cache_aware --port 30000

Prints "kvyard router ready at URL" once it listens; exit 0 after Ctrl-C / SIGTERM, 2 on a bad flag.
"""
from __future__ import annotations

import logging

from kvyard.cli.common import OneLineParser, err
from kvyard.router.config import add_router_args, config_from

READY_PREFIX = "kvyard router ready at "


def run_router(argv: list[str]) -> int:
    import uvicorn

    from kvyard.cli.serve import _quiet_stop_signals, check_port_free
    from kvyard.router.app import create_router_app

    parser = OneLineParser(prog="kvyard router", description="Route requests across kvyard workers.")
    add_router_args(parser)
    parser.add_argument("--log-level", default="warning")
    ns = parser.parse_args(argv)
    try:
        cfg = config_from(ns)
        check_port_free(cfg.host, cfg.port)
    except ValueError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    logging.basicConfig(level=ns.log_level.upper(), format="[kvyard router] %(levelname)s %(message)s")
    app = create_router_app(cfg, on_ready=lambda: print(f"{READY_PREFIX}http://{cfg.host}:{cfg.port}", flush=True))

    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=ns.log_level,
                                           access_log=False, timeout_keep_alive=30))
    _quiet_stop_signals()
    server.run()
    return 0 if server.started else 1
