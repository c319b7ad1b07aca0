"""``inspector run --line N``: parse flags, resolve the config, start the worker."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_STARTUP_FAILED = 2

# flag -> config field; every flag mirrors one field (DESIGN section 9: file < environment < flags)
RUN_FLAGS = {
    "artifact": "engine.artifact",
    "device": "engine.device",
    "precision": "engine.precision",
    "threshold": "engine.threshold",
    "backend": "engine.backend",
    "compiled": "engine.compiled",
    "bind": "ingest.bind",
    "queue_size": "ingest.queue_size",
    "overload": "ingest.overload",
    "publish_bind": "publish.bind",
    "heatmaps": "publish.heatmaps",
    "store": "banks.store",
    "poll_interval_s": "banks.poll_interval_s",
    "max_batch": "batch.max_batch",
    "max_delay_ms": "batch.max_delay_ms",
    "deadline_ms": "batch.deadline_ms",
    "http_port": "http.port",
    "log_level": "log.level",
}


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="serve a line: ZMQ frames in, results out (the systemd service)")
    p.add_argument("--line", required=True, help="line name; selects /etc/inspector/line<N>.toml by default")
    p.add_argument("--config", help="TOML config file (default /etc/inspector/line<N>.toml when present)")
    p.add_argument("--artifact", help="model artifact directory [engine.artifact]")
    p.add_argument("--device", help="auto | cpu | cuda [engine.device]")
    p.add_argument("--precision", help="fp32 | fp16 [engine.precision]")
    p.add_argument("--threshold", help="override the model's threshold [engine.threshold]")
    p.add_argument("--backend", help="torch | inductor | onnx | tensorrt [engine.backend]")
    p.add_argument("--compiled", help="compiled program from `inspector compile` [engine.compiled]")
    p.add_argument("--bind", help="ingest PULL endpoint [ingest.bind]")
    p.add_argument("--queue-size", help="bounded ingest queue [ingest.queue_size]")
    p.add_argument("--overload", help="drop_oldest | drop_newest | block [ingest.overload]")
    p.add_argument("--publish-bind", help="results PUB endpoint [publish.bind]")
    p.add_argument("--heatmaps", help="all | fail | none [publish.heatmaps]")
    p.add_argument("--store", help="bank store URL [banks.store]")
    p.add_argument("--poll-interval-s", help="bank poll interval [banks.poll_interval_s]")
    p.add_argument("--max-batch", help="[batch.max_batch]")
    p.add_argument("--max-delay-ms", help="[batch.max_delay_ms]")
    p.add_argument("--deadline-ms", help="default per-frame deadline [batch.deadline_ms]")
    p.add_argument("--http-port", help="metrics and health port, 0 for an ephemeral one [http.port]")
    p.add_argument("--log-level", help="debug | info | warning | error [log.level]")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="any other config field, e.g. --set publish.sndhwm=100 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (secrets redacted) and exit")


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from ..config import ConfigError, default_config_path, load_config, redacted
    from ..logs import configure_logging, get_logger

    overrides = {field: getattr(args, flag) for flag, field in RUN_FLAGS.items() if getattr(args, flag) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: expected STAGE.FIELD=VALUE", file=sys.stderr)
            return EXIT_STARTUP_FAILED
        overrides[key.strip()] = value
    path = args.config
    if path is None and default_config_path(args.line).is_file():
        path = default_config_path(args.line)
    try:
        cfg = load_config(path, os.environ, overrides, args.line)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    if args.print_config:
        print(json.dumps(redacted(cfg), indent=2))
        return 0
    if not cfg.engine.artifact:
        print("error: engine.artifact is not set: pass --artifact DIR or set it in the config", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    configure_logging(cfg.log)
    log = get_logger("inspector.run", line=cfg.line)
    from ..worker.loop import Worker

    worker = Worker(cfg)
    try:
        return worker.run()
    except Exception as err:  # any start-up failure: say it in one event, exit non-zero for systemd
        log.error("startup_failed", error=str(err), kind=type(err).__name__)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
