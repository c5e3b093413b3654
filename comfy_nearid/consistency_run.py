"""`nearid consistency` on folders: sets -> embeddings (cached) -> :mod:`.consistency` -> files.

One set at a time: its images are embedded in chunks of ``batch_size`` through the same
embedding cache as ``nearid score`` (:func:`~comfy_nearid.embedding_cache.cached_embed`), so
memory holds one chunk of pixels plus the set's ``[N, D]`` embeddings and ``[N, N]`` matrix.
When a set is finished its rows are appended to the rows file, then one line (the set's
summary and matrix) to the journal ``<output>.sets.jsonl``, both flushed: a re-run with
``resume`` skips the sets in the journal (and drops rows of a set cut off mid-write). The
summary JSON and the HTML page are written at the end from the journal, one set at a time.

Files (``-o scores.csv``): ``scores.csv`` rows, ``scores.summary.json``, ``scores.config.json``,
``scores.sets.jsonl`` (journal), ``scores.html``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .consistency import DEFAULT_OUTLIER_Z, SetConsistency, describe_groups, head_calibration, set_consistency
from .errors import ConfigError, DatasetError, ImageLoadError, InvalidInputError
from .fileio import atomic_write_json, read_mapping_records
from .scoring.plan import list_images
from .scoring.rows import OUTPUT_FORMATS, format_from_suffix, short_float

if TYPE_CHECKING:
    from .embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)

#: ``--scorer`` default: the model given by ``--head``/``--backbone``/``--readout``.
DEFAULT_SCORER = "head"
ROW_FIELDS = ("set", "index", "path", "mean_to_others", "to_medoid", "medoid", "outlier", "group", "error")


# ============================================================================ sets
@dataclass(frozen=True)
class ImageSet:
    """One set: a name and its image files (in the order their indices refer to)."""

    name: str
    paths: tuple[Path, ...]


def _expand(entries: Sequence[str | Path], name: str) -> tuple[Path, ...]:
    out: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if not path.exists():
            raise DatasetError(f"set {name!r}: {path} does not exist")
        out.extend(list_images(path))
    if not out:
        raise DatasetError(f"set {name!r}: no image found in {', '.join(str(e) for e in entries)}")
    return tuple(dict.fromkeys(out))


def sets_from_folders(folders: Sequence[str | Path]) -> list[ImageSet]:
    """Each folder (searched recursively) is one set named after the folder."""
    if not folders:
        raise InvalidInputError("give at least one folder (each folder is one set) or --mapping")
    sets, seen = [], {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"{folder} is not a folder; each positional argument is a folder of one set")
        name = folder.resolve().name or str(folder)
        if name in seen:
            raise DatasetError(f"two sets are named {name!r} ({seen[name]} and {folder}); use --mapping to name them")
        seen[name] = folder
        sets.append(ImageSet(name, _expand([folder], name)))
    return sets


def sets_from_mapping(path: str | Path) -> list[ImageSet]:
    """Many sets from a mapping file (paths relative to the file's folder; folders expanded;
    read by :func:`~comfy_nearid.fileio.read_mapping_records`).

    - JSON: ``{"<set>": PATHS, ...}`` or ``[{"set": ..., "images": PATHS}, ...]``.
    - CSV: header ``set,images``; several paths in a cell separated by ``;``; rows naming the
      same set are merged.
    """
    records, _ = read_mapping_records(path, key="set", path_fields=("images",), extra="refuse")
    merged: dict[str, list[Path]] = {}
    for rec in records:
        merged.setdefault(rec.name, []).extend(rec.paths["images"])
    return [ImageSet(name, _expand(paths, name)) for name, paths in merged.items()]


# ============================================================================ outputs
@dataclass(frozen=True)
class ConsistencyOutputs:
    """Every file a run writes, beside the rows file."""

    rows: Path
    fmt: str
    summary: Path
    config: Path
    journal: Path
    html: Path | None

    @classmethod
    def for_rows(cls, rows: str | Path, fmt: str | None = None, html: bool | str | Path = True) -> "ConsistencyOutputs":
        rows = Path(rows)
        fmt = fmt or format_from_suffix(rows)
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInputError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        stem = rows.with_suffix("") if rows.suffix else rows
        side = lambda suffix: stem.with_name(stem.name + suffix)  # noqa: E731
        html_path = side(".html") if html is True else (Path(html) if html else None)
        return cls(rows, fmt, side(".summary.json"), side(".config.json"), side(".sets.jsonl"), html_path)

    def all(self) -> list[Path]:
        return [p for p in (self.rows, self.summary, self.config, self.journal, self.html) if p is not None]

    def check_writable(self) -> None:
        """Refuse an output this process cannot write, before any model work."""
        from .fileio import check_writable

        for path, what in ((self.rows, "output"), (self.summary, "summary output"), (self.config, "config output"),
                           (self.journal, "journal output"), (self.html, "HTML output")):
            if path is not None:
                check_writable(path, what)


def encode_rows(name: str, paths: Sequence[Path], result: SetConsistency | None, index_of: Sequence[int],
                errors: dict[int, str], fmt: str) -> str:
    """The rows of one set (every image, in set order; unreadable images carry ``error``)."""
    records = []
    position = {i: k for k, i in enumerate(index_of)}
    outliers = set(result.outliers) if result is not None else set()
    for i, path in enumerate(paths):
        rec: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
        rec.update(set=name, index=i, path=str(path))
        if i in errors:
            rec["error"] = errors[i]
        else:
            k = position[i]
            rec.update(mean_to_others=short_float(result.mean_to_others[k]), to_medoid=short_float(result.to_medoid[k]),
                       medoid=k == result.medoid, outlier=k in outliers, group=int(result.groups[k]))
        records.append(rec)
    return "".join(_encode_record(r, fmt) for r in records)


def read_rows(path: str | Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """Rows back as dicts (CSV values parsed to the JSONL types)."""
    path = Path(path)
    fmt = fmt or format_from_suffix(path)
    text = path.read_text(encoding="utf-8")
    if fmt == "jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for rec in csv.DictReader(io.StringIO(text)):
        parsed: dict[str, Any] = {"set": rec["set"], "index": int(rec["index"]), "path": rec["path"]}
        for key in ("mean_to_others", "to_medoid"):
            parsed[key] = float(rec[key]) if rec[key] else None
        for key in ("medoid", "outlier"):
            parsed[key] = {"true": True, "false": False}.get(rec[key])
        parsed["group"] = int(rec["group"]) if rec["group"] else None
        parsed["error"] = rec["error"] or None
        out.append(parsed)
    return out


def _journal_records(path: Path) -> Iterator[dict[str, Any]]:
    """Finished sets in the journal; a last line cut off by a crash is ignored."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            yield json.loads(line)


