"""Decode and resize per frame: a full JPEG decode against a decode at reduced DCT scale.

    python benchmarks/decode.py [--size 256] [--margins 1,2] [--repeats 15] [--out benchmarks/results/decode.json]

Frames of 1, 5 and 12 megapixels (4:3), made from one real industrial image (``pcb`` from
``../shared/data/industrial``, upscaled, with sensor-like noise; a generated image when the data
is absent, said in the results) and encoded as camera JPEGs (quality 90) and PNGs, plus the real
640 x 640 pcb JPEG file itself. Per frame: decode + resize to the model input with the JPEG
decoded in full (``reduce_to=None``, what the worker did before) and at the reduced DCT scale
that keeps both sides at least ``margin`` times the input (the worker's ``prepare_frame`` uses
``JPEG_DRAFT_MARGIN``), the median over ``--repeats``, and how far the model inputs differ from
the full decode's (mean and largest absolute difference in grey levels). PNG has no reduced
decode; it is timed for reference.
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

from inspector.decode import JPEG_DRAFT_MARGIN, decode_file, decode_image, resize_square
from inspector.wire import FrameHeader, WireLimits
from trainer.benchmark import commit, machine

REPO = Path(__file__).resolve().parents[1]
SIZES_MP = {1: (1152, 864), 5: (2592, 1944), 12: (4000, 3000)}


def source_image(data: Path) -> tuple[np.ndarray, str]:
    files = sorted((data / "pcb" / "train" / "good").glob("*.jpg"))
    if files:
        return decode_file(files[0].read_bytes()), str(files[0].relative_to(data))
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
    p.add_argument("--margins", default="1,2", help="reduced-decode margins to time, comma-separated")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode.json"))
    args = p.parse_args(argv)
    margins = [int(m) for m in args.margins.split(",")]
    base, source = source_image(Path(args.data))
    rng = np.random.default_rng(0)
    limits = WireLimits()
    frames: list[tuple[dict, np.ndarray | bytes]] = []
    if source != "generated pattern":
        real = (Path(args.data) / source).read_bytes()
        frames.append(({"megapixels": round(base.shape[0] * base.shape[1] / 1e6, 2), "width": base.shape[1],
                        "height": base.shape[0], "file": source}, real))
    frames += [({"megapixels": mp, "width": wh[0], "height": wh[1]}, frame(base, wh, rng)) for mp, wh in SIZES_MP.items()]
    rows = []
    for row, img in frames:
        for encoding in ("jpeg", "png"):
            if isinstance(img, bytes):
                if encoding != "jpeg":
                    continue
                data = img
            else:
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format=encoding.upper(), **({"quality": 90} if encoding == "jpeg" else {}))
                data = buf.getvalue()
            header = FrameHeader(frame_id="f", camera="c", ts_ns=0, encoding=encoding)
            full_s, full = timed(lambda: resize_square(decode_image(header, data, limits), args.size), args.repeats)
            row[encoding] = {"bytes": len(data), "full_ms": round(1000 * full_s, 2)}
            if encoding == "jpeg":
                for margin in margins:
                    side = margin * args.size
                    red_s, red = timed(lambda: resize_square(decode_image(header, data, limits, reduce_to=side),
                                                             args.size), args.repeats)
                    diff = np.abs(full.astype(float) - red.astype(float))
                    row[encoding][f"margin_{margin}"] = dict(
                        reduced_ms=round(1000 * red_s, 2), speedup=round(full_s / red_s, 2),
                        decoded_shape=list(decode_image(header, data, limits, reduce_to=side).shape),
                        mean_abs_diff=round(float(diff.mean()), 3), max_abs_diff=int(diff.max()))
            print(f"[decode] {row['width']}x{row['height']} {encoding}: {row[encoding]}", file=sys.stderr, flush=True)
        rows.append(row)
    result = {"machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
              "input_size": args.size, "repeats": args.repeats, "margins": margins,
              "served_margin": JPEG_DRAFT_MARGIN, "source": source, "frames": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
