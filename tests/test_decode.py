"""Decode stage: payload -> RGB, every image rejection with its reason, heatmaps, and fuzzing."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from inspector import decode, wire
from inspector.decode import (
    DecodeError,
    decode_heatmap,
    decode_image,
    encode_heatmap,
    encode_jpeg,
    encode_png,
    resize_square,
)
from inspector.wire import FrameHeader, WireError, WireLimits, encode_frame, parse_frame

DECODE_REASONS = {decode.CORRUPT_IMAGE, decode.IMAGE_TOO_LARGE, decode.ENCODING_MISMATCH}
RAW_REASONS = {wire.BAD_SHAPE, wire.PAYLOAD_SIZE_MISMATCH}

# Fuzzing budget: one small decode costs well under a millisecond, so 300 examples per property
# keep the fuzz tests of this file to a few seconds on 2 cores; mutated real images (below) reach
# Pillow's decoders, not just the signature check. Seeded, no example database written; an
# example taking 1 s would itself be a bug (a decoder stuck on crafted input).
FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=1),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Small limits in the fuzz tests, so a mutated size field is refused before any allocation.
FUZZ_LIMITS = WireLimits(max_side=64, max_pixels=64 * 64)

# A lossy round trip on a smooth gradient: quality 95 measured a max error of 4 levels on this
# image; 8 leaves room for other libjpeg builds' IDCT rounding while still catching a channel
# swap or a shift (errors of tens of levels).
JPEG_QUALITY = 95
JPEG_MAX_ERROR = 8

TS_NS = 1_700_000_000_000_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_GRAY, PNG_RGB = 0, 2  # PNG colour types
U16_TO_U8 = 257  # 65535 / 255: a 16-bit value v * 257 is exactly 8-bit v


def head(encoding: str, **fields: Any) -> FrameHeader:
    return FrameHeader(frame_id="f-1", camera="cam-1", ts_ns=TS_NS, encoding=encoding, **fields)


def rejected(header: FrameHeader, payload: bytes, reason: str, limits: WireLimits = WireLimits()) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_image(header, payload, limits)
    err = info.value
    assert err.reason == reason, str(err)
    assert (err.frame_id, err.camera, err.ts_ns) == ("f-1", "cam-1", TS_NS)  # the error is addressable
    return err


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk: any declared size, cheaply (``rows`` are filtered scanlines)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")


def scanlines(pixels: np.ndarray) -> bytes:
    """Filter type 0 (none) before each row of ``(H, W*bytes)`` big-endian pixel data."""
    return b"".join(b"\x00" + row.tobytes() for row in pixels)


@pytest.fixture
def image(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)  # (H, W, 3)


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 3, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)  # (H, W, 3)


# ---------------------------------------------------------------------------------------------
# Round trips through the wire


def through_wire(header: FrameHeader, payload: bytes) -> np.ndarray:
    parsed, view = parse_frame(encode_frame(header, payload), WireLimits())
    decoded = decode_image(parsed, view, WireLimits())
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
    assert decoded.flags.c_contiguous and decoded.flags.writeable
    assert not np.shares_memory(decoded, np.frombuffer(view, np.uint8))  # the message can be released
    return decoded


def test_png_round_trip_is_exact(image: np.ndarray) -> None:
    np.testing.assert_array_equal(through_wire(head("png"), encode_png(image)), image)


def test_jpeg_round_trip_within_tolerance() -> None:
    source = gradient()
    decoded = through_wire(head("jpeg"), encode_jpeg(source, JPEG_QUALITY))
    assert decoded.shape == source.shape
    assert np.abs(decoded.astype(int) - source).max() <= JPEG_MAX_ERROR


def test_raw_rgb8(image: np.ndarray) -> None:
    header = head("raw", shape=image.shape, pixel_format="rgb8")
    np.testing.assert_array_equal(through_wire(header, image.tobytes()), image)


def test_raw_bgr8_reverses_channels_exactly(image: np.ndarray) -> None:
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    decoded = through_wire(head("raw", shape=image.shape, pixel_format="bgr8"), bgr.tobytes())
    np.testing.assert_array_equal(decoded, image)
    assert decoded[0, 0, 0] == bgr[0, 0, 2] and decoded[0, 0, 2] == bgr[0, 0, 0]


@pytest.mark.parametrize("with_channel_axis", [True, False])
def test_raw_gray8_replicated(image: np.ndarray, with_channel_axis: bool) -> None:
    gray = image[:, :, 0]  # (H, W)
    shape = (*gray.shape, 1) if with_channel_axis else gray.shape
    decoded = through_wire(head("raw", shape=shape, pixel_format="gray8"), gray.tobytes())
    np.testing.assert_array_equal(decoded, np.repeat(gray[:, :, None], 3, axis=2))


def test_raw_checks_its_own_size() -> None:
    header = head("raw", shape=(2, 2, 3), pixel_format="rgb8")
    rejected(header, bytes(11), wire.PAYLOAD_SIZE_MISMATCH)
    rejected(head("raw", shape=(2, 2, 1), pixel_format="rgb8"), bytes(4), wire.BAD_SHAPE)


# ---------------------------------------------------------------------------------------------
# Colour modes


def test_rgba_drops_alpha(rng: np.random.Generator) -> None:
    rgba = rng.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(head("png"), encode_png(rgba)), rgba[:, :, :3])


def test_palette_with_transparency() -> None:
    palette = Image.new("P", (4, 3))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.putdata([0, 1, 2, 0] * 3)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    decoded = decode_image(head("png"), buffer.getvalue())
    np.testing.assert_array_equal(decoded[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 0]])


def test_gray_modes(image: np.ndarray) -> None:
    gray = image[:, :, 1]
    expected = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(decode_image(head("png"), encode_png(gray)), expected)
    gray_alpha = np.stack([gray, np.full_like(gray, 7)], axis=-1)  # (H, W, 2): mode LA
    buffer = io.BytesIO()
    Image.fromarray(gray_alpha).save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(head("png"), buffer.getvalue()), expected)
    jpeg = decode_image(head("jpeg"), encode_jpeg(gradient()[:, :, 0], JPEG_QUALITY))
    assert (jpeg[:, :, 0] == jpeg[:, :, 1]).all() and (jpeg[:, :, 1] == jpeg[:, :, 2]).all()


def test_one_bit_png() -> None:
    bits = np.array([[0b10100000], [0b01000000]], dtype=np.uint8)  # 2 rows of 3 pixels, MSB first
    decoded = decode_image(head("png"), handmade_png(3, 2, 1, PNG_GRAY, scanlines(bits)))
    np.testing.assert_array_equal(decoded[:, :, 0], [[255, 0, 255], [0, 255, 0]])


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 257, 32768, 65535]], dtype=np.uint16)
    png = handmade_png(5, 1, 16, PNG_GRAY, scanlines(values.astype(">u2")))
    decoded = decode_image(head("png"), png)
    expected = np.round(values / 65535 * 255).astype(np.uint8)  # [0, 0, 1, 128, 255]
    np.testing.assert_array_equal(decoded[:, :, 0], expected)
    np.testing.assert_array_equal(decoded[:, :, 2], expected)


def test_sixteen_bit_rgb(image: np.ndarray) -> None:
    wide = image.astype(np.uint16) * U16_TO_U8  # (H, W, 3)
    rows = scanlines(wide.astype(">u2").reshape(image.shape[0], -1))
    decoded = decode_image(head("png"), handmade_png(image.shape[1], image.shape[0], 16, PNG_RGB, rows))
    np.testing.assert_array_equal(decoded, image)


def test_cmyk_jpeg() -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    decoded = decode_image(head("jpeg"), buffer.getvalue())
    assert np.abs(decoded.astype(int) - [0, 255, 255]).max() <= JPEG_MAX_ERROR  # full cyan


# ---------------------------------------------------------------------------------------------
# Rejections


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
@pytest.mark.parametrize("keep", [0.5, 0.9, -1])
def test_truncated_images_are_rejected(image: np.ndarray, encoding: str, keep: float) -> None:
    data = encode_jpeg(image) if encoding == "jpeg" else encode_png(image)
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    rejected(head(encoding), data[:cut], decode.CORRUPT_IMAGE)


def test_loading_truncated_images_stays_off() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing the package must not turn it on


@pytest.mark.parametrize(
    "payload", [b"\x00" * 100, b"garbage", b"\xff\xd8\xff" + b"\x00" * 100, b"\xff\xd8\xff", b"GIF89a....", b"x"]
)
def test_garbage_declared_as_jpeg(payload: bytes) -> None:
    rejected(head("jpeg"), payload, decode.CORRUPT_IMAGE)


def test_garbage_declared_as_png() -> None:
    rejected(head("png"), PNG_SIGNATURE + b"\x00" * 64 + b"\x00\x00\x00\x00IEND\xaeB`\x82", decode.CORRUPT_IMAGE)


def test_encoding_mismatch(image: np.ndarray) -> None:
    rejected(head("jpeg"), encode_png(image), decode.ENCODING_MISMATCH)
    rejected(head("png"), encode_jpeg(image), decode.ENCODING_MISMATCH)


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record any attempt to decode pixels (which is where Pillow allocates the image)."""
    calls: list[str] = []

    def spy(self: ImageFile.ImageFile) -> None:
        calls.append(self.format or "?")
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_decompression_bomb_is_refused_before_allocating(no_pixel_decoding: list[str]) -> None:
    bomb = handmade_png(20_000, 20_000, 1, PNG_GRAY, b"\x00")  # declares 400 MP in ~70 bytes
    assert len(bomb) < 100
    rejected(head("png"), bomb, decode.IMAGE_TOO_LARGE)
    assert no_pixel_decoding == []


