"""Image decoding: bad files give errors naming the file; every mode converts correctly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from comfy_nearid.errors import ImageLoadError
from comfy_nearid.images import as_pil_images, load_image


def _rgb(path):
    return np.asarray(load_image(path))


def test_missing_empty_truncated_and_non_image_files_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nothere.png: file does not exist"):
        load_image(tmp_path / "nothere.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"empty.png: file is empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.jpg").write_text("hello, I am not a picture")
    with pytest.raises(ImageLoadError, match="text.jpg: not a recognised image format"):
        load_image(tmp_path / "text.jpg")
    Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png: corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 px is "beyond the limit" now
    with pytest.raises(ImageLoadError, match="big.png: larger than Pillow's decompression-bomb limit"):
        load_image(tmp_path / "big.png")


def test_zero_size_pil_image_is_refused():
    with pytest.raises(ImageLoadError, match="zero-size"):
        as_pil_images([Image.new("RGB", (0, 5))])


def test_modes_convert_to_rgb(tmp_path):
    # L and P
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "l.png")
    assert np.array_equal(_rgb(tmp_path / "l.png"), np.repeat(gray[..., None], 3, -1))
    pal = Image.fromarray(np.full((4, 4, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(_rgb(tmp_path / "p.png")[0, 0], [10, 200, 30])
    # RGBA / LA: transparent pixels on white, opaque ones unchanged, half-transparent blended
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 0, 255, 0)
    rgba[1, 0] = (0, 0, 0, 128)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _rgb(tmp_path / "rgba.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert abs(int(out[1, 0, 0]) - 127) <= 1  # 255 * (1 - 128/255)
    la = Image.fromarray(np.stack([np.full((2, 2), 50, np.uint8), np.full((2, 2), 255, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert _rgb(tmp_path / "la.png")[0, 0].tolist() == [50, 50, 50]
    # CMYK (JPEG): pure cyan ink -> (0, 255, 255)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    c = _rgb(tmp_path / "cmyk.jpg")[4, 4]
    assert c[0] < 10 and c[1] > 245 and c[2] > 245
    # 16-bit grayscale: scaled to 8 bits, not clipped
    g16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)  # 0..65535
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = _rgb(tmp_path / "g16.png")[..., 0]
    assert np.array_equal(out, np.round(g16 / 65535 * 255).astype(np.uint8))


def test_exif_rotation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = _rgb(tmp_path / "rot.jpg")
    assert out.shape == (20, 10, 3)
    assert out[2, 5].mean() > 200 and out[17, 5].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("resize", ["squash", "shorter"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocess_into_a_batch_row_gives_the_same_pixels(resize, mode):
    import numpy as np
    import torch
    from PIL import Image

    from comfy_nearid.images import Preprocess

    rng = np.random.default_rng(3)
    bands = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(37, 53, bands), dtype=np.uint8)
    image = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    pre = Preprocess(image_size=24, resize=resize)
    batch = torch.full((2, 3, 24, 24), float("nan"))
    got = pre(image, out=batch[1])
    assert got.data_ptr() == batch[1].data_ptr()
    assert torch.equal(batch[1], pre(image)) and batch[0].isnan().all()


@pytest.mark.parametrize("mean, std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                       ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
def test_preprocess_is_bit_identical_to_the_per_pixel_reference_for_every_8_bit_value(mean, std):
    """The value table must give exactly the reference's float32 arithmetic, for all 256 values
    in every channel, alone and written into a batch row."""
    import numpy as np
    import torch
    from PIL import Image

    from comfy_nearid.images import Preprocess

    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    arr = np.stack([values, values.T, 255 - values], axis=-1)  # every value in every channel
    image = Image.fromarray(arr, "RGB")
    # the reference SigLIP / CLIP processors: float32 pixels / 255, minus mean, over std
    expected = (np.asarray(image, dtype=np.float32) / np.float32(255.0) - np.asarray(mean, dtype=np.float32)) \
        / np.asarray(std, dtype=np.float32)
    expected = torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1)))
    pre = Preprocess(image_size=16, mean=mean, std=std)
    assert torch.equal(pre(image), expected)
    batch = pre.batch([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    assert torch.equal(batch[0], expected) and torch.equal(batch[1], expected.flip(-1))
