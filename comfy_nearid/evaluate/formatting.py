"""Table-1-style Markdown tables and per-source/category breakdowns of evaluation results."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping, Sequence


from ..errors import InvalidInputError
from .summary import EvalResult

if TYPE_CHECKING:
    pass

# --------------------------------------------------------------------------- tables


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _corr(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(results: Sequence[EvalResult] | Mapping[str, EvalResult]) -> str:
    """One Markdown table in the layout of the paper's Table 1, one row per scorer.

    Results of the same scorer name on different benchmarks share a row: NearID columns
    (SSR, PA, reference PA, SSR 95% CI, samples) and/or MTG columns (MO, MOpair, SSR, PA).
    """
    results = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not results:
        raise InvalidInputError("format_table needs at least one result")
    by_name: dict[str, dict[str, EvalResult]] = {}
    for r in results:
        by_name.setdefault(r.name, {})[r.benchmark] = r
    kinds = [k for k in ("ssr", "mtg") if any(k in v for v in by_name.values())]
    header = ["scorer"]
    if "ssr" in kinds:
        header += ["NearID SSR", "NearID PA", "PA (ref.)", "SSR 95% CI", "samples"]
    if "mtg" in kinds:
        header += ["MTG MO", "MTG MOpair", "MTG SSR", "MTG PA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, per_kind in by_name.items():
        cells = [name]
        if "ssr" in kinds:
            s = per_kind.get("ssr")
            if s is None:
                cells += ["-"] * 5
            else:
                ci = s.summary.get("ci95", {}).get("ssr")
                cells += [_pct(s.summary["ssr"]), _pct(s.summary["pa"]), _pct(s.summary["pa_reference"]),
                          f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-", str(s.summary["n_samples"])]
        if "mtg" in kinds:
            m = per_kind.get("mtg")
            if m is None:
                cells += ["-"] * 4
            else:
                cells += [_corr(m.summary.get("mo")), _corr(m.summary.get("mopair")),
                          _pct(m.summary["ssr"]), _pct(m.summary["pa"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_breakdown(results: Sequence[EvalResult], by: Literal["source", "category"] = "source") -> str:
    """Markdown table of SSR / PA per distractor source (or category), one row per scorer."""
    key = f"by_{by}"
    results = [r for r in results if key in r.summary]
    if not results:
        raise InvalidInputError("format_breakdown needs at least one result with a breakdown")
    labels = list(dict.fromkeys(label for r in results for label in r.summary[key]))
    header = ["scorer"] + [f"{label} SSR / PA" for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [f"{r.name} ({r.benchmark})"]
        for label in labels:
            g = r.summary[key].get(label)
            cells.append("-" if not g or g["ssr"] is None else f"{g['ssr']:.2f} / {g['pa']:.2f} (n={g['n_samples']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


