"""``inspector compile``: build a backend's program for an artifact (see ``deploy/compile.py``)."""

from __future__ import annotations

import argparse
import json
import sys


def add_compile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="export and compile the served graph: onnx, tensorrt or inductor")
    p.add_argument("--artifact", required=True, help="model artifact directory")
    p.add_argument("--backend", required=True, choices=("onnx", "tensorrt", "inductor"))
    p.add_argument("--batch", default="1,2,4,8", help="batch sizes the program must serve (its dynamic range)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--products", type=int, default=16, help="bank rows (banks.capacity_products of the line)")
    p.add_argument("--calibration", choices=("cada", "bank", "none"), help="default: the model card's")
    p.add_argument("--out", help="program file (default <artifact>/compiled/<backend>-<precision>.onnx|.ep)")


def cmd_compile(args: argparse.Namespace) -> int:
    from deploy.compile import CompileError, compile_program

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        print(f"error: --batch {args.batch!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    say = lambda msg: print(f"[compile] {msg}", file=sys.stderr)  # noqa: E731
    try:
        path, key, report = compile_program(args.artifact, args.backend, batches, args.precision, args.products,
                                            args.calibration, args.out, say)
    except CompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(json.dumps({"program": str(path) if path else None, "key": json.loads(key.to_json()) if key else None,
                      "parity_vs_eager": report}, indent=2))
    if path:
        say(f"serve it with: inspector run --line N --backend {args.backend} --compiled {path} "
            f"--precision {args.precision}")
    return 0
