"""Image and mask input handling: decoding files, normalising every input kind, preprocessing.

Every image, whatever it arrives as (path, PIL image, numpy array, ``[B,3,H,W]`` tensor,
ComfyUI ``[B,H,W,C]`` IMAGE tensor), is first turned into 8-bit RGB and then resized with
Pillow's bicubic filter, exactly as the reference SigLIP processor does. One path for all
kinds is what makes a file, its PIL image and its ComfyUI tensor give the same embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError, InvalidInputError

ImageInput = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent pixels are composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        else:
            top = 65535.0 if arr.size and arr.max() > 255 else 255.0
            if mode.startswith("I;16"):
                top = 65535.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(opener: Any, description: str, mode: str = "RGB") -> Image.Image:
    """Decode a file path or file-like object into ``mode`` ("RGB": any Pillow mode converted,
    transparency composited onto white; "L": a mask, converted directly), applying the EXIF
    orientation. Every failure is an :class:`ImageLoadError` naming ``description``.

    Images over ``Image.MAX_IMAGE_PIXELS`` (Pillow's decompression-bomb limit, read, never
    changed) are refused from the header's size before any pixel is decoded. No warning filter
    is touched: they are process-global, so changing them from decode threads would leak into
    the caller's own ``Image.open`` calls.
    """
    try:
        with Image.open(opener) as img:
            _check_pixel_count(img, description)
            img.load()
            img = ImageOps.exif_transpose(img)
            out = _to_rgb(img) if mode == "RGB" else img.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Image.open itself raises past twice the limit (or past it, where the caller's own
        # filters turn the warning into an error).
        raise ImageLoadError(
            description, f"larger than Pillow's decompression-bomb limit ({Image.MAX_IMAGE_PIXELS} pixels): {e}"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(description, "not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(description, f"corrupt or truncated image data ({e})") from e
    return check_image(out, description)


def _check_pixel_count(img: Image.Image, description: str) -> None:
    """Refuse an image whose header declares more pixels than Pillow's limit (``None``: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageLoadError(
            description,
            f"larger than Pillow's decompression-bomb limit ({limit} pixels): {width}x{height} = "
            f"{width * height} pixels, refused before decoding",
        )


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image file into an RGB PIL image (``mode="L"``: a mask), applying its EXIF orientation.

    Raises :class:`ImageLoadError` naming the file when it is missing, not a regular file (a
    directory, FIFO, dangling link, link loop), empty, truncated, not an image, zero-sized or
    larger than Pillow's decompression-bomb limit.
    """
    from .fileio import regular_file_problem

    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:
        raise ImageLoadError(p, problem)
    if p.stat().st_size == 0:
        raise ImageLoadError(p, "file is empty (0 bytes)")
    return decode_image(p, str(p), mode)


def load_image_bytes(data: bytes, description: str) -> Image.Image:
    """Decode image bytes (e.g. a dataset cell) to RGB; errors name ``description``."""
    import io

    if not data:
        raise ImageLoadError(description, "empty image bytes")
    return decode_image(io.BytesIO(data), description)


def check_image(img: Image.Image, name: Any = "<image>") -> Image.Image:
    if img.width == 0 or img.height == 0:
        raise ImageLoadError(str(name), f"zero-size image ({img.width}x{img.height})")
    return img


def _tensor_layout(t: torch.Tensor, layout: str) -> str:
    if layout in ("BHWC", "BCHW"):
        return layout
    if layout != "auto":
        raise InvalidInputError(f"layout must be 'auto', 'BHWC' or 'BCHW', got {layout!r}")
    last, second = t.shape[-1], t.shape[1]
    channels_last = last in (1, 3, 4)
    channels_first = second in (1, 3, 4)
    if channels_last and not channels_first:
        return "BHWC"
    if channels_first and not channels_last:
        return "BCHW"
    if channels_last and channels_first:
        # ComfyUI IMAGE is [B,H,W,3]; a [B,3,H,3] tensor is ambiguous only for 3-pixel images.
        if last == 3 and second != 3:
            return "BHWC"
        if second == 3 and last != 3:
            return "BCHW"
        return "BHWC"
    raise InvalidInputError(
        f"cannot tell the channel axis of an image tensor of shape {tuple(t.shape)}: expected "
        "[B,H,W,C] (ComfyUI IMAGE) or [B,C,H,W] with C in 1, 3, 4"
    )


def tensor_to_uint8(images: torch.Tensor | np.ndarray, layout: str = "auto", name: str = "images") -> np.ndarray:
    """Validate a batch tensor/array and return uint8 ``[B,H,W,3]``.

    Float input must be finite and within 0..1 (a 1e-3 tolerance is clipped); uint8 input is
    taken as is. Grayscale is repeated to RGB and a 4th (alpha) channel is dropped.
    """
    t = torch.as_tensor(images) if isinstance(images, np.ndarray) else images
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise InvalidInputError(f"{name}: expected a 3-D or 4-D image tensor, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise InvalidInputError(f"{name}: the image batch is empty (shape {tuple(t.shape)})")
    if _tensor_layout(t, layout) == "BCHW":
        t = t.permute(0, 2, 3, 1)
    t = t.detach().cpu()
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise InvalidInputError(f"{name}: zero-size images (shape {tuple(t.shape)})")
    if t.dtype == torch.uint8:
        arr = t.numpy()
    elif t.is_floating_point():
        t = t.float()
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidInputError(f"{name}: contains {bad} NaN or infinite values")
        lo, hi = float(t.min()), float(t.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InvalidInputError(
                f"{name}: float images must be in 0..1, found values in [{lo:.4g}, {hi:.4g}]"
            )
        arr = (t.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    else:
        raise InvalidInputError(f"{name}: unsupported dtype {t.dtype}; use float in 0..1 or uint8")
    c = arr.shape[-1]
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif c == 4:
        arr = arr[..., :3]
    elif c != 3:
        raise InvalidInputError(f"{name}: expected 1, 3 or 4 channels, got {c}")
    return np.ascontiguousarray(arr)


def as_pil_images(images: ImageInput | Sequence[ImageInput], layout: str = "auto") -> list[Image.Image]:
    """Normalise any supported input into a list of RGB PIL images (in order)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        arr = tensor_to_uint8(images, layout)
        return [Image.fromarray(a, mode="RGB") for a in arr]
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    out: list[Image.Image] = []
    for i, item in enumerate(images):
        if isinstance(item, (str, Path)):
            out.append(load_image(item))
        elif isinstance(item, Image.Image):
            out.append(check_image(_to_rgb(item), f"images[{i}]"))
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            arr = tensor_to_uint8(item, layout, name=f"images[{i}]")
            out.extend(Image.fromarray(a, mode="RGB") for a in arr)
        else:
            raise InvalidInputError(
                f"images[{i}]: unsupported type {type(item).__name__}; expected a path, PIL image, "
                "numpy array or tensor"
            )
    if not out:
        raise InvalidInputError("images: no image given (empty list)")
    return out


