"""Wire format, schema version 1 (DESIGN section 7): frames in, results out.

A frame reaches the worker as a ZMQ multipart message ``[header, payload]``: ``header`` is a
UTF-8 JSON object, ``payload`` the image bytes (JPEG, PNG, or raw pixels). A result leaves it as
``[topic, header, heatmap]`` on a PUB socket. Both headers are typed records here
(:class:`FrameHeader`, :class:`Result`) whose field names are the wire names.

Anything a camera sends is untrusted. :func:`parse_frame` turns any input into either a valid
``(FrameHeader, payload)`` pair or a :class:`WireError`, never another exception, and the error
carries whatever identity (``frame_id``, ``camera``, ``ts_ns``) could be recovered so the worker
can still address an ``error`` result to that frame. Its ``reason`` is one stable code:

======================  ==========================================================================
reason                  meaning
======================  ==========================================================================
bad_parts               not exactly the expected number of message parts, or a part that is not
                        a contiguous byte buffer
header_too_large        header over ``WireLimits.max_header_bytes`` (checked before parsing)
bad_header              header is not a UTF-8 JSON object
bad_version             ``v`` missing or not the supported schema version
missing_field           a required field is absent or null
bad_field               a field has the wrong type or value (``frame_id``, ``camera``, ``ts_ns``,
                        ``product``, ``deadline_ms``; for results also any other field, or a
                        topic that does not match the header)
unknown_encoding        ``encoding`` is not ``jpeg``, ``png`` or ``raw``
bad_shape               raw frame without a valid ``[H, W, C]`` (or ``[H, W]`` for gray8) of
                        positive ints whose ``C`` fits the pixel format, or with dimensions over
                        ``WireLimits.max_side`` / ``WireLimits.max_pixels``
bad_pixel_format        raw frame whose ``pixel_format`` is missing or not rgb8/bgr8/gray8
payload_too_large       payload over ``WireLimits.max_payload_bytes``
payload_size_mismatch   raw payload length differs from ``H * W * C``
empty_payload           zero-length payload
======================  ==========================================================================

Failures while decoding the image itself are :class:`inspector.decode.DecodeError`, a subclass,
with the reasons listed in that module.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SCHEMA_VERSION = 1
MAX_HEADER_BYTES = 4096  # DESIGN section 7: a header is a few hundred bytes; 4 KiB bounds parsing cost

MIB = 1 << 20
# Holds a raw 2048 x 2048 RGB frame (12 MiB) or any compressed frame of the usual camera sizes;
# lines with larger raw frames raise it in their config.
DEFAULT_MAX_PAYLOAD_BYTES = 16 * MIB
DEFAULT_MAX_SIDE = 8192  # the longest side of common 8k line-scan sensors; area cameras are smaller
DEFAULT_MAX_PIXELS = 40_000_000  # bounds one decoded RGB frame to 120 MB in a decode worker

MAX_TEXT_CHARS = 128  # frame_id and product: long enough for UUIDs and SKUs, short enough for logs
MAX_TS_NS = (1 << 63) - 1  # consumers store timestamps as int64 (numpy, Redis stream, Prometheus)
CAMERA_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the camera name becomes part of a ZMQ topic
# A line name has no dot, so the prefix ``result.<line>.`` selects exactly one line on subscription.
LINE_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
JSON_SEPARATORS = (",", ":")  # compact JSON: headers cross the wire once per frame

FRAME_PARTS = 2  # [header, payload]
RESULT_PARTS = 3  # [topic, header, heatmap]
HWC_DIMS = 3  # raw shape [H, W, C]
HW_DIMS = 2  # raw shape [H, W] (gray8 only), and heatmap shape

# Reason codes (see the table in the module docstring).
BAD_PARTS = "bad_parts"
HEADER_TOO_LARGE = "header_too_large"
BAD_HEADER = "bad_header"
BAD_VERSION = "bad_version"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
UNKNOWN_ENCODING = "unknown_encoding"
BAD_SHAPE = "bad_shape"
BAD_PIXEL_FORMAT = "bad_pixel_format"
PAYLOAD_TOO_LARGE = "payload_too_large"
PAYLOAD_SIZE_MISMATCH = "payload_size_mismatch"
EMPTY_PAYLOAD = "empty_payload"

ENCODINGS = ("jpeg", "png", "raw")
CHANNELS = {"rgb8": 3, "bgr8": 3, "gray8": 1}  # channels per pixel of each raw pixel format

# Verdicts (DESIGN section 1, point 3: every frame gets exactly one of them).
PASS = "pass"
FAIL = "fail"
ERROR = "error"
TIMEOUT = "timeout"
DROPPED = "dropped"
VERDICTS = (PASS, FAIL, ERROR, TIMEOUT, DROPPED)

# Reasons of results whose input was fine (DESIGN section 1): every reason a result may carry is
# defined in this module, whichever stage sets it, and REASONS says which verdict carries it.
ANOMALY = "anomaly"  # score over the threshold (engine)
UNKNOWN_PRODUCT = "unknown_product"  # no registered product matches the frame well enough (engine)
NO_PRODUCTS = "no_products"  # the line has no product registered yet (engine)
OVERLOAD = "overload"  # dropped by the overload policy (worker)
SHUTDOWN = "shutdown"  # dropped while the worker stops (worker)
DEADLINE_EXCEEDED = "deadline_exceeded"  # past its deadline before inference (worker)
ENGINE_ERROR = "engine_error"  # inference failed for the batch (worker)
DECODE_FAILED = "decode_failed"  # the decoder itself crashed on a frame (worker; a bug, logged)
# Failures while decoding the image (raised as inspector.decode.DecodeError).
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
ENCODING_MISMATCH = "encoding_mismatch"
INPUT_ERRORS = (BAD_PARTS, HEADER_TOO_LARGE, BAD_HEADER, BAD_VERSION, MISSING_FIELD, BAD_FIELD, UNKNOWN_ENCODING,
                BAD_SHAPE, BAD_PIXEL_FORMAT, PAYLOAD_TOO_LARGE, PAYLOAD_SIZE_MISMATCH, EMPTY_PAYLOAD,
                CORRUPT_IMAGE, IMAGE_TOO_LARGE, ENCODING_MISMATCH)
REASONS = {  # verdict -> the reasons a result of that verdict may carry (a pass carries none)
    PASS: (),
    FAIL: (ANOMALY, UNKNOWN_PRODUCT, NO_PRODUCTS),
    ERROR: (*INPUT_ERRORS, ENGINE_ERROR, DECODE_FAILED),
    TIMEOUT: (DEADLINE_EXCEEDED,),
    DROPPED: (OVERLOAD, SHUTDOWN),
}

UNKNOWN_CAMERA = "unknown"  # camera of an error result when the header named none usable


class WireError(ValueError):
    """A message that breaks the wire contract.

    Attributes:
        reason: stable snake_case code (module docstring table), used in metrics and results.
        detail: human-readable explanation.
        frame_id, camera, ts_ns: identity recovered from the header, or None when unknown.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        frame_id: str | None = None,
        camera: str | None = None,
        ts_ns: int | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.frame_id = frame_id
        self.camera = camera
        self.ts_ns = ts_ns

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class WireLimits:
    """Size limits applied to every incoming frame (config of the ingest stage)."""

    max_header_bytes: int = MAX_HEADER_BYTES
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_side: int = DEFAULT_MAX_SIDE  # largest image height or width accepted
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"WireLimits.{name} must be a positive int, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Field checks shared by frames and results. A failed check raises WireError carrying the identity
# recovered so far, so even a rejected frame gets a result addressed to it.


