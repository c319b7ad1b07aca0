"""Helpers the tests, the benchmarks and the demo share: a free port, a Redis server of their
own, waiting for a worker to serve, and a default untrained artifact.

Nothing here is used by the worker itself. Every wait is bounded and ends on an event (a reply,
a PONG), never on a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

REDIS_START_TIMEOUT_S = 10.0  # redis-server starts in milliseconds; this only bounds a broken install
PROBE_REPLY_MS = 500  # one probe's wait for its error result before the next probe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port; it can be stopped and started again
    on the same port. Append-only persistence in ``directory`` keeps its data across a restart,
    as a production Redis with persistence would.
    """

    def __init__(self, directory: Path, fsync_always: bool = True) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH: install Redis (apt-get install redis-server)")
        self.dir = Path(directory)
        self.port = free_port()
        self.fsync_always = fsync_always
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        """Start the server and return once it answers PING (RuntimeError if it never does)."""
        fsync = ["--appendfsync", "always"] if self.fsync_always else []
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", *fsync, "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)  # nothing to wait on before the socket is bound
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=REDIS_START_TIMEOUT_S)
            self.proc = None


def wait_for_worker(push: Any, sub: Any, timeout_s: float, alive: Callable[[], bool] | None = None,
                    why_dead: Callable[[], str] | None = None) -> None:
    """Return once a worker serves: a one-part probe message is answered with an error result.

    Args:
        push: a connected ZeroMQ PUSH socket to the worker's ingest.
        sub: a ZeroMQ SUB socket subscribed to the worker's results; answers to the probes are
            read off it before returning.
        timeout_s: the bound on start-up (model load and warm-up on a slow machine).
        alive: returns False once the worker process is gone (then RuntimeError at once).
        why_dead: text for that error (for example the tail of the worker's log).
    """
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if alive is not None and not alive():
            raise RuntimeError("the worker exited during start-up" + (f":\n{why_dead()}" if why_dead else ""))
        push.send_multipart([b"probe"])
        if sub.poll(PROBE_REPLY_MS):
            while sub.poll(PROBE_REPLY_MS // 2):
                sub.recv_multipart()
            return
    raise RuntimeError(f"the worker did not answer within {timeout_s:.0f} s of start-up")


def default_artifact(path: Path, input_size: int | None = None, weights: Path | None = None,
                     **score: Any) -> Path:
    """Save the default model (untrained flows and heads) as an artifact at ``path``.

    Args:
        input_size: backbone input size (default: the config's).
        weights: a pretrained backbone file, used when it exists (else random backbone weights).
        score: ``ScoreConfig`` fields to override.
    """
    from .model import ModelConfig

    cfg = ModelConfig()
    if input_size is not None:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, input_size=input_size))
    if score:
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, **score))
    return config_artifact(cfg, path, weights)


def config_artifact(cfg: Any, path: Path, weights: Path | None = None) -> Path:
    """Save a model of ``cfg`` (untrained flows and heads, seed 0) as an artifact at ``path``, with
    the pretrained backbone ``weights`` when that file exists (else random backbone weights)."""
    import torch

    from .artifact import save_artifact
    from .model import InspectionModel, load_backbone_weights

    torch.manual_seed(0)
    model = InspectionModel(cfg).eval()
    sha = load_backbone_weights(model.backbone, weights) if weights is not None and Path(weights).is_file() else None
    save_artifact(model, path, sha)
    return Path(path)
