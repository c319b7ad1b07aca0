"""``inspector publish`` (camera simulator) and ``inspector tail`` (live view of results).

Both commands parse, build, call and print; the logic lives in :mod:`inspector.tools.camera` and
:mod:`inspector.tools.tail`. A usage error (an empty image folder, an unknown product, a bad flag
value) prints one line on stderr and returns exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

import zmq

from ..tools.camera import (
    DEFAULT_CAMERA,
    DEFAULT_RATE_FPS,
    DEFAULT_SEND_TIMEOUT_MS,
    DEFAULT_SNDHWM,
    GENERATED_PER_PRODUCT,
    GENERATED_SIZE,
    CameraConfig,
    FrameSource,
    PublishSummary,
    publish_frames,
)
from ..tools.camera import DEFAULT_CONNECT as CAMERA_CONNECT
from ..decode import DEFAULT_JPEG_QUALITY
from ..tools.tail import DEFAULT_RCVHWM, DEFAULT_WINDOW, TailConfig, run_tail
from ..tools.tail import DEFAULT_CONNECT as TAIL_CONNECT
from ..wire import ENCODINGS

EXIT_OK = 0
EXIT_USAGE = 2  # argparse's own code for a usage error


def add_stream_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``publish`` and ``tail`` to the command line's subcommands."""
    _add_publish(sub.add_parser("publish", help="simulate a camera: push frames to a worker"))
    _add_tail(sub.add_parser("tail", help="follow a worker's results live"))


def _add_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default=CAMERA_CONNECT,
                   help=f"worker ingest endpoint, or several separated by commas: the workers of one line share "
                        f"the frames (default {CAMERA_CONNECT})")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="FOLDER", help="send the images under FOLDER (MVTec layout gives the truth)")
    source.add_argument("--generate", metavar="PRODUCTS", help="send generated products, e.g. tiles,rings,weave,dots")
    p.add_argument("--size", type=int, default=GENERATED_SIZE, help="side of generated images")
    p.add_argument("--pool", type=int, default=GENERATED_PER_PRODUCT, help="distinct generated images per product")
    p.add_argument("--seed", type=int, default=0, help="seed of generated images and of Poisson arrivals")
    p.add_argument("--encoding", choices=ENCODINGS, default="jpeg")
    p.add_argument("--quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality, 1-100")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE_FPS, help="frames per second; 0 sends as fast as possible")
    p.add_argument("--poisson", action="store_true", help="Poisson arrivals with --rate as the mean rate")
    p.add_argument("--count", type=int, help="stop after N frames")
    p.add_argument("--duration", type=float, help="stop after S seconds (with --count: whichever comes first; "
                                                  "with neither, every image is sent once)")
    p.add_argument("--camera", default=DEFAULT_CAMERA, help="camera name in the frame headers")
    p.add_argument("--hint", action="store_true", help="put the true product in the header as a hint")
    p.add_argument("--deadline-ms", type=float, help="deadline of each frame, in milliseconds")
    p.add_argument("--record", metavar="FILE", help="JSON lines: frame_id, camera, ts_ns, product, label, source")
    p.add_argument("--sndhwm", type=int, default=DEFAULT_SNDHWM, help="frames queued before the sender waits")
    p.add_argument("--send-timeout-ms", type=int, default=DEFAULT_SEND_TIMEOUT_MS,
                   help="longest wait at the high-water mark before a frame counts as not sent")
    p.add_argument("--no-block", action="store_true", help="at the high-water mark do not wait: count the frame as not sent")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--curve-server-key", metavar="FILE", help="the worker's public CURVE certificate (secure mode)")
    p.add_argument("--curve-client-key", metavar="FILE", help="this client's secret CURVE certificate (secure mode)")


