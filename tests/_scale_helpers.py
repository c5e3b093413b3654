"""Helpers for the partition/Ray tests: one small image set written four ways (subject
folders, img2dataset-style parquet shards, webdataset tar shards, references), the
``scale_image_set`` fixture (that set plus `nearid score`'s rows for it) and row comparison.

Test modules use the fixture with ``from _scale_helpers import scale_image_set  # noqa: F401``.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _scoring_helpers import TINY_MODEL_ARGS, write_image

SUBJECTS = ("cat", "dog")
CORRUPT_KEY = "000000005"


def _jpeg_bytes(rng: np.random.Generator, side: int = 40) -> bytes:
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_image_set(root: Path, num_images: int = 14, num_shards: int = 2, seed: int = 5) -> dict[str, object]:
    """``refs/<subject>/*.png``; ``gen/<subject>/<key>.jpg``; ``parquet/<k>.parquet`` and
    ``wds/<k>.tar`` holding the same samples (key, jpg bytes, subject). Sample ``CORRUPT_KEY``
    has scrambled JPEG bytes everywhere (an error row in every engine)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for subject in SUBJECTS:
        for i in range(2):
            write_image(root / "refs" / subject / f"{i}.png", rng)
    samples = []
    for i in range(num_images):
        key = f"{i:09d}"
        data = _jpeg_bytes(rng)
        if key == CORRUPT_KEY:
            data = data[:200] + bytes(rng.integers(0, 256, len(data) - 220, dtype=np.uint8)) + data[-20:]
        samples.append((key, SUBJECTS[i % 2], data))
        path = root / "gen" / SUBJECTS[i % 2] / f"{key}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    per_shard = -(-num_images // num_shards)
    (root / "parquet").mkdir()
    (root / "wds").mkdir()
    for k in range(num_shards):
        shard = samples[k * per_shard : (k + 1) * per_shard]
        pq.write_table(pa.table({
            "key": [s[0] for s in shard], "jpg": pa.array([s[2] for s in shard], pa.binary()),
            "caption": [f"a photo of {s[1]}" for s in shard], "subject": [s[1] for s in shard],
            "status": ["success"] * len(shard),
        }), root / "parquet" / f"{k:05d}.parquet")
        with tarfile.open(root / "wds" / f"{k:05d}.tar", "w") as tar:
            for key, subject, data in shard:
                for name, payload in ((f"{key}.jpg", data),
                                      (f"{key}.json", json.dumps({"key": key, "subject": subject}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return {"samples": samples}


@pytest.fixture(scope="module")
def scale_image_set(tmp_path_factory):
    """``(root, rows)``: :func:`write_image_set` under ``root`` and the rows `nearid score` gives
    for ``root/gen`` (the expected rows of every engine and input kind)."""
    from comfy_nearid.cli import main
    from comfy_nearid.scoring import read_rows

    root = tmp_path_factory.mktemp("scale")
    write_image_set(root)
    reference = root / "reference.csv"
    assert main(["score", "--references-root", str(root / "refs"), str(root / "gen"), "-o", str(reference),
                 "--batch-size", "4", *TINY_MODEL_ARGS, "--no-cache"]) == 0
    return root, read_rows(reference)


def rows_by_key(rows) -> dict[tuple[str, str], object]:
    """``{(subject, sample key): row}``; the key of a file path is its stem."""
    out = {}
    for row in rows:
        key = Path(row.path).stem
        assert (row.subject, key) not in out, f"duplicate row {row.subject}/{key}"
        out[(row.subject, key)] = row
    return out


def assert_same_rows(got, expected, check_ranks: bool = True) -> None:
    """Same (subject, key) set; cosines and scores to 1e-6 (match, 0..100, to 1e-4); same
    ranks; the same error reasons."""
    got_by, exp_by = rows_by_key(got), rows_by_key(expected)
    assert sorted(got_by) == sorted(exp_by)
    for k, e in exp_by.items():
        g = got_by[k]
        assert g.error == e.error, (k, g.error, e.error)
        if e.error is None:
            np.testing.assert_allclose(g.cosines, e.cosines, atol=1e-6)
            np.testing.assert_allclose(g.score, e.score, atol=1e-6, rtol=0)
            np.testing.assert_allclose(g.match, e.match, atol=1e-4, rtol=0)  # 0..100 scale
            assert g.calibrated == e.calibrated
        assert not check_ranks or g.rank == e.rank, (k, g.rank, e.rank)
