"""The worker, stage by stage (``inspector run``)::

    ingest.py      ZeroMQ PULL, header checks, decode pool -> batcher.py  bounded queue, micro-batches
    loop.py        the worker: batches, deadlines, engine.py (model on a bank snapshot), calibration.py
                   (each product's statistics and bank growth from the stream) -> publish.py (PUB and
                   heatmaps; finishes each result) -> stream.py (Redis results stream and heartbeat)
    metrics.py     Prometheus metrics and the health server; notify.py systemd readiness and watchdog
    live.py        the live line page (live_page.py its HTML); archive.py the failed-frame archive

Import what you use from its module (``inspector.worker.loop.Worker``,
``inspector.worker.engine.Engine``); this package imports nothing at start-up, so the engine can
be used without the worker's sockets.
"""
