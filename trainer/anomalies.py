"""Synthetic anomalies made on the fly from normal images.

Every generator takes a normal uint8 RGB image (H, W, 3) and a
``numpy.random.Generator`` and returns ``(image, mask)``: a new uint8 image
with a visible defect and the bool mask (H, W) of the defect. Pixels outside
the mask are left exactly unchanged by every kind.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

Array = np.ndarray
KindFn = Callable[[Array, np.random.Generator, "Array | None"], "tuple[Array, Array]"]

MIN_COVER = 0.005  # smallest Perlin-blob area, as a fraction of the image
MAX_COVER = 0.15  # largest Perlin-blob area, as a fraction of the image
MIN_MEAN_CHANGE = 8.0  # mean |delta| (grey levels) inside the mask for a visible defect
CUTPASTE_MIN_CHANGE = 8  # per-pixel |delta| below this is treated as "not pasted"
_MAX_TRIES = 12  # bounded retries before falling back to a guaranteed defect
_HALF_RANGE = 128  # shifting a uint8 by half its range changes it by exactly 128


def _fade(t: Array) -> Array:
    """Perlin's quintic interpolant 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # coefficients of the quintic fade


def _axis_coords(length: int, periods: int) -> tuple[Array, Array]:
    """Cell index and fractional position along one axis."""
    pos = (np.arange(length, dtype=np.float32) + 0.5) * (periods / length)  # pixel centres
    cell = np.minimum(np.floor(pos).astype(np.intp), periods - 1)
    return cell, (pos - cell).astype(np.float32)


