"""Inputs split into partitions, and one reader per partition kind (no model).

A *partition* is the unit of work and of output: one input shard (an img2dataset parquet file
or a webdataset ``.tar``), or a fixed slice of a folder plan. Each partition is read into
batches of :class:`~comfy_nearid.scoring.unit.ImageRef` and scored into one output file, so a
re-run skips the partitions whose file exists (img2dataset's ``incremental_mode``).

Shards are opened with fsspec: local paths and any URL the environment supports
(``s3://``, ``gs://``, ``https://``, ... when the matching fsspec backend is installed).
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import DatasetError
from .plan import ScoringPlan, expand_references, natural_sort_key, reference_subjects_in
from .unit import ImageRef

logger = logging.getLogger(__name__)

#: Suffixes of shard files, and the partition kind each one is read as.
SHARD_KINDS = {".parquet": "parquet", ".tar": "webdataset"}
#: Columns (parquet) and extensions (webdataset) that hold the encoded image, in order of preference.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "image")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Partition:
    """One unit of work: ``kind`` is ``items`` (files of a folder plan, ``items`` = pairs of
    ``(path, subject)``), ``parquet`` or ``webdataset`` (a shard at ``url``). ``name`` is
    unique within a run and names the output file."""

    name: str
    kind: str
    url: str = ""
    items: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "kind": self.kind, "url": self.url, "items": self.items})

    @classmethod
    def from_json(cls, text: str) -> "Partition":
        d = json.loads(text)
        return cls(d["name"], d["kind"], d["url"], tuple((p, s) for p, s in d["items"]))


@dataclass(frozen=True)
class SubjectField:
    """Where a shard sample's subject comes from: the parquet column / JSON field ``name``,
    or (single-subject runs) always ``fixed``."""

    name: str = "subject"
    fixed: str | None = None


# ============================================================================ discovery
def looks_like_shards(inputs: Sequence[str | Path]) -> bool:
    """True when every input is a shard file, a glob of them, or a URL (not a local folder)."""
    def is_shard(text: str) -> bool:
        return "://" in text or bool(_GLOB_CHARS & set(text)) or Path(text).suffix.lower() in SHARD_KINDS

    return bool(inputs) and all(is_shard(str(i)) for i in inputs)


def shard_partitions(inputs: Sequence[str | Path]) -> list[Partition]:
    """One partition per shard file; globs are expanded (natural order), names must be unique.

    Raises:
        DatasetError: an input matches nothing, is not a ``.parquet``/``.tar`` file, or two
            shards share a file name (their outputs would collide).
    """
    import fsspec

    partitions: list[Partition] = []
    seen: dict[str, str] = {}
    for entry in inputs:
        text = str(entry)
        fs, path = fsspec.core.url_to_fs(text)
        if _GLOB_CHARS & set(path):
            found = sorted(fs.glob(path), key=natural_sort_key)
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        if not found:
            raise DatasetError(f"shard input {text!r} matches no file")
        for p in found:
            name = posixpath.basename(p)
            suffix = posixpath.splitext(name)[1].lower()
            if suffix not in SHARD_KINDS:
                raise DatasetError(f"shard {p!r}: expected a .parquet or .tar file, got {suffix or 'no suffix'!r}")
            stem = name[: -len(suffix)]
            url = fs.unstrip_protocol(p) if "://" in text else p
            if stem in seen:
                raise DatasetError(f"shards {seen[stem]!r} and {url!r} share the name {stem!r}; "
                                   "their output files would collide. Rename one or score them in separate runs")
            seen[stem] = url
            partitions.append(Partition(stem, SHARD_KINDS[suffix], url))
    return partitions


def plan_partitions(plan: ScoringPlan, partition_size: int) -> list[Partition]:
    """A folder plan cut into consecutive slices of ``partition_size`` items (plan order)."""
    if partition_size < 1:
        raise DatasetError(f"partition size must be >= 1, got {partition_size}")
    items = plan.items
    return [
        Partition(f"part-{k:05d}", "items", items=tuple((str(it.path), it.subject) for it in items[s : s + partition_size]))
        for k, s in enumerate(range(0, len(items), partition_size))
    ]


def read_reference_mapping(path: str | Path) -> dict[str, tuple[Path, ...]]:
    """Subjects' references for shard inputs (paths relative to the file's folder).

    The mapping file of ``nearid score --mapping`` (see
    :func:`~comfy_nearid.fileio.read_mapping_records`) with ``subject`` and ``references``:
    JSON ``{"<subject>": PATHS}``, ``{"<subject>": {"references": PATHS, ...}}`` or a list of
    ``{"subject": ..., "references": PATHS}``; CSV with a header holding ``subject`` and
    ``references``. Other columns (``generated``, labels) are ignored, so a ``nearid score
    --mapping`` file works too; rows naming the same subject are merged.

    Raises:
        DatasetError: unreadable file, missing fields, missing reference files.
    """
    from ..fileio import read_mapping_records

    records, _ = read_mapping_records(path, key="subject", path_fields=("references",), extra="ignore",
                                      what="references mapping")
    merged: dict[str, list[Path]] = {}
    for rec in records:
        merged.setdefault(rec.name, []).extend(rec.paths["references"])
    return {name: expand_references(refs, name) for name, refs in merged.items()}


def reference_subjects_from_root(root: str | Path) -> dict[str, tuple[Path, ...]]:
    """Every folder under ``root`` that directly holds images is a subject (see
    :func:`~comfy_nearid.scoring.plan.plan_from_subject_folders`)."""
    return reference_subjects_in(Path(root))


# ============================================================================ readers
def read_partition(partition: Partition, batch_size: int, subject: SubjectField = SubjectField()
                   ) -> Iterator[list[ImageRef]]:
    """Batches of at most ``batch_size`` refs, in the partition's order.

    Raises:
        DatasetError: the shard cannot be opened, or a parquet shard lacks the image column.
    """
    if partition.kind == "items":
        refs = [ImageRef(path, subj) for path, subj in partition.items]
        yield from (refs[s : s + batch_size] for s in range(0, len(refs), batch_size))
        return
    reader = {"parquet": _read_parquet, "webdataset": _read_webdataset}.get(partition.kind)
    if reader is None:
        raise DatasetError(f"partition {partition.name}: unknown kind {partition.kind!r}")
    batch: list[ImageRef] = []
    for ref in reader(partition, subject):
        batch.append(ref)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _subject_of(meta: dict[str, Any] | None, subject: SubjectField, where: str) -> tuple[str, str | None]:
    """``(subject, error)`` of one sample."""
    if subject.fixed is not None:
        return subject.fixed, None
    value = None if meta is None else meta.get(subject.name)
    if not isinstance(value, str) or not value:
        return "", f"{where}: no subject in field {subject.name!r} (got {value!r})"
    return value, None


def _read_parquet(partition: Partition, subject: SubjectField) -> Iterator[ImageRef]:
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(partition.url, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            image_col = next((c for c in IMAGE_FIELDS if c in names), None)
            if image_col is None:
                raise DatasetError(f"parquet shard {partition.url}: no image column; expected one of "
                                   f"{list(IMAGE_FIELDS)} (img2dataset layout), found {names}")
            columns = [image_col] + [c for c in ("key",) if c in names]
            if subject.fixed is None:
                if subject.name not in names:
                    raise DatasetError(f"parquet shard {partition.url}: no subject column {subject.name!r} "
                                       f"(columns: {names}); set --subject-field")
                columns.append(subject.name)
            row = 0
            for record_batch in pf.iter_batches(batch_size=256, columns=columns):
                data = record_batch.to_pydict()
                for i in range(record_batch.num_rows):
                    key = data["key"][i] if "key" in data and data["key"][i] is not None else f"{partition.name}/{row}"
                    meta = None if subject.fixed is not None else {subject.name: data[subject.name][i]}
                    subj, error = _subject_of(meta, subject, f"key {key}")
                    image = data[image_col][i]
                    if error is None and not image:
                        error = f"no image bytes in column {image_col!r}"
                    yield ImageRef(str(key), subj, bytes(image) if image and error is None else None, error)
                    row += 1
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"parquet shard {partition.url}: cannot read it ({e})") from e


def _read_webdataset(partition: Partition, subject: SubjectField) -> Iterator[ImageRef]:
    """Samples are consecutive members sharing a key (the name up to the first dot)."""
    import fsspec

    def sample(key: str, parts: dict[str, bytes]) -> ImageRef:
        image_ext = next((e for e in IMAGE_FIELDS if e in parts), None)
        meta = None
        if "json" in parts and subject.fixed is None:  # a single-subject run needs no metadata
            try:
                meta = json.loads(parts["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return ImageRef(key, "", error=f"{key}.json is not valid JSON ({e})")
            if not isinstance(meta, dict):
                meta = None
        subj, error = _subject_of(meta, subject, f"{key}.json")
        if error is None and image_ext is None:
            error = f"sample has no image ({', '.join('.' + e for e in IMAGE_FIELDS)})"
        return ImageRef(key, subj, None if error else parts[image_ext], error)

    try:
        with fsspec.open(partition.url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                member_key = posixpath.join(folder, stem)
                if member_key != key:
                    if key is not None:
                        yield sample(key, parts)
                    key, parts = member_key, {}
                ext = ext.lower()
                if ext in IMAGE_FIELDS or ext == "json":
                    handle = tar.extractfile(member)
                    parts[ext] = handle.read() if handle is not None else b""
            if key is not None:
                yield sample(key, parts)
    except (OSError, tarfile.TarError) as e:
        raise DatasetError(f"webdataset shard {partition.url}: cannot read it ({e})") from e
