"""Stage-1 fit: every flow level trains, windows match full-map inference, resume is exact."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from inspector.model import InspectionModel
from trainer.dataset import prepare_sources
from trainer.fit import FitConfig, Window, fit_flows, level_batch, window_features, window_labels
from trainer.synthetic import generate_dataset

from .conftest import tiny_config


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset(root, classes=("tiles", "rings"), n_train=12, n_test_good=3, n_test_defect=3, size=64, seed=0)


def material(model: InspectionModel, root: Path):
    return prepare_sources(model, root, ("tiles", "rings"), cap=12, holdout_fraction=0.25,
                           anomalies_per_image=1, real_anomalies=True, seed=0)


def short_fit(root: Path, workdir: Path, steps: int, resume: bool = True) -> InspectionModel:
    torch.manual_seed(0)
    model = InspectionModel(tiny_config())
    fit_flows(model, material(model, root), FitConfig(steps=steps, batch=4, window=32, checkpoint_every=2, log_every=1),
              workdir, resume=resume, progress=False)
    return model


def test_every_flow_level_takes_steps(synth_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InspectionModel(tiny_config())
    before = [[p.detach().clone() for p in f.parameters()] for f in model.flows]
    fit_flows(model, material(model, synth_root), FitConfig(steps=3, batch=4, window=32), tmp_path, progress=False)
    for level, flow in enumerate(model.flows):
        changed = [not torch.equal(a, b) for a, b in zip(before[level], flow.parameters())]
        # every block's subnet of every level must move; the coarsest level is where others fail
        assert sum(changed) >= len(changed) // 2, f"level {level}: only {sum(changed)}/{len(changed)} tensors changed"
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") >= 1


def test_resume_reproduces_an_uninterrupted_fit(synth_root: Path, tmp_path: Path) -> None:
    straight = short_fit(synth_root, tmp_path / "a", steps=4)
    short_fit(synth_root, tmp_path / "b", steps=2)
    resumed = short_fit(synth_root, tmp_path / "b", steps=4)  # picks up the step-2 checkpoint
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        # same seeds, same RNG states restored, same kernels on CPU: identical up to float noise
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def variant(constraintor: str) -> InspectionModel:
    base = tiny_config()
    torch.manual_seed(0)
    return InspectionModel(dataclasses.replace(base, flow=dataclasses.replace(base.flow, constraintor=constraintor)))


@pytest.mark.parametrize("constraintor", ["conv", "identity"])
def test_window_residuals_equal_full_map_inference(constraintor: str) -> None:
    """The constraintor output inside a training window equals the full-map output there."""
    tiny_model = variant(constraintor).eval()
    feats = torch.randn(5, 64, 16, 16)
    refs = torch.nn.functional.normalize(torch.randn(1, 300, 64), dim=-1)
    res, _ = tiny_model.residual(0, feats[:1], refs)
    full = tiny_model.constraintors[0](res)
    for top, left in ((0, 0), (16, 32), (32, 32)):  # corner, interior and far edge (input pixels, stride 4)
        window = Window(top, left, 32)
        crop, ok, pos = window_features(feats[0], window, stride=4)
        r, _ = tiny_model.residual(0, crop[None], refs)
        con = tiny_model.constraintors[0](r * ok)[0, :, 1:-1, 1:-1]
        y, x = top // 4, left // 4
        torch.testing.assert_close(con, full[0, :, y : y + 8, x : x + 8], atol=1e-5, rtol=1e-5)
        assert pos.tolist()[:2] == [y * 16 + x, y * 16 + x + 1]


def test_window_labels() -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[0:4, 0:2] = True  # half of the first stride-4 cell
    mask[8:12, 8:12] = True  # one whole cell
    mask[20:21, 20:21] = True  # a sliver: ignored
    labels = window_labels(mask, Window(0, 0, 32), stride=4).reshape(8, 8)
    assert labels[0, 0] == 1 and labels[2, 2] == 1 and labels[5, 5] == -1
    assert (labels == 0).sum() == 61
    assert (window_labels(None, Window(0, 0, 32), 4) == 0).all()


def test_level_batch_labels_anomalies(synth_root: Path, tiny_model: InspectionModel, rng: np.random.Generator) -> None:
    from trainer.fit import QuerySampler, draw_queries

    classes = material(tiny_model, synth_root)
    sampler = QuerySampler(classes, 4, 32, 16, 64)
    queries = draw_queries(sampler, 6, 1.0, rng)
    for level in range(3):
        con, res, pos, labels = level_batch(tiny_model, queries, level)
        assert con.shape == res.shape and len(pos) == len(labels) == con.shape[0]
    assert (labels == 1).any() and (labels == 0).any()


def test_source_views_are_changed_copies_of_each_class(synth_root: Path) -> None:
    model = InspectionModel(tiny_config())
    plain = prepare_sources(model, synth_root, ("tiles",), cap=12, holdout_fraction=0.25,
                            anomalies_per_image=1, real_anomalies=True, seed=0)
    viewed = prepare_sources(model, synth_root, ("tiles",), cap=12, holdout_fraction=0.25,
                             anomalies_per_image=1, real_anomalies=True, seed=0, views=("rot90", "invert", "zoom"))
    assert [m.name for m in viewed] == ["tiles", "tiles~rot90", "tiles~invert", "tiles~zoom"]
    base, rot, inv, zoom = viewed
    # same draws: the plain class is unchanged by asking for views
    torch.testing.assert_close(base.fit[2], plain[0].fit[2], atol=0, rtol=0)
    # masks follow the geometry, and appearance-only views keep them
    assert torch.equal(rot.masks, torch.rot90(base.masks, 1, dims=(1, 2)))
    assert torch.equal(inv.masks, base.masks)
    side = base.masks.shape[1]
    centre = base.masks[:, side // 4 : side // 4 + side // 2, side // 4 : side // 4 + side // 2]
    assert torch.equal(zoom.masks, centre.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.equal(rot.source, base.source)
    # the features are of other-looking images
    assert not torch.allclose(inv.fit[0].float(), base.fit[0].float(), atol=0.1)


def test_conv_constraintor_fit_moves_every_flow_level_and_the_constraintors(synth_root: Path, tmp_path: Path) -> None:
    model = variant("conv")
    before = [[p.detach().clone() for p in m.parameters()] for m in (*model.flows, *model.constraintors)]
    fit_flows(model, material(model, synth_root), FitConfig(steps=3, batch=4, window=32), tmp_path, progress=False)
    for i, module in enumerate((*model.flows, *model.constraintors)):
        changed = [not torch.equal(a, b) for a, b in zip(before[i], module.parameters())]
        assert sum(changed) >= len(changed) // 2, f"module {i}: only {sum(changed)}/{len(changed)} tensors changed"


def test_identity_constraintor_has_nothing_to_train() -> None:
    assert not list(variant("identity").constraintors.parameters())
