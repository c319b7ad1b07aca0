"""Compiled backends against eager: ONNX (onnxruntime), torch.compile (inductor), TensorRT (skips).

Parity runs on real images from ``../shared/data`` with the real backbone; the flow and CADA heads
are untrained (parity is about arithmetic, which does not depend on the weights' values).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from deploy.compile import compile_program
from inspector.backends import example_inputs
from inspector.artifact import load_artifact, save_artifact
from inspector.banks import build_snapshot
from inspector.banks.record import BankMeta
from inspector.banks.register import read_shots, extract
from inspector.cli import main
from inspector.worker.engine import Engine, EngineSettings, ProgramKey
from inspector.model.bank import bank_capacity
from inspector.model import InspectionModel, ModelConfig, build_bank, load_backbone_weights

from .conftest import REAL_DATA, REAL_WEIGHTS, REPO, require_real

SIZE = 128
PRODUCTS = 2
# Both sides compute in fp32; the runtimes fuse and reorder reductions (the flow's |z|^2 and
# log-det sums, the blur, the top-1% mean), which moves results by a few float32 ulps of values
# of order 1-10 (measured up to 6e-7). 1e-4 leaves margin for other CPUs' kernels while still
# catching any real graph difference, which shows up at 1e-2 or more.
ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_real(REAL_WEIGHTS)
    require_real(REAL_DATA)
    base = tmp_path_factory.mktemp("compile")
    cfg = ModelConfig()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=SIZE),
                              flow=dataclasses.replace(cfg.flow, blocks=2))
    torch.manual_seed(0)
    model = InspectionModel(cfg).eval()
    sha = load_backbone_weights(model.backbone, REAL_WEIGHTS)
    card = save_artifact(model, base / "model", sha)
    model, card = load_artifact(base / "model")
    banks = {}
    for cls in ("ball_screw", "pcb"):
        shots = read_shots(sorted((REAL_DATA / cls / "train" / "good").iterdir())[:4], SIZE)
        feats = extract(model, np.stack([s.pixels for s in shots]))
        bank = build_bank(feats, model.cfg.bank.coreset).with_stats(0.1, 0.3)
        meta = BankMeta(cls, card.signature, 4, [], [list(f.shape) for f in bank.features], float(bank.stats[0]),
                        float(bank.stats[1]), card.model_id, "")
        banks[cls] = (bank, meta)
    snap = build_snapshot(1, banks, bank_capacity(model), PRODUCTS)
    frames = []
    for cls in ("ball_screw", "pcb"):
        files = sorted(p for p in (REAL_DATA / cls / "test").rglob("*") if p.is_file())
        frames += [s.pixels for s in read_shots(files[:: max(1, len(files) // 3)][:3], SIZE)]
    return base / "model", model, card, snap, np.stack(frames)


def _compare(engine: Engine, eager: Engine, snap, frames) -> None:
    hints = [None] * len(frames)
    got, want = engine.infer(frames, hints, snap), eager.infer(frames, hints, snap)
    for g, w in zip(got, want):
        assert abs(g.score - w.score) <= ATOL and g.product == w.product
        np.testing.assert_allclose(g.heatmap, w.heatmap, atol=ATOL, rtol=0)
        if abs(w.score - eager.threshold) > ATOL:  # verdicts may differ only right at the threshold
            assert g.verdict == w.verdict


def test_onnx_matches_eager_on_real_images_and_the_worker_checks_its_key(setup, tmp_path) -> None:
    artifact, model, card, snap, frames = setup
    path, key, report = compile_program(artifact, "onnx", [1, 2, 4, 8], "fp32", PRODUCTS, out=tmp_path / "m.onnx",
                                        say=lambda _m: None)
    assert all(v["map_max_abs"] <= ATOL for v in report.values()), report
    eager = Engine(*load_artifact(artifact), EngineSettings(device="cpu"))
    onnx = Engine(*load_artifact(artifact), EngineSettings(device="cpu", backend="onnx", compiled=str(path),
                                                           batch_sizes=(1, 4), products=PRODUCTS))
    _compare(onnx, eager, snap, frames)
    # the bank reaches every backend in its program's dtype, converted once per snapshot
    assert key.bank_dtype == "float32" and onnx.bank_dtype == eager.bank_dtype == torch.float32
    held = eager._bank(snap)
    assert all(f.dtype == torch.float32 for f in held.features) and eager._bank(snap) is held
    with pytest.raises(ValueError) as err:  # a worker configured for more products than compiled
        Engine(*load_artifact(artifact), EngineSettings(device="cpu", backend="onnx", compiled=str(path),
                                                        batch_sizes=(1, 4), products=16))
    assert "products is 2, this worker needs 16" in str(err.value) and "inspector compile" in str(err.value)
    with pytest.raises(ValueError, match="batch range is 1..8"):
        Engine(*load_artifact(artifact), EngineSettings(device="cpu", backend="onnx", compiled=str(path),
                                                        batch_sizes=(16,), products=PRODUCTS))
    side = path.with_suffix(".json")
    side.write_text(json.dumps(dict(json.loads(side.read_text()), model_id="000000000000")))
    with pytest.raises(ValueError, match="model_id is '000000000000'"):
        Engine(*load_artifact(artifact), EngineSettings(device="cpu", backend="onnx", compiled=str(path),
                                                        batch_sizes=(1,), products=PRODUCTS))


def test_a_program_key_written_before_the_bank_dtype_was_recorded_reads_as_fp16(tmp_path) -> None:
    key = ProgramKey("m", "tensorrt", "fp16", 1, 8, [1, 2, 3], 2, "bank", 256, "gpu", "tensorrt x")
    side = tmp_path / "p.json"
    old = {k: v for k, v in json.loads(key.to_json()).items() if k != "bank_dtype"}
    side.write_text(json.dumps(old))
    assert ProgramKey.read(tmp_path / "p.ep").bank_dtype == "float16"  # what such programs were built for


@pytest.mark.slow
def test_inductor_matches_eager_on_real_images(setup) -> None:
    """torch.compile of the served graph (CPU here, the same call on CUDA); compiling takes minutes."""
    artifact, model, card, snap, frames = setup
    eager = Engine(*load_artifact(artifact), EngineSettings(device="cpu"))
    compiled = Engine(*load_artifact(artifact), EngineSettings(device="cpu", backend="inductor"))
    _compare(compiled, eager, snap, frames[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("torch_tensorrt") is None,
                    reason="torch-tensorrt is not installed (NVIDIA's package index is unreachable here)")
def test_tensorrt_matches_eager_on_real_images(setup, tmp_path) -> None:
    artifact, model, card, snap, frames = setup
    path, key, report = compile_program(artifact, "tensorrt", [1, 2, 4, 8], "fp16", PRODUCTS,
                                        out=tmp_path / "m.ep", say=lambda _m: None)
    eager = Engine(*load_artifact(artifact), EngineSettings(device="cuda"))
    trt = Engine(*load_artifact(artifact), EngineSettings(device="cuda", backend="tensorrt", compiled=str(path),
                                                          precision="fp16", batch_sizes=(1, 4), products=PRODUCTS))
    hints = [None] * len(frames)
    for g, w in zip(trt.infer(frames, hints, snap), eager.infer(frames, hints, snap)):
        assert abs(g.score - w.score) <= 5e-2 * max(1.0, abs(w.score))  # fp16: 11-bit mantissa


def test_tensorrt_compile_without_tensorrt_is_a_clear_error(capsys, tmp_path) -> None:
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch-tensorrt is installed here: the missing-library message cannot be shown")
    from .conftest import tiny_config

    torch.manual_seed(0)
    save_artifact(InspectionModel(tiny_config()).eval(), tmp_path / "model", None)
    code = main(["compile", "--artifact", str(tmp_path / "model"), "--backend", "tensorrt", "--batch", "1,2"])
    err = capsys.readouterr().err
    assert code == 3 and "torch-tensorrt is not installed" in err and "tensorrt` extra" in err


def test_optional_backends_are_not_imported_eagerly() -> None:
    """Importing the CLI, worker and engine must not pull in onnxruntime or torch-tensorrt."""
    code = ("import sys; import inspector.cli, inspector.worker.loop, inspector.worker.engine, deploy.compile; "
            "bad = [m for m in ('onnxruntime', 'torch_tensorrt', 'tensorrt') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_example_inputs_fill_the_capacity(setup) -> None:
    _, model, _, _, _ = setup
    args = example_inputs(model, 3, PRODUCTS)
    assert args[0].shape == (3, SIZE, SIZE, 3) and [a.shape[1] for a in args[4:]] == list(bank_capacity(model))
