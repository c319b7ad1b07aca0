"""The failed-frame archive: bounds under a burst, a broken disk costs entries only, a real worker
keeps what it judged, and ``inspector archive`` reads it."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from inspector.worker.archive import TMP_PREFIX, Archive, entry_name, list_entries, scan
from inspector.cli import main
from inspector.wire import Result

from .conftest import REPO
from .test_worker import Line, config, line_setup  # noqa: F401  (line_setup is a fixture)

PIXELS = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 KB as PNG: noise
HEAT = np.linspace(0, 2, 64 * 64, dtype=np.float32).reshape(64, 64)
WAIT_S = 30.0  # generous for a loaded 2-core machine; the archive is done in milliseconds when healthy


def result(frame_id: str, verdict: str = "fail", product: str = "valve-a") -> Result:
    return Result(frame_id=frame_id, camera="cam1", line="7", verdict=verdict, reason="anomaly" if verdict == "fail" else None,
                  model="m", bank_epoch=1, ts_ns=1, done_ns=2, score=1.5, threshold=1.0, product=product)


def drain(archive: Archive) -> None:
    end = time.monotonic() + WAIT_S
    while archive.pending() and time.monotonic() < end:
        time.sleep(0.01)
    archive.stop()


def test_a_burst_keeps_the_size_bound_and_the_newest_entries(tmp_path: Path) -> None:
    probe = Archive(tmp_path / "probe", 1 << 30, 1e9).start()
    probe.offer(result("probe"), PIXELS, HEAT)
    drain(probe)
    per_entry = probe.nbytes
    bound = 10 * per_entry + per_entry // 2  # room for 10 entries
    lost: list[str] = []
    archive = Archive(tmp_path / "a", bound, 1e9, lost=lost.append, queue_size=200).start()
    queued = sum(archive.offer(result(f"f{i:03d}"), PIXELS, HEAT) for i in range(120))
    drain(archive)
    on_disk = scan(tmp_path / "a")
    assert queued == 120 and not lost and archive.written == 120
    assert len(on_disk) == 10 and sum(e.nbytes for e in on_disk) <= bound  # the size bound holds
    assert [e.result()["frame_id"] for e in on_disk] == [f"f{i:03d}" for i in range(110, 120)]  # the newest stay
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(TMP_PREFIX)]
    names = {p.name for p in on_disk[-1].path.iterdir()}
    assert names == {"result.json", "frame.png", "heatmap.png"}


def test_the_age_bound_removes_old_entries_and_a_full_queue_is_counted(tmp_path: Path) -> None:
    now = [10**18]
    archive = Archive(tmp_path, 1 << 30, max_age_s=60, clock_ns=lambda: now[0]).start()
    archive.offer(result("old"), PIXELS, None)
    drain(archive)
    now[0] += 61 * 10**9
    archive = Archive(tmp_path, 1 << 30, max_age_s=60, clock_ns=lambda: now[0]).start()  # a restart rescans
    assert archive.entries == 1
    archive.offer(result("new"), PIXELS, None)
    drain(archive)
    assert [r["frame_id"] for _, r in list_entries(tmp_path)] == ["new"]
    full = Archive(tmp_path / "q", 1 << 30, 1e9, queue_size=1)  # not started: nothing drains the queue
    assert full.offer(result("a"), PIXELS, None) and not full.offer(result("b"), PIXELS, None)
    assert full.lost == {"queue_full": 1}


def test_passed_errors_and_drops_are_kept_only_as_configured(tmp_path: Path) -> None:
    archive = Archive(tmp_path, 1 << 30, 1e9, sample_passed=0.0)
    assert not archive.offer(result("p", "pass"), PIXELS, None)
    assert not archive.offer(result("e", "error"), None, None) and not archive.offer(result("d", "dropped"), None, None)
    every = Archive(tmp_path / "all", 1 << 30, 1e9, sample_passed=1.0)
    assert every.offer(result("p", "pass"), PIXELS, None)
    assert entry_name(5, "a/../b c") == "00000000000000000005-a_.._b_c"  # an untrusted id never leaves the archive


def test_an_unusable_directory_costs_entries_never_an_exception(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    lost: list[str] = []
    archive = Archive(tmp_path / "file" / "archive", 1 << 20, 1e9, lost=lost.append).start()
    for i in range(3):
        archive.offer(result(f"x{i}"), PIXELS, HEAT)
    drain(archive)
    assert archive.written == 0 and lost == ["enotdir"] * 3


def test_a_full_disk_costs_entries_only(tmp_path: Path) -> None:
    """A file-size limit makes every write past 2 KB fail (EFBIG) as a full disk would: entries
    are lost and counted, nothing half-written stays, and the process carries on."""
    script = textwrap.dedent(f"""
        import json, resource, signal, sys, time
        import numpy as np
        sys.path.insert(0, {str(REPO)!r})
        from inspector.worker.archive import Archive
        from tests.test_archive import PIXELS, HEAT, result
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        a = Archive({str(tmp_path / "a")!r}, 1 << 20, 1e9).start()
        for i in range(4):
            a.offer(result(f"f{{i}}"), PIXELS, HEAT)
        while a.pending():
            time.sleep(0.01)
        a.stop()
        print(json.dumps({{"written": a.written, "lost": a.lost}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"written": 0, "lost": {"efbig": 4}}
    assert list((tmp_path / "a").iterdir()) == []  # no entry, no temporary directory left


def test_a_worker_archives_what_it_judged_and_the_cli_reads_it(line_setup, tmp_path: Path, capsys) -> None:  # noqa: F811
    root = tmp_path / "archive"
    ln = Line(config(line_setup, **{"archive.dir": str(root), "archive.sample_passed": 1.0}))
    try:
        for i in range(6):
            ln.send(f"a{i}", product="valve-a")
        got = ln.results(6)
        results = {r.frame_id: r for r, _ in got}
        published_png = {r.frame_id: png for r, png in got}
        assert sorted(results) == [f"a{i}" for i in range(6)]
        end = time.monotonic() + WAIT_S
        while len(scan(root)) < 6 and time.monotonic() < end:
            time.sleep(0.05)
        archived = {r["frame_id"]: r for _, r in list_entries(root)}
        assert sorted(archived) == sorted(results)  # every judged frame (passes sampled at 1.0)
        for fid, r in results.items():
            assert archived[fid]["verdict"] == r.verdict and archived[fid]["score"] == pytest.approx(r.score)
        for entry, r in list_entries(root):  # the heatmap as published (the line sends all heatmaps)
            assert (entry.path / "heatmap.png").read_bytes() == published_png[r["frame_id"]]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{ln.worker.health.port}/metrics", timeout=5).read().decode()
        assert "inspector_archive_written_total 6.0" in metrics
    finally:
        ln.close()
    capsys.readouterr()
    assert main(["archive", "list", "--dir", str(root), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["frame_id"] for r in listed) == sorted(results)
    assert main(["archive", "show", "--dir", str(root), "a3"]) == 0 and "frame.png" in capsys.readouterr().out
    assert main(["archive", "show", "--dir", str(root), "nope"]) == 1
    assert main(["archive", "export", "--dir", str(root), "--out", str(tmp_path / "x.tar"), "a1", "a2"]) == 0
    with tarfile.open(tmp_path / "x.tar") as tar:
        assert sorted({m.name.split("/")[0].split("-", 1)[1] for m in tar.getmembers()}) == ["a1", "a2"]
    assert main(["archive", "list", "--dir", str(tmp_path / "missing")]) == 2
    # an operator confirms an archived frame good: it joins valve-a's normal set, exactly as served
    from inspector.banks import open_store

    store_url = f"file://{line_setup / 'banks'}"
    store = open_store(store_url)
    before = store.normal("7", "valve-a")
    bank = ["bank", "feedback", "--line", "7", "--product", "valve-a", "--store", store_url,
            "--artifact", str(line_setup / "model")]
    assert main([*bank, "--archived", "a1", "--archive-dir", str(root)]) == 0
    after = store.normal("7", "valve-a")
    assert after.count == (before.count if before else 3) + 1 and after.source == "feedback"
    assert main([*bank, "--archived", "nope", "--archive-dir", str(root)]) == 2  # not archived: nothing written
    assert main([*bank, "--archived", "a1"]) == 2  # no --archive-dir
    assert main(bank) == 2  # neither --good nor --archived
    other = ["bank", "feedback", "--line", "7", "--product", "valve-b", "--store", store_url,
             "--artifact", str(line_setup / "model"), "--archived", "a2", "--archive-dir", str(root)]
    assert main(other) == 2 and "judged as 'valve-a'" in capsys.readouterr().err  # another product's frame
    assert store.normal("7", "valve-a").revision == after.revision
    store.close()


def test_a_worker_with_an_unusable_archive_publishes_every_result(line_setup, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "file").write_text("x")
    ln = Line(config(line_setup, **{"archive.dir": str(tmp_path / "file" / "archive"), "archive.sample_passed": 1.0}))
    try:
        for i in range(4):
            ln.send(f"u{i}", product="valve-a")
        assert sorted(r.frame_id for r, _ in ln.results(4)) == [f"u{i}" for i in range(4)]
        end = time.monotonic() + WAIT_S
        metrics = ""
        while 'inspector_archive_lost_total{reason="enotdir"} 4.0' not in metrics and time.monotonic() < end:
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ln.worker.health.port}/metrics", timeout=5).read().decode()
            time.sleep(0.05)
        assert 'inspector_archive_lost_total{reason="enotdir"} 4.0' in metrics
    finally:
        ln.close()
