"""Failed-frame archive: what the worker judged, kept on disk for the line engineer.

With ``[archive] dir`` set, the worker keeps every failed frame (and, with ``sample_passed``, a
random fraction of passed ones) as one directory per frame::

    <dir>/<written_ns>-<frame_id>/result.json   the published result header
    <dir>/<written_ns>-<frame_id>/frame.png     the model's input (resized RGB, lossless: an
                                                 operator can confirm it good with
                                                 ``inspector bank feedback --archived``)
    <dir>/<written_ns>-<frame_id>/heatmap.png   the calibrated map (as published; absent when
                                                 the line computes no heatmaps)

Writing happens on the archive's own thread, fed by a bounded queue the publisher offers to and
never waits on. Entries are written to a hidden temporary directory and renamed into place, so a
reader never sees half an entry. After each write the oldest entries go while the archive holds
more than ``max_mb`` or an entry is older than ``max_age_days``. Anything that goes wrong (a full
queue, a full or read-only disk, a directory that cannot be created) costs archive entries,
counted by reason in ``inspector_archive_lost_total{reason}``, never a result.

``inspector archive list|show|export`` reads an archive (``list_entries``, ``find_entry``,
``export_entries``).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import structlog

from ..decode import encode_heatmap, encode_png
from ..wire import FAIL, PASS, Result

RESULT_FILE, FRAME_FILE, HEATMAP_FILE = "result.json", "frame.png", "heatmap.png"
TMP_PREFIX = ".tmp-"
STOP_POLL_S = 0.1
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_NAME_ID = 64  # characters of the frame id kept in the directory name


@dataclass(frozen=True)
class Entry:
    """One archived frame: its directory, when it was written, its size and its result header."""

    path: Path
    written_ns: int
    nbytes: int

    @property
    def name(self) -> str:
        return self.path.name

    def result(self) -> dict[str, Any]:
        return json.loads((self.path / RESULT_FILE).read_text())


def entry_name(written_ns: int, frame_id: str) -> str:
    """``<written_ns>-<frame_id>`` with anything but ``[A-Za-z0-9_.-]`` replaced (ids are untrusted)."""
    safe = _UNSAFE.sub("_", frame_id)[:MAX_NAME_ID] or "_"
    return f"{written_ns:020d}-{safe}"


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def scan(root: Path) -> list[Entry]:
    """The archive's complete entries, oldest first (temporary directories are left out)."""
    out = []
    for d in Path(root).iterdir():
        head = d.name.split("-", 1)[0]
        if d.is_dir() and not d.name.startswith(TMP_PREFIX) and head.isdigit() and (d / RESULT_FILE).is_file():
            out.append(Entry(d, int(head), _size(d)))
    return sorted(out, key=lambda e: (e.written_ns, e.name))


def _reason(err: OSError) -> str:
    """A bounded label for a failed write: the errno name (``ENOSPC``, ``EACCES``...) or ``os_error``."""
    return errno.errorcode.get(err.errno or 0, "os_error").lower()


