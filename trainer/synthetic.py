"""Deterministic generator of synthetic products in the MVTec-AD layout.

Used by tests and for demos on machines without real data. Every product is
a procedural renderer with natural per-image variation (position, lighting,
phase, colour) and a few realistic defect kinds with exact masks:

* ``tiles``: grey ceramic tiles with grout lines (crack, stain, chip);
* ``rings``: a metallic washer on a dark background (scratch, notch, rust);
* ``weave``: a red and cream plain-weave fabric (hole, stain, thread);
* ``dots``: gold pads on a green circuit board (missing, bridge, scratch).
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from trainer.anomalies import perlin_noise, rasterize_stroke

Array = np.ndarray
Scene = dict

PRODUCTS = ("tiles", "rings", "weave", "dots")
DEFECTS = {
    "tiles": ("crack", "stain", "chip"),
    "rings": ("scratch", "notch", "rust"),
    "weave": ("hole", "stain", "thread"),
    "dots": ("missing", "bridge", "scratch"),
}
MIN_DEFECT_AREA = 0.01  # smallest defect, as a fraction of the image
MAX_DEFECT_AREA = 0.10  # largest defect, as a fraction of the image
MIN_DEFECT_CHANGE = 15.0  # mean |delta| (grey levels) inside a defect mask
_DEFECT_TRIES = 20  # redraws of a defect before the guaranteed fallback
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}  # seed stream per split
_PER_TILE_TABLE = 16  # size of the periodic table of per-tile / per-thread variations


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------


def _coords(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (y, x) as float32 grids."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    half = np.float32(0.5)  # pixel centres sit half a pixel from the grid lines
    return yy + half, xx + half


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float | tuple) -> Array:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma)
    return noise / np.float32(max(float(noise.std()), 1e-6))  # guard a zero std


def _scale(size: int) -> int:
    """Integer factor for pixel widths, so thin defects keep their share of the image."""
    return max(1, int(round(size / 128)))  # widths below are tuned for 128 px images


def _line_width(rng: np.random.Generator, size: int) -> int:
    return int(rng.integers(1, 3)) * _scale(size)  # 1-2 px at 128 px


def _dilate(mask: Array) -> Array:
    """Grows a thin defect by one pixel (per 128 px of image side)."""
    size = mask.shape[0]
    square = np.ones((3, 3), dtype=bool)  # 8-neighbourhood: one pixel in every direction
    return ndimage.binary_dilation(mask, square, iterations=_scale(size))


def _blob(
    rng: np.random.Generator, size: int, centre: Array, radius: float, roughness: float = 0.35
) -> tuple[Array, Array]:
    """Irregular blob: a disc whose border is perturbed by Perlin noise.

    Returns:
        (mask, depth): bool blob and float32 depth, 1 at the centre and 0 at
        the border (negative outside).
    """
    yy, xx = _coords(size)
    dist = np.hypot(yy - centre[0], xx - centre[1]) / np.float32(radius)
    res = max(2, int(round(size / radius)))  # noise period about one radius
    field = dist + np.float32(roughness) * perlin_noise((size, size), res, rng)
    return field < 1.0, 1.0 - field


def _paint(img: Array, region: Array, colour: Array, alpha: float | Array) -> None:
    """Blends a colour into a region of a float image, in place."""
    a = alpha[region][:, None] if isinstance(alpha, np.ndarray) else np.float32(alpha)
    img[region] = img[region] * (1.0 - a) + np.asarray(colour, np.float32) * a


def _random_walk(
    rng: np.random.Generator, start: Array, length: float, n_seg: int, turn_sd: float
) -> Array:
    """Dense (y, x) samples of a random polyline (a crack or a scratch)."""
    theta = rng.uniform(0.0, 2.0 * np.pi)  # any initial direction
    point, pieces = np.asarray(start, float), []
    for _ in range(n_seg):
        theta += rng.normal(0.0, turn_sd)
        end = point + (length / n_seg) * np.array([np.sin(theta), np.cos(theta)])
        t = np.linspace(0.0, 1.0, int(2 * length / n_seg) + 2)[:, None]  # two samples per px
        pieces.append(point + t * (end - point))
        point = end
    return np.concatenate(pieces)


def _in_range(rng: np.random.Generator, size: int, low: float, high: float) -> Array:
    """Random (y, x) point with both coordinates in [low, high] * size."""
    return rng.uniform(low, high, size=2) * size  # two coordinates: (y, x)


# --------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------


def _tile_geometry(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _coords(size)
    pitch = size / rng.uniform(3.6, 4.4)  # about four tiles across the image
    oy, ox = rng.uniform(0.0, pitch, size=2)  # grid shift, up to one tile in y and x
    u, v = xx + np.float32(ox), yy + np.float32(oy)
    iu, iv = np.floor(u / pitch).astype(int), np.floor(v / pitch).astype(int)
    du, dv = u - iu * pitch, v - iv * pitch
    edge = np.minimum(np.minimum(du, pitch - du), np.minimum(dv, pitch - dv))
    half = max(1.0, 0.018 * size)  # grout half-width, ~2.3 px at 128 px
    return dict(pitch=pitch, offset=(oy, ox), iu=iu, iv=iv, du=du, dv=dv, edge=edge, half=half)


def _tile_bevel(geo: Scene) -> Array:
    """Light from the top-left: bright upper/left rims, dark lower/right rims."""
    half, pitch, scale = geo["half"], geo["pitch"], 2.0  # rim falloff of 2 px

    def rim(dist: Array) -> Array:
        return np.exp(-np.maximum(dist - half, 0.0) / scale)

    du, dv = geo["du"], geo["dv"]
    return 9.0 * (rim(du) + rim(dv) - rim(pitch - du) - rim(pitch - dv))  # 9 grey levels


def _render_tiles(rng: np.random.Generator, size: int) -> tuple[Array, Scene]:
    geo = _tile_geometry(rng, size)
    yy, xx = _coords(size)
    table = rng.normal(0.0, 6.0, size=(_PER_TILE_TABLE,) * 2)  # per-tile shade, +-6 levels
    shade = table[geo["iv"] % _PER_TILE_TABLE, geo["iu"] % _PER_TILE_TABLE]
    grey = rng.uniform(150.0, 170.0) + shade + _tile_bevel(geo)  # base tile grey level
    mottling = 5.0 * _smooth_noise(rng, size, 1.0)  # glaze mottling, 5 levels over ~1 px
    grey = grey + mottling + 3.0 * rng.standard_normal((size, size))  # 3 levels sensor noise
    grout = np.clip(geo["half"] + 0.5 - geo["edge"], 0.0, 1.0)[..., None]  # antialiased
    grout_grey = 92.0 + 4.0 * _smooth_noise(rng, size, 0.7)  # dark cement
    tile_rgb = grey[..., None] * np.array([1.0, 0.985, 0.96], np.float32)  # warm grey glaze
    grout_rgb = grout_grey[..., None] * np.array([1.0, 0.97, 0.93], np.float32)  # warm cement
    gy, gx = rng.uniform(-12.0, 12.0, size=2)  # lighting gradient, grey levels per image
    light = gy * (yy / size - 0.5) + gx * (xx / size - 0.5)  # zero at the image centre
    img = tile_rgb * (1.0 - grout) + grout_rgb * grout + light[..., None]
    geo["grout"] = grout[..., 0] > 0.5  # pixels mostly covered by grout
    return img.astype(np.float32), geo


def _tiles_crack(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    start = _in_range(rng, size, 0.2, 0.8)  # away from the border
    length = rng.uniform(0.45, 0.8) * size  # crack length, fraction of the side
    points = _random_walk(rng, start, length, int(rng.integers(6, 11)), 0.5)  # jagged
    stroke = rasterize_stroke(points, _line_width(rng, size), (size, size))
    dark = np.array([48.0, 45.0, 43.0])  # shadow inside the crack
    _paint(img, stroke, dark, rng.uniform(0.85, 1.0))  # nearly opaque
    return _dilate(stroke)


def _tiles_stain(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    radius = rng.uniform(0.06, 0.14) * size  # stain radius, fraction of the side
    blob, depth = _blob(rng, size, _in_range(rng, size, 0.2, 0.8), radius)  # away from border
    strength = np.clip(0.55 + 0.6 * depth, 0.0, 0.9)  # 55% at the rim to 90% in the middle
    _paint(img, blob, np.array([95.0, 70.0, 40.0]), strength)  # brown residue
    return blob


def _pick_line(rng: np.random.Generator, pitch: float, offset: float, size: int) -> float:
    """A grout line position away from the image border (0.15-0.85 of the side)."""
    lines = np.arange(-1, size / pitch + 2) * pitch - offset  # one extra line on each side
    inner = lines[(lines > 0.15 * size) & (lines < 0.85 * size)]
    return float(rng.choice(inner)) if inner.size else size / 2.0  # else the image centre


def _tiles_chip(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    pitch, (oy, ox) = scene["pitch"], scene["offset"]
    cy = _pick_line(rng, pitch, oy, size)
    cx = _pick_line(rng, pitch, ox, size)
    radius = rng.uniform(0.06, 0.1) * size  # chip radius, fraction of the side
    blob, depth = _blob(rng, size, np.array([cy, cx]), radius, roughness=0.5)  # jagged break
    body = 112.0 + 14.0 * _smooth_noise(rng, size, 0.8)  # rough, darker ceramic body
    rim = np.clip(depth * 4.0, 0.55, 1.0)  # darker near the broken edge
    chip = (body * rim)[..., None] * np.array([1.0, 0.95, 0.86], np.float32)  # brownish body
    img[blob] = chip[blob]
    return blob


# --------------------------------------------------------------------------
# rings
# --------------------------------------------------------------------------


def _chamfer(t: Array, at: float, height: float) -> Array:
    """Bright band of a bevelled edge at relative radius ``at``."""
    width = 0.07  # band width, fraction of the ring width
    return height * np.exp(-(((t - at) / width) ** 2))


def _ring_metal(
    rng: np.random.Generator, r: Array, theta: Array, r_in: float, r_out: float
) -> Array:
    t = (r - r_in) / (r_out - r_in)
    phi = rng.uniform(0.0, np.pi)  # direction of the reflection (period pi)
    base = 135.0 * rng.uniform(0.92, 1.08)  # mid-grey steel, brightness jitter of +-8%
    highlight = 50.0 * np.cos(2.0 * (theta - phi))  # two opposite highlights, +-50 levels
    chamfer = _chamfer(t, 0.1, 30.0) + _chamfer(t, 0.9, 25.0)  # inner and outer bevels
    marks = rng.normal(0.0, 5.0, r.shape[0])  # lathe marks: 5 levels, one value per px of radius
    profile = np.interp(r, np.arange(r.shape[0]), marks)
    phase = rng.uniform(0.0, 2.0 * np.pi)
    grooves = 4.0 * np.sin(r * 2.4 + phase)  # 4 levels deep, 2.6 px (2 pi / 2.4) period
    metal = base + highlight + chamfer + profile + grooves
    return metal[..., None] * np.array([0.96, 1.0, 1.05], np.float32)  # cool steel tint


def _ring_coverage(r: Array, r_in: float, r_out: float) -> Array:
    """Antialiased annulus coverage (half-pixel ramp on both borders)."""
    ramp = 0.5  # half a pixel on either side of the exact border
    return np.clip(r_out - r + ramp, 0.0, 1.0) * np.clip(r - r_in + ramp, 0.0, 1.0)


def _render_rings(rng: np.random.Generator, size: int) -> tuple[Array, Scene]:
    yy, xx = _coords(size)
    centre = size / 2.0 + rng.normal(0.0, 0.015 * size, size=2)  # position jitter
    r_out = 0.40 * size * (1.0 + rng.normal(0.0, 0.015))  # outer radius, 1.5% jitter
    r_in = 0.17 * size * (1.0 + rng.normal(0.0, 0.03))  # inner radius, 3% jitter
    r = np.hypot(yy - centre[0], xx - centre[1])
    theta = np.arctan2(yy - centre[0], xx - centre[1])
    metal = _ring_metal(rng, r, theta, r_in, r_out)
    vignette = 1.0 - 0.3 * (r / size) ** 2  # darker corners
    background = (22.0 + 5.0 * _smooth_noise(rng, size, 2.0)) * vignette  # dark felt, 5 levels
    background = background[..., None] * np.array([1.0, 1.0, 1.08], np.float32)  # bluish
    cov = _ring_coverage(r, r_in, r_out)
    img = background * (1.0 - cov[..., None]) + metal * cov[..., None]
    scene = dict(centre=centre, r=r, theta=theta, r_in=r_in, r_out=r_out, cov=cov,
                 metal=metal, background=background, ring=cov > 0.5)  # mostly metal
    return img.astype(np.float32), scene


def _rings_scratch(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    r_in, r_out, centre = scene["r_in"], scene["r_out"], scene["centre"]
    span = rng.uniform(1.2, 2.0)  # arc length of the scratch, radians
    theta0 = rng.uniform(0.0, 2.0 * np.pi)  # anywhere around the ring
    radii = rng.uniform(r_in + 2.0, r_out - 2.0, size=2)  # stay 2 px inside the ring
    t = np.linspace(0.0, 1.0, int(2 * span * r_out) + 2)  # two samples per pixel
    wobble = rng.normal(0.0, 0.08, t.size).cumsum()  # random walk, ~1.4 px over the arc
    rad = radii[0] + t * (radii[1] - radii[0]) + wobble
    ang = theta0 + span * t
    points = np.stack([centre[0] + rad * np.sin(ang), centre[1] + rad * np.cos(ang)], axis=1)
    stroke = rasterize_stroke(points, _line_width(rng, size), (size, size)) & scene["ring"]
    bright, dark = [235.0, 238.0, 245.0], [45.0, 45.0, 50.0]  # polished or dirty groove
    colour = np.array(bright if rng.random() < 0.5 else dark)  # either, equally likely
    _paint(img, stroke, colour, rng.uniform(0.85, 1.0))  # nearly opaque
    return _dilate(stroke) & (scene["cov"] > 0)


def _rings_notch(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    ang = rng.uniform(0.0, 2.0 * np.pi)  # anywhere on the outer rim
    at = scene["centre"] + scene["r_out"] * np.array([np.sin(ang), np.cos(ang)])
    radius = rng.uniform(0.08, 0.12) * size  # bite radius, fraction of the side
    yy, xx = _coords(size)
    dist = np.hypot(yy - at[0], xx - at[1])
    bite = np.clip(radius + 0.5 - dist, 0.0, 1.0)  # antialiased disc, half-pixel ramp
    cov = scene["cov"] * (1.0 - bite)
    img[:] = scene["background"] * (1.0 - cov[..., None]) + scene["metal"] * cov[..., None]
    return (scene["cov"] - cov) > 0.1  # pixels that lost more than 10% of their metal


def _rings_rust(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    ang = rng.uniform(0.0, 2.0 * np.pi)  # anywhere around the ring
    rad = (scene["r_in"] + scene["r_out"]) / 2.0  # centred on the metal band
    at = scene["centre"] + rad * np.array([np.sin(ang), np.cos(ang)])
    radius = rng.uniform(0.06, 0.1) * size  # rust spot radius, fraction of the side
    blob, depth = _blob(rng, size, at, radius)
    blob &= scene["ring"]
    strength = np.clip(0.6 + 0.6 * depth, 0.0, 0.92)  # denser in the middle
    _paint(img, blob, np.array([120.0, 62.0, 28.0]), strength)  # orange-brown oxide
    return blob


# --------------------------------------------------------------------------
# weave
# --------------------------------------------------------------------------


def _weave_geometry(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _coords(size)
    pitch = size / rng.uniform(13.0, 17.0)  # thread pitch, ~8.5 px at 128 px
    angle = rng.normal(0.0, 0.02)  # slight skew of the fabric, radians
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    oy, ox = rng.uniform(0.0, pitch, size=2)  # phase jitter
    half = size / 2.0  # rotate about the image centre
    u = (xx - half) * c + (yy - half) * s + np.float32(ox)
    v = -(xx - half) * s + (yy - half) * c + np.float32(oy)
    i, j = np.floor(u / pitch).astype(int), np.floor(v / pitch).astype(int)
    fu, fv = u / pitch - i, v / pitch - j
    warp_top = (i + j) % 2 == 0  # plain weave: over and under in a checkerboard
    return dict(pitch=pitch, u=u, v=v, i=i, j=j, fu=fu, fv=fv, warp_top=warp_top)


def _thread_shading(across: Array, along: Array) -> Array:
    """Round thread cross-section, raised in the middle of each float."""
    cross = np.sin(np.pi * np.clip(across, 0.0, 1.0)) ** 0.6  # 0.6 flattens the thread top
    return (0.25 + 0.75 * cross) * (0.8 + 0.2 * np.sin(np.pi * along))  # gap 25%, bend 20%


def _weave_colours(rng: np.random.Generator) -> tuple[Array, Array]:
    warp = np.array([160.0, 38.0, 48.0]) + rng.normal(0.0, 8.0, 3)  # red, +-8 levels
    weft = np.array([228.0, 206.0, 160.0]) + rng.normal(0.0, 6.0, 3)  # cream, +-6 levels
    return warp.astype(np.float32), weft.astype(np.float32)


def _render_weave(rng: np.random.Generator, size: int) -> tuple[Array, Scene]:
    geo = _weave_geometry(rng, size)
    warp, weft = _weave_colours(rng)
    tints = rng.normal(1.0, 0.04, size=(2, _PER_TILE_TABLE))  # per-thread tone, +-4%
    warp_tone = tints[0][geo["i"] % _PER_TILE_TABLE] * _thread_shading(geo["fu"], geo["fv"])
    weft_tone = tints[1][geo["j"] % _PER_TILE_TABLE] * _thread_shading(geo["fv"], geo["fu"])
    fibres_warp = 1.0 + 0.06 * _smooth_noise(rng, size, (3.0, 0.5))  # fibres along y
    fibres_weft = 1.0 + 0.06 * _smooth_noise(rng, size, (0.5, 3.0))  # fibres along x
    warp_img = (warp_tone * fibres_warp)[..., None] * warp
    weft_img = (weft_tone * fibres_weft)[..., None] * weft
    img = np.where(geo["warp_top"][..., None], warp_img, weft_img)
    geo.update(warp=warp, weft=weft)
    return img.astype(np.float32), geo


def _weave_hole(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    radius = rng.uniform(0.06, 0.1) * size  # hole radius, fraction of the side
    centre = _in_range(rng, size, 0.2, 0.8)  # away from the border
    blob, depth = _blob(rng, size, centre, radius, roughness=0.45)  # ragged torn edge
    backing = 22.0 + 6.0 * _smooth_noise(rng, size, 1.0)  # dark table under the cloth
    fringe = np.clip(depth * 5.0, 0.0, 1.0)  # frayed fibres fade in at the border
    fibres = img * (1.0 - fringe[..., None]) * 0.5  # loose fibres in shadow: half as bright
    hole = backing[..., None] * fringe[..., None] + fibres
    img[blob] = hole[blob]
    return blob


def _weave_stain(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    radius = rng.uniform(0.07, 0.13) * size  # stain radius, fraction of the side
    blob, depth = _blob(rng, size, _in_range(rng, size, 0.2, 0.8), radius)  # away from border
    strength = np.clip(0.5 + 0.6 * depth, 0.0, 0.85)  # 50% at the rim to 85% in the middle
    _paint(img, blob, np.array([40.0, 48.0, 30.0]), strength)  # dark oily stain
    return blob


def _weave_thread(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    column = int(np.median(scene["i"])) + int(rng.integers(-4, 5))  # a warp thread near the middle
    v0 = rng.uniform(-0.4, 0.1) * size  # segment start (v is 0 at the image centre)
    length = rng.uniform(0.3, 0.6) * size  # segment length, fraction of the side
    region = (scene["i"] == column) & (scene["v"] > v0) & (scene["v"] < v0 + length)
    colour = np.array([40.0, 70.0, 150.0]) + rng.normal(0.0, 10.0, 3)  # a foreign blue thread
    middle = np.full_like(scene["fu"], 0.5)  # a floating thread is flat: mid-float shading
    shading = _thread_shading(scene["fu"], middle)
    img[region] = shading[region][:, None] * colour.astype(np.float32)
    return region


# --------------------------------------------------------------------------
# dots
# --------------------------------------------------------------------------


def _render_dots(rng: np.random.Generator, size: int) -> tuple[Array, Scene]:
    yy, xx = _coords(size)
    pitch = size / rng.uniform(5.3, 5.8)  # five to six pads per row
    radius = pitch * rng.uniform(0.3, 0.33)  # pad radius relative to the pitch
    oy, ox = rng.uniform(0.0, pitch, size=2)  # grid shift, up to one pitch in y and x
    cy = np.round((yy - oy) / pitch) * pitch + oy
    cx = np.round((xx - ox) / pitch) * pitch + ox
    dist = np.hypot(yy - cy, xx - cx)
    pad = np.clip(radius + 0.5 - dist, 0.0, 1.0)[..., None]  # antialiased, half-pixel ramp
    weave = 0.05 * _smooth_noise(rng, size, 1.5)  # glass-fibre texture, 5% over ~1.5 px
    board = 1.0 + weave + 0.02 * rng.standard_normal((size, size))  # 2% sensor noise
    green = np.array([35.0, 105.0, 60.0]) + rng.normal(0.0, 4.0, 3)  # solder mask, +-4 levels
    board_rgb = board[..., None] * green
    dome = 0.25 * np.clip(1.0 - dist / radius, 0.0, 1.0)  # domed pad: 25% brighter centre
    shine = 1.0 + dome - 0.15 * (yy - cy) / radius  # light from above: 15% gradient
    gold = np.array([200.0, 165.0, 75.0]) + rng.normal(0.0, 5.0, 3)  # gold plating, +-5 levels
    pad_rgb = shine[..., None] * gold
    img = board_rgb * (1.0 - pad) + pad_rgb * pad
    scene = dict(pitch=pitch, radius=radius, offset=(oy, ox), board=board_rgb.astype(np.float32),
                 pad=pad[..., 0] > 0)
    return img.astype(np.float32), scene


def _pad_centres(scene: Scene, size: int) -> Array:
    """Centres (y, x) of the pads lying well inside the image."""
    pitch, (oy, ox) = scene["pitch"], scene["offset"]
    grid = np.arange(-1, size / pitch + 2) * pitch  # one extra pad on each side
    margin = pitch / 2.0  # keep pads whose cell lies fully inside the image
    ys, xs = grid + oy, grid + ox
    ys = ys[(ys > margin) & (ys < size - margin)]
    xs = xs[(xs > margin) & (xs < size - margin)]
    return np.array([(y, x) for y in ys for x in xs]).reshape(-1, 2)  # (n, 2) as (y, x)


def _dots_missing(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    centres = _pad_centres(scene, size)
    first = centres[int(rng.integers(0, len(centres)))]
    chosen = [first]
    if rng.random() < 0.5:  # sometimes a neighbouring pad is missing too
        gap = np.abs(np.linalg.norm(centres - first, axis=1) - scene["pitch"])
        near = gap < 1.0  # direct neighbours sit one pitch away (1 px rounding slack)
        if near.any():
            chosen.append(centres[rng.choice(np.flatnonzero(near))])
    yy, xx = _coords(size)
    region = np.zeros((size, size), dtype=bool)
    for cy, cx in chosen:
        region |= np.hypot(yy - cy, xx - cx) < scene["radius"] + 1.0  # include the soft rim
    img[region] = scene["board"][region] * np.float32(0.9)  # bare, slightly darker copper
    return _dilate(region)


def _dots_bridge(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    centres = _pad_centres(scene, size)
    first = centres[int(rng.integers(0, len(centres)))]
    horizontal = rng.random() < 0.5  # bridge along a row or a column, equally likely
    step = scene["pitch"] * (np.array([0.0, 1.0]) if horizontal else np.array([1.0, 0.0]))
    second = first + step if (first + step).max() < size else first - step
    mid = (first + second) / 2.0  # the blob sits between the two pads
    radius = scene["pitch"] * rng.uniform(0.45, 0.6)  # solder blob radius
    blob, depth = _blob(rng, size, mid, radius, roughness=0.25)  # rounded molten shape
    blob &= ~scene["pad"]  # only the solder spilled on the board is a defect
    solder = 180.0 + 30.0 * np.clip(depth, 0.0, 1.0)  # shiny tin, brighter where thicker
    img[blob] = solder[blob][:, None] * np.array([1.0, 1.0, 0.96], np.float32)  # grey tin
    return blob


def _dots_scratch(img: Array, scene: Scene, rng: np.random.Generator) -> Array:
    size = img.shape[0]
    length = rng.uniform(0.4, 0.7) * size  # scratch length, fraction of the side
    points = _random_walk(rng, _in_range(rng, size, 0.25, 0.75), length, 3, 0.15)  # gentle turns
    stroke = rasterize_stroke(points, _line_width(rng, size), (size, size))
    _paint(img, stroke, np.array([215.0, 225.0, 205.0]), rng.uniform(0.8, 1.0))  # bare laminate
    return _dilate(stroke)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------

DefectFn = Callable[[Array, Scene, np.random.Generator], Array]
_RENDERERS: dict[str, Callable[[np.random.Generator, int], tuple[Array, Scene]]] = {
    "tiles": _render_tiles,
    "rings": _render_rings,
    "weave": _render_weave,
    "dots": _render_dots,
}
_DEFECT_FNS: dict[tuple[str, str], DefectFn] = {
    ("tiles", "crack"): _tiles_crack,
    ("tiles", "stain"): _tiles_stain,
    ("tiles", "chip"): _tiles_chip,
    ("rings", "scratch"): _rings_scratch,
    ("rings", "notch"): _rings_notch,
    ("rings", "rust"): _rings_rust,
    ("weave", "hole"): _weave_hole,
    ("weave", "stain"): _weave_stain,
    ("weave", "thread"): _weave_thread,
    ("dots", "missing"): _dots_missing,
    ("dots", "bridge"): _dots_bridge,
    ("dots", "scratch"): _dots_scratch,
}


def _to_uint8(img: Array) -> Array:
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _check_product(product: str) -> None:
    if product not in _RENDERERS:
        raise ValueError(f"unknown product {product!r}; available: {PRODUCTS}")


def render_good(product: str, rng: np.random.Generator, size: int = 128) -> Array:
    """Renders one normal instance of a product.

    Args:
        product: One of ``PRODUCTS``.
        rng: Random generator (the instance's variation).
        size: Side length in pixels.

    Returns:
        uint8 RGB array (size, size, 3).
    """
    _check_product(product)
    img, _ = _RENDERERS[product](rng, size)
    return _to_uint8(img)


def _acceptable(before: Array, after: Array, mask: Array) -> bool:
    area = mask.mean()
    if not MIN_DEFECT_AREA <= area <= MAX_DEFECT_AREA:
        return False
    delta = np.abs(after[mask].astype(np.int16) - before[mask].astype(np.int16))
    return float(delta.mean()) >= MIN_DEFECT_CHANGE


def _fallback_stain(base: Array, rng: np.random.Generator) -> tuple[Array, Array]:
    """A dark disc covering 4% of the image: always within the area limits."""
    size = base.shape[0]
    radius = np.sqrt(0.04 / np.pi) * size  # disc area = 4% of the image
    yy, xx = _coords(size)
    centre = _in_range(rng, size, 0.3, 0.7)  # the disc stays fully inside the image
    mask = np.hypot(yy - centre[0], xx - centre[1]) <= radius
    img = base.astype(np.float32)
    _paint(img, mask, np.array([30.0, 25.0, 20.0]), 0.85)  # dark, clearly visible
    return _to_uint8(img), mask


def render_defect(
    product: str, rng: np.random.Generator, size: int = 128, kind: str | None = None
) -> tuple[Array, Array, str]:
    """Renders one defective instance of a product.

    When ``kind`` is given, the defect is drawn on the very instance that
    ``render_good`` would make from the same generator state, so a copy of
    the generator yields the matching defect-free image.

    Args:
        product: One of ``PRODUCTS``.
        rng: Random generator.
        size: Side length in pixels.
        kind: Defect name from ``DEFECTS[product]``; random when None.

    Returns:
        (image, mask, defect_name): uint8 RGB (size, size, 3), bool mask
        (size, size) covering 1-10% of the image, and the defect name.
    """
    _check_product(product)
    if kind is None:
        kind = DEFECTS[product][int(rng.integers(0, len(DEFECTS[product])))]
    if kind not in DEFECTS[product]:
        raise ValueError(f"unknown defect {kind!r} for {product}; available: {DEFECTS[product]}")
    base, scene = _RENDERERS[product](rng, size)
    base_u8 = _to_uint8(base)
    for _ in range(_DEFECT_TRIES):
        img = base.copy()
        mask = _DEFECT_FNS[(product, kind)](img, scene, rng)
        out = _to_uint8(img)
        if _acceptable(base_u8, out, mask):
            return out, mask, kind
    out, mask = _fallback_stain(base_u8, rng)
    return out, mask, kind


def _image_rng(seed: int, product: str, split: str, index: int) -> np.random.Generator:
    """Independent stream per image: the files do not depend on the counts."""
    product_code = zlib.crc32(product.encode("utf-8"))
    return np.random.default_rng([seed, product_code, _SPLIT_CODES[split], index])


def _save_png(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _write_class(
    root: Path, product: str, counts: tuple[int, int, int], size: int, seed: int
) -> None:
    n_train, n_test_good, n_test_defect = counts
    base = root / product
    for i in range(n_train):
        _save_png(render_good(product, _image_rng(seed, product, "train", i), size),
                  base / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(render_good(product, _image_rng(seed, product, "test_good", i), size),
                  base / "test" / "good" / f"{i:03d}.png")
    kinds = DEFECTS[product]
    for i in range(n_test_defect):
        kind = kinds[i % len(kinds)]  # round-robin over the defect kinds
        rng = _image_rng(seed, product, "test_defect", i)
        image, mask, _ = render_defect(product, rng, size, kind)
        stem = f"{i // len(kinds):03d}"
        _save_png(image, base / "test" / kind / f"{stem}.png")
        _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{stem}_mask.png")


def generate_dataset(
    root: str | Path,
    classes: Sequence[str] = ("tiles", "rings", "weave"),
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Writes a synthetic dataset in the MVTec-AD layout (PNG files).

    Defect images are spread round-robin over the product's defect kinds,
    under ``test/<defect>/`` with 0/255 masks in
    ``ground_truth/<defect>/<stem>_mask.png``. The same arguments always give
    byte-identical files.

    Args:
        root: Output root folder (created if needed).
        classes: Products to write, from ``PRODUCTS``.
        n_train: Normal training images per class.
        n_test_good: Normal test images per class.
        n_test_defect: Defective test images per class.
        size: Side length of the images.
        seed: Random seed.
        overwrite: Replace class folders that already exist; when False an
            existing non-empty class folder raises FileExistsError.

    Returns:
        The root folder.
    """
    root = Path(root)
    for product in classes:
        _check_product(product)
        class_dir = root / product
        if class_dir.exists() and any(class_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"class folder already exists and is not empty: {class_dir}")
            shutil.rmtree(class_dir)
    for product in classes:
        _write_class(root, product, (n_train, n_test_good, n_test_defect), size, seed)
    return root
