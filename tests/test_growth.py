"""Bank growth from the stream: which frames join, how a bank is rebuilt, and the simulated stream
on real images with the real backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inspector.banks.growth import BankGrowth, GrowthConfig, grow_bank
from inspector.banks.normal import NormalStats, StreamCalibrator, StreamConfig
from inspector.banks.register import extract, raw_scores_against
from inspector.model import InspectionModel, ModelConfig, build_bank, load_backbone_weights
from trainer import line_eval, metrics
from trainer.data import ImageCache, list_samples

from .conftest import REAL_DATA, REAL_WEIGHTS, require_real, tiny_config


def test_only_passed_typical_frames_of_an_unfrozen_settled_product_join() -> None:
    g = BankGrowth(GrowthConfig(max_images=16, below=0.5, min_count=4))
    g.start("p", 4)
    recent = [1.0, 2.0, 3.0, 4.0]  # median 2.5
    assert not g.offer("p", "a", 2.0, True, False, recent[:3])  # too few stream scores yet
    assert not g.offer("p", "a", 2.0, False, False, recent)  # failed
    assert not g.offer("p", "a", 2.0, True, True, recent)  # frozen: a burst may be going on
    assert not g.offer("p", "a", 2.6, True, False, recent)  # above the median
    assert not g.offer("p", "a", float("nan"), True, False, recent)
    assert not g.offer("q", "a", 1.0, True, False, recent)  # not a tracked product
    for i in range(3):
        assert g.offer("p", i, 2.5, True, False, recent)
    assert not g.due("p")  # 3 of the 4 that double the bank
    assert g.offer("p", 3, 1.0, True, False, recent) and g.due("p")
    assert g.take("p") == [0, 1, 2, 3] and not g.due("p")
    g.grown("p", 4)
    assert g.images("p") == 8
    for i in range(8):
        g.offer("p", i, 1.0, True, False, recent)
    g.grown("p", len(g.take("p")))
    assert g.images("p") == 16  # full: nothing joins any more
    assert not g.offer("p", "x", 1.0, True, False, recent) and not g.due("p")
    g.start("p", 4)  # a re-registration starts over
    assert g.images("p") == 4


def test_the_bank_grows_to_at_most_the_room_left() -> None:
    g = BankGrowth(GrowthConfig(max_images=10, min_count=2))
    g.start("p", 8)
    for i in range(2):
        g.offer("p", i, 0.0, True, False, [1.0, 1.0])
    assert g.due("p") and g.take("p") == [0, 1]
    with pytest.raises(ValueError, match="quantile"):
        GrowthConfig(below=0.0)


def test_grow_bank_scores_no_candidate_against_itself_and_rescales_every_sample() -> None:
    torch.manual_seed(0)
    model = InspectionModel(tiny_config(calibration="bank", scoring="distance")).eval()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, 64, 64, 3), dtype=np.uint8)
    feats = extract(model, pixels)
    bank = build_bank([f[:4] for f in feats])
    cand = [f[4:] for f in feats]
    before = raw_scores_against(model, cand, bank)
    stats = NormalStats("p", 1, "q90", 0.0, float(np.quantile(before, 0.9)), "stream", 6,
                        registration=[1.0, 2.0], stream=[3.0])
    grown = grow_bank(model, bank, 4, cand, before.tolist(), stats)
    # Every candidate was scored against a bank without it: a copy of itself would give distance 0.
    assert grown.cross_scores.min() > 1e-3
    # With no coreset cap the grown bank holds the old bank and every candidate position.
    for old, new, level in zip(bank.features, grown.bank.features, cand):
        assert new.shape[0] == old.shape[0] + level.shape[0] * level.shape[2] * level.shape[3]
    assert grown.ratio == pytest.approx(np.clip(np.median(grown.cross_scores) / np.median(before), 0.2, 1.5))
    assert grown.stats.gamma == pytest.approx(stats.gamma * grown.ratio)
    assert grown.stats.registration == pytest.approx([1.0 * grown.ratio, 2.0 * grown.ratio])
    assert grown.stats.stream == pytest.approx([3.0 * grown.ratio]) and grown.stats.revision == stats.revision + 1
    assert grown.bank.stats.tolist() == pytest.approx([grown.stats.u, grown.stats.gamma])
    assert float(grown.bank.prototype.norm()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="2 or more"):
        grow_bank(model, bank, 4, [f[:1] for f in cand], before[:1].tolist(), stats)


def test_the_calibrator_puts_its_window_on_the_grown_bank_scale() -> None:
    cal = StreamCalibrator(StreamConfig(window=10, min_count=4, refresh_every=2))
    start = NormalStats.from_registration("p", [1.0, 1.2, 0.9, 1.1], "q90")
    cal.adopt(start)
    for raw in (1.0, 1.1, 0.9, 1.2):
        cal.observe("p", raw, False)
    assert cal.recent("p") == [1.0, 1.1, 0.9, 1.2]
    cal.rescale("p", 0.5, start)
    assert cal.recent("p") == pytest.approx([0.5, 0.55, 0.45, 0.6]) and cal.recent("q") == []


def test_the_rates_after_a_stream_leave_out_the_defects_it_showed() -> None:
    """Defects are drawn with replacement; every one drawn (and only those) is left out of the
    post-stream test set, so one that joined a grown bank cannot count as an escape it taught."""
    order = line_eval.stream_order(190, 12, 200, 0.05, np.random.default_rng(3))
    keep = line_eval.held_out(order, 12)
    shown = set(order.index[order.defect].tolist())
    assert len(shown) >= 2 and keep.shape == (12,)  # 10 draws from 12: some repeat, at least 2 differ
    assert set(np.flatnonzero(~keep).tolist()) == shown
    assert line_eval.held_out(line_eval.stream_order(5, 0, 5, 0.05, np.random.default_rng(0)), 0).shape == (0,)


@pytest.mark.slow
def test_a_stream_of_real_frames_grows_the_bank_and_lowers_good_scores() -> None:
    """pcb from 4 good images, then 80 of its other good train images with 4 defects mixed in:
    the bank grows (4 -> 8 -> 16 at least: the quantile rule takes about half the frames once 20
    scores are in), each rebuild lowers the candidates' scores (ratio below 1), and the grown
    bank scores the held-out good test images lower than the 4-image bank (a larger reference
    set can only bring nearest neighbours closer, up to the coreset cap)."""
    require_real(REAL_DATA / "pcb")
    torch.manual_seed(0)
    model = InspectionModel(ModelConfig()).eval()
    load_backbone_weights(model.backbone, require_real(REAL_WEIGHTS))
    train = list_samples(REAL_DATA, "pcb", "train")
    test = list_samples(REAL_DATA, "pcb", "test")
    test = [s for s in test if s.label == 0][:16] + [s for s in test if s.label == 1][:8]
    shots = extract(model, ImageCache.load(train[:4], model.input_size).images)
    good = extract(model, ImageCache.load(train[4:84], model.input_size).images)
    test_cache = ImageCache.load(test, model.input_size)
    test_feats = extract(model, test_cache.images)
    bank = build_bank(shots, model.cfg.bank.coreset)
    start = NormalStats.from_registration("pcb", model.leave_one_out_scores(shots).tolist(), "q90")
    defects = [f[np.flatnonzero(test_cache.labels == 1)] for f in test_feats]
    order = line_eval.stream_order(80, 8, 84, 4 / 84, np.random.default_rng(0))
    cfg = StreamConfig(window=60, min_count=20, refresh_every=10)
    out = line_eval.simulate_growing_stream(
        model, start, bank, 4, order, good, defects, 1.2, cfg,
        GrowthConfig(max_images=model.cfg.bank.images, below=0.5, min_count=20), test_feats, test_cache.labels,
        model.cfg.bank.coreset)
    assert out["bank_images"] >= 16, out["growths"]
    assert all(0.2 <= g["ratio"] < 1.0 for g in out["growths"]), out["growths"]
    assert out["trace"][-1]["bank_images"] == out["bank_images"] and out["frames"] == 84
    assert len(out["joined"]) == out["bank_images"] - 4 and out["joined"] == sorted(set(out["joined"]))
    good_rows = np.flatnonzero(test_cache.labels == 0)
    small = raw_scores_against(model, test_feats, bank, good_rows)
    grown = raw_scores_against(model, test_feats, out["bank"], good_rows)
    # Tolerance: none on the median, which must drop; a few images may rise by the coreset cap.
    assert np.median(grown) < np.median(small), (np.median(grown), np.median(small))
    assert out["bank"].features[0].shape[0] <= model.cfg.bank.coreset[0]
    # the grown bank's own-threshold escapes are those of its final test scores (rank only)
    labels = test_cache.labels
    raw = raw_scores_against(model, test_feats, out["bank"])
    at_target = metrics.threshold_at_false_reject_rate(raw[labels == 0], 0.01)
    assert out["target_oracle_escape"] == pytest.approx(float((raw[labels == 1] <= at_target).mean()), abs=1e-9)
    assert 0.0 <= out["oracle_escape"] <= 1.0


# -- in a running worker -------------------------------------------------------------------------
def _grown_version(store, line: str, product: str, after: int, timeout: float) -> int:
    """Wait (bounded) for ``product``'s active version to pass ``after``; 0 if it never did."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = store.state(line).products.get(product, 0)
        if v > after:
            return v
        time.sleep(0.05)
    return 0