def _perlin_octave(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> Array:
    ry, rx = res
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    grad_x = np.cos(angles).astype(np.float32)
    grad_y = np.sin(angles).astype(np.float32)
    iy, fy = _axis_coords(shape[0], ry)
    ix, fx = _axis_coords(shape[1], rx)
    fy, fx = fy[:, None], fx[None, :]

    def corner(dy: int, dx: int) -> Array:
        # Row gather then column gather: much faster than 2-D fancy indexing.
        gx = grad_x[iy + dy][:, ix + dx]
        gy = grad_y[iy + dy][:, ix + dx]
        return gx * (fx - dx) + gy * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    n00, n01, n10, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    # sqrt(2) rescales the theoretical range (+-1/sqrt(2)) to about +-1.
    return (top + v * (bottom - top)) * np.float32(np.sqrt(2.0))


def perlin_noise(
    shape: tuple[int, int],
    res: int | tuple[int, int],
    rng: np.random.Generator,
    octaves: int = 1,
    persistence: float = 0.5,
) -> Array:
    """2-D gradient (Perlin) noise.

    Args:
        shape: Output (height, width).
        res: Number of noise periods along (y, x); an int applies to both.
        rng: Random generator for the gradient directions.
        octaves: Number of octaves summed (each doubles the resolution).
        persistence: Amplitude factor between consecutive octaves.

    Returns:
        float32 array of ``shape`` with values roughly in [-1, 1].
    """
    ry, rx = (res, res) if np.isscalar(res) else res
    if min(ry, rx) < 1:
        raise ValueError(f"res must be >= 1, got {res}")
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = 2**octave
        total += amplitude * _perlin_octave(shape, (int(ry) * scale, int(rx) * scale), rng)
        norm += amplitude
        amplitude *= persistence
    return total / np.float32(norm)


def _keep_largest(blobs: Array, keep: int) -> Array:
    labels, count = ndimage.label(blobs)
    if count <= keep:
        return blobs
    sizes = np.bincount(labels.ravel())[1:]
    largest = np.argsort(-sizes, kind="stable")[:keep] + 1
    return np.isin(labels, largest)


def _ellipse_mask(shape: tuple[int, int], rng: np.random.Generator, cover: float) -> Array:
    """Fallback blob: an ellipse of the requested area at a random place."""
    h, w = shape
    area = cover * h * w
    ratio = rng.uniform(0.5, 2.0)  # aspect ratio of the ellipse axes
    ry = np.sqrt(area * ratio / np.pi)
    rx = area / (np.pi * ry)
    cy = rng.uniform(ry, max(ry, h - ry))
    cx = rng.uniform(rx, max(rx, w - rx))
    yy, xx = np.ogrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def perlin_mask(
    size: int | tuple[int, int],
    rng: np.random.Generator,
    min_cover: float = MIN_COVER,
    max_cover: float = MAX_COVER,
) -> Array:
    """Random blob mask from thresholded Perlin noise.

    The noise scale, the threshold (through a target area) and the number of
    blobs kept (1 to 3) are random. Draws that end up empty or outside the
    area range are redrawn a bounded number of times, then an ellipse is used.

    Args:
        size: Side length, or (height, width).
        rng: Random generator.
        min_cover: Minimum fraction of the image covered.
        max_cover: Maximum fraction of the image covered.

    Returns:
        bool array with between ``min_cover`` and ``max_cover`` of it True.
    """
    shape = (size, size) if np.isscalar(size) else tuple(size)
    n_pixels = shape[0] * shape[1]
    for _ in range(_MAX_TRIES):
        res = tuple(rng.integers(2, 7, size=2))  # 2-6 periods: blobs of 1/12 to 1/4 of the side
        noise = perlin_noise(shape, res, rng)
        # Log-uniform target area; the margins leave room for dropped blobs.
        target = np.exp(rng.uniform(np.log(2.0 * min_cover), np.log(0.8 * max_cover)))
        k = min(n_pixels - 1, int((1.0 - target) * n_pixels))
        threshold = np.partition(noise.ravel(), k)[k]
        blobs = _keep_largest(noise > threshold, int(rng.integers(1, 4)))  # 1-3 blobs
        cover = blobs.mean()
        if min_cover <= cover <= max_cover:
            return blobs
    cover = rng.uniform(min_cover, max_cover)
    return _ellipse_mask(shape, rng, cover)


def _resize_float(array: Array, shape: tuple[int, int]) -> Array:
    """Bilinear resize of a float (h, w, 3) array in [0, 255]."""
    img = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


def _random_colours(rng: np.random.Generator, n: int) -> Array:
    return rng.uniform(0.0, 255.0, size=(n, 3)).astype(np.float32)


def _oriented_coord(shape: tuple[int, int], rng: np.random.Generator) -> tuple[Array, Array]:
    """Pixel coordinates rotated by a random angle: (along, across)."""
    theta = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    return xx * c + yy * s, -xx * s + yy * c


def _texture_colour_noise(shape: tuple[int, int], rng: np.random.Generator) -> Array:
    cell = int(rng.integers(1, 9))  # noise grain of 1-8 px
    small = (max(1, shape[0] // cell), max(1, shape[1] // cell))
    return _resize_float(_random_colours(rng, small[0] * small[1]).reshape(*small, 3), shape)


def _two_colour_map(weight: Array, rng: np.random.Generator) -> Array:
    a, b = _random_colours(rng, 2)
    return a + weight[..., None] * (b - a)


def _texture_stripes(shape: tuple[int, int], rng: np.random.Generator) -> Array:
    along, _ = _oriented_coord(shape, rng)
    period = rng.uniform(3.0, 24.0)  # stripe period in pixels
    weight = 0.5 + 0.5 * np.sin(along * np.float32(2.0 * np.pi / period))  # sine mapped to [0, 1]
    return _two_colour_map(weight, rng)


def _texture_checker(shape: tuple[int, int], rng: np.random.Generator) -> Array:
    along, across = _oriented_coord(shape, rng)
    cell = rng.uniform(3.0, 16.0)  # checker square side in pixels
    weight = (np.floor(along / cell) + np.floor(across / cell)) % 2
    return _two_colour_map(weight.astype(np.float32), rng)


def _texture_smooth(shape: tuple[int, int], rng: np.random.Generator) -> Array:
    res = int(rng.integers(2, 9))  # coarse base scale of the fractal noise
    noise = perlin_noise(shape, res, rng, octaves=3)  # three octaves add fine detail
    return _two_colour_map(np.clip(0.5 + 0.5 * noise, 0.0, 1.0), rng)  # [-1, 1] to [0, 1]


_TEXTURES = (_texture_colour_noise, _texture_stripes, _texture_checker, _texture_smooth)


def _texture_from_source(shape: tuple[int, int], source: Array, rng: np.random.Generator) -> Array:
    """Random crop of another image, resized, flipped/rotated."""
    sh, sw = source.shape[:2]
    frac = rng.uniform(0.3, 1.0)  # crop side as a fraction of the source side
    ch, cw = max(1, int(sh * frac)), max(1, int(sw * frac))
    y0 = int(rng.integers(0, sh - ch + 1))
    x0 = int(rng.integers(0, sw - cw + 1))
    crop = np.rot90(source[y0 : y0 + ch, x0 : x0 + cw, :3], int(rng.integers(0, 4)))  # 0-3 turns
    if rng.random() < 0.5:  # mirror half of the crops
        crop = crop[:, ::-1]
    return _resize_float(np.ascontiguousarray(crop).astype(np.float32), shape)


def _colour_jitter(texture: Array, rng: np.random.Generator) -> Array:
    gain = rng.uniform(0.7, 1.3, size=3).astype(np.float32)  # per-channel contrast +-30%
    offset = rng.uniform(-30.0, 30.0, size=3).astype(np.float32)  # per-channel shift
    jittered = texture[..., rng.permutation(3)] * gain + offset  # shuffle the RGB channels
    return np.clip(jittered, 0.0, 255.0)


def foreign_texture(
    shape: tuple[int, int], rng: np.random.Generator, source: Array | None = None
) -> Array:
    """A texture foreign to the image, with random colour jitter.

    Args:
        shape: Output (height, width).
        rng: Random generator.
        source: Optional uint8 RGB image to crop the texture from; when None
            a procedural texture (colour noise, stripes, checkerboard or
            smooth fractal noise) is made.

    Returns:
        float32 array (height, width, 3) in [0, 255].
    """
    if source is not None:
        texture = _texture_from_source(shape, source, rng)
    else:
        texture = _TEXTURES[int(rng.integers(0, len(_TEXTURES)))](shape, rng)
    return _colour_jitter(texture.astype(np.float32), rng)


def _check_image(image: Array) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def mean_change(before: Array, after: Array, mask: Array) -> float:
    """Mean absolute difference (grey levels, all channels) inside a mask.

    Args:
        before: Original uint8 image.
        after: Modified uint8 image.
        mask: bool mask (H, W).

    Returns:
        The mean |after - before| over masked pixels, 0.0 for an empty mask.
    """
    if not mask.any():
        return 0.0
    delta = after[mask].astype(np.int16) - before[mask].astype(np.int16)
    return float(np.abs(delta).mean())


def texture_paste(
    image: Array,
    rng: np.random.Generator,
    source: Array | None = None,
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """Blends a foreign texture into a Perlin blob.

    Args:
        image: Normal uint8 RGB image (H, W, 3).
        rng: Random generator.
        source: Optional other uint8 RGB image the texture is cropped from.
        mask: Optional bool region to use instead of a random Perlin blob.

    Returns:
        (image, mask): the blended image (opacity 0.3-1.0) and the blob
        mask. Pixels outside the mask are unchanged.
    """
    _check_image(image)
    if mask is None:
        mask = perlin_mask(image.shape[:2], rng)
    if not mask.any():
        return image.copy(), mask.copy()
    box = _bounding_box(mask, margin=0)
    # The texture is only needed on the bounding box of the blob.
    texture = foreign_texture(mask[box].shape, rng, source)[mask[box]]
    alpha = np.float32(rng.uniform(0.3, 1.0))  # opacity of the foreign texture
    original = image[mask].astype(np.float32)
    if np.abs(texture - original).mean() * alpha < MIN_MEAN_CHANGE:
        texture = 255.0 - texture  # the negative of a look-alike texture stands out
    out = image.copy()
    out[mask] = np.round(original + alpha * (texture - original)).astype(np.uint8)
    return out, mask.copy()


def _patch_size(length: int, rng: np.random.Generator) -> int:
    low = max(2, int(0.08 * length))  # patch side between 8% ...
    high = max(low, int(0.3 * length))  # ... and 30% of the image side
    return int(rng.integers(low, high + 1))


def cut_paste(
    image: Array, rng: np.random.Generator, source: Array | None = None
) -> tuple[Array, Array]:
    """Pastes a rectangle of the image elsewhere in the same image.

    The patch has a random size, an optional rotation by a multiple of 90
    degrees and a brightness jitter. Pixels the paste would change by less
    than ``CUTPASTE_MIN_CHANGE`` keep their original value.

    Args:
        image: Normal uint8 RGB image (H, W, 3).
        rng: Random generator.
        source: Unused; accepted for a uniform interface.

    Returns:
        (image, mask): the image with the patch and the changed pixels of the
        pasted rectangle.
    """
    _check_image(image)
    h, w = image.shape[:2]
    ph, pw = _patch_size(h, rng), _patch_size(w, rng)
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    turns = int(rng.integers(0, 4))  # 0-3 quarter turns
    if turns % 2 and (pw > h or ph > w):
        turns = 0  # a quarter turn would not fit a very elongated image
    patch = np.rot90(image[y0 : y0 + ph, x0 : x0 + pw], turns)
    gain = rng.uniform(0.75, 1.25)  # brightness jitter of +-25%
    patch = np.clip(np.round(patch.astype(np.float32) * gain), 0, 255).astype(np.uint8)
    th, tw = patch.shape[:2]
    ty, tx = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    region = image[ty : ty + th, tx : tx + tw]
    diff = np.abs(patch.astype(np.int16) - region.astype(np.int16)).max(axis=2)
    changed = diff >= CUTPASTE_MIN_CHANGE
    out = image.copy()
    out[ty : ty + th, tx : tx + tw][changed] = patch[changed]
    mask = np.zeros((h, w), dtype=bool)
    mask[ty : ty + th, tx : tx + tw] = changed
    return out, mask


def _bezier_points(rng: np.random.Generator, shape: tuple[int, int]) -> Array:
    """Control polygon of a random cubic Bezier, (4, 2) in (y, x)."""
    side = min(shape)
    start = rng.uniform(0.1, 0.9, size=2) * np.array(shape)  # keep away from the border
    length = rng.uniform(0.15, 0.5) * side  # stroke length, fraction of the side
    theta = rng.uniform(0.0, 2.0 * np.pi)
    direction = np.array([np.sin(theta), np.cos(theta)])
    normal = np.array([-direction[1], direction[0]])
    t = np.array([0.0, 1 / 3, 2 / 3, 1.0])[:, None]  # control points at thirds of the chord
    bend = rng.normal(0.0, 0.2 * length, size=4)[:, None]  # sideways bend of the controls
    bend[[0, 3]] = 0.0  # the end points stay on the chord
    return start + t * length * direction + bend * normal


def _sample_bezier(ctrl: Array) -> Array:
    chord = np.linalg.norm(np.diff(ctrl, axis=0), axis=1).sum()
    t = np.linspace(0.0, 1.0, int(2 * chord) + 2)[:, None]  # two samples per pixel
    u = 1.0 - t
    # Bernstein basis of the cubic Bezier curve.
    return u**3 * ctrl[0] + 3 * u**2 * t * ctrl[1] + 3 * u * t**2 * ctrl[2] + t**3 * ctrl[3]


def _sample_polyline(rng: np.random.Generator, shape: tuple[int, int]) -> Array:
    side = min(shape)
    n_seg = int(rng.integers(2, 5))  # 2-4 straight segments
    point = rng.uniform(0.1, 0.9, size=2) * np.array(shape)  # start away from the border
    theta = rng.uniform(0.0, 2.0 * np.pi)
    pieces = []
    for _ in range(n_seg):
        theta += rng.normal(0.0, 0.6)  # direction change between segments, radians
        seg = rng.uniform(0.05, 0.2) * side  # segment length, fraction of the side
        end = point + seg * np.array([np.sin(theta), np.cos(theta)])
        t = np.linspace(0.0, 1.0, int(2 * seg) + 2)[:, None]  # two samples per pixel
        pieces.append(point + t * (end - point))
        point = end
    return np.concatenate(pieces)


def _random_curve(rng: np.random.Generator, shape: tuple[int, int]) -> Array:
    """Dense samples of either a cubic Bezier curve or a polyline."""
    if rng.random() < 0.5:  # both shapes equally likely
        return _sample_bezier(_bezier_points(rng, shape))
    return _sample_polyline(rng, shape)


def rasterize_stroke(points: Array, thickness: int, shape: tuple[int, int]) -> Array:
    """Draws a thick curve given by dense (y, x) samples.

    Args:
        points: (N, 2) curve samples, at most about half a pixel apart.
        thickness: Stroke width in pixels (>= 1).
        shape: Output (height, width).

    Returns:
        bool array of ``shape``, True on the stroke.
    """
    tangent = np.gradient(points, axis=0)
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1) / np.maximum(norm, 1e-9)
    half = (thickness - 1) / 2.0  # offsets from the centre line to the outermost row
    offsets = np.linspace(-half, half, 2 * thickness - 1)  # half-pixel steps across the width
    pts = (points[None, :, :] + offsets[:, None, None] * normal[None]).reshape(-1, 2)
    rows = np.round(pts[:, 0]).astype(np.intp)
    cols = np.round(pts[:, 1]).astype(np.intp)
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    stroke = np.zeros(shape, dtype=bool)
    stroke[rows[inside], cols[inside]] = True
    return stroke


def _bounding_box(mask: Array, margin: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(0, rows[0] - margin), rows[-1] + margin + 1),
        slice(max(0, cols[0] - margin), cols[-1] + margin + 1),
    )


def _stroke_colour(image: Array, stroke: Array, rng: np.random.Generator) -> Array:
    """Per-pixel colours clearly darker or lighter than the local background.

    The stroke is dark or light as a whole, except where the background has
    no room in that direction (a light stroke over white turns dark).

    Returns:
        float32 (N, 3) colours for the N stroke pixels.
    """
    box = _bounding_box(stroke, margin=3)  # room for the 5x5 background window
    crop = image[box].astype(np.float32)
    local = ndimage.uniform_filter(crop, size=(5, 5, 1))[stroke[box]]  # 5x5 neighbourhood mean
    brightness = local.mean(axis=1)
    delta = np.float32(rng.uniform(70.0, 140.0))  # contrast of the stroke in grey levels
    sign = -1.0 if rng.random() < brightness.mean() / 255.0 else 1.0  # bright areas: dark strokes
    room = 255.0 - brightness if sign > 0 else brightness
    signs = np.where(room < 0.5 * delta, -sign, sign).astype(np.float32)  # < half contrast left
    return np.clip(local + signs[:, None] * delta, 0.0, 255.0)


def scratch(
    image: Array, rng: np.random.Generator, source: Array | None = None
) -> tuple[Array, Array]:
    """Draws one to three thin strokes (Bezier curves or polylines).

    Args:
        image: Normal uint8 RGB image (H, W, 3).
        rng: Random generator.
        source: Unused; accepted for a uniform interface.

    Returns:
        (image, mask): the scratched image and the stroke pixels dilated by
        one pixel.
    """
    _check_image(image)
    shape = image.shape[:2]
    out = image.copy()
    strokes = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(1, 4))):  # 1-3 strokes
        width = int(rng.integers(1, 5))  # 1-4 px
        stroke = rasterize_stroke(_random_curve(rng, shape), width, shape)
        if not stroke.any():
            continue
        colour = _stroke_colour(out, stroke, rng)
        alpha = np.float32(rng.uniform(0.75, 1.0))  # stroke opacity
        under = out[stroke].astype(np.float32)
        out[stroke] = np.round(under + alpha * (colour - under)).astype(np.uint8)
        strokes |= stroke
    square = np.ones((3, 3), dtype=bool)  # 8-neighbourhood: grow by one pixel
    mask = ndimage.binary_dilation(strokes, structure=square)
    return out, mask


