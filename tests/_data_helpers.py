"""Fixture writers for the data tests: tiny images, folder samples, parquet / save_to_disk tables."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image


def solid(colour: tuple[int, int, int] | int, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> Image.Image:
    """A solid image; size is (width, height)."""
    return Image.new(mode, size, colour)


def png_bytes(colour: tuple[int, int, int] | int, size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    solid(colour, size, mode).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, colour: tuple[int, int, int] | int, mode: str = "RGB", size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    solid(colour, size, mode).save(path, format="PNG")
    return path


def view_colour(sample: int, k: int) -> tuple[int, int, int]:
    """A distinct colour per (sample, view): lets tests check that the right file was read."""
    return (10 * sample + k, 100 + k, 200 - sample)


def distractor_colour(sample: int, k: int, source_index: int) -> tuple[int, int, int]:
    return (10 * sample + k, 50 + source_index, 7)


def make_folder_sample(
    root: Path,
    sample_id: str,
    index: int,
    views: Iterable[int] = (1, 2, 3),
    sources: dict[str, Iterable[int]] | None = None,
    masks: Iterable[int] = (),
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ROOT/<id>/viewK.png, maskK.png, <source>/distractorK.png (+ sample.json)."""
    d = root / sample_id
    d.mkdir(parents=True, exist_ok=True)
    for k in views:
        write_png(d / f"view{k}.png", view_colour(index, k))
    for k in masks:
        write_png(d / f"mask{k}.png", 255, mode="L")
    for si, (source, ks) in enumerate(sorted((sources or {}).items())):
        for k in ks:
            write_png(d / source / f"distractor{k}.png", distractor_colour(index, k, si))
            write_png(d / source / f"mask{k}.png", 128, mode="L")
    if meta is not None:
        (d / "sample.json").write_text(json.dumps(meta), encoding="utf-8")
    return d


def pixel(img: Image.Image) -> tuple[int, ...]:
    value = img.getpixel((0, 0))
    return tuple(value) if isinstance(value, tuple) else (value,)


def image_struct(data: bytes | None, path: str | None = None) -> dict[str, Any] | None:
    """A Hugging Face Image cell."""
    if data is None and path is None:
        return None
    return {"bytes": data, "path": path}


def positives_rows(n: int, missing: dict[int, list[int]] | None = None, ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a published-style positives table; ``missing[row]`` lists empty view numbers."""
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": ids[i] if ids else f"id{i:03d}", "category": f"cat{i % 2}",
                               "category_description": f"things of kind {i % 2}", "n_images": 3}
        for k in (1, 2, 3):
            empty = k in (missing or {}).get(i, [])
            row[f"img{k}"] = None if empty else image_struct(png_bytes(view_colour(i, k)))
        rows.append(row)
    return rows


def distractor_rows(n: int, source_index: int, ids: list[str] | None = None, with_masks: bool = True,
                    missing: dict[int, list[int]] | None = None) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": ids[i] if ids else f"id{i:03d}"}
        for k in (1, 2, 3):
            empty = k in (missing or {}).get(i, [])
            row[f"nimg{k}"] = None if empty else image_struct(png_bytes(distractor_colour(i, k, source_index)))
            if with_masks:
                row[f"masks{k}"] = image_struct(png_bytes(200, mode="L"))
        rows.append(row)
    return rows


def write_parquet_shards(folder: Path, rows: list[dict[str, Any]], shards: int = 2, row_group_size: int = 2,
                         prefix: str = "train") -> Path:
    """Write rows as ``folder/data/<prefix>-0000k-of-0000n.parquet`` with small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    schema = pa.Table.from_pylist(rows).schema
    for s in range(shards):
        part = rows[bounds[s]:bounds[s + 1]]
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, data / f"{prefix}-{s:05d}-of-{shards:05d}.parquet", row_group_size=row_group_size)
    return folder
