"""A corpus of bad inputs written on demand, for the table-driven tests in test_bad_inputs.py.

Entry builders put one bad (or awkward but valid) entry into a folder of generated images and
say what a user must see: an error row naming it (``BadEntry``), or a scored row whose score
equals that of an equivalent plain RGB file (``GoodEntry``). File builders write whole bad
files (head files, CSVs, ratings) for the commands that read them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

GOOD_SIZE = (36, 44)  # every good image: 1,584 pixels
BOMB_LIMIT = 3000  # Image.MAX_IMAGE_PIXELS during the decompression-bomb cases


@dataclass(frozen=True)
class BadEntry:
    """An entry that must become an error row: ``name`` as found in the folder, ``reason`` words."""

    name: str
    reason: str


@dataclass(frozen=True)
class GoodEntry:
    """An entry that must be scored like the plain RGB file ``equivalent``."""

    name: str
    equivalent: Path


@dataclass
class EntryCase:
    bad: list[BadEntry] = field(default_factory=list)
    good: list[GoodEntry] = field(default_factory=list)
    pixel_limit: int | None = None  # set Image.MAX_IMAGE_PIXELS to this for the run
    warns: str | None = None  # words a logged warning must contain (an entry that is reported, not a row)


def random_rgb(rng: np.random.Generator, size: tuple[int, int] = GOOD_SIZE) -> np.ndarray:
    return rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def write_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = GOOD_SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_rgb(rng, size)).save(path, format="PNG")
    return path


def _png_bytes(rng: np.random.Generator, size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(random_rgb(rng, size)).save(buf, format="PNG")
    return buf.getvalue()


# ============================================================================ folder entries
def truncated_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    data = _png_bytes(rng)
    (gen / "x_truncated.png").write_bytes(data[: len(data) // 2])
    return EntryCase(bad=[BadEntry("x_truncated.png", "truncated")])


def empty_file(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    (gen / "x_empty.jpg").write_bytes(b"")
    return EntryCase(bad=[BadEntry("x_empty.jpg", "empty")])


def text_named_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    (gen / "x_text.png").write_bytes(b"a caption, not a picture\n")
    return EntryCase(bad=[BadEntry("x_text.png", "not a recognised image format")])


def corrupt_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    data = _png_bytes(rng)
    scrambled = bytes(rng.integers(0, 256, len(data) - 80, dtype=np.uint8))
    (gen / "x_corrupt.png").write_bytes(data[:60] + scrambled + data[-20:])
    return EntryCase(bad=[BadEntry("x_corrupt.png", "corrupt")])


def decompression_bomb(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    # 64x64 = 4,096 px: over the limit (3,000), under twice it (Pillow itself only warns there);
    # 100x100 = 10,000 px: over twice the limit (Pillow itself raises).
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(gen / "x_bomb.png")
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(gen / "x_bomb_far.png")
    reason = "decompression-bomb limit"
    return EntryCase(bad=[BadEntry("x_bomb.png", reason), BadEntry("x_bomb_far.png", reason)], pixel_limit=BOMB_LIMIT)


def fifo_named_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    os.mkfifo(gen / "x_pipe.png")
    return EntryCase(bad=[BadEntry("x_pipe.png", "FIFO")])


def dangling_link(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    (gen / "x_dangling.png").symlink_to(outside / "gone.png")
    return EntryCase(bad=[BadEntry("x_dangling.png", "broken symbolic link")])


def self_link_loop(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    (gen / "x_loop.png").symlink_to("x_loop.png")
    return EntryCase(bad=[BadEntry("x_loop.png", "symbolic link loop")])


def folder_link_loop(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    (gen / "x_back").symlink_to(gen, target_is_directory=True)  # a link to the folder holding it
    return EntryCase(warns="loop")


def link_to_image_outside(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    target = write_png(outside / "target.png", rng)
    (gen / "y_link.png").symlink_to(target)
    return EntryCase(good=[GoodEntry("y_link.png", target)])


def link_to_image_inside(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    target = write_png(gen / "y_original.png", rng)
    (gen / "y_same.png").symlink_to("y_original.png")  # two names, one file: two rows
    return EntryCase(good=[GoodEntry("y_original.png", target), GoodEntry("y_same.png", target)])


def link_to_folder_outside(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    targets = [write_png(outside / "linked" / f"{i}.png", rng) for i in range(2)]
    (gen / "y_linked").symlink_to(outside / "linked", target_is_directory=True)
    return EntryCase(good=[GoodEntry(f"y_linked/{t.name}", t) for t in targets])


def folder_named_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    inner = write_png(gen / "y_folder.png" / "inner.png", rng)
    plain = outside / "inner_copy.png"
    plain.write_bytes(inner.read_bytes())
    return EntryCase(good=[GoodEntry("y_folder.png/inner.png", plain)])


def _equivalent(outside: Path, name: str, rgb: Image.Image) -> Path:
    outside.mkdir(parents=True, exist_ok=True)
    path = outside / f"{name}.rgb.png"
    rgb.convert("RGB").save(path)
    return path


def cmyk_tiff(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    cmyk = Image.fromarray(rng.integers(0, 256, size=(40, 40, 4), dtype=np.uint8), mode="CMYK")
    cmyk.save(gen / "z_cmyk.tif")
    return EntryCase(good=[GoodEntry("z_cmyk.tif", _equivalent(outside, "cmyk", cmyk.convert("RGB")))])


def png_16bit(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    grey = rng.integers(0, 256, size=(40, 40), dtype=np.uint16)
    sixteen = Image.fromarray((grey * 257).astype("<u2"))  # 8-bit value v stored as v*257
    assert sixteen.mode.startswith("I;16")
    sixteen.save(gen / "z_16bit.png")
    plain = Image.fromarray(grey.astype(np.uint8), mode="L")
    return EntryCase(good=[GoodEntry("z_16bit.png", _equivalent(outside, "16bit", plain))])


def palette_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    pal = Image.fromarray(random_rgb(rng, (40, 40))).quantize(16)
    pal.save(gen / "z_palette.png")
    return EntryCase(good=[GoodEntry("z_palette.png", _equivalent(outside, "palette", pal.convert("RGB")))])


def la_png(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    la = Image.fromarray(rng.integers(0, 256, size=(40, 40, 2), dtype=np.uint8), mode="LA")
    la.save(gen / "z_la.png")
    # transparency composited onto white, by hand: out = L * a + 255 * (1 - a)
    arr = np.asarray(la, dtype=np.float64)
    lum, alpha = arr[..., 0], arr[..., 1] / 255.0
    composite = np.round(lum * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return EntryCase(good=[GoodEntry("z_la.png", _equivalent(outside, "la", Image.fromarray(composite, "L")))])


def exif_rotated(gen: Path, outside: Path, rng: np.random.Generator) -> EntryCase:
    arr = random_rgb(rng, (30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: display rotated 90 degrees clockwise
    Image.fromarray(arr).save(gen / "z_exif.png", exif=exif.tobytes())
    upright = Image.fromarray(np.ascontiguousarray(np.rot90(arr, k=-1)))  # clockwise by hand
    return EntryCase(good=[GoodEntry("z_exif.png", _equivalent(outside, "exif", upright))])


ENTRY_CASES: dict[str, Callable[[Path, Path, np.random.Generator], EntryCase]] = {
    f.__name__: f for f in (
        truncated_png, empty_file, text_named_png, corrupt_png, decompression_bomb, fifo_named_png,
        dangling_link, self_link_loop, folder_link_loop, link_to_image_outside, link_to_image_inside,
        link_to_folder_outside,
        folder_named_png, cmyk_tiff, png_16bit, palette_png, la_png, exif_rotated,
    )
}


# ============================================================================ head / weights files
def tampered_head(good: Path, out: Path, **changes: str | None) -> Path:
    """A copy of the head file ``good`` with metadata fields changed (``None``: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(good), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, str(out), metadata=meta)
    return out


