"""Import of the paper's released checkpoint (``Aleksandar/nearid-siglip2``).

The release is a transformers ``model.safetensors`` holding a whole ``SiglipVisionModel``
(backbone + retrained head) under the prefix ``backbone.``; transformers 4.x writes
``backbone.vision_model.<...>``, 5.x writes ``backbone.<...>``. Both are accepted.

Mapping (Hugging Face -> ours / timm):

====================================================  =========================================
HF ``head.probe``, ``head.attention.*``,              head file: same names without ``head.``
``head.layernorm.*``, ``head.mlp.fc{1,2}.*``
``embeddings.patch_embedding.{weight,bias}``          ``patch_embed.proj.{weight,bias}``
``embeddings.position_embedding.weight`` [N, D]       ``pos_embed`` [1, N, D] (batch axis added)
``encoder.layers.i.layer_norm{1,2}.*``                ``blocks.i.norm{1,2}.*``
``encoder.layers.i.self_attn.{q,k,v}_proj.*``         ``blocks.i.attn.qkv.*`` (concatenated q, k, v)
``encoder.layers.i.self_attn.out_proj.*``             ``blocks.i.attn.proj.*``
``encoder.layers.i.mlp.fc{1,2}.*``                    ``blocks.i.mlp.fc{1,2}.*``
``post_layernorm.*``                                  ``norm.*``
``head.attention.in_proj_{weight,bias}``              ``attn_pool.q`` (first D rows) + ``attn_pool.kv``
``head.probe`` / ``out_proj`` / ``layernorm`` / mlp   ``attn_pool.latent`` / ``proj`` / ``norm`` / ``mlp``
====================================================  =========================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import BackboneSpec, get_backbone_spec
from .checkpoint import _atomic_save, check_head_state, save_head
from .errors import CheckpointError, WeightsNotFoundError
from .head import NearIDHead

logger = logging.getLogger(__name__)

RELEASE_REPO = "Aleksandar/nearid-siglip2"
RELEASE_FILE = "model.safetensors"


@dataclass
class ConvertedRelease:
    head_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor]  # timm layout, attn_pool = the release's head
    source: str
    sha256: str


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_release_file(src: str | Path) -> Path:
    p = Path(src).expanduser()
    if p.is_dir():
        p = p / RELEASE_FILE
    if not p.is_file():
        raise WeightsNotFoundError(
            f"released checkpoint not found: {p} (expected a directory holding {RELEASE_FILE}, or the "
            f"file itself; download {RELEASE_REPO} with `huggingface-cli download {RELEASE_REPO}` or "
            "`nearid convert --from-hub` when online)"
        )
    return p


def normalise_release_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip ``backbone.`` and the optional ``vision_model.`` prefix (transformers 4.x)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not k.startswith("backbone."):
            logger.debug("ignoring non-backbone tensor %s", k)
            continue
        k = k[len("backbone."):]
        if k.startswith("vision_model."):
            k = k[len("vision_model."):]
        out[k] = v
    if not out:
        sample = sorted(state)[:5]
        raise CheckpointError(
            f"{source}: no tensor under the prefix 'backbone.' (found e.g. {sample}); is it the NearID release?"
        )
    for required in ("embeddings.patch_embedding.weight", "head.probe", "post_layernorm.weight"):
        if required not in out:
            raise CheckpointError(f"{source}: tensor backbone.{required} is missing")
    return out


def hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SiglipVisionModel tensors (prefix-free) -> timm VisionTransformer state dict."""
    out = {
        "patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embedding.bias"],
        "pos_embed": state["embeddings.position_embedding.weight"].unsqueeze(0),
        "norm.weight": state["post_layernorm.weight"],
        "norm.bias": state["post_layernorm.bias"],
    }
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                     ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")):
            out[f"{dst}{b}.weight"] = state[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = state[f"{src}{a}.bias"]
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [state[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], 0
            )
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    out.update({f"attn_pool.{k}": v for k, v in NearIDHead.state_to_timm_attn_pool(head).items()})
    return out


def convert_release(src: str | Path) -> ConvertedRelease:
    """Read a release ``model.safetensors`` and split it into our head and a timm backbone."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = find_release_file(src)
    try:
        raw = load_file(str(path))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    state = normalise_release_keys(raw, str(path))
    head_state = {k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")}
    return ConvertedRelease(head_state, hf_to_timm(state), str(path), _file_sha256(path))


def check_release_fits(conv: ConvertedRelease, spec: BackboneSpec) -> None:
    """Refuse a release whose shapes do not fit ``spec`` (naming expected and found)."""
    pe = conv.backbone_state["pos_embed"]
    pw = conv.backbone_state["patch_embed.proj.weight"]
    found = (pe.shape[1], pw.shape[0], pw.shape[-1])
    expected = (spec.num_tokens, spec.embed_dim, spec.patch_size)
    if found != expected:
        raise CheckpointError(
            f"{conv.source}: (tokens, width, patch) = {found}, backbone {spec.name} needs {expected}"
        )
    check_head_state(conv.head_state, spec.head, conv.source)


def write_converted(
    src: str | Path,
    out_head: str | Path,
    backbone: str | BackboneSpec = "siglip2-so400m",
    out_backbone: str | Path | None = None,
) -> tuple[Path, Path | None]:
    """Convert a release into a NearID head file (and optionally a timm backbone file)."""
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone_spec(backbone)
    conv = convert_release(src)
    check_release_fits(conv, spec)
    head = NearIDHead(spec.head)
    head.load_state_dict(conv.head_state)
    provenance = {"converted_from": RELEASE_REPO, "file": conv.source, "sha256": conv.sha256}
    head_path = save_head(out_head, head, spec, provenance=provenance)
    bb_path = None
    if out_backbone is not None:
        bb_path = Path(out_backbone)
        meta = {"format": "nearid-backbone-timm", "backbone": spec.name, "provenance": json.dumps(provenance)}
        _atomic_save({k: v.float().contiguous() for k, v in conv.backbone_state.items()}, meta, bb_path)
    return head_path, bb_path


def download_release(allow_download: bool = False) -> Path:
    """Fetch the release from the hub (only when downloads are allowed)."""
    from .weights import download_allowed

    if not download_allowed(allow_download):
        raise WeightsNotFoundError(
            f"downloading {RELEASE_REPO} is not allowed; pass a local directory or set NEARID_ALLOW_DOWNLOAD=1"
        )
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=RELEASE_REPO, filename=RELEASE_FILE))
