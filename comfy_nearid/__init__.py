"""comfy_nearid: NearID identity embeddings for personalised image generation.

A frozen backbone (SigLIP2 via open_clip/timm, or a small CNN) plus a retrained
multi-head attention-pooling head; cosine similarity of the L2-normalised embeddings
scores whether two images show the same object identity regardless of context.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "comfy_nearid.model",
    "IdentityModel": "comfy_nearid.model",
    "NearIDHead": "comfy_nearid.head",
    "HeadConfig": "comfy_nearid.head",
    "Backbone": "comfy_nearid.backbones",
    "BackboneSpec": "comfy_nearid.backbones",
    "get_backbone_spec": "comfy_nearid.backbones",
    "list_backbones": "comfy_nearid.backbones",
    "save_head": "comfy_nearid.checkpoint",
    "load_head_file": "comfy_nearid.checkpoint",
    "HeadMetadata": "comfy_nearid.checkpoint",
    "load_image": "comfy_nearid.images",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy so that `import comfy_nearid` (and `nearid --help`) does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'comfy_nearid' has no attribute {name!r}")
