"""Tests of minicnn.data.augment: batched, seeded geometric augmentation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn.data import Augmenter
from minicnn.data.augment import affine_warp, erase_rectangles, integer_shift

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """NumPy, and CuPy: the real one on a GPU, else the strict stand-in (tests/fakecupy.py)."""
    return np if request.param == "numpy" else request.getfixturevalue("cupy")


def batch(xp, n=6, c=1, h=12, w=12, seed=0, dtype=np.float32):
    rng = np.random.RandomState(seed)
    return xp.asarray(rng.standard_normal((n, c, h, w)).astype(dtype))


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


FULL = dict(flip=True, rotation=15, shift=0.1, zoom=(0.9, 1.1), crop_padding=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shape_dtype_backend_preserved(xp, dtype):
    x = batch(xp, n=5, c=2, h=10, w=14, dtype=dtype)
    out = Augmenter(**FULL, seed=0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert type(out) is type(x)
    assert not np.array_equal(host(out), host(x))
    assert np.isfinite(host(out)).all()


def test_deterministic_under_seed(xp):
    x = batch(xp)
    a = Augmenter(**FULL, seed=3)
    b = Augmenter(**FULL, seed=3)
    first = host(a(x))
    np.testing.assert_array_equal(first, host(b(x)))
    # The stream advances: the next batch gets other parameters...
    second = host(a(x))
    assert not np.array_equal(first, second)
    # ...and reseed restarts it.
    a.reseed(3)
    np.testing.assert_array_equal(host(a(x)), first)
    assert not np.array_equal(host(Augmenter(**FULL, seed=4)(x)), first)


def test_identity_at_eval_and_when_off(xp):
    x = batch(xp)
    assert Augmenter(**FULL, seed=0)(x, training=False) is x
    off = Augmenter(flip=False, rotation=0.0, shift=0.0, zoom=(1.0, 1.0), crop_padding=0)
    assert not off.active
    assert off(x) is x


def test_flip_with_probability_one_flips_exactly(xp):
    x = batch(xp)
    out = Augmenter(flip=True, flip_prob=1.0, seed=0)(x)
    np.testing.assert_array_equal(host(out), host(x)[..., ::-1])


def test_flip_half_the_time_flips_some_images_only(xp):
    x = batch(xp, n=64)
    out = host(Augmenter(flip=True, seed=1)(x))
    xh = host(x)
    flipped = np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, xh)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, xh)])
    assert np.all(flipped ^ kept)  # each image is either flipped or untouched
    assert 10 < flipped.sum() < 54


def test_warp_with_neutral_parameters_is_identity(xp):
    # Rotation range (0, 0), zoom (1, 1), shift 0 inside an active warp:
    # force the warp path on with a degenerate zoom range that is exactly 1.
    x = batch(xp)
    aug = Augmenter(flip=False, rotation=(0.0, 0.0), zoom=(1.0, 1.0 + 1e-12), seed=0)
    np.testing.assert_allclose(host(aug(x)), host(x), atol=1e-6)
    ident = xp.tile(xp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), (x.shape[0], 1, 1))
    np.testing.assert_array_equal(host(affine_warp(x, ident)), host(x))


def test_warp_flip_matrix_equals_index_flip(xp):
    x = batch(xp)
    mirror = xp.tile(xp.asarray([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (x.shape[0], 1, 1))
    np.testing.assert_array_equal(host(affine_warp(x, mirror)), host(x)[..., ::-1])


def test_warp_flip_inside_augmenter(xp):
    # Flip folded into the warp (rotation range (0, 0) keeps the warp path on).
    x = batch(xp)
    aug = Augmenter(flip=True, flip_prob=1.0, rotation=(0.0, 0.0), zoom=(1.0, 1.0 + 1e-12), seed=0)
    np.testing.assert_allclose(host(aug(x)), host(x)[..., ::-1], atol=1e-6)


@pytest.mark.parametrize("size", [8, 9])
def test_rotation_by_90_equals_rot90(xp, size):
    x = batch(xp, n=3, c=2, h=size, w=size)
    aug = Augmenter(flip=False, rotation=(90.0, 90.0), seed=0)
    np.testing.assert_allclose(host(aug(x)), np.rot90(host(x), k=1, axes=(2, 3)), atol=1e-5)
    aug = Augmenter(flip=False, rotation=(-90.0, -90.0), seed=0)
    np.testing.assert_allclose(host(aug(x)), np.rot90(host(x), k=-1, axes=(2, 3)), atol=1e-5)


def test_integer_shift_via_warp_matches_roll(xp):
    # A whole-pixel shift warp moves content like a roll, edge-filled at the border.
    x = batch(xp, n=2, h=10, w=10)
    m = xp.asarray([[[1.0, 0.0, -2.0], [0.0, 1.0, 3.0]]] * 2)  # src = out + (-2, 3)
    out = host(affine_warp(x, m))
    xh = host(x)
    np.testing.assert_allclose(out[:, :, 2:, :7], xh[:, :, :8, 3:], atol=1e-6)
    np.testing.assert_allclose(out[:, :, :2, :7], np.repeat(xh[:, :, :1, 3:], 2, axis=2), atol=1e-6)


def test_zoom_in_by_two_about_the_centre(xp):
    x = batch(xp, n=1, h=9, w=9)  # odd size: the centre is a pixel
    m = xp.asarray([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])
    out = host(affine_warp(x, m))
    xh = host(x)
    assert out[0, 0, 4, 4] == pytest.approx(xh[0, 0, 4, 4])
    assert out[0, 0, 6, 4] == pytest.approx(xh[0, 0, 5, 4])  # 2 px from the centre reads 1 px
    assert out[0, 0, 5, 4] == pytest.approx((xh[0, 0, 4, 4] + xh[0, 0, 5, 4]) / 2, abs=1e-6)


def test_crop_with_padding_is_a_shifted_copy(xp):
    p = 3
    x = batch(xp, n=16, h=10, w=10, seed=5)
    out = host(Augmenter(flip=False, crop_padding=p, seed=2)(x))
    xh = host(x)
    assert out.shape == xh.shape
    padded = np.pad(xh, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
    shifts = []
    for o, pad in zip(out, padded):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(o, pad[:, dy : dy + 10, dx : dx + 10])
        ]
        assert matches, "crop output is not a window of the edge-padded image"
        shifts.append(matches[0])
    assert len(set(shifts)) > 3  # the offsets are random per image


def test_integer_shift_offsets(xp):
    x = batch(xp, n=2, h=6, w=6)
    out = host(integer_shift(x, xp.asarray([[0, 0], [1, -2]])))
    xh = host(x)
    np.testing.assert_array_equal(out[0], xh[0])
    np.testing.assert_array_equal(out[1, :, :5, 2:], xh[1, :, 1:, :4])


def test_pixel_values_stay_in_input_range(xp):
    # Bilinear weights are convex and edge fill copies pixels: no new extremes.
    x = xp.asarray(np.random.RandomState(0).uniform(-1, 1, (8, 1, 16, 16)).astype(np.float32))
    out = host(Augmenter(**FULL, seed=0)(x))
    assert out.min() >= float(x.min()) - 1e-6 and out.max() <= float(x.max()) + 1e-6


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_survives(n, c, h, w, seed):
    x = np.random.RandomState(seed).standard_normal((n, c, h, w)).astype(np.float32)
    out = Augmenter(**FULL, seed=seed)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and np.isfinite(out).all()


def test_argument_validation():
    with pytest.raises(ValueError, match="shift"):
        Augmenter(shift=4)
    with pytest.raises(ValueError, match="zoom"):
        Augmenter(zoom=1.1)
    with pytest.raises(ValueError, match="crop_padding"):
        Augmenter(crop_padding=1.5)
    with pytest.raises(ValueError, match="flip_prob"):
        Augmenter(flip_prob=2)
    with pytest.raises(ValueError, match="rotation"):
        Augmenter(rotation=-5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Augmenter(flip=True, seed=0)(np.zeros((3, 8, 8), np.float32))


# -- random erasing ----------------------------------------------------------------------------
ERASED = 7.0  # outside the range of the test batches' values, so erased pixels can be told apart


def erased_boxes(out):
    """For each image of ``out`` (N, C, H, W): the (top, left, height, width) of its pixels equal to
    ERASED, after checking they form one axis-aligned rectangle, the same on every channel; or None."""
    boxes = []
    for image in out:
        hit = image == ERASED
        assert (hit == hit[0]).all(), "the rectangle differs between channels"
        rows, cols = np.nonzero(hit[0])
        if rows.size == 0:
            boxes.append(None)
            continue
        top, left = rows.min(), cols.min()
        height, width = rows.max() - top + 1, cols.max() - left + 1
        assert hit[0].sum() == height * width, "the erased pixels are not one filled rectangle"
        boxes.append((top, left, height, width))
    return boxes


def test_erase_rectangles_matches_a_loop(xp):
    x = batch(xp, n=4, c=2, h=7, w=9, seed=3)
    boxes = np.array([[0, 0, 7, 9], [2, 3, 1, 1], [6, 8, 1, 1], [1, 2, 4, 5]])
    mask = np.array([True, True, True, False])
    out = host(erase_rectangles(x, xp.asarray(boxes), xp.asarray(mask), ERASED))
    expected = host(x).copy()
    for k, (top, left, height, width) in enumerate(boxes):
        if mask[k]:
            expected[k, :, top : top + height, left : left + width] = ERASED
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32


def test_erasing_with_fixed_scale_and_ratio_cuts_that_rectangle(xp):
    # area 1/4 of 48x48 at ratio 1: a 24x24 square, anywhere it fits
    x = batch(xp, n=64, h=48, w=48, seed=1)
    aug = Augmenter(flip=False, erase_prob=1.0, erase_scale=(0.25, 0.25), erase_ratio=(1.0, 1.0),
                    erase_value=ERASED, seed=0)
    out = host(aug(x))
    boxes = erased_boxes(out)
    assert all(b is not None and b[2:] == (24, 24) for b in boxes)
    tops = {b[0] for b in boxes}
    assert min(tops) >= 0 and max(tops) <= 24 and len(tops) > 10  # uniform over the 25 places it fits
    kept = out != ERASED
    np.testing.assert_array_equal(out[kept], host(x)[kept])


def test_erasing_draws_area_and_ratio_from_their_ranges(xp):
    x = batch(xp, n=400, h=48, w=48, seed=2)
    out = host(Augmenter(flip=False, erase_prob=1.0, erase_value=ERASED, seed=5)(x))
    boxes = erased_boxes(out)
    areas = np.array([b[2] * b[3] for b in boxes]) / (48 * 48)
    ratios = np.array([b[2] / b[3] for b in boxes])
    # rounding each side to whole pixels moves the area a little past the (0.02, 0.33) range, clipping below it
    assert areas.min() >= 0.015 and areas.max() <= 0.36
    assert abs(np.median(areas) - (0.02 + 0.33) / 2) < 0.04  # uniform in area
    assert ratios.min() >= 0.25 and ratios.max() <= 3.6
    assert abs(np.median(np.log(ratios))) < 0.2  # log-uniform over (0.3, 3.3): median ratio near 1
    assert (ratios > 1.5).sum() > 50 and (ratios < 1 / 1.5).sum() > 50  # tall and wide ones both


def test_erase_prob_is_the_fraction_of_erased_images(xp):
    x = batch(xp, n=1000, h=8, w=8, seed=4)
    out = host(Augmenter(flip=False, erase_prob=0.3, erase_value=ERASED, seed=1)(x))
    erased = sum(b is not None for b in erased_boxes(out))
    assert 230 <= erased <= 370  # binomial(1000, 0.3): mean 300, sd 14.5
    none = host(Augmenter(flip=False, erase_prob=0.0, crop_padding=1, seed=1)(x))
    assert not (none == ERASED).any()


def test_erasing_comes_last_and_leaves_the_other_draws_alone(xp):
    x = batch(xp, n=12, h=16, w=16, seed=6)
    plain = host(Augmenter(**FULL, seed=9)(x))
    erased = host(Augmenter(**FULL, erase_prob=1.0, erase_value=ERASED, seed=9)(x))
    kept = erased != ERASED
    assert (~kept).any()
    np.testing.assert_array_equal(erased[kept], plain[kept])


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 3),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    scale=st.tuples(st.floats(0.01, 1.0), st.floats(0.01, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)).map(sorted),
    seed=st.integers(0, 2**31 - 1),
)
def test_erasing_any_shape_gives_one_rectangle_inside_the_image(n, c, h, w, scale, ratio, seed):
    x = np.random.RandomState(seed).uniform(-1, 1, (n, c, h, w)).astype(np.float32)
    out = Augmenter(flip=False, erase_prob=1.0, erase_scale=scale, erase_ratio=ratio, erase_value=ERASED,
                    seed=seed)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    for box in erased_boxes(out):
        assert box is not None  # at least one pixel: the sides are clipped to [1, H] and [1, W]
        top, left, height, width = box
        assert 0 <= top and top + height <= h and 0 <= left and left + width <= w


def test_erasing_argument_validation():
    with pytest.raises(ValueError, match="erase_prob"):
        Augmenter(erase_prob=1.5)
    with pytest.raises(ValueError, match="erase_scale"):
        Augmenter(erase_scale=(0.0, 0.3))
    with pytest.raises(ValueError, match="erase_scale"):
        Augmenter(erase_scale=(0.2, 1.5))
    with pytest.raises(ValueError, match="erase_scale"):
        Augmenter(erase_scale=(0.3, 0.2))
    with pytest.raises(ValueError, match="erase_ratio"):
        Augmenter(erase_ratio=(0.0, 2.0))
    with pytest.raises(ValueError, match="erase_value"):
        Augmenter(erase_value=float("nan"))
    assert Augmenter(flip=False, erase_prob=0.5).active
