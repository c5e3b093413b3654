"""The reference's pixel masking (comfy_nearid.masking) equals OpenCV running the same steps.

The independent implementation is OpenCV itself (``opencv-python-headless``, in the ``test``
extra), called the way the published protocol describes (PROTOCOL.md section 8): grey-scale,
``GaussianBlur((5, 5), 0)``, ``threshold(10)``, 5x5 close then open, the largest external
contour by ``contourArea`` drawn filled (no contour: the thresholded mask), binarise,
``INTER_NEAREST`` resize, black outside (foreground) or inside (background).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from comfy_nearid.errors import InvalidInputError
from comfy_nearid.masking import apply_pixel_mask, clean_mask, resize_nearest

KERNEL = np.ones((5, 5), np.uint8)


def opencv_clean(grey: np.ndarray) -> np.ndarray:
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    _, thresholded = cv2.threshold(blurred, 10, 255, cv2.THRESH_BINARY)
    cleaned = cv2.morphologyEx(thresholded, cv2.MORPH_CLOSE, KERNEL)
    cleaned = cv2.morphologyEx(cleaned, cv2.MORPH_OPEN, KERNEL)
    contours, _ = cv2.findContours(cleaned, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return thresholded
    largest = max(contours, key=cv2.contourArea)
    out = np.zeros_like(cleaned)
    cv2.drawContours(out, [largest], -1, 255, cv2.FILLED)
    return out


def opencv_masked_image(image: np.ndarray, mask: np.ndarray, keep: str) -> np.ndarray:
    """``image`` uint8 [H, W, 3] RGB, ``mask`` uint8 [h, w] or [h, w, 3] RGB."""
    grey = mask if mask.ndim == 2 else cv2.cvtColor(mask, cv2.COLOR_RGB2GRAY)
    binary = (opencv_clean(grey) > 0).astype(np.uint8)
    if binary.shape != image.shape[:2]:
        binary = cv2.resize(binary, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
    out = image.copy()
    out[(binary == 0) if keep == "foreground" else (binary > 0)] = 0
    return out


def _disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _hand_made_masks() -> dict[str, np.ndarray]:
    """uint8 [H, W] (or RGB [H, W, 3]) masks covering the cases the cleaning has to get right."""
    h, w = 48, 56
    masks: dict[str, np.ndarray] = {}
    blob = np.zeros((h, w), np.uint8)
    blob[_disc(h, w, 27, 22, 12)] = 255
    blob[_disc(h, w, 36, 30, 6)] = 140  # a grey lobe
    masks["blob"] = blob
    two = np.zeros((h, w), np.uint8)
    two[5:20, 4:22] = 255
    two[26:44, 30:52] = 255  # larger: kept
    masks["two components"] = two
    tie = np.zeros((h, w), np.uint8)
    tie[4:16, 4:16] = 255
    tie[30:42, 36:48] = 255  # same area: the tie rule decides
    masks["two equal components"] = tie
    ring = np.zeros((h, w), np.uint8)
    ring[_disc(h, w, 28, 24, 20) & ~_disc(h, w, 28, 24, 12)] = 255
    ring[_disc(h, w, 28, 24, 5)] = 255  # an island in the hole
    masks["ring with a hole and an island"] = ring
    lines = np.zeros((h, w), np.uint8)
    lines[10, 3:50] = 255  # 1 px horizontal line
    lines[:, 40] = 255  # 1 px vertical line crossing it
    for k in range(30):
        lines[15 + k // 2, 5 + k] = 255  # a thin diagonal
    masks["thin lines"] = lines
    faint = np.zeros((h, w), np.uint8)
    faint[20, 10:40] = 30  # blurred to <= 10 except the centre row: removed by the open
    faint[5, 5] = 255
    masks["only specks (no contour after open)"] = faint
    masks["empty"] = np.zeros((h, w), np.uint8)
    masks["full"] = np.full((h, w), 255, np.uint8)
    small = np.zeros((13, 17), np.uint8)
    small[3:10, 4:14] = 255
    masks["smaller than the image"] = small
    large = np.zeros((97, 131), np.uint8)
    large[_disc(97, 131, 60, 50, 30)] = 255
    masks["larger than the image"] = large
    colour = np.zeros((h, w, 3), np.uint8)
    colour[8:40, 10:30] = (200, 30, 60)
    colour[20:28, 30:50] = (0, 0, 90)  # dark blue: grey 10 -> thin after the blur
    masks["RGB colours"] = colour
    return masks


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, (48, 56, 3), dtype=np.uint8)  # no black pixel of its own


@pytest.mark.parametrize("keep", ["foreground", "background"])
@pytest.mark.parametrize("name", list(_hand_made_masks()))
def test_pixel_mask_equals_opencv_on_hand_made_masks(name, keep, image):
    mask = _hand_made_masks()[name]
    expected = opencv_masked_image(image, mask, keep)
    got = np.asarray(apply_pixel_mask(Image.fromarray(image), Image.fromarray(mask), keep))
    np.testing.assert_array_equal(got, expected)


def test_hand_made_cases_exercise_each_rule():
    """The cases above reach each branch (else the comparison would prove less than it says)."""
    masks = _hand_made_masks()
    assert not clean_mask(masks["empty"]).any()
    assert clean_mask(masks["full"]).all()
    specks = clean_mask(masks["only specks (no contour after open)"])
    assert specks.any() and specks.sum() < 255 * 40  # the thresholded specks, kept as they are
    two = clean_mask(masks["two components"]) > 0
    assert two[35, 40] and not two[12, 12]  # the larger rectangle only
    ring = clean_mask(masks["ring with a hole and an island"]) > 0
    assert ring[24, 28 + 9]  # the hole is filled
    tie = clean_mask(masks["two equal components"]) > 0
    assert tie[10, 10] != tie[36, 42]  # exactly one of the two


def test_pixel_mask_equals_opencv_on_random_masks():
    """Random blobs, noise, lines and near-threshold grey levels at random sizes."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(6, 60, 2))
        kind = trial % 4
        if kind == 0:
            mask = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 8))):
                y, x, s = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(1, 12))
                mask[y : y + s, x : x + s] = 255
        elif kind == 1:
            mask = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(1, 5))):
                p0 = tuple(int(v) for v in rng.integers(0, max(h, w), 2))
                p1 = tuple(int(v) for v in rng.integers(0, max(h, w), 2))
                cv2.line(mask, p0, p1, int(rng.integers(1, 256)), int(rng.integers(1, 6)))
        elif kind == 2:
            mask = rng.integers(0, 30, (h, w)).astype(np.uint8)
        else:
            mask = (rng.random((h, w)) > rng.uniform(0.4, 0.95)).astype(np.uint8) * 255
        np.testing.assert_array_equal(clean_mask(mask), opencv_clean(mask), err_msg=f"trial {trial}")


def test_resize_nearest_equals_opencv():
    rng = np.random.default_rng(3)
    for _ in range(100):
        h, w, dh, dw = (int(v) for v in rng.integers(1, 70, 4))
        src = rng.integers(0, 256, (h, w)).astype(np.uint8)
        np.testing.assert_array_equal(resize_nearest(src, (dw, dh)),
                                      cv2.resize(src, (dw, dh), interpolation=cv2.INTER_NEAREST))


def test_full_and_empty_masks_by_hand(image):
    pil = Image.fromarray(image)
    full = Image.new("L", pil.size, 255)
    empty = Image.new("L", pil.size, 0)
    np.testing.assert_array_equal(np.asarray(apply_pixel_mask(pil, full, "foreground")), image)
    assert not np.asarray(apply_pixel_mask(pil, full, "background")).any()
    assert not np.asarray(apply_pixel_mask(pil, empty, "foreground")).any()
    np.testing.assert_array_equal(np.asarray(apply_pixel_mask(pil, empty, "background")), image)


def test_bad_keep_is_a_clear_error(image):
    with pytest.raises(InvalidInputError, match="'inside'"):
        apply_pixel_mask(Image.fromarray(image), Image.new("L", (56, 48)), "inside")  # type: ignore[arg-type]
