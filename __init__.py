"""ComfyUI entry point of the NearID node pack (this repository's root is the pack).

ComfyUI loads this file as a package named after the folder in ``custom_nodes/`` and reads
``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``. The nodes live in ``nodes/`` and
are imported relatively: a top-level ``nodes`` is ComfyUI's own module and must never be
shadowed. Example graphs are in ``workflows/`` (ComfyUI lists and serves them as templates).

Imported any other way (``pip install``, ``pytest``, or executed as a plain file without a
parent package) this module does nothing and exports empty mappings.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
# front-end extension (web/nearid.js): shows each node's result text on the node after a run
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

if __package__:  # loaded as a package (ComfyUI's custom-node loader): the nodes can be imported
    if importlib.util.find_spec("comfy_nearid") is None:
        # Cloned into custom_nodes without `pip install`: use the library next to this file.
        # Appended (not prepended) so nothing of ComfyUI's own is shadowed.
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
        logging.getLogger(__name__).info("comfy_nearid is not installed; using the copy in %s", sys.path[-1])
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
