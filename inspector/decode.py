"""Decode stage: frame payload -> RGB array, and the heatmap PNG of a result (DESIGN sections 6, 7).

The payload is untrusted. :func:`decode_image` returns an ``(H, W, 3)`` uint8 RGB array or raises
:class:`DecodeError`, a :class:`~inspector.wire.WireError`, so the worker catches one type and
turns it into an ``error`` result. Reasons added to those of :mod:`inspector.wire`:

=================  ===============================================================================
reason             meaning
=================  ===============================================================================
corrupt_image      Pillow cannot decode the payload: garbage, truncated file, damaged data
image_too_large    the image header declares a side over ``WireLimits.max_side`` or more pixels
                   than ``WireLimits.max_pixels``; checked before any pixel is decoded, so a
                   decompression bomb never allocates its pixels
encoding_mismatch  the header says jpeg but the payload is a PNG, or the other way round
=================  ===============================================================================

Truncated JPEG/PNG files are rejected: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its
default (False), and nothing in this package may set it, as it is process-wide; a PNG must also
end with its IEND chunk.
"""

from __future__ import annotations

import io
import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .wire import (
    BAD_SHAPE,
    CHANNELS,
    CORRUPT_IMAGE,
    ENCODING_MISMATCH,
    IMAGE_TOO_LARGE,
    HW_DIMS,
    HWC_DIMS,
    PAYLOAD_SIZE_MISMATCH,
    UNKNOWN_ENCODING,
    FrameHeader,
    WireError,
    WireLimits,
)


JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker, then the 0xFF that starts the next marker
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"  # the fixed 8-byte PNG signature
# A PNG ends with this fixed 12-byte chunk (length 0, type, CRC). Pillow stops reading once it has
# the pixels, so without this check a PNG cut anywhere after its last image data would pass.
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
MAGIC = {"jpeg": JPEG_MAGIC, "png": PNG_MAGIC}
PILLOW_FORMAT = {"jpeg": "JPEG", "png": "PNG"}  # the only Pillow plugin tried for each encoding

RGB_CHANNELS = 3
RGBA_CHANNELS = 4
U8_MAX = 255
U16_MAX = 65535
# Pillow modes of 16-bit (and 32-bit integer) grayscale; their values are scaled, not clipped.
WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Heatmaps are encoded once per frame on the hot path. On a smooth 256 x 256 map, zlib level 1
# took about a sixth of the time of Pillow's default level 6 for a file about 15% larger.
HEATMAP_PNG_COMPRESS_LEVEL = 1
DEFAULT_JPEG_QUALITY = 90  # camera-typical quality: artefacts well below the defects we look for
# A JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at least this
# multiple of the model's input side; the bilinear resize then filters the rest. At 256 px a 5 MP
# camera JPEG is prepared 1.9 times faster and a 12 MP one 8.3 times, 0.16-0.20 grey levels from
# the full decode's input on average (3 at most); a margin of 1 was faster at 5 MP (4.6 times) but
# up to 28 grey levels off on a real pcb file (benchmarks/decode.py, benchmarks/results/decode.json).
# No image of the industrial set is large enough to be reduced at 256 px.
JPEG_DRAFT_MARGIN = 2


class DecodeError(WireError):
    """A payload that passed the wire checks but is not a usable image."""


def _fail(header: FrameHeader | None, reason: str, detail: str) -> DecodeError:
    if header is None:
        return DecodeError(reason, detail)
    return DecodeError(reason, detail, frame_id=header.frame_id, camera=header.camera, ts_ns=header.ts_ns)


def decode_image(
    header: FrameHeader, payload: memoryview | bytes, limits: WireLimits = WireLimits(),
    reduce_to: int | None = None,
) -> np.ndarray:
    """Decode a frame payload to RGB.

    EXIF orientation is not applied: the pixel grid is used as captured, since the heatmap of the
    result refers to it. An alpha channel is dropped (not composited).

    Args:
        header: the validated frame header (its encoding, and for raw its shape and pixel format).
        payload: the payload bytes.
        limits: ``max_side`` and ``max_pixels`` bound the declared image size.
        reduce_to: the side the image will be resized to, if known: a JPEG at least twice that
            size on both sides is decoded at a reduced scale (1/2, 1/4 or 1/8 in the JPEG's own
            DCT, Pillow's draft mode) that keeps both sides at least ``reduce_to``, instead of
            decoding every pixel to throw most away. Other encodings ignore it. The worker,
            registration and the trainer all pass ``draft_side(input size)``
            (:func:`prepare_frame`, :func:`file_to_model_input`), so they see the same pixels.

    Returns:
        ``(H, W, 3)`` uint8 RGB, C-contiguous, writable, owning its memory (the message buffer
        can be released).

    Raises:
        DecodeError: for any payload that cannot be decoded; no other exception escapes.
    """
    try:
        view = memoryview(payload).cast("B")
    except (TypeError, ValueError, BufferError) as exc:
        raise _fail(header, CORRUPT_IMAGE, f"payload is not a contiguous byte buffer ({exc})") from None
    if header.encoding == "raw":
        return _decode_raw(header, view)
    if header.encoding in PILLOW_FORMAT:
        return _decode_encoded(header, view, limits, reduce_to)
    raise _fail(header, UNKNOWN_ENCODING, f"cannot decode encoding {header.encoding!r}")