def test_a_running_worker_grows_a_bank_from_its_frames_and_serves_it(tmp_path) -> None:
    """Real worker, real sockets, file store: a product registered from 4 images, then 40 of its
    good frames. The bank doubles to 8 images from frames that passed below the median, written
    as version 2 (grown from 1) with stream statistics on its scale; the worker swaps it in and
    every frame still gets exactly one result."""
    from inspector.banks import open_store

    from .test_selfcal import LINE, RESULT_TIMEOUT_S, Line, config, product_images, stream

    base, good = _registered(tmp_path)
    ln = Line(config(base, **{"calibration.grow_bank": True}))
    store = open_store(f"file://{base / 'banks'}")
    try:
        results = stream(ln, good[12:40], "s")
        assert len({r.frame_id for r, _ in results}) == 28
        version = _grown_version(store, LINE, "valve-a", 1, RESULT_TIMEOUT_S)
        assert version >= 2, "the bank never grew"
        meta = store.meta(LINE, "valve-a", 2)
        assert meta.shots == 8 and meta.extra["grown_from"] == 1 and 0.2 <= meta.extra["growth_ratio"] <= 1.5
        assert sum(im["name"].startswith("stream-") for im in meta.images) == 4
        snap = ln.worker.watcher.wait_for(lambda s: s.versions.get("valve-a", 0) >= 2, timeout=RESULT_TIMEOUT_S)
        assert snap is not None, "the worker never served the grown bank"
        more = stream(ln, product_images(6, 1, 60), "t")  # served against the grown bank
        assert all(r.product == "valve-a" and r.verdict in ("pass", "fail") for r, _ in more)
    finally:
        ln.close()
    normal = store.normal(LINE, "valve-a")
    active = store.state(LINE).products["valve-a"]
    assert normal is None or normal.bank_version == active  # a record only for the version in service
    store.close()