KINDS: dict[str, KindFn] = {"texture": texture_paste, "cutpaste": cut_paste, "scratch": scratch}


def _fallback(image: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    """A small square whose pixels are shifted by half the uint8 range."""
    h, w = image.shape[:2]
    side_y, side_x = max(1, h // 10), max(1, w // 10)  # a tenth of each side: 1% of the area
    y0 = int(rng.integers(0, h - side_y + 1))
    x0 = int(rng.integers(0, w - side_x + 1))
    mask = np.zeros((h, w), dtype=bool)
    mask[y0 : y0 + side_y, x0 : x0 + side_x] = True
    out = image.copy()
    out[mask] = out[mask] ^ np.uint8(_HALF_RANGE)  # flips the top bit: |delta| = 128
    return out, mask


class AnomalySynthesizer:
    """Random choice among anomaly kinds with a visibility guarantee.

    The returned mask is never empty, the mean change inside it is at least
    ``MIN_MEAN_CHANGE`` grey levels and the image is unchanged outside it.
    """

    def __init__(
        self,
        kinds: Sequence[str] = ("texture", "cutpaste", "scratch"),
        weights: Sequence[float] | None = None,
    ) -> None:
        """Configures the kinds to draw from.

        Args:
            kinds: Names from ``KINDS``.
            weights: Relative probabilities, one per kind; uniform if None.

        Raises:
            ValueError: For unknown kinds or invalid weights.
        """
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ValueError(f"unknown or no anomaly kinds {unknown}; choose from {list(KINDS)}")
        probs = np.ones(len(kinds)) if weights is None else np.asarray(weights, dtype=float)
        if probs.shape != (len(kinds),) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"weights must be {len(kinds)} non-negative numbers, got {weights}")
        self.kinds = tuple(kinds)
        self.probs = probs / probs.sum()

    def sample(
        self, image: Array, rng: np.random.Generator, source: Array | None = None
    ) -> tuple[Array, Array, str]:
        """Makes one anomaly and tells which kind was used.

        Args:
            image: Normal uint8 RGB image (H, W, 3).
            rng: Random generator.
            source: Optional other image for foreign textures.

        Returns:
            (image, mask, kind); kind is ``"fallback"`` when every retry
            failed the visibility check.
        """
        _check_image(image)
        for _ in range(_MAX_TRIES):
            kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]
            out, mask = KINDS[kind](image, rng, source)
            if mask.any() and mean_change(image, out, mask) >= MIN_MEAN_CHANGE:
                return out, mask, kind
        out, mask = _fallback(image, rng)
        return out, mask, "fallback"

    def __call__(
        self, image: Array, rng: np.random.Generator, source: Array | None = None
    ) -> tuple[Array, Array]:
        """Makes one anomaly.

        Args:
            image: Normal uint8 RGB image (H, W, 3).
            rng: Random generator.
            source: Optional other image for foreign textures.

        Returns:
            (image, mask): uint8 image and non-empty bool mask (H, W).
        """
        out, mask, _ = self.sample(image, rng, source)
        return out, mask
