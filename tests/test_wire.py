"""Wire format v1: round trips, every rejection with its reason code, and fuzzing."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspector import wire
from inspector.wire import (
    ERROR,
    FAIL,
    MAX_HEADER_BYTES,
    PASS,
    SCHEMA_VERSION,
    TIMEOUT,
    VERDICTS,
    FrameHeader,
    HeatmapInfo,
    Latency,
    Result,
    WireError,
    WireLimits,
    encode_frame,
    parse_frame,
)

# Every reason this module may raise; a fuzzed input must map to one of them.
WIRE_REASONS = {
    wire.BAD_PARTS,
    wire.HEADER_TOO_LARGE,
    wire.BAD_HEADER,
    wire.BAD_VERSION,
    wire.MISSING_FIELD,
    wire.BAD_FIELD,
    wire.UNKNOWN_ENCODING,
    wire.BAD_SHAPE,
    wire.BAD_PIXEL_FORMAT,
    wire.PAYLOAD_TOO_LARGE,
    wire.PAYLOAD_SIZE_MISMATCH,
    wire.EMPTY_PAYLOAD,
}

# Fuzzing budget: parsing one message costs well under a millisecond, so a few hundred examples
# per property keep all fuzz tests of this file to about two seconds on 2 cores while still
# reaching every branch of the validators (hypothesis shrinks any failure to a minimal input).
# Seeded (derandomize) so runs are reproducible, and no example database is written. An example
# that takes 1 s would mean pathological parsing cost, which is itself a failure.
FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=1),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TS_NS = 1_700_000_000_000_000_000
H, W = 4, 5  # a tiny raw frame: the wire checks do not depend on size


def header(**overrides: Any) -> dict[str, Any]:
    """A valid jpeg frame header as a dict; ``overrides`` set (or with ``...`` remove) fields."""
    data: dict[str, Any] = {"v": 1, "frame_id": "f-1", "camera": "cam-1", "ts_ns": TS_NS, "encoding": "jpeg"}
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not ...}


def raw_header(pixel_format: str = "rgb8", shape: Any = (H, W, 3), **overrides: Any) -> dict[str, Any]:
    return header(encoding="raw", pixel_format=pixel_format, shape=list(shape), **overrides)


def frame(data: dict[str, Any], payload: bytes = b"\xff\xd8\xff payload") -> list[bytes]:
    return [json.dumps(data).encode(), payload]


def reject(parts: Any, reason: str, limits: WireLimits = WireLimits()) -> WireError:
    with pytest.raises(WireError) as info:
        parse_frame(parts, limits)
    assert info.value.reason == reason, str(info.value)
    return info.value


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "fh",
    [
        FrameHeader(frame_id="f-1", camera="cam-1", ts_ns=TS_NS, encoding="jpeg"),
        FrameHeader(frame_id="f-2", camera="c.2_b", ts_ns=0, encoding="png", product="valve-b", deadline_ms=40.0),
        FrameHeader(frame_id="f-3", camera="c", ts_ns=1, encoding="raw", shape=(H, W, 3), pixel_format="bgr8"),
        FrameHeader(frame_id="f-4", camera="c", ts_ns=1, encoding="raw", shape=(H, W), pixel_format="gray8"),
    ],
)
def test_frame_header_json_round_trip(fh: FrameHeader) -> None:
    raw = fh.to_json()
    assert b" " not in raw  # compact separators
    assert FrameHeader.from_json(raw) == fh


@pytest.mark.parametrize(
    ("encoding", "pixel_format", "shape"),
    [
        ("jpeg", None, None),
        ("png", None, None),
        ("raw", "rgb8", (H, W, 3)),
        ("raw", "bgr8", (H, W, 3)),
        ("raw", "gray8", (H, W, 1)),
        ("raw", "gray8", (H, W)),
    ],
)
def test_encode_parse_round_trip(encoding: str, pixel_format: str | None, shape: tuple[int, ...] | None) -> None:
    fh = FrameHeader(
        frame_id="f-9", camera="cam-1", ts_ns=TS_NS, encoding=encoding, shape=shape, pixel_format=pixel_format
    )
    payload = bytes(range(math.prod(shape))) if shape else b"\x89PNG\r\n\x1a\n or jpeg bytes"
    parsed, view = parse_frame(encode_frame(fh, payload), WireLimits())
    assert parsed == fh
    assert isinstance(view, memoryview) and bytes(view) == payload


def test_defaults_and_forward_compatibility() -> None:
    parsed = FrameHeader.from_json(json.dumps(header(deadline_ms=25, future_field={"x": 1})).encode())
    assert parsed.deadline_ms == 25.0 and isinstance(parsed.deadline_ms, float)
    assert parsed.product is None and parsed.shape is None and parsed.v == SCHEMA_VERSION
    # Geometry fields only describe raw payloads; an encoded image carries its own.
    parsed = FrameHeader.from_json(json.dumps(header(shape="anything", pixel_format=7)).encode())
    assert parsed.shape is None and parsed.pixel_format is None


def test_parse_frame_takes_zmq_frames_without_copy() -> None:
    payload = bytes(range(H * W * 3))
    parts = [zmq.Frame(json.dumps(raw_header()).encode()), zmq.Frame(payload)]
    parsed, view = parse_frame(parts, WireLimits())
    assert parsed.shape == (H, W, 3) and bytes(view) == payload
    assert view.obj is parts[1].buffer.obj  # a view on the received frame, not a copy


def test_parse_frame_over_a_zmq_socket() -> None:
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        pull.bind("inproc://wire-test")
        push.connect("inproc://wire-test")
        fh = FrameHeader(frame_id="f", camera="c", ts_ns=1, encoding="raw", shape=(H, W), pixel_format="gray8")
        push.send_multipart(encode_frame(fh, bytes(H * W)))
        assert pull.poll(1000)  # inproc delivery is immediate; the timeout only bounds a failure
        parts = pull.recv_multipart(copy=False)
        assert parse_frame(parts, WireLimits())[0] == fh
    finally:
        push.close(linger=0)
        pull.close(linger=0)


# ---------------------------------------------------------------------------------------------
# Rejections


@pytest.mark.parametrize("field", ["max_header_bytes", "max_payload_bytes", "max_side", "max_pixels"])
@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_limits_must_be_positive_ints(field: str, value: Any) -> None:
    with pytest.raises(ValueError):
        WireLimits(**{field: value})


def test_from_json_alone_checks_size_and_type() -> None:
    with pytest.raises(WireError) as info:
        FrameHeader.from_json(json.dumps(header(pad="x" * 100)).encode(), WireLimits(max_header_bytes=100))
    assert info.value.reason == wire.HEADER_TOO_LARGE
    with pytest.raises(WireError) as info:
        FrameHeader.from_json("a str, not bytes")  # type: ignore[arg-type]
    assert info.value.reason == wire.BAD_HEADER


def test_error_is_readable() -> None:
    err = reject([b"", b"x"], wire.BAD_HEADER)
    assert str(err).startswith("bad_header: header is not valid JSON (Expecting value")
    assert isinstance(err, ValueError)
    assert (err.frame_id, err.camera, err.ts_ns) == (None, None, None)


@pytest.mark.parametrize(
    "raw", [b"not json", b"{", b"[1, 2]", b'"text"', b"null", b"\xff\xfe{}", b"[" * 3000, b'{"v": 1,}']
)
def test_unparseable_header(raw: bytes) -> None:
    err = reject([raw, b"x"], wire.BAD_HEADER)
    assert err.frame_id is None and err.camera is None


@pytest.mark.parametrize("parts", [[], [b"{}"], [b"{}", b"x", b"y"], [b"a", b"b", b"c", b"d"], None, 5, [b"{}", "x"]])
def test_bad_parts(parts: Any) -> None:
    reject(parts, wire.BAD_PARTS)


def test_header_too_large_is_checked_before_parsing() -> None:
    data = header(pad="x" * MAX_HEADER_BYTES)
    err = reject(frame(data), wire.HEADER_TOO_LARGE)
    assert err.frame_id is None  # never parsed
    raw = json.dumps(header(pad="")).encode()
    padded = raw[:-1] + b" " * (MAX_HEADER_BYTES - len(raw)) + b"}"  # exactly at the limit: accepted
    assert parse_frame([padded, b"x"], WireLimits())[0].frame_id == "f-1"
    reject([b"{" * (MAX_HEADER_BYTES + 1), b"x"], wire.HEADER_TOO_LARGE)  # garbage too: size comes first


@pytest.mark.parametrize("field", ["frame_id", "camera", "ts_ns", "encoding"])
@pytest.mark.parametrize("absent", [..., None])
def test_missing_field(field: str, absent: Any) -> None:
    err = reject(frame(header(**{field: absent})), wire.MISSING_FIELD)
    assert field in err.detail
    assert err.frame_id == (None if field == "frame_id" else "f-1")
    assert err.camera == (None if field == "camera" else "cam-1")
    assert err.ts_ns == (None if field == "ts_ns" else TS_NS)


@pytest.mark.parametrize("version", [..., None, 0, 2, "1", 1.0, True])
def test_bad_version(version: Any) -> None:
    err = reject(frame(header(v=version)), wire.BAD_VERSION)
    assert (err.frame_id, err.camera, err.ts_ns) == ("f-1", "cam-1", TS_NS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frame_id", ""),
        ("frame_id", "x" * 129),
        ("frame_id", 17),
        ("frame_id", "tab\there"),
        ("camera", "cam/1"),
        ("camera", "cam 1"),
        ("camera", "cam-1\n"),
        ("camera", "c" * 65),
        ("camera", ""),
        ("camera", ["cam"]),
        ("ts_ns", -1),
        ("ts_ns", 1.5),
        ("ts_ns", "1"),
        ("ts_ns", True),
        ("ts_ns", 1 << 63),
        ("deadline_ms", 0),
        ("deadline_ms", -5),
        ("deadline_ms", "40"),
        ("deadline_ms", True),
        ("deadline_ms", float("nan")),
        ("deadline_ms", float("inf")),
        ("deadline_ms", 10**400),
        ("product", ""),
        ("product", "p" * 129),
        ("product", 5),
    ],
)
def test_bad_field(field: str, value: Any) -> None:
    err = reject(frame(header(**{field: value})), wire.BAD_FIELD)
    assert field in err.detail
    # The other identity fields are still recovered to address the error result.
    assert err.frame_id == (None if field == "frame_id" else "f-1")
    assert err.camera == (None if field == "camera" else "cam-1")
    assert err.ts_ns == (None if field == "ts_ns" else TS_NS)


def test_valid_edge_values() -> None:
    limits = WireLimits()
    for data in (
        header(frame_id="x" * 128, camera="A.b_c-9" * 9 + "a", ts_ns=0, product="p" * 128, deadline_ms=0.5),
        header(ts_ns=(1 << 63) - 1, frame_id="ünïcode frame"),
    ):
        assert parse_frame(frame(data), limits)[0].frame_id == data["frame_id"]


@pytest.mark.parametrize("encoding", ["gif", "JPEG", "", 5, ["raw"]])
def test_unknown_encoding(encoding: Any) -> None:
    err = reject(frame(header(encoding=encoding)), wire.UNKNOWN_ENCODING)
    assert err.frame_id == "f-1" and err.camera == "cam-1"


@pytest.mark.parametrize(
    ("pixel_format", "shape"),
    [
        ("rgb8", ...),
        ("rgb8", [H, W]),
        ("rgb8", [H, W, 4]),
        ("bgr8", [H, W, 1]),
        ("gray8", [H, W, 3]),
        ("rgb8", [H, W, 3, 1]),
        ("rgb8", [0, W, 3]),
        ("rgb8", [-H, W, 3]),
        ("rgb8", [H, 5.0, 3]),
        ("rgb8", [H, True, 3]),
        ("rgb8", "4x5x3"),
        ("rgb8", {"h": H}),
        ("gray8", [8193, 1]),
        ("gray8", [1, 8193]),
        ("gray8", [8192, 8192]),  # sides within max_side, pixels over max_pixels
    ],
)
def test_bad_shape(pixel_format: str, shape: Any) -> None:
    data = header(encoding="raw", pixel_format=pixel_format, shape=shape)
    err = reject(frame(data, bytes(H * W * 3)), wire.BAD_SHAPE)
    assert err.frame_id == "f-1" and err.camera == "cam-1"


@pytest.mark.parametrize("pixel_format", [..., None, "rgba8", "RGB8", "yuv422", 3])
def test_bad_pixel_format(pixel_format: Any) -> None:
    data = header(encoding="raw", shape=[H, W, 3], pixel_format=pixel_format)
    err = reject(frame(data, bytes(H * W * 3)), wire.BAD_PIXEL_FORMAT)
    assert err.frame_id == "f-1"


def test_payload_limits() -> None:
    limits = WireLimits(max_payload_bytes=100)
    assert parse_frame(frame(header(), bytes(100)), limits)
    err = reject(frame(header(), bytes(101)), wire.PAYLOAD_TOO_LARGE, limits)
    assert (err.frame_id, err.camera, err.ts_ns) == ("f-1", "cam-1", TS_NS)
    err = reject(frame(header(), b""), wire.EMPTY_PAYLOAD)
    assert err.frame_id == "f-1"


@pytest.mark.parametrize(
    ("pixel_format", "shape", "nbytes"),
    [("rgb8", (H, W, 3), H * W * 3 - 1), ("bgr8", (H, W, 3), H * W * 3 + 1), ("gray8", (H, W), H * W * 3)],
)
def test_raw_payload_size_mismatch(pixel_format: str, shape: tuple[int, ...], nbytes: int) -> None:
    err = reject(frame(raw_header(pixel_format, shape), bytes(nbytes)), wire.PAYLOAD_SIZE_MISMATCH)
    assert err.frame_id == "f-1" and err.camera == "cam-1"


# ---------------------------------------------------------------------------------------------
# Results


def make_result(**overrides: Any) -> Result:
    fields: dict[str, Any] = dict(
        frame_id="f-1",
        camera="cam-1",
        line="3",
        verdict=FAIL,
        reason="anomaly",
        score=1.75,
        threshold=1.2,
        product="valve-b",
        route_similarity=0.93,
        model="0123456789ab",
        bank_epoch=7,
        ts_ns=TS_NS,
        done_ns=TS_NS + 12_000_000,
        latency_ms=Latency(queue=1.0, decode=2.5, infer=6.0, post=1.5, total=12.0),
        heatmap=HeatmapInfo(shape=(64, 64), scale=100.0),
    )
    fields.update(overrides)
    return Result(**fields)


def test_result_round_trip() -> None:
    result = make_result()
    png = b"\x89PNG fake heatmap"
    parts = result.to_frames(png)
    assert parts[0] == b"result.3.cam-1" == result.topic.encode()
    assert b" " not in parts[1]
    back, heatmap = Result.from_frames(parts)
    assert back == result and heatmap == png
    back, heatmap = Result.from_frames([zmq.Frame(p) for p in parts])
    assert back == result and heatmap == png
    assert Result.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_result_without_heatmap_and_non_finite_floats() -> None:
    result = make_result(heatmap=None, score=float("nan"), route_similarity=float("inf"))
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # standard JSON: NaN and inf became null
    assert data["score"] is None and data["route_similarity"] is None and data["heatmap"] is None
    back, heatmap = Result.from_frames(result.to_frames())
    assert heatmap == b"" and back.score is None and back.route_similarity is None and back.threshold == 1.2
    with pytest.raises(WireError):
        result.to_frames(b"png without heatmap info")


def test_result_accepts_numpy_scalars() -> None:
    result = make_result(score=np.float32(0.5), bank_epoch=np.int64(3))
    back, _ = Result.from_frames(result.to_frames())
    assert back.score == 0.5 and back.bank_epoch == 3 and type(back.bank_epoch) is int


def test_result_for_error() -> None:
    err = reject(frame(header(encoding="gif")), wire.UNKNOWN_ENCODING)
    now = TS_NS + 5
    result = Result.for_error(err, line="3", model="m", bank_epoch=2, now_ns=now)
    assert (result.frame_id, result.camera, result.ts_ns, result.done_ns) == ("f-1", "cam-1", TS_NS, now)
    assert result.verdict == ERROR and result.reason == wire.UNKNOWN_ENCODING and result.score is None
    assert Result.from_frames(result.to_frames())[0] == result

    anonymous = Result.for_error(reject([b"junk", b"x"], wire.BAD_HEADER), "3", "m", 2, now, verdict=TIMEOUT)
    assert (anonymous.frame_id, anonymous.camera, anonymous.ts_ns) == ("", "unknown", now)
    assert anonymous.topic == "result.3.unknown" and anonymous.verdict == TIMEOUT
    assert Result.from_frames(anonymous.to_frames())[0] == anonymous


def result_parts(**changes: Any) -> list[bytes]:
    data = make_result().to_dict()
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not ...}
    return [b"result.3.cam-1", json.dumps(data).encode(), b""]


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        (result_parts(v=2), wire.BAD_VERSION),
        (result_parts(v=...), wire.BAD_VERSION),
        (result_parts(verdict="maybe"), wire.BAD_FIELD),
        (result_parts(verdict=None), wire.BAD_FIELD),
        (result_parts(model=...), wire.MISSING_FIELD),
        (result_parts(latency_ms=...), wire.MISSING_FIELD),
        (result_parts(latency_ms=[1, 2]), wire.BAD_FIELD),
        (result_parts(latency_ms={"queue": "1"}), wire.BAD_FIELD),
        (result_parts(score="high"), wire.BAD_FIELD),
        (result_parts(bank_epoch=-1), wire.BAD_FIELD),
        (result_parts(line="3.1"), wire.BAD_FIELD),
        (result_parts(heatmap={"encoding": "jpeg", "shape": [4, 4], "scale": 1}), wire.BAD_FIELD),
        (result_parts(heatmap={"encoding": "png", "shape": [4, 0], "scale": 1}), wire.BAD_FIELD),
        ([b"result.4.cam-1", *result_parts()[1:]], wire.BAD_FIELD),  # topic does not match the header
        ([*result_parts(heatmap=None)[:2], b"png bytes"], wire.BAD_FIELD),  # heatmap without info
        (result_parts()[:2], wire.BAD_PARTS),
        ([b"t", b"not json", b""], wire.BAD_HEADER),
    ],
)
def test_result_rejections(parts: list[bytes], reason: str) -> None:
    with pytest.raises(WireError) as info:
        Result.from_frames(parts)
    assert info.value.reason == reason, str(info.value)


def test_verdicts() -> None:
    assert VERDICTS == (PASS, FAIL, ERROR, TIMEOUT, wire.DROPPED)
    assert [make_result(verdict=v).verdict for v in VERDICTS] == list(VERDICTS)


# ---------------------------------------------------------------------------------------------
# Fuzzing: no input makes parse_frame or Result.from_frames raise anything but WireError

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)

# Headers come in two kinds: near-valid ones (a valid header with up to two fields replaced by
# arbitrary JSON and up to one removed), which drive the validators past the first check, and
# dictionaries of arbitrary values under the known keys.
valid_fields = {
    "v": st.just(SCHEMA_VERSION),
    "frame_id": st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=130),
    "camera": st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True),
    "ts_ns": st.integers(min_value=0, max_value=(1 << 63) - 1),
    "encoding": st.sampled_from(["jpeg", "png", "raw", "raw"]),
    "shape": st.tuples(st.integers(1, 6), st.integers(1, 6), st.sampled_from([(), (1,), (3,)])).map(
        lambda hwc: [hwc[0], hwc[1], *hwc[2]]
    ),
    "pixel_format": st.sampled_from(["rgb8", "bgr8", "gray8", "gray8"]),
}
optional_fields = {
    "product": st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=130),
    "deadline_ms": st.floats(min_value=0, allow_infinity=False) | st.integers(min_value=-1),
}
field_names = sorted({*valid_fields, *optional_fields})


def _near_valid(drawn: tuple[dict[str, Any], dict[str, Any], set[str]]) -> dict[str, Any]:
    base, replaced, removed = drawn
    return {k: v for k, v in {**base, **replaced}.items() if k not in removed}


near_valid_headers = st.tuples(
    st.fixed_dictionaries(valid_fields, optional=optional_fields),
    st.dictionaries(st.sampled_from(field_names), json_value, max_size=2),
    st.sets(st.sampled_from(field_names), max_size=1),
).map(_near_valid)
arbitrary_headers = st.dictionaries(st.sampled_from(field_names), json_value, max_size=len(field_names))
# Three in four examples are near-valid, so most reach the checks past the schema version.
NEAR_VALID_SHARE = 4
header_dicts = st.integers(min_value=1, max_value=NEAR_VALID_SHARE).flatmap(
    lambda k: arbitrary_headers if k == NEAR_VALID_SHARE else near_valid_headers
)


def _check_parse(parts: Any) -> None:
    try:
        fh, view = parse_frame(parts, WireLimits(max_payload_bytes=256))
    except WireError as err:
        assert err.reason in WIRE_REASONS
        return
    # Whatever was accepted is consistent: it round-trips and its payload matches its shape.
    assert FrameHeader.from_json(fh.to_json()) == fh
    assert view.nbytes > 0 and (fh.raw_nbytes is None or fh.raw_nbytes == view.nbytes)


@FUZZ
@given(st.lists(st.binary(max_size=4096), max_size=4))
def test_fuzz_parse_frame_with_arbitrary_parts(parts: list[bytes]) -> None:
    _check_parse(parts)


@FUZZ
@given(header_dicts, st.binary(min_size=1, max_size=300), st.booleans())
def test_fuzz_parse_frame_with_arbitrary_headers(data: dict[str, Any], payload: bytes, fit: bool) -> None:
    shape = data.get("shape")
    if fit and isinstance(shape, list) and all(isinstance(d, int) and 0 < d < H * W for d in shape):
        payload = bytes(math.prod(shape))  # the size a raw frame of this shape needs
    _check_parse([json.dumps(data).encode(), payload])


result_keys = sorted(make_result().to_dict())


@FUZZ
@given(
    st.lists(st.binary(max_size=2048), max_size=4)
    | st.tuples(
        st.sampled_from([b"result.3.cam-1", b"result.3.x", b""]),
        st.dictionaries(st.sampled_from(result_keys), json_value, max_size=len(result_keys)).map(
            lambda changes: json.dumps({**make_result().to_dict(), **changes}).encode()
        ),
        st.binary(max_size=16),
    ).map(list)
)
def test_fuzz_result_from_frames(parts: list[bytes]) -> None:
    try:
        result, heatmap = Result.from_frames(parts)
    except WireError as err:
        assert err.reason in WIRE_REASONS
        return
    assert Result.from_frames(result.to_frames(heatmap)) == (result, heatmap)
