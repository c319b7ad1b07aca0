"""``inspector train`` and ``inspector eval`` end to end on a generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inspector.artifact import load_artifact, read_card
from inspector.cli import main
from trainer.synthetic import generate_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("e2e")
    data = generate_dataset(base / "data", classes=("tiles", "rings", "weave"), n_train=12,
                            n_test_good=4, n_test_defect=4, size=64, seed=0)
    code = main(["train", "--data", str(data), "--classes", "tiles,rings", "--out", str(base / "model"),
                 "--random-backbone", "--input-size", "64", "--steps", "4", "--batch", "4",
                 "--images-per-class", "12", "--cada-epochs", "3", "--scoring", "flow",
                 "--registration-images", "8", "--quiet"])
    assert code == 0
    return data, base / "model"


def test_train_writes_a_complete_card(trained: tuple[Path, Path]) -> None:
    _, model = trained
    card = read_card(model)
    t = card.training
    assert t["source_classes"] == ["tiles", "rings"]
    assert set(t["thresholds"]) == {"cada", "bank", "none"}
    assert card.model_config.score.threshold == t["thresholds"]["bank"]  # the shipped default calibration
    assert card.backbone["weights_sha256"] is None  # random backbone is recorded as such
    assert len(t["data_digest"]) == 64 and t["stage1"]["steps"] == 4
    per_class = t["holdout"]["per_class"]  # which source class's good images set the threshold
    assert set(per_class) == {"tiles", "rings"} and sum(s["n"] for s in per_class.values()) == t["holdout"]["n"]
    pooled = t["holdout"]["false_reject_rate"]["bank"]
    assert min(s["false_reject_rate"] for s in per_class.values()) <= pooled <= max(s["false_reject_rate"] for s in per_class.values())
    assert t["threshold_rule"] == "class_median"  # the default; every rule's threshold is recorded
    assert set(t["threshold_by_rule"]) == {"class_median", "pooled", "class_mean"}
    assert t["threshold_by_rule"]["class_median"] == pytest.approx(t["thresholds"]["bank"], abs=1e-4)  # rounded to 4 places
    from trainer.calibrate import CalibrationConfig

    per_draw = t["threshold_per_draw"]  # the sampling spread of the shipped threshold, one per draw
    assert len(per_draw) == CalibrationConfig().draws and all(isinstance(v, float) for v in per_draw)
    log = (model.parent / "model.work" / "train_log.jsonl").read_text().splitlines()
    assert json.loads(log[-1])["step"] == 4


def test_threshold_rules_on_a_heavy_tailed_source_class() -> None:
    import numpy as np

    from trainer.calibrate import THRESHOLD_RULES, CalibrationConfig, place_threshold

    # three source classes of 100 held-out good scores: two alike (tails at 0.99 and 1.09), one
    # with a heavy tail (2.0 to 2.99); the 1% threshold of each is its 2nd-highest score
    a, b, c = np.linspace(0.0, 0.99, 100), np.linspace(0.1, 1.09, 100), np.linspace(0.1, 1.0, 100)
    c[-10:] = np.linspace(2.0, 2.99, 10)
    scores, cls = np.concatenate([a, b, c]), np.repeat([0, 1, 2], 100)
    per = [0.98, 1.08, 2.88]
    assert place_threshold(scores, cls, 0.01, "class_median") == pytest.approx(per[1])
    assert place_threshold(scores, cls, 0.01, "class_mean") == pytest.approx(np.mean(per))
    # pooled: 300 scores, at most 3 above: the heavy-tailed class's 4th-highest sets the line
    assert place_threshold(scores, cls, 0.01, "pooled") == pytest.approx(c[-4])
    with pytest.raises(ValueError, match="unknown threshold rule"):
        place_threshold(scores, cls, 0.01, "unit")
    with pytest.raises(ValueError, match="unknown threshold rule"):
        CalibrationConfig(threshold_rule="max")
    assert CalibrationConfig().threshold_rule in THRESHOLD_RULES


def test_eval_reports_every_mode_and_the_mixed_pool(trained: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    data, model = trained
    assert main(["eval", "--artifact", str(model), "--data", str(data), "--classes", "weave",
                 "--out", str(tmp_path), "--draws", "2", "--registration-images", "6", "--stream-frames", "6",
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    line = report["line"]
    assert line["mode"] == "bank" and line["registration_images"] == 6 and line["draws"] == 2
    rates = line["classes"]["weave"]
    assert all(0.0 <= rates[k] <= 1.0 for k in ("frr", "escape", "oracle_escape"))
    stream = line["stream"]
    assert stream["start_images"] == 4 and stream["frames"] == 6  # 12 train images: 6 registered, 6 streamed
    assert 0.0 <= stream["classes"]["weave"]["frr"] <= 1.0 and stream["traces"]["weave"][0]["frames"] == 0
    assert stream["classes"]["weave"]["test_defects"] == 4  # 6 frames at 5% show none of its 4 test defects
    summary = report["summary"]
    for mode in ("cada", "bank", "none", "baseline"):
        mixed = summary[mode]["mixed"]
        assert 0.0 <= mixed["image_auroc"]["mean"] <= 1.0 and mixed["image_auroc"]["n"] == 2
        assert "aupro" in summary[mode]["per_class"]["weave"]
    assert "false_reject_rate" in summary["cada"]["mixed"] and "false_reject_rate" not in summary["baseline"]["mixed"]
    assert len(report["shot_files"]) == 2 and len(report["shot_files"][0]["weave"]) == 6  # all 6 in the bank
    for name in ("scores.png", "heatmaps.png", "roc_mixed.png", "stream.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert "heatmaps.png" in (tmp_path / "index.html").read_text()
    assert "img AUROC mixed" in capsys.readouterr().out


def test_train_without_weights_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/weights to find from here
    monkeypatch.delenv("INSPECTOR_BACKBONE_WEIGHTS", raising=False)
    code = main(["train", "--data", str(tmp_path), "--classes", "a", "--out", str(tmp_path / "m")])
    assert code == 2 and "--random-backbone" in capsys.readouterr().err


def test_unknown_class_is_a_clear_error(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    data, model = trained
    code = main(["eval", "--artifact", str(model), "--data", str(data), "--classes", "nope",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_generated_products_can_be_added_as_sources(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", classes=("tiles",), n_train=8, n_test_good=2,
                            n_test_defect=2, size=64, seed=0)
    assert main(["train", "--data", str(data), "--classes", "tiles", "--out", str(tmp_path / "model"),
                 "--random-backbone", "--input-size", "64", "--steps", "2", "--batch", "2",
                 "--images-per-class", "8", "--cada-epochs", "1", "--synthetic-sources", "dots", "--quiet"]) == 0
    card = read_card(tmp_path / "model")
    assert card.training["source_classes"] == ["tiles", "dots"]
    assert card.training["counts"]["dots"]["fit"] > 0
    assert card.training["config"]["synthetic_sources"] == ["dots"]


def test_identity_constraintor_and_source_views_from_the_cli(tmp_path: Path) -> None:
    data = generate_dataset(tmp_path / "data", classes=("tiles",), n_train=8, n_test_good=2,
                            n_test_defect=2, size=64, seed=0)
    assert main(["train", "--data", str(data), "--classes", "tiles", "--out", str(tmp_path / "model"),
                 "--random-backbone", "--input-size", "64", "--steps", "2", "--batch", "2",
                 "--images-per-class", "8", "--cada-epochs", "1", "--constraintor", "identity",
                 "--no-position", "--source-views", "rot90,zoom", "--quiet"]) == 0
    card = read_card(tmp_path / "model")
    assert card.training["source_classes"] == ["tiles", "tiles~rot90", "tiles~zoom"]
    assert card.config["flow"]["constraintor"] == "identity" and card.config["flow"]["position"] is False
    model, _ = load_artifact(tmp_path / "model")
    assert model.cfg.flow.constraintor == "identity" and not model.pos0.any()


def test_unknown_source_view_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", str(tmp_path), "--classes", "a", "--out", str(tmp_path / "m"),
                 "--random-backbone", "--source-views", "rot90,mirror"])
    assert code == 2 and "mirror" in capsys.readouterr().err


def test_cli_offers_every_constraintor_the_model_knows() -> None:
    from inspector.cli import build_parser
    from inspector.model.config import CONSTRAINTORS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a.choices for a in sub.choices["train"]._actions if a.dest == "constraintor")
    assert tuple(choices) == CONSTRAINTORS  # the CLI lists them without importing torch


def test_cli_offers_every_threshold_rule_the_trainer_knows() -> None:
    from inspector.cli import build_parser
    from trainer.calibrate import THRESHOLD_RULES

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a.choices for a in sub.choices["train"]._actions if a.dest == "threshold_rule")
    assert tuple(choices) == THRESHOLD_RULES


def test_eval_what_if_bank_shape(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """``--bank-images`` and ``--coreset`` evaluate another bank shape than the card's: the report
    records it and every draw's bank holds that many images."""
    data, model = trained
    assert main(["eval", "--artifact", str(model), "--data", str(data), "--classes", "weave", "--out", str(tmp_path),
                 "--draws", "1", "--registration-images", "6", "--stream-frames", "0", "--bank-images", "3",
                 "--coreset", "128", "--no-pixel-metrics", "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bank_images"] == 3 and report["coreset"] == 128
    assert len(report["shot_files"][0]["weave"]) == 3
    with pytest.raises(SystemExit, match="--bank-images must be at least 1"):
        main(["eval", "--artifact", str(model), "--data", str(data), "--classes", "weave", "--out", str(tmp_path),
              "--bank-images", "0", "--quiet"])


@pytest.mark.parametrize("scoring", ["distance", "flow"])
def test_threshold_draws_never_score_a_registered_image(scoring: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each threshold draw scores every pool image it did not register and none it did; with the
    distance the fit images join the pool (nothing was fitted on their maps), with a flow only
    the held-out images are scored. Images are told apart by a unique value in one feature."""
    import numpy as np
    import torch

    from .conftest import tiny_config
    from inspector.model import InspectionModel
    from trainer import calibrate
    from trainer.dataset import ClassMaterial

    torch.manual_seed(0)
    model = InspectionModel(tiny_config(scoring=scoring)).eval()
    tags = iter(range(1, 1000))

    def material(name: str, n: int) -> list[torch.Tensor]:
        feats = model.extract(torch.randint(0, 255, (n, 64, 64, 3), dtype=torch.uint8))
        for i in range(n):
            feats[-1][i, 0, 0, 0] = 100.0 + next(tags)
        return feats

    classes = [ClassMaterial(name, material(name, 10), material(name, 4), [], torch.zeros(0), torch.zeros(0))
               for name in ("a", "b")]
    registered: list[set[float]] = []
    scored: list[set[float]] = []
    real_register, real_analyse = calibrate.register_features, model.analyse

    registering = [False]  # registration cross-scores through analyse too: those calls are not counted

    def register(m, product, feats, *args, **kwargs):
        registered.append({float(x) for x in feats[-1][:, 0, 0, 0]})
        registering[0] = True
        try:
            return real_register(m, product, feats, *args, **kwargs)
        finally:
            registering[0] = False

    def analyse(feats, *args, **kwargs):
        if not registering[0]:
            scored.append({float(x) for x in feats[-1][:, 0, 0, 0]})
        return real_analyse(feats, *args, **kwargs)

    monkeypatch.setattr(calibrate, "register_features", register)
    monkeypatch.setattr(model, "analyse", analyse)
    cfg = calibrate.CalibrationConfig(draws=2, registration_images=6)
    out = calibrate.holdout_scores(model, classes, cfg, np.random.default_rng(0), progress=False)
    per_draw_scored = 14 - 6 if scoring == "distance" else 4  # per class and draw
    assert len(out["class"]) == 2 * 2 * per_draw_scored and len(registered) == 4
    assert out["in_fit"].any() == (scoring == "distance")  # which fit images a draw scores is random
    for draw in range(2):
        regs = set().union(*registered[2 * draw : 2 * draw + 2])
        seen = set().union(*scored[draw * len(scored) // 2 : (draw + 1) * len(scored) // 2])  # draw after draw
        assert not regs & seen and len(seen) == 2 * per_draw_scored
    assert sorted(set(out["draw"].tolist())) == [0, 1] and (out["draw"] == 0).sum() == 2 * per_draw_scored
    per = calibrate.threshold_per_draw(out, "bank", 0.01, "class_median")
    first = out["draw"] == 0
    assert per[0] == pytest.approx(calibrate.place_threshold(out["bank"][first], out["class"][first], 0.01, "class_median"))
    thresholds = calibrate.thresholds(out, 0.01, "class_median")
    held = ~out["in_fit"]  # the CADA head's threshold comes from images it was not fitted on
    assert thresholds["cada"] == pytest.approx(calibrate.place_threshold(out["cada"][held], out["class"][held], 0.01, "class_median"))


def test_cli_offers_every_normalisation_the_banks_know() -> None:
    from inspector.banks.normal import DEFAULT_METHOD, METHODS
    from inspector.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a.choices for a in sub.choices["train"]._actions if a.dest == "normalisation")
    assert sorted(choices) == sorted(METHODS) and choices[0] == DEFAULT_METHOD  # listed without importing numpy
