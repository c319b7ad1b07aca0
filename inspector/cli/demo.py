"""``inspector demo``: the whole product on generated data (``inspector.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import find_weights


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="inspector-demo", help="folder for data, model, banks, heatmaps and summary")
    p.add_argument("--weights", help="backbone safetensors (found automatically if present)")
    p.add_argument("--steps", type=int, default=150, help="flow training steps (with --select-scoring)")
    p.add_argument("--select-scoring", action="store_true",
                   help="fit the flows with each source product held out and ship them only if they beat the "
                        "distance, as inspector train does (several minutes on 2 cores)")
    p.add_argument("--frames", type=int, default=240, help="frames streamed to the worker")
    p.add_argument("--rate", type=float, default=6.0, help="frames per second sent")
    p.add_argument("--quiet", action="store_true")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the command line's subcommands."""
    _configure(sub.add_parser("demo", help="the whole product on generated data: fit, register, serve, stream, add a product live"))


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(Path(args.out), find_weights(args.weights), args.steps, progress=not args.quiet,
                    frames=args.frames, rate=args.rate, select=args.select_scoring)
