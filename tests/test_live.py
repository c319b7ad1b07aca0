"""The live line page: its state, its HTTP routes on a real worker, and the page in a real
headless Chromium (driven over the DevTools protocol)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.banks import open_store
from inspector.worker.live import FeedbackError, LiveState
from inspector.wire import Latency, Result

from .conftest import REPO
from .test_worker import Line, config, line_setup  # noqa: F401  (line_setup is a fixture)

WAIT_S = 30.0  # generous for a loaded 2-core machine; each step takes well under a second when healthy
PIXELS = np.full((64, 64, 3), 100, dtype=np.uint8)


def result(frame_id: str, verdict: str = "fail", product: str | None = "valve-a", total_ms: float = 10.0) -> Result:
    return Result(frame_id=frame_id, camera="cam1", line="7", verdict=verdict, reason="anomaly" if verdict == "fail" else None,
                  model="m", bank_epoch=1, ts_ns=1, done_ns=2, score=1.5, threshold=1.2, product=product,
                  latency_ms=Latency(total=total_ms))


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_state_counts_recent_minutes_and_keeps_a_bounded_set_of_failed_frames() -> None:
    clock = Clock()
    live = LiveState(3, 2, lambda: {"line": "7"}, clock=clock)
    for i in range(5):
        live.observe(result(f"f{i}", total_ms=float(i)), PIXELS, np.ones((64, 64), np.float32), 0.3, 1)
    live.observe(result("p0", "pass"))
    s = live.state()
    assert s["products"]["valve-a"]["counts"] == {"fail": 5, "pass": 1}
    assert s["products"]["valve-a"]["fail_rate"] == pytest.approx(5 / 6)
    assert [f["frame_id"] for f in s["failed"]] == ["f4", "f3", "f2"]  # newest first, 3 kept
    assert s["latency_ms"]["n"] == 6 and s["latency_ms"]["p50"] == pytest.approx(2.5)
    assert live.image("f0", "frame") is None  # dropped out of the page
    overlay = Image.open(io.BytesIO(live.image("f4", "overlay")))
    assert overlay.size == (64, 64) and overlay.getpixel((0, 0))[0] > overlay.getpixel((0, 0))[1]  # red where high
    clock.t += 2 * 60  # two minutes later the window (2 min) no longer holds those counts
    live.observe(result("p1", "pass", product="valve-b"))
    assert set(live.state()["products"]) == {"valve-b"}


def test_feedback_is_off_by_default_and_refuses_what_it_cannot_apply() -> None:
    off = LiveState(4, 15, dict)
    off.observe(result("f1"), PIXELS, None, 0.3, 1)
    with pytest.raises(FeedbackError) as err:
        off.feedback("f1")
    assert err.value.status == 403 and "[live] feedback = true" in str(err.value)
    calls = []
    on = LiveState(4, 15, dict, lambda p, raw, v: calls.append((p, raw, v)) or {"count": 31})
    on.observe(result("f1"), PIXELS, None, 0.3, 1)
    on.observe(result("f2", product=None), PIXELS, None, None, None)  # failed unrouted: no score to learn
    for frame_id, status in (("nope", 404), ("f2", 422)):
        with pytest.raises(FeedbackError) as err:
            on.feedback(frame_id)
        assert err.value.status == status
    assert on.feedback("f1") == {"frame_id": "f1", "product": "valve-a", "count": 31}
    assert calls == [("valve-a", 0.3, 1)]
    with pytest.raises(FeedbackError) as err:
        on.feedback("f1")  # once per frame
    assert err.value.status == 409 and len(calls) == 1


def http(port: int, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_state(port: int, done, what: str) -> dict:
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        state = json.loads(http(port, "/live/state.json")[1])
        if done(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"the live page never showed {what}: {state}")


# every frame fails at threshold 0 (scores are positive): the page has failed frames to show
FAILING = {"engine.threshold": 0.0}


def test_a_worker_serves_the_page_its_state_and_failed_frames(line_setup) -> None:  # noqa: F811
    ln = Line(config(line_setup, **FAILING))
    try:
        port = ln.worker.health.port
        for i in range(4):
            ln.send(f"w{i}", product="valve-a" if i % 2 else "valve-b")
        assert all(r.verdict == "fail" for r, _ in ln.results(4))
        status, page = http(port, "/")
        assert status == 200 and b"/live/state.json" in page
        state = wait_state(port, lambda s: len(s["failed"]) >= 4, "4 failed frames")
        assert state["status"]["status"] == "ready" and set(state["status"]["products"]) == {"valve-a", "valve-b"}
        assert state["status"]["calibration"]["valve-a"]["source"] == "registration"
        assert state["products"]["valve-a"]["counts"]["fail"] == 2 and not state["feedback"]
        status, png = http(port, "/live/frames/w1/overlay.png")
        assert status == 200 and Image.open(io.BytesIO(png)).size == (64, 64)
        assert http(port, "/live/frames/nope/overlay.png")[0] == 404
        assert http(port, "/live/frames/w1/other.png")[0] == 404
        status, body = http(port, "/live/feedback", json.dumps({"frame_id": "w1"}).encode())
        assert status == 403 and "feedback" in json.loads(body)["error"]  # off unless the line config enables it
    finally:
        ln.close()


def test_this_part_is_good_from_the_page_re_measures_the_product(line_setup, tmp_path: Path) -> None:  # noqa: F811
    banks = tmp_path / "banks"
    shutil.copytree(line_setup / "banks", banks)
    ln = Line(config(line_setup, **FAILING, **{"live.feedback": True, "banks.store": f"file://{banks}"}))
    store = open_store(f"file://{banks}")
    try:
        port = ln.worker.health.port
        ln.send("g1", product="valve-a")
        (r, _), = ln.results(1)
        wait_state(port, lambda s: any(f["frame_id"] == "g1" for f in s["failed"]), "frame g1")
        before = store.normal("7", "valve-a")
        for bad, want in ((b"not json", 400), (json.dumps({"frame": "g1"}).encode(), 400),
                          (b"{" + b" " * 5000 + b"}", 413), (json.dumps({"frame_id": "zz"}).encode(), 404)):
            status, _ = http(port, "/live/feedback", bad)
            assert status == want, bad[:20]
        assert store.normal("7", "valve-a") == before  # refused requests wrote nothing
        status, body = http(port, "/live/feedback", json.dumps({"frame_id": "g1"}).encode())
        assert status == 200, body
        after = store.normal("7", "valve-a")
        assert after.source == "feedback" and after.count == (before.count if before else 3) + 1
        # the raw score the engine computed for the frame against valve-a's bank joined the sample
        # (not its calibrated score, and nothing scored again)
        engine_raw = next(f.raw_score for f in ln.worker.live._failed if f.result.frame_id == "g1")
        assert after.feedback == [pytest.approx(engine_raw, rel=1e-6)] and engine_raw != pytest.approx(r.score)
        assert http(port, "/live/feedback", json.dumps({"frame_id": "g1"}).encode())[0] == 409
    finally:
        ln.close()
        store.close()


# -- a real browser --------------------------------------------------------------------------------
def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class DevTools:
    """A headless Chromium page over the DevTools protocol (the websocket the browser opens)."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        browser_ws = None
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end and browser_ws is None:
            line = self.proc.stderr.readline()
            if "DevTools listening on " in line:
                browser_ws = line.split("DevTools listening on ", 1)[1].strip()
        assert browser_ws, "Chromium did not open its DevTools port"
        port = int(browser_ws.split(":")[2].split("/")[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26, open_timeout=WAIT_S).__enter__()
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=WAIT_S))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")

    def wait(self, expression: str, what: str):
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never showed {what}")

    def errors(self) -> list[dict]:
        bad = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown" or (m == "Runtime.consoleAPICalled" and p.get("type") == "error") \
                    or (m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error"):
                bad.append(e)
        return bad

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.mark.slow
def test_the_page_in_a_real_browser_shows_products_heatmaps_and_updates(line_setup, tmp_path: Path) -> None:  # noqa: F811
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on PATH: `apt-get install chromium` (scripts/test.sh installs it when run as root)")
    ln = Line(config(line_setup, **FAILING, **{"live.feedback": True}))
    browser = DevTools(binary, tmp_path / "profile")
    try:
        for i in range(3):
            ln.send(f"b{i}", product="valve-a")
        ln.results(3)
        browser.call("Page.navigate", url=f"http://127.0.0.1:{ln.worker.health.port}/")
        browser.wait("document.getElementById('ready').textContent === 'ready'", "the worker ready")
        products = browser.wait("Array.from(document.querySelectorAll('#products tr')).map(r => r.dataset.product)"
                                ".join(',') || null", "the products")
        assert products == "(no product),valve-a,valve-b"  # the handshake probes are errors of no product
        browser.wait("document.querySelectorAll('#frames figure').length === 3 && Array.from("
                     "document.querySelectorAll('#frames img')).every(i => i.complete && i.naturalWidth === 64)",
                     "3 failed frames with their heatmap overlays loaded")
        ln.send("b3", product="valve-b")  # a new result arrives: the page updates by itself
        ln.results(1)
        browser.wait("document.querySelector('#frames figure').dataset.frameId === 'b3'", "the new failed frame")
        browser.wait("document.querySelector('#products tr[data-product=valve-b]').children[2].textContent === '1'",
                     "valve-b's fail count")
        browser.eval("document.querySelector('#frames figure button').click()")  # "this part is good" on b3
        browser.wait("document.querySelector('#frames figure button').textContent === 'confirmed good'", "the confirmation")
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        out = Path(os.environ.get("INSPECTOR_LIVE_SCREENSHOT", tmp_path / "live.png"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(shot)
        assert Image.open(io.BytesIO(shot)).size[0] > 0
        assert browser.errors() == [], browser.errors()
    finally:
        browser.close()
        ln.close()


def test_readme_shows_the_page_screenshot() -> None:
    assert "docs/live-page.png" in (REPO / "README.md").read_text() and (REPO / "docs" / "live-page.png").exists()
