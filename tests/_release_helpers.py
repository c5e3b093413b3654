"""A random-weight transformers ``SiglipVisionModel`` of the registry's ``tiny-siglip`` shape,
saved the way the paper's release is (``backbone.`` + either transformers key layout), and its
own embeddings: the independent reference for the converter and the release loader."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def reference_model(seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    # Same shape as the registry's tiny-siglip: 30 px input, patch 4 -> 7x7 tokens, 2 px unused.
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=30, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg).eval()
    # random init leaves LayerNorms at identity and biases at 0: perturb every tensor so that
    # a wrong mapping cannot hide behind default values
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_release(model, target: Path, layout: str, with_config: bool = False) -> Path:
    """Write ``model`` as a release: ``target`` is a folder (then ``model.safetensors`` in it)
    or a file name; ``layout`` "4.x" (``backbone.vision_model.*``) or "5.x" (``backbone.*``).
    ``with_config`` also writes the model's ``config.json`` next to it. Returns the file."""
    from safetensors.torch import save_file

    path = target if target.suffix == ".safetensors" else target / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "backbone.vision_model." if layout == "4.x" else "backbone."
    state = {}
    for k, v in model.state_dict().items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        state[prefix + k] = v.contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    if with_config:
        model.config.to_json_file(str(path.parent / "config.json"))
    return path


def pil_processor(size: int = 30):
    """transformers' Pillow SigLIP processor (4.x's default; ``SiglipImageProcessorPil`` in 5.x,
    whose default torchvision backend resizes differently by up to 10/255 per pixel)."""
    from PIL import Image

    try:
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor
    return SiglipImageProcessor(size={"height": size, "width": size}, resample=Image.Resampling.BICUBIC,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)


def reference_embeddings(model, images) -> torch.Tensor:
    """The transformers model's own L2-normalised pooled output for PIL ``images``: ``[N, D]``."""
    pixels = pil_processor(model.config.image_size)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return F.normalize(model(pixel_values=pixels).pooler_output, dim=-1)