@pytest.mark.parametrize(
    ("width", "height"),
    [(7000, 7000), (8193, 2), (2, 9000)],  # 49 MP (over max_pixels, sides fine), then one side too long
)
def test_real_png_over_limits_is_refused_from_its_header(no_pixel_decoding: list[str], width: int, height: int) -> None:
    row_bytes = (width + 7) // 8  # 1-bit pixels: the image itself stays a few MB, compressed to KB
    png = handmade_png(width, height, 1, PNG_GRAY, (b"\x00" + bytes(row_bytes)) * height)
    rejected(head("png"), png, decode.IMAGE_TOO_LARGE)
    assert no_pixel_decoding == []


def test_jpeg_declaring_a_huge_size(no_pixel_decoding: list[str]) -> None:
    data = bytearray(encode_jpeg(gradient(8, 8)))
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 9000, 9000)
    rejected(head("jpeg"), bytes(data), decode.IMAGE_TOO_LARGE)
    assert no_pixel_decoding == []


def test_configured_limits_apply(image: np.ndarray) -> None:
    height, width = image.shape[:2]
    rejected(head("png"), encode_png(image), decode.IMAGE_TOO_LARGE, WireLimits(max_side=width - 1))
    rejected(head("png"), encode_png(image), decode.IMAGE_TOO_LARGE, WireLimits(max_pixels=height * width - 1))
    assert decode_image(head("png"), encode_png(image), WireLimits(max_side=width, max_pixels=height * width)).shape