def as_mask_arrays(masks: Any, count: int) -> list[np.ndarray]:
    """Normalise masks into ``count`` float arrays in 0..1 of shape [H, W] (1 = subject).

    Accepts a ComfyUI MASK ``[B,H,W]`` (or ``[H,W]``, broadcast to every image), a list of PIL
    images / paths / arrays. A single mask is broadcast to the whole batch.
    """
    if isinstance(masks, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(masks).detach().cpu()
        if t.dtype == torch.bool:
            t = t.float()
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim != 3:
            raise InvalidInputError(f"masks: expected shape [B,H,W] or [H,W], got {tuple(t.shape)}")
        t = t.float()
        if not torch.isfinite(t).all():
            raise InvalidInputError("masks: contains NaN or infinite values")
        if t.numel() and (float(t.min()) < -1e-3 or float(t.max()) > 1 + 1e-3):
            raise InvalidInputError(
                f"masks: values must be in 0..1, found [{float(t.min()):.4g}, {float(t.max()):.4g}]"
            )
        arrays = [m.clamp(0, 1).numpy() for m in t]
    else:
        if isinstance(masks, (str, Path, Image.Image)):
            masks = [masks]
        arrays = []
        for i, m in enumerate(masks):
            if isinstance(m, (str, Path)):
                arrays.append(np.asarray(load_image(m, mode="L"), dtype=np.float32) / 255.0)
            elif isinstance(m, Image.Image):
                arrays.append(np.asarray(m.convert("L"), dtype=np.float32) / 255.0)
            else:
                arrays.extend(as_mask_arrays(m, 1) if np.ndim(m) == 2 else as_mask_arrays(m, len(m)))
    if len(arrays) == 1 and count > 1:
        arrays = arrays * count
    if len(arrays) != count:
        raise InvalidInputError(f"masks: got {len(arrays)} masks for {count} images")
    return arrays


RESIZE_MODES = ("squash", "shorter")

# (mean, std) -> the [3, 256] value table of Preprocess.value_table (a few per process)
_VALUE_TABLES: dict[tuple[tuple[float, ...], tuple[float, ...]], np.ndarray] = {}


@dataclass(frozen=True)
class Preprocess:
    """Resize + scale to 0..1 + normalise: a model's preprocessing as data (timm's
    ``resolve_data_config`` idea), read by this one transform.

    ``resize="squash"`` (the NearID / SigLIP processor convention): resize to
    ``image_size`` x ``image_size``, aspect not kept, no crop. ``resize="shorter"`` (the
    torchvision / CLIP / DINO evaluation convention): resize the shorter side to
    ``resize_size`` (default ``image_size``; the longer side to ``int(resize_size * long /
    short)``, as torchvision's ``Resize(int)``), then take the centre ``image_size`` square
    (torchvision's ``CenterCrop`` rounding). ``image_size`` is the model input side in pixels.
    """

    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    resize: str = "squash"
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise InvalidInputError(f"preprocess resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in _RESAMPLE:
            raise InvalidInputError(
                f"preprocess interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}"
            )
        if self.resize_size is not None:
            if self.resize != "shorter":
                raise InvalidInputError("preprocess resize_size applies to resize='shorter' only")
            if self.resize_size < self.image_size:
                raise InvalidInputError(
                    f"preprocess resize_size {self.resize_size} is smaller than the crop {self.image_size}"
                )

    def geometry(self, image: Image.Image, interpolation: str | None = None) -> Image.Image:
        """The resize (and centre crop) alone: any PIL image (also a mode "F" mask) -> the
        ``image_size`` square; ``interpolation`` overrides the filter (masks use bilinear)."""
        s = self.image_size
        resample = _RESAMPLE[interpolation or self.interpolation]
        if self.resize == "squash":
            return image if image.size == (s, s) else image.resize((s, s), resample=resample)
        short_target = self.resize_size or s
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != short_target:
            new_long = int(short_target * long / short)
            size = (short_target, new_long) if w <= h else (new_long, short_target)
            image = image.resize(size, resample=resample)
        w, h = image.size
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
        if (left, top, w, h) == (0, 0, s, s):
            return image
        return image.crop((left, top, left + s, top + s))

    def __call__(self, image: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
        """RGB PIL image -> float32 ``[3, S, S]`` normalised pixels, written into ``out`` (a
        contiguous float32 ``[3, S, S]`` CPU tensor, e.g. a row of a batch) when given.

        The normalisation ``(v / 255 - mean) / std`` is looked up per 8-bit value and channel
        (:meth:`value_table`): the table holds the same float32 operations on each of the 256
        values, so the pixels are bit-identical to computing them per pixel, at a fifth of the cost.
        """
        img = self.geometry(image if image.mode == "RGB" else _to_rgb(image))
        values = np.asarray(img)  # [S, S, 3] uint8
        if out is None:
            out = torch.empty((3, self.image_size, self.image_size), dtype=torch.float32)
        planes = out.numpy()
        table = self.value_table()
        for c in range(3):
            np.take(table[c], values[:, :, c], out=planes[c])
        return out

    def value_table(self) -> np.ndarray:
        """float32 ``[3, 256]``: the normalised value of each 8-bit value per channel,
        ``(v / 255 - mean[c]) / std[c]`` computed in float32 in that order (the reference's)."""
        key = (tuple(self.mean), tuple(self.std))
        table = _VALUE_TABLES.get(key)
        if table is None:
            values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
            mean = np.asarray(self.mean, dtype=np.float32)[:, None]
            std = np.asarray(self.std, dtype=np.float32)[:, None]
            table = (values - mean) / std
            table.setflags(write=False)
            _VALUE_TABLES[key] = table
        return table

    def batch(self, images: Sequence[Image.Image], out: torch.Tensor | None = None) -> torch.Tensor:
        """List of RGB PIL images -> ``[B, 3, S, S]``, each image written straight into its row
        (of ``out`` when given, e.g. a pinned buffer)."""
        if out is None:
            out = torch.empty((len(images), 3, self.image_size, self.image_size), dtype=torch.float32)
        for row, image in zip(out, images):
            self(image, out=row)
        return out

    def describe(self) -> str:
        """A stable description (part of cache keys); the squash default's is unchanged."""
        if self.resize == "squash":
            geometry = f"resize{self.image_size}-{self.interpolation}-squash"
        else:
            geometry = f"shorter{self.resize_size or self.image_size}-{self.interpolation}-crop{self.image_size}"
        return (
            f"{geometry}"
            f"-mean{','.join(f'{m:g}' for m in self.mean)}-std{','.join(f'{s:g}' for s in self.std)}"
        )