@dataclass(frozen=True)
class _Ident:
    """Identity recovered from a header, attached to every error raised while validating it."""

    frame_id: str | None = None
    camera: str | None = None
    ts_ns: int | None = None

    def error(self, reason: str, detail: str) -> WireError:
        return WireError(reason, detail, frame_id=self.frame_id, camera=self.camera, ts_ns=self.ts_ns)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float, bools excluded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the float range
        return False


def _ok_text(value: Any, max_chars: int = MAX_TEXT_CHARS) -> bool:
    # Printable excludes control characters and lone surrogates, which would corrupt logs and
    # could not be re-encoded as UTF-8 downstream.
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable()


def _ok_camera(value: Any) -> bool:
    return isinstance(value, str) and CAMERA_PATTERN.fullmatch(value) is not None


def _ok_ts(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_TS_NS


def _recover(data: Mapping[str, Any]) -> _Ident:
    """The identity fields of a header that are individually valid; the others stay None."""
    frame_id = data.get("frame_id")
    camera = data.get("camera")
    ts_ns = data.get("ts_ns")
    return _Ident(
        frame_id=frame_id if _ok_text(frame_id) else None,
        camera=camera if _ok_camera(camera) else None,
        ts_ns=ts_ns if _ok_ts(ts_ns) else None,
    )


def _require(data: Mapping[str, Any], name: str, ident: _Ident) -> Any:
    value = data.get(name)
    if value is None:
        raise ident.error(MISSING_FIELD, f"required field {name!r} is missing")
    return value


def _check(ok: bool, ident: _Ident, name: str, value: Any, expected: str) -> None:
    if not ok:
        shown = repr(value)
        if len(shown) > MAX_TEXT_CHARS:
            shown = shown[:MAX_TEXT_CHARS] + "..."
        raise ident.error(BAD_FIELD, f"{name} must be {expected}, got {shown}")


def _check_version(data: Mapping[str, Any], ident: _Ident) -> int:
    version = data.get("v")
    if not (_is_int(version) and version == SCHEMA_VERSION):
        raise ident.error(BAD_VERSION, f"schema version v must be {SCHEMA_VERSION}, got {version!r}")
    return version


def _load_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    """Parse a UTF-8 JSON object, raising WireError(BAD_HEADER) for anything else."""
    try:
        text = str(raw, "utf-8")
    except (UnicodeDecodeError, TypeError) as exc:
        raise WireError(BAD_HEADER, f"{what} is not valid UTF-8 ({exc})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers past Python's digit limit;
        # RecursionError comes from deeply nested arrays.
        raise WireError(BAD_HEADER, f"{what} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WireError(BAD_HEADER, f"{what} must be a JSON object, got {type(data).__name__}")
    return data


def _finite(value: Any) -> Any:
    """JSON-ready copy: numeric scalars (numpy ones included) as int/float, non-finite as None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(_finite(data), separators=JSON_SEPARATORS, allow_nan=False).encode("utf-8")


def _as_buffer(part: Any) -> memoryview:
    """A flat byte view of one message part: bytes, memoryview, or a zmq.Frame (no copy)."""
    if hasattr(part, "buffer"):
        part = part.buffer
    elif hasattr(part, "bytes"):
        part = part.bytes
    return memoryview(part).cast("B")


def _buffers(parts: Any, expected: int, what: str) -> list[memoryview]:
    try:
        items = list(parts)
    except TypeError:
        raise WireError(BAD_PARTS, f"{what} must be a sequence of message parts") from None
    if len(items) != expected:
        raise WireError(BAD_PARTS, f"{what} must have {expected} parts, got {len(items)}")
    try:
        return [_as_buffer(part) for part in items]
    except (TypeError, ValueError, BufferError) as exc:
        raise WireError(BAD_PARTS, f"{what} part is not a contiguous byte buffer ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Frames (camera -> worker)


@dataclass(frozen=True, kw_only=True)
class FrameHeader:
    """Header of one incoming frame. ``shape`` and ``pixel_format`` describe raw payloads only."""

    v: int = SCHEMA_VERSION
    frame_id: str
    camera: str
    ts_ns: int
    encoding: str
    shape: tuple[int, ...] | None = None
    pixel_format: str | None = None
    product: str | None = None
    deadline_ms: float | None = None

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON; optional fields that are None are left out."""
        data: dict[str, Any] = {
            "v": self.v,
            "frame_id": self.frame_id,
            "camera": self.camera,
            "ts_ns": self.ts_ns,
            "encoding": self.encoding,
        }
        optional = {
            "shape": list(self.shape) if self.shape is not None else None,
            "pixel_format": self.pixel_format,
            "product": self.product,
            "deadline_ms": self.deadline_ms,
        }
        data.update({k: v for k, v in optional.items() if v is not None})
        return _dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | memoryview, limits: WireLimits = WireLimits()) -> "FrameHeader":
        """Parse and validate a header. Unknown keys are ignored (forward compatibility).

        For jpeg and png the image carries its own geometry, so ``shape`` and ``pixel_format``
        are not read and come back as None.

        Raises:
            WireError: with one of the reasons of the module docstring, and the identity fields
                that were individually valid.
        """
        try:
            size = memoryview(raw).nbytes
        except TypeError:
            raise WireError(BAD_HEADER, f"header must be bytes, got {type(raw).__name__}") from None
        if size > limits.max_header_bytes:  # before parsing: the limit bounds the parsing cost
            raise WireError(HEADER_TOO_LARGE, f"header is {size} bytes, limit {limits.max_header_bytes}")
        data = _load_object(raw, "header")
        ident = _recover(data)
        version = _check_version(data, ident)
        frame_id = _require(data, "frame_id", ident)
        camera = _require(data, "camera", ident)
        ts_ns = _require(data, "ts_ns", ident)
        encoding = _require(data, "encoding", ident)
        _check(_ok_text(frame_id), ident, "frame_id", frame_id, f"a printable string of 1..{MAX_TEXT_CHARS} chars")
        _check(_ok_camera(camera), ident, "camera", camera, f"a name matching {CAMERA_PATTERN.pattern}")
        _check(_ok_ts(ts_ns), ident, "ts_ns", ts_ns, "a non-negative int64 (nanoseconds)")
        product, deadline_ms = _hints(data, ident)
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise ident.error(UNKNOWN_ENCODING, f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        shape, pixel_format = None, None
        if encoding == "raw":
            pixel_format = _raw_pixel_format(data.get("pixel_format"), ident)
            shape = _raw_shape(data.get("shape"), pixel_format, limits, ident)
        return cls(
            v=version,
            frame_id=frame_id,
            camera=camera,
            ts_ns=ts_ns,
            encoding=encoding,
            shape=shape,
            pixel_format=pixel_format,
            product=product,
            deadline_ms=deadline_ms,
        )

    @property
    def raw_nbytes(self) -> int | None:
        """Bytes a raw payload must have (``H * W * C``), None for encoded images."""
        if self.encoding != "raw" or self.shape is None:
            return None
        return math.prod(self.shape)


def _hints(data: Mapping[str, Any], ident: _Ident) -> tuple[str | None, float | None]:
    """The optional ``product`` hint and ``deadline_ms`` of a frame header."""
    product = data.get("product")
    if product is not None:
        _check(_ok_text(product), ident, "product", product, f"a printable string of 1..{MAX_TEXT_CHARS} chars")
    deadline_ms = data.get("deadline_ms")
    if deadline_ms is not None:
        _check(_is_number(deadline_ms) and deadline_ms > 0, ident, "deadline_ms", deadline_ms, "a positive number")
        deadline_ms = float(deadline_ms)
    return product, deadline_ms


def _raw_pixel_format(value: Any, ident: _Ident) -> str:
    if not isinstance(value, str) or value not in CHANNELS:
        raise ident.error(BAD_PIXEL_FORMAT, f"raw pixel_format must be one of {tuple(CHANNELS)}, got {value!r}")
    return value


def _raw_shape(value: Any, pixel_format: str, limits: WireLimits, ident: _Ident) -> tuple[int, ...]:
    """Validate ``[H, W, C]`` (or ``[H, W]`` for gray8) against the pixel format and limits."""
    channels = CHANNELS[pixel_format]
    lengths = (HW_DIMS, HWC_DIMS) if channels == 1 else (HWC_DIMS,)
    if not isinstance(value, list) or len(value) not in lengths or not all(_is_int(d) and d > 0 for d in value):
        raise ident.error(BAD_SHAPE, f"raw shape must be [H, W, {channels}] of positive ints, got {value!r}")
    height, width, *rest = value
    if rest and rest[0] != channels:
        raise ident.error(BAD_SHAPE, f"{pixel_format} has {channels} channel(s), shape says {rest[0]}")
    if max(height, width) > limits.max_side or height * width > limits.max_pixels:
        raise ident.error(
            BAD_SHAPE,
            f"{height}x{width} exceeds the limits (side {limits.max_side}, {limits.max_pixels} pixels)",
        )
    return tuple(value)


def parse_frame(parts: Sequence[Any], limits: WireLimits = WireLimits()) -> tuple[FrameHeader, memoryview]:
    """Validate one incoming multipart message ``[header, payload]``.

    Args:
        parts: the message parts: bytes, memoryviews, or zmq.Frame objects (their ``buffer`` is
            used, so a ``copy=False`` receive is not copied here).
        limits: size limits.

    Returns:
        The validated header and a flat byte view of the payload (still backed by the message).

    Raises:
        WireError: for any input that breaks the contract; no other exception escapes.
    """
    header_raw, payload = _buffers(parts, FRAME_PARTS, "frame")
    header = FrameHeader.from_json(header_raw, limits)
    ident = _Ident(header.frame_id, header.camera, header.ts_ns)
    if payload.nbytes == 0:
        raise ident.error(EMPTY_PAYLOAD, "payload is empty")
    if payload.nbytes > limits.max_payload_bytes:
        raise ident.error(PAYLOAD_TOO_LARGE, f"payload is {payload.nbytes} bytes, limit {limits.max_payload_bytes}")
    expected = header.raw_nbytes
    if expected is not None and payload.nbytes != expected:
        detail = f"raw shape {list(header.shape)} needs {expected} bytes, payload has {payload.nbytes}"
        raise ident.error(PAYLOAD_SIZE_MISMATCH, detail)
    return header, payload


def encode_frame(header: FrameHeader, payload: bytes) -> list[bytes]:
    """The camera side: ``[header JSON, payload]``.

    Nothing is validated here, so a simulator can also send faulty frames; :func:`parse_frame`
    is the gatekeeper.
    """
    return [header.to_json(), bytes(payload)]


# ---------------------------------------------------------------------------------------------
# Results (worker -> consumers)


@dataclass(frozen=True)
class Latency:
    """Time spent per stage, in milliseconds; ``total`` runs from capture (``ts_ns``) to done."""

    queue: float = 0.0
    decode: float = 0.0
    infer: float = 0.0
    post: float = 0.0
    total: float = 0.0


LATENCY_FIELDS = tuple(Latency.__dataclass_fields__)


@dataclass(frozen=True, kw_only=True)
class HeatmapInfo:
    """How to read the heatmap part: a grayscale PNG whose pixel value is score * ``scale``."""

    encoding: str = "png"
    shape: tuple[int, int]
    scale: float


@dataclass(frozen=True, kw_only=True)
class Result:
    """The one result of one frame. Optional fields are None where they do not apply (errors)."""

    v: int = SCHEMA_VERSION
    frame_id: str
    camera: str
    line: str
    verdict: str
    reason: str | None = None
    score: float | None = None
    threshold: float | None = None
    product: str | None = None
    route_similarity: float | None = None
    model: str
    bank_epoch: int
    ts_ns: int
    done_ns: int
    latency_ms: Latency = field(default_factory=Latency)
    heatmap: HeatmapInfo | None = None

    @property
    def topic(self) -> str:
        """PUB topic ``result.<line>.<camera>``: subscribers filter by line and camera prefix."""
        return f"result.{self.line}.{self.camera}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with wire names; non-finite floats become None."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["latency_ms"] = {name: getattr(self.latency_ms, name) for name in LATENCY_FIELDS}
        if self.heatmap is not None:
            info = self.heatmap
            data["heatmap"] = {"encoding": info.encoding, "shape": list(info.shape), "scale": info.scale}
        return _finite(data)

    def to_json(self) -> bytes:
        return _dumps(self.to_dict())

    def to_frames(self, heatmap_png: bytes = b"") -> list[bytes]:
        """``[topic, header JSON, heatmap PNG or b""]`` for the PUB socket."""
        if heatmap_png and self.heatmap is None:
            raise WireError(BAD_FIELD, "a heatmap image needs heatmap info in the header")
        return [self.topic.encode("utf-8"), self.to_json(), bytes(heatmap_png)]

    @classmethod
    def from_frames(cls, parts: Sequence[Any]) -> tuple["Result", bytes]:
        """Parse and validate ``[topic, header, heatmap]`` on the consumer side.

        Raises:
            WireError: for any input that breaks the contract; no other exception escapes.
        """
        topic_raw, header_raw, heatmap_raw = _buffers(parts, RESULT_PARTS, "result")
        data = _load_object(header_raw, "result header")
        result = cls.from_dict(data)
        topic = bytes(topic_raw)
        if topic != result.topic.encode("utf-8"):
            raise _result_ident(result).error(BAD_FIELD, f"topic {topic[:MAX_TEXT_CHARS]!r} != {result.topic!r}")
        heatmap = bytes(heatmap_raw)
        if heatmap and result.heatmap is None:
            raise _result_ident(result).error(BAD_FIELD, "heatmap image sent without heatmap info")
        return result, heatmap

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Result":
        """Validate a result header dict (as from :meth:`to_dict` or a Redis stream entry)."""
        ident = _recover(data)
        version = _check_version(data, ident)
        _check_result_fields(data, ident)
        get = data.get
        return cls(
            v=version,
            frame_id=get("frame_id"),
            camera=get("camera"),
            line=get("line"),
            verdict=get("verdict"),
            reason=get("reason"),
            score=_opt_float(get("score")),
            threshold=_opt_float(get("threshold")),
            product=get("product"),
            route_similarity=_opt_float(get("route_similarity")),
            model=get("model"),
            bank_epoch=get("bank_epoch"),
            ts_ns=get("ts_ns"),
            done_ns=get("done_ns"),
            latency_ms=_latency(get("latency_ms"), ident),
            heatmap=_heatmap_info(get("heatmap"), ident),
        )

    @classmethod
    def for_error(
        cls,
        err: WireError,
        line: str,
        model: str,
        bank_epoch: int,
        now_ns: int,
        verdict: str = ERROR,
        latency_ms: Latency | None = None,
    ) -> "Result":
        """The result of a frame that could not be inspected, addressed from what ``err`` recovered.

        An unrecoverable ``frame_id`` becomes ``""`` and ``camera`` becomes ``"unknown"``; an
        unknown capture time becomes ``now_ns`` (the receive time is the best estimate left).
        """
        ts_ns = err.ts_ns if err.ts_ns is not None else now_ns
        return cls(
            frame_id=err.frame_id or "",
            camera=err.camera or UNKNOWN_CAMERA,
            line=line,
            verdict=verdict,
            reason=err.reason,
            model=model,
            bank_epoch=bank_epoch,
            ts_ns=ts_ns,
            done_ns=now_ns,
            latency_ms=latency_ms if latency_ms is not None else Latency(),
        )


RESULT_REQUIRED = ("frame_id", "camera", "line", "verdict", "model", "bank_epoch", "ts_ns", "done_ns", "latency_ms")


def _check_result_fields(data: Mapping[str, Any], ident: _Ident) -> None:
    """Presence and type of every scalar field of a result header."""
    for name in RESULT_REQUIRED:
        if name not in data:
            raise ident.error(MISSING_FIELD, f"required field {name!r} is missing")
    get = data.get
    # An error result may carry no frame id when none could be recovered from the frame.
    frame_id = get("frame_id")
    _check(frame_id == "" or _ok_text(frame_id), ident, "frame_id", frame_id, f"a string of 0..{MAX_TEXT_CHARS} chars")
    _check(_ok_camera(get("camera")), ident, "camera", get("camera"), f"a name matching {CAMERA_PATTERN.pattern}")
    line = get("line")
    ok_line = isinstance(line, str) and LINE_PATTERN.fullmatch(line) is not None
    _check(ok_line, ident, "line", line, f"a name matching {LINE_PATTERN.pattern}")
    _check(get("verdict") in VERDICTS, ident, "verdict", get("verdict"), f"one of {VERDICTS}")
    for name in ("reason", "product"):
        _check(get(name) is None or _ok_text(get(name)), ident, name, get(name), "a printable string or null")
    _check(_ok_text(get("model")), ident, "model", get("model"), "a model id")
    for name in ("bank_epoch", "ts_ns", "done_ns"):
        _check(_ok_ts(get(name)), ident, name, get(name), "a non-negative int64")
    for name in ("score", "threshold", "route_similarity"):
        _check(get(name) is None or _is_number(get(name)), ident, name, get(name), "a finite number or null")


def _result_ident(result: Result) -> _Ident:
    return _Ident(result.frame_id or None, result.camera, result.ts_ns)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _latency(value: Any, ident: _Ident) -> Latency:
    """Latency object; a null stage (a non-finite value on the sending side) reads back as NaN."""
    _check(isinstance(value, dict), ident, "latency_ms", value, f"an object with {LATENCY_FIELDS}")
    stages = {}
    for name in LATENCY_FIELDS:
        stage = value.get(name)
        _check(stage is None or _is_number(stage), ident, f"latency_ms.{name}", stage, "a finite number or null")
        stages[name] = math.nan if stage is None else float(stage)
    return Latency(**stages)


def _heatmap_info(value: Any, ident: _Ident) -> HeatmapInfo | None:
    if value is None:
        return None
    expected = '{"encoding": "png", "shape": [H, W], "scale": positive number}'
    _check(isinstance(value, dict), ident, "heatmap", value, expected)
    shape, scale = value.get("shape"), value.get("scale")
    ok = (
        value.get("encoding") == "png"
        and isinstance(shape, list)
        and len(shape) == HW_DIMS
        and all(_is_int(d) and d > 0 for d in shape)
        and _is_number(scale)
        and scale > 0
    )
    _check(ok, ident, "heatmap", value, expected)
    return HeatmapInfo(shape=(shape[0], shape[1]), scale=float(scale))
