"""The worker's configuration: frozen dataclasses, one per stage (DESIGN section 9).

A configuration is resolved once, at the edge, from four sources in increasing precedence:

1. the TOML file (one table per stage, plus a top-level ``line``);
2. systemd credentials: ``$CREDENTIALS_DIRECTORY/redis_password`` sets ``banks.password``;
3. environment variables ``INSPECTOR_<STAGE>_<FIELD>`` (upper case, e.g.
   ``INSPECTOR_BATCH_MAX_BATCH=8``), ``INSPECTOR_LINE``, and ``INSPECTOR_REDIS_PASSWORD`` as an
   alias of ``INSPECTOR_BANKS_PASSWORD`` (the canonical name wins when both are set);
4. command-line flags, given as a flat mapping ``"stage.field" -> value``.

Every stage then receives only its own piece (``cfg.batch``, ``cfg.engine``...). Every error is a
:class:`ConfigError` whose message names where the bad value came from and which field it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from .worker.batcher import OVERLOAD_POLICIES
from .keys import DEFAULT_PREFIX
# the line goes into Redis keys, ZMQ topics and every result header: one pattern for all of them
from .wire import (DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, LINE_PATTERN, MAX_HEADER_BYTES, MIB,
                   WireLimits)

ENV_PREFIX = "INSPECTOR_"
ENV_LINE = "INSPECTOR_LINE"
ENV_REDIS_PASSWORD_ALIAS = "INSPECTOR_REDIS_PASSWORD"
ENV_CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # set by systemd for LoadCredential=
CREDENTIAL_REDIS_PASSWORD = "redis_password"
DEFAULT_CONFIG_TEMPLATE = "/etc/inspector/line{line}.toml"

REDACTED = "***"
MAX_TCP_PORT = 65535

# Wire limits (DESIGN section 7) and image bounds: defined once, in the wire module.
DEFAULT_MAX_HEADER_BYTES = MAX_HEADER_BYTES
DEFAULT_RCVHWM = 1000  # ZMQ queues at most this many frames before the sender blocks or drops
DEFAULT_QUEUE_SIZE = 256  # ingest queue: about one second of frames at full line rate
DEFAULT_DECODE_WORKERS = 2  # the line PCs have few cores; decode shares them with the loop

DEFAULT_MAX_BATCH = 4  # default warm-up sizes go up to 4: the largest batch the edge GPU warms
DEFAULT_MAX_DELAY_MS = 10.0  # the wait a first frame may spend for company, under a reject-gate budget
DEFAULT_DEADLINE_MS = 1000.0  # a result later than a second is useless to the reject gate


DEFAULT_SNDHWM = 1000  # PUB drops for a slow subscriber beyond this many queued results
DEFAULT_HEATMAP_SCALE = 64.0  # calibrated value 1.0 -> 64, so values up to ~4 fit in uint8
DEFAULT_STREAM_MAXLEN = 100_000  # approximate MAXLEN of the Redis results stream
DEFAULT_STREAM_BUFFER = 10_000  # results held in memory while Redis is down, then counted as lost
DEFAULT_HEARTBEAT_TTL_S = 10  # the heartbeat key expires this long after the worker stops beating

DEFAULT_ARCHIVE_MAX_MB = 1024.0  # failed frames at 256 px take ~20-40 KB each: tens of thousands fit
DEFAULT_ARCHIVE_MAX_AGE_DAYS = 7.0
DEFAULT_LIVE_RECENT_FAILED = 12  # failed frames the live page shows (about 3 MB of model inputs at 256 px)
DEFAULT_LIVE_WINDOW_MIN = 15  # minutes of per-product counts on the live page
DEFAULT_ARCHIVE_QUEUE = 64  # entries waiting for the disk; beyond, entries (never results) are lost

DEFAULT_POLL_INTERVAL_S = 1.0  # bank epoch poll; pub/sub nudges make most changes faster
DEFAULT_KEEP_VERSIONS = 3  # bank versions kept per product for rollback
DEFAULT_CAPACITY_PRODUCTS = 16  # products padded into the model's bank tensors

DEFAULT_HTTP_PORT = 9400
DEFAULT_STALE_AFTER_S = 30.0  # /healthz fails when the processing loop has not beaten this long

MIN_COSINE, MAX_COSINE = -1.0, 1.0

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16")
HEATMAP_POLICIES = ("all", "fail", "none")
CALIBRATIONS = ("cada", "bank", "none")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
STORE_SCHEMES = ("redis", "rediss", "file")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")

SECRET_NAME = re.compile(r"pass(word|wd)|secret|token", re.IGNORECASE)
# ``scheme://user:password@`` up to the last "@" of the token; over-masking is the safe side.
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:)[^\s]*@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&][^=&\s]*(?:pass(?:word|wd)|secret|token)[^=&\s]*=)[^&\s]*", re.IGNORECASE)


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the source and the field."""


