"""The inspection graph: residuals, flows, calibration, routing, export."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from torch.export import Dim, export

from inspector.model import BankTensors, FlowConfig, InspectionModel, ModelConfig, build_bank, stack_banks, verdicts
from inspector.model.serving import ServingGraph
from inspector.model.bank import describe_coreset, greedy_k_center, level_caps, nearest_neighbours, parse_coreset

from .conftest import tiny_config
from inspector.model.calibration import GaussianBlur, calibrate, top_fraction_mean
from inspector.model.flow import build_flow, log_likelihood, positional_encoding

from .conftest import tiny_config


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_nearest_neighbour_matches_brute_force(chunk: int) -> None:
    queries, bank = unit(3, 50, 16, seed=1), unit(3, 130, 16, seed=2)
    sim, match = nearest_neighbours(queries, bank, chunk)
    brute = torch.cdist(queries, bank)  # small sizes: a broadcast is fine in a test
    idx = brute.argmin(dim=2)
    expected = torch.gather(bank, 1, idx.unsqueeze(-1).expand(-1, -1, 16))
    # float32 matmul vs float32 distances: 1e-6 covers rounding of unit-vector dot products
    torch.testing.assert_close(match, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(sim, (queries * expected).sum(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tile", [1, 13, 50, None])
def test_query_tiles_find_the_same_neighbours(tile: int | None) -> None:
    queries, bank = unit(3, 50, 16, seed=3), unit(3, 130, 16, seed=4)
    sim, match = nearest_neighbours(queries, bank, 64, query_tile=tile)
    whole_sim, whole_match = nearest_neighbours(queries, bank, 64)
    # each query's dot products come from a matmul of another height: 1e-6 covers the rounding
    torch.testing.assert_close(sim, whole_sim, atol=1e-6, rtol=0)
    torch.testing.assert_close(match, whole_match, atol=1e-6, rtol=0)


def test_residual_is_query_minus_match(tiny_model: InspectionModel) -> None:
    feats = torch.randn(2, 8, 5, 5)
    refs = unit(2, 40, 8, seed=3)
    res, sim = tiny_model.residual(0, feats, refs)
    q = torch.nn.functional.normalize(feats.flatten(2).transpose(1, 2), dim=-1)
    idx = torch.cdist(q, refs).argmin(2)
    match = torch.gather(refs, 1, idx.unsqueeze(-1).expand(-1, -1, 8))
    torch.testing.assert_close(res, (q - match).transpose(1, 2).reshape(2, 8, 5, 5), atol=1e-6, rtol=0)
    assert sim.shape == (2, 1, 5, 5)


def tiny_flow(channels: int = 4, blocks: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    def subnet(c_in: int, c_out: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(c_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, c_out))
    return build_flow(channels, FlowConfig(blocks=blocks, pos_dims=4), subnet).double()


def test_flow_inverse_round_trip() -> None:
    flow = tiny_flow()
    x, cond = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    z, _ = flow(x, c=[cond])
    back, _ = flow(z, c=[cond], rev=True)
    # float64 with clamped affine couplings: round trip exact to ~1e-12; 1e-9 leaves margin
    torch.testing.assert_close(back, x, atol=1e-9, rtol=0)
    assert (z - x).abs().max() > 1e-3  # the flow is not the identity


def test_flow_log_det_matches_autograd() -> None:
    flow = tiny_flow()
    x, cond = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, log_det = flow(x, c=[cond])
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None], c=[cond[i : i + 1]])[0][0], x[i])
        # float64 Jacobian by autograd vs the flow's analytic log-det: agree to ~1e-12
        assert math.isclose(float(torch.linalg.slogdet(jac)[1]), float(log_det[i].detach()), abs_tol=1e-9)


def test_log_likelihood_per_dimension() -> None:
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    log_det = torch.tensor([0.0, 2.0])
    expected = torch.tensor([-0.5 * math.log(2 * math.pi), (-1.0 + 2.0) / 2 - 0.5 * math.log(2 * math.pi)])
    torch.testing.assert_close(log_likelihood(z, log_det), expected)
    assert log_likelihood(z.half(), log_det.half()).dtype == torch.float32  # reductions in fp32


def test_positional_encoding_is_distinct_per_position() -> None:
    enc = positional_encoding(6, 5, 16)
    assert enc.shape == (30, 16)
    assert torch.cdist(enc, enc).fill_diagonal_(1.0).min() > 1e-3


def test_calibration_and_top_fraction_arithmetic() -> None:
    raw = torch.arange(200, dtype=torch.float32).reshape(2, 1, 10, 10)
    u, gamma = torch.tensor([10.0, 100.0]), torch.tensor([20.0, 300.0])
    cal = calibrate(raw, u, gamma)
    torch.testing.assert_close(cal[0, 0, 1, 0], torch.tensor(0.0))  # raw 10 -> (10-10)/10
    torch.testing.assert_close(cal[1, 0, 9, 9], torch.tensor((199.0 - 100.0) / 200.0))
    # top 1% of 100 pixels is one pixel; top 5% is the mean of the five largest
    torch.testing.assert_close(top_fraction_mean(raw, 0.01), torch.tensor([99.0, 199.0]))
    torch.testing.assert_close(top_fraction_mean(raw, 0.05), torch.tensor([97.0, 197.0]))


def test_blur_matches_scipy() -> None:
    x = torch.rand(1, 1, 40, 30, generator=torch.Generator().manual_seed(0))
    ours = GaussianBlur(2.0)(x)[0, 0].double().numpy()
    ref = scipy.ndimage.gaussian_filter(x[0, 0].double().numpy(), 2.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # float32 convolution vs float64 reference


def make_banks(model: InspectionModel, n: int = 2) -> tuple[list[torch.Tensor], BankTensors]:
    torch.manual_seed(1)
    images = torch.randint(0, 256, (4 * n, model.input_size, model.input_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = model.extract(images)
    banks = [build_bank([f[4 * i : 4 * i + 4] for f in feats]).with_stats(0.1 * i, 1.0 + i) for i in range(n)]
    return feats, stack_banks(banks)


def test_padding_to_capacity_changes_nothing(tiny_model: InspectionModel) -> None:
    feats, bank = make_banks(tiny_model)
    bigger = [t.shape[1] + 37 for t in bank.features]
    padded = stack_banks([_unstack(bank, i) for i in range(2)], capacity=bigger)
    with torch.no_grad():
        a = tiny_model.analyse([f[:3] for f in feats], bank)
        b = tiny_model.analyse([f[:3] for f in feats], padded)
    torch.testing.assert_close(a.raw_map, b.raw_map, atol=0, rtol=0)  # repeated real vectors: same max


def _unstack(bank: BankTensors, i: int):
    from inspector.model import ProductBank
    return ProductBank(tuple(f[i] for f in bank.features), bank.prototypes[i], bank.stats[i])


def test_routing_hint_and_unknown_gate(tiny_model: InspectionModel) -> None:
    feats, bank = make_banks(tiny_model)
    with torch.no_grad():
        routed = tiny_model.analyse([f[:2] for f in feats], bank)
        hinted = tiny_model.analyse([f[:2] for f in feats], bank, torch.tensor([1, -1]))
    assert routed.product.tolist() == [0, 0]  # shots of product 0 route to product 0
    assert hinted.product.tolist() == [1, 0]
    assert hinted.route_similarity[0] <= routed.route_similarity[0] + 1e-6
    inspection = tiny_model.inspect(routed)
    none_hinted = torch.zeros(2, dtype=torch.bool)
    fail, unknown = verdicts(inspection.score, inspection.route_similarity, none_hinted, float("inf"), 1.01)
    assert unknown.all() and fail.all()  # nothing reaches similarity 1.01: all unknown, all fail
    fail, unknown = verdicts(inspection.score, inspection.route_similarity, none_hinted, float("inf"), -1.0)
    assert not unknown.any() and not fail.any()
    # a frame hinted to a product by its header is scored against it however it looks
    fail, unknown = verdicts(inspection.score, inspection.route_similarity, torch.tensor([True, False]),
                             float("inf"), 1.01)
    assert unknown.tolist() == [False, True] and fail.tolist() == [False, True]


def test_verdict_rule_on_scores() -> None:
    """The served rule on NumPy arrays (what the engine passes): over the threshold fails, at it
    passes, and a score that is not a number fails."""
    import numpy as np

    score = np.array([0.5, 1.0, 1.5, np.nan, np.inf, 0.2], dtype=np.float32)
    sim = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.1], dtype=np.float32)
    fail, unknown = verdicts(score, sim, np.zeros(6, dtype=bool), 1.0, 0.5)
    assert fail.tolist() == [False, False, True, True, True, True]
    assert unknown.tolist() == [False] * 5 + [True]


def test_calibration_modes_use_their_statistics(tiny_model: InspectionModel) -> None:
    feats, bank = make_banks(tiny_model)
    with torch.no_grad():
        a = tiny_model.analyse([f[4:6] for f in feats], bank, torch.tensor([1, 1]))
    insp = tiny_model.inspect(a, "bank")
    torch.testing.assert_close(insp.u, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(insp.gamma, torch.tensor([2.0, 2.0]))
    none = tiny_model.inspect(a, "none")
    torch.testing.assert_close(none.calibrated_map, a.raw_map)
    cada = tiny_model.inspect(a, "cada")
    assert (cada.gamma > cada.u).all()  # gamma > u by construction of the head


def test_coreset_caps_and_spreads() -> None:
    vectors = unit(500, 8, seed=5)
    idx = greedy_k_center(vectors, 50)
    assert len(set(idx.tolist())) == 50
    far = torch.cdist(vectors, vectors[idx]).min(1).values.max()
    rand = torch.cdist(vectors, vectors[:50]).min(1).values.max()
    assert far < rand  # k-center covers the set better than an arbitrary subset
    feats = [torch.randn(4, 8, 6, 6)]
    assert build_bank(feats, coreset=20).features[0].shape == (20, 8)


def test_coreset_per_level() -> None:
    """One cap for every level, one per level (None: every position), and the parse of the CLI."""
    feats = [torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)]
    bank = build_bank(feats, coreset=(20, None))
    assert [f.shape for f in bank.features] == [(20, 8), (36, 16)]
    assert [f.shape[0] for f in build_bank(feats, coreset=30).features] == [30, 30]
    assert level_caps(1024, 3) == (1024,) * 3 and level_caps((4096, 0, None), 3) == (4096, None, None)
    with pytest.raises(ValueError, match="needs 3 caps, got 2"):
        level_caps((1, 2), 3)
    assert parse_coreset("1024") == 1024 and parse_coreset("4096,1024,all") == (4096, 1024, None)
    assert parse_coreset("0") is None and describe_coreset((4096, 1024, None)) == "4096/1024/all"
    for bad in ("x", "1,-2", "1.5"):
        with pytest.raises(ValueError):
            parse_coreset(bad)


def test_leave_one_out_scores_never_score_a_shot_against_itself(tiny_model: InspectionModel) -> None:
    feats, _ = make_banks(tiny_model, n=1)
    k = feats[0].shape[0]
    scores = tiny_model.leave_one_out_scores(feats)
    assert scores.shape == (k,) and torch.isfinite(scores).all()
    for i in range(k):  # each equals the shot scored against a bank of the others, built by hand
        others = [f[[j for j in range(k) if j != i]] for f in feats]
        alone = tiny_model.raw_scores([f[i : i + 1] for f in feats], stack_banks([build_bank(others)]),
                                      torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(scores[i : i + 1], alone, rtol=1e-5, atol=1e-6)  # same arithmetic, batched
    own = tiny_model.raw_scores([f[:1] for f in feats], stack_banks([build_bank(feats)]), torch.zeros(1, dtype=torch.long))
    assert own[0] < scores[0]  # against a bank that contains it a shot scores lower: that is what is avoided


def test_distance_scoring_serves_the_nearest_neighbour_map_without_flows() -> None:
    torch.manual_seed(0)
    model = InspectionModel(tiny_config(scoring="distance")).eval()
    feats, bank = make_banks(model)
    calls = []
    for flow in model.flows:
        flow.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a = model.analyse([f[4:6] for f in feats], bank, torch.tensor([1, 1]))
    assert not calls  # no flow ran
    torch.testing.assert_close(a.raw_map, a.nn_map)


@pytest.mark.parametrize("calibration", ["bank", "none", "cada"])
@pytest.mark.parametrize("scoring", ["distance", "flow"])
def test_served_graph_computes_only_what_its_mode_uses(calibration: str, scoring: str) -> None:
    torch.manual_seed(0)
    model = InspectionModel(tiny_config(scoring=scoring)).eval()
    feats, bank = make_banks(model)
    cada_calls, fuse_calls = [], []
    model.cada.register_forward_hook(lambda *a: cada_calls.append(1))
    fuse = model.fuse
    model.fuse = lambda maps: fuse_calls.append(1) or fuse(maps)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    hint = torch.tensor([1, -1])
    with torch.no_grad():
        served = ServingGraph(model, calibration)(images, hint, bank.prototypes, bank.stats, *bank.features)
        assert len(cada_calls) == (calibration == "cada")
        assert len(fuse_calls) == 1  # the one map served: the flow's, or the distance (the raw map)
        full = model.inspect(model.analyse(model.extract(images), bank, hint), calibration)
    for got, want in zip(served, full):
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same arithmetic, fewer outputs


def test_an_analysis_for_another_mode_refuses_cada(tiny_model: InspectionModel) -> None:
    feats, bank = make_banks(tiny_model)
    with torch.no_grad():
        a = tiny_model.analyse([f[4:6] for f in feats], bank, torch.tensor([1, 1]), served="bank")
    assert a.cada is None
    with pytest.raises(ValueError, match="no CADA output"):
        tiny_model.inspect(a, "cada")


def test_torch_export_dynamic_batch(tiny_model: InspectionModel) -> None:
    _, bank = make_banks(tiny_model)
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    hint = torch.tensor([-1, 1, -1])
    batch = Dim("batch", min=1, max=64)
    shapes = ({0: batch}, BankTensors(tuple(None for _ in bank.features), None, None), {0: batch})
    program = export(tiny_model, (images, bank, hint), dynamic_shapes=shapes)  # fails on any graph break
    for n in (1, 3, 5):
        imgs = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8)
        h = torch.full((n,), -1)
        with torch.no_grad():
            want = tiny_model(imgs, bank, h)
            got = program.module()(imgs, bank, h)
        for w, g in zip(want, got):
            # the exported graph runs the same kernels in the same order on CPU
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def identity_model(position: bool = True, constraintor: str = "identity") -> InspectionModel:
    base = tiny_config()
    torch.manual_seed(0)
    cfg = dataclasses.replace(base, flow=dataclasses.replace(base.flow, constraintor=constraintor, position=position))
    return InspectionModel(cfg).eval()


def test_identity_constraintor_starts_at_the_nearest_neighbour_distance() -> None:
    """Untrained, the identity-constraintor model scores each level exactly as ``1 - cos``."""
    model = identity_model()
    feats, bank = make_banks(model)
    with torch.no_grad():
        for level, f in enumerate(feats):
            res, sim = model.residual(level, f[:3], bank.features[level][:1].float().expand(3, -1, -1))
            anomaly = -model.level_logp(level, res)
            const = 0.5 * math.log(2 * math.pi)
            # the flow starts as a permutation (zero-initialised subnets): only float32 rounding
            half_sq = 0.5 * res.pow(2).sum(1, keepdim=True)
            torch.testing.assert_close(anomaly, half_sq + const, atol=1e-5, rtol=0)
            # |q - m|^2 = 2 (1 - cos) for unit vectors; fp16 bank storage leaves |m|^2 within ~1e-3 of 1
            torch.testing.assert_close(anomaly, 1.0 - sim + const, atol=2e-3, rtol=0)


def test_flow_config_rejects_an_unknown_constraintor() -> None:
    with pytest.raises(ValueError, match="constraintor must be one of"):
        FlowConfig(constraintor="mlp")


def test_card_without_the_newer_flow_fields_loads_as_the_model_it_was_fitted_as() -> None:
    data = ModelConfig().to_dict()
    del data["flow"]["constraintor"], data["flow"]["position"]
    flow = ModelConfig.from_dict(data).flow
    # such cards predate the identity constraintor: they were all fitted with the conv one
    assert (flow.constraintor, flow.position) == ("conv", True)
    assert ModelConfig.from_dict(ModelConfig().to_dict()).flow.constraintor == FlowConfig().constraintor


def test_position_off_conditions_every_position_alike() -> None:
    model = identity_model(position=False)
    assert all(not getattr(model, f"pos{l}").any() for l in range(len(model.channels)))
    assert getattr(identity_model(position=True), "pos0").any()


@pytest.mark.parametrize(("constraintor", "position"), [("conv", True), ("identity", False)])
def test_torch_export_other_flow_variants(constraintor: str, position: bool) -> None:
    """The default (identity, with position) is exported above; the other variants export too."""
    model = identity_model(position, constraintor)
    _, bank = make_banks(model)
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    hint = torch.full((3,), -1)
    batch = Dim("batch", min=1, max=64)
    shapes = ({0: batch}, BankTensors(tuple(None for _ in bank.features), None, None), {0: batch})
    program = export(model, (images, bank, hint), dynamic_shapes=shapes)
    imgs = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        want, got = model(imgs, bank, torch.full((5,), -1)), program.module()(imgs, bank, torch.full((5,), -1))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)  # same CPU kernels, same order
