"""The NearID Consistency node (imported without ComfyUI) against the library on the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _comfyui_helpers import import_pack, structured_images, to_comfy
from comfy_nearid.consistency import set_consistency
from comfy_nearid.errors import InvalidInputError

pack = import_pack()
consistency = pack.nodes.consistency
NODE = consistency.NearIDConsistency()


def _outputs(result: dict) -> dict:
    return dict(zip(consistency.NearIDConsistency.RETURN_NAMES, result["result"]))


def test_node_numbers_equal_the_library(tiny_model):
    arr = structured_images(4, 5)
    out = _outputs(NODE.check(tiny_model, to_comfy(arr), empty_outputs="empty batch"))
    want = set_consistency(tiny_model.embed(list(arr)).numpy())  # tiny model: no fitted curve -> robust z
    assert out["set_score"] == pytest.approx(want.mean_pairwise, abs=1e-5)
    np.testing.assert_allclose(out["scores"], want.mean_to_others, atol=1e-5)
    assert out["outlier_indices"] == want.outliers
    assert out["group_labels"] == want.groups.tolist()
    assert out["medoid_index"] == want.medoid
    keep = [i for i in range(5) if i not in want.outliers]
    assert torch.equal(out["consistent"], to_comfy(arr)[keep])
    assert torch.equal(out["medoid"], to_comfy(arr)[want.medoid : want.medoid + 1])
    assert out["outliers"].shape[0] == len(want.outliers)
    m = out["matrix"]
    assert m.ndim == 4 and m.shape[0] == 1 and m.shape[1] == m.shape[2] and m.shape[-1] == 3 and m.max() <= 1.0


def test_explicit_thresholds_split_every_image_and_empty_outputs_follow_the_filter_choices(tiny_model):
    arr = structured_images(5, 4)
    emb = tiny_model.embed(list(arr)).numpy()
    # cosine 1.0: no other image is a perfect match -> every image but the medoid is an outlier
    out = _outputs(NODE.check(tiny_model, to_comfy(arr), threshold_rule="cosine", threshold=1.0))
    want = set_consistency(emb, threshold=1.0)
    assert out["outlier_indices"] == [i for i in range(4) if i != want.medoid]
    assert out["consistent"].shape[0] == 1  # never empty: the medoid stays
    assert sorted(set(out["group_labels"])) == [0, 1, 2, 3]
    # cosine -1: nothing is an outlier; "empty batch" sends a real 0-image batch (skipping is
    # ComfyUI's ExecutionBlocker, checked in the real server by test_comfyui_server.py)
    empty = _outputs(NODE.check(tiny_model, to_comfy(arr), threshold_rule="cosine", threshold=-1.0,
                                empty_outputs="empty batch"))
    assert empty["outliers"].shape == (0, *arr.shape[1:]) and empty["outlier_indices"] == []
    # identity match 50 on the default curve = cosine 0.5
    on_match = _outputs(NODE.check(tiny_model, to_comfy(arr), threshold_rule="identity match (0-100)", threshold=50.0,
                                   empty_outputs="empty batch"))
    assert on_match["outlier_indices"] == set_consistency(emb, threshold=0.5).outliers


def test_bad_node_inputs_name_the_value(tiny_model):
    arr = to_comfy(structured_images(6, 2))
    with pytest.raises(InvalidInputError, match="threshold_rule"):
        NODE.check(tiny_model, arr, threshold_rule="median")
    with pytest.raises(InvalidInputError, match="between 0 and 100"):
        NODE.check(tiny_model, arr, threshold_rule="identity match (0-100)", threshold=100.0)
    with pytest.raises(InvalidInputError, match="empty"):
        NODE.check(tiny_model, arr[:0])
