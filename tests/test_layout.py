"""Seams of the code base: what may import what."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import REPO


def test_benchmarks_import_the_project_never_each_other() -> None:
    """Shared benchmark code lives in ``trainer.benchmark``; no script edits ``sys.path`` to
    import another script."""
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    names = {p.stem for p in scripts}
    assert {"accuracy", "latency", "bank_images"} <= names
    for path in scripts:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in names, f"{path.name} imports benchmark {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in names, f"{path.name} imports benchmark {alias.name}"
        assert "sys.path.insert" not in path.read_text(), f"{path.name} edits sys.path"


def test_the_worker_runtime_never_imports_the_trainer() -> None:
    """``inspector run`` loads the worker, the engine and the stores; none of them pulls in the
    trainer (fitting code, datasets) at start-up."""
    code = ("import sys, inspector.worker.loop, inspector.worker.engine, inspector.cli.run, inspector.banks.register; "
            "print(sorted(m for m in sys.modules if m == 'trainer' or m.startswith('trainer.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_result_reason_is_defined_once_in_the_wire_module() -> None:
    """Reasons are contract: ``inspector.wire.REASONS`` lists each verdict's, and no other module
    spells a reason as its own string constant (they import it)."""
    from inspector import wire

    every = {r for reasons in wire.REASONS.values() for r in reasons}
    assert set(wire.REASONS) == set(wire.VERDICTS) and wire.REASONS[wire.PASS] == ()
    assert len(every) == sum(len(r) for r in wire.REASONS.values())  # no reason under two verdicts
    for path in sorted((REPO / "inspector").rglob("*.py")):
        if path.name == "wire.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                assert node.value.value not in every, f"{path.name}:{node.lineno} redefines reason {node.value.value!r}"
            # nor spells one inline where it sets or tests a result's reason
            inline = [*node.comparators, node.left] if isinstance(node, ast.Compare) else \
                node.args if isinstance(node, ast.Call) else []
            for arg in inline:
                assert not (isinstance(arg, ast.Constant) and arg.value in every), \
                    f"{path.name}:{node.lineno} spells reason {arg.value!r} instead of importing it"
