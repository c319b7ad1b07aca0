"""Decode and resize per frame: a full JPEG decode against a decode at reduced DCT scale.

    python benchmarks/decode.py [--size 256] [--repeats 15] [--out benchmarks/results/decode.json]

Frames of 1, 5 and 12 megapixels (4:3), made from one real industrial image (``pcb`` from
``../shared/data/industrial``, upscaled, with sensor-like noise; a generated image when the data
is absent, said in the results) and encoded as camera JPEGs (quality 90) and PNGs. Per frame:
the worker's ingest ``prepare`` (decode + resize to the model input) with the JPEG decoded in
full (``reduce_to=None``, what the worker did before) and at the reduced scale (what it does
now), the median over ``--repeats``, and how far the two model inputs differ (mean absolute
difference in grey levels). PNG has no reduced decode; it is timed for reference.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inspector.decode import decode_image, resize_square
from inspector.wire import FrameHeader, WireLimits
from trainer.benchmark import commit, machine

REPO = Path(__file__).resolve().parents[1]
SIZES_MP = {1: (1152, 864), 5: (2592, 1944), 12: (4000, 3000)}


def source_image(data: Path) -> tuple[np.ndarray, str]:
    files = sorted((data / "pcb" / "train" / "good").glob("*.png"))
    if files:
        with Image.open(files[0]) as img:
            return np.array(img.convert("RGB")), str(files[0].relative_to(data))
    yy, xx = np.mgrid[0:512, 0:512]
    return np.stack([xx % 256, yy % 256, (xx ^ yy) % 256], axis=2).astype(np.uint8), "generated pattern"


def frame(base: np.ndarray, wh: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    big = np.array(Image.fromarray(base).resize(wh, Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(big + rng.normal(0, 3, big.shape), 0, 255).astype(np.uint8)


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "industrial"))
    p.add_argument("--size", type=int, default=256, help="model input side")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode.json"))
    args = p.parse_args(argv)
    base, source = source_image(Path(args.data))
    rng = np.random.default_rng(0)
    limits = WireLimits()
    rows = []
    for mp, wh in SIZES_MP.items():
        img = frame(base, wh, rng)
        row: dict = {"megapixels": mp, "width": wh[0], "height": wh[1]}
        for encoding in ("jpeg", "png"):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format=encoding.upper(), **({"quality": 90} if encoding == "jpeg" else {}))
            data = buf.getvalue()
            header = FrameHeader(frame_id="f", camera="c", ts_ns=0, encoding=encoding)
            full_s, full = timed(lambda: resize_square(decode_image(header, data, limits), args.size), args.repeats)
            row[encoding] = {"bytes": len(data), "full_ms": round(1000 * full_s, 2)}
            if encoding == "jpeg":
                red_s, red = timed(lambda: resize_square(decode_image(header, data, limits, reduce_to=args.size),
                                                         args.size), args.repeats)
                row[encoding].update(reduced_ms=round(1000 * red_s, 2), speedup=round(full_s / red_s, 2),
                                     decoded_shape=list(decode_image(header, data, limits, reduce_to=args.size).shape),
                                     mean_abs_diff=round(float(np.abs(full.astype(float) - red.astype(float)).mean()), 3))
            print(f"[decode] {mp} MP {encoding}: {row[encoding]}", file=sys.stderr, flush=True)
        rows.append(row)
    result = {"machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
              "input_size": args.size, "repeats": args.repeats, "source": source, "frames": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