def _decode_raw(header: FrameHeader, view: memoryview) -> np.ndarray:
    shape, pixel_format = header.shape, header.pixel_format
    if shape is None or len(shape) not in (HW_DIMS, HWC_DIMS) or pixel_format not in CHANNELS:
        raise _fail(header, BAD_SHAPE, f"raw frame needs a shape and pixel format, got {shape}, {pixel_format}")
    height, width, *rest = shape
    channels = rest[0] if rest else 1
    if channels != CHANNELS[pixel_format]:
        raise _fail(header, BAD_SHAPE, f"{pixel_format} has {CHANNELS[pixel_format]} channel(s), shape says {channels}")
    if view.nbytes != height * width * channels:
        raise _fail(header, PAYLOAD_SIZE_MISMATCH, f"shape {list(shape)} does not match {view.nbytes} bytes")
    pixels = np.frombuffer(view, dtype=np.uint8).reshape(height, width, channels)  # (H, W, C)
    if pixel_format == "gray8":
        return np.repeat(pixels, RGB_CHANNELS, axis=2)  # (H, W, 3), a new array
    if pixel_format == "bgr8":
        pixels = pixels[:, :, ::-1]
    return pixels.copy()  # (H, W, 3), C order, detached from the message buffer


def _decode_encoded(header: FrameHeader, view: memoryview, limits: WireLimits,
                    reduce_to: int | None = None) -> np.ndarray:
    _check_magic(header, view)
    if header.encoding == "png" and view[-len(PNG_END) :] != PNG_END:
        raise _fail(header, CORRUPT_IMAGE, "PNG is truncated (it does not end with the IEND chunk)")
    image = _open(view, PILLOW_FORMAT[header.encoding], header)
    try:
        _check_size(image, limits, header)
        if reduce_to is not None and header.encoding == "jpeg":
            _reduce(image, reduce_to)
        return _to_rgb(image, header)
    finally:
        image.close()


def _check_magic(header: FrameHeader, view: memoryview) -> None:
    """Reject a payload that is plainly another format than declared, before Pillow sees it."""
    declared = header.encoding
    if view[: len(MAGIC[declared])] == MAGIC[declared]:
        return
    for other, magic in MAGIC.items():
        if other != declared and view[: len(magic)] == magic:
            raise _fail(header, ENCODING_MISMATCH, f"header says {declared} but the payload is a {other}")
    raise _fail(header, CORRUPT_IMAGE, f"payload does not start with the {declared} signature")


def _open(data: Any, pillow_format: str | None, header: FrameHeader | None) -> Image.Image:
    """Read the image header only (no pixels yet), restricted to one Pillow plugin (any plugin
    with ``pillow_format`` None: a file that is neither PNG nor JPEG)."""
    try:
        return Image.open(io.BytesIO(data), formats=[pillow_format] if pillow_format else None)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard, at open, for sizes far past our limits. Between its two thresholds
        # (about 89 and 179 MP) it only warns, which raises here only where warnings were made
        # errors; otherwise Python's default filter prints it once and _check_size rejects.
        raise _fail(header, IMAGE_TOO_LARGE, str(exc)) from None
    except Exception as exc:
        # Pillow reports malformed data with many exception types (OSError, SyntaxError,
        # ValueError, struct.error, zlib.error, EOFError, ...): all mean the same here.
        detail = f"cannot read the {pillow_format or 'image'} header ({type(exc).__name__}: {exc})"
        raise _fail(header, CORRUPT_IMAGE, detail) from None


