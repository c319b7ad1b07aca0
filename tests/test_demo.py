"""``inspector demo`` end to end, shortened: fit, register, a real worker process, live add."""

from __future__ import annotations

import json

from inspector.cli import main

from .conftest import REAL_WEIGHTS


def test_demo_runs_end_to_end_and_accounts_for_every_frame(tmp_path, capsys) -> None:
    weights = [] if not REAL_WEIGHTS.is_file() else ["--weights", str(REAL_WEIGHTS)]
    code = main(["demo", "--out", str(tmp_path), "--steps", "10", "--frames", "120", "--rate", "15",
                 "--quiet", *weights])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    acc = summary["accounting"]
    assert acc["sent"] == acc["results"] == 120 and acc["worker_exit_code"] == 0
    assert "every frame got exactly one result" in out
    assert (tmp_path / "heatmaps" / "index.html").is_file()
    rows = summary["products"]
    before = rows["weave (before weave added)"]
    if weights:  # with real features the unknown-product gate holds for the unregistered product
        assert before["unknown_product"] == before["frames"]
        live = summary["live_add"]
        # Decided by what the worker served, not by time: every weave frame served with a bank set
        # that has weave is inspected, and the last third (sent after the registration returned)
        # holds weave frames served that way.
        assert live["frames_checked"] > 0 and live["unknown_after_add"] == 0, live