# ============================================================================ the run
def embed_set(model: Any, paths: Sequence[Path], cache: "EmbeddingCache | None", batch_size: int
              ) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """Embeddings of the readable images ``[M, D]``, their set indices, and ``{index: error}``
    for the others. Chunks of ``batch_size`` go through the cache; a chunk with an unreadable
    image is retried one image at a time to find it."""
    from .embedding_cache import cached_embed

    vectors: list[np.ndarray] = []
    index_of: list[int] = []
    errors: dict[int, str] = {}
    for start in range(0, len(paths), batch_size):
        chunk = list(range(start, min(start + batch_size, len(paths))))
        try:
            emb = cached_embed(model, [paths[i] for i in chunk], cache, batch_size=batch_size)
            vectors.extend(emb.numpy())
            index_of.extend(chunk)
        except ImageLoadError:
            for i in chunk:
                try:
                    vectors.extend(cached_embed(model, [paths[i]], cache, batch_size=1).numpy())
                    index_of.append(i)
                except ImageLoadError as e:
                    errors[i] = e.reason if hasattr(e, "reason") else str(e)
    emb = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return emb, index_of, errors


@dataclass(frozen=True)
class ConsistencyOptions:
    threshold: float | None = None  # explicit cosine; None = calibrated 50 or robust z
    outlier_z: float = DEFAULT_OUTLIER_Z
    batch_size: int = 32
    thumb_size: int = 96
    html_max_images: int = 200

    def __post_init__(self) -> None:
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise InvalidInputError(f"threshold must be a cosine in [-1, 1], got {self.threshold!r}")
        if not (math.isfinite(self.outlier_z) and self.outlier_z > 0):
            raise InvalidInputError(f"outlier_z must be a positive number, got {self.outlier_z!r}")
        for name in ("batch_size", "thumb_size", "html_max_images"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")


def _resolved_config(model: Any, sets: Sequence[ImageSet], outputs: ConsistencyOutputs, options: ConsistencyOptions,
                     scorer: str, extra: dict[str, Any] | None) -> dict[str, Any]:
    from . import __version__
    from .embedding_cache import model_cache_identity

    calibration = head_calibration(model)
    return {
        "command": "consistency",
        "library_version": __version__,
        "scorer": scorer,
        "model_identity": model_cache_identity(model),
        "calibration": None if calibration is None else calibration.to_dict(),
        "threshold": options.threshold,
        "outlier_z": options.outlier_z,
        "format": outputs.fmt,
        "batch_size": options.batch_size,
        "num_sets": len(sets),
        "num_images": sum(len(s.paths) for s in sets),
        "sets": [{"name": s.name, "num_images": len(s.paths)} for s in sets],
        **(extra or {}),
    }


def _prepare_outputs(outputs: ConsistencyOutputs, config: dict[str, Any], resume: bool, overwrite: bool) -> set[str]:
    """Check/clear the outputs; returns the names of sets already finished (``resume``)."""
    if resume and overwrite:
        raise InvalidInputError("resume and overwrite exclude each other")
    existing = [p for p in outputs.all() if p.exists()]
    if existing and not (resume or overwrite):
        raise InvalidInputError(f"output {existing[0]} already exists; pass --overwrite to replace it or --resume to continue it")
    if overwrite:
        for p in existing:
            p.unlink()
    done: set[str] = set()
    if resume and existing and not outputs.config.exists():
        raise ConfigError(f"cannot resume {outputs.rows}: its settings file {outputs.config} is missing; use --overwrite")
    if resume and outputs.config.exists():
        from .fileio import read_json

        previous = read_json(outputs.config, "cannot resume: settings file", ConfigError)
        if not isinstance(previous, dict):
            raise ConfigError(f"cannot resume: settings file {outputs.config} is not a JSON object; use --overwrite")
        # the scorer first: another scorer also changes the model identity, and its name says more
        for name in ("scorer", "model_identity", "calibration", "threshold", "outlier_z", "format"):
            written = previous.get(name, DEFAULT_SCORER if name == "scorer" else None)  # runs before --scorer: head
            if written != config[name]:
                raise ConfigError(f"cannot resume {outputs.rows}: it was written with {name}={written!r}, "
                                  f"this run uses {config[name]!r}; use the same settings or --overwrite")
        done = {rec["set"] for rec in _journal_records(outputs.journal)}
        _keep_rows_of(outputs, done)
        _keep_journal_lines(outputs.journal)
    return done


def _keep_rows_of(outputs: ConsistencyOutputs, done: set[str]) -> None:
    """Drop rows of sets not in the journal (a set cut off between its rows and its journal line)."""
    if not outputs.rows.exists():
        return
    rows = [r for r in read_rows(outputs.rows, outputs.fmt) if r["set"] in done]
    tmp = outputs.rows.with_name(outputs.rows.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if outputs.fmt == "csv":
            f.write(",".join(ROW_FIELDS) + "\n")
        for r in rows:
            f.write(_encode_record(r, outputs.fmt))
    os.replace(tmp, outputs.rows)


def _encode_record(rec: dict[str, Any], fmt: str) -> str:
    if fmt == "jsonl":
        return json.dumps(rec, ensure_ascii=False) + "\n"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["" if rec[k] is None else (str(rec[k]).lower() if isinstance(rec[k], bool) else rec[k]) for k in ROW_FIELDS])
    return buf.getvalue()


def _keep_journal_lines(journal: Path) -> None:
    """Cut a half-written last line off the journal."""
    if journal.exists():
        data = journal.read_bytes()
        if data and not data.endswith(b"\n"):
            journal.write_bytes(data[: data.rfind(b"\n") + 1])


def consistency_run(
    model: Any,
    sets: Sequence[ImageSet],
    outputs: ConsistencyOutputs,
    *,
    options: ConsistencyOptions = ConsistencyOptions(),
    cache: "EmbeddingCache | None" = None,
    resume: bool = False,
    overwrite: bool = False,
    run_config: dict[str, Any] | None = None,
    scorer: str = DEFAULT_SCORER,
) -> dict[str, Any]:
    """Score the consistency of every set and write rows, journal, summary and HTML.

    ``model`` embeds the images (any :class:`~comfy_nearid.model.IdentityModel`: a NearID head
    or a baseline from :func:`~comfy_nearid.evaluate.scorers.scorer_model`); ``scorer`` is the
    spec that built it, recorded in the config and summary (``resume`` refuses another). The
    calibrated match and threshold come from the model's own fitted curve, so a baseline
    (no curve) uses the robust rule. Returns the summary (also written to ``outputs.summary``).
    """
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise DatasetError(f"set names must be distinct, got {names}")
    config = _resolved_config(model, sets, outputs, options, scorer, run_config)
    done = _prepare_outputs(outputs, config, resume, overwrite)
    atomic_write_json(outputs.config, config)
    calibration = head_calibration(model)
    new_rows_file = not outputs.rows.exists()
    outputs.rows.parent.mkdir(parents=True, exist_ok=True)
    with open(outputs.rows, "a", encoding="utf-8", newline="") as rows_out, \
            open(outputs.journal, "a", encoding="utf-8") as journal_out:
        if new_rows_file and outputs.fmt == "csv":
            rows_out.write(",".join(ROW_FIELDS) + "\n")
        for image_set in sets:
            if image_set.name in done:
                continue
            emb, index_of, errors = embed_set(model, image_set.paths, cache, options.batch_size)
            result = set_consistency(emb, calibration, options.threshold, options.outlier_z) if index_of else None
            rows_out.write(encode_rows(image_set.name, image_set.paths, result, index_of, errors, outputs.fmt))
            rows_out.flush()
            journal_out.write(json.dumps(_journal_record(image_set, result, index_of, errors)) + "\n")
            journal_out.flush()
            logger.info("set %s: %s", image_set.name, "no readable image" if result is None else result.describe())
    summary = _summary(outputs, config)
    atomic_write_json(outputs.summary, summary)
    if outputs.html is not None:
        from .consistency_report import write_consistency_html

        write_consistency_html(outputs.html, _journal_records(outputs.journal), options.thumb_size, options.html_max_images)
    return summary


def _journal_record(image_set: ImageSet, result: SetConsistency | None, index_of: list[int],
                    errors: dict[int, str]) -> dict[str, Any]:
    """One finished set: its summary with image indices of the set (not of the readable subset)."""
    rec: dict[str, Any] = {"set": image_set.name, "paths": [str(p) for p in image_set.paths],
                           "errors": {str(i): e for i, e in errors.items()}}
    if result is None:
        rec.update(num_images=len(image_set.paths), readable=[], matrix=[], description="no readable image")
        return rec
    summary = result.summary()
    summary["num_images"] = len(image_set.paths)
    summary["medoid"] = index_of[result.medoid]
    summary["outliers"] = [index_of[k] for k in result.outliers]
    groups: list[int | None] = [None] * len(image_set.paths)
    for k, g in enumerate(result.groups):
        groups[index_of[k]] = int(g)
    summary["groups"] = groups
    summary["description"] = describe_groups(groups)
    rec.update(summary)
    rec["readable"] = list(index_of)
    rec["matrix"] = [[short_float(v) for v in row] for row in result.matrix]
    return rec


def _summary(outputs: ConsistencyOutputs, config: dict[str, Any]) -> dict[str, Any]:
    sets = {}
    num_errors = 0
    for rec in _journal_records(outputs.journal):
        num_errors += len(rec["errors"])
        sets[rec["set"]] = {k: v for k, v in rec.items() if k not in ("set", "matrix", "paths", "readable")}
    return {
        "num_sets": len(sets),
        "num_images": sum(s["num_images"] for s in sets.values()),
        "num_errors": num_errors,
        "num_inconsistent_sets": sum(1 for s in sets.values() if s.get("num_groups", 1) > 1 or s.get("outliers")),
        "scorer": config["scorer"],
        "calibration": config["calibration"],
        "outputs": {k: None if v is None else str(v) for k, v in
                    (("rows", outputs.rows), ("journal", outputs.journal), ("html", outputs.html))},
        "sets": sets,
    }
