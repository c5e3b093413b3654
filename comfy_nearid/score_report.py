"""Static HTML report of a scoring run: ranked contact sheets per subject and sweep comparison.

``write_score_report(rows_file, out_dir)`` writes ``out_dir/index.html`` (run, calibration,
per-subject table, sweep comparison) and one or more pages per subject (``PAGE_SIZE``
candidates each: the page for 10,000 images is paged and its images load lazily). Each
candidate card shows its thumbnail, rank, cosine (the row's ``score``) and its identity match
as a bar; the calibrated threshold (match 50, i.e. cosine = the calibration's midpoint) is
drawn across the sheet when the model's calibration was fitted, and the page says
"uncalibrated" when it is the documented default. Error rows are listed with their reasons.

Thumbnails (``thumbs/``, JPEG, at most ``THUMB_SIZE`` pixels a side) are written by a
:class:`ThumbnailSink` that the streaming scorer calls with the image it has just decoded, so
a report costs no second decode pass; ``nearid report`` on an existing rows file makes the
missing ones itself, one image at a time. No scripts, no external resources: it opens offline.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import ImageLoadError, InvalidInputError

if TYPE_CHECKING:
    from PIL import Image

    from .calibration import Calibration
    from .model import IdentityModel
    from .scoring.rows import ScoreRow

__all__ = [
    "PAGE_SIZE",
    "THUMB_SIZE",
    "ThumbnailSink",
    "bootstrap_interval",
    "group_of",
    "sweep_table",
    "thumbnail_name",
    "write_score_report",
]

logger = logging.getLogger(__name__)

THUMB_SIZE = 128  # pixels, longest side
PAGE_SIZE = 200  # candidates per subject page
THUMB_DIR = "thumbs"

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}h2{margin-top:2em;border-bottom:1px solid #ddd}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.card{width:140px;border:1px solid #ddd;padding:4px;font-size:11px}
.card img,.noimg{width:128px;height:128px;object-fit:contain;display:block;background:#f4f4f4}
.noimg{display:flex;align-items:center;justify-content:center;color:#888}
.bar{height:6px;background:#eee}.bar>div{height:6px;background:#4477aa}.below .bar>div{background:#cc6677}
.cut{flex-basis:100%;border-top:3px dashed #cc3311;color:#cc3311;font-weight:bold;padding:2px 0}
.path{overflow-wrap:anywhere;color:#555}.overlap{color:#b05000}.refs img{max-width:160px;margin:4px}
.nav a{margin-right:.6em}.note{color:#555}
"""


