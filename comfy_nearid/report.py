"""Static HTML report of an evaluation: summary table, margin histograms, worst failures.

``write_report(out_dir, results, dataset)`` writes ``out_dir/index.html`` and PNG files
beside it (no scripts, no external resources: it opens offline). For each scorer the
gallery shows the samples whose worst margin is the most negative: the anchor view, the
other view of the same object and the anchor's near-identity distractor (same background)
that beat it, with both similarities, so a reader sees where a scorer took context for
identity. Images come from the results' own tables (model path) or, for CSV results, from
``dataset`` matched by sample id; without either the gallery lists ids and numbers only.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .errors import InvalidInputError
from .metrics.ssr import MARGIN_SLOTS

if TYPE_CHECKING:
    from .data.sample import Sample
    from .evaluate import EvalResult

__all__ = ["failure_cases", "margin_histogram", "write_report"]

logger = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}h2{margin-top:2em;border-bottom:1px solid #ddd}
.case{display:inline-block;border:1px solid #ddd;margin:6px;padding:6px;vertical-align:top;font-size:12px}
.case figure{display:inline-block;margin:2px;text-align:center}.case img{display:block;max-width:160px}
.bad{color:#b00}.noimg{width:120px;height:120px;background:#eee;display:flex;align-items:center;justify-content:center}
"""


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_" else "_" for c in text)
    return f"{keep[:40]}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def margin_histogram(result: "EvalResult", path: Path, bins: int = 40) -> Path:
    """PNG histogram of every valid margin of ``result`` (0 marked: right of it = a win)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # object API: no pyplot global state

    margins = result.table.margins()
    values = margins[np.isfinite(margins)]
    fig = Figure(figsize=(5.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if values.size:
        # the bins span 0 too, so wins and losses sit on one scale
        span = (min(float(values.min()), 0.0), max(float(values.max()), 0.0))
        ax.hist(values, bins=bins, range=span if span[0] < span[1] else None, color="#4477aa", edgecolor="white")
    ax.axvline(0.0, color="#cc3311", linewidth=1.5)
    ax.set_xlabel("margin s(view, other view) - s(view, its distractor)")
    ax.set_ylabel("margins")
    ax.set_title(f"{result.name} ({result.benchmark}): SSR {result.summary['ssr']:.1f}%, PA {result.summary['pa']:.1f}%",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def failure_cases(result: "EvalResult", k: int = 8) -> list[dict[str, Any]]:
    """The ``k`` rows whose worst valid margin is the most negative (losing margins only).

    Each case: ``row``, ``id``, ``source``, ``anchor``/``other`` view indices (0-based),
    ``s_views`` = s(anchor, other), ``s_distractor`` = s(anchor, its distractor), ``margin``.
    """
    margins = result.table.margins()
    filled = np.where(np.isnan(margins), np.inf, margins)
    worst_slot = filled.argmin(axis=1)
    worst = filled[np.arange(len(filled)), worst_slot]
    order = [int(r) for r in np.argsort(worst, kind="stable") if worst[r] <= 0.0][:k]
    cases = []
    for r in order:
        a, b = MARGIN_SLOTS[int(worst_slot[r])]
        cases.append({
            "row": r, "id": result.table.ids[r], "source": result.table.sources[r], "anchor": a, "other": b,
            "s_views": float(result.table.view_sims[r, a, b]),
            "s_distractor": float(result.table.cross_sims[r, a, a]),
            "margin": float(worst[r]),
        })
    return cases


def _refs_for(result: "EvalResult", case: dict[str, Any], samples: dict[str, "Sample"]) -> list[Any]:
    """(anchor view, other view, anchor's distractor) ImageRefs, None where unknown."""
    a, b = case["anchor"], case["other"]
    images = result.table.images
    if images is not None:
        entry = images[case["row"]]
        return [entry["views"][a], entry["views"][b], entry["distractors"][a]]
    sample = samples.get(case["id"])
    if sample is None:
        return [None, None, None]
    views = list(sample.views) + [None] * 3
    dists = list(sample.distractors.get(case["source"], [])) + [None] * 3
    return [views[a], views[b], dists[a]]


def _thumbnail(ref: Any, img_dir: Path, size: int) -> str | None:
    """Save a PNG thumbnail of an ImageRef once (by content key); returns its relative path."""
    if ref is None:
        return None
    name = f"{ref.key[:16]}.png"
    path = img_dir / name
    if not path.exists():
        image = ref.load().convert("RGB")
        image.thumbnail((size, size))
        image.save(path, format="PNG")
    return f"{img_dir.name}/{name}"


def _summary_html(results: Sequence["EvalResult"]) -> str:
    head = ["scorer", "benchmark", "SSR %", "PA %", "PA (ref.) %", "SSR 95% CI", "samples", "trials", "MO", "MOpair"]
    rows = []
    for r in results:
        s = r.summary
        ci = s.get("ci95", {}).get("ssr")
        cells = [r.name, r.benchmark, f"{s['ssr']:.2f}", f"{s['pa']:.2f}", f"{s['pa_reference']:.2f}",
                 f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-", str(s["n_samples"]), str(s["n_trials"]),
                 _corr(s.get("mo")), _corr(s.get("mopair"))]
        rows.append(cells)
    return _html_table(head, rows)


def _breakdown_html(results: Sequence["EvalResult"], key: str) -> str:
    labels = list(dict.fromkeys(label for r in results for label in r.summary.get(key, {})))
    if len(labels) < 2:
        return ""
    rows = []
    for r in results:
        cells = [f"{r.name} ({r.benchmark})"]
        for label in labels:
            g = r.summary.get(key, {}).get(label)
            cells.append("-" if not g or g["ssr"] is None else f"{g['ssr']:.1f} / {g['pa']:.1f} (n={g['n_samples']})")
        rows.append(cells)
    title = "distractor source" if key == "by_source" else "category"
    return f"<h3>SSR / PA by {title}</h3>" + _html_table(["scorer"] + labels, rows)


def _corr(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _figure(src: str | None, caption: str) -> str:
    inner = f'<img src="{html.escape(src)}" alt="{html.escape(caption)}">' if src else '<div class="noimg">no image</div>'
    return f"<figure>{inner}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _gallery_html(result: "EvalResult", samples: dict[str, "Sample"], img_dir: Path, k: int, size: int) -> str:
    cases = failure_cases(result, k)
    if not cases:
        return "<p>No losing margin: every distractor ranked below the other view.</p>"
    parts = []
    for case in cases:
        refs = _refs_for(result, case, samples)
        srcs = [_thumbnail(ref, img_dir, size) for ref in refs]
        a, b = case["anchor"] + 1, case["other"] + 1
        figs = (_figure(srcs[0], f"view {a}") + _figure(srcs[1], f"view {b}: s = {case['s_views']:.3f}")
                + _figure(srcs[2], f"distractor {a}: s = {case['s_distractor']:.3f}"))
        parts.append(
            f'<div class="case"><div><b>{html.escape(case["id"])}</b> ({html.escape(case["source"])}) '
            f'<span class="bad">margin {case["margin"]:+.3f}</span></div>{figs}</div>'
        )
    return "".join(parts)


def write_report(
    out_dir: str | Path,
    results: Sequence["EvalResult"],
    dataset: Iterable["Sample"] | None = None,
    *,
    n_failures: int = 8,
    thumb_size: int = 160,
    title: str = "NearID evaluation",
    extra_sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write ``out_dir/index.html`` (+ PNGs) for ``results``; returns the HTML path.

    Args:
        out_dir: directory to create or fill.
        results: :class:`~comfy_nearid.evaluate.EvalResult` list (one per scorer/benchmark).
        dataset: samples used to find images for results that carry none (CSV results).
        n_failures: failure cases per scorer.
        thumb_size: longest side of gallery thumbnails, pixels.
        extra_sections: ``(heading, html)`` pairs placed after the summary tables (e.g. the
            demo's attention heat-maps). The heading is escaped; ``html`` is inserted as it is
            (the caller builds it), and its image paths are relative to ``out_dir``.
    """
    results = list(results)
    if not results:
        raise InvalidInputError("write_report needs at least one result")
    out = Path(out_dir)
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    samples = {s.id: s for s in dataset} if dataset is not None else {}
    sections = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", _summary_html(results),
                _breakdown_html(results, "by_source"), _breakdown_html(results, "by_category")]
    for heading, body in extra_sections:
        sections.append(f"<h2>{html.escape(heading)}</h2>{body}")
    for r in results:
        hist = margin_histogram(r, img_dir / f"hist_{_slug(r.name + '_' + r.benchmark)}.png")
        sections.append(f"<h2>{html.escape(r.name)} ({html.escape(r.benchmark)})</h2>")
        sections.append(f'<p><img src="{img_dir.name}/{hist.name}" alt="margin histogram of {html.escape(r.name)}"></p>')
        sections.append(f"<h3>Worst failures</h3>{_gallery_html(r, samples, img_dir, n_failures, thumb_size)}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    logger.info("wrote report %s", path)
    return path
