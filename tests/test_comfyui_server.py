"""The node pack inside a real ComfyUI 0.3.75 server (headless, CPU), driven over HTTP.

One server for the whole session (start-up is the expensive part). The ComfyUI tree comes
from ``scripts/setup_comfyui.py``; without it these tests fail (never skip) and say so.
Expected numbers come from ``comfy_nearid`` called directly on the same PNG files, and from
the score formulas written out in ``_comfyui_helpers``.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _comfyui_helpers import default_match, expected_scores, structured_images
from comfy_nearid import load_model
from comfy_nearid.consistency import set_consistency
from comfyui_env import (
    PACK_NAME,
    ComfyServer,
    ComfyUINotReady,
    PromptRejected,
    history_error,
    history_message_kinds,
    prepare_base_dir,
    require_comfyui,
    ui_to_api,
)

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]  # a real server process: never in the fast subset

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
HEAD = "nearid-siglip2-head.safetensors"
# The templates' file names are the titles the template browser shows (it reads nothing else).
SCORE, FILTER, HEATMAP, CONSISTENCY = ("NearID score a batch", "NearID filter by threshold", "NearID attention heatmap",
                                       "NearID batch consistency")
GENERATE_KEEP_BEST, GENERATE_KEEP_CONSISTENT = "NearID generate and keep the best", "NearID generate and keep consistent"
WORKFLOW_NAMES = sorted([SCORE, FILTER, HEATMAP, CONSISTENCY, GENERATE_KEEP_BEST, GENERATE_KEEP_CONSISTENT])
# How far the node's float32 match may lie from this file's float64 formula (0..100 scale).
MATCH_TOLERANCE = 1e-3
NEARID_NODES = ["NearIDModelLoader", "NearIDEmbed", "NearIDIdentityScore", "NearIDRerank", "NearIDFilter", "NearIDConsistency", "NearIDHeatmap"]


@dataclass
class Session:
    server: ComfyServer
    head: Path
    reference: np.ndarray  # uint8 [2, H, W, 3]: nearid_reference.png, nearid_reference_2.png
    candidates: np.ndarray  # uint8 [3, H, W, 3]: nearid_candidate_{1,2,3}.png

    @property
    def base(self) -> Path:
        return self.server.base


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> Session:
    try:
        tree = require_comfyui()
    except ComfyUINotReady as e:
        pytest.fail(str(e), pytrace=False)
    base = prepare_base_dir(tmp_path_factory.mktemp("comfyui-base"))
    head = base / "models" / "nearid" / HEAD
    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)
    model.save_head(head, provenance={"backbone_seed": 0})
    reference = structured_images(11, 2)
    candidates = structured_images(12, 3)
    Image.fromarray(reference[0]).save(base / "input" / "nearid_reference.png")
    Image.fromarray(reference[1]).save(base / "input" / "nearid_reference_2.png")
    for i, arr in enumerate(candidates):
        Image.fromarray(arr).save(base / "input" / f"nearid_candidate_{i + 1}.png")
    Image.new("RGB", (10, 10), (255, 255, 255)).save(base / "input" / "nearid_mask_small.png")
    server = ComfyServer(tree, base).start()
    try:
        yield Session(server, head, reference, candidates)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    return comfy.server.get_json("/object_info")


@pytest.fixture(scope="session")
def direct_model(comfy):
    """The same head loaded by comfy_nearid directly (the reference the nodes must equal)."""
    return load_model(head=comfy.head, pretrained=False, seed=0, device="cpu", dtype="fp32")


def _api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def _embed_files(model, paths: list[Path]) -> np.ndarray:
    return model.embed([Image.open(p).convert("RGB") for p in paths]).numpy()


def _succeeded(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry["outputs"]


def _png(server: ComfyServer, record: dict) -> np.ndarray:
    return np.asarray(Image.open(server.image_path(record)).convert("RGB"), dtype=np.int16)


def _candidate_paths(comfy: Session) -> list[Path]:
    return [comfy.base / "input" / f"nearid_candidate_{i + 1}.png" for i in range(3)]


def _reference_path(comfy: Session) -> Path:
    return comfy.base / "input" / "nearid_reference.png"


# ----------------------------------------------------------------------------- discovery
def test_object_info_lists_every_node_with_inputs_outputs_and_tooltips(comfy, object_info):
    for node_id in NEARID_NODES:
        info = object_info[node_id]
        assert info["category"].startswith("NearID/"), node_id
        assert info["display_name"].startswith(("NearID", "Load NearID")), node_id
        assert info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(info["output_tooltips"]) == len(info["output"]) == len(info["output_name"])
        assert all(info["output_tooltips"]), node_id
    assert object_info["NearIDModelLoader"]["output"] == ["NEARID_MODEL"]
    assert object_info["NearIDEmbed"]["output"][0] == "NEARID_EMBEDDING"
    assert HEAD in object_info["NearIDModelLoader"]["input"]["required"]["head"][0]  # models/nearid is registered
    score = object_info["NearIDIdentityScore"]
    assert score["output_is_list"][:2] == [True, True] and score["output_node"] is True


def test_workflow_templates_are_listed_and_served(comfy):
    listed = comfy.server.get_json("/workflow_templates")
    assert sorted(listed[PACK_NAME]) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        served = comfy.server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text())
        # The template browser shows <name>.jpg as the thumbnail.
        thumbnail = comfy.server._request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert thumbnail.status_code == 200 and thumbnail.content == (WORKFLOWS / f"{name}.jpg").read_bytes()


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_converts_to_its_api_twin(object_info, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in _api(name).items()}
    assert ui_to_api(ui, object_info) == twin


# ----------------------------------------------------------------------------- workflows
def test_score_workflow_equals_the_library(comfy, direct_model):
    outputs = _succeeded(comfy.server.run(_api(SCORE)))
    ref = _embed_files(direct_model, [_reference_path(comfy)])
    want = expected_scores(ref, _embed_files(direct_model, _candidate_paths(comfy)), "mean")
    np.testing.assert_allclose(outputs["10"]["nearid_scores"], want, atol=1e-5)
    np.testing.assert_allclose(outputs["10"]["nearid_match"], [default_match(c) for c in want], atol=MATCH_TOLERANCE)
    assert outputs["10"]["nearid_best"] == [int(np.argmax(want))]
    assert outputs["11"]["text"][0] == outputs["10"]["text"][0]  # PreviewAny shows the preview


def test_several_references_combine_as_mean_max_and_prototype(comfy, direct_model):
    prompt = _api(SCORE)
    del prompt["11"]
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "nearid_reference_2.png"}}
    prompt["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["20", 0]}}
    for k, mode in (("30", "mean"), ("31", "max"), ("32", "prototype")):
        node = copy.deepcopy(prompt["10"])
        node["inputs"].update({"combine": mode, "reference": ["21", 0], "batch_size": 2})
        prompt[k] = node
    del prompt["10"]
    outputs = _succeeded(comfy.server.run(prompt))
    refs = _embed_files(direct_model, [_reference_path(comfy), comfy.base / "input" / "nearid_reference_2.png"])
    cands = _embed_files(direct_model, _candidate_paths(comfy))
    for k, mode in (("30", "mean"), ("31", "max"), ("32", "prototype")):
        np.testing.assert_allclose(outputs[k]["nearid_scores"], expected_scores(refs, cands, mode), atol=1e-5, err_msg=mode)


def test_rerank_order_equals_the_order_of_the_scores(comfy, direct_model):
    prompt = _api(SCORE)
    batch = prompt["10"]["inputs"]["candidates"]
    prompt["10"] = {"class_type": "NearIDRerank", "inputs": {
        "nearid_model": ["1", 0], "candidates": batch, "reference": ["2", 0], "top_k": 0, "combine": "mean", "batch_size": 16}}
    prompt["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    outputs = _succeeded(comfy.server.run(prompt))
    want = expected_scores(_embed_files(direct_model, [_reference_path(comfy)]),
                           _embed_files(direct_model, _candidate_paths(comfy)), "mean")
    order = sorted(range(3), key=lambda i: -want[i])
    assert outputs["10"]["nearid_order"] == order
    for record, index in zip(outputs["11"]["images"], order):
        assert np.abs(_png(comfy.server, record) - comfy.candidates[index]).max() <= 1


def test_filter_workflow_splits_at_the_threshold(comfy, direct_model):
    want = expected_scores(_embed_files(direct_model, [_reference_path(comfy)]),
                           _embed_files(direct_model, _candidate_paths(comfy)), "mean")
    matches = [default_match(c) for c in want]
    # The node computes the match in float32 and this test in float64 (they agree to 1e-3,
    # see the score test), so a threshold must sit well away from every match: never on one.
    low, middle, _ = sorted(matches)
    assert middle - low > 2 * MATCH_TOLERANCE, f"the test images give nearly equal matches {matches}"
    split = (low + middle) / 2  # strictly between two distinct matches: two pass, one is rejected
    for threshold in (50.0, split):  # the twin's own value, then a split
        assert min(abs(m - threshold) for m in matches) > MATCH_TOLERANCE, (threshold, matches)
        prompt = _api(FILTER)
        prompt["10"]["inputs"]["threshold"] = threshold
        outputs = _succeeded(comfy.server.run(prompt))
        passed = [i for i, m in enumerate(matches) if m >= threshold]
        rejected = [i for i, m in enumerate(matches) if m < threshold]
        if not passed:  # the twin keeps the best one when none passes
            passed, rejected = [int(np.argmax(want))], [i for i in range(3) if i != int(np.argmax(want))]
        assert outputs["10"]["nearid_passed"] == passed, threshold
        assert outputs["10"]["nearid_rejected"] == rejected, threshold
        saved = outputs["11"]["images"]
        assert len(saved) == len(passed)
        for record, index in zip(saved, passed):
            assert np.abs(_png(comfy.server, record) - comfy.candidates[index]).max() <= 1


def test_filter_with_nothing_passing_skips_the_empty_branch_and_the_graph_stays_valid(comfy):
    prompt = _api(FILTER)
    prompt["10"]["inputs"].update({"threshold": 100.0, "when_none_pass": "pass nothing"})
    entry = comfy.server.run(prompt)
    outputs = _succeeded(entry)
    assert outputs["10"]["nearid_passed"] == [] and outputs["10"]["nearid_rejected"] == [0, 1, 2]
    assert "11" not in outputs  # the 'passed' preview was skipped, not failed
    assert len(outputs["12"]["images"]) == 3


def test_consistency_workflow_equals_the_library(comfy, direct_model):
    outputs = _succeeded(comfy.server.run(_api(CONSISTENCY)))
    batch = np.concatenate([comfy.reference[:1], comfy.candidates])  # ImageBatch(reference, candidates)
    want = set_consistency(_embed_files(direct_model, [_reference_path(comfy), *_candidate_paths(comfy)]))
    got = outputs["10"]
    assert got["nearid_set_score"][0] == pytest.approx(want.mean_pairwise, abs=1e-5)
    np.testing.assert_allclose(got["nearid_scores"], want.mean_to_others, atol=1e-5)
    np.testing.assert_allclose(got["nearid_to_medoid"], want.to_medoid, atol=1e-5)
    assert got["nearid_threshold"][0] == pytest.approx(want.threshold, abs=1e-5)  # robust z: no fitted curve
    assert got["nearid_medoid"] == [want.medoid]
    assert got["nearid_outliers"] == want.outliers
    assert got["nearid_groups"] == want.groups.tolist()
    kept = outputs["11"]["images"]
    assert len(kept) == len(want.inliers)
    for record, index in zip(kept, want.inliers):
        assert np.abs(_png(comfy.server, record) - batch[index]).max() <= 1
    assert ("12" in outputs) == bool(want.outliers)  # an empty 'outliers' output skips its preview
    assert len(outputs["13"]["images"]) == 1  # the matrix heat-map
    assert outputs["14"]["text"][0] == got["text"][0]


def test_consistency_with_every_image_an_outlier_keeps_the_medoid(comfy, direct_model):
    prompt = _api(CONSISTENCY)
    prompt["10"]["inputs"].update({"threshold_rule": "cosine", "threshold": 1.0})
    outputs = _succeeded(comfy.server.run(prompt))
    want = set_consistency(_embed_files(direct_model, [_reference_path(comfy), *_candidate_paths(comfy)]), threshold=1.0)
    assert outputs["10"]["nearid_outliers"] == [i for i in range(4) if i != want.medoid]
    assert len(outputs["11"]["images"]) == 1 and len(outputs["12"]["images"]) == 3
    assert outputs["10"]["nearid_groups"] == want.groups.tolist()


def test_heatmap_workflow_draws_an_overlay_per_candidate(comfy):
    outputs = _succeeded(comfy.server.run(_api(HEATMAP)))
    images = outputs["11"]["images"]
    assert len(images) == 3
    for record in images:
        assert _png(comfy.server, record).shape == comfy.candidates.shape[1:]
    rows = [line for line in outputs["12"]["text"][0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in rows[1:]] == ["1", "2", "3"]  # header, then one row each


def _run_quick_generation(comfy: Session, prompt: dict, batch_size: int) -> dict:
    """``prompt`` run on the random SD1.5 at 64x64 px and 2 steps (comfyui_env.QUICK_GENERATION)."""
    try:
        return comfy.server.run_quick_generation(prompt, batch_size)
    except ComfyUINotReady as e:
        pytest.fail(str(e), pytrace=False)


def test_generation_workflow_keeps_the_best_by_identity(comfy):
    """Checkpoint loader -> KSampler -> VAE decode -> NearID Rerank on a random-weight SD1.5
    (full size, fp16), at 64x64 px and 2 steps so that it runs on a CPU in about 30 s."""
    prompt = _api(GENERATE_KEEP_BEST)
    prompt["9"]["inputs"]["top_k"] = 2
    # Decode the latents the rerank carried along: they must give the images it kept.
    prompt["90"] = {"class_type": "VAEDecode", "inputs": {"samples": ["9", 1], "vae": ["1", 2]}}
    prompt["91"] = {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}}
    outputs = _succeeded(_run_quick_generation(comfy, prompt, batch_size=3))
    server = comfy.server
    order = outputs["9"]["nearid_order"]
    all_candidates = [_png(server, r) for r in outputs["11"]["images"]]
    kept = [_png(server, r) for r in outputs["10"]["images"]]
    from_latents = [_png(server, r) for r in outputs["91"]["images"]]
    assert len(all_candidates) == 3 and len(kept) == 2 and len(order) == 2
    scores = outputs["9"]["nearid_scores"]  # every candidate, batch order
    assert order == sorted(range(3), key=lambda i: -scores[i])[:2]
    for k, index in enumerate(order):
        assert np.abs(kept[k] - all_candidates[index]).max() <= 1
        assert np.abs(from_latents[k] - kept[k]).max() <= 2
    # (Exact equality with comfy_nearid is checked on LoadImage inputs above: the saved PNGs
    # here are truncated to 8 bits by Save Image, while the nodes saw the float VAE output.)


def test_generation_workflow_keeps_the_consistent_images(comfy, direct_model):
    """Checkpoint -> KSampler -> VAE decode -> NearID Consistency on the random-weight SD1.5,
    at 64x64 px and 2 steps (as above); scores compared with the library on the saved PNGs."""
    outputs = _succeeded(_run_quick_generation(comfy, _api(GENERATE_KEEP_CONSISTENT), batch_size=4))
    server = comfy.server
    candidates = [_png(server, r) for r in outputs["11"]["images"]]
    kept = [_png(server, r) for r in outputs["9"]["images"]]
    got = outputs["8"]
    outliers = got["nearid_outliers"]
    inliers = [i for i in range(4) if i not in outliers]
    assert len(candidates) == 4 and len(kept) == len(inliers) >= 1 and got["nearid_medoid"][0] in inliers
    for k, index in enumerate(inliers):
        assert np.abs(kept[k] - candidates[index]).max() <= 1
    assert ("10" in outputs) == bool(outliers)
    # The node saw the float VAE output, the PNGs are its 8-bit copy: scores agree closely.
    want = set_consistency(direct_model.embed([c.astype(np.uint8) for c in candidates]).numpy())
    np.testing.assert_allclose(got["nearid_scores"], want.mean_to_others, atol=2e-2)


# ----------------------------------------------------------------------------- errors
def _good_prompt(batch_size: int) -> dict:
    prompt = _api(SCORE)
    prompt["10"]["inputs"]["batch_size"] = batch_size  # a new input: really executed again
    return prompt


def _assert_still_serving(comfy: Session, batch_size: int) -> None:
    assert comfy.server.alive()
    _succeeded(comfy.server.run(_good_prompt(batch_size)))


def test_bad_inputs_give_clear_node_errors_and_the_server_stays_up(comfy):
    server = comfy.server
    # Wrong type: an IMAGE where a NEARID_MODEL belongs is refused at validation.
    prompt = _api(SCORE)
    prompt["10"]["inputs"]["nearid_model"] = ["2", 0]
    with pytest.raises(PromptRejected) as rejected:
        server.queue_prompt(prompt)
    errors = rejected.value.body["node_errors"]["10"]["errors"]
    assert any("NEARID_MODEL" in json.dumps(e) for e in errors), errors
    _assert_still_serving(comfy, 3)

    # Missing model file: not in the models/nearid list.
    prompt = _api(SCORE)
    prompt["1"]["inputs"]["head"] = "missing-head.safetensors"
    with pytest.raises(PromptRejected) as rejected:
        server.queue_prompt(prompt)
    assert "missing-head.safetensors" in json.dumps(rejected.value.body["node_errors"]["1"])
    _assert_still_serving(comfy, 4)

    # A file in models/nearid that is not a head: the loader names it.
    (comfy.base / "models" / "nearid" / "broken-head.safetensors").write_bytes(b"\x00" * 64)
    prompt = _api(SCORE)
    prompt["1"]["inputs"]["head"] = "broken-head.safetensors"
    error = history_error(server.run(prompt))
    assert error["node_type"] == "NearIDModelLoader" and "CheckpointError" in error["exception_type"]
    assert "broken-head.safetensors" in error["exception_message"]
    _assert_still_serving(comfy, 5)

    # A mask of the wrong size.
    prompt = _api(SCORE)
    prompt["20"] = {"class_type": "LoadImageMask", "inputs": {"image": "nearid_mask_small.png", "channel": "red"}}
    prompt["10"]["inputs"]["candidate_mask"] = ["20", 0]
    error = history_error(server.run(prompt))
    assert error["node_type"] == "NearIDIdentityScore" and "InvalidInputError" in error["exception_type"]
    assert "mask size 10x10" in error["exception_message"] and "48x40" in error["exception_message"]
    _assert_still_serving(comfy, 6)

    # An empty batch (nothing passed a filter set to return a real empty batch) fed to a score.
    prompt = _api(FILTER)
    prompt["10"]["inputs"].update({"threshold": 100.0, "when_none_pass": "pass nothing", "empty_outputs": "empty batch"})
    del prompt["11"]  # Preview Image itself cannot take an empty batch
    prompt["20"] = {"class_type": "NearIDIdentityScore", "inputs": {
        "nearid_model": ["1", 0], "candidates": ["10", 0], "reference": ["2", 0], "combine": "mean", "batch_size": 16}}
    error = history_error(server.run(prompt))
    assert error["node_type"] == "NearIDIdentityScore"
    assert "candidates: the image batch is empty" in error["exception_message"]
    _assert_still_serving(comfy, 7)


# ----------------------------------------------------------------------------- start-up
def test_a_port_taken_before_the_server_binds_it_is_replaced_by_a_free_one(tmp_path):
    """``free_port`` cannot reserve its port: when another process binds it first, ComfyUI
    exits at start-up and ``ComfyServer.start`` starts it again on a new port."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = ComfyServer(require_comfyui(), tmp_path / "base")
        server.port = taken  # as if free_port had returned it just before the squatter took it
        server.start()
        try:
            assert server.port != taken and server.alive()
            assert "address already in use" in server.log_tail(200_000).lower()
        finally:
            server.stop()


