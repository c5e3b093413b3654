"""ComfyUI's own front end (1.32.9) in headless Chromium, for the browser test
(``tests/test_comfyui_browser.py``) and ``scripts/make_template_thumbnails.py``: the inputs the
example templates name, a page that waits until the app is ready, loading a template the way
the template browser does, and running the loaded graph from the page."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from PIL import Image

from _comfyui_helpers import structured_images
from comfyui_env import PACK_NAME, ComfyServer

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
HEAD = "nearid-siglip2-head.safetensors"  # the head file the templates name
PREVIEW_AS_TEXT = "PreviewAny"
WINDOW = {"width": 1600, "height": 1000}
# A returning user's settings: no first-run template dialog over the canvas, and no minimap
# (screenshots and thumbnails show the graph alone).
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def template_names() -> list[str]:
    """The templates' file names without ``.json``: the titles the template browser shows."""
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def api_twin(name: str) -> dict[str, Any]:
    """The API-format twin of template ``name`` (``workflows/api/<name>.json``)."""
    return json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def as_sent_by_the_front_end(twin: dict[str, Any]) -> dict[str, Any]:
    """What ``app.graphToPrompt()`` sends for a twin: the twin plus the documented default, an
    empty ``preview`` input on Preview as Text (the front end's own widget; the server ignores it)."""
    out = json.loads(json.dumps(twin))
    for node in out.values():
        if node["class_type"] == PREVIEW_AS_TEXT:
            node["inputs"]["preview"] = ""
    return out


def write_example_inputs(base: Path, image_size: tuple[int, int] = (40, 48)) -> Path:
    """The files the templates name, in a ComfyUI base folder: a random-weight ``tiny-siglip``
    head as ``models/nearid/<HEAD>`` and the reference and candidate images (``image_size``:
    height, width) in ``input/``."""
    from comfy_nearid import load_model

    model = load_model(backbone="tiny-siglip", pretrained=False, device="cpu", dtype="fp32", seed=0)
    model.save_head(base / "models" / "nearid" / HEAD, provenance={"backbone_seed": 0})
    Image.fromarray(structured_images(11, 1, *image_size)[0]).save(base / "input" / "nearid_reference.png")
    for i, arr in enumerate(structured_images(12, 3, *image_size)):
        Image.fromarray(arr).save(base / "input" / f"nearid_candidate_{i + 1}.png")
    return base


class Page:
    """One Chromium page on a ComfyUI server, recording console errors and page errors."""

    def __init__(self, browser, url: str, viewport: dict[str, int] | None = None) -> None:
        self.errors: list[str] = []
        self.page = browser.new_page(viewport=viewport or WINDOW)
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(url, wait_until="load")
        # the app is ready when the node definitions are registered and a graph exists
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph"
            " && Object.keys(window.LiteGraph.registered_node_types).includes('KSampler')",
            timeout=180_000,
        )

    def js(self, expression: str, arg=None):
        return self.page.evaluate(expression, arg)

    def load_template(self, name: str) -> None:
        """Fetch the template from the server's template route and open it, as the template
        browser does (the saved view included)."""
        self.js(_LOAD_TEMPLATE, [PACK_NAME, name])

    def draw(self) -> None:
        """Redraw the canvas and let the DOM widgets (notes, text) follow it for two frames."""
        self.js("""async () => { window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true);
            for (let i = 0; i < 2; i++) await new Promise((r) => requestAnimationFrame(r)); }""")

    def run_graph(self, server: ComfyServer, timeout: float = 600.0) -> dict[str, Any]:
        """Queue the loaded graph from the page (``app.queuePrompt``), wait for it on the server
        and until the page shows its outputs; returns the prompt's /history entry."""
        before = set(server.get_json("/history"))
        self.js("async () => { await window.app.queuePrompt(0, 1); }")
        deadline = time.monotonic() + timeout
        while not (new := set(server.get_json("/history")) - before):
            if time.monotonic() > deadline or not server.running():
                raise TimeoutError(f"no prompt from the page reached the history:\n{server.log_tail()}")
            time.sleep(0.2)  # polling the server; the deadline only bounds a hung run
        (prompt_id,) = new
        entry = server.wait_for(prompt_id, timeout)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"the graph run from the page failed: {entry['status']}")
        shown = {node_id: len(output.get("images", [])) for node_id, output in entry["outputs"].items()}
        self.page.wait_for_function(_OUTPUTS_SHOWN, arg=shown, timeout=int(timeout * 1000))
        return entry


_LOAD_TEMPLATE = """async ([pack, name]) => {
  const response = await fetch(`/api/workflow_templates/${pack}/${encodeURIComponent(name)}.json`);
  if (!response.ok) throw new Error(`template ${name}: HTTP ${response.status}`);
  await window.app.loadGraphData(await response.json(), true, true, name);
  window.app.canvas.draw(true, true);
  return true;
}"""

# Every output node of the run has its outputs in the app, and its images are loaded.
_OUTPUTS_SHOWN = """(shown) => Object.entries(shown).every(([id, images]) => {
  const node = window.app.graph.getNodeById(Number(id));
  if (!node || !window.app.nodeOutputs[String(id)]) return false;
  if (!images) return true;
  const imgs = node.imgs || [];
  return imgs.length === images && imgs.every((i) => i.complete && i.naturalWidth > 0);
})"""