def _add_tail(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default=TAIL_CONNECT, help=f"worker result endpoint (default {TAIL_CONNECT})")
    p.add_argument("--line", help="only this line's results (default: every line)")
    p.add_argument("--count", type=int, help="stop after N results")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="print each result header as a JSON line")
    p.add_argument("--record", metavar="FILE", help="write each result header to FILE as JSON lines")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="results in the sliding latency window")
    p.add_argument("--rcvhwm", type=int, default=DEFAULT_RCVHWM, help="results queued for this reader before drops")
    p.add_argument("--curve-server-key", metavar="FILE", help="the worker's public CURVE certificate (secure mode)")
    p.add_argument("--curve-client-key", metavar="FILE", help="this client's secret CURVE certificate (secure mode)")


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _source(args: argparse.Namespace) -> FrameSource:
    if args.images is not None:
        return FrameSource.from_folder(args.images)
    products = [p.strip() for p in args.generate.split(",") if p.strip()]
    return FrameSource.generated(products, size=args.size, seed=args.seed, per_product=args.pool)


def _camera_config(args: argparse.Namespace) -> CameraConfig:
    if not 1 <= args.quality <= 100:  # Pillow's JPEG quality scale
        raise ValueError(f"--quality must be within 1..100, got {args.quality}")
    return CameraConfig(
        connect=args.connect, camera=args.camera, encoding=args.encoding, quality=args.quality,
        rate_fps=args.rate, poisson=args.poisson, seed=args.seed, count=args.count,
        duration_s=args.duration, hint=args.hint, deadline_ms=args.deadline_ms, sndhwm=args.sndhwm,
        block=not args.no_block, send_timeout_ms=args.send_timeout_ms,
        curve_server_key=args.curve_server_key, curve_client_key=args.curve_client_key,
    )


def _print_progress(summary: PublishSummary) -> None:
    print(f"[publish] {summary.elapsed_s:.0f} s: sent {summary.sent} ({summary.rate_fps:.1f} fps), "
          f"not sent {summary.not_sent}, errors {summary.errors}", file=sys.stderr, flush=True)


def cmd_publish(args: argparse.Namespace) -> int:
    """Send frames to a worker; 0 when every frame was sent, 1 when some were not, 2 on usage errors."""
    try:
        cfg = _camera_config(args)
        source = _source(args)
    except ValueError as err:  # SourceError included
        return _usage_error(str(err))
    if not args.quiet:
        limit = f"{cfg.count} frames" if cfg.count else f"{cfg.duration_s} s" if cfg.duration_s else f"{len(source)} frames"
        pace = "as fast as possible" if cfg.rate_fps == 0 else f"{'Poisson ' if cfg.poisson else ''}{cfg.rate_fps:g} fps"
        print(f"[publish] {source.description}: {len(source)} images, {limit}, {pace}, {cfg.encoding} -> {cfg.connect}",
              file=sys.stderr)
    try:
        summary = publish_frames(source, cfg, args.record, progress=None if args.quiet else _print_progress)
    except (OSError, zmq.ZMQError) as err:  # unreadable image, unwritable record, bad endpoint
        return _usage_error(str(err))
    print(json.dumps(summary.to_dict()))
    if summary.interrupted:
        print("[publish] interrupted", file=sys.stderr)
    return EXIT_OK if summary.not_sent == 0 and summary.errors == 0 else 1


def cmd_tail(args: argparse.Namespace) -> int:
    """Follow results and print the view; 0 on a normal end (count, duration or Ctrl-C)."""
    try:
        cfg = TailConfig(endpoint=args.connect, line=args.line, count=args.count, duration_s=args.duration,
                         json_lines=args.json, record=args.record, window=args.window, rcvhwm=args.rcvhwm,
                         curve_server_key=args.curve_server_key, curve_client_key=args.curve_client_key)
    except ValueError as err:
        return _usage_error(str(err))
    try:
        run_tail(cfg)
    except (OSError, zmq.ZMQError) as err:  # unwritable record, bad endpoint
        return _usage_error(str(err))
    return EXIT_OK


STREAM_COMMANDS = {"publish": cmd_publish, "tail": cmd_tail}
