"""One image reader: training, registration, the camera simulator and serving see the same pixels.

A product fitted or registered on pixels other than the ones the worker serves would be scored
on a different image than it was measured on; these tests pin every path to bit-identical
model inputs for the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.banks.register import read_shots
from inspector.tools.camera import encode_payload, load_rgb
from inspector.decode import DecodeError, decode_file, draft_side, load_image_file, resize_square
from inspector.worker.ingest import prepare
from inspector.wire import FrameHeader, WireLimits
from trainer.data import load_image

SIZE = 48  # the model input side; the files are other sizes, so every path resizes


def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One file per kind a line or a dataset holds: name -> (path, frame encoding)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (61, 29), dtype=np.uint8)
    wide = rng.integers(0, 65536, (33, 41), dtype=np.uint16)
    out = {}
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out["rgb png"] = (tmp_path / "rgb.png", "png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=85)
    out["jpeg"] = (tmp_path / "rgb.jpg", "jpeg")
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    out["grayscale png"] = (tmp_path / "gray.png", "png")
    Image.fromarray(wide).save(tmp_path / "wide.png")  # mode I;16
    out["16-bit png"] = (tmp_path / "wide.png", "png")
    big = np.kron(rng.integers(0, 256, (26, 34, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=90)  # 208 x 272: over 4x the input, decoded at 1/2
    out["large jpeg"] = (tmp_path / "big.jpg", "jpeg")
    return out


@pytest.mark.parametrize("kind", ["rgb png", "jpeg", "grayscale png", "16-bit png", "large jpeg"])
def test_training_registration_camera_and_serving_see_identical_pixels(tmp_path: Path, kind: str) -> None:
    path, encoding = _files(tmp_path)[kind]
    data = path.read_bytes()
    header = FrameHeader(frame_id="f", camera="cam", ts_ns=0, encoding=encoding)
    served, _ = prepare(header, memoryview(data), WireLimits(), SIZE)  # the worker's ingest
    trained = load_image(path, SIZE)  # trainer.data, what fitting and the threshold read
    registered = read_shots([path], SIZE)[0].pixels  # inspector bank add
    payload, _ = encode_payload(load_rgb(path), "png", 90)  # the camera simulator, lossless encoding
    camera, _ = prepare(FrameHeader(frame_id="g", camera="cam", ts_ns=0, encoding="png"), memoryview(payload),
                        WireLimits(), SIZE)
    assert served.shape == (SIZE, SIZE, 3) and served.dtype == np.uint8
    for name, pixels in (("trainer", trained), ("registration", registered)):
        assert np.array_equal(pixels, served), f"{name} pixels differ from the served ones for a {kind}"
    if kind == "large jpeg":
        # The simulator sends its full decode as a PNG, which is never reduced; the served JPEG is
        # decoded at half scale (a camera sending the JPEG itself gives the served pixels). On this
        # blocky image the two inputs differ by well under 2 grey levels on average.
        assert decode_file(data, reduce_to=draft_side(SIZE)).shape == (104, 136, 3)
        assert np.abs(camera.astype(float) - served).mean() < 2.0
    else:
        assert np.array_equal(camera, served), f"camera pixels differ from the served ones for a {kind}"


def test_sixteen_bit_grey_is_scaled_with_rounding(tmp_path: Path) -> None:
    wide = np.array([[0, 128, 129, 257 * 100, 257 * 100 + 128, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    rgb = load_image_file(tmp_path / "w.png")
    # round(v * 255 / 65535): 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 25828 -> 100.498 -> 100
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 100, 100, 255]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_other_file_formats_decode_like_frames(tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.bmp")
    Image.fromarray(rgb).save(tmp_path / "a.tif")
    for name in ("a.bmp", "a.tif"):
        assert np.array_equal(load_image_file(tmp_path / name), rgb)
        assert np.array_equal(load_image_file(tmp_path / name, SIZE), resize_square(rgb, SIZE))


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "junk.bin").write_bytes(b"not an image at all")
    for name in ("junk.png", "junk.bin"):
        with pytest.raises(DecodeError, match=name):
            load_image_file(tmp_path / name)
    with pytest.raises(DecodeError) as err:
        decode_file(b"garbage")
    assert err.value.reason == "corrupt_image"


def test_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_the_input_size(tmp_path: Path) -> None:
    """A JPEG far larger than the model input is decoded at 1/2, 1/4 or 1/8 scale, never below the
    input size on either side; the resized input stays close to the one from a full decode (mean
    difference under 2 grey levels on this smooth image: the DCT scaling averages where bilinear
    from the full image samples)."""
    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([(xx / 800 * 255), (yy / 600 * 255), ((xx + yy) / 1400 * 255)], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "smooth.jpg", quality=95)
    data = (tmp_path / "smooth.jpg").read_bytes()
    header = FrameHeader(frame_id="f", camera="cam", ts_ns=0, encoding="jpeg")
    from inspector.decode import decode_image

    assert decode_image(header, data).shape == (600, 800, 3)
    assert decode_image(header, data, reduce_to=256).shape == (300, 400, 3)  # 1/2: 1/4 would be 150 high
    assert decode_image(header, data, reduce_to=64).shape == (75, 100, 3)  # 1/8
    assert decode_image(header, data, reduce_to=700).shape == (600, 800, 3)  # no smaller scale keeps 700
    full = resize_square(decode_image(header, data), 64).astype(float)
    reduced = resize_square(decode_image(header, data, reduce_to=64), 64).astype(float)
    assert np.abs(full - reduced).mean() < 2.0
    png = FrameHeader(frame_id="p", camera="cam", ts_ns=0, encoding="png")
    Image.fromarray(smooth).save(tmp_path / "smooth.png")
    assert decode_image(png, (tmp_path / "smooth.png").read_bytes(), reduce_to=64).shape == (600, 800, 3)
