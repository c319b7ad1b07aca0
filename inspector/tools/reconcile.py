"""Accounting after the fact: which frames a camera sent got no result, and did any get two.

The worker gives every frame it receives exactly one result. A frame can still end without one:
the worker was killed (SIGKILL, power loss) with the frame in its buffers, or the network lost
it. This module joins what a camera says it sent with the results a consumer saw:

- sent: the JSON-lines record of ``inspector publish --record`` (one object per sent frame, with
  ``frame_id``); several files may be given (one per camera or per run);
- results: the JSON-lines record of ``inspector tail --record`` (one result header per line), or
  the line's Redis results stream ``<prefix>:line:<L>:results`` (field ``result``).

:func:`reconcile` reports the frame ids sent without a result (in send order), the ids with more
than one result (which the worker must never produce), and how many results name a frame that
is not in the send record (error results of unreadable messages, other cameras or runs).
``inspector reconcile`` prints it and exits 0 when every frame has exactly one result, 1 when
not, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..keys import results_key

EXIT_OK = 0
EXIT_UNACCOUNTED = 1
EXIT_USAGE = 2
STREAM_PAGE = 1000  # entries per XRANGE round trip: bounded replies, few round trips
DEFAULT_SHOW = 20  # missing ids printed in the text report; --json lists them all
RESULT_FIELD = b"result"  # the stream entry field holding the result header JSON


class ReconcileError(ValueError):
    """A record that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Reconciliation:
    """Sent frames joined with results by ``frame_id``.

    Attributes:
        sent: distinct frame ids in the send record.
        results: results that name a sent frame (duplicates included).
        missing: frame ids sent without any result, in send order.
        duplicated: frame id -> number of results, for ids with more than one.
        unexpected: results naming no sent frame (probes, unreadable messages, other runs).
        resent: frame id -> times it appears in the send record, for ids listed more than once.
        malformed: result lines or entries that are not a result header.
        verdicts: results of sent frames per verdict.
    """

    sent: int
    results: int
    missing: tuple[str, ...]
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    resent: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every sent frame has exactly one result."""
        return not self.missing and not self.duplicated

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "missing": list(self.missing), "ok": self.ok}


def read_sent(paths: Iterable[str | Path]) -> list[str]:
    """Frame ids of send records (``inspector publish --record``), in file and line order.

    Raises:
        ReconcileError: a line that is not a JSON object with a string ``frame_id``.
    """
    ids: list[str] = []
    for path in paths:
        for number, data in _json_lines(path):
            frame_id = data.get("frame_id") if isinstance(data, dict) else None
            if not isinstance(frame_id, str):
                raise ReconcileError(f"{path}:{number}: not a send record (no frame_id)")
            ids.append(frame_id)
    return ids


def read_result_records(paths: Iterable[str | Path]) -> Iterator[Mapping[str, Any] | None]:
    """Result headers of ``inspector tail --record`` files; None for a line that is not one.

    A record cut short (the reader was killed mid-line) yields None rather than failing the
    whole reconciliation; it is counted as malformed.
    """
    for path in paths:
        for _, data in _json_lines(path, strict=False):
            yield data if isinstance(data, dict) else None


def stream_key(prefix: str, line: str) -> str:
    """The line's results stream key (``inspector.keys``)."""
    return results_key(prefix, line)


def read_result_stream(client: Any, key: str, page: int = STREAM_PAGE) -> Iterator[Mapping[str, Any] | None]:
    """Result headers from a Redis stream, oldest first, paged; None for an unreadable entry.

    Args:
        client: a ``redis.Redis`` client.
        key: the stream key (:func:`stream_key`).
        page: entries per XRANGE call.
    """
    start = "-"
    while True:
        entries = client.xrange(key, min=start, max="+", count=page)
        for _, fields in entries:
            raw = fields.get(RESULT_FIELD, fields.get(RESULT_FIELD.decode("ascii")))
            try:
                data = json.loads(raw)
            except (TypeError, ValueError):
                yield None
                continue
            yield data if isinstance(data, dict) else None
        if len(entries) < page:
            return
        last = entries[-1][0]
        start = "(" + (last.decode("ascii") if isinstance(last, bytes) else last)  # exclusive: after the last


