"""The reference-format similarity CSV: reading, round trip, and refusal of bad files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from comfy_nearid.errors import DatasetError
from comfy_nearid.metrics.ssr import ssr_stats
from comfy_nearid.metrics.table import read_similarity_csv, write_similarity_csv

REFERENCE_CSV = """id,category,sim_01,sim_02,sim_12,cross_00,cross_01,cross_02,cross_10,cross_11,cross_12,cross_20,cross_21,cross_22
a,mug,0.75,0.5,0.625,0.25,0.1,0.1,0.1,0.5,0.1,0.1,0.1,0.625
b,shoe,0.5,,,0.25,,,,0.375,,,,
c,mug,0.5,0.5,0.5,0.75,,,,,,,,0.375
"""


def _write(tmp_path: Path, text: str, name: str = "sims.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_reference_format_and_computes_hand_worked_metrics(tmp_path):
    table = read_similarity_csv(_write(tmp_path, REFERENCE_CSV))
    assert table.ids == ["a", "b", "c"]
    assert table.categories == ["mug", "shoe", "mug"]
    assert table.sources == ["all"] * 3
    assert table.view_sims[0, 2, 1] == 0.625 and table.cross_sims[0, 0, 1] == 0.1
    assert math.isnan(table.view_sims[1, 0, 2])
    stats = ssr_stats(table.margins())
    # a: margins .5 .25 .25 -.125 .125 0 (4/6, fail); b: .25 .125 (2/2, success);
    # c: -.25, -.25, .125, .125 (2/4, fail)  -> SSR 1/3, PA 8/12
    assert (stats.n_samples, stats.n_successes, stats.n_wins, stats.n_trials) == (3, 1, 8, 12)


def test_write_then_read_round_trips_exactly(tmp_path):
    table = read_similarity_csv(_write(tmp_path, REFERENCE_CSV))
    rng = np.random.default_rng(0)
    table.view_sims[0, 0, 1] = table.view_sims[0, 1, 0] = rng.uniform(-1, 1)  # a non-dyadic value
    out = write_similarity_csv(tmp_path / "out" / "round.csv", table)
    again = read_similarity_csv(out)  # the derived margin / count columns are re-checked here
    np.testing.assert_array_equal(np.nan_to_num(again.view_sims, nan=9), np.nan_to_num(table.view_sims, nan=9))
    np.testing.assert_array_equal(np.nan_to_num(again.cross_sims, nan=9), np.nan_to_num(table.cross_sims, nan=9))
    assert again.ids == table.ids and again.categories == table.categories
    header = out.read_text().splitlines()[0].split(",")
    assert header[:3] == ["id", "category", "source"] and "margin_0_1" in header and "success" in header


def _refusal(tmp_path: Path, text: str, *patterns: str) -> str:
    with pytest.raises(DatasetError) as info:
        read_similarity_csv(_write(tmp_path, text))
    for p in patterns:
        assert p in str(info.value), str(info.value)
    return str(info.value)


def test_unknown_column_is_refused(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11,sim_99\na,0.1,0.2,0.3,0.4\n", "line 1", "'sim_99'", "allowed")


def test_missing_required_column_is_refused(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00\na,0.1,0.2\n", "missing required column", "'cross_11'")


def test_non_numeric_cell_names_line_and_column(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\na,0.1,0.2,0.3\nb,0.1,high,0.3\n", "line 3", "'cross_00'", "'high'")


def test_infinite_cell_is_refused(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\na,inf,0.2,0.3\n", "line 2", "'sim_01'")


def test_duplicate_id_names_both_lines(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\na,0.1,0.2,0.3\nb,0.1,0.2,0.3\na,0.1,0.2,0.3\n",
             "line 4", "duplicate id 'a'", "first on line 2")


def test_same_id_in_two_sources_is_allowed(tmp_path):
    table = read_similarity_csv(_write(tmp_path, "id,source,sim_01,cross_00,cross_11\na,x,0.5,0.1,0.1\na,y,0.5,0.9,0.1\n"))
    assert table.sources == ["x", "y"]


def test_wrong_cell_count_and_empty_id_and_empty_file(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\na,0.1,0.2\n", "line 2 has 3 cells", "header has 4")
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\n ,0.1,0.2,0.3\n", "line 2", "empty id")
    _refusal(tmp_path, "", "empty file")
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11\n", "no data rows")
    _refusal(tmp_path, "id,sim_01,sim_01,cross_00,cross_11\n", "'sim_01' appears twice")


def test_derived_column_disagreeing_with_similarities_is_refused(tmp_path):
    _refusal(tmp_path, "id,sim_01,cross_00,cross_11,margin_0_1\na,0.5,0.25,0.25,0.3\n",
             "line 2", "'margin_0_1'", "0.25")


def test_missing_csv_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv: file does not exist"):
        read_similarity_csv(tmp_path / "nope.csv")