# ----------------------------------------------------------------------------- model cache
def test_second_load_of_the_same_head_reuses_the_model(comfy):
    shutil.copy(comfy.head, comfy.base / "models" / "nearid" / "reuse-test.safetensors")
    prompt = _api(SCORE)
    prompt["1"]["inputs"]["head"] = "reuse-test.safetensors"
    first = _succeeded(comfy.server.run(prompt))["1"]["nearid_load"][0]
    prompt["1"]["inputs"]["device"] = "cpu"  # a different input, so ComfyUI runs the loader again
    second = _succeeded(comfy.server.run(prompt))["1"]["nearid_load"][0]
    assert (first["cached"], second["cached"]) == (False, True)
    # (The times are printed, not compared: on a busy machine any ratio can flip.)
    print(f"\nNearID loader: first load {first['seconds']:.3f} s, second {second['seconds'] * 1000:.3f} ms")
    # Replacing the file (new mtime) loads it again.
    path = comfy.base / "models" / "nearid" / "reuse-test.safetensors"
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = _succeeded(comfy.server.run(prompt))["1"]["nearid_load"][0]
    assert third["cached"] is False


def test_backbone_weights_come_from_the_registered_nearid_backbones_folder(comfy):
    """A head for a backbone with pretrained weights (MobileNetV2): the loader takes the file
    found in models/nearid_backbones/<backbone>/ (seeded random weights here, so that any
    other copy of the ImageNet weights on this machine would give different scores)."""
    import torch
    from torchvision.models import mobilenet_v2

    torch.manual_seed(3)
    folder = comfy.base / "models" / "nearid_backbones" / "mobilenet-v2"
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "my-mobilenet.pth"
    torch.save(mobilenet_v2(weights=None).state_dict(), weights)
    head = comfy.base / "models" / "nearid" / "mobilenet-head.safetensors"
    load_model(backbone="mobilenet-v2", pretrained=False, device="cpu", seed=0).save_head(head)
    prompt = _api(SCORE)
    prompt["1"]["inputs"]["head"] = head.name
    outputs = _succeeded(comfy.server.run(prompt))
    direct = load_model(head=head, backbone_weights=weights, device="cpu", dtype="fp32")
    want = expected_scores(_embed_files(direct, [_reference_path(comfy)]), _embed_files(direct, _candidate_paths(comfy)), "mean")
    np.testing.assert_allclose(outputs["10"]["nearid_scores"], want, atol=1e-5)


