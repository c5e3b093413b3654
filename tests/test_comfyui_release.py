"""The paper's transformers release, dropped into ``models/nearid`` of a real ComfyUI 0.3.75
server, scored through the Identity Score node.

The server gets its own Hugging Face endpoint: a local socket that records every connection
and closes it without an answer (a network that delivers nothing). So "nothing is downloaded
without the toggle" is checked by the recorder staying silent, and "the toggle without a
network gives a clear node error" by the error the loader shows after the recorder saw it try.
Expected scores come from the transformers model's own forward on the same PNG files, and from
the same release converted by ``nearid convert``.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _comfyui_helpers import expected_scores, structured_images
from comfy_nearid import load_model
from comfy_nearid.cli import main as cli_main
from comfyui_env import ComfyServer, ComfyUINotReady, history_error, prepare_base_dir, require_comfyui

pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")

from _release_helpers import reference_embeddings, reference_model, save_release  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
PAPER_LAYOUT = "paper-release/model.safetensors"  # a sub-folder with config.json, transformers 4.x keys
RENAMED = "renamed-release.safetensors"  # any name, no config.json, transformers 5.x keys
CACHE_TEST = "cache-test-release.safetensors"
RELEASE_ENTRY = "nearid-siglip2/model.safetensors"  # where the download toggle would put it


@dataclass
class ConnectionRecorder:
    """A TCP listener that records each request line it receives and hangs up."""

    sock: socket.socket
    requests: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed at the end of the module
                return
            with conn:
                conn.settimeout(10)
                try:
                    self.requests.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
                except OSError:
                    self.requests.append("<no request line>")


@dataclass
class ReleaseSession:
    server: ComfyServer
    recorder: ConnectionRecorder
    models: dict  # release name -> transformers model

    @property
    def base(self) -> Path:
        return self.server.base


@pytest.fixture(scope="module")
def release_comfy(tmp_path_factory) -> ReleaseSession:
    try:
        tree = require_comfyui()
    except ComfyUINotReady as e:
        pytest.fail(str(e), pytrace=False)
    base = prepare_base_dir(tmp_path_factory.mktemp("comfyui-release"))
    nearid = base / "models" / "nearid"
    models = {PAPER_LAYOUT: reference_model(seed=21), RENAMED: reference_model(seed=22), CACHE_TEST: reference_model(seed=23)}
    save_release(models[PAPER_LAYOUT], nearid / PAPER_LAYOUT, "4.x", with_config=True)
    save_release(models[RENAMED], nearid / RENAMED, "5.x")
    save_release(models[CACHE_TEST], nearid / CACHE_TEST, "5.x")
    Image.fromarray(structured_images(31, 1)[0]).save(base / "input" / "nearid_reference.png")
    for i, arr in enumerate(structured_images(32, 3)):
        Image.fromarray(arr).save(base / "input" / f"nearid_candidate_{i + 1}.png")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    recorder = ConnectionRecorder(listener)
    threading.Thread(target=recorder.serve, daemon=True).start()
    env = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_ENDPOINT": recorder.url, "HF_HOME": str(base / "hf-home")}
    server = ComfyServer(tree, base, env=env).start()
    try:
        yield ReleaseSession(server, recorder, models)
    finally:
        server.stop()
        listener.close()


def _score_prompt(head: str, **loader_inputs) -> dict:
    prompt = json.loads((WORKFLOWS / "api" / "NearID score a batch.json").read_text())
    prompt["1"]["inputs"].update({"head": head, **loader_inputs})
    return prompt


def _succeeded(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    return entry["outputs"]


def _pngs(s: ReleaseSession) -> tuple[list[Image.Image], list[Image.Image]]:
    ref = [Image.open(s.base / "input" / "nearid_reference.png").convert("RGB")]
    cands = [Image.open(s.base / "input" / f"nearid_candidate_{i + 1}.png").convert("RGB") for i in range(3)]
    return ref, cands


def _transformers_scores(s: ReleaseSession, name: str) -> np.ndarray:
    ref, cands = _pngs(s)
    model = s.models[name]
    return expected_scores(reference_embeddings(model, ref).numpy(), reference_embeddings(model, cands).numpy(), "mean")


def test_loader_lists_releases_and_heads_with_their_backbones(release_comfy):
    spec = release_comfy.server.get_json("/object_info/NearIDModelLoader")["NearIDModelLoader"]["input"]
    names, options = spec["required"]["head"]
    assert {PAPER_LAYOUT, RENAMED, CACHE_TEST, RELEASE_ENTRY} <= set(names)
    tip = options["tooltip"]
    assert f"{PAPER_LAYOUT}: release (transformers 4.x) on tiny-siglip, backbone included" in tip
    assert f"{RENAMED}: release (transformers 5.x) on tiny-siglip, backbone included" in tip
    assert f"{RELEASE_ENTRY}: the paper's release, not downloaded yet" in tip
    assert spec["optional"]["download"][1]["default"] is False


@pytest.mark.parametrize("name", [PAPER_LAYOUT, RENAMED])
def test_release_scores_equal_transformers_and_nearid_convert(release_comfy, tmp_path, name):
    outputs = _succeeded(release_comfy.server.run(_score_prompt(name)))
    got = np.asarray(outputs["10"]["nearid_scores"])
    np.testing.assert_allclose(got, _transformers_scores(release_comfy, name), atol=1e-5, rtol=0)
    # the same release through `nearid convert` (the CLI) and load_model
    release = release_comfy.base / "models" / "nearid" / name
    head, backbone = tmp_path / "head.safetensors", tmp_path / "backbone.safetensors"
    assert cli_main(["convert", str(release), "--out", str(head), "--backbone-out", str(backbone)]) == 0
    converted = load_model(head, backbone_weights=backbone, device="cpu", dtype="fp32")
    ref, cands = _pngs(release_comfy)
    want = expected_scores(converted.embed(ref).numpy(), converted.embed(cands).numpy(), "mean")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    load = outputs["1"]["nearid_load"][0]
    assert (load["kind"], load["backbone"]) == ("release", "tiny-siglip")


def test_second_load_reads_the_cached_conversion(release_comfy):
    server = release_comfy.server
    first = _succeeded(server.run(_score_prompt(CACHE_TEST)))
    cache = release_comfy.base / "models" / "nearid" / ".nearid-cache"
    entries = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.safetensors")}
    # the pooled readout rebuilds the model (another loaded-model key) from the same conversion;
    # for a release the backbone's own pooling is the release's head, so the scores agree
    second = _succeeded(server.run(_score_prompt(CACHE_TEST, readout="pooled")))
    a, b = first["1"]["nearid_load"][0], second["1"]["nearid_load"][0]
    assert (a["cached"], a["conversion"]) == (False, "converted")
    assert (b["cached"], b["conversion"]) == (False, "reused")
    assert {p: p.stat().st_mtime_ns for p in entries} == entries  # read back, nothing rewritten
    print(f"\nrelease load: first (convert) {a['seconds']:.3f} s, second (cached conversion) {b['seconds']:.3f} s, "
          f"ratio {b['seconds'] / a['seconds']:.2f}")
    want = _transformers_scores(release_comfy, CACHE_TEST)
    for outputs in (first, second):
        np.testing.assert_allclose(outputs["10"]["nearid_scores"], want, atol=1e-5, rtol=0)
    # the cache's own files are never offered in the list
    names = server.get_json("/object_info/NearIDModelLoader")["NearIDModelLoader"]["input"]["required"]["head"][0]
    assert entries and not [n for n in names if n.startswith(".nearid-cache")]


def test_without_the_toggle_nothing_is_downloaded(release_comfy):
    before = len(release_comfy.recorder.requests)
    error = history_error(release_comfy.server.run(_score_prompt(RELEASE_ENTRY, download=False)))
    assert error["node_type"] == "NearIDModelLoader" and "WeightsNotFoundError" in error["exception_type"]
    assert "is not downloaded yet. Turn on 'download' in Load NearID Model" in error["exception_message"]
    assert release_comfy.recorder.requests[before:] == []  # no connection to the hub at all
    assert not (release_comfy.base / "models" / "nearid" / "nearid-siglip2").exists()


def test_the_toggle_without_a_network_gives_a_clear_node_error(release_comfy):
    before = len(release_comfy.recorder.requests)
    error = history_error(release_comfy.server.run(_score_prompt(RELEASE_ENTRY, download=True)))
    assert error["node_type"] == "NearIDModelLoader" and "WeightsNotFoundError" in error["exception_type"]
    message = error["exception_message"]
    assert "cannot download Aleksandar/nearid-siglip2: the Hugging Face hub is not reachable (no network?)" in message
    assert "https://huggingface.co/Aleksandar/nearid-siglip2" in message
    tried = release_comfy.recorder.requests[before:]
    assert any("/Aleksandar/nearid-siglip2/resolve/" in line for line in tried), (tried, message)
    assert not (release_comfy.base / "models" / "nearid" / RELEASE_ENTRY).exists()
    # the server keeps serving
    _succeeded(release_comfy.server.run(_score_prompt(RENAMED, dtype="fp32")))
