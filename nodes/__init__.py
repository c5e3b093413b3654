"""ComfyUI nodes of the NearID pack: thin adapters over :mod:`comfy_nearid`.

One module per node group (``loader``, ``scoring``, ``consistency``, ``heatmap``), each exporting its own
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``, merged here. This package is only
ever imported relatively, from the repository root's ``__init__.py`` (``nodes`` as a top-level
name is ComfyUI's own module). Importing it never imports ComfyUI; inside ComfyUI it registers
the ``models/nearid`` and ``models/nearid_backbones`` folders.
"""

from __future__ import annotations

from typing import Any

from . import comfy_compat, consistency, heatmap, loader, scoring

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in (loader, scoring, consistency, heatmap):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

comfy_compat.register_model_folders()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def node_summary() -> dict[str, Any]:
    """Node id -> (display name, category), e.g. for docs and tests."""
    return {k: (NODE_DISPLAY_NAME_MAPPINGS[k], v.CATEGORY) for k, v in NODE_CLASS_MAPPINGS.items()}