# field -> (tampered value, words the error must contain besides the field name)
HEAD_METADATA_CASES: dict[str, tuple[str, str | None, str]] = {
    "provenance_bad_json": ("provenance", "{not json", "not valid JSON"),
    "provenance_a_list": ("provenance", "[1, 2]", "must be a JSON object"),
    "provenance_duplicate_key": ("provenance", '{"a": 1, "a": 2}', "'a' appears twice"),
    "calibration_bad_json": ("calibration", "{oops", "not valid JSON"),
    "calibration_a_number": ("calibration", "3", "must be a JSON object"),
    "num_heads_zero": ("num_heads", "0", "out of range"),
    "num_heads_not_dividing": ("num_heads", "7", "divides embed_dim"),
    "num_heads_text": ("num_heads", "four", "invalid"),
    "mlp_dim_negative": ("mlp_dim", "-5", "out of range"),
    "mlp_dim_one_billion": ("mlp_dim", "1000000000", "out of range"),
    "mlp_dim_250000": ("mlp_dim", "250000", "out of range"),
    "mlp_dim_float": ("mlp_dim", "12.5", "invalid"),
    "mlp_dim_underscore": ("mlp_dim", "1_0", "invalid"),
    "embed_dim_huge": ("embed_dim", "99999999", "out of range"),
    "embed_dim_missing": ("embed_dim", None, "missing"),
    "image_size_zero": ("image_size", "0", "out of range"),
    "layer_norm_eps_nan": ("layer_norm_eps", "nan", "out of range"),
    "mean_two_values": ("mean", "[0.5, 0.5]", "3 finite numbers"),
    "std_zero": ("std", "[0.5, 0, 0.5]", "positive"),
    "interpolation_unknown": ("interpolation", "magic", "one of"),
    "format_version_text": ("format_version", "one", "invalid"),
    "token_version_zero": ("token_version", "0", "out of range"),
    "token_version_missing": ("token_version", None, "missing"),
    "format_wrong": ("format", "something-else", "expected 'nearid-head'"),
}


