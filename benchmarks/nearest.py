"""The nearest-neighbour step alone: bank dtype, matmul chunk and query tile, at the served shapes.

    python benchmarks/nearest.py [--batch 4] [--repeats 9] [--chunks 512,1024,2048]
                                 [--tiles all,128,256,512,1024] [--out benchmarks/results/nearest.json]

Times ``inspector.model.bank.nearest_neighbours`` on the default model's three levels (256 px:
4096, 1024 and 256 query positions per image against 1024, 4096 and 4096 bank vectors of 64,
128 and 256 channels), random unit vectors, one bank per image as the served graph gathers it.
Each variant is the sum over levels of the median of ``--repeats`` timed calls after one
warm-up; variants are interleaved round by round, so a slow moment of the machine falls on all
of them alike. "fp16 bank" converts the gathered bank to fp32 inside the call (what the graph did
on every batch before the engine held the bank in fp32); the others take it in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.benchmark import commit, machine

from inspector.model.bank import bank_capacity
from inspector.model import InspectionModel, ModelConfig
from inspector.model.bank import BANK_DTYPE, nearest_neighbours


def level_inputs(batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level ``(queries (B, Q, C), bank (B, N, C) fp32)`` at the default model's shapes."""
    model = InspectionModel(ModelConfig())
    gen = torch.Generator().manual_seed(seed)
    out = []
    for (h, w), c, n in zip(model.grids, model.channels, bank_capacity(model)):
        q = F.normalize(torch.randn(batch, h * w, c, generator=gen), dim=2)
        b = F.normalize(torch.randn(batch, n, c, generator=gen), dim=2)
        out.append((q, b))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--chunks", default="512,1024,2048")
    p.add_argument("--tiles", default="all,128,256,512,1024")
    p.add_argument("--out", default="benchmarks/results/nearest.json")
    args = p.parse_args(argv)
    levels = level_inputs(args.batch)
    half = [(q, b.to(BANK_DTYPE)) for q, b in levels]
    variants = {"fp16 bank, chunk 2048, all queries (before)": (half, 2048, None)}
    for chunk in (int(c) for c in args.chunks.split(",")):
        for tile in args.tiles.split(","):
            t = None if tile == "all" else int(tile)
            variants[f"chunk {chunk}, tile {tile}"] = (levels, chunk, t)
    times: dict[str, list[list[float]]] = {k: [[] for _ in levels] for k in variants}
    with torch.inference_mode():
        for name, (inputs, chunk, tile) in variants.items():  # warm-up
            for q, b in inputs:
                nearest_neighbours(q, b, chunk, tile)
        for r in range(args.repeats):
            for name, (inputs, chunk, tile) in variants.items():
                for i, (q, b) in enumerate(inputs):
                    t0 = time.perf_counter()
                    nearest_neighbours(q, b, chunk, tile)
                    times[name][i].append(time.perf_counter() - t0)
            print(f"[nearest] round {r + 1}/{args.repeats}", file=sys.stderr)
    rows = {}
    for name, per_level in times.items():
        med = [statistics.median(t) * 1000 for t in per_level]
        rows[name] = {"ms_per_batch": round(sum(med), 2), "ms_per_level": [round(m, 2) for m in med]}
    before = rows["fp16 bank, chunk 2048, all queries (before)"]["ms_per_batch"]
    for row in rows.values():
        row["speedup"] = round(before / row["ms_per_batch"], 3)
    result = {"machine": machine(), "commit": commit(), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
              "batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(), "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["ms_per_batch"]):
        print(f"{row['ms_per_batch']:9.2f} ms  x{row['speedup']:.2f}  {row['ms_per_level']}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