def test_bank_growth_off_keeps_the_registered_bank(tmp_path) -> None:
    from inspector.banks import open_store

    from .test_selfcal import LINE, Line, config, stream

    base, good = _registered(tmp_path)
    ln = Line(config(base, **{"calibration.grow_bank": False}))
    try:
        stream(ln, good[12:40], "s")
        assert ln.worker.calibration.current("valve-a").source == "stream"  # statistics still learn
    finally:
        ln.close()
    store = open_store(f"file://{base / 'banks'}")
    assert store.state(LINE).products == {"valve-a": 1} and store.versions(LINE, "valve-a") == [1]
    store.close()


def _registered(tmp_path):
    """test_selfcal's tiny distance-scored line with valve-a registered from 4 of 12 images."""
    from inspector.artifact import save_artifact
    from inspector.banks import encode_bank, open_store
    from inspector.banks.register import ShotImage, register_product

    from .test_selfcal import LINE, product_images

    torch.manual_seed(0)
    model = InspectionModel(tiny_config(calibration="bank", scoring="distance")).eval()
    card = save_artifact(model, tmp_path / "model", None, training={"thresholds": {"bank": 1.0}})
    store = open_store(f"file://{tmp_path / 'banks'}")
    good = product_images(40, 0, 60)
    shots = [ShotImage(f"g{i}.png", f"{i:064d}", im) for i, im in enumerate(good[:12])]
    reg = register_product(model, card.signature, card.model_id, "valve-a", shots, bank_images=4, min_images=4)
    store.put(LINE, encode_bank(reg.bank, reg.meta), reg.meta)
    store.close()
    return tmp_path, good


