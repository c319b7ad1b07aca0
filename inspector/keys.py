"""The Redis key layout of a line, in one place (DESIGN section 8).

Every key of a line starts with ``<prefix>:line:<L>`` (prefix configurable, default
``inspector``)::

    <prefix>:line:<L>:bank:<product>:<version>        bank blob (safetensors bytes)
    <prefix>:line:<L>:bank:<product>:<version>:meta   its metadata JSON
    <prefix>:line:<L>:bank:<product>:versions         sorted set of stored versions
    <prefix>:line:<L>:bank:<product>:seq              version counter
    <prefix>:line:<L>:products                        hash product -> active version
    <prefix>:line:<L>:epoch                           bumped on every bank change
    <prefix>:line:<L>:changed                         pub/sub channel, message "<epoch-hint> <product>"
    <prefix>:line:<L>:normal:<product>                normal statistics refined after registration (JSON)
    <prefix>:line:<L>:results                         stream of result headers (field ``result``)
    <prefix>:line:<L>:heartbeat                       the worker's status JSON, with a TTL

The bank store (``inspector.banks.stores``), the worker's results stream and heartbeat
(``inspector.worker.publish``) and the reconciliation tool (``inspector.tools.reconcile``) all build their keys
here.
"""

from __future__ import annotations

DEFAULT_PREFIX = "inspector"
RESULTS = "results"
HEARTBEAT = "heartbeat"


def line_key(prefix: str, line: str, *parts: object) -> str:
    """``<prefix>:line:<line>[:<part>...]``; callers check the names (``banks.record.check_name``)."""
    return ":".join([prefix, "line", line, *map(str, parts)])


def results_key(prefix: str, line: str) -> str:
    """The line's results stream."""
    return line_key(prefix, line, RESULTS)


def heartbeat_key(prefix: str, line: str) -> str:
    """The worker's heartbeat key."""
    return line_key(prefix, line, HEARTBEAT)
