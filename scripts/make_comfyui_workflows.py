#!/usr/bin/env python
"""Write the example ComfyUI workflows in ``workflows/`` (UI format) and their API-format twins
in ``workflows/api/`` from one description, using a live ComfyUI's ``/object_info`` for each
node's slots and widget order (so the two formats cannot drift apart; the tests convert every
UI graph back to API format and compare).

Needs ComfyUI prepared by ``scripts/setup_comfyui.py``. Run after changing a graph below or a
node's inputs::

    python scripts/make_comfyui_workflows.py

then ``python scripts/make_template_thumbnails.py`` for the templates' thumbnails.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
sys.path.insert(0, str(REPO_ROOT / "tests"))

from comfyui_env import ComfyServer, require_comfyui  # noqa: E402

HEAD = "nearid-siglip2-head.safetensors"
REFERENCE = "nearid_reference.png"
CANDIDATES = ("nearid_candidate_1.png", "nearid_candidate_2.png", "nearid_candidate_3.png")
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
VIRTUAL_NODES = {"MarkdownNote", "Note"}  # frontend-only: not executed, not in the API format
LIST_SHAPE, OPTIONAL_SHAPE = 6, 7  # LiteGraph slot shapes the frontend uses for lists / optional inputs


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[int, int]] = field(default_factory=dict)
    pos: tuple[int, int] = (0, 0)
    title: str | None = None
    text: str | None = None  # for notes
    size: tuple[int, int] | None = None  # width, height below the title bar (default: from the slots)


@dataclass
class Graph:
    name: str  # the file name, and so the title ComfyUI's template browser shows (docs/comfyui.md)
    nodes: list[Node]


# Layout (canvas units; a node's title bar, TITLE px, sits above its pos). Columns never share x
# ranges and nodes in a column are GAP apart, so no two nodes overlap; the saved view (VIEW) shows
# the "About this workflow" note at the top left below the front end's menu and tab bars.
TITLE, GAP = 30, 40
IMAGE_SIZE = (340, 400)  # LoadImage / PreviewImage with their image preview
LOADER_SIZE = (340, 170)
NOTE_SIZE = (620, 190)
VIEW = {"scale": 0.6, "offset": [140, 250]}  # clear of the sidebar (left) and the bars (top)
TOP = 40 + NOTE_SIZE[1] + TITLE + GAP  # first row below the note


def _below(y: int, height: int) -> int:
    return y + height + TITLE + GAP


def _loader(nid: int, pos: tuple[int, int]) -> Node:
    return Node(nid, "NearIDModelLoader", {"head": HEAD, "device": "auto", "dtype": "auto", "readout": "head", "download": False},
                pos=pos, size=LOADER_SIZE)


def _image(nid: int, name: str, pos: tuple[int, int], title: str) -> Node:
    return Node(nid, "LoadImage", {"image": name}, pos=pos, title=title, size=IMAGE_SIZE)


def _inputs_column(first_id: int, reference_title: str = "Reference") -> tuple[list[Node], int]:
    """Loader (id 1) and Reference (id 2) in column 1; three candidates (LoadImage, titled
    "Candidate 1-3" like the node text numbers them) in column 2, joined into one batch by two
    ImageBatch nodes in column 3. Returns (nodes, id of the batch)."""
    x2, x3 = 40 + IMAGE_SIZE[0] + GAP, 40 + 2 * (IMAGE_SIZE[0] + GAP)
    nodes = [_loader(1, (40, TOP)), _image(2, REFERENCE, (40, _below(TOP, LOADER_SIZE[1])), reference_title)]
    y = TOP
    for i, name in enumerate(CANDIDATES):
        nodes.append(_image(first_id + i, name, (x2, y), f"Candidate {i + 1}"))
        y = _below(y, IMAGE_SIZE[1])
    b1, b2 = first_id + 3, first_id + 4
    nodes.append(Node(b1, "ImageBatch", links={"image1": (first_id, 0), "image2": (first_id + 1, 0)},
                      pos=(x3, TOP + 300), size=(220, 70)))
    nodes.append(Node(b2, "ImageBatch", links={"image1": (b1, 0), "image2": (first_id + 2, 0)},
                      pos=(x3, TOP + 760), size=(220, 70)))
    return nodes, b2


SCORE_X = 40 + 2 * (IMAGE_SIZE[0] + GAP) + 220 + GAP  # column 4, right of the ImageBatch nodes
OUT_X = SCORE_X + 380 + GAP  # column 5: previews


def _note(nid: int, text: str) -> Node:
    return Node(nid, "MarkdownNote", pos=(40, 40), title="About this workflow", text=text, size=NOTE_SIZE)


def graphs() -> list[Graph]:
    score_nodes, batch = _inputs_column(3)
    score = Graph("NearID score a batch", [
        _note(100, (
            f"**Score a batch against a reference.** Put a NearID head in `models/nearid` (e.g. `{HEAD}` "
            "from `nearid convert`), load your reference and candidate images. The Identity Score node "
            "lists the raw cosine and the 0-100 identity match of every candidate (numbered like "
            "Candidate 1-3), marks the best, and says whether the match is calibrated.")),
        *score_nodes,
        Node(10, "NearIDIdentityScore", {"combine": "mean", "batch_size": 16, "use_cache": False},
             {"nearid_model": (1, 0), "candidates": (batch, 0), "reference": (2, 0)}, pos=(SCORE_X, TOP), size=(380, 480)),
        Node(11, "PreviewAny", links={"source": (10, 2)}, pos=(OUT_X, TOP), title="Scores", size=(520, 360)),
    ])

    generate = Graph("NearID generate and keep the best", [
        _note(100, (
            "**Generate N candidates and keep the one that best preserves the reference identity.** "
            f"Pick a Stable Diffusion 1.5 checkpoint in *Load Checkpoint* (the graph names `{CHECKPOINT}`, "
            "ComfyUI's SD1.5 example file; without it *Run* stops with `Value not in list`). "
            "Any text-to-image or personalisation graph (IP-Adapter, PuLID, InstantID, LoRA ...) can "
            "feed the batch; NearID Rerank sorts it by identity score and keeps the top k, with the "
            "latents in the same order (e.g. for an upscale pass).")),
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, pos=(40, TOP), size=(340, 100)),
        Node(2, "CLIPTextEncode", {"text": "a photo of a red ceramic mug on a wooden table, soft light"},
             {"clip": (1, 1)}, pos=(420, TOP), title="Positive", size=(400, 180)),
        Node(3, "CLIPTextEncode", {"text": "blurry, low quality, deformed"}, {"clip": (1, 1)},
             pos=(420, _below(TOP, 180)), title="Negative", size=(400, 180)),
        Node(4, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 4},
             pos=(420, _below(_below(TOP, 180), 180)), size=(400, 130)),
        Node(5, "KSampler", {"seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
             {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}, pos=(860, TOP), size=(320, 270)),
        Node(6, "VAEDecode", links={"samples": (5, 0), "vae": (1, 2)}, pos=(1220, TOP), size=(220, 50)),
        _loader(7, (860, _below(TOP, 270))),
        _image(8, REFERENCE, (860, _below(_below(TOP, 270), LOADER_SIZE[1])), "Reference"),
        Node(9, "NearIDRerank", {"top_k": 1, "combine": "mean", "batch_size": 16, "use_cache": False},
             {"nearid_model": (7, 0), "candidates": (6, 0), "reference": (8, 0), "latent": (5, 0)},
             pos=(1240, _below(TOP, 270)), size=(380, 480)),
        Node(10, "SaveImage", {"filename_prefix": "nearid_best"}, {"images": (9, 0)},
             pos=(1660, _below(TOP, 270)), title="Best by identity", size=IMAGE_SIZE),
        Node(11, "PreviewImage", links={"images": (6, 0)}, pos=(1480, TOP), title="All candidates", size=(400, 270)),
        Node(12, "PreviewAny", links={"source": (9, 5)}, pos=(1240, _below(_below(TOP, 270), 480)),
             title="Ranking", size=(520, 380)),
    ])

    filter_nodes, batch = _inputs_column(3)
    filtering = Graph("NearID filter by threshold", [
        _note(100, (
            "**Filter a batch by an identity threshold.** Candidates whose identity match reaches the "
            "threshold go to *passed*, the others to *rejected*. When none passes, *when_none_pass* "
            "decides: pass nothing, or keep the single best candidate. An output left empty skips the "
            "nodes it feeds (*empty_outputs*), so the previews never fail on an empty batch.")),
        *filter_nodes,
        Node(10, "NearIDFilter", {"threshold": 50.0, "threshold_on": "identity match (0-100)",
                                  "when_none_pass": "keep best", "empty_outputs": "skip downstream nodes",
                                  "combine": "mean", "batch_size": 16, "use_cache": False},
             {"nearid_model": (1, 0), "candidates": (batch, 0), "reference": (2, 0)}, pos=(SCORE_X, TOP), size=(380, 580)),
        Node(11, "PreviewImage", links={"images": (10, 0)}, pos=(OUT_X, TOP), title="Passed", size=IMAGE_SIZE),
        Node(12, "PreviewImage", links={"images": (10, 1)}, pos=(OUT_X, _below(TOP, IMAGE_SIZE[1])), title="Rejected", size=IMAGE_SIZE),
        Node(13, "PreviewAny", links={"source": (10, 6)}, pos=(OUT_X + IMAGE_SIZE[0] + GAP, TOP), title="Decision", size=(520, 420)),
    ])

    heat_nodes, batch = _inputs_column(3)
    heatmap = Graph("NearID attention heatmap", [
        _note(100, (
            "**See what the identity score looked at.** NearID Heatmap draws the head's attention over "
            "each candidate; with the reference connected it also lists the scores.")),
        *heat_nodes,
        Node(10, "NearIDHeatmap", {"opacity": 0.55, "colormap": "inferno", "combine": "mean"},
             {"nearid_model": (1, 0), "images": (batch, 0), "reference": (2, 0)}, pos=(SCORE_X, TOP), size=(380, 480)),
        Node(11, "PreviewImage", links={"images": (10, 0)}, pos=(OUT_X, TOP), title="Attention overlay", size=(400, 440)),
        Node(12, "PreviewAny", links={"source": (10, 2)}, pos=(OUT_X, _below(TOP, 440)), title="Scores", size=(520, 360)),
    ])
    cons_nodes, cons_batch = _inputs_column(3, reference_title="Character image")
    consistency = Graph("NearID batch consistency", [
        _note(100, (
            "**Keep the consistent images of a character batch, without a reference.** NearID "
            "Consistency compares every image with every other: the medoid is the most representative "
            "one, images far from it are outliers, and the groups say how many identities the batch "
            "holds. Feed it a generated batch (e.g. a VAE Decode output) in place of the loaded images. "
            "*consistent* is the batch without its outliers; an empty *outliers* output skips the "
            "nodes it feeds.")),
        *cons_nodes,
        Node(9, "ImageBatch", links={"image1": (2, 0), "image2": (cons_batch, 0)}, pos=(SCORE_X, TOP), size=(220, 70)),
        Node(10, "NearIDConsistency", {"threshold_rule": "auto (head's calibrated 50, else robust z)", "threshold": 50.0,
                                       "outlier_z": 3.5, "empty_outputs": "skip downstream nodes", "batch_size": 16,
                                       "use_cache": False},
             {"nearid_model": (1, 0), "images": (9, 0)}, pos=(SCORE_X, _below(TOP, 70)), size=(380, 560)),
        Node(11, "PreviewImage", links={"images": (10, 0)}, pos=(OUT_X, TOP), title="Consistent", size=IMAGE_SIZE),
        Node(12, "PreviewImage", links={"images": (10, 1)}, pos=(OUT_X, _below(TOP, IMAGE_SIZE[1])), title="Outliers", size=IMAGE_SIZE),
        Node(13, "PreviewImage", links={"images": (10, 3)}, pos=(OUT_X, _below(_below(TOP, IMAGE_SIZE[1]), IMAGE_SIZE[1])),
             title="Similarity matrix", size=IMAGE_SIZE),
        Node(14, "PreviewAny", links={"source": (10, 9)}, pos=(OUT_X + IMAGE_SIZE[0] + GAP, TOP), title="Groups and scores", size=(520, 420)),
    ])
    generate_consistent = Graph("NearID generate and keep consistent", [
        _note(100, (
            "**Generate a batch of one character and keep the consistent ones.** "
            f"Pick a Stable Diffusion 1.5 checkpoint in *Load Checkpoint* (the graph names `{CHECKPOINT}`; "
            "without it *Run* stops with `Value not in list`). Any character "
            "graph (LoRA, IP-Adapter, PuLID, InstantID ...) can feed the batch; NearID Consistency "
            "needs no reference: it keeps the images close to the batch's most representative one "
            "(the medoid) and drops the outliers, which the second preview shows (skipped when none).")),
        Node(1, "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, pos=(40, TOP), size=(340, 100)),
        Node(2, "CLIPTextEncode", {"text": "a cartoon fox character with a blue scarf, full body, white background"},
             {"clip": (1, 1)}, pos=(420, TOP), title="Positive", size=(400, 180)),
        Node(3, "CLIPTextEncode", {"text": "blurry, low quality, deformed"}, {"clip": (1, 1)},
             pos=(420, _below(TOP, 180)), title="Negative", size=(400, 180)),
        Node(4, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 6},
             pos=(420, _below(_below(TOP, 180), 180)), size=(400, 130)),
        Node(5, "KSampler", {"seed": 7, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
             {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}, pos=(860, TOP), size=(320, 270)),
        Node(6, "VAEDecode", links={"samples": (5, 0), "vae": (1, 2)}, pos=(1220, TOP), size=(220, 50)),
        _loader(7, (860, _below(TOP, 270))),
        Node(8, "NearIDConsistency", {"threshold_rule": "auto (head's calibrated 50, else robust z)", "threshold": 50.0,
                                      "outlier_z": 3.5, "empty_outputs": "skip downstream nodes", "batch_size": 16,
                                       "use_cache": False},
             {"nearid_model": (7, 0), "images": (6, 0)}, pos=(1240, _below(TOP, 270)), size=(380, 560)),
        Node(9, "SaveImage", {"filename_prefix": "nearid_consistent"}, {"images": (8, 0)},
             pos=(1660, _below(TOP, 270)), title="Consistent", size=IMAGE_SIZE),
        Node(10, "PreviewImage", links={"images": (8, 1)}, pos=(1660, _below(_below(TOP, 270), IMAGE_SIZE[1])),
             title="Outliers", size=IMAGE_SIZE),
        Node(11, "PreviewImage", links={"images": (6, 0)}, pos=(1480, TOP), title="All candidates", size=(400, 270)),
        Node(12, "PreviewAny", links={"source": (8, 9)}, pos=(860, _below(_below(TOP, 270), LOADER_SIZE[1])),
             title="Groups and scores", size=(360, 400)),
    ])
    return [score, generate, filtering, heatmap, consistency, generate_consistent]


def _is_widget(spec: list[Any]) -> bool:
    return isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _order(graph: Graph) -> dict[int, int]:
    """Topological execution order (the UI format records it per node)."""
    order: dict[int, int] = {}
    remaining = [n for n in graph.nodes if n.type not in VIRTUAL_NODES]
    while remaining:
        ready = [n for n in remaining if all(src in order for src, _ in n.links.values())]
        if not ready:
            raise ValueError(f"{graph.name}: cycle among {[n.id for n in remaining]}")
        for n in ready:
            order[n.id] = len(order)
        remaining = [n for n in remaining if n.id not in order]
    return order


def build(graph: Graph, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UI-format workflow, API-format prompt) for ``graph``."""
    order = _order(graph)
    by_id = {n.id: n for n in graph.nodes}
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_link: dict[tuple[int, str], int] = {}
    for node in graph.nodes:
        for name, (src, slot) in node.links.items():
            src_info = info[by_id[src].type]
            link_id = len(links) + 1
            links.append([link_id, src, slot, node.id, None, src_info["output"][slot]])
            out_links.setdefault((src, slot), []).append(link_id)
            in_link[(node.id, name)] = link_id
    ui_nodes, api = [], {}
    for node in graph.nodes:
        if node.type in VIRTUAL_NODES:
            ui_nodes.append({
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or NOTE_SIZE), "flags": {},
                "order": len(order) + node.id, "mode": 0, "inputs": [], "outputs": [],
                "title": node.title, "properties": {}, "widgets_values": [node.text],
            })
            continue
        ninfo = info[node.type]
        inputs, widgets_values, api_inputs = [], [], {}
        for section in ("required", "optional"):
            for name, spec in ninfo["input"].get(section, {}).items():
                if _is_widget(spec) and name not in node.links:
                    if name not in node.widgets:
                        continue
                    value = node.widgets[name]
                    widgets_values.append(value)
                    api_inputs[name] = value
                    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if opts.get("control_after_generate"):
                        widgets_values.append("randomize")
                    if opts.get("image_upload"):
                        widgets_values.append("image")
                    continue
                slot = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": in_link.get((node.id, name))}
                if section == "optional":
                    slot["shape"] = OPTIONAL_SHAPE
                inputs.append(slot)
                if name in node.links:
                    src, src_slot = node.links[name]
                    api_inputs[name] = [str(src), src_slot]
        for i, slot in enumerate(inputs):
            if slot["link"] is not None:
                links[slot["link"] - 1][4] = i
        missing = set(node.widgets) - set(api_inputs)
        if missing:
            raise ValueError(f"{graph.name}: node {node.id} ({node.type}) has no input(s) {sorted(missing)}")
        outputs = []
        for slot, (kind, out_name) in enumerate(zip(ninfo["output"], ninfo["output_name"])):
            entry = {"name": out_name, "type": kind, "links": out_links.get((node.id, slot)) or None, "slot_index": slot}
            if ninfo.get("output_is_list", [False] * len(ninfo["output"]))[slot]:
                entry["shape"] = LIST_SHAPE
            outputs.append(entry)
        n_slots = max(len(inputs), len(outputs)) + len(widgets_values)
        ui_node = {
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size or (320, 46 + 24 * n_slots)),
            "flags": {}, "order": order[node.id], "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node.type}, "widgets_values": widgets_values,
        }
        if node.title:
            ui_node["title"] = node.title
        ui_nodes.append(ui_node)
        api[str(node.id)] = {"class_type": node.type, "inputs": api_inputs, "_meta": {"title": node.title or ninfo["display_name"]}}
    ui = {
        "last_node_id": max(n.id for n in graph.nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": dict(VIEW)},
        "version": 0.4,
    }
    return ui, api


def main() -> int:
    tree = require_comfyui()
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(tree, Path(tmp)).start()
        try:
            info = server.get_json("/object_info")
        finally:
            server.stop()
    (WORKFLOWS / "api").mkdir(parents=True, exist_ok=True)
    for graph in graphs():
        ui, api = build(graph, info)
        (WORKFLOWS / f"{graph.name}.json").write_text(json.dumps(ui, indent=2) + "\n")
        (WORKFLOWS / "api" / f"{graph.name}.json").write_text(json.dumps(api, indent=2) + "\n")
        print(f"wrote workflows/{graph.name}.json and workflows/api/{graph.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