def test_a_registration_during_a_rebuild_wins(tmp_path) -> None:
    """The rebuild grew from version 1; an operator registered version 2 meanwhile: the grown
    bank is not written (compare-and-set), the statistics stay, and the miss is counted."""
    import structlog

    from inspector.banks import decode_bank, open_store
    from inspector.worker.calibration import LineCalibration
    from inspector.config import CalibrationConfig
    from inspector.worker.metrics import WorkerMetrics

    from .test_selfcal import LINE

    base, good = _registered(tmp_path)
    store = open_store(f"file://{base / 'banks'}")
    blob = store.blob(LINE, "valve-a", 1)
    meta = store.meta(LINE, "valve-a", 1)
    bank, _ = decode_bank(blob)
    store.put(LINE, blob, meta)  # the operator's registration: version 2
    torch.manual_seed(0)
    model = InspectionModel(tiny_config(calibration="bank", scoring="distance")).eval()
    metrics = WorkerMetrics()
    line = LineCalibration(CalibrationConfig(), store, LINE, metrics, structlog.get_logger(), model=model)
    stats = NormalStats.from_meta(meta)
    frames = [(im, 1.0) for im in good[20:24]]
    line._grow("valve-a", 1, bank, meta, stats, frames)
    line.close()
    assert store.state(LINE).products == {"valve-a": 2} and store.versions(LINE, "valve-a") == [1, 2]
    assert 'kind="growth_superseded",product="valve-a"' in metrics.render().decode()
    store.close()


@pytest.mark.real_data
@pytest.mark.slow
def test_real_frames_grow_a_bank_that_scores_good_parts_lower(tmp_path) -> None:
    """Real ball-screw frames through the served engine and the worker's calibration stage: from a
    4-image registration, 60 good frames grow the bank (written as a new version, grown from the
    first), and the grown bank scores 10 further good parts lower than the registered one."""
    import dataclasses

    import structlog

    from inspector.artifact import save_artifact
    from inspector.banks import decode_bank, encode_bank, open_store
    from inspector.banks.register import read_shots, register_product
    from inspector.banks.watcher import build_snapshot
    from inspector.worker.calibration import LineCalibration
    from inspector.config import CalibrationConfig
    from inspector.worker.engine import Engine, EngineSettings
    from inspector.model.bank import bank_capacity
    from inspector.worker.metrics import WorkerMetrics

    root = require_real(REAL_DATA) / "ball_screw"
    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=128))  # 4x faster, same features
    model = InspectionModel(cfg).eval()
    load_backbone_weights(model.backbone, require_real(REAL_WEIGHTS))
    card = save_artifact(model, tmp_path / "model", "0" * 64, training={"thresholds": {"bank": 1.25}})
    goods = sorted((root / "train" / "good").iterdir())
    reg = register_product(model, card.signature, card.model_id, "ball_screw", read_shots(goods[:4], 128),
                           bank_images=4, coreset=model.cfg.bank.coreset)
    store = open_store(f"file://{tmp_path / 'banks'}")
    version, _ = store.put("7", encode_bank(reg.bank, reg.meta), reg.meta)
    snap = build_snapshot(1, {"ball_screw": (reg.bank, reg.meta.with_version(version))}, bank_capacity(model), 1)
    engine = Engine(model, card, EngineSettings(device="cpu"))
    line = LineCalibration(CalibrationConfig(min_count=10, refresh_every=5, window=40), store, "7", WorkerMetrics(),
                           structlog.get_logger(), model=model)
    frames = np.stack([s.pixels for s in read_shots(goods[4:64], 128)])
    for i in range(0, len(frames), 5):
        part = frames[i : i + 5]
        scored = engine.infer(part, ["ball_screw"] * len(part), snap, maps=False, stats=line.stats_for(snap))
        line.observe(snap, scored, list(part))
    line.close()  # waits for the rebuild in flight
    # The snapshot here is never swapped, so the rebuild grows version 1 once (4 -> 8 images).
    assert store.state("7").products["ball_screw"] == 2, "the bank never grew"
    grown, meta = decode_bank(store.blob("7", "ball_screw"))
    assert meta.shots == 8 and meta.extra["grown_from"] == 1
    stats = store.normal("7", "ball_screw")
    assert stats is not None and stats.bank_version == 2 and stats.source == "stream"
    held = extract(model, np.stack([s.pixels for s in read_shots(goods[64:74], 128)]))
    before = raw_scores_against(model, held, reg.bank)
    after = raw_scores_against(model, held, grown)
    # No tolerance on the median: a superset of reference positions can only bring neighbours closer.
    assert np.median(after) < np.median(before), (np.median(after), np.median(before))
    store.close()
