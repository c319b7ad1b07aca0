"""Per-product normal statistics: the scale, the record, the stores, the stream update."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.banks import encode_bank, open_store
from inspector.banks.normal import (
    IQR_TO_SIGMA,
    METHODS,
    MIN_SPREAD_FRACTION,
    RELIABLE_COUNT,
    STREAM_ANCHOR_Z,
    Z_MAX_50,
    Z_HIGH,
    DEFAULT_METHOD,
    NormalStats,
    NormalStatsError,
    StreamCalibrator,
    StreamConfig,
    bounded_step,
    calibrated,
    raw_from_calibrated,
    sample_is_degenerate,
    scale_of,
    stream_scale_of,
)
from inspector.banks.register import ShotImage, extract, fold_of, register_features, register_product
from inspector.banks.watcher import BankWatcher
from inspector.model import InspectionModel, ModelConfig
from inspector.model.bank import build_fold_banks, position_vectors, stack_banks

from .conftest import tiny_config

SIGNATURE = "resnet18@random:64"


def test_robust_scale_puts_the_median_at_0_and_the_99th_percentile_near_1() -> None:
    scores = np.random.default_rng(0).normal(5.0, 0.5, 20000)
    u, gamma = scale_of(scores, "robust")
    assert calibrated(np.median(scores), u, gamma) == pytest.approx(0.0, abs=1e-9)
    # 1.0 is about the 99th percentile of a normal sample (sampling error of 20000 draws: ~0.02)
    assert calibrated(np.quantile(scores, 0.99), u, gamma) == pytest.approx(1.0, abs=0.03)
    q25, q75 = np.quantile(scores, [0.25, 0.75])
    assert gamma - u == pytest.approx(Z_HIGH * (q75 - q25) / IQR_TO_SIGMA, rel=1e-12)
    assert raw_from_calibrated(calibrated(7.0, u, gamma), u, gamma) == pytest.approx(7.0, rel=1e-12)


def test_zscore_scale_is_mean_and_2_326_standard_deviations() -> None:
    scores = np.random.default_rng(1).normal(3.0, 0.2, 20000)
    u, gamma = scale_of(scores, "zscore")
    assert u == pytest.approx(scores.mean()) and gamma - u == pytest.approx(Z_HIGH * scores.std(ddof=1))
    assert calibrated(np.quantile(scores, 0.99), u, gamma) == pytest.approx(1.0, abs=0.03)  # sampling error ~0.02


def test_quantile_scale_is_median_and_95th_percentile() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 0.1, 501)  # skewed, as image scores are
    u, gamma = scale_of(scores, "quantile")
    assert u == pytest.approx(np.median(scores), rel=1e-12)
    assert gamma == pytest.approx(np.quantile(scores, 0.95), rel=1e-12)
    # 5% of the sample lies above 1.0 (501 scores: numpy's linear interpolation puts the 95th
    # percentile on the 476th smallest, so exactly 25 are above it)
    assert int((calibrated(scores, u, gamma) > 1.0 + 1e-12).sum()) == 25


def test_default_scale_is_the_ratio_to_the_90th_percentile() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 0.1, 51)
    u, gamma = scale_of(scores)
    assert DEFAULT_METHOD == "q90" == ModelConfig().score.normalisation
    assert u == 0.0 and gamma == pytest.approx(np.quantile(scores, 0.9), rel=1e-12)
    cal = calibrated(scores, u, gamma)
    # 51 scores: numpy's linear interpolation puts the 90th percentile on the 46th smallest,
    # so exactly 5 lie above 1.0, and every score is its fraction of that anchor
    assert int((cal > 1.0 + 1e-12).sum()) == 5 and cal == pytest.approx(scores / gamma, rel=1e-12)


def test_max_scale_is_the_ratio_to_the_maximum() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 0.1, 46)
    u, gamma = scale_of(scores, "max")
    assert u == 0.0 and gamma == pytest.approx(scores.max(), rel=1e-12)
    cal = calibrated(scores, u, gamma)
    assert cal.max() == pytest.approx(1.0) and cal == pytest.approx(scores / scores.max(), rel=1e-12)


def test_stream_refresh_on_the_q90_scale_keeps_zero_and_anchors_at_1_28_sigma() -> None:
    scores = np.random.default_rng(2).normal(0.2, 0.01, 400)
    u, gamma = stream_scale_of(scores, "q90")
    assert u == 0.0  # sigma of 0.01 with 400 samples is known to ~10%
    assert gamma == pytest.approx(0.2 + STREAM_ANCHOR_Z["q90"] * 0.01, abs=0.003)
    assert STREAM_ANCHOR_Z["q90"] == pytest.approx(1.2816, abs=1e-4)  # Phi^-1(0.9)


def test_median_and_maximum_scale_puts_the_median_at_zero() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 0.1, 46)
    u, gamma = scale_of(scores, "median_max")
    assert (u, gamma) == (pytest.approx(np.median(scores), rel=1e-12), pytest.approx(scores.max(), rel=1e-12))


def test_stream_refresh_keeps_the_ratio_scale_zero() -> None:
    # a stream refresh on the "max" scale moves only the upper anchor: 0 stays 0, so a refreshed
    # product's scores remain fractions of its (robustly estimated) good-part maximum
    scores = np.random.default_rng(2).normal(0.2, 0.01, 400)
    u, gamma = stream_scale_of(scores, "max")
    assert u == 0.0
    # the anchor: median + Z_MAX_50 robust sigmas; sigma of 0.01 with 400 samples is known to ~10%
    assert gamma == pytest.approx(0.2 + 2.06 * 0.01, abs=0.004)
    mu, mgamma = stream_scale_of(scores, "median_max")
    assert mu == pytest.approx(0.2, abs=0.003) and mgamma == pytest.approx(gamma, abs=1e-12)


def test_identical_good_scores_are_reported_degenerate_on_every_scale() -> None:
    assert sample_is_degenerate([0.5] * 10)
    assert not sample_is_degenerate([0.5, 0.52, 0.55, 0.6])
    u, gamma = scale_of([0.5] * 10, "max")  # the ratio scale stays finite on copies
    assert (u, gamma) == (0.0, 0.5)
    u, gamma = scale_of([0.0] * 4, "max")  # and on an all-zero sample, with a floor
    assert u == 0.0 and gamma > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_gamma_above_u_and_needs_two_scores(method: str) -> None:
    u, gamma = scale_of([0.2, 0.25, 0.3, 0.4], method)
    assert math.isfinite(u) and gamma > u
    with pytest.raises(NormalStatsError, match="at least 2"):
        scale_of([0.2, float("nan")], method)


def test_identical_scores_get_a_floored_spread() -> None:
    u, gamma = scale_of([0.5] * 10, "robust")
    assert u == 0.5 and gamma - u == pytest.approx(MIN_SPREAD_FRACTION * 0.5)


def test_unknown_method_is_refused() -> None:
    with pytest.raises(NormalStatsError, match="unknown normalisation"):
        scale_of([1.0, 2.0], "mean-max")


def stats(scores=(0.1, 0.12, 0.11, 0.13, 0.2), **changes) -> NormalStats:
    return dataclasses.replace(NormalStats.from_registration("valve-a", list(scores), bank_version=1), **changes)


def test_record_round_trips_and_refuses_damage() -> None:
    s = stats()
    assert NormalStats.from_json(s.to_json()) == s
    assert s.thin and s.count == 5 and RELIABLE_COUNT > 5
    good = json.loads(s.to_json())
    for field, value in (("u", float("nan")), ("gamma", -1.0), ("source", "guess"), ("method", "max2"),
                         ("schema", 9), ("revision", -1), ("stream", [1.0, "x"]), ("count", True)):
        bad = json.dumps({**good, field: value})
        with pytest.raises(NormalStatsError):
            NormalStats.from_json(bad)
    with pytest.raises(NormalStatsError):
        NormalStats.from_json(b"\xff not json")


def test_feedback_adds_confirmed_good_scores_and_measures_again() -> None:
    s = stats()
    fed = s.with_feedback([0.3, 0.31])
    assert fed.source == "feedback" and fed.count == 7 and fed.revision == s.revision + 1
    assert (fed.u, fed.gamma) == scale_of([*s.registration, 0.3, 0.31], s.method)


# -- the stream update ---------------------------------------------------------------------------------
CFG = StreamConfig(window=100, min_count=40, refresh_every=20, max_step=0.5, freeze_jump=0.2)
# A line threshold where the trainer puts one on the default scale: 1.0 is the maximum of a
# product's registration scores (for 50 normally distributed ones about 2.06 standard deviations
# above the median), and a 1% false-reject rate lies at 2.326 / 2.06 = 1.13 on it.
LINE_THRESHOLD = 1.13


def feed(calib: StreamCalibrator, product: str, raws, threshold: float = LINE_THRESHOLD) -> list[NormalStats]:
    changes = []
    for raw in raws:
        s = calib.current(product)
        new = calib.observe(product, float(raw), calibrated(raw, s.u, s.gamma) > threshold)
        if new is not None:
            changes.append(new)
    return changes


def test_bounded_step_limits_every_refresh() -> None:
    u, gamma = bounded_step((1.0, 2.0), (10.0, 100.0), 0.5)
    assert u == pytest.approx(1.5) and gamma - u == pytest.approx(1.5)
    u, gamma = bounded_step((1.0, 2.0), (0.9, 1.8), 0.5)  # inside the bound: reached
    assert (u, gamma) == pytest.approx((0.9, 1.8))


def test_stream_loosens_a_product_whose_good_parts_are_rejected() -> None:
    calib = StreamCalibrator(CFG)
    start = stats(scores=(0.100, 0.101, 0.102))  # thin and far too tight: most good parts fail
    calib.adopt(start)
    good = np.random.default_rng(1).normal(0.2, 0.02, 400)
    changes = feed(calib, "valve-a", good)
    assert changes and not any(c.frozen for c in changes)  # failing from the start is not a jump
    for before, after in zip([start, *changes], changes):  # every refresh stays within the bound
        spread = before.gamma - before.u
        assert abs(after.u - before.u) <= CFG.max_step * spread + 1e-12
        assert spread / (1 + CFG.max_step) - 1e-12 <= after.gamma - after.u <= spread * (1 + CFG.max_step) + 1e-12
    final = calib.current("valve-a")
    rejected = np.mean(calibrated(good[-100:], final.u, final.gamma) > LINE_THRESHOLD)
    assert final.source == "stream" and rejected < 0.05  # a few percent: the sample's own tail


def test_a_defect_burst_freezes_learning_and_leaves_the_scale() -> None:
    calib = StreamCalibrator(CFG)
    good = np.random.default_rng(2).normal(0.2, 0.02, 200)
    calib.adopt(stats(scores=list(good[:60])))
    feed(calib, "valve-a", good[60:])
    settled = calib.current("valve-a")
    burst = feed(calib, "valve-a", np.full(60, 0.6))  # every frame a clear defect
    assert burst and burst[0].frozen
    now = calib.current("valve-a")
    assert (now.u, now.gamma) == (settled.u, settled.gamma) and now.frozen
    assert 0.6 not in calib._tracks["valve-a"].scores  # the burst never entered the sample
    feed(calib, "valve-a", good[:60])
    assert not calib.current("valve-a").frozen


def test_a_well_registered_product_does_not_learn_from_the_defects_it_rejects() -> None:
    rng = np.random.default_rng(6)
    good = rng.normal(0.2, 0.02, 400)
    calib = StreamCalibrator(CFG)
    start = stats(scores=list(good[:50]))  # 50 cross-scored good images: not thin
    calib.adopt(start)
    frames = np.where(rng.random(300) < 0.5, rng.normal(0.5, 0.05, 300), good[50:350])  # half defects
    feed(calib, "valve-a", frames)
    now = calib.current("valve-a")
    assert now.source == "stream" and max(now.stream) < 0.3  # only passed (good) frames were learned
    assert abs(now.u - start.u) < 0.2 * (start.gamma - start.u)  # the scale stayed where the good parts are


def test_re_registration_and_feedback_reset_the_stream_state() -> None:
    calib = StreamCalibrator(CFG)
    calib.adopt(stats())
    feed(calib, "valve-a", np.random.default_rng(3).normal(0.2, 0.02, 100))
    assert calib.current("valve-a").source == "stream"
    fresh = stats(bank_version=2)
    calib.adopt(fresh)
    assert calib.current("valve-a") == fresh and calib._tracks["valve-a"].scores == []
    older = stats(bank_version=1, revision=0)
    calib.adopt(older)
    assert calib.current("valve-a") == fresh  # an older record never replaces a newer one


def test_a_restart_resumes_from_the_stored_stream_sample() -> None:
    calib = StreamCalibrator(CFG)
    calib.adopt(stats())
    changes = feed(calib, "valve-a", np.random.default_rng(4).normal(0.2, 0.02, 60))
    stored = NormalStats.from_json(changes[-1].to_json())
    again = StreamCalibrator(CFG)
    again.adopt(stored)
    assert again.current("valve-a") == stored and again._tracks["valve-a"].scores == stored.stream


def test_stream_off_keeps_registration_statistics() -> None:
    calib = StreamCalibrator(dataclasses.replace(CFG, enabled=False))
    s = stats()
    calib.adopt(s)
    assert feed(calib, "valve-a", np.full(100, 5.0)) == [] and calib.current("valve-a") == s


def test_stream_config_is_checked() -> None:
    with pytest.raises(ValueError, match="exceeds the window"):
        StreamConfig(window=10, min_count=20)


# -- registration: cross-scoring ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model() -> InspectionModel:
    torch.manual_seed(0)
    return InspectionModel(tiny_config(scoring="distance")).eval()


def images(n: int, seed: int = 0) -> list[ShotImage]:
    rng = np.random.default_rng(seed)
    base = rng.random((64, 64, 3)) * 120
    return [ShotImage(f"g{i}.png", f"{i:064d}", (base + rng.random((64, 64, 3)) * 60).astype(np.uint8))
            for i in range(n)]


def rows_of(bank_level: torch.Tensor, level: torch.Tensor) -> set[int]:
    """The images (rows of ``level``) whose position vectors appear in ``bank_level``, by exact match."""
    vectors = position_vectors(level).to(bank_level.dtype)  # (N, HW, C), as the bank stores them
    hits = (vectors.flatten(0, 1)[:, None, :] == bank_level[None]).all(-1).any(-1)  # (N*HW,)
    return {int(i) for i in torch.nonzero(hits).flatten() // vectors.shape[1]}


def test_cross_scoring_never_scores_an_image_against_a_bank_that_contains_it(model: InspectionModel) -> None:
    """12 images, at most 8 in the bank with a coreset of 64 vectors per level: the 8 are scored
    5-fold, each against a bank whose every vector comes from an image outside its fold, and the 4
    left out against the served bank. Scores match re-scoring to 1e-5 (same arithmetic, batched)."""
    imgs = images(12)
    feats = extract(model, np.stack([im.pixels for im in imgs]))
    reg = register_features(model, "p", feats, bank_images=8, coreset=64)
    assert reg.scored == {"scored": "cross_fold", "folds": 5, "held_out": 4} and reg.normal.count == 12
    folds = fold_of(len(reg.keep))
    served, fold_banks = build_fold_banks([f[reg.keep] for f in feats], folds, 64)
    assert all(a.shape[0] == 64 for a in served.features)
    assert all(torch.equal(a, b) for a, b in zip(served.features, reg.bank.features))
    hint = torch.zeros(1, dtype=torch.long)
    for pos, i in enumerate(reg.keep):
        bank = fold_banks[folds[pos]]
        outside = {reg.keep[p] for p in range(len(reg.keep)) if folds[p] != folds[pos]}
        for level, f in zip(bank.features, feats):
            found = rows_of(level, f)
            assert i not in found and found <= outside and found  # only other folds' images
        alone = model.raw_scores([f[i : i + 1] for f in feats], stack_banks([bank]), hint)
        assert reg.normal.registration[pos] == pytest.approx(float(alone[0]), rel=1e-5)
    held = [i for i in range(12) if i not in reg.keep]
    for j, i in enumerate(held, start=len(reg.keep)):
        alone = model.raw_scores([f[i : i + 1] for f in feats], stack_banks([reg.bank]), hint)
        assert reg.normal.registration[j] == pytest.approx(float(alone[0]), rel=1e-5)
    assert tuple(reg.bank.stats.tolist()) == pytest.approx((reg.normal.u, reg.normal.gamma))


def test_every_image_enters_the_bank_up_to_the_cap(model: InspectionModel) -> None:
    """Without a cap on images, the bank's vectors come from all of them (the coreset keeps
    vectors of every image here: 10 random-texture images, 64 vectors per level)."""
    imgs = images(10)
    feats = extract(model, np.stack([im.pixels for im in imgs]))
    reg = register_features(model, "p", feats, bank_images=64, coreset=256)
    assert reg.keep == list(range(10)) and reg.scored["held_out"] == 0
    assert rows_of(reg.bank.features[0], feats[0]) == set(range(10))


def test_cards_without_a_normalisation_read_as_max_and_registration_follows_the_card() -> None:
    """A card's threshold is a number on its normalisation's scale: a card written before the
    field existed was placed on ``max``, and registering against it must measure ``max``."""
    old = ModelConfig.from_dict({"score": {"scoring": "distance", "calibration": "bank", "threshold": 1.1}})
    assert old.score.normalisation == "max"
    with pytest.raises(ValueError, match="normalisation must be one of"):
        ModelConfig.from_dict({"score": {"normalisation": "mean-max"}})
    imgs = images(10)
    for method in ("max", "q90"):
        torch.manual_seed(0)
        cfg = tiny_config(scoring="distance")
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, normalisation=method))
        model = InspectionModel(cfg).eval()
        reg = register_features(model, "valve-a", extract(model, np.stack([im.pixels for im in imgs])), 8)
        assert reg.normal.method == method and reg.normal.count == 10
        assert (reg.normal.u, reg.normal.gamma) == pytest.approx(scale_of(reg.normal.registration, method), rel=1e-12)


def test_only_the_shots_fall_back_to_leave_one_out_and_say_so(model: InspectionModel) -> None:
    reg = register_product(model, SIGNATURE, "m0", "p", images(4), bank_images=4)
    assert reg.meta.normal["scored"] == "leave_one_out" and reg.meta.normal["count"] == 4
    assert reg.meta.normal["thin"] is True


# -- stores: the refined statistics ------------------------------------------------------------------
@pytest.fixture(params=["file", "redis"])
def store(request, tmp_path: Path, redis_url: str, redis_prefix: str):
    s = open_store(f"file://{tmp_path / 'banks'}") if request.param == "file" else open_store(redis_url, prefix=redis_prefix)
    yield s
    s.close()


def put_product(store, model: InspectionModel, name: str = "p", seed: int = 0) -> tuple[int, object]:
    reg = register_product(model, SIGNATURE, "m0", name, images(8, seed), bank_images=4)
    version, _ = store.put("3", encode_bank(reg.bank, reg.meta), reg.meta)
    return version, reg


def test_refined_statistics_round_trip_with_compare_and_set(store, model: InspectionModel) -> None:
    version, reg = put_product(store, model)
    assert store.normal("3", "p") is None
    s = dataclasses.replace(NormalStats.from_meta(reg.meta.with_version(version)), source="stream", revision=1)
    epoch = store.state("3").epoch
    assert store.put_normal("3", s, expect_revision=0)
    assert store.normal("3", "p") == s and store.state("3").epoch == epoch  # a stream write is no bank change
    assert not store.put_normal("3", dataclasses.replace(s, revision=2), expect_revision=0)  # stale writer loses
    assert store.put_normal("3", dataclasses.replace(s, revision=2), expect_revision=1, notify=True)
    assert store.state("3").epoch == epoch + 1  # feedback-style writes tell the workers
    assert not store.put_normal("3", dataclasses.replace(s, bank_version=version + 5))  # not the active bank


def test_re_registration_and_removal_drop_refined_statistics(store, model: InspectionModel) -> None:
    version, reg = put_product(store, model)
    s = dataclasses.replace(NormalStats.from_meta(reg.meta.with_version(version)), source="stream", revision=1)
    assert store.put_normal("3", s)
    put_product(store, model, seed=1)
    assert store.normal("3", "p") is None
    version, reg = put_product(store, model, seed=2)
    assert store.put_normal("3", dataclasses.replace(s, bank_version=version))
    store.remove("3", "p")
    assert store.normal("3", "p") is None


def test_the_watcher_serves_refined_statistics_and_survives_a_damaged_record(store, model: InspectionModel,
                                                                               tmp_path: Path) -> None:
    version, reg = put_product(store, model)
    refined = dataclasses.replace(NormalStats.from_meta(reg.meta.with_version(version)), u=0.5, gamma=0.9,
                                  source="feedback", revision=1)
    assert store.put_normal("3", refined, notify=True)
    events = []
    watcher = BankWatcher(store, "3", SIGNATURE, model.channels, on_event=lambda e, **f: events.append((e, f)))
    watcher.refresh()
    snap = watcher.snapshot
    assert snap.normals["p"] == refined
    assert snap.tensors.stats[0].tolist() == pytest.approx([0.5, 0.9])
    if hasattr(store, "client"):
        store.client.set(store.key("3", "normal", "p"), b"{broken")
    else:
        (Path(store.root) / "line-3" / "normal" / "p.json").write_bytes(b"{broken")
    put_product(store, model, name="q", seed=3)  # another product's change makes the watcher reload
    watcher.refresh()
    assert watcher.snapshot.normals["p"].source == "registration"  # the damaged record is not served
    assert [f["product"] for e, f in events if e == "normal_refused"] == ["p"]


def test_stream_statistics_hold_with_five_percent_defects_in_the_sample() -> None:
    """A product registered from few images learns from every frame, defects included. With 5%
    of the stream far out (defects), the learned upper anchor stays where the good parts' is
    (tolerance: 15% of the good spread; the sampling error of 200 frames' IQR is ~7%); the
    registration statistic (the maximum) of the same sample would sit among the defects."""
    rng = np.random.default_rng(3)
    good = rng.normal(0.2, 0.02, 190)
    stream = rng.permutation(np.concatenate([good, rng.normal(0.5, 0.05, 10)]))
    calib = StreamCalibrator(StreamConfig(window=200, min_count=40, refresh_every=20, max_step=5.0, freeze_jump=1.0))
    calib.adopt(stats(scores=(0.19, 0.2, 0.21)))  # thin: learns from every frame
    feed(calib, "valve-a", stream)
    learned = calib.current("valve-a")
    spread = STREAM_ANCHOR_Z[DEFAULT_METHOD] * 0.02  # the good parts' anchor above their median
    true_gamma = 0.2 + spread
    assert learned.source == "stream" and learned.method == DEFAULT_METHOD
    assert learned.u == 0.0  # the ratio scale keeps its zero
    assert abs(learned.gamma - true_gamma) < 0.15 * spread
    naive = scale_of(stream, "max")[1]
    assert naive > 0.4  # the sample's maximum is a defect's score
