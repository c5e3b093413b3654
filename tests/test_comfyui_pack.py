"""The repository root as a ComfyUI node pack, imported without ComfyUI (as pip and pytest do)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from _comfyui_helpers import REPO_ROOT, import_pack

EXPECTED_NODES = {
    "NearIDModelLoader": "Load NearID Model",
    "NearIDEmbed": "NearID Embed",
    "NearIDIdentityScore": "NearID Identity Score",
    "NearIDRerank": "NearID Rerank",
    "NearIDFilter": "NearID Filter",
    "NearIDConsistency": "NearID Consistency",
    "NearIDHeatmap": "NearID Heatmap",
}

# Makes ComfyUI's modules (and accelerate) unimportable in the child process, so the test
# fails if anything imports them, whatever is installed.
_BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = ("comfy", "folder_paths", "comfy_extras", "execution", "server", "accelerate")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this test: {name}")
            return None
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKER + textwrap.dedent(code)],
        cwd=REPO_ROOT.parent, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_root_package_imports_without_comfyui_and_never_as_top_level_nodes():
    out = _run(
        f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location(
            "pack_root", {str(REPO_ROOT / "__init__.py")!r}, submodule_search_locations=[{str(REPO_ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["pack_root"] = pack
        spec.loader.exec_module(pack)
        print(json.dumps({{
            "display": pack.NODE_DISPLAY_NAME_MAPPINGS,
            "top_level_nodes": "nodes" in sys.modules,
            "nodes_module": pack.nodes.__name__,
            "comfy_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths")),
        }}))
        """
    )
    assert out["display"] == EXPECTED_NODES
    assert out["top_level_nodes"] is False
    assert out["nodes_module"] == "pack_root.nodes"
    assert out["comfy_loaded"] == []


def test_root_init_as_a_plain_file_without_a_parent_package_exports_nothing():
    out = _run(
        f"""
        import json, runpy, sys
        result = runpy.run_path({str(REPO_ROOT / "__init__.py")!r})
        print(json.dumps({{"classes": result["NODE_CLASS_MAPPINGS"], "top_level_nodes": "nodes" in sys.modules}}))
        """
    )
    assert out == {"classes": {}, "top_level_nodes": False}


def test_library_imports_without_comfyui_or_accelerate():
    out = _run(
        """
        import json
        import comfy_nearid, comfy_nearid.model, comfy_nearid.calibration, comfy_nearid.checkpoint
        print(json.dumps({"ok": comfy_nearid.load_model.__name__}))
        """
    )
    assert out == {"ok": "load_model"}


def test_every_node_has_a_category_description_and_tooltips():
    pack = import_pack()
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("NearID")
        assert cls.CATEGORY.startswith("NearID/"), node_id
        assert cls.DESCRIPTION, node_id
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) == 2 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), node_id
        assert all(cls.OUTPUT_TOOLTIPS), node_id
        is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(cls.RETURN_TYPES))
        assert len(is_list) == len(cls.RETURN_TYPES), node_id
