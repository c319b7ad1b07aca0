"""The live line page's HTML: one self-contained document, no build step, no external assets.

It polls ``/live/state.json`` every second and redraws; every value from the network goes into
the page through ``textContent`` or attributes, never as HTML (frame ids and product names come
from cameras and operators).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Inspector: live line</title>
<link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px} h2{font-size:16px;margin:16px 0 6px}
table{border-collapse:collapse} td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}
.ok{color:#080}.bad{color:#b00}.muted{color:#777}
#frames{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #ccc;padding:6px;width:260px}
figure img{width:256px;height:256px;display:block;background:#eee}
figcaption{font-size:13px;margin-top:4px}
button{margin-top:4px}
</style></head>
<body>
<h1>Inspector line <span id="line">?</span>: <span id="ready">connecting</span></h1>
<div id="summary" class="muted"></div>
<h2>Products (last <span id="window">?</span> minutes)</h2>
<table><thead><tr><th>product</th><th>pass</th><th>fail</th><th>other</th><th>fail rate</th>
<th>statistics from</th><th>scores</th><th>state</th></tr></thead><tbody id="products"></tbody></table>
<h2>Latency end to end</h2><div id="latency" class="muted">no results yet</div>
<h2>Recent failed frames</h2>
<p id="feedback-note" class="muted"></p>
<div id="frames"></div>
<p id="error" class="bad"></p>
<script>
"use strict";
let shown = -1;
function cell(row, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; row.appendChild(td); }
function fmt(x, digits) { return (x === null || x === undefined) ? "-" : Number(x).toFixed(digits); }
async function confirmGood(frameId, button) {
  button.disabled = true;
  try {
    const r = await fetch("/live/feedback", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({frame_id: frameId})});
    const body = await r.json();
    button.textContent = r.ok ? "confirmed good" : ("refused: " + body.error);
  } catch (e) { button.textContent = "failed: " + e; button.disabled = false; }
}
function draw(s) {
  const st = s.status || {};
  document.getElementById("line").textContent = st.line || "?";
  const ready = document.getElementById("ready");
  ready.textContent = st.status || "?"; ready.className = st.status === "ready" ? "ok" : "bad";
  document.getElementById("summary").textContent =
    "model " + (st.model || "?") + " | bank epoch " + st.bank_epoch + " | line threshold " + fmt(st.threshold, 3) +
    " | results seen " + s.seq;
  document.getElementById("window").textContent = s.window_min;
  const cal = st.calibration || {};
  const names = Array.from(new Set(Object.keys(s.products).concat(st.products || []))).sort();
  const body = document.getElementById("products"); body.replaceChildren();
  for (const p of names) {
    const row = document.createElement("tr"); row.dataset.product = p;
    const c = (s.products[p] || {}).counts || {}; const k = cal[p] || {};
    const other = Object.entries(c).filter(([v]) => v !== "pass" && v !== "fail").reduce((a, [, n]) => a + n, 0);
    cell(row, p); cell(row, c.pass || 0, "ok"); cell(row, c.fail || 0, "bad"); cell(row, other);
    const rate = (s.products[p] || {}).fail_rate;
    cell(row, rate === null || rate === undefined ? "-" : (100 * rate).toFixed(1) + "%");
    cell(row, k.source || "-"); cell(row, k.count === undefined ? "-" : k.count);
    cell(row, k.frozen ? "FROZEN" : (k.thin ? "thin" : (k.source ? "ok" : "-")), k.frozen ? "bad" : "");
    body.appendChild(row);
  }
  const lat = s.latency_ms;
  document.getElementById("latency").textContent = lat.n ?
    "p50 " + lat.p50 + " ms, p95 " + lat.p95 + " ms, p99 " + lat.p99 + " ms over the last " + lat.n + " results" : "no results yet";
  document.getElementById("feedback-note").textContent = s.feedback ?
    "\\"This part is good\\" adds the frame's score to its product's normal statistics (anyone who can reach this page can do it)." :
    "Confirming parts is off on this line ([live] feedback = false).";
  if (s.seq === shown) return;
  shown = s.seq;
  const frames = document.getElementById("frames"); frames.replaceChildren();
  for (const f of s.failed) {
    const fig = document.createElement("figure"); fig.dataset.frameId = f.frame_id;
    if (f.has_image) {
      const img = document.createElement("img"); img.alt = "heatmap overlay of " + f.frame_id;
      img.src = "/live/frames/" + encodeURIComponent(f.frame_id) + "/overlay.png"; fig.appendChild(img);
    }
    const cap = document.createElement("figcaption");
    cap.textContent = f.frame_id + " | " + (f.product || "no product") + " | score " + fmt(f.score, 3) +
      " / threshold " + fmt(f.threshold, 3) + (f.reason ? " | " + f.reason : "") +
      " | " + new Date(f.ts_ns / 1e6).toLocaleTimeString();
    fig.appendChild(cap);
    if (s.feedback && f.product) {
      const b = document.createElement("button"); b.textContent = f.confirmed ? "confirmed good" : "this part is good";
      b.disabled = f.confirmed; b.onclick = () => confirmGood(f.frame_id, b); fig.appendChild(b);
    }
    frames.appendChild(fig);
  }
}
async function poll() {
  try {
    const r = await fetch("/live/state.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    draw(await r.json());
    document.getElementById("error").textContent = "";
  } catch (e) { document.getElementById("error").textContent = "worker unreachable: " + e.message; }
  setTimeout(poll, 1000);
}
poll();
</script>
</body></html>
"""