def test_decode_error_is_a_wire_error() -> None:
    assert issubclass(DecodeError, WireError) and issubclass(DecodeError, ValueError)
    err = rejected(head("jpeg"), b"garbage", decode.CORRUPT_IMAGE)
    assert str(err).startswith("corrupt_image: ")


# ---------------------------------------------------------------------------------------------
# Resize


def test_resize_square(image: np.ndarray) -> None:
    resized = resize_square(image, 16)
    assert resized.shape == (16, 16, 3) and resized.dtype == np.uint8 and resized.flags.c_contiguous
    constant = np.full((30, 50, 3), (10, 200, 99), dtype=np.uint8)
    # Bilinear weights sum to one, so a constant image stays exactly constant.
    np.testing.assert_array_equal(resize_square(constant, 7), np.full((7, 7, 3), (10, 200, 99)))
    square = image[:12, :12]
    same = resize_square(np.ascontiguousarray(square), 12)
    np.testing.assert_array_equal(same, square)


def test_resize_square_skips_work_at_the_right_size(image: np.ndarray) -> None:
    square = np.ascontiguousarray(image[:12, :12])
    assert resize_square(square, 12) is square


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32)]
)
def test_resize_square_refuses_other_layouts(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        resize_square(bad, 8)


# ---------------------------------------------------------------------------------------------
# Heatmaps

HEATMAP_SCALE = 80.0  # 255 / 80: calibrated values up to ~3.2 fit, in steps of 1/80


def test_heatmap_round_trip_within_quantisation(rng: np.random.Generator) -> None:
    calibrated = rng.uniform(-0.5, 3.5, size=(32, 24)).astype(np.float32)  # (H, W), spills both ends
    png = encode_heatmap(calibrated, HEATMAP_SCALE)
    with Image.open(io.BytesIO(png)) as stored:
        assert stored.format == "PNG" and stored.mode == "L" and stored.size == (24, 32)
    back = decode_heatmap(png, HEATMAP_SCALE)
    assert back.dtype == np.float32 and back.shape == calibrated.shape
    expected = np.clip(calibrated, 0.0, 255 / HEATMAP_SCALE)
    # Rounding to the nearest 1/scale step errs by at most half a step (plus float32 rounding).
    tolerance = 0.5 / HEATMAP_SCALE + 1e-6
    assert np.abs(back - expected).max() <= tolerance


def test_heatmap_non_finite_values() -> None:
    calibrated = np.array([[np.nan, np.inf, -np.inf, 1.0]], dtype=np.float32)
    back = decode_heatmap(encode_heatmap(calibrated, HEATMAP_SCALE), HEATMAP_SCALE)
    np.testing.assert_allclose(back, [[0.0, 255 / HEATMAP_SCALE, 0.0, 1.0]], atol=0.5 / HEATMAP_SCALE)


def test_heatmap_rejections(image: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_heatmap(np.zeros((2, 2, 1)), HEATMAP_SCALE)
    with pytest.raises(ValueError):
        encode_heatmap(np.zeros((2, 2)), 0.0)
    png = encode_heatmap(np.zeros((4, 4)), HEATMAP_SCALE)
    for bad in (b"", b"junk", png[: len(png) // 2], encode_png(image)):
        with pytest.raises(DecodeError) as info:
            decode_heatmap(bad, HEATMAP_SCALE)
        assert info.value.reason == decode.CORRUPT_IMAGE


# ---------------------------------------------------------------------------------------------
# Fuzzing: no payload makes decode_image or decode_heatmap raise anything but DecodeError


def _seed_images() -> dict[str, list[bytes]]:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    palette = io.BytesIO()
    Image.fromarray(small).convert("P").save(palette, format="PNG")
    wide = handmade_png(5, 6, 16, PNG_GRAY, scanlines(small[:, :, 0].astype(">u2")))
    return {
        "jpeg": [encode_jpeg(small), encode_jpeg(small[:, :, 0])],
        "png": [encode_png(small), palette.getvalue(), wide],
    }


SEEDS = _seed_images()


@st.composite
def mutated(draw: st.DrawFn, encoding: str) -> bytes:
    """A valid image with a few bytes overwritten and possibly cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS[encoding])))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) == 0:  # one in four is cut short; the others reach the decoders whole
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


def payloads(encoding: str) -> st.SearchStrategy[bytes]:
    """Mutated images, arbitrary bytes behind the right signature, and arbitrary bytes."""
    magic = decode.MAGIC[encoding]
    return mutated(encoding) | st.binary(max_size=512).map(lambda tail: magic + tail) | st.binary(max_size=512)


def _check_decode(header: FrameHeader, payload: bytes) -> None:
    try:
        decoded = decode_image(header, payload, FUZZ_LIMITS)
    except DecodeError as err:
        assert err.reason in DECODE_REASONS | RAW_REASONS
        return
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3


@FUZZ
@given(st.sampled_from(["jpeg", "png"]).flatmap(lambda enc: st.tuples(st.just(enc), payloads(enc))))
def test_fuzz_decode_encoded(case: tuple[str, bytes]) -> None:
    encoding, payload = case
    _check_decode(head(encoding), payload)


@FUZZ
@given(
    st.lists(st.integers(1, 6), min_size=2, max_size=3),
    st.sampled_from(["rgb8", "bgr8", "gray8"]),
    st.binary(max_size=120),
)
def test_fuzz_decode_raw(shape: list[int], pixel_format: str, payload: bytes) -> None:
    _check_decode(head("raw", shape=tuple(shape), pixel_format=pixel_format), payload)


@FUZZ
@given(st.binary(max_size=256) | mutated("png"))
def test_fuzz_decode_heatmap(png: bytes) -> None:
    try:
        heatmap = decode_heatmap(png, HEATMAP_SCALE, FUZZ_LIMITS)
    except DecodeError as err:
        assert err.reason in DECODE_REASONS
        return
    assert heatmap.dtype == np.float32 and heatmap.ndim == 2
