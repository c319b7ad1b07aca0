"""``inspector bank add | list | show | remove | export | import`` against both stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.artifact import save_artifact
from inspector.cli import main
from inspector.model import InspectionModel

from .conftest import tiny_config


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "model"
    save_artifact(InspectionModel(tiny_config()).eval(), path, None)
    return path


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> Path:
    """Six good images of a made-up product (PNG and JPEG, one 16-bit grayscale)."""
    d = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    for i in range(5):
        img = (rng.random((80, 96, 3)) * 60 + 100).astype(np.uint8)
        Image.fromarray(img).save(d / f"good_{i}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray((rng.random((80, 96)) * 20000 + 20000).astype(np.uint16)).save(d / "good_5.png")
    (d / "notes.txt").write_text("not an image, ignored by folder expansion")
    return d


@pytest.fixture(params=["file", "redis"])
def store_url(request, tmp_path: Path, redis_url: str, redis_prefix: str, monkeypatch) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'banks'}"
    monkeypatch.setenv("INSPECTOR_BANKS_PREFIX", redis_prefix)
    return redis_url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_add_list_show_export_import_remove(capsys, artifact, good_images, store_url, tmp_path) -> None:
    base = ("--line", "3", "--store", store_url)
    code, out, err = run(capsys, "bank", "add", *base, "--product", "valve-b", "--artifact", str(artifact),
                         str(good_images))
    assert code == 0, err
    assert "registered valve-b version 1" in out and "6 images in the bank" in out  # all 6: up to 64 enter it

    code, out, _ = run(capsys, "bank", "list", *base, "--json")
    listing = json.loads(out)
    assert code == 0 and listing["epoch"] == 1
    assert [(p["product"], p["version"], p["shots"]) for p in listing["products"]] == [("valve-b", 1, 6)]

    code, out, _ = run(capsys, "bank", "show", *base, "--product", "valve-b", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["candidates"] == 6 and len(shown["images"]) == 6
    assert shown["gamma"] > shown["u"] and shown["signature"].startswith("resnet18@random:64")
    code, out, _ = run(capsys, "bank", "show", *base, "--product", "valve-b")
    assert "registered  u" in out and "signature" in out
    assert "6 scores, cross-scored in 5 folds" in out and "THIN" in out  # 6 images, all in the bank

    exported = tmp_path / "valve-b.bank"
    code, out, _ = run(capsys, "bank", "export", *base, "--product", "valve-b", "--out", str(exported))
    assert code == 0 and exported.stat().st_size > 0

    other = ("--line", "7", "--store", store_url)
    code, out, err = run(capsys, "bank", "import", *other, str(exported), "--product", "valve-b2",
                         "--artifact", str(artifact))
    assert code == 0, err
    code, out, _ = run(capsys, "bank", "show", *other, "--product", "valve-b2", "--json")
    imported = json.loads(out)
    assert imported["product"] == "valve-b2" and imported["content_sha256"] == shown["content_sha256"]

    code, out, _ = run(capsys, "bank", "remove", *base, "--product", "valve-b")
    assert code == 0 and "removed valve-b" in out
    code, out, _ = run(capsys, "bank", "list", *base)
    assert "0 products" in out


def test_errors_are_clear(capsys, artifact, good_images, store_url, tmp_path) -> None:
    base = ("--line", "3", "--store", store_url)
    code, _, err = run(capsys, "bank", "show", *base, "--product", "absent")
    assert code == 3 and "no product 'absent' on line 3" in err
    code, _, err = run(capsys, "bank", "add", *base, "--product", "x", "--artifact", str(artifact),
                       str(tmp_path / "missing"))
    assert code == 2 and "neither an image file nor a folder" in err
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    code, _, err = run(capsys, "bank", "add", *base, "--product", "x", "--artifact", str(artifact),
                       str(bad), str(good_images / "good_1.png"))
    assert code == 2 and "broken.png is not a readable image" in err
    code, _, err = run(capsys, "bank", "add", *base, "--product", "x", str(good_images))
    assert code == 2 and "no model artifact" in err
    junk = tmp_path / "junk.bank"
    junk.write_bytes(b"nonsense")
    code, _, err = run(capsys, "bank", "import", *base, str(junk))
    assert code == 2 and "truncated" in err
    code, _, err = run(capsys, "bank", "add", *base, "--product", "bad/name", "--artifact", str(artifact),
                       str(good_images))
    assert code == 2 and "must match" in err


def test_import_refuses_a_bank_for_another_model(capsys, artifact, good_images, tmp_path) -> None:
    store = f"file://{tmp_path / 'banks'}"
    assert main(["bank", "add", "--line", "1", "--store", store, "--product", "p", "--artifact", str(artifact),
                 str(good_images)]) == 0
    assert main(["bank", "export", "--line", "1", "--store", store, "--product", "p", "--out",
                 str(tmp_path / "p.bank")]) == 0
    torch.manual_seed(1)
    other = tmp_path / "other-model"
    save_artifact(InspectionModel(tiny_config(size=96)).eval(), other, None)
    capsys.readouterr()
    code, _, err = run(capsys, "bank", "import", "--line", "2", "--store", store, str(tmp_path / "p.bank"),
                       "--artifact", str(other))
    assert code == 2 and "wrong_backbone" in err


def test_registration_inputs_are_checked_and_nothing_is_written(capsys, artifact, good_images, store_url,
                                                                tmp_path) -> None:
    """Fewer distinct images than shots, an empty folder: a clear error and no product; copies of
    one image count once and are named; identical parts get a floored spread and a warning."""
    base = ("--line", "3", "--store", store_url)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "bank", "add", *base, "--product", "x", "--artifact", str(artifact), str(empty))
    assert code == 2 and "no images found" in err
    copies = tmp_path / "copies"
    copies.mkdir()
    original = (good_images / "good_1.png").read_bytes()
    for i in range(3):
        (copies / f"copy_{i}.png").write_bytes(original)
    (copies / "other.png").write_bytes((good_images / "good_3.png").read_bytes())
    code, _, err = run(capsys, "bank", "add", *base, "--product", "x", "--artifact", str(artifact),
                       "--shots", "3", str(copies))
    assert code == 2 and "2 distinct good images, fewer than the 3 a product needs (2 duplicates left out)" in err
    code, _, err = run(capsys, "bank", "show", *base, "--product", "x")
    assert code == 3  # nothing was written
    code, out, err = run(capsys, "bank", "add", *base, "--product", "dup", "--artifact", str(artifact),
                         "--shots", "2", *(str(p) for p in sorted(good_images.glob("good_*"))), *(str(p) for p in sorted(copies.glob("copy_*"))))
    assert code == 0, err
    assert "3 duplicate images (same content) counted once: copy_0.png = good_1.png" in err
    shown = json.loads(run(capsys, "bank", "show", *base, "--product", "dup", "--json")[1])
    assert shown["candidates"] == 6  # good_0..good_5, each once
    same = tmp_path / "same"
    same.mkdir()
    pixels = np.full((80, 96, 3), 128, np.uint8)
    for i in range(5):  # five different files (a changing corner pixel) of the same blank part
        img = pixels.copy()
        img[0, 0, 0] = i
        Image.fromarray(img).save(same / f"same_{i}.png")
    code, _, err = run(capsys, "bank", "add", *base, "--product", "blank", "--artifact", str(artifact),
                       "--shots", "2", str(same))
    assert code == 0 and "scored almost identically" in err, err


def test_bank_images_and_capacity(capsys, artifact, good_images, store_url) -> None:
    """``--bank-images`` caps the images in the bank (the rest are scored against it); a bank that
    would not fit the model's fixed capacity (64 px: 256 level-1 positions per image, capacity
    1024 vectors) is refused before anything is computed or written."""
    base = ("--line", "3", "--store", store_url)
    code, out, err = run(capsys, "bank", "add", *base, "--product", "two", "--artifact", str(artifact),
                         "--bank-images", "2", str(good_images))
    assert code == 0 and "2 images in the bank" in out and "picked the 2 most diverse of 6" in err, err
    assert "leave-one-out, 4 against the served bank" in out  # 2 bank images: each against the other
    code, _, err = run(capsys, "bank", "add", *base, "--product", "big", "--artifact", str(artifact),
                       "--coreset", "2048", str(good_images))
    assert code == 2 and "level 1: 1536 vectors, capacity 1024" in err, err
    assert "do not contain them" not in err  # refused from the image count, before any feature was computed
    assert run(capsys, "bank", "show", *base, "--product", "big")[0] == 3  # nothing was written
    code, _, err = run(capsys, "bank", "add", *base, "--product", "neg", "--artifact", str(artifact),
                       "--bank-images", "0", str(good_images))
    assert code == 2 and "--bank-images must be a positive count" in err, err


def test_coreset_per_level(capsys, artifact, good_images, store_url) -> None:
    """``--coreset A,B,C`` caps each level on its own (6 images at 64 px: 1536/384/96 positions);
    ``bank show`` reports the caps; a wrong number of caps or a word is refused, nothing written."""
    base = ("--line", "3", "--store", store_url)
    code, out, err = run(capsys, "bank", "add", *base, "--product", "lv", "--artifact", str(artifact),
                         "--coreset", "512,128,32", str(good_images))
    assert code == 0, err
    shown = json.loads(run(capsys, "bank", "show", *base, "--product", "lv", "--json")[1])
    assert shown["levels"] == [[512, 64], [128, 128], [32, 256]] and shown["coreset"] == [512, 128, 32], shown
    assert "coreset 512/128/32" in run(capsys, "bank", "show", *base, "--product", "lv")[1]
    code, _, err = run(capsys, "bank", "add", *base, "--product", "two", "--artifact", str(artifact),
                       "--coreset", "512,128", str(good_images))
    assert code == 2 and "needs 3 caps, got 2" in err, err
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it before anything runs
        run(capsys, "bank", "add", *base, "--product", "word", "--artifact", str(artifact),
            "--coreset", "many", str(good_images))
    assert exit_.value.code == 2 and "a coreset is a whole number" in capsys.readouterr().err
    code, _, err = run(capsys, "bank", "add", *base, "--product", "zero", "--artifact", str(artifact),
                       "--coreset", "512,0,32", str(good_images))
    assert code == 2 and "positive count per level" in err, err
    for product in ("two", "word", "zero"):
        assert run(capsys, "bank", "show", *base, "--product", product)[0] == 3  # nothing was written