# ============================================================================ thumbnails
def thumbnail_name(path: str) -> str:
    """File name of an image's thumbnail: a hash of its path (rows name images by path)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:20] + ".jpg"


def _save_thumbnail(image: "Image.Image", target: Path, size: int) -> None:
    from PIL import ImageOps

    thumb = ImageOps.contain(image.convert("RGB"), (size, size))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    thumb.save(tmp, format="JPEG", quality=82)
    os.replace(tmp, target)  # a reader never sees half a file


class ThumbnailSink:
    """Writes a bounded JPEG thumbnail of each image the scorer decodes (thread-safe: one
    file per image, written atomically). ``image=None`` (an embedding-cache hit, no decode
    happened) decodes ``data`` only when the thumbnail does not exist yet."""

    def __init__(self, report_dir: str | Path, size: int = THUMB_SIZE) -> None:
        if size < 8:
            raise InvalidInputError(f"thumbnail size must be >= 8 pixels, got {size}")
        self.dir = Path(report_dir) / THUMB_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = size

    def path_for(self, image_path: str | Path) -> Path:
        return self.dir / thumbnail_name(str(image_path))

    def __call__(self, image_path: str | Path, image: "Image.Image | None", data: bytes | None = None) -> None:
        target = self.path_for(image_path)
        if image is None:
            if target.exists() or data is None:
                return
            from .images import load_image_bytes

            try:
                image = load_image_bytes(data, str(image_path))
            except ImageLoadError:
                return  # the scorer writes the error row
        try:
            _save_thumbnail(image, target, self.size)
        except OSError as e:
            logger.warning("cannot write thumbnail %s of %s: %s", target, image_path, e)

    def ensure(self, image_path: str | Path) -> bool:
        """Make the thumbnail of a file on disk if missing (``nearid report``); False if unreadable."""
        if self.path_for(image_path).exists():
            return True
        try:
            data = Path(image_path).read_bytes()
        except OSError:
            return False
        self(image_path, None, data)
        return self.path_for(image_path).exists()


# ============================================================================ statistics
def bootstrap_interval(
    values: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray], n_resamples: int = 1000,
    seed: int = 0, level: float = 0.95, chunk: int = 100,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` ``[N]``.

    ``statistic`` maps resamples ``[K, N]`` to ``[K]`` (e.g. ``lambda x: x.mean(axis=1)``).
    (:func:`comfy_nearid.metrics.ssr.bootstrap_ci` resamples margin tables for SSR/PA; a
    score's mean/median/share needs this plain resampling of one vector.)
    """
    if n_resamples < 1:
        raise InvalidInputError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise InvalidInputError(f"level must be in (0, 1), got {level}")
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InvalidInputError(f"bootstrap needs a non-empty [N] vector, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        draws.append(statistic(x[rng.integers(0, x.size, size=(k, x.size))]))  # [k, N] -> [k]
    stats = np.concatenate(draws)
    tail = 100.0 * (1.0 - level) / 2.0
    return float(np.percentile(stats, tail)), float(np.percentile(stats, 100.0 - tail))


NO_GROUP = "(none)"


def group_of(row_path: str, subject: str, group_by: str, labels: Mapping[str, str] | None = None) -> str:
    """The sweep group of a row: ``subject``; ``N`` = the name of the N-th folder above the
    image (1 = the folder holding it, 2 = its parent, ...); or a mapping column's value in the
    row's ``labels`` (see :func:`check_group_by`). A missing level or an empty value is ``(none)``."""
    if group_by == "subject":
        return subject
    if not group_by.isdigit():
        return (labels or {}).get(group_by) or NO_GROUP
    level = int(group_by)
    parents = Path(row_path).parents
    if level < 1 or level > len(parents) - 1:
        return NO_GROUP
    return parents[level - 1].name or NO_GROUP


def check_group_by(group_by: str | None, columns: Sequence[str] = ()) -> str | None:
    """``group_by`` when it is ``subject``, a folder level ``N >= 1`` or one of ``columns`` (the
    mapping file's extra columns that the rows carry, e.g. ``checkpoint``).

    Raises:
        InvalidInputError: anything else; the message lists the choices this run has.
    """
    if group_by is None:
        return None
    if group_by == "subject" or (group_by.isdigit() and int(group_by) >= 1) or group_by in columns:
        return group_by
    available = (f"the mapping columns of these rows: {', '.join(columns)}" if columns else
                 "these rows carry no mapping column (score with --mapping FILE whose extra columns, "
                 "e.g. checkpoint, label the images)")
    raise InvalidInputError(
        f"--group-by {group_by!r}: choose 'subject', a folder level >= 1 (1 = the folder holding each image) "
        f"or a mapping column; {available}"
    )


def _label_columns(rows: Sequence["ScoreRow"]) -> tuple[str, ...]:
    """The mapping columns the rows carry, in first-seen order."""
    return tuple(dict.fromkeys(name for r in rows for name in r.labels))


def sweep_table(
    groups: Mapping[str, np.ndarray], threshold: float, n_resamples: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per group: ``n``, ``mean``, ``median``, ``share`` (fraction of scores >= ``threshold``)
    each with a 95% bootstrap interval (``*_ci``), ranked by mean (best first); ``overlaps``
    lists the groups whose mean interval overlaps this one's (not separable at 95%)."""
    out = []
    for name, scores in groups.items():
        s = np.asarray(scores, dtype=np.float64)
        if s.size == 0:
            continue
        out.append({
            "group": name, "n": int(s.size), "mean": float(s.mean()), "median": float(np.median(s)),
            "share": float((s >= threshold).mean()),
            "mean_ci": bootstrap_interval(s, lambda x: x.mean(axis=1), n_resamples, seed),
            "median_ci": bootstrap_interval(s, lambda x: np.median(x, axis=1), n_resamples, seed),
            "share_ci": bootstrap_interval(s, lambda x: (x >= threshold).mean(axis=1), n_resamples, seed),
        })
    out.sort(key=lambda g: -g["mean"])
    for g in out:
        lo, hi = g["mean_ci"]
        g["overlaps"] = [o["group"] for o in out if o is not g and o["mean_ci"][0] <= hi and lo <= o["mean_ci"][1]]
    return out


def _sweep_plot(groups: Mapping[str, np.ndarray], order: Sequence[str], threshold: float, path: Path) -> None:
    """Box plot per group with every score as a jittered point; the threshold as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(order)), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    data = [np.asarray(groups[g], dtype=np.float64) for g in order]
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data, start=1):
        shown = d if d.size <= 2000 else rng.choice(d, 2000, replace=False)  # a bounded strip
        ax.scatter(i + rng.uniform(-0.18, 0.18, shown.size), shown, s=4, alpha=0.35, color="#4477aa")
    ax.axhline(threshold, color="#cc3311", linestyle="--", linewidth=1)
    ax.set_xticks(range(1, len(order) + 1))
    ax.set_xticklabels([g[:18] for g in order], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("cosine (score)")
    fig.tight_layout()
    fig.savefig(path, format="png")


# ============================================================================ html
@dataclass(frozen=True)
class _Cut:
    """Where the sheet is cut: the cosine at match 50 and whether it was fitted."""

    threshold: float
    calibrated: bool
    source: str


def _cut_for(calibration: "Calibration") -> _Cut:
    return _Cut(float(calibration.cosine_for(50.0)), calibration.fitted, calibration.source)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _page_name(index: int, page: int) -> str:
    return f"subject-{index:03d}-p{page:03d}.html"


def _doc(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def _card(row: "ScoreRow", cut: _Cut, thumbs: ThumbnailSink) -> str:
    thumb = thumbs.path_for(row.path)
    img = (f'<img src="{THUMB_DIR}/{thumb.name}" loading="lazy" width="128" height="128" alt="{_esc(Path(row.path).name)}">'
           if thumb.exists() else '<div class="noimg">no thumbnail</div>')
    match = row.match if row.match is not None else 0.0
    below = "below" if row.score is not None and row.score < cut.threshold else "above"
    return (f'<div class="card {below}" data-path="{_esc(row.path)}" data-rank="{row.rank if row.rank is not None else ""}" '
            f'data-score="{row.score!r}" data-calibrated="{row.match!r}">{img}'
            f'<div>#<span class="rank">{row.rank if row.rank is not None else "-"}</span> '
            f'cos <span class="score">{_num(row.score)}</span></div>'
            f'<div>match <span class="match">{_num(row.match, 1)}</span>{"" if cut.calibrated else " (uncal.)"}</div>'
            f'<div class="bar"><div style="width:{max(0.0, min(100.0, match)):.1f}%"></div></div>'
            f'<div class="path">{_esc(Path(row.path).name)}</div></div>')


def _sheet(rows: Sequence["ScoreRow"], cut: _Cut, thumbs: ThumbnailSink, previous: float | None) -> str:
    """The contact sheet of ranked rows; the cut line sits between the last row at/above the
    threshold and the first below it (also at a page's start when the previous page ended above)."""
    parts = []
    last = previous
    for row in rows:
        if cut.calibrated and row.score is not None and row.score < cut.threshold and (last is None or last >= cut.threshold):
            parts.append(f'<div class="cut">calibrated threshold: cosine {cut.threshold:.4f} (match 50)</div>')
        parts.append(_card(row, cut, thumbs))
        last = row.score
    return '<div class="sheet">' + "".join(parts) + "</div>"


def _nav(index: int, pages: int, current: int) -> str:
    links = ['<a href="index.html">index</a>']
    for p in range(pages):
        links.append(f"<b>{p + 1}</b>" if p == current else f'<a href="{_page_name(index, p)}">{p + 1}</a>')
    return '<p class="nav">' + "".join(links) + "</p>"


def _calibration_note(cut: _Cut) -> str:
    if cut.calibrated:
        return (f'<p>Calibration: fitted ({_esc(cut.source)}); the cut is at cosine {cut.threshold:.4f} '
                "(identity match 50).</p>")
    return (f'<p class="note">Uncalibrated: the identity match uses the documented default calibration, '
            f"not one fitted for this model, so no cut is drawn; shares below count cosine >= {cut.threshold:.4f} "
            "(match 50 under the default).</p>")


def _attention_overlay(model: "IdentityModel", path: str, size: int) -> "Image.Image":
    """The image at the model's input size with the head's attention ``[gh, gw]`` laid over it."""
    from PIL import Image

    from .images import load_image_bytes

    image = load_image_bytes(Path(path).read_bytes(), path).convert("RGB")
    spec = model.spec
    s, p = spec.image_size, spec.patch_size
    gh, gw = spec.grid_size
    attn = np.asarray(model.attention_map(image).float().cpu().numpy(), dtype=np.float64)
    attn = (attn - attn.min()) / max(float(attn.max() - attn.min()), 1e-12)
    base = image.resize((s, s), Image.Resampling.BICUBIC)
    heat = Image.fromarray((attn * 255).astype(np.uint8), mode="L").resize((gw * p, gh * p), Image.Resampling.BILINEAR)
    red = Image.new("RGB", (gw * p, gh * p), (255, 40, 0))
    overlay = base.copy()
    overlay.paste(Image.composite(red, base.crop((0, 0, gw * p, gh * p)), heat.point(lambda v: int(v * 0.6))), (0, 0))
    from PIL import ImageOps

    return ImageOps.contain(overlay, (size, size), Image.Resampling.BICUBIC)  # small model inputs are scaled up


def _heatmaps_html(model: "IdentityModel", ranked: Sequence["ScoreRow"], n: int, out_dir: Path, index: int) -> str:
    picks = [("top", r) for r in ranked[:n]] + [("bottom", r) for r in ranked[max(n, len(ranked) - n):]]
    if not picks:
        return ""
    heat_dir = out_dir / "heatmaps"
    heat_dir.mkdir(exist_ok=True)
    figs = []
    for which, row in picks:
        name = f"{index:03d}-{thumbnail_name(row.path)[:-4]}.png"
        try:
            _attention_overlay(model, row.path, 192).save(heat_dir / name)
        except (OSError, ImageLoadError) as e:
            logger.warning("no heat-map for %s: %s", row.path, e)
            continue
        figs.append(f'<figure style="display:inline-block;margin:4px"><img src="heatmaps/{name}" alt="attention">'
                    f"<figcaption>{which} #{row.rank}: {_num(row.score)}</figcaption></figure>")
    return "<h3>Where the head looks (attention, top and bottom)</h3>" + "".join(figs)


def _load_config(rows_file: Path) -> dict[str, Any]:
    stem = rows_file.with_suffix("") if rows_file.suffix else rows_file
    path = stem.with_name(stem.name + ".config.json")
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        logger.warning("cannot read %s (%s); the report has no references or calibration record", path, e)
        return {}


def write_score_report(
    rows_file: str | Path,
    out_dir: str | Path,
    *,
    group_by: str | None = None,
    page_size: int = PAGE_SIZE,
    thumbnail_size: int = THUMB_SIZE,
    heatmap_model: "IdentityModel | None" = None,
    heatmaps: int = 0,
    n_resamples: int = 1000,
) -> Path:
    """Write the HTML report of a rows file written by ``nearid score``; returns ``index.html``.

    The calibration and the references come from the run's ``<rows>.config.json`` beside the
    rows (without it: the default calibration, no references). Thumbnails already in
    ``out_dir/thumbs`` (made while scoring) are used; missing ones are made here.

    Args:
        rows_file: ``.csv``/``.jsonl`` rows.
        out_dir: report folder (created).
        group_by: sweep groups: ``subject``, a folder level or a mapping column the rows carry
            (see :func:`group_of`); None: no sweep section.
        page_size: candidates per subject page.
        heatmap_model: the model, for attention heat-maps of the top/bottom ``heatmaps`` per subject.
    """
    from .calibration import DEFAULT_CALIBRATION, Calibration
    from .scoring.rows import read_rows

    rows_file, out = Path(rows_file), Path(out_dir)
    if page_size < 1:
        raise InvalidInputError(f"page size must be >= 1, got {page_size}")
    if not rows_file.is_file():
        raise InvalidInputError(f"rows file {rows_file} does not exist")
    rows = read_rows(rows_file)
    group_by = check_group_by(group_by, _label_columns(rows))
    out.mkdir(parents=True, exist_ok=True)
    config = _load_config(rows_file)
    calibration = Calibration.from_dict(config["calibration"], str(rows_file)) if config.get("calibration") else DEFAULT_CALIBRATION
    cut = _cut_for(calibration)
    thumbs = ThumbnailSink(out, thumbnail_size)
    references = {s["name"]: s.get("references", []) for s in config.get("subjects", [])}

    by_subject: dict[str, list["ScoreRow"]] = {}
    for row in rows:
        by_subject.setdefault(row.subject, []).append(row)
    summary_rows = []
    for index, (subject, subject_rows) in enumerate(by_subject.items()):
        ranked = sorted((r for r in subject_rows if r.score is not None),
                        key=lambda r: (r.rank if r.rank is not None else 1 << 30, -r.score))
        errors = [r for r in subject_rows if r.score is None]
        for r in ranked:
            thumbs.ensure(r.path)
        ref_html = []
        for ref in references.get(subject, []):
            ok = thumbs.ensure(ref)
            ref_html.append(f'<img src="{THUMB_DIR}/{thumbnail_name(str(ref))}" alt="reference {_esc(Path(ref).name)}">'
                            if ok else f'<span class="noimg">{_esc(Path(ref).name)}</span>')
        pages = max(1, -(-len(ranked) // page_size))
        for page in range(pages):
            chunk = ranked[page * page_size : (page + 1) * page_size]
            previous = ranked[page * page_size - 1].score if page > 0 else None
            body = [f"<h1>{_esc(subject)}</h1>", _nav(index, pages, page), _calibration_note(cut)]
            if page == 0:
                body.append('<h2>References</h2><div class="refs">' + ("".join(ref_html) or
                            '<p class="note">no references recorded (no config file beside the rows)</p>') + "</div>")
                if heatmap_model is not None and heatmaps > 0:
                    body.append(_heatmaps_html(heatmap_model, ranked, heatmaps, out, index))
                if errors:
                    body.append(f"<h2>Unreadable images ({len(errors)})</h2>" + _table(
                        ["path", "reason"], [[_esc(r.path), _esc(r.error)] for r in errors], "errors"))
            body.append(f"<h2>Candidates {page * page_size + 1}-{page * page_size + len(chunk)} of {len(ranked)}, "
                        "best first</h2>")
            body.append(_sheet(chunk, cut, thumbs, previous))
            body.append(_nav(index, pages, page))
            (out / _page_name(index, page)).write_text(_doc(f"{subject}: page {page + 1}", "".join(body)), encoding="utf-8")
        scores = np.array([r.score for r in ranked], dtype=np.float64)
        summary_rows.append([
            f'<a href="{_page_name(index, 0)}">{_esc(subject)}</a>', str(len(ranked)), str(len(errors)),
            _num(float(scores.mean()) if scores.size else None), _num(float(np.median(scores)) if scores.size else None),
            _num(float(scores.max()) if scores.size else None),
            f"{(scores >= cut.threshold).mean():.3f}" if scores.size else "-",
        ])

    body = ["<h1>NearID scores</h1>",
            f"<p>Rows: {_esc(rows_file.name)}; {len(rows)} row(s), {sum(r.score is None for r in rows)} unreadable; "
            f"model: {_esc(config.get('model_identity', 'unknown'))}; aggregate: {_esc(config.get('aggregate', 'unknown'))}.</p>",
            _calibration_note(cut), "<h2>Subjects</h2>",
            _table(["subject", "images", "errors", "mean", "median", "best", "share &ge; cut"], summary_rows, "subjects")]
    if group_by is not None:
        body.append(_sweep_html(rows, group_by, cut, out, n_resamples))
    index_path = out / "index.html"
    index_path.write_text(_doc("NearID scores", "".join(body)), encoding="utf-8")
    logger.info("score report: %s (%d subject(s), %d row(s))", index_path, len(by_subject), len(rows))
    return index_path


def _table(head: list[str], rows: list[list[str]], css_id: str) -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{css_id}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def _ci(pair: tuple[float, float], digits: int = 4) -> str:
    return f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _sweep_html(rows: Sequence["ScoreRow"], group_by: str, cut: _Cut, out: Path, n_resamples: int) -> str:
    collected: dict[str, list[float]] = {}
    for r in rows:
        if r.score is not None:
            collected.setdefault(group_of(r.path, r.subject, group_by, r.labels), []).append(r.score)
    groups = {k: np.asarray(v, dtype=np.float64) for k, v in collected.items()}
    table = sweep_table(groups, cut.threshold, n_resamples=n_resamples)
    if not table:
        return "<h2>Sweep comparison</h2><p>No scored images.</p>"
    _sweep_plot(groups, [g["group"] for g in table], cut.threshold, out / "sweep.png")
    level = ("subject" if group_by == "subject" else f"folder level {group_by} above each image"
             if group_by.isdigit() else f"mapping column {group_by}")
    rows_html = [[
        f"{i}", _esc(g["group"]), str(g["n"]), f'{g["mean"]:.4f} {_ci(g["mean_ci"])}',
        f'{g["median"]:.4f} {_ci(g["median_ci"])}', f'{g["share"]:.3f} {_ci(g["share_ci"], 3)}',
        f'<span class="overlap">{_esc(", ".join(g["overlaps"]))}</span>' if g["overlaps"] else "separated",
    ] for i, g in enumerate(table, start=1)]
    return (f"<h2>Sweep comparison (groups: {_esc(level)})</h2>"
            "<p>Ranked by mean cosine; intervals are 95% percentile bootstrap intervals "
            f"({n_resamples} resamples). Groups whose mean intervals overlap are not separable at this size.</p>"
            + _table(["rank", "group", "images", "mean [95% CI]", "median [95% CI]",
                      f"share &ge; {cut.threshold:.3f} [95% CI]", "mean interval overlaps"], rows_html, "sweep")
            + '<p><img src="sweep.png" alt="scores per group"></p>')
