"""DreamBench++ human alignment (MH) of a metric's per-image scores.

PROTOCOL.md section 5: for each personalisation method, Pearson r between the metric's
per-image scores and each of the two human annotator groups, averaged ``(r1 + r2) / 2``;
then the Fisher-z mean over methods (clip 0.9999). A category is the set of items whose key
matches a regex at its start (``re.match``). The human-human ceiling is one Pearson r of
group 1 vs group 2 per method.

Ratings layout (a DreamBench++ ``ratings`` directory)::

    data_human_rating/merged_data/group1/<method>-cp.json
    data_human_rating/merged_data/group2/<method>-cp.json
    <metric directory>/<method>.json          (one per metric, e.g. data_dino_rating)

Each file is one JSON object mapping an item key to a score, in a fixed order (``X.json``, or
gzip-compressed ``X.json.gz``). Metric keys
end in ``_<index>`` where human keys do not, and DreamBench++ object 20 is ``rubik's_cube``
in some metric files but ``magic_cube`` in the human files; both are reconciled, then the
files are paired by position after checking that the keys agree item by item.

The published DreamBench++ rating files (human groups and the paper's metrics) ship with the
package, compressed: :func:`bundled_dreambench_ratings` is their ``ratings`` directory and the
default of every function here that takes one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import DatasetError, InvalidInputError
from .correlation import fisher_z_mean, pearson_r

__all__ = [
    "DEFAULT_CATEGORIES",
    "HUMAN_CEILING",
    "HUMAN_FISHER_CLIP",
    "HumanRatings",
    "alignment_to_dict",
    "bundled_dreambench_ratings",
    "category_alignment",
    "check_same_items",
    "discover_metric_dirs",
    "human_alignment",
    "load_human_ratings",
    "load_score_file",
    "normalize_metric_key",
    "parse_categories",
    "rating_file",
]

logger = logging.getLogger(__name__)

HUMAN_FISHER_CLIP = 0.9999
HUMAN_SUBDIR = Path("data_human_rating") / "merged_data"
# Pseudo metric name: annotator group 1 scored against group 2 (the human ceiling).
HUMAN_CEILING = "human"
DEFAULT_CATEGORIES: dict[str, str] = {
    "object": "object",
    "live_subject_animal": "live_subject_animal",
    "live_subject_human": "live_subject_human",
    "style": "style",
}

_TRAILING_INDEX = re.compile(r"_\d+$")
RATING_SUFFIXES = (".json", ".json.gz")


def bundled_dreambench_ratings() -> Path:
    """The published DreamBench++ ``ratings`` directory shipped inside the package
    (``comfy_nearid/data/dreambench_plus``; its README lists the files and the MH values they
    reproduce, PROVENANCE.md where they come from).

    Raises:
        DatasetError: the package was installed without its data files.
    """
    from importlib.resources import files

    root = Path(str(files("comfy_nearid").joinpath("data", "dreambench_plus", "ratings")))
    if not (root / HUMAN_SUBDIR).is_dir():
        raise DatasetError(
            f"the bundled DreamBench++ ratings are missing from this installation ({root}); "
            "reinstall comfy-nearid, or pass a ratings directory (--ratings)"
        )
    return root


def rating_file(directory: Path, stem: str) -> Path | None:
    """``directory/<stem>.json`` or its compressed twin ``<stem>.json.gz``, whichever exists."""
    for suffix in RATING_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def _stems(directory: Path, ending: str) -> list[str]:
    """Sorted stems (without ``ending``) of the rating files in ``directory`` named ``*<ending>.json[.gz]``."""
    stems = set()
    for suffix in RATING_SUFFIXES:
        tail = ending + suffix
        stems.update(p.name[: -len(tail)] for p in directory.glob(f"*{tail}"))
    return sorted(stems)


def normalize_metric_key(key: str) -> str:
    """Map a metric file's item key onto the human files' key.

    Drops the trailing ``_<index>`` and renames ``rubik's_cube`` to ``magic_cube``
    (``object_20_rubik's_cube-0_0`` -> ``object_20_magic_cube-0``).
    """
    return _TRAILING_INDEX.sub("", key).replace("rubik's_cube", "magic_cube")


def load_score_file(path: str | Path) -> dict[str, float]:
    """Read one ratings JSON (``{key: number}``; ``.json.gz`` is decompressed), keeping the
    file's item order.

    Raises:
        DatasetError: missing file, invalid JSON, not an object, or a non-numeric value
            (the message names the file and the key).
    """
    from ..fileio import read_json

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"ratings file not found: {path}")
    data = read_json(path, "ratings file")  # a .gz name is decompressed (the bundled files)
    if not isinstance(data, dict):
        raise DatasetError(f"ratings file {path} must hold a JSON object {{key: score}}, got {type(data).__name__}")
    scores: dict[str, float] = {}
    for key, value in data.items():
        # bool is an int subclass in Python; a true/false score is a format error here
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise DatasetError(f"ratings file {path}: item {key!r} has score {value!r}; a finite number is required")
        scores[key] = float(value)
    if not scores:
        raise DatasetError(f"ratings file {path} holds no items")
    return scores


def check_same_items(
    metric_keys: Sequence[str], human_keys: Sequence[str], metric_path: str | Path, human_path: str | Path
) -> None:
    """Refuse two rating files that do not list the same items in the same order.

    ``metric_keys`` are compared after :func:`normalize_metric_key`.

    Raises:
        DatasetError: lengths differ (both lengths named) or the first position where the
            keys diverge (both keys named).
    """
    if len(metric_keys) != len(human_keys):
        raise DatasetError(
            f"rating files have different lengths: {metric_path} has {len(metric_keys)} items, "
            f"{human_path} has {len(human_keys)}"
        )
    for position, (mk, hk) in enumerate(zip(metric_keys, human_keys)):
        if normalize_metric_key(mk) != hk:
            raise DatasetError(
                f"rating files diverge at item {position}: {metric_path} has {mk!r} "
                f"(reconciled {normalize_metric_key(mk)!r}), {human_path} has {hk!r}"
            )


@dataclass
class HumanRatings:
    """The two annotator groups' ratings, per method, in file order.

    Attributes:
        root: the ratings directory.
        methods: method names (file stems without ``-cp``), sorted.
        keys: the item keys (identical for every method and group).
        group1, group2: method -> ``[N]`` float64 scores aligned with ``keys``.
    """

    root: Path
    methods: list[str]
    keys: dict[str, list[str]] = field(default_factory=dict)
    group1: dict[str, np.ndarray] = field(default_factory=dict)
    group2: dict[str, np.ndarray] = field(default_factory=dict)


def load_human_ratings(root: str | Path | None = None) -> HumanRatings:
    """Load ``data_human_rating/merged_data/group{1,2}/<method>-cp.json`` under ``root``
    (``None``: the bundled published ratings, :func:`bundled_dreambench_ratings`).

    Raises:
        DatasetError: the layout is missing, the groups cover different methods, or a
            method's two group files list different items.
    """
    root = bundled_dreambench_ratings() if root is None else Path(root)
    dirs = [root / HUMAN_SUBDIR / "group1", root / HUMAN_SUBDIR / "group2"]
    for d in dirs:
        if not d.is_dir():
            raise DatasetError(
                f"human ratings directory not found: {d} (expected the DreamBench++ layout "
                f"<ratings>/{HUMAN_SUBDIR.as_posix()}/group1|group2/<method>-cp.json)"
            )
    methods_per_group = [_stems(d, "-cp") for d in dirs]
    if not methods_per_group[0]:
        raise DatasetError(f"no <method>-cp.json files in {dirs[0]}")
    if methods_per_group[0] != methods_per_group[1]:
        only1 = sorted(set(methods_per_group[0]) - set(methods_per_group[1]))
        only2 = sorted(set(methods_per_group[1]) - set(methods_per_group[0]))
        raise DatasetError(
            f"annotator groups cover different methods: only in {dirs[0]}: {only1}; only in {dirs[1]}: {only2}"
        )
    ratings = HumanRatings(root=root, methods=methods_per_group[0])
    for method in ratings.methods:
        p1, p2 = (rating_file(d, f"{method}-cp") for d in dirs)
        g1, g2 = load_score_file(p1), load_score_file(p2)
        check_same_items(list(g2), list(g1), p2, p1)
        ratings.keys[method] = list(g1)
        ratings.group1[method] = np.fromiter(g1.values(), dtype=np.float64, count=len(g1))
        ratings.group2[method] = np.fromiter(g2.values(), dtype=np.float64, count=len(g2))
    return ratings


def parse_categories(specs: Sequence[str] | None) -> dict[str, str]:
    """Category specs -> ``{name: regex}``.

    A spec is a known name (``object``, ``live_subject_animal``, ``live_subject_human``,
    ``style``, whose regex is the name itself), ``NAME=REGEX``, or a bare regex used as its
    own name. ``None``/empty -> ``{"object": "object"}`` (the paper's headline).
    """
    if not specs:
        return {"object": DEFAULT_CATEGORIES["object"]}
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, regex = spec.partition("=")
        if not sep:
            regex = DEFAULT_CATEGORIES.get(spec, spec)
        if not name or not regex:
            raise InvalidInputError(f"category spec {spec!r}: expected NAME, NAME=REGEX or REGEX")
        try:
            re.compile(regex)
        except re.error as e:
            raise InvalidInputError(f"category {name!r}: invalid regex {regex!r}: {e}") from e
        out[name] = regex
    return out


def _resolve_metric_dir(root: Path, metric: str) -> Path:
    """A metric directory: absolute, under the ratings ``root`` (e.g. ``data_nearid_rating``),
    or else relative to the working directory (the user's own scores)."""
    path = Path(metric)
    candidates = [path] if path.is_absolute() else [root / path, path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DatasetError(
        f"metric directory not found: {candidates[0]}" + (f" nor {Path.cwd() / path}" if len(candidates) > 1 else "")
        + f" (give a directory under {root}, one relative to the working directory, or an absolute path)"
    )


def _category_rows(keys: Sequence[str], regex: str, category: str, where: str) -> np.ndarray:
    pattern = re.compile(regex)
    rows = np.fromiter((pattern.match(k) is not None for k in keys), dtype=bool, count=len(keys))
    if rows.sum() < 2:
        raise DatasetError(
            f"category {category!r} (regex {regex!r}) matches {int(rows.sum())} item(s) of {where}; "
            "a correlation needs at least 2"
        )
    return rows


def category_alignment(
    ratings: HumanRatings, metric: str, categories: Mapping[str, str]
) -> dict[str, dict]:
    """MH of one metric directory (or :data:`HUMAN_CEILING`) for each category.

    Returns:
        ``{category: {"mh": float, "per_method": {method: {"r": ..., "r_group1": ...,
        "r_group2": ..., "n_items": int}}}}``; for the ceiling, ``r`` is the group 1 vs
        group 2 correlation and there is no per-group split.
    """
    scores: dict[str, np.ndarray] = {}
    if metric != HUMAN_CEILING:
        metric_dir = _resolve_metric_dir(ratings.root, metric)
        for method in ratings.methods:
            path = rating_file(metric_dir, method)
            if path is None:
                raise DatasetError(f"metric directory {metric_dir} has no file for method {method!r} ({method}.json)")
            loaded = load_score_file(path)
            human_path = rating_file(ratings.root / HUMAN_SUBDIR / "group1", f"{method}-cp")
            check_same_items(list(loaded), ratings.keys[method], path, human_path)
            scores[method] = np.fromiter(loaded.values(), dtype=np.float64, count=len(loaded))
    result: dict[str, dict] = {}
    for category, regex in categories.items():
        per_method: dict[str, dict] = {}
        for method in ratings.methods:
            rows = _category_rows(ratings.keys[method], regex, category, f"method {method!r}")
            g1, g2 = ratings.group1[method][rows], ratings.group2[method][rows]
            if metric == HUMAN_CEILING:
                r = pearson_r(g1, g2, what=f"human group1 vs group2, {method}, {category}")
                per_method[method] = {"r": r, "n_items": int(rows.sum())}
                continue
            s = scores[method][rows]
            r1 = pearson_r(s, g1, what=f"{metric} vs group1, {method}, {category}")
            r2 = pearson_r(s, g2, what=f"{metric} vs group2, {method}, {category}")
            per_method[method] = {"r": (r1 + r2) / 2.0, "r_group1": r1, "r_group2": r2, "n_items": int(rows.sum())}
        mh = fisher_z_mean([v["r"] for v in per_method.values()], clip=HUMAN_FISHER_CLIP)
        result[category] = {"mh": mh, "per_method": per_method}
    return result


def discover_metric_dirs(root: str | Path, methods: Sequence[str]) -> list[str]:
    """Directories under ``root`` (relative, sorted) that hold ``<method>.json`` for every method.

    The human-rating tree is skipped (its files are named ``<method>-cp.json``).
    """
    root = Path(root)
    found: list[str] = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        rel = d.relative_to(root)
        if rel.parts and rel.parts[0] == HUMAN_SUBDIR.parts[0]:
            continue
        if all(rating_file(d, m) is not None for m in methods):
            found.append(rel.as_posix())
    return found


def human_alignment(
    root: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    categories: Mapping[str, str] | None = None,
) -> dict[str, dict[str, dict]]:
    """MH of several metric directories over several categories.

    Args:
        root: the DreamBench++ ``ratings`` directory; ``None``: the bundled published one
            (:func:`bundled_dreambench_ratings`).
        metrics: metric directories (under ``root``, relative to the working directory, or absolute) or ``"human"`` for the
            ceiling; ``None`` = every directory :func:`discover_metric_dirs` finds.
        categories: ``{name: regex}``; ``None`` = object only.

    Returns:
        ``{metric: {category: {"mh": float, "per_method": {...}}}}``.
    """
    ratings = load_human_ratings(root)
    if not metrics:
        metrics = discover_metric_dirs(ratings.root, ratings.methods)
        if not metrics:
            raise DatasetError(f"no metric directory under {ratings.root} holds <method>.json for {ratings.methods}")
    categories = dict(categories) if categories else {"object": DEFAULT_CATEGORIES["object"]}
    out: dict[str, dict[str, dict]] = {}
    for metric in metrics:
        logger.info("human alignment of %s", metric)
        out[metric] = category_alignment(ratings, metric, categories)
    return out


def alignment_to_dict(result: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """JSON-safe copy of :func:`human_alignment` output (NaN r becomes null)."""

    def clean(value):
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not np.isfinite(value):
            return None
        return value

    return clean(result)