def _reduce(image: Image.Image, side: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale that keeps both sides at least ``side``."""
    if side <= 0:
        raise ValueError(f"reduce_to must be positive, got {side}")
    try:
        image.draft(image.mode, (side, side))
    except Exception:  # an undecodable header surfaces, with its reason, when the pixels load
        pass


def _check_size(image: Image.Image, limits: WireLimits, header: FrameHeader | None) -> None:
    width, height = image.size
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise _fail(
            header,
            IMAGE_TOO_LARGE,
            f"image declares {width}x{height}, limits are side {limits.max_side}, {limits.max_pixels} pixels",
        )


def _to_rgb(image: Image.Image, header: FrameHeader | None) -> np.ndarray:
    """Decode the pixels and convert any mode to ``(H, W, 3)`` uint8 RGB."""
    width, height = image.size
    try:
        image.load()
        if image.mode in WIDE_GRAY_MODES:
            gray = _wide_to_u8(np.asarray(image))  # (H, W)
            rgb = np.repeat(gray[:, :, None], RGB_CHANNELS, axis=2)  # (H, W, 3)
        else:
            rgb = np.array(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3)
    except Exception as exc:
        # Truncated or damaged data surfaces only here, when the pixels are decoded; Pillow uses
        # the same range of exception types as when opening.
        raise _fail(header, CORRUPT_IMAGE, f"cannot decode the image ({type(exc).__name__}: {exc})") from None
    if rgb.shape != (height, width, RGB_CHANNELS) or rgb.dtype != np.uint8:
        raise _fail(header, CORRUPT_IMAGE, f"decoded to {rgb.shape} {rgb.dtype}, expected ({height}, {width}, 3) uint8")
    return rgb


def pillow_to_rgb(image: Image.Image) -> np.ndarray:
    """Any opened Pillow image -> ``(H, W, 3)`` uint8 RGB, converted as frames are (16-bit scaled).

    Raises:
        DecodeError: the pixels cannot be decoded.
    """
    return _to_rgb(image, None)


def decode_file(data: bytes, limits: WireLimits = WireLimits(), reduce_to: int | None = None) -> np.ndarray:
    """An image file's bytes -> ``(H, W, 3)`` uint8 RGB, exactly as the worker decodes the same
    file sent as a frame.

    This is the one image reader of the project: the worker (PNG and JPEG frames), registration,
    the camera simulator and the trainer all get their pixels here, so a product is fitted,
    registered and served on the same pixels. PNG and JPEG go through :func:`decode_image`; other
    formats a file may have (BMP, TIFF, WebP) are converted by Pillow the same way (16-bit grey
    scaled, alpha dropped). ``reduce_to`` as for :func:`decode_image`.

    Raises:
        DecodeError: the bytes are not a readable image within ``limits``.
    """
    encoding = next((e for e, magic in MAGIC.items() if data.startswith(magic)), None)
    if encoding is not None:
        header = FrameHeader(frame_id="file", camera="file", ts_ns=0, encoding=encoding)
        return decode_image(header, data, limits, reduce_to)
    image = _open(data, None, None)
    try:
        _check_size(image, limits, None)
        return _to_rgb(image, None)
    finally:
        image.close()


def draft_side(size: int) -> int:
    """The ``reduce_to`` side for a model input of ``size``: ``JPEG_DRAFT_MARGIN`` times it."""
    return size * JPEG_DRAFT_MARGIN


def prepare_frame(header: FrameHeader, payload: memoryview | bytes, limits: WireLimits, size: int) -> np.ndarray:
    """A frame payload -> the model's ``(size, size, 3)`` uint8 input: a large JPEG decoded at the
    draft scale (:func:`draft_side`), then :func:`resize_square`.

    Raises:
        DecodeError: as :func:`decode_image`.
    """
    return resize_square(decode_image(header, payload, limits, draft_side(size)), size)


def file_to_model_input(data: bytes, size: int, limits: WireLimits = WireLimits()) -> np.ndarray:
    """An image file's bytes -> the model's ``(size, size, 3)`` uint8 input, exactly as
    :func:`prepare_frame` prepares the same file sent as a frame.

    Raises:
        DecodeError: as :func:`decode_file`.
    """
    return resize_square(decode_file(data, limits, draft_side(size)), size)


def load_image_file(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (:func:`decode_file`, in full), or with ``size``
    the model's ``(size, size, 3)`` input for that file (:func:`file_to_model_input`).

    Raises:
        DecodeError: the file is not a readable image (the message names it).
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        return decode_file(data) if size is None else file_to_model_input(data, size)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"{path}: {exc.detail}") from None


def _wide_to_u8(gray: np.ndarray) -> np.ndarray:
    """Scale 16-bit grayscale ``[0, 65535]`` to ``[0, 255]`` with rounding (65535 -> 255)."""
    wide = np.clip(gray, 0, U16_MAX).astype(np.uint32)  # (H, W); 32-bit int modes clipped to 16 bits
    return ((wide * U8_MAX + U16_MAX // 2) // U16_MAX).astype(np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(H, W, 3)`` uint8 to ``(size, size, 3)``; no work when already that size."""
    if image.ndim != HWC_DIMS or image.shape[2] != RGB_CHANNELS or image.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(resized)  # (size, size, 3)


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"heatmap scale must be a positive finite number, got {scale!r}")