# Checks: each returns a problem (a phrase) or None. ``None`` values of optional fields are not checked.
Check = Callable[[Any], "str | None"]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _endpoint(value: str) -> str | None:
    return None if "://" in value else "must be a ZMQ endpoint like tcp://127.0.0.1:5555"


def _port(value: int) -> str | None:
    return None if 0 <= value <= MAX_TCP_PORT else f"must be in 0..{MAX_TCP_PORT} (0 disables)"


def _cosine(value: float) -> str | None:
    return None if MIN_COSINE <= value <= MAX_COSINE else f"must be in [{MIN_COSINE}, {MAX_COSINE}]"


def _batch_sizes(value: tuple[int, ...]) -> str | None:
    if not value:
        return "must list at least one batch size"
    if any(size <= 0 for size in value):
        return "batch sizes must be > 0"
    if list(value) != sorted(set(value)):
        return "batch sizes must be sorted and unique, e.g. 1,2,4"
    return None


def _store_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in STORE_SCHEMES:
        return "must be redis://host:port/db, rediss://host:port/db or file:///path"
    if parts.scheme == "file" and not parts.path.startswith("/"):
        return "a file store needs an absolute path: file:///var/lib/inspector/banks"
    if parts.scheme != "file" and not parts.hostname:
        return "a Redis store needs a host: redis://127.0.0.1:6379/0"
    return None


def _no_whitespace(value: str) -> str | None:
    if not value:
        return "must not be empty"
    return None if not any(ch.isspace() for ch in value) else "must not contain whitespace"


def _meta(check: Check | None = None, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"check": check, "choices": choices}


def _opt(default: Any, check: Check | None = None, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata=_meta(check, choices))


BACKENDS = ("torch", "inductor", "onnx", "tensorrt")