def pickle_renamed_safetensors(path: Path) -> Path:
    import torch

    torch.save({"probe": torch.zeros(1, 1, 4)}, path)
    return path


def huge_header_length(path: Path) -> Path:
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    return path


def pickled_object(path: Path) -> Path:
    """A torch pickle holding a Python object beyond tensors (refused by weights_only)."""
    import argparse

    import torch

    torch.save({"config": argparse.Namespace(lr=1.0)}, path)
    return path


def plain_pickle(path: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    return path


# ============================================================================ text files
SIMILARITY_CSV = (
    "id,sim_01,sim_02,sim_12,cross_00,cross_11,cross_22\n"
    "a,0.9,0.8,0.85,0.5,0.4,0.3\n"
    "b,0.7,0.6,0.65,0.75,0.2,0.1\n"
    "c,0.6,0.55,0.5,0.1,0.58,0.2\n"
)


def _similarity_csv_variants() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file contents, words the error must contain; None = read like the plain file)."""
    plain = SIMILARITY_CSV.encode("utf-8")
    return {
        "utf8_bom": (b"\xef\xbb\xbf" + plain, None),
        "crlf": (SIMILARITY_CSV.replace("\n", "\r\n").encode("utf-8"), None),
        "latin1": (SIMILARITY_CSV.replace("a,0.9", "caf\u00e9,0.9").encode("latin-1"), "not UTF-8"),
        "utf16": (SIMILARITY_CSV.encode("utf-16"), "UTF-16"),
        "gzip": (gzip.compress(plain), "gzip"),
        "binary": (bytes(range(256)) * 4, "binary"),
        "png_renamed": (_png_bytes(np.random.default_rng(0)), "PNG image"),
        "huge_field": ((SIMILARITY_CSV + "d,0.5," + "1" * 200_000 + ",0.5,0.5,0.5,0.5\n").encode(), "line 5"),
        "underscore_number": (SIMILARITY_CSV.replace("0.9,", "1_0,").encode(), "'1_0'"),
        "hex_number": (SIMILARITY_CSV.replace("0.9,", "0x1,").encode(), "'0x1'"),
        "words_in_cell": (SIMILARITY_CSV.replace("0.9,", "high,").encode(), "'high'"),
        "ragged_row": ((SIMILARITY_CSV + "d,0.5\n").encode(), "line 5 has 2 cells"),
        "empty": (b"", "empty file"),
        "header_only": (SIMILARITY_CSV.splitlines()[0].encode() + b"\n", "no data rows"),
        "duplicate_id": ((SIMILARITY_CSV + "a,0.9,0.8,0.85,0.5,0.4,0.3\n").encode(), "duplicate id 'a'"),
        "infinite": (SIMILARITY_CSV.replace("0.9,", "inf,").encode(), "infinite"),
    }


SIMILARITY_CSV_VARIANTS = _similarity_csv_variants()


def ratings_variants(plain: dict[str, float]) -> dict[str, tuple[bytes, str | None]]:
    """Replacements of a ratings file holding ``plain`` -> (contents, words the error must
    contain; None = must give the same result as ``plain``)."""
    text = json.dumps(plain)
    first = next(iter(plain))
    keys = list(plain)
    return {
        "duplicate_key": ((text[:-1] + f', "{first}": 4.0}}').encode(), f"key {first!r} appears twice"),
        "utf8_bom": (b"\xef\xbb\xbf" + text.encode(), None),
        "pretty_printed": (json.dumps(plain, indent=4).encode(), None),
        "latin1": (json.dumps({**plain, "caf\u00e9": 1.0}, ensure_ascii=False).encode("latin-1"), "not UTF-8"),
        "gzip": (gzip.compress(text.encode()), "gzip"),
        "not_json": (b"{oops", "not valid JSON"),
        "a_list": (b"[1, 2]", "must hold a JSON object"),
        "text_score": (json.dumps({**plain, first: "high"}).encode(), f"item {first!r} has score 'high'"),
        "nan_score": (json.dumps({**plain, first: float("nan")}).encode(), "finite number"),
        "diverging_order": (json.dumps({k: plain[k] for k in reversed(keys)}).encode(), "diverge at item 0"),
        "one_item_less": (json.dumps({k: plain[k] for k in keys[:-1]}).encode(), "different lengths"),
    }
