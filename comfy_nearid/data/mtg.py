"""MTG part-level data: two views of an object, each with a version whose one part was edited.

A sample maps onto :class:`Sample` as: ``views`` = the two original views, ``distractors
[MTG_SOURCE]`` = their part-edited versions (same pose and background), ``masks`` = the
object masks, ``part_masks`` = the edited-part masks. The MTG oracle for edited image k is
``1 - part_area_k / object_area_k``.

Folder layout (written by ``nearid synth`` into ``ROOT/mtg_test``)::

    ROOT/<id>/
      sample.json                 optional: {"category": ..., "edited_part": ...}
      view1.png   view2.png       the two original views
      edited1.png edited2.png     each view with one part edited
      object_mask1.png  object_mask2.png
      part_mask1.png    part_mask2.png

The published dataset (``abdo-eldesokey/mtg-dataset``) has columns ``image_1_original``,
``image_2_original``, ``image_1_inpainted``, ``image_2_inpainted``,
``image_{1,2}_object_mask`` and ``image_{1,2}_part_mask``; read it with
:class:`PublishedMTGDataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import DatasetError
from .base import NearIDDataset
from .folder import SAMPLE_JSON, list_sample_dirs, numbered_images, read_sample_json, slot_list
from .sample import ImageRef, Sample
from .tables import ArrowTable, check_columns, image_cell_ref

MTG_SOURCE = "mtg"
MTG_REQUIRED = ("image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted")
MTG_OPTIONAL = ("id", "category", "image_1_object_mask", "image_2_object_mask", "image_1_part_mask", "image_2_part_mask")


class MTGFolderDataset(NearIDDataset):
    """MTG samples from the folder layout in the module docstring (``root`` or ``root/split``)."""

    def __init__(
        self, root: str | Path, split: str | None = None, indices: str | Path | Sequence[int] | None = None
    ) -> None:
        self.root, self._names = list_sample_dirs(Path(root), split)
        super().__init__(indices)

    def _num_rows(self) -> int:
        return len(self._names)

    def describe(self) -> str:
        return f"MTG folder {self.root}"

    def _read_row(self, row: int) -> Sample:
        sample_dir = self.root / self._names[row]
        found, _ = numbered_images(sample_dir, ("view", "edited", "object_mask", "part_mask"))
        for kind in ("view", "edited"):
            extra = sorted(k + 1 for k in found[kind] if k > 1)
            if extra:
                raise DatasetError(f"MTG sample {sample_dir} has {kind}{extra[0]}; MTG samples have exactly 2 views")
        if not found["view"]:
            raise DatasetError(f"MTG sample directory {sample_dir} has no view images (expected view1.png, view2.png)")
        meta = read_sample_json(sample_dir / SAMPLE_JSON)
        return Sample(
            id=self._names[row],
            category=str(meta.get("category", "unknown")),
            views=slot_list(found["view"], 2),
            distractors={MTG_SOURCE: slot_list(found["edited"], 2)},
            masks=slot_list(found["object_mask"], 2, mode="L"),
            part_masks=slot_list(found["part_mask"], 2, mode="L"),
            meta={k: v for k, v in meta.items() if k not in ("id", "category")} | {"dir": str(sample_dir)},
        )


class PublishedMTGDataset(NearIDDataset):
    """MTG samples from the published table (save_to_disk folder or parquet shards).

    Sample ids come from an ``id`` column when there is one, else the row number.
    """

    def __init__(
        self, path: str | Path, indices: str | Path | Sequence[int] | None = None, split: str | None = None
    ) -> None:
        self.table = ArrowTable(path, split=split, name=str(path))
        check_columns(self.table, MTG_REQUIRED, MTG_OPTIONAL, "MTG")
        self._columns = [c for c in (*MTG_REQUIRED, *MTG_OPTIONAL) if c in self.table.column_names]
        super().__init__(indices)

    def _num_rows(self) -> int:
        return self.table.num_rows

    def describe(self) -> str:
        return f"published MTG {self.table.name}"

    def _read_row(self, row: int) -> Sample:
        values = self.table.row(row, self._columns)
        sample_id = str(values["id"]) if values.get("id") is not None else f"{row:05d}"

        def refs(pattern: str, mode: str) -> list[ImageRef | None]:
            out = []
            for k in (1, 2):
                col = pattern.format(k)
                origin = f"{self.table.name} row {row} (id {sample_id}) column {col}"
                out.append(image_cell_ref(values.get(col), origin, self.table.base_dir, mode))  # type: ignore[arg-type]
            return out

        return Sample(
            id=sample_id,
            category=str(values.get("category") or "unknown"),
            views=refs("image_{}_original", "RGB"),
            distractors={MTG_SOURCE: refs("image_{}_inpainted", "RGB")},
            masks=refs("image_{}_object_mask", "L"),
            part_masks=refs("image_{}_part_mask", "L"),
            meta={"row": row},
        )
