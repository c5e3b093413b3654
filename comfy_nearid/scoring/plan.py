"""Which generated image is scored against which references: discovery, mapping files and plans (no model).

Every problem a user can fix (missing reference, empty folder, unmatched folder) is raised
here, before any work.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


from ..errors import DatasetError, InvalidInputError
from ..fileio import regular_file_problem
from ..images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

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
    (metadata, captions); folders in ``exclude`` are not entered. Symbolic links to files and
    folders are followed (a link back to a folder being walked is a loop: reported, not
    entered); the paths returned are the paths as found under ``root``, not the link targets.
    An entry with an image extension that cannot be read (no image inside, a dangling link, a
    link loop, a FIFO) is kept: it becomes an error row, never a stopped run.
    """
    root = Path(root)
    if not root.is_dir():
        return [root]
    skip = {os.path.realpath(p) for p in exclude}
    found: list[tuple[tuple, Path]] = []

    def walk(folder: Path, relative: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            logger.warning("cannot list folder %s (%s); its images are not scored", folder, e.strerror or e)
            return
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            path = folder / name
            rel = f"{relative}{name}"
            if _is_folder(entry):
                real = os.path.realpath(path)
                if real in skip:
                    continue
                st = os.stat(path)
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    logger.warning("%s is a symbolic link to a folder that contains it (a loop); not entered", path)
                    continue
                walk(path, rel + "/", ancestors | {ident})
            elif is_image_file(path):
                if "\n" in name or "\r" in name:
                    raise DatasetError(f"{path!r}: file names with line breaks are not supported; rename the file")
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError as e:  # undecodable bytes in the name cannot go into the rows
                    raise DatasetError(f"{path!r}: the file name is not valid UTF-8; rename the file") from e
                found.append((natural_sort_key(rel), path))

    st = root.stat()
    walk(root, "", frozenset({(st.st_dev, st.st_ino)}))
    found.sort(key=lambda pair: pair[0])
    return [path for _, path in found]


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder or a link to one (a dangling or looping link is not a folder)."""
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _real(path: Path) -> Path:
    """The link-free absolute path (never raises for loops or dangling links)."""
    return Path(os.path.realpath(path))


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
    """One subject: its reference images and the folders (or files) of its generated images.

    ``labels``: empty, or one ``{column: value}`` per entry of ``generated`` (a mapping file's
    extra columns, e.g. ``{"checkpoint": "ckpt-100"}``); every image found there carries them."""

    name: str
    references: tuple[Path, ...]
    generated: tuple[Path, ...]
    exclude: tuple[Path, ...] = ()  # folders inside ``generated`` that belong to other subjects
    labels: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class ScoreItem:
    """One generated image scored for one subject; ``index`` is its position in the plan;
    ``labels``: its mapping file's extra columns (``{}`` without any)."""

    index: int
    subject: str
    path: Path
    key_path: str  # path relative to the plan's key root, '/'-separated
    labels: Mapping[str, str] = field(default_factory=dict)


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
    label_names: tuple[str, ...] = ()  # the mapping file's extra columns, in its order (every item has each)

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
            problem = regular_file_problem(ref)
            if problem is not None:
                raise DatasetError(f"subject {s.name!r}: reference image {ref}: {problem}")
    items: list[ScoreItem] = []
    roots: list[Path] = []
    per_subject: list[tuple[Subject, list[tuple[Path, Mapping[str, str]]]]] = []
    label_names = tuple(dict.fromkeys(name for s in subjects for labels in s.labels for name in labels))
    for s in subjects:
        if not s.generated:
            raise DatasetError(f"subject {s.name!r}: no folder of generated images given")
        if s.labels and len(s.labels) != len(s.generated):
            raise InvalidInputError(f"subject {s.name!r}: {len(s.labels)} label sets for {len(s.generated)} generated entries")
        paths: list[tuple[Path, Mapping[str, str]]] = []
        for g, gen in enumerate(s.generated):
            labels = {name: (s.labels[g].get(name, "") if s.labels else "") for name in label_names}
            if not gen.exists():
                raise DatasetError(f"subject {s.name!r}: generated folder {gen} does not exist")
            images = list_images(gen, exclude=s.exclude)
            if not images:
                raise DatasetError(
                    f"subject {s.name!r}: {gen} holds no image (looked recursively for "
                    f"{', '.join(IMAGE_EXTENSIONS)})"
                )
            paths.extend((image, labels) for image in images)
            absolute = Path(os.path.abspath(gen))  # links kept: keys are paths as found
            roots.append(absolute if gen.is_dir() else absolute.parent)
        # a path listed twice (overlapping folders) is scored once; two links to one file are two rows
        unique: dict[str, tuple[Path, Mapping[str, str]]] = {}
        for path, labels in paths:
            first = unique.setdefault(os.path.abspath(path), (path, labels))
            if first[1] != labels:
                raise DatasetError(
                    f"subject {s.name!r}: {path} lies in two generated folders with other labels "
                    f"({dict(first[1])} and {dict(labels)}); give each image one set of labels"
                )
        per_subject.append((s, list(unique.values())))
    key_root = Path(os.path.commonpath([str(r) for r in roots]))
    for s, paths in per_subject:
        for path, labels in paths:
            key_path = Path(os.path.abspath(path)).relative_to(key_root).as_posix()
            items.append(ScoreItem(len(items), s.name, path, key_path, labels))
    return ScoringPlan(tuple(subjects), tuple(items), key_root, label_names)


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


MAPPING_FIELDS = ("subject", "references", "generated")


def read_mapping(path: str | Path) -> list[Subject]:
    """Read a subject mapping file (paths in it are relative to the file's folder).

    - JSON: ``{"<subject>": {"references": PATHS, "generated": PATHS}, ...}`` or a list of
      ``{"subject": ..., "references": ..., "generated": ...}``; PATHS is a path or a list.
    - CSV: header ``subject,references,generated``; several paths in a cell are separated by
      ``;``; rows naming the same subject are merged.

    Any further column (``checkpoint``, ``method``, ``prompt_set``, ...) labels the generated
    images of its line: it becomes a column of the rows (see
    :func:`~comfy_nearid.scoring.rows.check_label_columns` for the names allowed) and a
    ``--group-by`` choice of the report.

    Raises:
        DatasetError: unreadable file, unknown format, missing fields, a column name that
            clashes with the rows' columns, one generated folder given two labels.
    """
    from ..fileio import read_mapping_records
    from .rows import check_label_columns

    path = Path(path)
    records, label_names = read_mapping_records(path, key="subject", path_fields=MAPPING_FIELDS[1:], extra="keep")
    check_label_columns(label_names, f"mapping file {path}")
    merged: dict[str, tuple[list[Path], dict[Path, tuple[dict[str, str], str]]]] = {}
    for rec in records:
        refs, gens = merged.setdefault(rec.name, ([], {}))
        refs.extend(rec.paths["references"])
        for gen in rec.paths["generated"]:
            labels = dict(rec.extra)
            if gen in gens and gens[gen][0] != labels:
                raise DatasetError(
                    f"{rec.where}: subject {rec.name!r}, generated {gen} is also listed at {gens[gen][1]} "
                    f"with other labels ({gens[gen][0]} there, {labels} here); give each folder one set of labels"
                )
            gens.setdefault(gen, (labels, rec.where))
    return [
        Subject(name, expand_references(refs, name), tuple(gens),
                labels=tuple(labels for labels, _ in gens.values()) if label_names else ())
        for name, (refs, gens) in merged.items()
    ]


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
    subject_refs = reference_subjects_in(ref_root)
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
    all_folders = [_real(f) for folders in matched.values() for f in folders]
    subjects = []
    for name in sorted(matched, key=natural_sort_key):
        own = {_real(f) for f in matched[name]}
        nested = tuple(f for f in all_folders if f not in own and any(o in f.parents for o in own))
        subjects.append(Subject(name, subject_refs[name], tuple(matched[name]), exclude=nested))
    skipped = sorted(set(subject_refs) - set(matched), key=natural_sort_key)
    if skipped:
        logger.warning("%d reference subject(s) have no generated folder and are skipped: %s",
                       len(skipped), _preview(skipped))
    return build_plan(subjects)


def reference_subjects_in(ref_root: Path) -> dict[str, tuple[Path, ...]]:
    """Subject name (folder path relative to ``ref_root``) -> its reference images, for every
    folder under ``ref_root`` that directly holds images.

    Raises:
        DatasetError: ``ref_root`` is missing, holds images directly, or holds no subject.
    """
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
    return subject_refs


def _match_subject_folders(gen_root: Path, subject_refs: dict[str, tuple[Path, ...]]) -> dict[str, Path]:
    found = {}
    for name in subject_refs:
        for candidate in (gen_root / name, gen_root / name.replace("/", "_")):
            if candidate.is_dir():
                found[name] = candidate
                break
    return found


def _check_all_images_covered(gen_root: Path, folders: list[Path]) -> None:
    covered = [Path(os.path.abspath(f)) for f in folders]
    stray = [p for p in list_images(gen_root)
             if not any(c in Path(os.path.abspath(p)).parents for c in covered)]
    if stray:
        raise DatasetError(
            f"{len(stray)} image(s) in {gen_root} are not in a folder named after a reference subject: "
            f"{_preview([str(p) for p in stray])}"
        )


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