# ----------------------------------------------------------------------------- progress, cancel
def _embed_prompt(count: int, batch_size: int) -> dict:
    return {
        "1": {"class_type": "NearIDModelLoader", "inputs": {"head": HEAD, "device": "auto", "dtype": "auto", "readout": "head"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": count, "color": count}},
        "3": {"class_type": "NearIDEmbed", "inputs": {"nearid_model": ["1", 0], "images": ["2", 0], "batch_size": batch_size}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }


async def _run_collecting_progress(
    server: ComfyServer, prompt: dict, interrupt_after: int | None = None
) -> tuple[dict, list[dict], float | None]:
    """Run ``prompt`` while recording the embed node's progress messages (websocket); with
    ``interrupt_after``, press Cancel (POST /interrupt) once that many have arrived.
    Returns (history entry, progress messages, seconds from Cancel to the end)."""
    import aiohttp

    progress: list[dict] = []
    cancelled_at = None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId=nearid-tests") as ws:
            prompt_id = await asyncio.to_thread(server.queue_prompt, prompt)
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                if data["type"] == "progress" and data["data"].get("node") == "3":
                    progress.append(data["data"])
                    if interrupt_after is not None and len(progress) == interrupt_after:
                        cancelled_at = time.perf_counter()
                        await asyncio.to_thread(server.post_json, "/interrupt", {})
                if data["type"] in ("execution_success", "execution_error", "execution_interrupted") and (
                    data["data"].get("prompt_id") == prompt_id
                ):
                    break
    ended = time.perf_counter()
    entry = await asyncio.to_thread(server.wait_for, prompt_id)
    return entry, progress, None if cancelled_at is None else ended - cancelled_at


def test_long_batches_report_progress_and_stop_promptly_on_cancel(comfy):
    server = comfy.server
    small = 64
    entry, progress, _ = asyncio.run(_run_collecting_progress(server, _embed_prompt(small, 8)))
    assert _succeeded(entry)["4"]["text"] == [str(small)]
    assert [p["value"] for p in progress] == list(range(8, small + 1, 8))
    assert all(p["max"] == small for p in progress)

    big = 4096  # EmptyImage's largest batch, embedded one image at a time
    entry, progress, stopped_after = asyncio.run(
        _run_collecting_progress(server, _embed_prompt(big, 1), interrupt_after=20)
    )
    reached = progress[-1]["value"]
    print(f"\ncancel: stopped at image {reached} of {big}, {stopped_after:.2f} s after Cancel")
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in history_message_kinds(entry)
    # Stopped before the end of the batch. How soon after the Cancel depends on when this
    # process and the server are scheduled, so it is printed above, not compared to a bound;
    # 4096 images one at a time leave ~4000 chunks of margin after the 20th progress message.
    assert 20 <= reached < big
    _assert_still_serving(comfy, 8)


# ----------------------------------------------------------------------------- shared cache
def _plant_vectors(cache_path: Path, keys: list[str], seed: int) -> tuple[np.ndarray, str]:
    """Overwrite the cached vectors of ``keys`` (one model identity) with planted unit vectors:
    a reader that returns them has used the cache; a forward pass could never produce them."""
    import sqlite3

    from comfy_nearid.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(cache_path)
    owners = [i for i in cache.model_identities() if set(cache.get_many(i, keys)) == set(keys)]
    assert len(owners) == 1, owners
    dim = len(next(iter(cache.get_many(owners[0], keys).values())))
    cache.close()
    planted = np.random.default_rng(seed).normal(size=(len(keys), dim)).astype(np.float32)
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    with sqlite3.connect(cache_path) as conn:
        for key, vector in zip(keys, planted):
            updated = conn.execute("UPDATE embeddings SET vector = ? WHERE content = ?",
                                   (vector.astype("<f4").tobytes(), key)).rowcount
            assert updated == 1, key
    return planted, owners[0]


def _cache_prompt(reference: str, candidates: list[str]) -> dict:
    prompt = _api(SCORE)
    prompt["2"]["inputs"]["image"] = reference
    for node, name in zip(("3", "4", "5"), candidates):
        prompt[node]["inputs"]["image"] = name
    prompt["10"]["inputs"]["use_cache"] = True
    return prompt


def _write_cache_case(comfy: Session, tag: str, seed: int, gen_dir: Path) -> tuple[str, list[str], list[str]]:
    """A reference and 3 candidates in ComfyUI's input folder, and copies under other names in
    ``gen_dir`` for `nearid score` (same pixels, other files). Returns (reference, candidate
    names, pixel keys of reference + candidates)."""
    from comfy_nearid.embedding_cache import pixels_content_hash

    images = structured_images(seed, 4)
    gen_dir.mkdir(parents=True)
    names = [f"cache_{tag}_{i}.png" for i in range(4)]
    for i, (name, arr) in enumerate(zip(names, images)):
        Image.fromarray(arr).save(comfy.base / "input" / name)
        if i:
            Image.fromarray(arr).save(gen_dir / f"generated_{i}.png")
    return names[0], names[1:], [pixels_content_hash(a) for a in images]


def _score_cli(comfy: Session, reference: Path, gen_dir: Path, out: Path) -> list[list[float]]:
    import csv

    from comfy_nearid.cli import main

    assert main(["score", str(gen_dir), "--reference", str(reference), "--head", str(comfy.head),
                 "--random-weights", "--device", "cpu", "--dtype", "fp32", "--cache", str(comfy.server.embedding_cache),
                 "--no-progress", "--workers", "0", "-o", str(out)]) == 0
    with open(out, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["path"])
    return [float(r["score"]) for r in rows]


@pytest.mark.slow
def test_nearid_score_then_the_node_with_use_cache_runs_no_forward_pass(comfy, tmp_path):
    from comfy_nearid.embedding_cache import EmbeddingCache

    ref, cands, keys = _write_cache_case(comfy, "cli_first", 31, tmp_path / "gen")
    _score_cli(comfy, comfy.base / "input" / ref, tmp_path / "gen", tmp_path / "rows.csv")
    planted, identity = _plant_vectors(comfy.server.embedding_cache, keys, seed=1)
    before = EmbeddingCache(comfy.server.embedding_cache, readonly=True).count(identity)
    outputs = _succeeded(comfy.server.run(_cache_prompt(ref, cands)))
    # the node's scores are the planted vectors' cosines: every embedding came from the cache
    np.testing.assert_allclose(outputs["10"]["nearid_scores"], expected_scores(planted[:1], planted[1:], "mean"),
                               atol=1e-5)
    assert EmbeddingCache(comfy.server.embedding_cache, readonly=True).count(identity) == before


@pytest.mark.slow
def test_the_node_with_use_cache_then_nearid_score_runs_no_forward_pass(comfy, tmp_path):
    ref, cands, keys = _write_cache_case(comfy, "node_first", 32, tmp_path / "gen")
    _succeeded(comfy.server.run(_cache_prompt(ref, cands)))
    planted, _ = _plant_vectors(comfy.server.embedding_cache, keys, seed=2)
    scores = _score_cli(comfy, comfy.base / "input" / ref, tmp_path / "gen", tmp_path / "rows.csv")
    np.testing.assert_allclose(scores, expected_scores(planted[:1], planted[1:], "mean"), atol=1e-5)
