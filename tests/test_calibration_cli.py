"""`nearid calibrate`: reliability statistics against a hand-worked example, the two-Gaussian
closed form through the CLI, the dataset path against independently computed cosines, and
the head-file write (atomic, tensors byte for byte)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_nearid.calibration import (
    Calibration,
    best_threshold,
    calibration_for,
    fit_logistic,
    reliability_report,
    write_head_calibration,
)
from comfy_nearid.checkpoint import read_head_metadata
from comfy_nearid.cli import EXIT_BAD_INPUT
from comfy_nearid.cli import main as cli_main


def _cosine_for_probability(p: float) -> float:
    return math.log(p / (1 - p)) / 10.0  # inverse of the curve midpoint 0, slope 10


CURVE = Calibration(midpoint=0.0, slope=10.0)


def test_ece_brier_accuracy_by_hand():
    # Same pairs predicted 0.95, 0.85, 0.65, 0.35; near pairs 0.05, 0.15, 0.35, 0.65 (weight 1/8 each).
    # Bins (width 0.1): b0 {n .05}: |.05-0|; b1 {n .15}: |.15-0|; b3 {s .35, n .35}: 2 x |.35-.5|;
    # b6 {s .65, n .65}: 2 x |.65-.5|; b8 {s .85}: |.85-1|; b9 {s .95}: |.95-1|
    # ECE = (.05 + .15 + .30 + .30 + .15 + .05) / 8 = 0.125
    # Brier = 2 (.05^2 + .15^2 + .35^2 + .65^2) / 8 = 1.14 / 8 = 0.1425
    # accuracy at 50: same right 3 of 4 (.35 wrong), near right 3 of 4 (.65 wrong) -> 0.75
    # best single threshold: every cut between distinct values gives 0.75 at best
    same = [_cosine_for_probability(p) for p in (0.95, 0.85, 0.65, 0.35)]
    near = [_cosine_for_probability(p) for p in (0.05, 0.15, 0.35, 0.65)]
    report = reliability_report(CURVE, same, near)
    assert report.ece == pytest.approx(0.125, abs=1e-9)
    assert report.brier == pytest.approx(0.1425, abs=1e-9)
    assert report.accuracy_at_50 == pytest.approx(0.75, abs=1e-12)
    assert report.best_accuracy == pytest.approx(0.75, abs=1e-12)
    assert [b["pairs"] for b in report.bins] == [1, 1, 0, 2, 0, 0, 2, 0, 1, 1]
    assert report.bins[3]["observed"] == pytest.approx(0.5) and report.bins[2]["observed"] is None
    # Each kind weighs half: repeating the near pairs changes nothing.
    doubled = reliability_report(CURVE, same, near * 3)
    assert (doubled.ece, doubled.brier, doubled.accuracy_at_50) == pytest.approx((0.125, 0.1425, 0.75), abs=1e-9)


def test_best_threshold_sits_between_the_classes():
    threshold, accuracy = best_threshold([0.9, 0.8, 0.5, 0.85], [0.1, 0.2, 0.6])
    # balanced accuracy = (near right / 3 + same right / 4) / 2; cuts: 0.2|0.5 -> (2/3 + 1) / 2 = 0.833;
    # 0.5|0.6 -> (2/3 + 3/4) / 2 = 0.708; 0.6|0.8 -> (1 + 3/4) / 2 = 0.875 (the best); 0.8|0.85 -> 0.75
    assert accuracy == pytest.approx(0.875)
    assert threshold == pytest.approx(0.7)


def _write_sims_csv(path: Path, rng: np.random.Generator, n: int) -> Path:
    same = rng.normal(0.55, 0.08, n)
    near = rng.normal(0.25, 0.08, (n, 2))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "sim_01", "cross_00", "cross_11"])
        for i in range(n):
            w.writerow([f"s{i}", repr(float(same[i])), repr(float(near[i, 0])), repr(float(near[i, 1]))])
    return path


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_cli_recovers_the_two_gaussian_posterior(tmp_path, tiny_model, capsys):
    # Same ~ N(0.55, 0.08^2), near ~ N(0.25, 0.08^2): log P(same|c)/P(near|c) at equal priors is
    # linear with slope (0.55 - 0.25) / 0.08^2 = 46.875, zero at (0.55 + 0.25) / 2 = 0.4.
    rng = np.random.default_rng(1)
    fit_csv = _write_sims_csv(tmp_path / "fit.csv", rng, 20_000)  # 20k same vs 40k near pairs, default ridge
    eval_csv = _write_sims_csv(tmp_path / "heldout.csv", rng, 20_000)
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head, provenance={"made_by": "test"})
    before = _tensor_bytes(head)
    assert not calibration_for(head).fitted
    assert cli_main(["calibrate", "--head", str(head), "--csv", str(fit_csv), "--eval-csv", str(eval_csv)]) == 0
    printed = capsys.readouterr().out
    assert "heldout.csv" in printed and "ECE" in printed
    curve = calibration_for(head)
    assert curve.fitted
    assert curve.slope == pytest.approx(46.875, rel=0.04)
    assert curve.midpoint == pytest.approx(0.4, abs=0.003)
    for c in (0.3, 0.4, 0.5):  # the posterior itself, at a few cosines
        closed = 100 / (1 + math.exp(-46.875 * (c - 0.4)))
        assert curve.match(c) == pytest.approx(closed, abs=1.5)
    meta = read_head_metadata(head)
    assert meta.provenance == {"made_by": "test"}
    prov = meta.calibration["provenance"]
    assert prov["data"] == str(fit_csv) and prov["pairs"] == {"same_identity": 20_000, "near_identity": 40_000}
    assert prov["heldout_split"] == str(eval_csv) and prov["date"]
    assert prov["heldout_report"]["ece"] < 0.03  # the model is right: only sampling noise
    assert _tensor_bytes(head) == before
    report = json.loads((tmp_path / "head.calibration" / "reliability.json").read_text())
    assert report["reported_on"].startswith("held-out")
    assert report["report"]["n_same"] == 20_000 and len(report["report"]["bins"]) == 10
    assert abs(report["report"]["accuracy_at_50"] - report["report"]["best_accuracy"]) < 0.01
    with Image.open(tmp_path / "head.calibration" / "reliability.png") as png:
        assert png.size[0] > 100


def _noise(seed: int, jitter_seed: int | None = None) -> Image.Image:
    base = np.random.default_rng(seed).integers(0, 256, (32, 32, 3)).astype(np.int16)
    if jitter_seed is not None:
        base = base + np.random.default_rng(jitter_seed).integers(-12, 13, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _noise_dataset(root: Path, split: str, n: int, offset: int) -> list[tuple[list[Image.Image], list[Image.Image]]]:
    """Views = one noise texture with small jitter; the distractor of view k = another texture."""
    samples = []
    for i in range(n):
        sid = offset + i
        d = root / split / f"id{sid:03d}"
        (d / "near").mkdir(parents=True)
        views = [_noise(sid, 1000 * sid + k) for k in (1, 2, 3)]
        dists = [_noise(10_000 + 10 * sid + k) for k in (1, 2, 3)]
        for k, (v, dd) in enumerate(zip(views, dists), start=1):
            v.save(d / f"view{k}.png")
            dd.save(d / "near" / f"distractor{k}.png")
        samples.append((views, dists))
    return samples


def test_cli_dataset_path_fits_on_one_split_and_reports_on_another(tmp_path, tiny_model):
    fit_samples = _noise_dataset(tmp_path / "data", "train", 6, 0)
    test_samples = _noise_dataset(tmp_path / "data", "test", 5, 100)
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head)
    out = tmp_path / "calibrated.safetensors"
    original = head.read_bytes()
    code = cli_main(["calibrate", "--head", str(head), "--out", str(out), "--data", str(tmp_path / "data"),
                     "--split", "train", "--eval-split", "test", "--random-weights", "--device", "cpu",
                     "--no-progress", "--report", str(tmp_path / "rep")])
    assert code == 0
    assert head.read_bytes() == original  # --out leaves the input alone

    def cosines(samples):  # a second computation: embed with the model, pair by hand
        same, near = [], []
        for views, dists in samples:
            v = tiny_model.embed(views).double().numpy()
            d = tiny_model.embed(dists).double().numpy()
            same += [v[a] @ v[b] for a, b in ((0, 1), (0, 2), (1, 2))]
            near += [v[k] @ d[k] for k in range(3)]
        return np.array(same), np.array(near)

    expected = fit_logistic(*cosines(fit_samples))
    stored = calibration_for(out)
    assert stored.slope == pytest.approx(expected.slope, rel=1e-3)
    assert stored.midpoint == pytest.approx(expected.midpoint, abs=1e-4)
    assert (stored.n_same, stored.n_near) == (18, 18)
    heldout = reliability_report(expected, *cosines(test_samples))
    report = json.loads((tmp_path / "rep" / "reliability.json").read_text())
    assert report["reported_on"] == "held-out test"
    assert report["report"]["ece"] == pytest.approx(heldout.ece, abs=1e-3)
    assert stored.provenance["split"] == "train" and stored.provenance["heldout_split"] == "test"


def test_cli_refuses_ambiguous_or_missing_pairs(tmp_path, tiny_model, capsys):
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head)
    assert cli_main(["calibrate", "--head", str(head)]) == EXIT_BAD_INPUT
    assert "exactly one of --data" in capsys.readouterr().err
    assert cli_main(["calibrate", "--head", str(head), "--csv", "a.csv", "--split", "train"]) == EXIT_BAD_INPUT
    assert "--eval-csv" in capsys.readouterr().err
    assert cli_main(["calibrate", "--head", str(head), "--data", "d", "--split", "x", "--eval-split", "x"]) == EXIT_BAD_INPUT
    assert "must differ" in capsys.readouterr().err


def test_head_write_is_atomic_and_keeps_the_tensors(tmp_path, tiny_model, monkeypatch):
    import safetensors.torch

    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head, provenance={"k": 1})
    original = head.read_bytes()
    tensors = _tensor_bytes(head)
    curve = Calibration(midpoint=0.3, slope=20.0, source="test", n_same=5, n_near=7, provenance={"data": "x"})

    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):  # a write that dies half way
        Path(filename).write_bytes(b"\0" * 64)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_head_calibration(head, curve)
    assert head.read_bytes() == original  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors"]  # no temporary left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)

    write_head_calibration(head, curve)
    assert _tensor_bytes(head) == tensors
    meta = read_head_metadata(head)
    assert meta.provenance == {"k": 1}
    stored = calibration_for(head)
    assert (stored.midpoint, stored.slope, stored.n_same, stored.n_near) == (0.3, 20.0, 5, 7)
    assert stored.provenance == {"data": "x"} and stored.fitted
    write_head_calibration(head, None)  # removing it gives the uncalibrated default back
    assert not calibration_for(head).fitted and _tensor_bytes(head) == tensors


def test_score_rows_and_summary_say_whether_the_match_is_calibrated(tmp_path, tiny_model, rng):
    from comfy_nearid import load_model
    from comfy_nearid.scoring import (
        OutputPaths, RunSettings, ScoringOptions, plan_single_subject, read_rows, score_plan,
    )

    for folder, n in (("refs", 2), ("gen", 3)):
        for i in range(n):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    head = tmp_path / "head.safetensors"
    tiny_model.save_head(head)
    curve = Calibration(midpoint=0.2, slope=7.0, source="test", n_same=3, n_near=3)
    plan = plan_single_subject([tmp_path / "refs"], [tmp_path / "gen"])
    for calibration, expected in ((None, False), (curve, True)):
        write_head_calibration(head, calibration)
        model = load_model(head=head, pretrained=False, device="cpu", dtype="fp32")
        out = OutputPaths.for_rows(tmp_path / f"out_{expected}" / "scores.jsonl")
        score_plan(model, plan, out, RunSettings(options=ScoringOptions(batch_size=2, progress=False)))
        rows = read_rows(out.rows)
        assert [r.calibrated for r in rows] == [expected] * 3
        by_hand = [100 / (1 + math.exp(-(curve.slope if expected else 10.0) * (r.score - (curve.midpoint if expected else 0.5))))
                   for r in rows]
        np.testing.assert_allclose([r.match for r in rows], by_hand, atol=2e-4)
        summary = json.loads(out.summary.read_text())
        assert summary["calibrated"] is expected
        assert summary["subjects"]["refs"]["match_best"] == pytest.approx(max(by_hand), abs=2e-4)


def test_convert_calibrates_the_converted_head_on_the_users_data(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
    from test_convert import _reference_model, _save_release

    from comfy_nearid import load_model

    release = _save_release(_reference_model(3), tmp_path / "rel", "5.x")
    fit_samples = _noise_dataset(tmp_path / "data", "val", 5, 0)
    head, bb = tmp_path / "nearid.safetensors", tmp_path / "bb.safetensors"
    code = cli_main(["convert", str(release), "--out", str(head), "--backbone", "tiny-siglip",
                     "--backbone-out", str(bb), "--data", str(tmp_path / "data"), "--split", "val",
                     "--device", "cpu", "--no-progress"])
    assert code == 0
    assert "calibrated head" in capsys.readouterr().out
    model = load_model(head, backbone_weights=bb, device="cpu", dtype="fp32")
    same, near = [], []
    for views, dists in fit_samples:
        v, d = model.embed(views).double().numpy(), model.embed(dists).double().numpy()
        same += [v[a] @ v[b] for a, b in ((0, 1), (0, 2), (1, 2))]
        near += [v[k] @ d[k] for k in range(3)]
    expected = fit_logistic(same, near)
    stored = calibration_for(head)
    assert stored.slope == pytest.approx(expected.slope, rel=1e-3)
    assert stored.midpoint == pytest.approx(expected.midpoint, abs=1e-4)
    assert read_head_metadata(head).provenance["converted_from"] == "Aleksandar/nearid-siglip2"


def test_convert_without_data_says_the_head_is_uncalibrated(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
    from test_convert import _reference_model, _save_release

    release = _save_release(_reference_model(3), tmp_path / "rel", "5.x")
    head = tmp_path / "nearid.safetensors"
    assert cli_main(["convert", str(release), "--out", str(head), "--backbone", "tiny-siglip"]) == 0
    assert "uncalibrated" in capsys.readouterr().err
    assert not calibration_for(head).fitted
