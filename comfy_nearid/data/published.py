"""Reader for the paper's published NearID data (positives + row-aligned distractor sets).

The positives dataset has columns ``id``, ``category``, ``img1..img3`` (views; a cell may be
empty) and metadata; each distractor dataset (one per inpainting generator) has ``id`` and
``nimg1..nimg3`` (distractor k on view k's background) and optionally ``masks1..masks3``.
Rows are aligned across datasets; the ids are checked row by row when the reader opens.

Each dataset may be a ``save_to_disk`` folder, a ``DatasetDict`` folder, a folder of parquet
shards as the hub stores them, or a single parquet file (see :mod:`.tables`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DatasetError
from .base import NearIDDataset
from .sample import ImageMode, ImageRef, Sample
from .tables import ArrowTable, check_columns, image_cell_ref

logger = logging.getLogger(__name__)

POSITIVE_REQUIRED = ("id", "img1")
POSITIVE_OPTIONAL = ("category", "img2", "img3", "category_description", "n_images", "objaverse_id", "quality")
DISTRACTOR_REQUIRED = ("id", "nimg1")
DISTRACTOR_OPTIONAL = ("nimg2", "nimg3", "masks1", "masks2", "masks3")


def _numbered_columns(names: Sequence[str], prefix: str) -> list[str]:
    """``img1, img2, ...`` present in ``names``, in number order (stops at the first gap)."""
    numbers = {int(m.group(1)) for n in names if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", n))}
    out: list[str] = []
    k = 1
    while k in numbers:
        out.append(f"{prefix}{k}")
        k += 1
    return out


def check_aligned_ids(reference: list[Any], other: list[Any], ref_name: str, other_name: str) -> None:
    """Row-aligned datasets must hold the same ids in the same order; name the first mismatch."""
    if len(reference) != len(other):
        raise DatasetError(
            f"distractor dataset {other_name} has {len(other)} rows but the positives {ref_name} have "
            f"{len(reference)}; the datasets must be row-aligned"
        )
    for row, (a, b) in enumerate(zip(reference, other)):
        if str(a) != str(b):
            raise DatasetError(
                f"row {row}: positives {ref_name} have id {a!r} but distractor dataset {other_name} has id {b!r}; "
                "the datasets must be row-aligned"
            )


class PublishedNearIDDataset(NearIDDataset):
    """NearID samples from the published positives + distractor datasets.

    ``positives`` and each value of ``distractors`` ({source name: path}) are local dataset
    paths. ``indices`` selects rows (a split file ``{"indices": [...]}`` / JSON list, or a
    list). ``split`` picks a split of a DatasetDict folder or of a sharded folder. Opening reads
    only file metadata and the ``id`` columns (to check alignment); images are read per row.
    """

    def __init__(
        self,
        positives: str | Path,
        distractors: Mapping[str, str | Path] | None = None,
        indices: str | Path | Sequence[int] | None = None,
        split: str | None = None,
    ) -> None:
        self.positives = ArrowTable(positives, split=split, name=str(positives))
        check_columns(self.positives, POSITIVE_REQUIRED, POSITIVE_OPTIONAL, "positives")
        self.view_columns = _numbered_columns(self.positives.column_names, "img")
        self.meta_columns = [
            c for c in self.positives.column_names if c not in self.view_columns and c not in ("id", "category")
        ]
        self.ids = [str(i) for i in self.positives.column("id")]
        self._check_unique_ids()
        self.distractor_tables: dict[str, ArrowTable] = {}
        self.distractor_columns: dict[str, tuple[list[str], list[str]]] = {}
        for source, path in (distractors or {}).items():
            table = ArrowTable(path, split=split, name=f"{source} ({path})")
            check_columns(table, DISTRACTOR_REQUIRED, DISTRACTOR_OPTIONAL, f"distractor ({source})")
            check_aligned_ids(self.ids, [str(i) for i in table.column("id")], self.positives.name, table.name)
            self.distractor_tables[source] = table
            self.distractor_columns[source] = (
                _numbered_columns(table.column_names, "nimg"),
                _numbered_columns(table.column_names, "masks"),
            )
        super().__init__(indices)

    def _check_unique_ids(self) -> None:
        first: dict[str, int] = {}
        for row, sample_id in enumerate(self.ids):
            if sample_id in first:
                raise DatasetError(
                    f"positives {self.positives.name}: id {sample_id!r} appears at rows {first[sample_id]} and {row}"
                )
            first[sample_id] = row

    @property
    def sources(self) -> list[str]:
        """Distractor source names, in the order given."""
        return list(self.distractor_tables)

    def _num_rows(self) -> int:
        return self.positives.num_rows

    def describe(self) -> str:
        return f"published NearID {self.positives.name} + sources {self.sources}"

    def _refs(
        self, table: ArrowTable, row: int, columns: list[str], values: dict[str, Any], mode: ImageMode
    ) -> list[ImageRef | None]:
        where = f"{table.name} row {row} (id {self.ids[row]}) column"
        return [image_cell_ref(values[c], f"{where} {c}", table.base_dir, mode) for c in columns]

    def _read_row(self, row: int) -> Sample:
        pos = self.positives
        cols = ["id", *(["category"] if "category" in pos.column_names else []), *self.view_columns, *self.meta_columns]
        values = pos.row(row, cols)
        n = len(self.view_columns)
        distractors: dict[str, list[ImageRef | None]] = {}
        distractor_masks: dict[str, list[ImageRef | None]] = {}
        for source, table in self.distractor_tables.items():
            image_cols, mask_cols = self.distractor_columns[source]
            dvalues = table.row(row, ["id", *image_cols, *mask_cols])
            if str(dvalues["id"]) != self.ids[row]:  # files changed since opening
                check_aligned_ids([self.ids[row]], [str(dvalues["id"])], pos.name, table.name)
            if len(image_cols) > n or len(mask_cols) > n:
                raise DatasetError(
                    f"distractor dataset {table.name} has columns {image_cols + mask_cols} for more views than the "
                    f"positives' {self.view_columns}"
                )
            distractors[source] = self._refs(table, row, image_cols, dvalues, "RGB")
            distractor_masks[source] = self._refs(table, row, mask_cols, dvalues, "L")
        return Sample(
            id=self.ids[row],
            category=str(values.get("category") or "unknown"),
            views=self._refs(pos, row, self.view_columns, values, "RGB"),
            distractors=distractors,
            distractor_masks=distractor_masks,
            meta={c: values[c] for c in self.meta_columns} | {"row": row},
        )


# The architecture document names this reader HFNearIDDataset.
HFNearIDDataset = PublishedNearIDDataset


def hub_snapshot(
    repo_id: str,
    allow_download: bool = False,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = ("*.parquet", "*.json", "*.md"),
    cache_dir: str | Path | None = None,
) -> Path:
    """Local folder of a Hugging Face dataset repo (e.g. ``"Aleksandar/NearID"``).

    Uses the local Hugging Face cache; downloads only when ``allow_download=True``. Pass the
    returned folder (or a sub-folder of it) to :class:`PublishedNearIDDataset`.
    """
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:
        raise DatasetError("reading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    try:
        path = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            cache_dir=str(cache_dir) if cache_dir else None,
            local_files_only=not allow_download,
        )
    except LocalEntryNotFoundError as e:
        raise DatasetError(
            f"dataset {repo_id!r} is not in the local Hugging Face cache and downloading is off; "
            "pass allow_download=True (needs network) or give a local path"
        ) from e
    return Path(path)
