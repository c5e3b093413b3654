"""The plain folder layout (hand-made datasets and the synthetic benchmark).

::

    ROOT/
      <id>/
        sample.json          optional: {"category": ..., "description": ..., ...}
        view1.png            views (view1..viewN; a missing number is a missing view)
        view2.png
        mask1.png            optional object mask of view1 (white = object)
        <source>/            one folder per distractor source (e.g. object, part, colour)
          distractor1.png    near-identity distractor of view1, same background
          mask1.png          optional object mask of distractor1

Any of .png .jpg .jpeg .webp .bmp .tif .tiff works. Samples are read in sorted directory-name
order; folders whose name starts with "." or "_" are ignored.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import DatasetError
from .base import NearIDDataset
from .sample import FileImageRef, ImageRef, Sample

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.json"
SAMPLE_JSON = "sample.json"
_NUMBERED = re.compile(r"^([a-z_]+?)(\d+)(\.[a-z]+)$", re.IGNORECASE)


def numbered_images(directory: Path, kinds: Iterable[str]) -> tuple[dict[str, dict[int, Path]], list[Path]]:
    """Find ``<kind><k>.<ext>`` image files in ``directory`` (k >= 1; returned 0-based).

    Returns ({kind: {k-1: path}}, subdirectories). Two files for one slot (``view1.png`` and
    ``view1.jpg``) are an error naming both.
    """
    wanted = {k.lower() for k in kinds}
    found: dict[str, dict[int, Path]] = {k: {} for k in wanted}
    subdirs: list[Path] = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list sample directory {directory}: {e.strerror or e}") from e
    for entry in entries:
        if entry.name.startswith((".", "_")):
            continue
        if _entry_is_dir(entry):
            subdirs.append(Path(entry.path))
            continue
        m = _NUMBERED.match(entry.name)
        if not m or m.group(3).lower() not in IMAGE_SUFFIXES or m.group(1).lower() not in wanted:
            continue
        kind, k = m.group(1).lower(), int(m.group(2))
        if k < 1:
            raise DatasetError(f"{entry.path}: image numbers start at 1 ({kind}1, {kind}2, ...), found {kind}{k}")
        if k - 1 in found[kind]:
            raise DatasetError(f"two files for {kind}{k} in {directory}: {found[kind][k - 1].name} and {entry.name}")
        found[kind][k - 1] = Path(entry.path)
    return found, subdirs


def _entry_is_dir(entry: os.DirEntry) -> bool:
    """A folder or a link to one; a link loop is not (as an image slot it is an unreadable image)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def slot_list(files: dict[int, Path], n: int, mode: str = "RGB") -> list[ImageRef | None]:
    """Numbered files -> a list of length ``n`` (None where a number is missing)."""
    return [FileImageRef(files[k], mode=mode) if k in files else None for k in range(n)]  # type: ignore[arg-type]


def read_sample_json(path: Path) -> dict[str, Any]:
    """Read an optional ``sample.json``; an unreadable one is an error naming the file."""
    if not path.is_file():
        return {}
    from ..fileio import read_json

    meta = read_json(path, "sample file")
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    return meta


def list_sample_dirs(root: Path, split: str | None) -> tuple[Path, list[str]]:
    """Resolve ``root[/split]`` and list its sample directories (sorted)."""
    root = Path(root)
    base = root / split if split else root
    if not base.is_dir():
        hint = ""
        if split and root.is_dir():
            splits = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
            hint = f"; splits found in {root}: {splits}"
        raise DatasetError(f"dataset folder {base} does not exist or is not a directory{hint}")
    if split is None and (base / MANIFEST_NAME).is_file():
        manifest = read_sample_json(base / MANIFEST_NAME)
        splits = manifest.get("splits")
        if isinstance(splits, dict) and splits:
            raise DatasetError(
                f"{base} is a benchmark root with splits {sorted(splits)}; pass split=<name> "
                f"(or the split folder itself, e.g. {base / sorted(splits)[0]})"
            )
    names = sorted(e.name for e in os.scandir(base) if _entry_is_dir(e) and not e.name.startswith((".", "_")))
    if not names:
        raise DatasetError(f"dataset folder {base} holds no sample directories (expected {base}/<id>/view1.png ...)")
    return base, names


class FolderDataset(NearIDDataset):
    """Samples from the plain folder layout (see the module docstring).

    ``root`` is the folder holding the sample directories, or a benchmark root together with
    ``split`` ("train", "test"). ``sources`` restricts (and fixes) the distractor sources:
    a sample lacking one of them gets all-None distractors for it. ``indices`` selects
    samples by position (a split file or a list). Directory listing is per sample, on access.
    """

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        sources: Sequence[str] | None = None,
        indices: str | Path | Sequence[int] | None = None,
    ) -> None:
        self.root, self._names = list_sample_dirs(Path(root), split)
        self.split = split
        self.sources = None if sources is None else list(sources)
        super().__init__(indices)

    def _num_rows(self) -> int:
        return len(self._names)

    def describe(self) -> str:
        return f"folder {self.root}"

    @property
    def ids(self) -> list[str]:
        """Sample ids (directory names) in dataset order."""
        return [self._names[i] for i in (self._indices if self._indices is not None else range(len(self._names)))]

    def _read_row(self, row: int) -> Sample:
        sample_dir = self.root / self._names[row]
        found, subdirs = numbered_images(sample_dir, ("view", "mask"))
        source_files: dict[str, dict[str, dict[int, Path]]] = {}
        for sub in subdirs:
            if self.sources is None or sub.name in self.sources:
                source_files[sub.name] = numbered_images(sub, ("distractor", "mask"))[0]
        numbers = [*found["view"], *found["mask"]]
        for files in source_files.values():
            numbers += [*files["distractor"], *files["mask"]]
        if not found["view"]:
            raise DatasetError(
                f"sample directory {sample_dir} has no view images (expected view1.png, view2.png, ...)"
            )
        n = max(numbers) + 1
        meta = read_sample_json(sample_dir / SAMPLE_JSON)
        sample_id = str(meta.get("id", self._names[row]))
        if sample_id != self._names[row]:
            raise DatasetError(
                f"{sample_dir / SAMPLE_JSON} says id {sample_id!r} but its directory is {self._names[row]!r}"
            )
        wanted = self.sources if self.sources is not None else sorted(source_files)
        empty: dict[str, dict[int, Path]] = {"distractor": {}, "mask": {}}
        return Sample(
            id=sample_id,
            category=str(meta.get("category", "unknown")),
            views=slot_list(found["view"], n),
            masks=slot_list(found["mask"], n, mode="L"),
            distractors={s: slot_list(source_files.get(s, empty)["distractor"], n) for s in wanted},
            distractor_masks={s: slot_list(source_files.get(s, empty)["mask"], n, mode="L") for s in wanted},
            meta={k: v for k, v in meta.items() if k not in ("id", "category")} | {"dir": str(sample_dir)},
        )
