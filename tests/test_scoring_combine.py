"""Combining several references into one score (`combine_references`): hand-worked values,
the streaming scorer and `nearid score --aggregate prototype`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from comfy_nearid.cli import main
from comfy_nearid.errors import InvalidInputError
from comfy_nearid.scoring import (
    OutputPaths,
    RunSettings,
    ScoringOptions,
    aggregate_cosines,
    combine_references,
    plan_single_subject,
    read_rows,
    score_plan,
)

from _scoring_helpers import TINY_MODEL_ARGS, write_image

# Two orthogonal references and three candidates, worked by hand:
# cosines to (e1, e2): c1 = e1 -> (1, 0); c2 = (e1 + e2)/sqrt2 -> (r, r); c3 = -e2 -> (0, -1), r = 1/sqrt2.
# prototype = (e1 + e2)/sqrt2, so its cosine is (x + y)/sqrt2 for a candidate (x, y).
R = 1 / math.sqrt(2)
REFERENCES = np.array([[1.0, 0.0], [0.0, 1.0]])
CANDIDATES = np.array([[1.0, 0.0], [R, R], [0.0, -1.0]])
EXPECTED = {
    "mean": [0.5, R, -0.5],
    "max": [1.0, R, 0.0],
    "prototype": [R, 1.0, -R],
}


@pytest.mark.parametrize("mode", ["mean", "max", "prototype"])
def test_hand_worked_values(mode):
    np.testing.assert_allclose(combine_references(CANDIDATES, REFERENCES, mode), EXPECTED[mode], atol=1e-12)
    # torch tensors in, the same numbers out (float64 numpy)
    out = combine_references(torch.tensor(CANDIDATES, dtype=torch.float32), torch.tensor(REFERENCES), mode)
    assert out.dtype == np.float64 and out.shape == (3,)
    np.testing.assert_allclose(out, EXPECTED[mode], atol=1e-6)


def test_prototype_differs_from_mean_when_references_are_uneven():
    # three references, two of them equal: the prototype leans toward the repeated one more
    # than the plain mean of cosines does
    refs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cand = np.array([[0.0, 1.0]])
    proto = np.array([2.0, 1.0]) / math.sqrt(5.0)
    assert combine_references(cand, refs, "mean")[0] == pytest.approx(1 / 3)
    assert combine_references(cand, refs, "prototype")[0] == pytest.approx(float(cand[0] @ proto))


def test_a_single_reference_gives_the_plain_cosine_in_every_mode():
    ref = np.array([[0.6, 0.8]])
    cand = np.array([[1.0, 0.0], [0.0, 1.0]])
    for mode in ("mean", "max", "prototype"):
        np.testing.assert_allclose(combine_references(cand, ref, mode), [0.6, 0.8], atol=1e-12)


def test_bad_inputs_name_the_problem():
    with pytest.raises(InvalidInputError, match="one of \\('mean', 'max', 'prototype'\\), got 'median'"):
        combine_references(CANDIDATES, REFERENCES, "median")
    with pytest.raises(InvalidInputError, match="candidate embeddings are 3-d but reference embeddings 2-d"):
        combine_references(np.ones((1, 3)), REFERENCES)
    with pytest.raises(InvalidInputError, match="at least one reference"):
        combine_references(CANDIDATES, np.zeros((0, 2)))
    with pytest.raises(InvalidInputError, match="reference embeddings must be \\[N, D\\]"):
        combine_references(CANDIDATES, np.ones(2))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        combine_references(np.array([[np.nan, 0.0]]), REFERENCES)
    with pytest.raises(InvalidInputError, match="mean embedding is zero"):
        combine_references(CANDIDATES, np.array([[1.0, 0.0], [-1.0, 0.0]]), "prototype")
    with pytest.raises(InvalidInputError, match="'prototype' needs the embeddings"):
        aggregate_cosines(np.ones((2, 2)), "prototype")


def _prototype_by_hand(model, refs, gens) -> np.ndarray:
    ref = np.stack([model.embed([p])[0].numpy() for p in refs]).astype(np.float64)
    gen = np.stack([model.embed([p])[0].numpy() for p in gens]).astype(np.float64)
    proto = ref.sum(axis=0)
    proto /= np.linalg.norm(proto)
    return np.array([float(np.dot(g, proto)) for g in gen])


def test_streaming_scorer_with_the_prototype(tiny_model, tmp_path, rng):
    refs = [write_image(tmp_path / "refs" / f"r{i}.png", rng) for i in range(3)]
    gens = [write_image(tmp_path / "gen" / f"g{i}.png", rng) for i in range(5)]
    plan = plan_single_subject([tmp_path / "refs"], [tmp_path / "gen"])
    out = OutputPaths.for_rows(tmp_path / "out" / "scores.csv")
    options = ScoringOptions(aggregate="prototype", batch_size=2, num_workers=1, progress=False)
    score_plan(tiny_model, plan, out, RunSettings(options=options))
    rows = read_rows(out.rows)
    np.testing.assert_allclose([r.score for r in rows], _prototype_by_hand(tiny_model, refs, gens), atol=2e-6)
    assert json.loads(out.config.read_text())["aggregate"] == "prototype"


def test_cli_aggregate_prototype(tiny_model, tmp_path, rng, capsys):
    refs = [write_image(tmp_path / "ref" / f"{i}.png", rng) for i in range(2)]
    gens = [write_image(tmp_path / "gen" / f"{i}.png", rng) for i in range(3)]
    argv = ["score", "--reference", str(tmp_path / "ref"), str(tmp_path / "gen"), "-o", str(tmp_path / "o.jsonl"),
            "--aggregate", "prototype", "--no-cache", *TINY_MODEL_ARGS]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["score"] for r in rows], _prototype_by_hand(tiny_model, refs, gens), atol=2e-6)
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite", "--aggregate", "median"])
    assert "invalid choice: 'median'" in capsys.readouterr().err
