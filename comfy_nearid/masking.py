"""The reference implementation's evaluation masking: object masks applied to pixels.

Two ways to use an object mask exist in this package:

- ``attention`` (our default): the image is embedded whole and the head's attention pooling
  is restricted to the mask's patches (:meth:`comfy_nearid.model.IdentityModel.token_mask`);
- ``pixels`` (the reference evaluation's ``--masks``, see ``PROTOCOL.md`` section 8): the
  image is replaced by a copy whose pixels outside the cleaned mask are black
  (``keep="foreground"``), or inside it (``keep="background"``, a context-only probe), and
  that copy is embedded without any mask.

The cleaning reproduces the reference's OpenCV steps bit for bit with numpy and scipy
(tested against OpenCV itself): grey-scale, 5x5 Gaussian blur, threshold (> 10 -> 255),
5x5 close then open, keep the largest external contour filled (no contour: the thresholded
mask as it is), binarise, nearest-neighbour resize to the image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from .errors import InvalidInputError

MaskMode = Literal["attention", "pixels"]
MaskKeep = Literal["foreground", "background"]
MASK_MODES: tuple[str, ...] = ("attention", "pixels")
MASK_KEEPS: tuple[str, ...] = ("foreground", "background")

_BLUR_TAPS = (1, 4, 6, 4, 1)  # OpenCV's 5-tap kernel for sigma 0, x 16
_THRESHOLD = 10  # blurred values > 10 become 255
_MORPH_SIZE = 5  # square structuring element of close / open


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy comes with the `masks` extra
        raise InvalidInputError(
            "pixel masking (--masks pixels) needs scipy: pip install 'comfy-nearid[masks]' (or pip install scipy)"
        ) from e
    return ndimage


def mask_to_grey(mask: Image.Image | np.ndarray) -> np.ndarray:
    """A mask image -> uint8 ``[H, W]`` grey levels, with OpenCV's RGB -> grey weights.

    Mode ``L`` (and a 2-D uint8 array) is taken as is; any other mode goes through RGB
    (alpha dropped, as an image reader without alpha does) and
    ``(4899 R + 9617 G + 1868 B + 8192) >> 14`` (OpenCV's fixed-point 0.299/0.587/0.114).
    """
    if isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 2:
            if arr.dtype == np.uint8:
                return arr
            if arr.dtype == bool:
                return arr.astype(np.uint8) * 255
            raise InvalidInputError(f"mask array: expected uint8 or bool [H, W], got {arr.dtype} {arr.shape}")
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise InvalidInputError(f"mask array: expected uint8 [H, W], [H, W, 3] or [H, W, 4], got {arr.dtype} {arr.shape}")
        rgb = arr[..., :3].astype(np.int64)
    elif isinstance(mask, Image.Image):
        if mask.mode == "L":
            return np.asarray(mask, dtype=np.uint8)
        if mask.mode == "1":
            return np.asarray(mask.convert("L"), dtype=np.uint8)
        rgb = np.asarray(mask.convert("RGB"), dtype=np.int64)
    else:
        raise InvalidInputError(f"mask: expected a PIL image or a numpy array, got {type(mask).__name__}")
    grey = (rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + 8192) >> 14
    return grey.astype(np.uint8)


def _gaussian_blur_5x5(grey: np.ndarray) -> np.ndarray:
    """OpenCV's ``GaussianBlur(grey, (5, 5), 0)`` on uint8: taps 1 4 6 4 1 / 16 each way,
    mirrored border without repeating the edge (reflect-101), rounded half up."""
    padded = np.pad(grey.astype(np.int32), 2, mode="reflect")  # sums stay below 2**16
    h, w = grey.shape
    rows = sum(k * padded[:, i : i + w] for i, k in enumerate(_BLUR_TAPS))
    total = sum(k * rows[i : i + h] for i, k in enumerate(_BLUR_TAPS))
    return ((total + 128) >> 8).astype(np.uint8)


def _window_extreme(binary: np.ndarray, take_max: bool) -> np.ndarray:
    """5x5 max (dilate) or min (erode) of a bool image; pixels outside the image never count."""
    pad = _MORPH_SIZE // 2
    padded = np.pad(binary, pad, mode="constant", constant_values=not take_max)
    h, w = binary.shape
    reduce = np.logical_or if take_max else np.logical_and
    # a square window is a row window then a column window
    rows = reduce.reduce([padded[:, i : i + w] for i in range(_MORPH_SIZE)])
    return reduce.reduce([rows[i : i + h] for i in range(_MORPH_SIZE)])


def _contour_areas(labels: np.ndarray, count: int) -> np.ndarray:
    """Area of each labelled region's outer contour, a polygon through boundary pixel centres.

    Every 2x2 block of pixel centres is a unit cell: inside the polygon when its four
    pixels belong to the region, half inside (cut by a diagonal edge) with three, outside
    with fewer (edges and 8-connected pinches enclose nothing). Two regions never share a
    cell (they would be 8-connected), so each cell belongs to at most one label.
    """
    corners = (labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:])
    inside = sum((c > 0).astype(np.uint8) for c in corners)
    owner = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3]))
    covered = inside >= 3
    weight = np.where(inside[covered] == 4, 1.0, 0.5)
    return np.bincount(owner[covered], weights=weight, minlength=count + 1)[1:]


def clean_mask(mask: Image.Image | np.ndarray) -> np.ndarray:
    """The reference's mask cleaning -> uint8 ``[H, W]`` with values 0 or 255.

    Grey-scale, 5x5 Gaussian blur, threshold (> 10 -> 255), 5x5 close then open, then only
    the largest external contour (polygon area), filled, holes included; among contours of
    equal area the last one in raster order of their first pixel (the first that OpenCV's
    contour list and ``max`` return). With no contour left after close / open, the
    thresholded mask is returned as it is.
    """
    ndimage = _scipy_ndimage()
    thresholded = _gaussian_blur_5x5(mask_to_grey(mask)) > _THRESHOLD
    closed = _window_extreme(_window_extreme(thresholded, take_max=True), take_max=False)
    opened = _window_extreme(_window_extreme(closed, take_max=False), take_max=True)
    if not opened.any():
        return thresholded.astype(np.uint8) * 255
    # an external contour encloses one 8-connected region together with everything in its
    # holes (background is 4-connected); regions inside another's hole are not external
    background, _ = ndimage.label(~opened, structure=ndimage.generate_binary_structure(2, 1))
    outside = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    filled = opened | ((background > 0) & ~np.isin(background, outside[outside > 0]))
    labels, count = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    areas = _contour_areas(labels, count)
    largest = int(np.flatnonzero(areas == areas.max())[-1]) + 1
    return (labels == largest).astype(np.uint8) * 255


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's ``INTER_NEAREST`` resize of a ``[H, W]`` array to ``size = (width, height)``:
    destination pixel ``x`` takes source ``floor(x * (1 / (W_dst / W_src)))``."""
    h, w = mask.shape
    width, height = size
    if (width, height) == (w, h):
        return mask
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / w))).astype(np.int64), w - 1)
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / h))).astype(np.int64), h - 1)
    return mask[ys[:, None], xs[None, :]]


def subject_region(mask: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cleaned, binarised mask resized to an image of ``size = (width, height)``: bool ``[H, W]``."""
    return resize_nearest(clean_mask(mask) > 0, size)


def apply_pixel_mask(image: Image.Image, mask: Image.Image | np.ndarray, keep: MaskKeep = "foreground") -> Image.Image:
    """The reference's masked copy of an image: RGB, black outside (``keep="foreground"``) or
    inside (``keep="background"``) the cleaned object mask; the image itself is unchanged."""
    if keep not in MASK_KEEPS:
        raise InvalidInputError(f"mask keep must be one of {MASK_KEEPS}, got {keep!r}")
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    subject = subject_region(mask, image.size)
    rgb[~subject if keep == "foreground" else subject] = 0
    return Image.fromarray(rgb)
