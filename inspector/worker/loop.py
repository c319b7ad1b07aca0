"""``inspector run --line N``: the streaming worker's lifecycle (DESIGN sections 6 and 9).

::

    camera --PUSH--> [ingest: PULL, validate] -> FrameQueue -> [decode pool]
        -> [this loop: micro-batch, deadlines, engine] -> [publisher: PUB, stream, metrics]
    bank store --(poll + notice)--> [bank watcher] -> snapshot swapped between batches

Every frame received gets exactly one result: ``error`` (ingest or decode), ``dropped``
(overload, or a blocked queue at shutdown), ``timeout`` (past its deadline when dequeued), or
``pass`` / ``fail`` from the engine; an engine failure on a batch gives each of its frames an
``error`` with reason ``engine_error`` and the worker keeps serving.

Lifecycle: load the model (a mismatch is fatal: non-zero exit so systemd restarts or an operator
looks), load the banks, warm up at every configured batch size, then ``/readyz`` turns 200 and
``READY=1`` goes to systemd. The first SIGTERM or SIGINT stops ingest, finishes every accepted
frame, publishes its result and exits 0; a second one exits at once with status 1.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
import zmq

from ..artifact import load_artifact
from ..banks import BankSnapshot, BankWatcher, RedisStore, build_snapshot, open_configured_store
from ..banks.record import BankMeta
from .batcher import FrameQueue, Job
from ..config import WorkerConfig, redacted
from .engine import Engine, EngineSettings
from ..model.bank import bank_capacity
from .metrics import HealthServer, WorkerMetrics
from ..model.bank import build_bank
from .notify import Notifier
from .publish import Outgoing, Publisher
from .stream import StreamWriter
from ..wire import (DEADLINE_EXCEEDED, DECODE_FAILED, DROPPED, ENGINE_ERROR, ERROR, MIB, OVERLOAD, SHUTDOWN, TIMEOUT,
                   Latency, Result, WireError)

if TYPE_CHECKING:
    from .archive import Archive
    from .live import LiveState

SECONDS_PER_DAY = 86_400
LOOP_POLL_S = 0.25  # the loop wakes this often without frames: watchdog pings and stop checks
STATS_EVERY_S = 60.0  # aggregate log line: frames are never logged one by one on the hot path
EXIT_SECOND_SIGNAL = 1
# Epoch on the wire while no bank set has been loaded (the store was unreachable at start): the
# wire's epoch is non-negative, and 0 is what a line with nothing registered reports anyway.
NO_BANKS_EPOCH = 0


def wire_epoch(snapshot: BankSnapshot) -> int:
    """The bank epoch a result reports for ``snapshot`` (never the watcher's -1 before a first load)."""
    return max(snapshot.epoch, NO_BANKS_EPOCH)


class Worker:
    """One line's worker. ``run()`` blocks until stopped; ``stop()`` may be called from any thread.

    Args:
        cfg: the resolved configuration.
        install_signals: handle SIGTERM/SIGINT (only from the main thread; tests drive ``stop``).
        env: environment for ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC``.
    """

    def __init__(self, cfg: WorkerConfig, install_signals: bool = True, env: dict | None = None) -> None:
        self.cfg = cfg
        self.install_signals = install_signals
        self.log = structlog.get_logger("inspector.worker").bind(line=cfg.line)
        self.metrics = WorkerMetrics()
        self.notifier = Notifier(env)
        self.health: HealthServer | None = None
        self._stop = threading.Event()
        self._signals = 0
        self.processed = 0
        self.status = "starting"
        self._ingest_stopped = threading.Event()

    # -- start-up --------------------------------------------------------------------------
    def _start_http(self) -> None:
        if self.cfg.http.port == 0 and self.cfg.http.bind == "":
            return
        self.health = HealthServer(self.cfg.http, self.metrics).start()
        self.health.set_ready(False, "starting: loading the model")

    def _load(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        model, card = load_artifact(cfg.engine.artifact)
        e = cfg.engine
        sizes = tuple(sorted(set(e.batch_sizes) | {cfg.batch.max_batch}))
        self.engine = Engine(model, card, EngineSettings.from_config(e, sizes, cfg.banks.capacity_products))
        self.card = card
        self.metrics.set_info(cfg.line, card.model_id)
        self.log = self.log.bind(model=card.model_id)
        self.log.info("model_loaded", artifact=e.artifact, device=str(self.engine.device), backend=e.backend,
                      threshold=self.engine.threshold, calibration=self.engine.calibration,
                      min_route_similarity=self.engine.min_route_similarity,
                      seconds=round(time.perf_counter() - t0, 2))
        b = cfg.banks
        self.store = open_configured_store(b)
        capacity = bank_capacity(model)
        self.watcher = BankWatcher(self.store, cfg.line, card.signature, model.channels, capacity,
                                   b.capacity_products, b.poll_interval_s, on_event=self._bank_event)
        self.watcher.start(initial_timeout=b.poll_interval_s)
        from .calibration import LineCalibration

        self.calibration = LineCalibration(cfg.calibration, self.store, cfg.line, self.metrics, self.log,
                                           model=self.engine.model)

    def _bank_event(self, event: str, **fields: Any) -> None:
        if event == "bank_swapped":
            self.metrics.set_bank(fields["epoch"], len(fields["products"]))
        elif event == "bank_refused":
            self.metrics.bank_refused(fields.get("reason", ""))

    def _warm_up(self) -> None:
        """Run every batch size once on a synthetic bank so the first real batch is not slow."""
        model = self.engine.model
        feats = [torch.randn(1, c, h, w) for c, (h, w) in zip(model.channels, model.grids)]
        bank = build_bank(feats, model.cfg.bank.coreset).with_stats(0.0, 1.0)  # within any capacity
        meta = BankMeta("warmup", "", 1, [], [list(f.shape) for f in bank.features], 0.0, 1.0, "", "")
        snap = build_snapshot(0, {"warmup": (bank, meta)}, self.watcher.capacity, self.cfg.banks.capacity_products)
        size = model.input_size
        t0 = time.perf_counter()
        for n in sorted(set(self.cfg.engine.batch_sizes) | {self.cfg.batch.max_batch}):
            self.engine.infer(np.zeros((n, size, size, 3), np.uint8), [None] * n, snap)
        self.log.info("warmed_up", batch_sizes=sorted(set(self.cfg.engine.batch_sizes) | {self.cfg.batch.max_batch}),
                      seconds=round(time.perf_counter() - t0, 2))

    def _start_io(self) -> None:
        cfg = self.cfg
        self.context = zmq.Context()
        self.queue = FrameQueue(cfg.ingest.queue_size, cfg.ingest.overload)
        self.pool = ThreadPoolExecutor(cfg.ingest.decode_workers, thread_name_prefix="decode")
        self.stream = self._stream()
        from ..security import curve_configurer  # CURVE keys, when configured

        server_side = curve_configurer(cfg.ingest, self.context)
        self.archive = self._archive()
        self.live = self._live()
        self.publisher = Publisher(self.context, cfg.publish.bind, cfg.publish.sndhwm, cfg.publish.heatmaps,
                                   cfg.publish.heatmap_scale, self.metrics, self.stream, server_side,
                                   self.archive, self.live).start()
        from .ingest import Ingest

        self.ingest = Ingest(self.context, cfg.ingest, self.queue, self.pool, self.engine.input_size,
                             cfg.batch.deadline_ms, self._reject, self._dropped, server_side)
        self.metrics.count_received(lambda: self.ingest.received)

    def _stream(self) -> StreamWriter | None:
        b = self.cfg.banks
        if not isinstance(self.store, RedisStore):
            self.log.info("results_stream_disabled", reason="bank store is not Redis")
            return None
        p = self.cfg.publish
        return StreamWriter(self.store.client, b.prefix, self.cfg.line, p.stream_maxlen, p.stream_buffer,
                            p.heartbeat_ttl_s, self.metrics, self._heartbeat).start()

    def _archive(self) -> "Archive | None":
        """The failed-frame archive, when the line config names a directory."""
        a = self.cfg.archive
        if a.dir is None:
            return None
        from .archive import Archive

        archive = Archive(a.dir, int(a.max_mb * MIB), a.max_age_days * SECONDS_PER_DAY, a.sample_passed,
                          self.cfg.publish.heatmap_scale, self.metrics.archive_lost, a.queue_size,
                          written=self.metrics.archive_written).start()
        self.log.info("archive_started", dir=a.dir, entries=archive.entries, mb=round(archive.nbytes / MIB, 1))
        return archive

    def _live(self) -> "LiveState | None":
        """The live page's state, when the HTTP server runs (it serves the page)."""
        if self.health is None:
            return None
        from .live import LiveState

        lv = self.cfg.live
        live = LiveState(lv.recent_failed, lv.window_min, self._page_status, self._confirm_good if lv.feedback else None)
        self.health.live = live
        return live

    def _page_status(self) -> dict:
        return {**self._heartbeat(), "threshold": self.engine.threshold}

    def _confirm_good(self, product: str, raw_score: float, bank_version: int) -> dict:
        """The live page's "this part is good": the frame's raw score joins the product's statistics."""
        from ..banks.feedback import confirm_good
        from .live import FeedbackError

        snap = self.watcher.snapshot
        if snap.versions.get(product) != bank_version:
            raise FeedbackError(409, f"{product} was registered again (or removed) since this frame was judged: "
                                     "its score belongs to another bank")
        before, after = confirm_good(self.store, self.cfg.line, snap.metas[product], [raw_score])
        self.log.info("live_feedback", product=product, count=after.count, u=round(after.u, 6),
                      gamma=round(after.gamma, 6), revision=after.revision)
        return {"count": after.count, "before": {"u": before.u, "gamma": before.gamma},
                "after": {"u": after.u, "gamma": after.gamma}}

    def _heartbeat(self) -> dict:
        snap = self.watcher.snapshot
        return {"line": self.cfg.line, "status": self.status, "model": self.card.model_id, "pid": os.getpid(),
                "bank_epoch": snap.epoch, "products": list(snap.products), "processed": self.processed,
                "calibration": self.calibration.summaries(), "time_ns": time.time_ns()}

    # -- results ---------------------------------------------------------------------------
    def _result(self, job: Job, verdict: str, reason: str | None, snapshot: BankSnapshot | None = None,
                **fields: Any) -> Result:
        """A job's result; ``snapshot`` is the bank the frame was scored against (default: the current).
        The publisher finishes it (``done_ns``, the post and total latencies) when it is sent."""
        h = job.header
        epoch = wire_epoch(snapshot if snapshot is not None else self.watcher.snapshot)
        return Result(frame_id=h.frame_id, camera=h.camera, line=self.cfg.line, verdict=verdict, reason=reason,
                      model=self.card.model_id, bank_epoch=epoch, ts_ns=h.ts_ns, done_ns=0, **fields)

    def _reject(self, err: WireError, recv_ns: int) -> None:
        result = Result.for_error(err, self.cfg.line, self.card.model_id, wire_epoch(self.watcher.snapshot), recv_ns)
        self.publisher.submit(Outgoing(result))

    def _dropped(self, job: Job) -> None:
        reason = SHUTDOWN if self._stop.is_set() else OVERLOAD
        self.publisher.submit(Outgoing(self._result(job, DROPPED, reason), recv_s=job.recv_s))

    # -- the loop --------------------------------------------------------------------------
    def start(self) -> "Worker":
        """Everything up to readiness; ``run()`` calls it, tests may call it first."""
        self._start_http()
        self.log.info("worker_starting", config=redacted(self.cfg))
        self._load()
        self._start_io()
        self._warm_up()
        self.ingest.start()
        self.status = "ready"
        if self.stream is not None:
            self.stream.beat_now()
        self.metrics.set_ready(True)
        if self.health is not None:
            self.health.set_ready(True)
        self.notifier.ready(f"serving line {self.cfg.line}")
        self.log.info("worker_ready", ingest=self.ingest.endpoint, publish=self.publisher.endpoint,
                      http=self.health.port if self.health else None, products=list(self.watcher.snapshot.products))
        return self

    def run(self, max_frames: int | None = None) -> int:
        """Serve until stopped (or ``max_frames`` results are produced); return the exit code."""
        if self.install_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        if self.status != "ready":
            self.start()
        watchdog_every = self.notifier.watchdog_interval_s()
        next_ping = 0.0
        next_stats = time.monotonic() + STATS_EVERY_S
        b = self.cfg.batch
        while True:
            now = time.monotonic()
            if now >= next_stats:
                self._log_stats()
                next_stats = now + STATS_EVERY_S
            if self.health is not None:
                self.health.beat()
            if watchdog_every and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + watchdog_every
            if self._stop.is_set() and self.ingest_stopped and len(self.queue) == 0:
                break
            if max_frames is not None and self.processed >= max_frames:
                break
            batch = self.queue.get_batch(b.max_batch, b.max_delay_ms / 1000.0, LOOP_POLL_S)
            self.metrics.set_queue_depth(len(self.queue))
            if batch:
                self._process(batch)
        return self._shutdown()

    @property
    def ingest_stopped(self) -> bool:
        return self._ingest_stopped.is_set()

    def _process(self, batch: list[Job]) -> None:
        dequeued = time.monotonic()
        live: list[Job] = []
        for job in batch:
            job.queue_ms = 1000 * (dequeued - job.recv_s)
            if dequeued > job.deadline_s:
                if job.decoded is not None:
                    job.decoded.cancel()
                self._emit(job, TIMEOUT, DEADLINE_EXCEEDED, job.latency())
                continue
            try:
                job.pixels, job.decode_ms = job.decoded.result()
            except WireError as err:
                self._emit(job, ERROR, err.reason, job.latency())
                continue
            except Exception as err:  # a decoder bug must cost one frame, not the worker
                self.log.error("decode_crashed", frame_id=job.header.frame_id, error=repr(err))
                self._emit(job, ERROR, DECODE_FAILED, job.latency())
                continue
            live.append(job)
        if not live:
            return
        snapshot = self.watcher.snapshot
        t0 = time.monotonic()
        try:
            scored = self.engine.infer(np.stack([j.pixels for j in live]), [j.header.product for j in live],
                                       snapshot, maps=self.cfg.publish.heatmaps != "none",
                                       stats=self.calibration.stats_for(snapshot))
        except Exception as err:  # e.g. out of memory: fail this batch's frames loudly, keep serving
            self.log.error("engine_failed", batch=len(live), error=repr(err))
            for job in live:
                self._emit(job, ERROR, ENGINE_ERROR, Latency(queue=round(job.queue_ms, 3)))
            return
        done = time.monotonic()
        infer_ms = round(1000 * (done - t0), 3)
        self.metrics.observe_batch(len(live))
        self.calibration.observe(snapshot, scored, [j.pixels for j in live])
        for job, s in zip(live, scored):
            result = self._result(job, s.verdict, s.reason, snapshot, score=s.score, threshold=self.engine.threshold,
                                  product=s.product, route_similarity=s.route_similarity,
                                  latency_ms=job.latency(infer_ms))
            self.publisher.submit(Outgoing(result, s.heatmap, job.recv_s, done, job.pixels, s.raw_score,
                                           snapshot.versions.get(s.product) if s.product else None))
            self.processed += 1

    def _log_stats(self) -> None:
        snap = self.watcher.snapshot
        self.log.info("worker_stats", received=self.ingest.received, published=self.publisher.published,
                      verdicts=dict(self.publisher.counts), queued=len(self.queue), bank_epoch=snap.epoch,
                      products=len(snap.products), stream_lost=self.stream.lost if self.stream else 0)

    def _emit(self, job: Job, verdict: str, reason: str, latency: Latency) -> None:
        self.publisher.submit(Outgoing(self._result(job, verdict, reason, latency_ms=latency), recv_s=job.recv_s,
                                       ready_s=time.monotonic()))
        self.processed += 1

    # -- stopping --------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            os._exit(EXIT_SECOND_SIGNAL)  # the operator insists: no drain
        self.stop()

    def stop(self) -> None:
        """Stop ingest now; ``run`` then drains accepted frames and returns."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.status = "stopping"
        if self.stream is not None:
            self.stream.beat_now()
        self.notifier.stopping()
        if self.health is not None:
            self.health.set_ready(False, "stopping")
        threading.Thread(target=self._stop_ingest, name="stop-ingest", daemon=True).start()

    def _stop_ingest(self) -> None:
        self.ingest.stop()
        self._ingest_stopped.set()

    def _shutdown(self) -> int:
        self.log.info("worker_draining", queued=len(self.queue), pending=self.publisher.pending())
        if not self._stop.is_set():
            self._stop.set()
            self._stop_ingest()
        self.ingest.stop()
        for job in self.queue.get_batch(len(self.queue) or 1, 0.0, 0.0):  # frames that arrived after the loop ended
            self._dropped(job)
        self.queue.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.publisher.stop()
        if self.archive is not None:
            self.archive.stop()
        if self.stream is not None:
            self.stream.stop()
        self.watcher.stop()
        self.calibration.close()
        self.store.close()
        if self.health is not None:
            self.health.stop()
        from ..security import stop_authenticators

        stop_authenticators(self.context)  # a running ZAP handler would keep term() waiting forever
        self.context.term()
        counts = self.publisher.counts
        self.log.info("worker_stopped", received=self.ingest.received, published=self.publisher.published,
                      verdicts=counts, stream_lost=self.stream.lost if self.stream else 0)
        return 0
