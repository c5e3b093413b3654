#!/usr/bin/env python
"""Write each template's thumbnail, ``workflows/<name>.jpg``: the graph in ComfyUI's own front
end after a run from the page, without the minimap.

ComfyUI's front end 1.32.9 shows a custom-node template's card with the image
``/api/workflow_templates/<pack>/<name>.jpg``, served from ``workflows/<name>.jpg`` (the JPEG
type is fixed in the front end; it reads no other file). This script

1. starts the real ComfyUI (prepared by ``scripts/setup_comfyui.py``) with the pack, the inputs
   the templates name (a random-weight ``tiny-siglip`` head and the test images of
   ``tests/_comfyui_page.py``) and the random SD1.5 test checkpoint linked under the name the
   generation templates give their checkpoint;
2. opens the page in the Debian Chromium, driven by Playwright (``tests/_browser.py`` finds it;
   no browser download), with the minimap off;
3. per template: loads it as the template browser does and runs it from the page. The
   generation templates run at ``comfyui_env.QUICK_GENERATION`` (64x64 px, 2 steps, cfg 1: on a
   CPU the templates' 512x512 px and 20 steps take many minutes, and the random checkpoint
   draws noise at any size); their widgets are then set back to the template's values, so the
   card shows the graph as it opens;
4. fits the graph into a large window, screenshots it and saves it as a 1024 px wide JPEG.

Usage::

    python scripts/make_template_thumbnails.py                  # every template
    python scripts/make_template_thumbnails.py --only "NearID score a batch"
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT))

from _browser import chromium_path  # noqa: E402
from _comfyui_page import (  # noqa: E402
    PREVIEW_AS_TEXT,
    SETTINGS,
    WORKFLOWS,
    Page,
    api_twin,
    as_sent_by_the_front_end,
    template_names,
    write_example_inputs,
)
from comfyui_env import QUICK_GENERATION, ComfyServer, link_sd15_checkpoint, require_comfyui  # noqa: E402

logger = logging.getLogger("make_template_thumbnails")

# A large window keeps the whole graph above the front end's low-quality zoom (below it the
# canvas drops the widgets' text); the shot is scaled down to THUMBNAIL_WIDTH.
THUMBNAIL_WINDOW = {"width": 2560, "height": 1800}
# Where the graph may go: clear of the side bar (left), the banner, tab bar and workflow name
# (top), the run button's "job completed" panel (top right), and the canvas tool bar and
# statistics (bottom).
FREE_AREA = (80, 200, THUMBNAIL_WINDOW["width"] - 30, THUMBNAIL_WINDOW["height"] - 90)
INPUT_IMAGE_SIZE = (200, 240)  # height, width of the example images: large enough to see in the previews
MARGIN = 16  # px of canvas around the graph in the shot
THUMBNAIL_WIDTH = 1024
JPEG_QUALITY = 85

# The values of every widget that is one of its node's inputs: [[node id, widget, value]].
_INPUT_WIDGET_VALUES = """() => window.app.graph._nodes.flatMap((node) => {
  const spec = node.constructor.nodeData?.input || {};
  const inputs = new Set([...Object.keys(spec.required || {}), ...Object.keys(spec.optional || {})]);
  return (node.widgets || []).filter((w) => inputs.has(w.name)).map((w) => [node.id, w.name, w.value]);
})"""

# Sets widget values: [[node id, widget, value]].
_SET_WIDGETS = """(values) => {
  for (const [id, name, value] of values) {
    const widget = (window.app.graph.getNodeById(id).widgets || []).find((w) => w.name === name);
    if (!widget) throw new Error(`node ${id} has no widget ${name}`);
    widget.value = value;
  }
}"""

_FIT_GRAPH = """([left, top, right, bottom]) => {
  const canvas = window.app.canvas, ds = canvas.ds, element = canvas.canvas.getBoundingClientRect();
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const node of window.app.graph._nodes) {
    const [x, y, w, h] = node.boundingRect;  // canvas units, title bar included
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const scale = Math.min((right - left) / (x1 - x0), (bottom - top) / (y1 - y0));
  const padX = (right - left - (x1 - x0) * scale) / 2, padY = (bottom - top - (y1 - y0) * scale) / 2;
  ds.scale = scale;
  ds.offset = [(left + padX - element.left) / scale - x0, (top + padY - element.top) / scale - y0];
  const toScreen = (x, y) => [element.left + (x + ds.offset[0]) * scale, element.top + (y + ds.offset[1]) * scale];
  return {scale, box: [...toScreen(x0, y0), ...toScreen(x1, y1)]};
}"""

_MINIMAP_SHOWN = "() => !!document.querySelector('.minimap-main-container, .litegraph-minimap, .minimap-canvas')"


def _quick_generation_values(page: Page) -> list[list]:
    """[[node id, widget, value]] that set the loaded graph's nodes to ``QUICK_GENERATION``."""
    nodes = page.js("() => window.app.graph._nodes.map((n) => [n.id, n.type])")
    return [[nid, name, value] for nid, kind in nodes for name, value in QUICK_GENERATION.get(kind, {}).items()]


