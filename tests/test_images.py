"""minicnn.data.images: any image file as FER-2013-style grey levels, and finding the images of folders."""
from __future__ import annotations

import numpy as np
import pytest

from minicnn.data import DataError
from minicnn.data.images import ImageError, find_images, image_extensions, load_image

Image = pytest.importorskip("PIL.Image")


def test_load_image_grey_resize_and_any_size(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "c.png")
    got = load_image(tmp_path / "c.png")
    assert got.dtype == np.uint8 and got.shape == (48, 48)
    expected = np.asarray(Image.fromarray(rgb, "RGB").convert("L").resize((48, 48), Image.BILINEAR))
    np.testing.assert_array_equal(got, expected)
    # size is (H, W): a non-square size must not come out transposed
    assert load_image(tmp_path / "c.png", size=(30, 20)).shape == (30, 20)
    # an image already at size is passed through unchanged; RGBA drops its alpha channel
    grey = rng.integers(0, 256, (48, 48), dtype=np.uint8)
    rgba = np.dstack([grey, grey, grey, np.zeros_like(grey)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), grey)


def test_load_image_scales_16_bit_images_instead_of_clipping(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (48, 48)).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "16.png")  # mode I;16
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "16.png"), grey)


def test_load_image_applies_the_exif_orientation(tmp_path):
    img = np.zeros((48, 48), dtype=np.uint8)
    img[:, :8] = 255  # a white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(img, "L").save(tmp_path / "rot.jpg", exif=exif, quality=95)
    got = load_image(tmp_path / "rot.jpg")
    # displayed upright, the band is at the top
    assert got[:8].mean() > 200 and got[:, :8].mean() < 120


def test_load_image_errors_name_the_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for path, why in ((tmp_path / "nope.png", "no such file"), (tmp_path, "not a file"),
                      (tmp_path / "notes.jpg", "not an image file Pillow can read"),
                      (truncated, "cannot read image")):
        with pytest.raises(ImageError, match=why) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, DataError)


def test_find_images_walks_folders_sorted_skipping_hidden_and_non_images(tmp_path):
    blank = Image.fromarray(np.zeros((4, 4), np.uint8))
    for rel in ("b.png", "a.JPG", "sub/z.webp", "sub/deeper/c.bmp", ".hidden.png", ".cache/d.png", "sub/readme.txt",
                "notes.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith((".txt", ".md")):
            (tmp_path / rel).write_text("x")
        elif rel.endswith(".webp") and ".webp" not in image_extensions():
            continue
        else:
            blank.save(tmp_path / rel, format={"JPG": "JPEG"}.get(rel.rsplit(".", 1)[1], None))
    got = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    want = ["a.JPG", "b.png", "sub/deeper/c.bmp"] + (["sub/z.webp"] if ".webp" in image_extensions() else [])
    assert got == sorted(want)
    # a file named explicitly is kept whatever its extension, in argument order
    assert find_images([tmp_path / "notes.md", tmp_path / "sub"])[0] == tmp_path / "notes.md"
    with pytest.raises(ImageError, match="no such file or folder") as info:
        find_images([tmp_path / "b.png", tmp_path / "gone"])
    assert str(tmp_path / "gone") in str(info.value)
    assert find_images(tmp_path / "sub" / "deeper") == [tmp_path / "sub" / "deeper" / "c.bmp"]


def test_image_extensions_are_those_pillow_opens():
    exts = image_extensions()
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif"} <= exts
    assert ".txt" not in exts and ".npz" not in exts
