"""Logging: structlog JSON lines for journald, or a console format for people (STYLE rule 11).

Only the CLI calls :func:`configure_logging`; modules call :func:`get_logger` and log stable
snake_case event names with key-values. Records from the standard ``logging`` module (libraries)
go through the same redaction and renderer. Secrets are masked here as a last line of defence:
any key named like password/secret/token, and passwords inside URLs in any text.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping, MutableMapping, TextIO

import structlog

from .config import LogConfig, redact_value


def redact_secrets(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secret-named keys and URL passwords in every value."""
    for key, value in event_dict.items():
        event_dict[key] = redact_value(str(key), value)
    return event_dict


class _StreamHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs on the root logger (and replaces on re-call)."""


class _NamedWriteLogger(structlog.WriteLogger):
    """A structlog write logger that knows its name, for ``add_logger_name``."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _logger_factory(stream: TextIO) -> Any:
    def make(*args: Any) -> _NamedWriteLogger:
        return _NamedWriteLogger(stream, str(args[0]) if args else "")

    return make


def configure_logging(cfg: LogConfig, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library's root logger; safe to call again.

    Args:
        cfg: level and format.
        stream: where lines go (default: ``sys.stdout`` at the time of the call).
    """
    stream = sys.stdout if stream is None else stream
    level = logging.getLevelName(cfg.level.upper())
    renderer: Any = structlog.processors.JSONRenderer() if cfg.json else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        # Tracebacks become text before redaction, so a URL with a password in one is masked too.
        structlog.processors.format_exc_info,
        redact_secrets,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_logger_factory(stream),
        # Not cached: loggers obtained at import time follow a later configure_logging().
        cache_logger_on_first_use=False,
    )
    handler = _StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StreamHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str, **context: Any) -> Any:
    """A structlog logger whose events carry ``logger=name`` and ``context``.

    The logger is assembled from the current configuration at each call, so one obtained at
    import time follows :func:`configure_logging`. (Calling ``.bind()`` on it fixes the
    configuration of the returned logger; bind per-request context there, not at import time.)
    """
    return structlog.get_logger(name, **context)


def bind_context(context: Mapping[str, Any]) -> None:
    """Bind process-wide context (line, model id) once, for every logger."""
    structlog.contextvars.bind_contextvars(**context)