def reconcile(sent_ids: Sequence[str], results: Iterable[Mapping[str, Any] | None]) -> Reconciliation:
    """Join sent frame ids with result headers (None entries count as malformed)."""
    sent_counts = Counter(sent_ids)
    got: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    unexpected = malformed = 0
    for data in results:
        frame_id = data.get("frame_id") if data is not None else None
        if not isinstance(frame_id, str):
            malformed += 1
        elif frame_id in sent_counts:
            got[frame_id] += 1
            verdicts[str(data.get("verdict"))] += 1
        else:
            unexpected += 1
    missing = tuple(dict.fromkeys(f for f in sent_ids if got[f] == 0))
    return Reconciliation(
        sent=len(sent_counts),
        results=sum(got.values()),
        missing=missing,
        duplicated={f: n for f, n in sorted(got.items()) if n > 1},
        unexpected=unexpected,
        resent={f: n for f, n in sorted(sent_counts.items()) if n > 1},
        malformed=malformed,
        verdicts=dict(sorted(verdicts.items())),
    )


def _json_lines(path: str | Path, strict: bool = True) -> Iterator[tuple[int, Any]]:
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise ReconcileError(f"{path}: cannot be read: {err.strerror}") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError:
                if strict:
                    raise ReconcileError(f"{path}:{number}: not JSON") from None
                yield number, None


# ---------------------------------------------------------------------------------------------
# ``inspector reconcile``


def configure_parser(p: argparse.ArgumentParser) -> None:
    """The flags of ``inspector reconcile``."""
    p.add_argument("--sent", action="append", required=True, metavar="FILE",
                   help="send record of `inspector publish --record` (repeatable)")
    p.add_argument("--results", action="append", metavar="FILE",
                   help="result record of `inspector tail --record` (repeatable); default: the line's Redis stream")
    p.add_argument("--line", help="line whose Redis results stream is read (without --results)")
    p.add_argument("--store", help="redis://host:port/db (default: the line's config [banks] store)")
    p.add_argument("--config", help="line config TOML (default /etc/inspector/line<L>.toml when present)")
    p.add_argument("--json", action="store_true", help="print the whole reconciliation as JSON")
    p.add_argument("--show", type=int, default=DEFAULT_SHOW, help="missing frame ids listed in the text report")


def add_reconcile_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``reconcile`` to the command line's subcommands."""
    configure_parser(sub.add_parser("reconcile", help="which sent frames got no result (or more than one)"))


def _stream_results(args: argparse.Namespace) -> list[Mapping[str, Any] | None]:
    import os

    from ..banks import open_configured_store
    from ..config import default_config_path, load_config

    if not args.line:
        raise ValueError("give --results FILE, or --line (and --store) to read the line's Redis results stream")
    path = args.config
    if path is None and default_config_path(args.line).is_file():
        path = default_config_path(args.line)
    cfg = load_config(path, os.environ, {"banks.store": args.store} if args.store else {}, args.line)
    b = cfg.banks
    if not b.store.startswith(("redis://", "rediss://")):
        raise ValueError("the results stream lives in Redis: the line's store is not redis:// (use --results)")
    import redis

    from ..banks import StoreError

    store = open_configured_store(b)
    try:
        return list(read_result_stream(store.client, stream_key(b.prefix, cfg.line)))
    except redis.RedisError as err:
        raise StoreError(f"redis at {store.url}: {err}") from err
    finally:
        store.close()


def format_report(rec: Reconciliation, show: int = DEFAULT_SHOW) -> str:
    """A few lines for people: counts, then the first ``show`` missing ids."""
    verdicts = ", ".join(f"{v} {n}" for v, n in rec.verdicts.items()) or "none"
    lines = [
        f"sent {rec.sent}, results {rec.results} ({verdicts})",
        f"missing {len(rec.missing)}, duplicated {len(rec.duplicated)}, unexpected {rec.unexpected}, "
        f"malformed {rec.malformed}, resent {len(rec.resent)}",
    ]
    if rec.missing:
        more = f" ... and {len(rec.missing) - show} more" if len(rec.missing) > show else ""
        lines.append("missing: " + " ".join(rec.missing[:show]) + more)
    if rec.duplicated:
        lines.append("duplicated: " + " ".join(f"{f} x{n}" for f, n in rec.duplicated.items()))
    lines.append("every frame has exactly one result" if rec.ok else "NOT every frame has exactly one result")
    return "\n".join(lines)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Print the reconciliation; 0 when every frame has exactly one result, 1 when not, 2 on errors."""
    from ..banks import StoreError

    try:
        sent = read_sent(args.sent)
        results = list(read_result_records(args.results)) if args.results else _stream_results(args)
    except (ValueError, StoreError) as err:  # ReconcileError and ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    rec = reconcile(sent, results)
    print(json.dumps(rec.to_dict()) if args.json else format_report(rec, args.show))
    return EXIT_OK if rec.ok else EXIT_UNACCOUNTED


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inspector.tools.reconcile``: the same as ``inspector reconcile``."""
    parser = argparse.ArgumentParser(prog="inspector reconcile", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return cmd_reconcile(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
