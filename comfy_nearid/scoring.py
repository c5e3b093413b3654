"""Score folders of generated images against their subjects' reference images.

Three layers, kept apart as in clean-fid/pytorch-fid:

1. **Plans** (no model): which generated image belongs to which subject and which references
   it is scored against. :func:`plan_single_subject`, :func:`plan_from_mapping` and
   :func:`plan_from_subject_folders` build a :class:`ScoringPlan`; every problem a user can
   fix (missing reference, empty folder, unmatched folder) is raised here, before any work.
2. **The streaming scorer** (:func:`score_plan`): decode + preprocess run in a thread pool a
   few batches ahead of the model (Pillow and numpy release the GIL), the model embeds one
   batch at a time, rows are appended and flushed batch by batch, so memory stays flat and
   a crash loses at most the batch in flight. Embeddings go through the
   :class:`~comfy_nearid.embedding_cache.EmbeddingCache`.
3. **Outputs**: one row per (subject, image), a per-subject summary, an optional
   DreamBench++-style JSON; ranks are filled in when the run completes.

Batches are cut at fixed positions of the plan (chunk ``k`` = items ``[k*B, (k+1)*B)``), so a
resumed run and an ``accelerate`` run with chunk ``k`` on process ``k % world`` embed exactly
the same batches as one uninterrupted process: their rows are identical.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import ConfigError, DatasetError, ImageLoadError, InvalidInputError
from .images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    import torch

    from .embedding_cache import EmbeddingCache
    from .model import IdentityModel

__all__ = [
    "AGGREGATES",
    "OUTPUT_FORMATS",
    "ROW_FIELDS",
    "OutputPaths",
    "ProcessShard",
    "ScoreItem",
    "ScoreRow",
    "ScoringOptions",
    "ScoringPlan",
    "ScoringResult",
    "Subject",
    "REFERENCE_COMBINATIONS",
    "aggregate_cosines",
    "combine_references",
    "dreambench_key",
    "list_images",
    "natural_sort_key",
    "plan_from_mapping",
    "plan_from_subject_folders",
    "plan_single_subject",
    "read_mapping",
    "read_rows",
    "score_plan",
]

logger = logging.getLogger(__name__)

#: Ways to combine the cosines to several references (computable from the cosines alone).
AGGREGATES = ("mean", "max")
#: Ways to combine several references into one score; ``prototype`` needs the embeddings.
REFERENCE_COMBINATIONS = ("mean", "max", "prototype")
OUTPUT_FORMATS = ("csv", "jsonl")
ROW_FIELDS = ("path", "subject", "cosines", "score", "match", "calibrated", "rank", "error")
_COSINE_SEPARATOR = ";"
_MAPPING_PATH_SEPARATOR = ";"


# ============================================================================ discovery
def natural_sort_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``img2`` before ``img10``."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text))


def is_image_file(path: Path) -> bool:
    """A visible file with one of the common image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(root: str | Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Image files under ``root`` (recursive), in natural order of their relative paths.

    Hidden files and folders (``.name``) are skipped, as are files without an image extension
    (metadata, captions); folders in ``exclude`` (resolved paths) are not entered. A file
    with an image extension but no image inside is kept: it becomes an error row.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    skip = {Path(p).resolve() for p in exclude}
    found: list[tuple[tuple, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip]
        for name in filenames:
            path = here / name
            if is_image_file(path):
                if "\n" in name or "\r" in name:
                    raise DatasetError(f"{path!r}: file names with line breaks are not supported; rename the file")
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError as e:  # undecodable bytes in the name cannot go into the rows
                    raise DatasetError(f"{path!r}: the file name is not valid UTF-8; rename the file") from e
                found.append((natural_sort_key(path.relative_to(root).as_posix()), path))
    found.sort(key=lambda pair: pair[0])
    return [path for _, path in found]


def expand_references(entries: Sequence[str | Path], subject: str) -> tuple[Path, ...]:
    """Reference files and folders -> image files (folders expanded, natural order).

    Raises:
        DatasetError: an entry does not exist, or a folder holds no image.
    """
    if not entries:
        raise DatasetError(f"subject {subject!r}: no reference image given")
    out: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if not path.exists():
            raise DatasetError(f"subject {subject!r}: reference {path} does not exist")
        if path.is_dir():
            images = list_images(path)
            if not images:
                raise DatasetError(
                    f"subject {subject!r}: reference folder {path} holds no image "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            out.extend(images)
        else:
            out.append(path)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Subject:
    """One subject: its reference images and the folders (or files) of its generated images."""

    name: str
    references: tuple[Path, ...]
    generated: tuple[Path, ...]
    exclude: tuple[Path, ...] = ()  # folders inside ``generated`` that belong to other subjects


@dataclass(frozen=True)
class ScoreItem:
    """One generated image scored for one subject; ``index`` is its position in the plan."""

    index: int
    subject: str
    path: Path
    key_path: str  # path relative to the plan's key root, '/'-separated


def dreambench_key(key_path: str) -> str:
    """DreamBench++-style key: relative path without extension, ``/`` replaced by ``-``.

    ``live_subject_animal_00_kitten/0_0.png`` -> ``live_subject_animal_00_kitten-0_0``.
    """
    stem = key_path.rsplit(".", 1)[0] if "." in key_path.rsplit("/", 1)[-1] else key_path
    return stem.replace("/", "-")


@dataclass(frozen=True)
class ScoringPlan:
    """Subjects and the ordered list of (subject, generated image) items to score."""

    subjects: tuple[Subject, ...]
    items: tuple[ScoreItem, ...]
    key_root: Path  # deepest folder holding every generated folder (DreamBench keys are relative to it)

    def __len__(self) -> int:
        return len(self.items)

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise InvalidInputError(f"no subject named {name!r}; the plan has {[s.name for s in self.subjects]}")

    def dreambench_keys(self) -> list[str]:
        """One DreamBench++ key per item, in plan order.

        Raises:
            DatasetError: two items would share a key (the same image under two subjects,
                or paths such as ``a/b-c.png`` and ``a-b/c.png``).
        """
        seen: dict[str, ScoreItem] = {}
        keys = []
        for item in self.items:
            key = dreambench_key(item.key_path)
            if key in seen:
                raise DatasetError(
                    f"DreamBench++ key {key!r} is shared by {seen[key].path} ({seen[key].subject}) and "
                    f"{item.path} ({item.subject}); one JSON cannot hold both. Score them in separate runs"
                )
            seen[key] = item
            keys.append(key)
        return keys

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready description of the subjects (for the resolved config)."""
        return [
            {
                "name": s.name,
                "references": [str(p) for p in s.references],
                "generated": [str(p) for p in s.generated],
                "num_images": sum(1 for it in self.items if it.subject == s.name),
            }
            for s in self.subjects
        ]


def build_plan(subjects: Sequence[Subject]) -> ScoringPlan:
    """Enumerate every subject's generated images and check everything a run needs.

    Raises:
        DatasetError: no subject, duplicate subject names, a missing reference file, a missing
            generated folder, or a generated folder without images.
    """
    if not subjects:
        raise DatasetError("no subject to score")
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"subject names must be unique; repeated: {duplicates}")
    for s in subjects:
        for ref in s.references:
            if not ref.is_file():
                raise DatasetError(f"subject {s.name!r}: reference image {ref} does not exist")
    items: list[ScoreItem] = []
    roots: list[Path] = []
    per_subject: list[tuple[Subject, list[Path]]] = []
    for s in subjects:
        if not s.generated:
            raise DatasetError(f"subject {s.name!r}: no folder of generated images given")
        paths: list[Path] = []
        for gen in s.generated:
            if not gen.exists():
                raise DatasetError(f"subject {s.name!r}: generated folder {gen} does not exist")
            images = list_images(gen, exclude=s.exclude)
            if not images:
                raise DatasetError(
                    f"subject {s.name!r}: {gen} holds no image (looked recursively for "
                    f"{', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend(images)
            roots.append(gen.resolve() if gen.is_dir() else gen.resolve().parent)
        unique = list({p.resolve(): p for p in paths}.values())  # a file listed twice is scored once
        per_subject.append((s, unique))
    key_root = Path(os.path.commonpath([str(r) for r in roots]))
    for s, paths in per_subject:
        for path in paths:
            items.append(ScoreItem(len(items), s.name, path, path.resolve().relative_to(key_root).as_posix()))
    return ScoringPlan(tuple(subjects), tuple(items), key_root)


def plan_single_subject(
    references: Sequence[str | Path], generated: Sequence[str | Path], subject: str | None = None
) -> ScoringPlan:
    """One subject: reference files and/or folders, and one or more generated folders.

    The subject is named ``subject``, else after the single reference (file stem or folder name),
    else ``subject``.
    """
    refs = [Path(r) for r in references]
    if subject is None:
        subject = (refs[0].stem if refs[0].is_file() else refs[0].name) if len(refs) == 1 else "subject"
    if not generated:
        raise DatasetError("no folder of generated images given")
    ref_files = expand_references(refs, subject)
    return build_plan([Subject(subject, ref_files, tuple(Path(g) for g in generated))])


def _as_path_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(_MAPPING_PATH_SEPARATOR)]
        return [p for p in parts if p]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise DatasetError(f"{where}: expected a path or a list of paths, got {value!r}")


def read_mapping(path: str | Path) -> list[Subject]:
    """Read a subject mapping file (paths in it are relative to the file's folder).

    - JSON: ``{"<subject>": {"references": PATHS, "generated": PATHS}, ...}`` or a list of
      ``{"subject": ..., "references": ..., "generated": ...}``; PATHS is a path or a list.
    - CSV: header ``subject,references,generated``; several paths in a cell are separated by
      ``;``; rows naming the same subject are merged.

    Raises:
        DatasetError: unreadable file, unknown format, missing or unknown fields.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"mapping file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".json":
        entries = _read_mapping_json(path)
    elif suffix == ".csv":
        entries = _read_mapping_csv(path)
    else:
        raise DatasetError(f"mapping file {path}: unknown format {suffix!r}; use .json or .csv")
    merged: dict[str, tuple[list[str], list[str]]] = {}
    for name, refs, gens in entries:
        slot = merged.setdefault(name, ([], []))
        slot[0].extend(refs)
        slot[1].extend(gens)
    base = path.parent
    subjects = []
    for name, (refs, gens) in merged.items():
        ref_paths = [p if Path(p).is_absolute() else base / p for p in refs]
        gen_paths = tuple(Path(p) if Path(p).is_absolute() else base / p for p in dict.fromkeys(gens))
        subjects.append(Subject(name, expand_references(ref_paths, name), gen_paths))
    if not subjects:
        raise DatasetError(f"mapping file {path} lists no subject")
    return subjects


_MAPPING_FIELDS = {"subject", "references", "generated"}


def _read_mapping_json(path: Path) -> list[tuple[str, list[str], list[str]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"mapping file {path}: cannot read JSON ({e})") from e
    if isinstance(data, dict):
        records = [dict(v, subject=k) if isinstance(v, dict) else v for k, v in data.items()]
    elif isinstance(data, list):
        records = data
    else:
        raise DatasetError(f"mapping file {path}: expected a JSON object or list, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(records):
        where = f"mapping file {path}, entry {i}"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object with 'references' and 'generated', got {rec!r}")
        unknown = set(rec) - _MAPPING_FIELDS
        missing = _MAPPING_FIELDS - set(rec)
        if unknown or missing:
            raise DatasetError(
                f"{where}: fields must be {sorted(_MAPPING_FIELDS)}; missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        name = rec["subject"]
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: 'subject' must be a non-empty string, got {name!r}")
        out.append((name, _as_path_list(rec["references"], f"{where}.references"),
                    _as_path_list(rec["generated"], f"{where}.generated")))
    return out


def _read_mapping_csv(path: Path) -> list[tuple[str, list[str], list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = set(reader.fieldnames or [])
            if header != _MAPPING_FIELDS:
                raise DatasetError(
                    f"mapping file {path}: header must be {sorted(_MAPPING_FIELDS)}, got {reader.fieldnames}"
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"mapping file {path}: cannot read CSV ({e})") from e
    out = []
    for line, row in enumerate(rows, start=2):
        where = f"mapping file {path}, line {line}"
        name = (row["subject"] or "").strip()
        if not name:
            raise DatasetError(f"{where}: empty 'subject'")
        out.append((name, _as_path_list(row["references"] or "", f"{where}.references"),
                    _as_path_list(row["generated"] or "", f"{where}.generated")))
    return out


def plan_from_mapping(path: str | Path) -> ScoringPlan:
    """Many subjects from a mapping file (see :func:`read_mapping`)."""
    return build_plan(read_mapping(path))


def plan_from_subject_folders(references_root: str | Path, generated_roots: Sequence[str | Path]) -> ScoringPlan:
    """DreamBench-style layout: generated folders named after their subject's reference folder.

    Every folder under ``references_root`` that directly holds images is a subject, named by
    its path relative to ``references_root`` (``dog`` or ``live_subject_animal/00_kitten``).
    In each generated root, the subject's images are in ``<root>/<name>`` or, flattened,
    ``<root>/<name with '/' replaced by '_'>`` (DreamBench++'s ``live_subject_animal_00_kitten``).

    Raises:
        DatasetError: no reference subject, a generated root with no matching folder, or
            images in a generated root outside every subject's folder.
    """
    ref_root = Path(references_root)
    if not ref_root.is_dir():
        raise DatasetError(f"references folder {ref_root} does not exist")
    subject_refs: dict[str, tuple[Path, ...]] = {}
    for image in list_images(ref_root):
        name = image.parent.relative_to(ref_root).as_posix()
        if name == ".":
            raise DatasetError(
                f"{image}: images directly in the references folder {ref_root} belong to no subject; "
                "put each subject's references in its own sub-folder"
            )
        subject_refs.setdefault(name, ())
        subject_refs[name] = (*subject_refs[name], image)
    if not subject_refs:
        raise DatasetError(f"references folder {ref_root} holds no subject folder with images")
    if not generated_roots:
        raise DatasetError("no folder of generated images given")
    matched: dict[str, list[Path]] = {}
    for gen_root in (Path(g) for g in generated_roots):
        if not gen_root.is_dir():
            raise DatasetError(f"generated folder {gen_root} does not exist")
        found_here = _match_subject_folders(gen_root, subject_refs)
        if not found_here:
            raise DatasetError(
                f"no folder in {gen_root} is named after a subject of {ref_root} "
                f"(subjects: {_preview(sorted(subject_refs, key=natural_sort_key))})"
            )
        for name, folder in found_here.items():
            matched.setdefault(name, []).append(folder)
        _check_all_images_covered(gen_root, list(found_here.values()))
    all_folders = [f.resolve() for folders in matched.values() for f in folders]
    subjects = []
    for name in sorted(matched, key=natural_sort_key):
        own = {f.resolve() for f in matched[name]}
        nested = tuple(f for f in all_folders if f not in own and any(o in f.parents for o in own))
        subjects.append(Subject(name, subject_refs[name], tuple(matched[name]), exclude=nested))
    skipped = sorted(set(subject_refs) - set(matched), key=natural_sort_key)
    if skipped:
        logger.warning("%d reference subject(s) have no generated folder and are skipped: %s",
                       len(skipped), _preview(skipped))
    return build_plan(subjects)


def _match_subject_folders(gen_root: Path, subject_refs: dict[str, tuple[Path, ...]]) -> dict[str, Path]:
    found = {}
    for name in subject_refs:
        for candidate in (gen_root / name, gen_root / name.replace("/", "_")):
            if candidate.is_dir():
                found[name] = candidate
                break
    return found


def _check_all_images_covered(gen_root: Path, folders: list[Path]) -> None:
    covered = [f.resolve() for f in folders]
    stray = [p for p in list_images(gen_root) if not any(c in p.resolve().parents for c in covered)]
    if stray:
        raise DatasetError(
            f"{len(stray)} image(s) in {gen_root} are not in a folder named after a reference subject: "
            f"{_preview([str(p) for p in stray])}"
        )


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ============================================================================ rows
@dataclass
class ScoreRow:
    """One output row. ``score`` combines the references (mean or max of the cosines, or the
    cosine to the prototype; see :func:`combine_references`),
    ``match`` its 0..100 identity match, ``calibrated`` whether that match comes from a curve
    fitted for this head (False: the uncalibrated default curve), ``rank`` 1 = best within the
    subject (filled in when the run completes); error rows carry ``error`` and no numbers."""

    path: str
    subject: str
    cosines: tuple[float, ...] = ()
    score: float | None = None
    match: float | None = None
    calibrated: bool | None = None
    rank: int | None = None
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "path": self.path, "subject": self.subject, "cosines": list(self.cosines), "score": self.score,
            "match": self.match, "calibrated": self.calibrated, "rank": self.rank, "error": self.error,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], where: str) -> "ScoreRow":
        try:
            return cls(
                path=str(rec["path"]), subject=str(rec["subject"]),
                cosines=tuple(float(c) for c in rec.get("cosines") or ()),
                score=None if rec.get("score") is None else float(rec["score"]),
                match=None if rec.get("match") is None else float(rec["match"]),
                calibrated=_parse_flag(rec.get("calibrated")),
                rank=None if rec.get("rank") is None else int(rec["rank"]),
                error=rec.get("error") or None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{where}: not a score row ({e}); expected fields {list(ROW_FIELDS)}") from e


def _parse_flag(value: Any) -> bool | None:
    """``calibrated`` as written in JSONL (true/false) or CSV (``true``/``false``/empty)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"calibrated must be true or false, got {value!r}")


def _short_float(x: float) -> float:
    """The shortest decimal that round-trips the value's float32: rows stay readable and two
    runs that computed the same float32 write the same text."""
    return float(str(np.float32(x)))


def _csv_line(values: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


_CSV_HEADER = _csv_line(ROW_FIELDS)


def encode_row(row: ScoreRow, fmt: str) -> str:
    """One row as one line of CSV or JSONL (ending in a newline)."""
    if fmt == "jsonl":
        return json.dumps(row.to_record(), ensure_ascii=False) + "\n"
    num = lambda v: "" if v is None else repr(v)  # noqa: E731
    return _csv_line([
        row.path, row.subject, _COSINE_SEPARATOR.join(repr(c) for c in row.cosines), num(row.score),
        num(row.match), "" if row.calibrated is None else str(row.calibrated).lower(),
        "" if row.rank is None else str(row.rank), row.error or "",
    ])


def decode_row(line: str, fmt: str, where: str) -> ScoreRow:
    """Parse one line written by :func:`encode_row`."""
    if fmt == "jsonl":
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {rec!r}")
        return ScoreRow.from_record(rec, where)
    values = next(csv.reader([line]))
    if len(values) != len(ROW_FIELDS):
        raise DatasetError(f"{where}: expected {len(ROW_FIELDS)} CSV fields {list(ROW_FIELDS)}, got {len(values)}")
    rec = dict(zip(ROW_FIELDS, values))
    rec["cosines"] = [c for c in rec["cosines"].split(_COSINE_SEPARATOR) if c]
    for name in ("score", "match", "calibrated", "rank"):
        rec[name] = rec[name] or None
    return ScoreRow.from_record(rec, where)


def _scan_rows(path: Path, fmt: str) -> Iterator[tuple[int, ScoreRow]]:
    """``(byte offset, row)`` for every complete line of a row file; a trailing line without
    its newline (the write a crash interrupted) is ignored."""
    with open(path, "rb") as f:
        offset = 0
        line_no = 0
        if fmt == "csv":
            header = f.readline()
            line_no = 1
            if header and header.endswith(b"\n") and header.decode("utf-8") != _CSV_HEADER:
                raise DatasetError(
                    f"{path}: header is {header.decode('utf-8', 'replace').strip()!r}, expected "
                    f"{_CSV_HEADER.strip()!r}; it was not written by `nearid score`"
                )
            offset = len(header)
        for raw in iter(f.readline, b""):
            line_no += 1
            if not raw.endswith(b"\n"):
                break
            if raw.strip():
                yield offset, decode_row(raw.decode("utf-8"), fmt, f"{path}, line {line_no}")
            offset += len(raw)


def read_rows(path: str | Path, fmt: str | None = None) -> list[ScoreRow]:
    """All rows of a CSV/JSONL row file written by :func:`score_plan` (format from the suffix)."""
    path = Path(path)
    return [row for _, row in _scan_rows(path, fmt or _format_from_suffix(path))]


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in OUTPUT_FORMATS:
        return suffix
    raise InvalidInputError(f"output {path}: cannot tell the format from {path.suffix!r}; use .csv or .jsonl")


def _open_for_append(path: Path, fmt: str) -> io.TextIOWrapper:
    """Open a row file to append: drop a crash's partial last line, write the CSV header if new."""
    if path.exists():
        with open(path, "rb+") as f:
            data_end = f.seek(0, os.SEEK_END)
            keep = data_end
            while keep > 0:
                step = min(65536, keep)
                f.seek(keep - step)
                block = f.read(step)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    keep = keep - step + cut + 1
                    break
                keep -= step
            if keep != data_end:
                logger.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run",
                               path, data_end - keep)
                f.truncate(keep)
    new = not path.exists() or path.stat().st_size == 0
    handle = open(path, "a", encoding="utf-8", newline="")
    if new and fmt == "csv":
        handle.write(_CSV_HEADER)
        handle.flush()
    return handle


# ============================================================================ scores
def aggregate_cosines(cosines: np.ndarray, how: str = "mean") -> np.ndarray:
    """Combine cosines to several references: ``[N, R]`` -> ``[N]`` by ``mean`` or ``max``.

    ``prototype`` is not computable from the cosines; use :func:`combine_references`.
    """
    if how not in AGGREGATES:
        hint = "; 'prototype' needs the embeddings: use combine_references" if how == "prototype" else ""
        raise InvalidInputError(f"aggregate must be one of {AGGREGATES}, got {how!r}{hint}")
    cos = np.asarray(cosines, dtype=np.float64)
    if cos.ndim != 2 or cos.shape[1] == 0:
        raise InvalidInputError(f"cosines must be [N, R] with R >= 1, got shape {cos.shape}")
    return cos.mean(axis=1) if how == "mean" else cos.max(axis=1)


def _as_embedding_matrix(value: Any, name: str) -> np.ndarray:
    """A numpy array or torch tensor ``[N, D]`` -> float64 numpy (CPU)."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InvalidInputError(f"{name} must be [N, D] embeddings with D >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} holds NaN or infinite values")
    return arr


def combine_references(candidate_emb: Any, reference_emb: Any, mode: str = "mean") -> np.ndarray:
    """Identity score of each candidate against a subject's references.

    Args:
        candidate_emb: unit embeddings ``[N, D]`` (numpy or torch).
        reference_emb: unit embeddings ``[R, D]`` of the subject's references, ``R >= 1``.
        mode: ``mean`` of the R cosines, ``max`` (the closest reference), or ``prototype``:
            the cosine to the mean reference embedding re-normalised to unit length (one
            direction for the subject, so an off reference weighs less than with ``mean``).

    Returns:
        float64 ``[N]`` scores in -1..1, in candidate order.
    """
    if mode not in REFERENCE_COMBINATIONS:
        raise InvalidInputError(f"reference combination must be one of {REFERENCE_COMBINATIONS}, got {mode!r}")
    cand = _as_embedding_matrix(candidate_emb, "candidate embeddings")
    refs = _as_embedding_matrix(reference_emb, "reference embeddings")
    if refs.shape[0] == 0:
        raise InvalidInputError("reference embeddings: at least one reference is needed, got 0")
    if cand.shape[1] != refs.shape[1]:
        raise InvalidInputError(
            f"candidate embeddings are {cand.shape[1]}-d but reference embeddings {refs.shape[1]}-d; "
            "embed both with the same model"
        )
    if mode == "prototype":
        mean = refs.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm == 0.0:  # references that cancel out have no common direction
            raise InvalidInputError("the references' mean embedding is zero; 'prototype' has no direction, use mean")
        return cand @ (mean / norm)
    return aggregate_cosines(cand @ refs.T, mode)


def _calibrate(model: Any, scores: np.ndarray) -> np.ndarray:
    """Aggregate cosines -> 0..100 identity match with the model's calibration (head metadata,
    else the documented default; see :mod:`comfy_nearid.calibration`)."""
    from .calibration import calibration_for

    return np.asarray(calibration_for(model).match(np.asarray(scores, dtype=np.float64)), dtype=np.float64)


def _calibration_description(model: Any) -> dict[str, Any]:
    from .calibration import calibration_for

    return calibration_for(model).to_dict()


# ============================================================================ streaming
@dataclass
class _Prepared:
    """What a decode thread hands the model thread for one item."""

    key: str | None = None
    embedding: np.ndarray | None = None  # a cache hit
    pixels: "torch.Tensor | None" = None  # [3, S, S], to embed
    error: str | None = None


class _ItemPreparer:
    """Read, hash, look up and (on a miss) decode + preprocess one image. Runs in threads."""

    def __init__(self, preprocess: Callable[[Any], "torch.Tensor"], cache: "EmbeddingCache | None", identity: str):
        self.preprocess = preprocess
        self.cache = cache
        self.identity = identity

    def __call__(self, item: ScoreItem) -> _Prepared:
        from .embedding_cache import bytes_content_hash
        from .images import load_image_bytes

        try:
            data = item.path.read_bytes()
        except OSError as e:
            return _Prepared(error=f"cannot read file ({e.strerror or e})")
        if not data:
            return _Prepared(error="file is empty (0 bytes)")
        key = None
        if self.cache is not None:
            key = bytes_content_hash(data)
            hit = self.cache.get_many(self.identity, [key]).get(key)
            if hit is not None:
                return _Prepared(key=key, embedding=hit)
        try:
            pixels = self.preprocess(load_image_bytes(data, str(item.path)))
        except ImageLoadError as e:
            return _Prepared(key=key, error=e.reason)
        return _Prepared(key=key, pixels=pixels)


def prefetch(
    prepare: Callable[[ScoreItem], _Prepared],
    batches: Iterable[list[ScoreItem]],
    num_workers: int,
    depth: int,
) -> Iterator[tuple[list[ScoreItem], list[_Prepared]]]:
    """Yield ``(batch, prepared)`` in order while ``depth`` further batches are prepared in
    ``num_workers`` threads (``num_workers=0``: prepare inline). At most ``depth + 1`` batches
    of pixels exist at once, so memory does not grow with the number of images."""
    if num_workers <= 0:
        for batch in batches:
            yield batch, [prepare(item) for item in batch]
        return
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="nearid-decode")
    pending: deque[tuple[list[ScoreItem], list[Future]]] = deque()
    source = iter(batches)

    def submit_next() -> None:
        batch = next(source, None)
        if batch is not None:
            pending.append((batch, [pool.submit(prepare, item) for item in batch]))

    try:
        for _ in range(depth + 1):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            prepared = [f.result() for f in futures]
            submit_next()
            yield batch, prepared
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class ProcessShard:
    """This process's place in a multi-process run (``accelerate launch``): chunk ``k`` of the
    plan is scored by process ``k % count``; ``barrier`` waits for every process."""

    index: int = 0
    count: int = 1
    barrier: Callable[[], None] = _no_barrier

    @property
    def is_main(self) -> bool:
        return self.index == 0


@dataclass(frozen=True)
class ScoringOptions:
    """How to score. ``num_workers`` decode threads prepare ``prefetch_batches`` batches ahead."""

    aggregate: str = "mean"
    batch_size: int = 32
    num_workers: int = 2
    prefetch_batches: int = 2
    strict: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.aggregate not in REFERENCE_COMBINATIONS:
            raise InvalidInputError(f"aggregate must be one of {REFERENCE_COMBINATIONS}, got {self.aggregate!r}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.prefetch_batches < 0:
            raise InvalidInputError(
                f"num_workers and prefetch_batches must be >= 0, got {self.num_workers}, {self.prefetch_batches}"
            )


@dataclass(frozen=True)
class OutputPaths:
    """Every file a run writes. ``rows`` is ``.csv`` or ``.jsonl``; the summary and resolved
    config sit beside it (``scores.summary.json``, ``scores.config.json``)."""

    rows: Path
    fmt: str
    summary: Path
    config: Path
    dreambench: Path | None = None

    @classmethod
    def for_rows(
        cls, rows: str | Path, fmt: str | None = None, summary: str | Path | None = None,
        dreambench: str | Path | None = None,
    ) -> "OutputPaths":
        rows = Path(rows)
        fmt = fmt or _format_from_suffix(rows)
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInputError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        stem = rows.with_suffix("") if rows.suffix else rows
        return cls(
            rows=rows, fmt=fmt,
            summary=Path(summary) if summary else stem.with_name(stem.name + ".summary.json"),
            config=stem.with_name(stem.name + ".config.json"),
            dreambench=Path(dreambench) if dreambench else None,
        )

    def finals(self) -> list[Path]:
        return [p for p in (self.rows, self.summary, self.config, self.dreambench) if p is not None]

    def shard(self, index: int, count: int) -> Path:
        return self.rows.with_name(f"{self.rows.name}.part-{index}-of-{count}.jsonl")

    def shards(self) -> list[Path]:
        pattern = re.compile(re.escape(self.rows.name) + r"\.part-\d+-of-\d+\.jsonl$")
        parent = self.rows.parent
        if not parent.is_dir():
            return []
        return sorted((p for p in parent.iterdir() if pattern.match(p.name)), key=lambda p: natural_sort_key(p.name))


@dataclass
class ScoringResult:
    """What a completed run produced (returned on the main process)."""

    outputs: OutputPaths
    num_images: int
    num_scored: int
    num_errors: int
    num_resumed: int
    subjects: dict[str, dict[str, Any]] = field(default_factory=dict)


def score_plan(
    model: "IdentityModel",
    plan: ScoringPlan,
    outputs: OutputPaths,
    *,
    options: ScoringOptions = ScoringOptions(),
    cache: "EmbeddingCache | None" = None,
    resume: bool = False,
    overwrite: bool = False,
    shard: ProcessShard = ProcessShard(),
    run_config: dict[str, Any] | None = None,
) -> ScoringResult | None:
    """Score every item of ``plan`` and write the outputs.

    Args:
        model: the identity model (``preprocess``, ``embed_pixels``, ``identity``).
        plan: what to score (see :func:`plan_single_subject` and friends).
        outputs: where rows, summary, resolved config and the optional DreamBench JSON go.
        options: aggregate, batching, threads, strict mode, progress bar.
        cache: embedding cache (``None``: no cache).
        resume: continue the rows already in ``outputs`` (and any per-process parts).
        overwrite: replace existing outputs.
        shard: this process's place in a multi-process run.
        run_config: extra resolved settings recorded in the config file.

    Returns:
        The :class:`ScoringResult` on the main process, ``None`` on the others.

    Raises:
        InvalidInputError: outputs exist and neither ``resume`` nor ``overwrite`` is set.
        ConfigError: ``resume`` of outputs written by another model or aggregate.
        ImageLoadError: a reference cannot be read, or (``strict``) a generated image.
    """
    if resume and overwrite:
        raise InvalidInputError("resume and overwrite exclude each other: resume keeps the rows, overwrite discards them")
    config = _resolved_config(model, plan, outputs, options, run_config)
    _check_outputs(outputs, resume, overwrite, config)
    if outputs.dreambench is not None:
        plan.dreambench_keys()  # a key collision stops the run before any work
    references = _embed_references(model, plan, cache, options.batch_size)
    shard.barrier()
    if shard.is_main:
        if overwrite:
            for path in [*outputs.finals(), *outputs.shards()]:
                path.unlink(missing_ok=True)
        _write_json_atomic(outputs.config, config)
    shard.barrier()
    done = _finished_indices(plan, outputs)
    shard.barrier()  # nobody appends before every process has read what is done
    todo = _chunks_for(plan, done, options.batch_size, shard)
    journal = outputs.rows if shard.count == 1 else outputs.shard(shard.index, shard.count)
    fmt = outputs.fmt if shard.count == 1 else "jsonl"
    logger.info("scoring %d image(s) of %d subject(s); %d already done%s", len(plan), len(plan.subjects),
                len(done), "" if shard.count == 1 else f"; process {shard.index}/{shard.count}")
    _run_chunks(model, todo, done, references, journal, fmt, options, cache, shard)
    shard.barrier()
    if not shard.is_main:
        return None
    result = _finalize(model, plan, outputs, options.aggregate)
    result.num_resumed = len(done)
    return result


def _resolved_config(
    model: Any, plan: ScoringPlan, outputs: OutputPaths, options: ScoringOptions, extra: dict[str, Any] | None
) -> dict[str, Any]:
    from . import __version__
    from .embedding_cache import model_cache_identity

    return {
        "command": "score",
        "library_version": __version__,
        "model_identity": model_cache_identity(model),
        "calibration": _calibration_description(model),
        "aggregate": options.aggregate,
        "format": outputs.fmt,
        "batch_size": options.batch_size,
        "num_images": len(plan),
        "outputs": {
            "rows": str(outputs.rows), "summary": str(outputs.summary),
            "dreambench": None if outputs.dreambench is None else str(outputs.dreambench),
        },
        "subjects": plan.describe(),
        **(extra or {}),
    }


def _check_outputs(outputs: OutputPaths, resume: bool, overwrite: bool, config: dict[str, Any]) -> None:
    for path in outputs.finals():
        if path.is_dir():
            raise InvalidInputError(f"output {path} is a directory; give a file path")
    existing = [p for p in [*outputs.finals(), *outputs.shards()] if p.exists()]
    if existing and not (resume or overwrite):
        raise InvalidInputError(
            f"output {existing[0]} already exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}; "
            "pass --overwrite to replace it or --resume to continue it"
        )
    if resume and outputs.config.exists():
        try:
            previous = json.loads(outputs.config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot resume: {outputs.config} is unreadable ({e}); use --overwrite") from e
        for name in ("model_identity", "calibration", "aggregate", "format", "batch_size"):
            if previous.get(name) != config[name]:
                raise ConfigError(
                    f"cannot resume {outputs.rows}: it was written with {name}={previous.get(name)!r}, "
                    f"this run uses {config[name]!r}; use the same settings or --overwrite"
                )


def _embed_references(
    model: Any, plan: ScoringPlan, cache: "EmbeddingCache | None", batch_size: int
) -> dict[str, np.ndarray]:
    """Each subject's reference embeddings ``[R, D]``, embedded once (through the cache)."""
    from .embedding_cache import cached_embed

    out = {}
    for subject in plan.subjects:
        emb = cached_embed(model, list(subject.references), cache, batch_size=batch_size)
        out[subject.name] = emb.numpy().astype(np.float32)
    return out


def _finished_indices(plan: ScoringPlan, outputs: OutputPaths) -> set[int]:
    """Plan indices that already have a row in the outputs (rows file and per-process parts)."""
    index_of = {(it.subject, str(it.path)): it.index for it in plan.items}
    done: set[int] = set()
    sources = ([(outputs.rows, outputs.fmt)] if outputs.rows.exists() else []) + [(p, "jsonl") for p in outputs.shards()]
    for path, fmt in sources:
        for _, row in _scan_rows(path, fmt):
            idx = index_of.get((row.subject, row.path))
            if idx is not None:
                done.add(idx)
    return done


def _chunks_for(plan: ScoringPlan, done: set[int], batch_size: int, shard: ProcessShard) -> list[list[ScoreItem]]:
    """This process's unfinished chunks. A partly finished chunk is embedded whole (its
    finished rows are not written again) so that its batch, and hence every float, is the
    same as in an uninterrupted run."""
    chunks = []
    for k, start in enumerate(range(0, len(plan), batch_size)):
        if k % shard.count != shard.index:
            continue
        chunk = list(plan.items[start : start + batch_size])
        if any(it.index not in done for it in chunk):
            chunks.append(chunk)
    return chunks


def _run_chunks(
    model: Any, chunks: list[list[ScoreItem]], done: set[int], references: dict[str, np.ndarray],
    journal: Path, fmt: str, options: ScoringOptions, cache: "EmbeddingCache | None", shard: ProcessShard,
) -> None:
    """The streaming loop: prefetched batches -> model -> rows appended and flushed per batch
    (rows of items in ``done`` are not written again)."""
    from tqdm.auto import tqdm

    from .embedding_cache import model_cache_identity

    total = sum(1 for c in chunks for it in c if it.index not in done)
    if total == 0:
        return
    identity = model_cache_identity(model)
    preparer = _ItemPreparer(model.preprocess, cache, identity)
    bar = tqdm(total=total, unit="img", desc="scoring" if shard.count == 1 else f"scoring [{shard.index}]",
               disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    with _open_for_append(journal, fmt) as out:
        for batch, prepared in prefetch(preparer, chunks, options.num_workers, options.prefetch_batches):
            embeddings = _embed_batch(model, prepared, cache, identity)
            rows = [_make_row(item, prep, emb, references, options.aggregate)
                    for item, prep, emb in zip(batch, prepared, embeddings) if item.index not in done]
            _fill_calibration(model, rows)
            out.write("".join(encode_row(r, fmt) for r in rows))
            out.flush()  # rows survive a crash of this process from here on
            bar.update(len(rows))
            if options.strict:
                failed = next((r for r in rows if r.error), None)
                if failed is not None:
                    bar.close()
                    raise ImageLoadError(failed.path, f"{failed.error} (--strict stops at the first unreadable image)")
    bar.close()


def _embed_batch(model: Any, prepared: list[_Prepared], cache: "EmbeddingCache | None", identity: str
                 ) -> list[np.ndarray | None]:
    """Embeddings for a batch: cache hits as they are, the rest in one forward pass."""
    import torch

    out: list[np.ndarray | None] = [p.embedding for p in prepared]
    todo = [i for i, p in enumerate(prepared) if p.pixels is not None]
    if todo:
        pixels = torch.stack([prepared[i].pixels for i in todo])
        fresh = model.embed_pixels(pixels).detach().float().cpu().numpy()
        for j, i in enumerate(todo):
            out[i] = fresh[j]
        if cache is not None:
            cache.put_many(identity, [(prepared[i].key, fresh[j]) for j, i in enumerate(todo)])
    return out


def _make_row(item: ScoreItem, prepared: _Prepared, embedding: np.ndarray | None,
              references: dict[str, np.ndarray], aggregate: str) -> ScoreRow:
    if prepared.error is not None or embedding is None:
        reason = (prepared.error or "no embedding").replace("\n", " ").replace("\r", " ")
        return ScoreRow(str(item.path), item.subject, error=reason)
    cosines = references[item.subject] @ np.asarray(embedding, dtype=np.float32)
    score = combine_references(np.asarray(embedding)[None, :], references[item.subject], aggregate)[0]
    return ScoreRow(str(item.path), item.subject, tuple(_short_float(c) for c in cosines), _short_float(score))


def _fill_calibration(model: Any, rows: list[ScoreRow]) -> None:
    from .calibration import calibration_for

    scored = [r for r in rows if r.score is not None]
    if scored:
        fitted = calibration_for(model).fitted
        values = _calibrate(model, np.array([r.score for r in scored], dtype=np.float64))
        for r, v in zip(scored, values):
            r.match, r.calibrated = _short_float(v), fitted


# ============================================================================ finalise
def _finalize(model: Any, plan: ScoringPlan, outputs: OutputPaths, aggregate: str) -> ScoringResult:
    """Merge the rows (rows file + per-process parts) in plan order, add ranks, write the
    final rows file atomically, the summary and the DreamBench++ JSON."""
    n = len(plan)
    index_of = {(it.subject, str(it.path)): it.index for it in plan.items}
    sources = ([(outputs.rows, outputs.fmt)] if outputs.rows.exists() else []) + [(p, "jsonl") for p in outputs.shards()]
    source_of = np.full(n, -1, dtype=np.int32)
    offset_of = np.zeros(n, dtype=np.int64)
    scores = np.full(n, np.nan)
    calibrated = np.full(n, np.nan)
    dropped = 0
    for s, (path, fmt) in enumerate(sources):
        for offset, row in _scan_rows(path, fmt):
            idx = index_of.get((row.subject, row.path))
            if idx is None:
                dropped += 1
                continue
            if source_of[idx] >= 0:
                continue  # a duplicate (e.g. a batch both flushed and redone): the first one stands
            source_of[idx], offset_of[idx] = s, offset
            if row.score is not None:
                scores[idx] = row.score
                calibrated[idx] = np.nan if row.match is None else row.match
    if dropped:
        logger.warning("%d row(s) in the outputs are not part of this plan (files gone or renamed) and were dropped",
                       dropped)
    missing = np.flatnonzero(source_of < 0)
    if missing.size:
        first = plan.items[int(missing[0])]
        raise DatasetError(f"{missing.size} image(s) have no row after the run (first: {first.path}); run again with --resume")
    subject_ids = _subject_ids(plan)
    ranks = _ranks_within_subjects(subject_ids, scores)
    _write_final_rows(outputs, sources, source_of, offset_of, ranks)
    for path in outputs.shards():
        path.unlink()
    summaries = _subject_summaries(plan, subject_ids, scores, calibrated)
    from .embedding_cache import model_cache_identity

    from .calibration import calibration_for

    curve = calibration_for(model)
    _write_json_atomic(outputs.summary, {
        "model_identity": model_cache_identity(model), "aggregate": aggregate, "num_images": n,
        # the matches come from a curve fitted for this head (True) or the uncalibrated default
        "calibrated": curve.fitted, "calibration": curve.to_dict(),
        "num_scored": int(np.isfinite(scores).sum()), "num_errors": int((~np.isfinite(scores)).sum()),
        "subjects": summaries,
    })
    if outputs.dreambench is not None:
        _write_dreambench(plan, scores, outputs.dreambench)
    num_scored = int(np.isfinite(scores).sum())
    return ScoringResult(outputs, n, num_scored, n - num_scored, 0, summaries)


def _subject_ids(plan: ScoringPlan) -> np.ndarray:
    number = {s.name: i for i, s in enumerate(plan.subjects)}
    return np.array([number[it.subject] for it in plan.items], dtype=np.int32)


def _ranks_within_subjects(subject_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank 1 = highest score within each subject; ties keep plan order; errors get 0."""
    ranks = np.zeros(len(scores), dtype=np.int64)
    valid = np.isfinite(scores)
    for sid in np.unique(subject_ids):
        members = np.flatnonzero((subject_ids == sid) & valid)
        order = members[np.lexsort((members, -scores[members]))]
        ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _write_final_rows(outputs: OutputPaths, sources: list[tuple[Path, str]], source_of: np.ndarray,
                      offset_of: np.ndarray, ranks: np.ndarray) -> None:
    tmp = outputs.rows.with_name(outputs.rows.name + ".tmp")
    handles = [open(path, "rb") for path, _ in sources]
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as out:
            if outputs.fmt == "csv":
                out.write(_CSV_HEADER)
            for idx in range(len(source_of)):
                s = int(source_of[idx])
                handles[s].seek(int(offset_of[idx]))
                path, fmt = sources[s]
                row = decode_row(handles[s].readline().decode("utf-8"), fmt, f"{path} at byte {offset_of[idx]}")
                row.rank = int(ranks[idx]) or None
                out.write(encode_row(row, outputs.fmt))
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, outputs.rows)


def _subject_summaries(plan: ScoringPlan, subject_ids: np.ndarray, scores: np.ndarray,
                       calibrated: np.ndarray) -> dict[str, dict[str, Any]]:
    out = {}
    for sid, subject in enumerate(plan.subjects):
        members = np.flatnonzero(subject_ids == sid)
        valid = members[np.isfinite(scores[members])]
        entry: dict[str, Any] = {
            "references": [str(p) for p in subject.references],
            "num_images": int(members.size), "num_scored": int(valid.size),
            "num_errors": int(members.size - valid.size),
        }
        if valid.size:
            best = valid[np.lexsort((valid, -scores[valid]))[0]]
            entry.update(
                mean=float(scores[valid].mean()), median=float(np.median(scores[valid])),
                best=float(scores[best]), best_path=str(plan.items[int(best)].path),
                match_mean=float(calibrated[valid].mean()),
                match_median=float(np.median(calibrated[valid])),
                match_best=float(calibrated[best]),
            )
        else:
            entry.update(mean=None, median=None, best=None, best_path=None,
                         match_mean=None, match_median=None, match_best=None)
        out[subject.name] = entry
    return out


def _write_dreambench(plan: ScoringPlan, scores: np.ndarray, path: Path) -> None:
    """``{key: 100 * cosine}`` in plan order; images that could not be read are left out."""
    keys = plan.dreambench_keys()
    data = {key: _short_float(100.0 * scores[i]) for i, key in enumerate(keys) if np.isfinite(scores[i])}
    skipped = len(keys) - len(data)
    if skipped:
        logger.warning("DreamBench++ JSON %s leaves out %d image(s) that could not be read", path, skipped)
    _write_json_atomic(path, data)


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