def _without_preview_text(prompt: dict) -> dict:
    return {k: {**node, "inputs": {i: v for i, v in node["inputs"].items()
                                   if not (node["class_type"] == PREVIEW_AS_TEXT and i == "preview")}}
            for k, node in prompt.items()}


def _checkpoint_names() -> set[str]:
    """The checkpoint file names the generation templates' loaders name."""
    names = set()
    for path in WORKFLOWS.glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                names.add(node["widgets_values"][0])
    return names


def _base_folder(base: Path) -> Path:
    from comfyui_env import prepare_base_dir

    write_example_inputs(prepare_base_dir(base), image_size=INPUT_IMAGE_SIZE)
    for name in _checkpoint_names():
        link_sd15_checkpoint(base, name)
    return base


def thumbnail(page: Page, server: ComfyServer, name: str, out: Path) -> Path:
    """Load ``name``, run it from the page, and save the fitted graph as ``out`` (JPEG)."""
    from PIL import Image

    page.load_template(name)
    template_values = page.js(_INPUT_WIDGET_VALUES)
    page.js(_SET_WIDGETS, _quick_generation_values(page))
    server.forget_outputs()  # every node runs and shows its result, none is taken from the last template
    entry = page.run_graph(server)
    # back to the template's values: the quick settings, and the seed the page draws anew after
    # queueing (its control_after_generate is "randomize")
    page.js(_SET_WIDGETS, template_values)
    # the page's graph is the template's again; Preview as Text's own `preview` widget now holds
    # the text the run showed (the server ignores that input), so it is left out of the comparison
    sent = _without_preview_text(page.js("async () => (await window.app.graphToPrompt()).output"))
    want = _without_preview_text(as_sent_by_the_front_end(api_twin(name)))
    if sent != want:
        differ = {k: (sent.get(k), want.get(k)) for k in set(sent) | set(want) if sent.get(k) != want.get(k)}
        raise RuntimeError(f"{name}: after the run the page's graph differs from the API twin: {differ}")
    fitted = page.js(_FIT_GRAPH, list(FREE_AREA))
    page.draw()
    if page.js(_MINIMAP_SHOWN):
        raise RuntimeError("the minimap is shown although Comfy.Minimap.Visible is off")
    x0, y0, x1, y1 = fitted["box"]
    clip = {"x": x0 - MARGIN, "y": y0 - MARGIN, "width": x1 - x0 + 2 * MARGIN, "height": y1 - y0 + 2 * MARGIN}
    shot = Image.open(io.BytesIO(page.page.screenshot(clip=clip))).convert("RGB")
    height = round(shot.height * THUMBNAIL_WIDTH / shot.width)
    shot.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    logger.info("%s: ran %d output nodes, graph at scale %.2f -> %s (%dx%d)",
                name, len(entry["outputs"]), fitted["scale"], out, THUMBNAIL_WIDTH, height)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="a template's name (repeatable); default: all")
    parser.add_argument("--out", type=Path, default=WORKFLOWS, help="folder for <name>.jpg (default: workflows/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = template_names()
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise SystemExit(f"no template {unknown}; the templates are {names}")
    browser_path = chromium_path()
    if browser_path is None:
        raise SystemExit("no Chromium on PATH: apt-get install chromium (or set NEARID_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nearid-thumbnails-") as tmp:
        server = ComfyServer(require_comfyui(), _base_folder(Path(tmp))).start()
        try:
            response = server.post_json("/settings", SETTINGS)
            response.raise_for_status()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
                try:
                    page = Page(browser, server.url, viewport=THUMBNAIL_WINDOW)
                    for name in args.only or names:
                        thumbnail(page, server, name, args.out / f"{name}.jpg")
                finally:
                    browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
