"""The only place the node pack touches ComfyUI's own modules, always lazily.

Everything here works without ComfyUI too (plain ``pytest``, ``pip install``): model folders
are then not registered, progress is not reported and nothing can be cancelled. ComfyUI's
modules (``folder_paths``, ``comfy.utils``, ``comfy.model_management``) are imported inside
the functions, so importing the pack never imports them.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

#: ``models/<name>`` folder of head files (``.safetensors``), as listed by the loader node.
HEAD_FOLDER = "nearid"
#: ``models/<name>`` folder for backbone weights (open_clip / timm / torchvision files).
BACKBONE_FOLDER = "nearid_backbones"
HEAD_EXTENSIONS = {".safetensors"}
BACKBONE_EXTENSIONS = {".safetensors", ".bin", ".pth", ".pt"}


def _comfy_module(name: str) -> ModuleType | None:
    """``import name`` if ComfyUI provides it, else None (never raises ImportError)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def comfy_available() -> bool:
    """True inside a running ComfyUI (its ``folder_paths`` and ``comfy`` modules import)."""
    return _comfy_module("folder_paths") is not None and _comfy_module("comfy.model_management") is not None


def register_model_folders() -> bool:
    """Register ``models/nearid`` (heads) and ``models/nearid_backbones`` with ComfyUI's
    ``folder_paths``, keeping paths a user added in ``extra_model_paths.yaml``. Returns
    False (and does nothing) outside ComfyUI."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None:
        return False
    for name, extensions in ((HEAD_FOLDER, HEAD_EXTENSIONS), (BACKBONE_FOLDER, BACKBONE_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        folder_paths.add_model_folder_path(name, default, is_default=True)
        paths, _ = folder_paths.folder_names_and_paths[name]
        # A yaml entry registered before us leaves an empty extension set (= every file).
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
    return True


#: Sub-folder of ``models/nearid`` where the loader keeps converted releases (not listed).
RELEASE_CACHE_DIRNAME = ".nearid-cache"


def head_file_names() -> list[str]:
    """Model files offered by the loader (head files and releases, relative names), or []
    outside ComfyUI. The loader's own conversion cache is left out."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None or HEAD_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    names = folder_paths.get_filename_list(HEAD_FOLDER)
    return [n for n in names if n.replace("\\", "/").split("/", 1)[0] != RELEASE_CACHE_DIRNAME]


def head_file_path(name: str) -> str | None:
    """Absolute path of a head file chosen in the loader, or None if it is not there."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None:
        return name if os.path.isfile(name) else None
    return folder_paths.get_full_path(HEAD_FOLDER, name)


def head_folders() -> list[str]:
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None or HEAD_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_folder_paths(HEAD_FOLDER)


def backbone_folders() -> list[str]:
    """Folders registered for backbone weights (``models/nearid_backbones`` and yaml extras)."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None or BACKBONE_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_folder_paths(BACKBONE_FOLDER)


def auto_device() -> Any:
    """ComfyUI's compute device (honours ``--cpu``, ``--directml`` ...), else CUDA if present."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        return mm.get_torch_device()
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_dtype(device: Any) -> str:
    """The precision ComfyUI would pick for a small encoder on ``device``: fp32 on CPU,
    bf16 where ComfyUI allows it, else fp16 where it allows that, else fp32 (so ``--force-fp32``
    and friends are honoured)."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "fp32"
    mm = _comfy_module("comfy.model_management")
    if mm is None:
        return "auto"  # comfy_nearid's own rule
    if mm.should_use_bf16(device, prioritize_performance=False):
        return "bf16"
    if mm.should_use_fp16(device, prioritize_performance=False):
        return "fp16"
    return "fp32"


class _NoProgress:
    """Stand-in for ``comfy.utils.ProgressBar`` outside ComfyUI."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.current = 0

    def update(self, value: int) -> None:
        self.current = min(self.total, self.current + value)

    def update_absolute(self, value: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        self.current = min(self.total, value)


def progress_bar(total: int) -> Any:
    """A ComfyUI progress bar over ``total`` steps (shown on the running node)."""
    utils = _comfy_module("comfy.utils")
    return utils.ProgressBar(total) if utils is not None else _NoProgress(total)


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op outside ComfyUI)."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


def skip_downstream(fallback: Any) -> Any:
    """Inside ComfyUI: an ``ExecutionBlocker`` without a message, which makes ComfyUI skip the
    nodes fed by this output without an error. Outside ComfyUI: ``fallback``."""
    graph_utils = _comfy_module("comfy_execution.graph_utils")
    if graph_utils is None:
        return fallback
    return graph_utils.ExecutionBlocker(None)
