"""The one atomic writer (fileio.atomic_write_text / atomic_write_json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_nearid.fileio import atomic_write_json, atomic_write_text


def test_writes_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1, "name": "ä", "path": Path("x/y")}, default=str)
    assert json.loads(target.read_text(encoding="utf-8")) == {"a": 1, "name": "ä", "path": "x/y"}
    atomic_write_text(target, "replaced\n")
    assert target.read_text(encoding="utf-8") == "replaced\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)  # strict JSON refuses NaN
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
