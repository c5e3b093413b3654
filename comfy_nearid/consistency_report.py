"""The self-contained HTML page of `nearid consistency`: per set, the similarity matrix as a
heat-map and a contact sheet grouped by identity (images inlined as base64; works offline).

Thumbnails are bounded: at most ``thumb_size`` pixels on the longest side, and at most
``max_images`` per set (the rest are counted, not shown). The heat-map is at most
:data:`HEATMAP_MAX_SIDE` pixels (one cell per image pair, nearest-neighbour scaled).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import ImageLoadError

logger = logging.getLogger(__name__)

HEATMAP_MAX_SIDE = 480
# Cosine colour scale: 0 (and below) dark blue -> 0.5 white -> 1 dark red.
_STOPS = np.array([[0.0, 33, 102, 172], [0.5, 247, 247, 247], [1.0, 178, 24, 43]])


def matrix_rgb(matrix: Any, max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
    """Cosine matrix ``[N, N]`` -> uint8 RGB heat-map ``[S, S, 3]`` (``S`` = ``N`` times the
    largest whole cell size that fits ``max_side``, at least 1 pixel per cell)."""
    m = np.clip(np.asarray(matrix, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(m, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    n = m.shape[0]
    cell = max(1, max_side // max(n, 1))
    rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
    return np.round(rgb).astype(np.uint8)


def _data_uri(image: Any, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=85) if fmt == "JPEG" else image.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _thumbnail_uri(path: str, size: int) -> str | None:
    from .images import load_image

    try:
        image = load_image(path)
    except ImageLoadError as e:
        logger.warning("consistency page: no thumbnail of %s (%s)", path, e)
        return None
    image.thumbnail((size, size))
    return _data_uri(image, "JPEG")


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
section{border-top:1px solid #ccc;padding-top:1em;margin-top:1.5em}
.row{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
.heat img{image-rendering:pixelated;border:1px solid #999}
.group{margin:.5em 0}
.sheet{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;padding:3px;border:3px solid transparent;font-size:11px;text-align:center}
figure.outlier{border-color:#c0392b} figure.medoid{border-color:#27ae60}
figcaption{max-width:%dpx;overflow-wrap:anywhere}
table{border-collapse:collapse} td,th{padding:2px 8px;text-align:left}
"""


def _set_html(rec: dict[str, Any], thumb_size: int, max_images: int) -> str:
    esc = html.escape
    name = rec["set"]
    parts = [f"<section><h2>{esc(name)}</h2><p><b>{esc(rec['description'])}</b></p>"]
    if not rec.get("readable"):
        parts.append("<p>No readable image.</p></section>")
        return "".join(parts)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    match = rec.get("calibrated_match")
    parts.append(
        "<table>"
        f"<tr><th>images</th><td>{rec['num_images']} ({len(rec['errors'])} unreadable)</td></tr>"
        f"<tr><th>mean pairwise cosine</th><td>{fmt(rec.get('mean_pairwise'))}</td></tr>"
        f"<tr><th>min pairwise cosine</th><td>{fmt(rec.get('min_pairwise'))}</td></tr>"
        f"<tr><th>calibrated match</th><td>{'-' if match is None else f'{match:.1f} / 100'}</td></tr>"
        f"<tr><th>threshold</th><td>{fmt(rec.get('threshold'))} ({esc(rec['threshold_rule'])})</td></tr>"
        f"<tr><th>medoid</th><td>image {rec['medoid'] + 1}</td></tr>"
        f"<tr><th>outliers</th><td>{', '.join(str(i + 1) for i in rec['outliers']) or 'none'}</td></tr>"
        "</table>"
    )
    from PIL import Image

    heat = Image.fromarray(matrix_rgb(rec["matrix"]))
    parts.append(f'<div class="row"><div class="heat"><p>Pairwise cosine (rows/columns: readable images in order; '
                 f'blue 0, white 0.5, red 1)</p><img alt="similarity matrix of {esc(name)}" '
                 f'src="{_data_uri(heat, "PNG")}" width="{heat.width}" height="{heat.height}"></div><div>')
    readable = rec["readable"]
    position = {i: k for k, i in enumerate(readable)}
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(rec["groups"]):
        if g is not None:
            groups.setdefault(int(g), []).append(i)
    outliers, shown = set(rec["outliers"]), 0
    for g in sorted(groups):
        members = sorted(groups[g])
        parts.append(f'<div class="group"><h3>identity {g + 1}: {len(members)} image(s)</h3><div class="sheet">')
        for i in members:
            if shown >= max_images:
                break
            shown += 1
            k = position[i]
            to_medoid = rec["matrix"][k][position[rec["medoid"]]]
            cls = "medoid" if i == rec["medoid"] else ("outlier" if i in outliers else "")
            src = _thumbnail_uri(rec["paths"][i], thumb_size)
            img = f'<img src="{src}" alt="image {i + 1}">' if src else "<i>unreadable</i>"
            label = " medoid" if cls == "medoid" else (" outlier" if cls == "outlier" else "")
            parts.append(f'<figure class="{cls}">{img}<figcaption>#{i + 1}{label} {to_medoid:.3f}<br>'
                         f'{esc(Path(rec["paths"][i]).name)}</figcaption></figure>')
        parts.append("</div></div>")
    hidden = len(readable) - shown
    if hidden > 0:
        parts.append(f"<p>{hidden} more image(s) not shown (at most {max_images} per set).</p>")
    parts.append("</div></div></section>")
    return "".join(parts)


def write_consistency_html(path: Path, records: Iterable[dict[str, Any]], thumb_size: int = 96,
                           max_images: int = 200) -> Path:
    """Write the page from the journal records (one set in memory at a time), atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('<!DOCTYPE html><html><head><meta charset="utf-8"><title>NearID consistency</title>'
                f"<style>{_CSS % thumb_size}</style></head><body><h1>NearID identity consistency</h1>"
                "<p>Each set's pairwise NearID cosine matrix and its images grouped by identity "
                "(green: medoid, the most representative image; red: outlier; the number under "
                "each image is its cosine to the medoid).</p>")
        for rec in records:
            f.write(_set_html(rec, thumb_size, max_images))
        f.write("</body></html>\n")
    os.replace(tmp, path)
    return path