class Archive:
    """The worker's failed-frame archive (module docstring).

    Args:
        root: the archive directory (created when missing).
        max_bytes: most bytes of entries kept.
        max_age_s: entries older than this are removed.
        sample_passed: fraction of passed frames kept as well (0 to 1).
        heatmap_scale: the publisher's heatmap scale (the PNG's pixel = value * scale).
        lost: called with a reason for every entry that could not be kept (metrics).
        queue_size: entries waiting to be written; beyond, offers are lost as ``queue_full``.
        clock_ns: wall clock (tests age entries with it).
        written: called after every entry written (metrics).
    """

    def __init__(self, root: str | Path, max_bytes: int, max_age_s: float, sample_passed: float = 0.0,
                 heatmap_scale: float = 64.0, lost: Callable[[str], None] | None = None, queue_size: int = 64,
                 seed: int = 0, clock_ns: Callable[[], int] = time.time_ns,
                 written: Callable[[], None] | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_age_ns = int(max_age_s * 1e9)
        self.sample_passed = sample_passed
        self.scale = heatmap_scale
        self.clock_ns = clock_ns
        self.written = 0
        self.lost: dict[str, int] = {}
        self._on_lost = lost
        self._on_written = written
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._log = structlog.get_logger("inspector.archive")
        self._entries: list[Entry] = []
        self._bytes = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._entries = scan(self.root)
            self._bytes = sum(e.nbytes for e in self._entries)
        except OSError as err:  # the worker serves without an archive; every offer is counted as lost
            self._log.warning("archive_unavailable", dir=str(self.root), error=repr(err))
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)

    def start(self) -> "Archive":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Write what was offered so far (within ``timeout``), then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def pending(self) -> int:
        return self._queue.qsize()

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def offer(self, result: Result, pixels: np.ndarray | None, calibrated: np.ndarray | None,
              heatmap_png: bytes = b"") -> bool:
        """Queue a judged frame for the archive; never blocks. True when it was queued.

        ``heatmap_png`` is the heatmap as published, when the publisher encoded one: it is kept
        as it is; otherwise the archive encodes ``calibrated`` itself (a passed frame on a line
        that publishes heatmaps of failed frames only)."""
        if result.verdict == PASS:
            if self.sample_passed <= 0 or self._rng.random() >= self.sample_passed:
                return False
        elif result.verdict != FAIL or pixels is None:
            return False  # errors, timeouts and drops have no judged pixels
        try:
            self._queue.put_nowait((result, pixels, calibrated, heatmap_png))
        except queue.Full:
            self._lose("queue_full")
            return False
        return True

    def _lose(self, reason: str) -> None:
        self.lost[reason] = self.lost.get(reason, 0) + 1
        if self._on_lost is not None:
            self._on_lost(reason)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=STOP_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            try:
                self._write(*item)
            except OSError as err:
                self._lose(_reason(err))
                self._log.warning("archive_write_failed", frame_id=item[0].frame_id, error=repr(err))
            except Exception as err:  # an archive bug costs the entry, never the worker
                self._lose("error")
                self._log.error("archive_write_crashed", frame_id=item[0].frame_id, error=repr(err))

    def _write(self, result: Result, pixels: np.ndarray, calibrated: np.ndarray | None, heatmap_png: bytes) -> None:
        now = self.clock_ns()
        name = entry_name(now, result.frame_id)
        tmp = self.root / f"{TMP_PREFIX}{name}"
        try:
            tmp.mkdir()
            (tmp / RESULT_FILE).write_bytes(result.to_json())
            (tmp / FRAME_FILE).write_bytes(encode_png(pixels))
            if heatmap_png or calibrated is not None:
                (tmp / HEATMAP_FILE).write_bytes(heatmap_png or encode_heatmap(calibrated, self.scale))
            nbytes = _size(tmp)
            os.rename(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._entries.append(Entry(self.root / name, now, nbytes))
        self._bytes += nbytes
        self.written += 1
        if self._on_written is not None:
            self._on_written()
        self._prune(now)

    def _prune(self, now_ns: int) -> None:
        while self._entries and (self._bytes > self.max_bytes or now_ns - self._entries[0].written_ns > self.max_age_ns):
            old = self._entries.pop(0)
            shutil.rmtree(old.path, ignore_errors=True)
            self._bytes -= old.nbytes


# -- reading -------------------------------------------------------------------------------------
def list_entries(root: str | Path, product: str | None = None, verdict: str | None = None,
                 limit: int | None = None) -> list[tuple[Entry, dict[str, Any]]]:
    """Archived entries with their result headers, newest first, filtered by product and verdict."""
    out = []
    for entry in reversed(scan(Path(root))):
        try:
            result = entry.result()
        except (OSError, ValueError):
            continue  # removed by the worker's pruning while listing, or damaged
        if (product is None or result.get("product") == product) and (verdict is None or result.get("verdict") == verdict):
            out.append((entry, result))
            if limit is not None and len(out) >= limit:
                break
    return out


def find_entry(root: str | Path, frame_id: str) -> Entry | None:
    """The newest entry of ``frame_id``, or None."""
    for entry, result in list_entries(root):
        if result.get("frame_id") == frame_id:
            return entry
    return None


def export_entries(root: str | Path, out: str | Path, frame_ids: Sequence[str] = ()) -> list[str]:
    """Write the entries (all, or those of ``frame_ids``) to a ``.tar`` file; returns the frame
    id of each entry written."""
    wanted = set(frame_ids)
    written = []
    with tarfile.open(out, "w") as tar:
        for entry, result in list_entries(root):
            if wanted and result.get("frame_id") not in wanted:
                continue
            tar.add(entry.path, arcname=entry.name)
            written.append(result.get("frame_id"))
    return written