def encode_heatmap(calibrated: np.ndarray, scale: float) -> bytes:
    """Grayscale PNG of a calibrated anomaly map: pixel = ``clip(round(value * scale), 0, 255)``.

    A consumer recovers the map to within ``0.5 / scale`` (rounding) inside ``[0, 255 / scale]``.
    NaN becomes 0, +inf 255.

    Args:
        calibrated: ``(H, W)`` float map.
        scale: positive multiplier chosen so the range of interest fits in 8 bits.
    """
    if calibrated.ndim != HW_DIMS:
        raise ValueError(f"expected an (H, W) map, got shape {calibrated.shape}")
    _check_scale(scale)
    scaled = np.nan_to_num(calibrated.astype(np.float64) * scale, nan=0.0, posinf=U8_MAX, neginf=0.0)  # (H, W)
    pixels = np.clip(np.rint(scaled), 0, U8_MAX).astype(np.uint8)  # (H, W)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=HEATMAP_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_heatmap(png: bytes, scale: float, limits: WireLimits = WireLimits()) -> np.ndarray:
    """Inverse of :func:`encode_heatmap`: ``(H, W)`` float32 map (pixel values / scale).

    Raises:
        DecodeError: when ``png`` is not a readable 8-bit grayscale PNG within ``limits``.
    """
    _check_scale(scale)
    if bytes(png[: len(PNG_MAGIC)]) != PNG_MAGIC or bytes(png[-len(PNG_END) :]) != PNG_END:
        raise _fail(None, CORRUPT_IMAGE, "heatmap is not a complete PNG")
    image = _open(png, PILLOW_FORMAT["png"], None)
    try:
        _check_size(image, limits, None)
        if image.mode != "L":
            raise _fail(None, CORRUPT_IMAGE, f"heatmap must be 8-bit grayscale, got mode {image.mode}")
        try:
            pixels = np.asarray(image)  # (H, W) uint8
        except Exception as exc:  # same decoder failures as in _to_rgb
            raise _fail(None, CORRUPT_IMAGE, f"cannot decode the heatmap ({type(exc).__name__}: {exc})") from None
    finally:
        image.close()
    return pixels.astype(np.float32) / np.float32(scale)


def _to_image(image: np.ndarray) -> Image.Image:
    layouts_ok = image.ndim == HW_DIMS or (image.ndim == HWC_DIMS and image.shape[2] in (RGB_CHANNELS, RGBA_CHANNELS))
    if image.dtype != np.uint8 or not layouts_ok:
        raise ValueError(f"expected uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.shape} {image.dtype}")
    return Image.fromarray(np.ascontiguousarray(image))


def encode_jpeg(image: np.ndarray, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """JPEG bytes of ``(H, W, 3)`` RGB or ``(H, W)`` gray uint8 (camera simulator, tests)."""
    if image.ndim == HWC_DIMS and image.shape[2] != RGB_CHANNELS:
        raise ValueError(f"JPEG takes (H, W, 3) or (H, W), got {image.shape}")
    buffer = io.BytesIO()
    _to_image(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA uint8."""
    buffer = io.BytesIO()
    _to_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


OVERLAY_FULL = 2.0  # calibrated value drawn fully red: twice the product's upper anchor, far past its good tail
OVERLAY_ALPHA = 0.6


def heat_overlay(image: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8: ``image`` turned red where its calibrated map is high (0 none,
    ``OVERLAY_FULL`` and above at ``OVERLAY_ALPHA``); a map of another size is resized to the image."""
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    heat = np.nan_to_num(np.asarray(calibrated, dtype=np.float32), nan=0.0, posinf=OVERLAY_FULL)
    if heat.shape != rgb.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize((rgb.shape[1], rgb.shape[0]), Image.BILINEAR))
    level = np.clip(heat / OVERLAY_FULL, 0.0, 1.0)[..., None]
    red = np.zeros_like(rgb)
    red[..., 0] = 255
    return (rgb * (1 - OVERLAY_ALPHA * level) + red * OVERLAY_ALPHA * level).astype(np.uint8)
