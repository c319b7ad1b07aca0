"""``inspector demo``: the whole product on one machine, in a few minutes on 2 CPU cores.

1. Writes a generated mixed line (deterministic images with defects and masks).
2. Fits a small model on two *other* generated products (``tiles``, ``rings``): CADA head and
   threshold; the flows only with ``--select-scoring`` (leave-one-source-class-out selection,
   several minutes), which on these products keeps the distance.
3. Registers two line products (``dots``, ``rings``) from 30 good images each: all form the bank,
   and each is cross-scored against the other folds to place the product on the line's one
   threshold scale.
4. Starts the real worker (``inspector run``) as a separate process.
5. Streams frames of all three line products with defects; ``weave`` frames fail as
   ``unknown_product`` until ``weave`` is registered live, a third of the way in, without a restart.
6. Summarises verdicts against the truth per product and phase, latency, throughput and the
   accounting (frames sent = results received), and writes heatmap overlays with an HTML page.

Needs no network, no GPU and no Redis (the banks live in a ``file://`` store in the output folder).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .testkit import free_port, wait_for_worker
from .wire import UNKNOWN_PRODUCT

SOURCE = ("tiles", "rings")  # the model is fitted on these
LINE = ("dots", "rings", "weave")  # the line carries these; weave is registered live
START_PRODUCTS = ("dots", "rings")
LIVE_PRODUCT = "weave"
DEMO_SIZE = 128  # a quarter of the default's pixels keeps the demo to minutes on 2 cores
FRAMES = 240  # a few hundred frames: enough for per-product rates, about a minute of streaming
RATE_FPS = 6.0  # below this machine's capacity at 128 px, so latency shows the unloaded worker
LINE_NAME = "demo"
READY_TIMEOUT_S = 300.0
DRAIN_S = 60.0
OVERLAYS_PER_GROUP = 4  # heatmap overlays kept per product and truth (good/defect)
POLL_S = 0.5  # the worker's bank poll interval in the demo (--poll-interval-s)
DEMO_RECIPE = 3  # bumped when the demo's model recipe changes, so an older model in --out is not reused
TRAIN_IMAGES = 80  # good train images per generated product: the source products' 30% held out place the threshold
REGISTRATION_IMAGES = 30  # good images per product at registration: enough to place it on the line's scale


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: Path, weights: str | None, steps: int, progress: bool = True, frames: int = FRAMES,
             rate: float = RATE_FPS, select: bool = False) -> int:
    """Run the demo into ``out``; return the process exit code (0 when every frame got its result)."""
    from trainer.synthetic import generate_dataset

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        generate_dataset(data, classes=tuple(dict.fromkeys(SOURCE + LINE)), n_train=TRAIN_IMAGES, n_test_good=24,
                         n_test_defect=24, size=DEMO_SIZE, seed=0)
    _say(f"generated line of {', '.join(LINE)} (model fitted on {', '.join(SOURCE)}) in {data}")
    if weights:
        _say(f"backbone: pretrained weights {weights}")
    else:
        print("[demo] backbone: no weights file found, using RANDOM weights (pass --weights or set "
              "INSPECTOR_BACKBONE_WEIGHTS for meaningful features)", file=sys.stderr, flush=True)
    artifact = _train(out, data, weights, steps, progress, select)
    store = f"file://{(out / 'banks').resolve()}"
    for product in START_PRODUCTS:
        _bank_add(store, artifact, data, product)
    summary = _serve_and_stream(out, data, artifact, store, frames, rate)
    summary["calibration"] = _calibration(store)
    summary["seconds_total"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    _say(f"heatmaps: {out / 'heatmaps' / 'index.html'}; summary {out / 'summary.json'}; "
         f"total {summary['seconds_total']:.0f}s")
    return 0 if summary["accounting"]["complete"] else 1


def _train(out: Path, data: Path, weights: str | None, steps: int, progress: bool, select: bool = False) -> Path:
    from trainer.calibrate import CalibrationConfig
    from trainer.fit import FitConfig
    from trainer.train import TrainConfig, train

    from .artifact import read_card
    from .model import ModelConfig

    artifact = out / "model"
    card = read_card(artifact) if (artifact / "card.json").is_file() else None
    if (card is not None and card.training.get("fit_steps") == steps and card.training.get("demo_recipe") == DEMO_RECIPE
            and card.training.get("demo_select") == select):
        _say(f"reusing the model in {artifact}")
        return artifact
    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=DEMO_SIZE))
    train_cfg = TrainConfig(
        data=str(data), classes=SOURCE, weights=weights, images_per_class=TRAIN_IMAGES, select_scoring=select,
        fit=FitConfig(steps=steps, window=32, checkpoint_every=max(1, steps)),
        calibration=CalibrationConfig(targets_per_class=24, epochs=30, registration_images=REGISTRATION_IMAGES),
    )
    card = train(cfg, train_cfg, artifact, out / "work", resume=False, progress=progress)
    training = dict(card.training, fit_steps=steps, demo_recipe=DEMO_RECIPE, demo_select=select)
    (artifact / "card.json").write_text(dataclasses.replace(card, training=training).to_json())
    sel = card.training["scoring"]["selection"]
    how = sel["reason"] if isinstance(sel, dict) else "the distance, without fitting flows (--select-scoring fits and compares them)"
    _say(f"trained model {card.model_id} on {', '.join(SOURCE)} in {card.training['seconds']['total']:.0f}s; "
         f"scoring: {card.model_config.score.scoring} ({how})")
    return artifact


def _bank_add(store: str, artifact: Path, data: Path, product: str) -> float:
    from .cli import main as cli_main

    good = sorted((data / product / "train" / "good").iterdir())[:REGISTRATION_IMAGES]
    t0 = time.perf_counter()
    code = cli_main(["bank", "add", "--line", LINE_NAME, "--store", store, "--product", product,
                     "--artifact", str(artifact), *map(str, good)])
    if code != 0:
        raise RuntimeError(f"bank add {product} failed with exit code {code}")
    return time.perf_counter() - t0


def _frames(data: Path, count: int) -> list[dict]:
    """The stream: test images of every line product, shuffled deterministically."""
    from .decode import file_to_model_input
    from .decode import encode_jpeg

    items = []
    for product in LINE:
        for f in sorted((data / product / "test").rglob("*.png")):
            truth = "good" if f.parent.name == "good" else "defect"
            items.append({"product": product, "truth": truth, "path": str(f)})
    order = np.random.default_rng(0).permutation(len(items))
    stream = [items[i] for i in order]
    stream = [dict(stream[i % len(stream)]) for i in range(count)]
    cache: dict[str, bytes] = {}
    for it in stream:
        if it["path"] not in cache:
            cache[it["path"]] = encode_jpeg(file_to_model_input(Path(it["path"]).read_bytes(), DEMO_SIZE))
        it["jpeg"] = cache[it["path"]]
    return stream


def _serve_and_stream(out: Path, data: Path, artifact: Path, store: str, frames: int, rate: float) -> dict:
    import zmq

    from .wire import FrameHeader, Result, encode_frame

    ingest, publish = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "inspector", "run", "--line", LINE_NAME, "--artifact", str(artifact),
           "--store", store, "--bind", ingest, "--publish-bind", publish, "--http-port", "0",
           "--heatmaps", "all", "--poll-interval-s", str(POLL_S), "--max-batch", "4", "--max-delay-ms", "20",
           "--deadline-ms", "30000", "--log-level", "warning", "--set", "engine.batch_sizes=1,2,4"]
    log = open(out / "worker.log", "w")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _say(f"worker started (pid {proc.pid}): frames to {ingest}, results on {publish}, log {out / 'worker.log'}")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, f"result.{LINE_NAME}.".encode())
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(publish)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(ingest)
    stream = _frames(data, frames)
    results: dict[str, tuple] = {}
    sent: dict[str, int] = {}
    try:
        try:
            wait_for_worker(push, sub, READY_TIMEOUT_S, alive=lambda: proc.poll() is None)
        except RuntimeError as err:
            raise RuntimeError(f"{err}; see worker.log") from err
        _say(f"worker ready; streaming {len(stream)} frames at {rate:g} fps; {LIVE_PRODUCT} is added "
             f"live after frame {len(stream) // 3}")
        stop_rx = threading.Event()

        def receive() -> None:
            while not stop_rx.is_set() or sub.poll(0):
                if sub.poll(100):
                    r, png = Result.from_frames(sub.recv_multipart())
                    if r.camera == "demo-cam":
                        results[r.frame_id] = (r, png, time.time_ns())

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        added_at = None
        registered_at: list[int] = []  # index of the frame being sent when the registration returned
        live_epoch: list[int] = []  # the line's bank epoch once the live product was registered
        sending = [0]
        adder = None
        t0 = time.monotonic()
        for i, item in enumerate(stream):
            if i == len(stream) // 3:
                added_at = i

                def add_live() -> None:
                    seconds = _bank_add(store, artifact, data, LIVE_PRODUCT)
                    registered_at.append(sending[0])
                    live_epoch.append(_epoch(store))
                    _say(f"registered {LIVE_PRODUCT} live in {seconds:.1f}s (no worker restart)")

                adder = threading.Thread(target=add_live)
                adder.start()
            if adder is not None and i == 2 * len(stream) // 3:
                adder.join()  # the last third is sent after the live registration returned, however slow it was
            sending[0] = i
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fid = f"f{i:04d}"
            header = FrameHeader(frame_id=fid, camera="demo-cam", ts_ns=time.time_ns(), encoding="jpeg")
            sent[fid] = header.ts_ns
            push.send_multipart(encode_frame(header, item["jpeg"]))
            item["frame_id"] = fid
            if progress_due(i, len(stream)):
                _say(f"sent {i + 1}/{len(stream)}, results {len(results)}")
        if adder is not None:
            adder.join()
        end = time.monotonic() + DRAIN_S
        while len(results) < len(stream) and time.monotonic() < end:
            time.sleep(0.05)
        stop_rx.set()
        rx.join()
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(DRAIN_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        push.close(0)
        sub.close(0)
        ctx.term()
        log.close()
    summary = _summarise(out, stream, results, sent, added_at, live_epoch[0] if live_epoch else None, exit_code)
    summary["live_add"] = _live_add(stream, results, registered_at[0] if registered_at else None,
                                    live_epoch[0] if live_epoch else None)
    return summary


def progress_due(i: int, n: int) -> bool:
    return (i + 1) % max(1, n // 6) == 0 or i + 1 == n


def _live_add(stream, results, registered_at: int | None, live_epoch: int | None) -> dict:
    """How the live registration took effect, decided by what the worker served: every live-product
    frame served with a bank set that has the product (result epoch >= the registration's) must be
    inspected, never ``unknown_product``. How many frames it took is reported, not judged (it
    depends on the machine's load)."""
    if registered_at is None or live_epoch is None:
        return {"registered_at_frame": None, "epoch": None, "frames_checked": 0, "unknown_after_add": None}
    served = [(i, results[it["frame_id"]][0]) for i, it in enumerate(stream)
              if it["product"] == LIVE_PRODUCT and it.get("frame_id") in results]
    after = [(i, r) for i, r in served if r.bank_epoch >= live_epoch]
    first = min((i for i, _ in after), default=None)
    return {"registered_at_frame": registered_at, "epoch": live_epoch, "frames_checked": len(after),
            "unknown_after_add": sum(1 for _, r in after if r.reason == UNKNOWN_PRODUCT),
            "first_inspected_frame": first}


def _epoch(store_url: str) -> int:
    from .banks import open_store

    store = open_store(store_url)
    try:
        return store.state(LINE_NAME).epoch
    finally:
        store.close()


def _phase(i: int, got, added_at: int, live_epoch: int | None) -> str:
    """Whether a live-product frame was served before its registration: by the bank epoch the
    worker served it with (frames queued when the add landed are served after it), else by order."""
    if got is not None and live_epoch is not None:
        return "before" if got[0].bank_epoch < live_epoch else "after"
    return "before" if i < added_at else "after"


def _summarise(out: Path, stream, results, sent, added_at, live_epoch, exit_code) -> dict:
    by_product: dict[str, dict] = {}
    e2e = []
    for i, item in enumerate(stream):
        got = results.get(item["frame_id"])
        phase = _phase(i, got, added_at, live_epoch)
        key = f"{item['product']} ({phase} {LIVE_PRODUCT} added)" if item["product"] == LIVE_PRODUCT else item["product"]
        row = by_product.setdefault(key, {"frames": 0, "good_pass": 0, "good_fail": 0, "defect_fail": 0,
                                          "defect_pass": 0, "unknown_product": 0, "other": 0})
        row["frames"] += 1
        if got is None:
            continue
        r, _, done = got
        e2e.append((done - sent[item["frame_id"]]) / 1e6)
        if r.reason == UNKNOWN_PRODUCT:
            row["unknown_product"] += 1
        elif r.verdict in ("pass", "fail"):
            row[f"{item['truth']}_{r.verdict}"] += 1
        else:
            row["other"] += 1
    verdicts: dict[str, int] = {}
    for r, _, _ in results.values():
        verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
    done_times = [d for _, _, d in results.values()]
    span = (max(done_times) - min(sent.values())) / 1e9 if done_times else float("nan")
    pct = lambda q: round(float(np.percentile(e2e, q)), 1) if e2e else None  # noqa: E731
    _write_overlays(out, stream, results)
    return {
        "line": LINE_NAME, "products": by_product, "verdicts": verdicts,
        "latency_ms": {"p50": pct(50), "p99": pct(99), "max": pct(100)},
        "throughput_fps": round(len(results) / span, 2) if done_times else 0.0,
        "accounting": {"sent": len(sent), "results": len(results), "complete": len(results) == len(sent),
                       "worker_exit_code": exit_code},
    }


def _calibration(store_url: str) -> dict:
    """Each product's normal statistics after the run: registration's, and those in service."""
    from .banks import open_store
    from .banks.normal import NormalStats

    store = open_store(store_url)
    try:
        out = {}
        for product, version in sorted(store.state(LINE_NAME).products.items()):
            meta = store.meta(LINE_NAME, product, version)
            live = store.normal(LINE_NAME, product)
            reg = NormalStats.from_meta(meta.with_version(version))
            now = live if live is not None and live.bank_version == version else reg
            out[product] = {"registration": reg.summary(), "in_service": now.summary()}
        return out
    finally:
        store.close()


def _print_summary(s: dict) -> None:
    _say("verdicts against the truth (good frames should pass, defective ones fail):")
    print(f"  {'product':<28}{'frames':>7}{'good pass':>11}{'good fail':>11}{'defect fail':>13}"
          f"{'defect pass':>13}{'unknown':>9}")
    for name, row in s["products"].items():
        print(f"  {name:<28}{row['frames']:>7}{row['good_pass']:>11}{row['good_fail']:>11}"
              f"{row['defect_fail']:>13}{row['defect_pass']:>13}{row['unknown_product']:>9}")
    _say("each product's normal statistics (calibrated score = (raw - u) / (gamma - u); the line threshold "
         "is the same number for every product):")
    for product, c in s.get("calibration", {}).items():
        reg, now = c["registration"], c["in_service"]
        line = (f"  {product:<8} registered from {reg['count']} cross-scored good images (u {reg['u']:.4f}, "
                f"gamma {reg['gamma']:.4f}); in service: {now['source']}, {now['count']} scores "
                f"(u {now['u']:.4f}, gamma {now['gamma']:.4f})")
        if now["thin"]:
            line += "; THIN: too few scores, this product's threshold is still uncertain"
        if now["frozen"]:
            line += "; FROZEN by a fail-rate jump"
        print(line)
    lat, acc = s["latency_ms"], s["accounting"]
    _say(f"latency end to end p50 {lat['p50']} ms, p99 {lat['p99']} ms; throughput {s['throughput_fps']} fps")
    _say(f"accounting: sent {acc['sent']}, results {acc['results']} ({s['verdicts']}); "
         f"{'every frame got exactly one result' if acc['complete'] else 'SOME FRAMES GOT NO RESULT'}; "
         f"worker exit code {acc['worker_exit_code']}")


def _write_overlays(out: Path, stream, results) -> None:
    """Side-by-side frame and heatmap overlay for a few frames per product and truth."""
    from PIL import Image

    from .decode import file_to_model_input
    from .decode import decode_heatmap, heat_overlay

    folder = out / "heatmaps"
    folder.mkdir(exist_ok=True)
    kept: dict[tuple, int] = {}
    cards = []
    for item in stream:
        got = results.get(item.get("frame_id", ""))
        if got is None or not got[1]:
            continue
        r, png, _ = got
        key = (item["product"], item["truth"])
        if kept.get(key, 0) >= OVERLAYS_PER_GROUP:
            continue
        kept[key] = kept.get(key, 0) + 1
        image = file_to_model_input(Path(item["path"]).read_bytes(), DEMO_SIZE).astype(np.float32)
        overlay = heat_overlay(image, decode_heatmap(png, r.heatmap.scale))
        pair = np.concatenate([image.astype(np.uint8), overlay], axis=1)
        name = f"{item['frame_id']}.png"
        Image.fromarray(pair).save(folder / name)
        cards.append((name, item, r))
    rows = "\n".join(
        f"<figure><img src='{html.escape(n)}' width='256'><figcaption>{html.escape(i['product'])}, truth "
        f"{i['truth']}: <b>{r.verdict}</b>{' (' + html.escape(r.reason) + ')' if r.reason else ''}, score "
        f"{(r.score if r.score is not None else float('nan')):.2f} / threshold {r.threshold:.2f}</figcaption></figure>"
        for n, i, r in cards)
    (folder / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Inspector demo heatmaps</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px}</style>"
        "<h1>Inspector demo: frames and calibrated anomaly maps</h1><p>Left: the frame as the model "
        "sees it. Right: red where the calibrated map is high (1 = a score 9 in 10 of the "
        "product's good registration images stay under; the line threshold is on the same scale).</p>"
        + rows)
