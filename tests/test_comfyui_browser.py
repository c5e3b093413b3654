"""The node pack in ComfyUI 0.3.75's own front end (1.32.9), in headless Chromium.

A real server with the pack (and, for the console comparison, one without it) is opened in the
Debian Chromium through Playwright's Python package (``tests/_browser.py``; no browser
download). Checked as a user meets the pack: every node of the pack is registered with its
display name and category; the template browser shows a card per template with its title,
description and thumbnail (``workflows/<name>.jpg``); the templates load, show no overlapping nodes and show
their "About" note at the saved view in a 1600x1000 window; the front end's own
``app.graphToPrompt()`` equals each API twin apart from the documented default (an empty
``preview`` input on Preview as Text); the score graph runs from the page and its text, on the
node and in Preview as Text, numbers the candidates like the graph; the console shows no error
that the server without the pack does not show too. Screenshots are kept under
``$NEARID_TEST_ARTIFACTS`` (default: the test's tmp dir) as ``browser-<name>.png``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from _browser import require_browser
from _comfyui_helpers import import_pack
from _comfyui_page import (
    HEAD,
    SETTINGS,
    WINDOW,
    WORKFLOWS,
    Page,
    api_twin,
    as_sent_by_the_front_end,
    template_names,
    write_example_inputs,
)
from comfyui_env import PACK_NAME, ComfyServer, ComfyUINotReady, prepare_base_dir, require_comfyui

pytestmark = [pytest.mark.comfyui, pytest.mark.slow, pytest.mark.browser]

SCORE = "NearID score a batch"


def _artifacts(tmp_path_factory) -> Path:
    given = os.environ.get("NEARID_TEST_ARTIFACTS")
    path = Path(given) if given else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _base(base: Path, with_pack: bool) -> Path:
    prepare_base_dir(base)
    if not with_pack:
        (base / "custom_nodes" / PACK_NAME).unlink()
        return base
    return write_example_inputs(base)


@pytest.fixture(scope="module")
def browser():
    path = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    try:
        tree = require_comfyui()
    except ComfyUINotReady as e:
        pytest.fail(str(e), pytrace=False)
    with_pack = ComfyServer(tree, _base(tmp_path_factory.mktemp("with-pack"), True))
    without = ComfyServer(tree, _base(tmp_path_factory.mktemp("without-pack"), False))
    try:
        for server in (with_pack.start(), without.start()):
            response = server.post_json("/settings", SETTINGS)
            assert response.status_code == 200, response.text
        yield with_pack, without
    finally:
        with_pack.stop()
        without.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return _artifacts(tmp_path_factory)


LAYOUT = """() => {
  const canvas = window.app.canvas;
  const rects = window.app.graph._nodes.map((n) => {
    const r = n.boundingRect;  // [x, y, w, h] in canvas units, title bar included
    return {id: n.id, title: n.title, type: n.type, rect: [r[0], r[1], r[2], r[3]]};
  });
  const ds = canvas.ds;
  const element = canvas.canvas.getBoundingClientRect();
  const toScreen = (x, y) => [element.left + (x + ds.offset[0]) * ds.scale, element.top + (y + ds.offset[1]) * ds.scale];
  return {rects, screen: rects.map((r) => {
    const [x0, y0] = toScreen(r.rect[0], r.rect[1]);
    const [x1, y1] = toScreen(r.rect[0] + r.rect[2], r.rect[1] + r.rect[3]);
    return {id: r.id, box: [x0, y0, x1, y1]};
  })};
}"""


def _overlaps(rects: list[dict]) -> list[str]:
    found = []
    for i, a in enumerate(rects):
        ax, ay, aw, ah = a["rect"]
        for b in rects[i + 1 :]:
            bx, by, bw, bh = b["rect"]
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > 0 and dy > 0:
                found.append(f"{a['title']} ({a['id']}) and {b['title']} ({b['id']}): {dx:.0f} x {dy:.0f}")
    return found


def _visible(page: Page, box: list[float]) -> list[str]:
    """Points of ``box`` (screen px) where the canvas, not a bar or panel, is on top."""
    x0, y0, x1, y1 = box
    problems = []
    for fx, fy in ((0.02, 0.02), (0.98, 0.02), (0.5, 0.5), (0.02, 0.98), (0.98, 0.98)):
        x, y = x0 + fx * (x1 - x0), y0 + fy * (y1 - y0)
        if not (0 <= x < WINDOW["width"] and 0 <= y < WINDOW["height"]):
            problems.append(f"({x:.0f}, {y:.0f}) is outside the window")
            continue
        tag = page.js("""([x, y]) => { let e = document.elementFromPoint(x, y); const chain = [];
            for (let i = 0; e && i < 4; i++, e = e.parentElement) chain.push(e.tagName + '.' + String(e.className).replace(/ /g, '.'));
            return chain.join(' < ') || null; }""", [x, y])
        if tag is not None and not tag.startswith(("CANVAS", "TEXTAREA")):
            # a DOM widget (the note's Markdown) is part of the node: accept elements inside it
            inside = page.js(
                "([x, y]) => !!document.elementFromPoint(x, y).closest('.dom-widget, .comfy-markdown, .widget-markdown')",
                [x, y])
            if not inside:
                problems.append(f"({x:.0f}, {y:.0f}) is covered by <{tag}>")
    return problems


# The cards of the template browser's open category: title, description, thumbnail.
TEMPLATE_CARDS = """() => Array.from(document.querySelectorAll('[role=dialog] h3.line-clamp-1')).map((h) => {
  let card = h;
  while (card && !card.querySelector('img')) card = card.parentElement;  // the card: its title's box with an image
  const img = card && card.querySelector('img'), description = h.parentElement.querySelector('p');
  return {title: h.textContent.trim(), titles_in_card: card ? card.querySelectorAll('h3').length : 0,
          clipped: h.scrollHeight > h.clientHeight + 1 || h.scrollWidth > h.clientWidth + 1,
          description: description ? description.textContent.trim() : null,
          image: img ? [img.complete, img.naturalWidth, img.naturalHeight] : null};
})"""


def _template_browser(page: Page, artifacts: Path) -> None:
    """Workflow templates (side bar) > Extensions > comfy-nearid lists a card per template with
    its title (the file name, on one line), its description (the front end 1.32.9 makes it from
    the file name too: ``_`` and ``-`` shown as spaces) and its thumbnail ``<name>.jpg``; a click
    on a card opens that graph."""
    fetched: dict[str, int] = {}
    page.page.on("response", lambda r: fetched.__setitem__(unquote(r.url.split("?")[0]), r.status))
    page.js("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.page.locator("[role=dialog]").get_by_text(PACK_NAME, exact=True).first.click()
    names = template_names()
    page.page.wait_for_function(  # every card has its image loaded (a card shows a placeholder first)
        f"""(count) => {{ const cards = ({TEMPLATE_CARDS})();
            return cards.length === count && cards.every((c) => c.image && c.image[0] && c.image[1] > 0); }}""",
        arg=len(names), timeout=60_000)
    page.page.screenshot(path=str(artifacts / "browser-template-browser.png"))
    cards = {card["title"]: card for card in page.js(TEMPLATE_CARDS)}
    assert sorted(cards) == names
    for name, card in cards.items():
        assert card["titles_in_card"] == 1, card
        assert not card["clipped"], f"the card's title {name!r} does not fit on its line"
        assert card["description"] == re.sub(r"[-_]", " ", name).strip(), card
        url = f"{page.page.url.rstrip('/')}/api/workflow_templates/{PACK_NAME}/{name}.jpg"
        assert fetched.get(url) == 200, (url, sorted(fetched))
        with Image.open(WORKFLOWS / f"{name}.jpg") as thumbnail:
            assert card["image"] == [True, *thumbnail.size], card  # the card shows workflows/<name>.jpg
    # a click on a card opens its graph
    page.page.locator("[role=dialog] h3.line-clamp-1").filter(has_text=re.compile(f"^{re.escape(SCORE)}$")).click()
    want = sorted(node["type"] for node in json.loads((WORKFLOWS / f"{SCORE}.json").read_text())["nodes"])
    page.page.wait_for_function(
        "(want) => JSON.stringify(window.app.graph._nodes.map((n) => n.type).sort()) === JSON.stringify(want)",
        arg=want, timeout=60_000)


def _table_numbers(text: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [line.strip("|").split("|")[0].strip() for line in rows[2:]]


# ----------------------------------------------------------------------------- the test
def test_pack_in_the_front_end(browser, servers, artifacts):
    with_pack, without_pack = servers
    pack = import_pack()
    page = Page(browser, with_pack.url)

    # every node of the pack is registered, with its display name and category
    registered = page.js("""(names) => names.map((n) => {
        const t = window.LiteGraph.registered_node_types[n];
        return t ? {name: n, title: t.title, category: t.category} : {name: n, missing: true};
    })""", list(pack.NODE_CLASS_MAPPINGS))
    for node in registered:
        assert not node.get("missing"), f"{node['name']} is not registered in the front end"
        assert node["title"] == pack.NODE_DISPLAY_NAME_MAPPINGS[node["name"]]
        assert node["category"] == pack.NODE_CLASS_MAPPINGS[node["name"]].CATEGORY

    # the template list names every workflow under the pack; the template browser shows a
    # card for each, with its title, description and thumbnail
    listed = page.js("async () => (await (await fetch('/api/workflow_templates')).json())")
    assert sorted(listed[PACK_NAME]) == template_names()
    _template_browser(page, artifacts)

    for name in template_names():
        page.load_template(name)
        layout = page.js(LAYOUT)
        assert _overlaps(layout["rects"]) == [], name
        notes = [r for r in layout["rects"] if r["type"] in ("MarkdownNote", "Note")]
        assert len(notes) == 1, name
        note_box = next(s["box"] for s in layout["screen"] if s["id"] == notes[0]["id"])
        page.page.screenshot(path=str(artifacts / f"browser-{name}.png"))
        assert _visible(page, note_box) == [], f"{name}: the About note is not fully visible: {note_box}"
        prompt = page.js("async () => (await window.app.graphToPrompt()).output")
        assert prompt == as_sent_by_the_front_end(api_twin(name)), name
        page.page.screenshot(path=str(artifacts / f"browser-{name}.png"))

    # run the score graph from the page: the node shows its table, Preview as Text the same
    page.load_template(SCORE)
    page.js("async () => { await window.app.queuePrompt(0, 1); }")
    page.page.wait_for_function(
        """() => { const n = window.app.graph.getNodeById(10);
                   const w = n && n.widgets && n.widgets.find((w) => w.name === 'nearid_result');
                   return w && w.value; }""", timeout=300_000)
    node_text = page.js("() => window.app.graph.getNodeById(10).widgets.find((w) => w.name === 'nearid_result').value")
    loader_text = page.page.wait_for_function(
        """() => { const w = (window.app.graph.getNodeById(1).widgets || []).find((w) => w.name === 'nearid_result');
                   return w && w.value; }""", timeout=60_000).json_value()
    assert _table_numbers(node_text) == ["1", "2", "3"]  # like the graph's "Candidate 1-3"
    assert sum("**best**" in line for line in node_text.splitlines()) == 1
    assert "uncalibrated" in node_text  # the test head stores no calibration
    assert loader_text.startswith(f"{HEAD}: loaded")
    history = with_pack.get_json("/history")
    outputs = next(iter(history.values()))["outputs"]
    assert outputs["11"]["text"] == [node_text]  # Preview as Text shows the same table
    page.js("() => window.app.canvas.draw(true, true)")
    page.page.screenshot(path=str(artifacts / f"browser-{SCORE}-after-run.png"))

    # the filter and heatmap graphs run from the page too; their node shows its table
    for name in ("NearID filter by threshold", "NearID attention heatmap"):
        page.load_template(name)
        page.js("async () => { await window.app.queuePrompt(0, 1); }")
        text = page.page.wait_for_function(
            """() => { const n = window.app.graph.getNodeById(10);
                       const w = n && n.widgets && n.widgets.find((w) => w.name === 'nearid_result');
                       return w && w.value; }""", timeout=300_000).json_value()
        assert _table_numbers(text) == ["1", "2", "3"], name
        page.js("() => window.app.canvas.draw(true, true)")
        page.page.screenshot(path=str(artifacts / f"browser-{name}-after-run.png"))

    # no console error that the front end without the pack does not show as well
    bare = Page(browser, without_pack.url)
    baseline = {_normalise(e) for e in bare.errors}
    caused = [e for e in page.errors if _normalise(e) not in baseline and not _registry_lookup(e)]
    assert caused == [], "\n".join(caused)


def _registry_lookup(message: str) -> bool:
    """The front end asks the Comfy registry which published pack each custom node type comes
    from (``api.comfy.org/comfy-nodes/<type>/node``); the page's Content Security Policy
    blocks that offline. It happens for every custom node of any pack, not because of ours."""
    return re.search(r"'https://api\.comfy\.org/comfy-nodes/[^/']+/node' violates the following Content Security Policy", message) is not None


def _normalise(message: str) -> str:
    """A console message without the server's port (the two servers listen on different ones)."""
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", message)