@dataclass(frozen=True)
class IngestConfig:
    """ZMQ PULL socket, limits on what a frame may be, and the bounded ingest queue."""

    bind: str = _opt("tcp://127.0.0.1:5555", _endpoint)
    rcvhwm: int = _opt(DEFAULT_RCVHWM, _positive)
    queue_size: int = _opt(DEFAULT_QUEUE_SIZE, _positive)
    overload: str = _opt("drop_oldest", choices=OVERLOAD_POLICIES)
    max_header_bytes: int = _opt(DEFAULT_MAX_HEADER_BYTES, _positive)
    max_payload_bytes: int = _opt(DEFAULT_MAX_PAYLOAD_BYTES, _positive)
    max_side: int = _opt(DEFAULT_MAX_SIDE, _positive)
    max_pixels: int = _opt(DEFAULT_MAX_PIXELS, _positive)
    decode_workers: int = _opt(DEFAULT_DECODE_WORKERS, _positive)
    curve_server_secret_key: str | None = _opt(None, _non_empty)
    curve_allowed_clients_dir: str | None = _opt(None, _non_empty)

    def limits(self) -> WireLimits:
        """The wire limits this ingest enforces on every frame."""
        return WireLimits(self.max_header_bytes, self.max_payload_bytes, self.max_side, self.max_pixels)


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: fire at ``max_batch`` frames or ``max_delay_ms`` after the first one."""

    max_batch: int = _opt(DEFAULT_MAX_BATCH, _positive)
    max_delay_ms: float = _opt(DEFAULT_MAX_DELAY_MS, _non_negative)
    deadline_ms: float = _opt(DEFAULT_DEADLINE_MS, _positive)


@dataclass(frozen=True)
class EngineConfig:
    """The model artifact and how it runs. ``threshold``/``calibration`` override the model card."""

    artifact: str = _opt("")
    device: str = _opt("auto", choices=DEVICES)
    precision: str = _opt("fp32", choices=PRECISIONS)
    backend: str = _opt("torch", choices=BACKENDS)  # torch (eager) | inductor | onnx | tensorrt
    compiled: str = _opt("")  # compiled program for onnx / tensorrt ("" = <artifact>/compiled/<backend>.*)
    batch_sizes: tuple[int, ...] = _opt((1, 2, 4), _batch_sizes)
    threshold: float | None = _opt(None)
    min_route_similarity: float | None = _opt(None, _cosine)  # None: the model card's gate
    calibration: str | None = _opt(None, choices=CALIBRATIONS)
    threads: int | None = _opt(None, _positive)


@dataclass(frozen=True)
class PublishConfig:
    """ZMQ PUB of results, heatmap policy, and the Redis results stream and heartbeat."""

    bind: str = _opt("tcp://127.0.0.1:5556", _endpoint)
    sndhwm: int = _opt(DEFAULT_SNDHWM, _positive)
    heatmaps: str = _opt("fail", choices=HEATMAP_POLICIES)
    heatmap_scale: float = _opt(DEFAULT_HEATMAP_SCALE, _positive)
    stream_maxlen: int = _opt(DEFAULT_STREAM_MAXLEN, _positive)
    stream_buffer: int = _opt(DEFAULT_STREAM_BUFFER, _non_negative)  # 0: count as lost at once
    heartbeat_ttl_s: int = _opt(DEFAULT_HEARTBEAT_TTL_S, _positive)


def _unit_interval(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


@dataclass(frozen=True)
class ArchiveConfig:
    """The failed-frame archive (``inspector.worker.archive``): off unless ``dir`` is set."""

    dir: str | None = _opt(None, _non_empty)
    max_mb: float = _opt(DEFAULT_ARCHIVE_MAX_MB, _positive)
    max_age_days: float = _opt(DEFAULT_ARCHIVE_MAX_AGE_DAYS, _positive)
    sample_passed: float = _opt(0.0, _unit_interval)  # fraction of passed frames kept too
    queue_size: int = _opt(DEFAULT_ARCHIVE_QUEUE, _positive)


@dataclass(frozen=True)
class LiveConfig:
    """The live line page on the HTTP server (``inspector.worker.live``): what it keeps, and whether its
    "this part is good" action may change a product's statistics (off: whoever reaches the HTTP
    bind could otherwise confirm parts)."""

    recent_failed: int = _opt(DEFAULT_LIVE_RECENT_FAILED, _positive)
    window_min: int = _opt(DEFAULT_LIVE_WINDOW_MIN, _positive)
    feedback: bool = _opt(False)


@dataclass(frozen=True)
class BankConfig:
    """Where reference banks live (Redis or a local ``file://`` store) and how they are followed."""

    store: str = _opt("file:///var/lib/inspector/banks", _store_url)
    prefix: str = _opt(DEFAULT_PREFIX, _no_whitespace)
    password: str | None = _opt(None)
    username: str | None = _opt(None, _non_empty)
    poll_interval_s: float = _opt(DEFAULT_POLL_INTERVAL_S, _positive)
    keep_versions: int = _opt(DEFAULT_KEEP_VERSIONS, _positive)
    capacity_products: int = _opt(DEFAULT_CAPACITY_PRODUCTS, _positive)
    tls_ca_file: str | None = _opt(None, _non_empty)


def _fraction(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be in (0, 1]"


def _at_least_two(value: int) -> str | None:
    return None if value >= 2 else "must be at least 2"


@dataclass(frozen=True)
class CalibrationConfig:
    """Self-calibration: each product's normal statistics refined from the frames it serves.

    Field meanings are ``inspector.banks.normal.StreamConfig``'s (the worker builds one from this).
    """

    stream: bool = _opt(True)  # false: each product keeps its registration (or feedback) statistics
    window: int = _opt(200, _at_least_two)  # recent scores per product the refresh measures
    min_count: int = _opt(50, _at_least_two)  # frames of a product before its first refresh
    refresh_every: int = _opt(25, _positive)  # frames between refreshes of a product
    max_step: float = _opt(0.5, _positive)  # per refresh: u moves <= max_step spreads, spread x/÷ (1 + max_step)
    freeze_jump: float = _opt(0.2, _fraction)  # fail-rate rise over the previous window that freezes learning
    # Bank growth (inspector.banks.growth): passed frames at or below the grow_below quantile of a
    # product's recent scores (1.0: every passed frame) join its bank, rebuilt each time they would double it.
    grow_bank: bool = _opt(True)  # false: banks stay what registration gave them
    grow_max_images: int = _opt(0, _non_negative)  # images a grown bank holds at most (0: the card's bank.images)
    grow_below: float = _opt(1.0, _fraction)  # quantile of the recent scores a frame must not exceed to join


@dataclass(frozen=True)
class HttpConfig:
    """Metrics and health endpoints. Port 0 disables the server."""

    bind: str = _opt("127.0.0.1", _non_empty)
    port: int = _opt(DEFAULT_HTTP_PORT, _port)
    stale_after_s: float = _opt(DEFAULT_STALE_AFTER_S, _positive)


@dataclass(frozen=True)
class LogConfig:
    """Log level, and JSON lines (journald) or a human console format."""

    level: str = _opt("info", choices=LOG_LEVELS)
    json: bool = _opt(True)


@dataclass(frozen=True)
class WorkerConfig:
    """The whole worker; stages are handed only their own piece."""

    line: str = ""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    banks: BankConfig = field(default_factory=BankConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)


STAGES: dict[str, type] = {
    "ingest": IngestConfig,
    "batch": BatchConfig,
    "engine": EngineConfig,
    "publish": PublishConfig,
    "banks": BankConfig,
    "archive": ArchiveConfig,
    "live": LiveConfig,
    "calibration": CalibrationConfig,
    "http": HttpConfig,
    "log": LogConfig,
}

DEFAULT_SOURCE = "default"


def default_config_path(line: str) -> Path:
    """The file ``inspector run --line N`` reads when no ``--config`` is given."""
    return Path(DEFAULT_CONFIG_TEMPLATE.format(line=line))


# --------------------------------------------------------------------------- types


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0], True
    return hint, False


def _is_int_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _type_name(hint: Any) -> str:
    base, optional = _unwrap_optional(hint)
    name = "a list of integers" if _is_int_tuple(base) else {
        int: "an integer", float: "a number", bool: "a boolean", str: "a string",
    }[base]
    return f"{name} or empty" if optional else name


def _coerce_typed(value: Any, hint: Any) -> Any:
    """A value that already has a type (TOML, flags): check it and normalise numbers/lists.

    Raises:
        TypeError: the value does not have the field's type.
    """
    base, optional = _unwrap_optional(hint)
    if value is None and optional:
        return None
    if _is_int_tuple(base):
        if isinstance(value, (list, tuple)) and all(_is_int(item) for item in value):
            return tuple(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is int:
        if _is_int(value):
            return value
    elif isinstance(value, base):
        return value
    raise TypeError(f"expected {_type_name(hint)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce_text(text: str, hint: Any) -> Any:
    """A value given as text (environment, text flags), converted to the field's type.

    Raises:
        TypeError: the text does not spell a value of the field's type.
    """
    base, optional = _unwrap_optional(hint)
    stripped = text.strip()
    if optional and not stripped:
        return None
    try:
        if _is_int_tuple(base):
            return tuple(int(item) for item in stripped.split(",")) if stripped else ()
        if base is int:
            return int(stripped)
        if base is float:
            return float(stripped)
    except ValueError:
        raise TypeError(f"expected {_type_name(hint)}") from None
    if base is bool:
        word = stripped.lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise TypeError(f"expected a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)})")
    return text


# --------------------------------------------------------------------------- loading


class _Layers:
    """Values and where each came from, filled in order of increasing precedence."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {stage: {} for stage in STAGES}
        self.sources: dict[str, str] = {}
        self.line: str | None = None

    def set(self, stage: str, name: str, value: Any, source: str) -> None:
        self.values[stage][name] = value
        self.sources[f"{stage}.{name}"] = source

    def set_line(self, value: Any, source: str) -> None:
        if _is_int(value):
            value = str(value)
        if not isinstance(value, str):
            raise _bad(source, "line", "expected a string", value)
        self.line = value
        self.sources["line"] = source


_NO_VALUE = object()


def _bad(source: str, key: str, problem: object, value: Any = _NO_VALUE) -> ConfigError:
    """An error naming source and field; the offending value is shown with secrets masked."""
    shown = "" if value is _NO_VALUE else f", got {redact_value(key.rpartition('.')[2], value)!r}"
    return ConfigError(f"{source}: {key}: {problem}{shown}")


def _unknown(source: str, what: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return ConfigError(f"{source}: unknown {what} {name!r}{hint}")


def _read_file(path: Path, layers: _Layers) -> None:
    source = f"config file {path}"
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{source}: not found") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for key, table in data.items():
        if key == "line":
            layers.set_line(table, source)
            continue
        if key not in STAGES:
            raise _unknown(source, "table", key, [*STAGES, "line"])
        if not isinstance(table, dict):
            raise _bad(source, f"[{key}]", "must be a table", table)
        hints = _hints(STAGES[key])
        for name, value in table.items():
            if name not in hints:
                raise _unknown(source, f"key in [{key}]:", name, list(hints))
            try:
                layers.set(key, name, _coerce_typed(value, hints[name]), source)
            except TypeError as exc:
                raise _bad(source, f"{key}.{name}", exc, value) from None


def _read_credentials(env: Mapping[str, str], layers: _Layers) -> None:
    directory = env.get(ENV_CREDENTIALS_DIRECTORY)
    if not directory:
        return
    path = Path(directory) / CREDENTIAL_REDIS_PASSWORD
    if not path.is_file():
        return
    source = f"credential file {path}"
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: banks.password: cannot be read: {exc}") from None
    layers.set("banks", "password", secret, source)


def _env_field(variable: str) -> tuple[str, str] | None:
    """``INSPECTOR_BATCH_MAX_BATCH`` -> ("batch", "MAX_BATCH"); None for other variables."""
    rest = variable[len(ENV_PREFIX):]
    for stage in STAGES:
        head = stage.upper() + "_"
        if rest.startswith(head):
            return stage, rest[len(head):]
    return None


def _read_env(env: Mapping[str, str], layers: _Layers) -> None:
    if ENV_REDIS_PASSWORD_ALIAS in env:
        alias_source = f"environment {ENV_REDIS_PASSWORD_ALIAS}"
        layers.set("banks", "password", env[ENV_REDIS_PASSWORD_ALIAS] or None, alias_source)
    if ENV_LINE in env:
        layers.set_line(env[ENV_LINE], f"environment {ENV_LINE}")
    # After the alias, so INSPECTOR_BANKS_PASSWORD wins; sorted so that errors are deterministic.
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX):
            continue
        parsed = _env_field(variable)
        if parsed is None:
            continue  # other INSPECTOR_* variables belong to other commands and tools
        stage, upper = parsed
        hints = _hints(STAGES[stage])
        by_env_name = {name.upper(): name for name in hints}
        source = f"environment {variable}"
        if upper not in by_env_name:
            env_names = [f"{ENV_PREFIX}{stage.upper()}_{name}" for name in by_env_name]
            raise _unknown(source, "variable", variable, env_names)
        name = by_env_name[upper]
        try:
            layers.set(stage, name, _coerce_text(env[variable], hints[name]), source)
        except TypeError as exc:
            raise _bad(source, f"{stage}.{name}", exc, env[variable]) from None


def _read_overrides(overrides: Mapping[str, Any], layers: _Layers) -> None:
    for key, value in overrides.items():
        if value is None:
            continue  # a flag that was not given
        source = f"command-line flag {key}"
        if key == "line":
            layers.set_line(value, source)
            continue
        stage, _, name = key.partition(".")
        if stage not in STAGES:
            raise _unknown(source, "stage", stage, list(STAGES))
        hints = _hints(STAGES[stage])
        if name not in hints:
            raise _unknown(source, f"field of {stage}:", name, list(hints))
        try:
            if isinstance(value, str):
                converted = _coerce_text(value, hints[name])
            else:
                converted = _coerce_typed(value, hints[name])
        except TypeError as exc:
            raise _bad(source, key, exc, value) from None
        layers.set(stage, name, converted, source)


def load_config(
    path: str | Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
    line: str | None,
) -> WorkerConfig:
    """Resolve and validate the worker's configuration.

    Args:
        path: TOML file; ``None`` means no file. A path that is given must exist.
        env: environment (``os.environ`` in the CLI); see the module docstring for the names.
        overrides: command-line flags as ``"stage.field" -> value``; ``None`` values (flags not
            given) are skipped. Text values are converted like environment values.
        line: the ``--line`` argument, which wins over every other source of ``line``.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: any problem, naming the source (file, variable, flag) and the field.
    """
    layers = _Layers()
    if path is not None:
        _read_file(Path(path), layers)
    _read_credentials(env, layers)
    _read_env(env, layers)
    _read_overrides(overrides, layers)
    if line is not None:
        layers.set_line(line, "argument --line")
    stages = {stage: cls(**layers.values[stage]) for stage, cls in STAGES.items()}
    cfg = WorkerConfig(line=layers.line or "", **stages)
    return validate(cfg, layers.sources)


# --------------------------------------------------------------------------- validation


def validate(cfg: WorkerConfig, sources: Mapping[str, str] | None = None) -> WorkerConfig:
    """Check every field and the rules that tie fields together; return ``cfg`` unchanged.

    Args:
        cfg: a configuration, loaded or built in code.
        sources: ``"stage.field"`` (or ``"line"``) -> where the value came from; fields not
            listed are reported as coming from the defaults.

    Raises:
        ConfigError: the first problem found, naming its source and field.
    """
    sources = sources or {}

    def fail(key: str, problem: str, value: Any = _NO_VALUE) -> ConfigError:
        return _bad(sources.get(key, DEFAULT_SOURCE), key, problem, value)

    if not isinstance(cfg.line, str) or not LINE_PATTERN.fullmatch(cfg.line):
        problem = "is required (--line, INSPECTOR_LINE or line = ... in the file)" if not cfg.line else (
            "may hold only letters, digits, '_' and '-' (it is part of Redis keys and topics)"
        )
        raise fail("line", problem, cfg.line)
    for stage in STAGES:
        _validate_stage(stage, getattr(cfg, stage), fail)
    _validate_across(cfg, fail)
    return cfg


def _validate_stage(stage: str, section: Any, fail: Callable[[str, str], ConfigError]) -> None:
    hints = _hints(type(section))
    for spec in dataclasses.fields(section):
        key = f"{stage}.{spec.name}"
        value = getattr(section, spec.name)
        try:
            _coerce_typed(value, hints[spec.name])
        except TypeError as exc:
            raise fail(key, str(exc), value) from None
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(key, "must be a finite number", value)
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise fail(key, f"must be one of {', '.join(choices)}", value)
        check = spec.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise fail(key, problem, value)


def _validate_across(cfg: WorkerConfig, fail: Callable[[str, str], ConfigError]) -> None:
    if cfg.engine.precision == "fp16" and cfg.engine.device == "cpu":
        raise fail("engine.precision", "fp16 runs only on CUDA; use device = cuda or auto, or precision = fp32")
    if cfg.ingest.curve_allowed_clients_dir and not cfg.ingest.curve_server_secret_key:
        raise fail("ingest.curve_allowed_clients_dir", "client keys need CURVE: set ingest.curve_server_secret_key too")
    if cfg.banks.tls_ca_file and urlsplit(cfg.banks.store).scheme != "rediss":
        raise fail("banks.tls_ca_file", "a CA file is used only with a rediss:// store")


# --------------------------------------------------------------------------- redaction


def is_secret_name(name: str) -> bool:
    """Whether a field or log key names a secret (password, secret, token)."""
    return bool(SECRET_NAME.search(name))


def mask_url_secrets(text: str) -> str:
    """Mask passwords inside URLs (``redis://user:pw@host``, ``?password=pw``) in free text."""
    text = _URL_USERINFO.sub(lambda match: f"{match['head']}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda match: f"{match['head']}{REDACTED}", text)


def redact_value(key: str, value: Any) -> Any:
    """``value`` with secrets masked: whole values under secret names, URL passwords in text."""
    if is_secret_name(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return mask_url_secrets(value)
    if isinstance(value, Mapping):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, item) for item in value]
    return value


def redacted(cfg: WorkerConfig) -> dict[str, Any]:
    """The resolved configuration as a JSON-ready dict, every secret replaced by ``"***"``."""
    return {key: redact_value(key, value) for key, value in dataclasses.asdict(cfg).items()}
