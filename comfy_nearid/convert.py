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

A release is recognised by its tensor layout (never by its file name): it holds
``backbone.[vision_model.]embeddings.patch_embedding.weight`` and ``...head.probe``. The
registry backbone it was trained on is found from its shapes (width, patch, tokens, depth, MLP
width), cross-checked against a ``config.json`` next to it when there is one.

One conversion path serves ``nearid convert`` and the ComfyUI loader:
:func:`convert_release` (read + split, in memory) then :func:`save_converted` (head file +
timm backbone file). The loader keeps the result in a conversion cache
(:func:`cached_conversion`), keyed by the release's sha256, so a release is converted once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .backbones import BackboneSpec, build_trunk, get_backbone_spec, list_backbones
from .checkpoint import _atomic_save, check_head_state, check_safetensors_file, read_head_metadata, save_head
from .errors import CheckpointError, WeightsNotFoundError
from .head import NearIDHead

logger = logging.getLogger(__name__)

RELEASE_REPO = "Aleksandar/nearid-siglip2"
RELEASE_FILE = "model.safetensors"
RELEASE_CONFIG = "config.json"
#: Key prefixes of the two transformers layouts, most specific first.
RELEASE_PREFIXES = {"backbone.vision_model.": "transformers 4.x", "backbone.": "transformers 5.x"}
#: Environment variable that moves the loader's conversion cache (see :func:`release_cache_dir`).
ENV_RELEASE_CACHE = "NEARID_RELEASE_CACHE"
CACHE_DIRNAME = ".nearid-cache"


@dataclass
class ConvertedRelease:
    """A release split in memory: our head and a timm backbone state (attn_pool = the release's head)."""

    head_state: dict[str, torch.Tensor]
    backbone_state: dict[str, torch.Tensor]
    spec: BackboneSpec
    source: str
    sha256: str


@dataclass(frozen=True)
class ReleaseInfo:
    """What a release file's header says (no tensor is read)."""

    path: Path
    layout: str  # "transformers 4.x" or "transformers 5.x"
    backbone: str  # registry name whose shapes the file fits


@dataclass(frozen=True)
class ConvertedFiles:
    """A release's conversion on disk (see :func:`cached_conversion`)."""

    head: Path
    backbone: Path
    spec: BackboneSpec
    sha256: str
    reused: bool  # True when an earlier conversion was read back


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


def release_layout(keys: Iterable[str]) -> str | None:
    """``"transformers 4.x"`` / ``"transformers 5.x"`` when ``keys`` are a release's, else None."""
    keys = set(keys)
    for prefix, layout in RELEASE_PREFIXES.items():
        if f"{prefix}embeddings.patch_embedding.weight" in keys and f"{prefix}head.probe" in keys:
            return layout
    return None


def normalise_release_keys(state: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Strip ``backbone.`` and the optional ``vision_model.`` prefix (transformers 4.x)."""
    out: dict[str, Any] = {}
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
    for i in _layer_indices(state):
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


def _layer_indices(keys: Iterable[str]) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})


# --------------------------------------------------------------------------- backbone detection
@lru_cache(maxsize=None)
def _siglip_shape(name: str) -> tuple[int, int, int, int, int]:
    """(width, patch, tokens, depth, MLP width) of a registry SigLIP backbone, read from the
    network its factory builds (on the meta device: no memory, no weights)."""
    spec = get_backbone_spec(name)
    with torch.device("meta"):
        trunk = build_trunk(spec)
    return (spec.embed_dim, spec.patch_size, spec.num_tokens, len(trunk.blocks), trunk.blocks[0].mlp.fc1.out_features)


def _release_shape(shapes: Mapping[str, tuple[int, ...]], source: str) -> tuple[int, int, int, int, int]:
    try:
        width, _, patch, _ = shapes["embeddings.patch_embedding.weight"]
        tokens = shapes["embeddings.position_embedding.weight"][0]
        mlp = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: not a SigLIP vision model (tensor {e} is missing or misshapen)") from e
    return (width, patch, tokens, len(_layer_indices(shapes)), mlp)


def _vision_config(path: Path) -> dict[str, Any] | None:
    """The SigLIP vision fields of a ``config.json`` next to ``path`` (top level, or nested under
    ``vision_config`` / ``backbone_config`` ...), or None when there is no such file or field."""
    cfg_path = path.parent / RELEASE_CONFIG
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a readable JSON file ({e}); fix or remove it") from e
    stack = [cfg]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if "hidden_size" in node and "patch_size" in node:
                return node
            stack.extend(v for v in node.values() if isinstance(v, dict))
    logger.debug("%s holds no SigLIP vision config; detecting the backbone from the tensors alone", cfg_path)
    return None


def _check_config(path: Path, spec: BackboneSpec) -> None:
    cfg = _vision_config(path)
    if cfg is None:
        return
    width, patch, _, depth, mlp = _siglip_shape(spec.name)
    expected = {"hidden_size": width, "patch_size": patch, "image_size": spec.image_size,
                "num_attention_heads": spec.head.num_heads, "num_hidden_layers": depth, "intermediate_size": mlp}
    bad = [f"{k} = {cfg[k]!r} (backbone {spec.name} has {v!r})" for k, v in expected.items()
           if k in cfg and cfg[k] != v]
    if bad:
        raise CheckpointError(f"{path.parent / RELEASE_CONFIG} does not describe the tensors' backbone: " + "; ".join(bad))


def detect_backbone(shapes: Mapping[str, tuple[int, ...]], source: str) -> BackboneSpec:
    """The registry SigLIP backbone whose shapes a release's (prefix-free) tensors have."""
    found = _release_shape(shapes, source)
    siglip = [get_backbone_spec(n) for n in list_backbones() if get_backbone_spec(n).family == "siglip"]
    for spec in siglip:
        # the spec's own fields first: the network is built (for depth and MLP) only on a match
        if (spec.embed_dim, spec.patch_size, spec.num_tokens) == found[:3] and _siglip_shape(spec.name) == found:
            return spec
    siglip = [spec.name for spec in siglip]
    known = "; ".join(f"{n} {_siglip_shape(n)}" for n in siglip)
    raise CheckpointError(
        f"{source}: a SigLIP release of (width, patch, tokens, depth, MLP) = {found}, which no registered "
        f"backbone has ({known})"
    )


def inspect_release(path: str | Path) -> ReleaseInfo | None:
    """Read only the header of a ``.safetensors`` file: its :class:`ReleaseInfo` when it holds
    a release (either transformers layout), else None. Raises :class:`CheckpointError` for a
    release whose shapes fit no registered backbone."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    check_safetensors_file(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            layout = release_layout(keys)
            if layout is None:
                return None
            names = normalise_release_keys({k: k for k in keys}, str(p))
            shapes = {short: tuple(f.get_slice(full).get_shape()) for short, full in names.items()}
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {p}: {e}") from e
    spec = detect_backbone(shapes, str(p))
    _check_config(p, spec)
    return ReleaseInfo(p, layout, spec.name)


# --------------------------------------------------------------------------- conversion
def convert_release(
    src: str | Path, backbone: str | BackboneSpec | None = None, sha256: str | None = None
) -> ConvertedRelease:
    """Read a release (a ``model.safetensors``, its folder, or the file under any name) and
    split it into our head and a timm backbone, in memory. ``backbone``: the registry
    backbone it must fit (None: detected from its shapes); ``sha256``: the file's hash when
    the caller already knows it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .weights import file_sha256

    path = find_release_file(src)
    check_safetensors_file(path)
    try:
        raw = load_file(str(path))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    state = normalise_release_keys(raw, str(path))
    if backbone is None:
        spec = detect_backbone({k: tuple(v.shape) for k, v in state.items()}, str(path))
    else:
        spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone_spec(backbone)
    _check_config(path, spec)
    head_state = {k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")}
    conv = ConvertedRelease(head_state, hf_to_timm(state), spec, str(path), sha256 or file_sha256(path))
    check_release_fits(conv, spec)
    return conv


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


def save_converted(
    conv: ConvertedRelease, out_head: str | Path, out_backbone: str | Path | None = None
) -> tuple[Path, Path | None]:
    """Write a converted release: a NearID head file and, optionally, the timm backbone file
    (usable as ``backbone_weights``). Both are written atomically, the head last."""
    provenance = {"converted_from": RELEASE_REPO, "file": conv.source, "sha256": conv.sha256}
    bb_path = None
    if out_backbone is not None:
        bb_path = Path(out_backbone)
        meta = {"format": "nearid-backbone-timm", "backbone": conv.spec.name, "provenance": json.dumps(provenance)}
        _atomic_save({k: v.float().contiguous() for k, v in conv.backbone_state.items()}, meta, bb_path)
    head = NearIDHead(conv.spec.head)
    head.load_state_dict(conv.head_state)
    head_path = save_head(out_head, head, conv.spec, provenance=provenance)
    return head_path, bb_path


def write_converted(
    src: str | Path,
    out_head: str | Path,
    backbone: str | BackboneSpec | None = None,
    out_backbone: str | Path | None = None,
) -> tuple[Path, Path | None]:
    """Convert a release into a NearID head file (and optionally a timm backbone file):
    :func:`convert_release` then :func:`save_converted` (what ``nearid convert`` runs)."""
    return save_converted(convert_release(src, backbone), out_head, out_backbone)


# --------------------------------------------------------------------------- conversion cache
def release_cache_dir(default: str | Path) -> Path:
    """Where converted releases are kept: ``$NEARID_RELEASE_CACHE`` if set, else ``default``
    (the ComfyUI loader passes ``models/nearid/.nearid-cache``)."""
    explicit = os.environ.get(ENV_RELEASE_CACHE)
    return Path(explicit).expanduser() if explicit else Path(default)


def release_fingerprint(path: str | Path) -> str:
    """The sha256 of a release file, hashed once per file version (hashing 1.7 GB takes seconds):
    :func:`comfy_nearid.fileio.file_sha256`, the one file hash, memoised by (path, size, mtime)."""
    from .fileio import file_sha256

    return file_sha256(path)


def cached_conversion(path: str | Path, cache_dir: str | Path) -> ConvertedFiles:
    """A release converted once and kept on disk: ``cache_dir/<sha256[:32]>/head.safetensors``
    and ``backbone-<sha256[:16]>.safetensors`` (the file name is part of a model's identity, so
    it names the content). A later call with the same content (any name, any folder) reads
    these files back without converting."""
    path = find_release_file(path)
    cache_dir = Path(cache_dir)
    digest = release_fingerprint(path)
    entry = cache_dir / digest[:32]
    head, backbone = entry / "head.safetensors", entry / f"backbone-{digest[:16]}.safetensors"
    if head.is_file() and backbone.is_file():
        meta = read_head_metadata(head)
        if meta.provenance.get("sha256") == digest:
            return ConvertedFiles(head, backbone, get_backbone_spec(meta.backbone), digest, reused=True)
        logger.warning("conversion cache entry %s does not belong to %s; converting again", entry, path)
    conv = convert_release(path, sha256=digest)
    save_converted(conv, head, backbone)  # the head is written last: it marks a complete entry
    logger.info("converted release %s (%s) into %s", path, conv.spec.name, entry)
    return ConvertedFiles(head, backbone, conv.spec, digest, reused=False)


# --------------------------------------------------------------------------- download
def download_release(
    allow_download: bool = False, local_dir: str | Path | None = None, tqdm_class: Any = None
) -> Path:
    """Fetch the release (``model.safetensors`` and ``config.json``) from the hub, only when
    downloads are allowed; into ``local_dir`` when given, else the Hugging Face cache.
    ``tqdm_class`` receives the byte progress. Returns the path of ``model.safetensors``.
    A hub that cannot be reached gives a :class:`WeightsNotFoundError` saying so."""
    from .weights import download_allowed

    if not download_allowed(allow_download):
        raise WeightsNotFoundError(
            f"downloading {RELEASE_REPO} is not allowed; pass a local directory or set NEARID_ALLOW_DOWNLOAD=1"
        )
    try:
        from huggingface_hub import constants as hub_constants
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise WeightsNotFoundError("downloading needs huggingface_hub: pip install huggingface_hub") from e
    kwargs: dict[str, Any] = {"repo_id": RELEASE_REPO}
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir)
    if tqdm_class is not None:
        kwargs["tqdm_class"] = tqdm_class
    where = f" into {local_dir}" if local_dir is not None else ""
    unreachable: tuple[type[BaseException], ...] = (LocalEntryNotFoundError, HfHubHTTPError, OSError)
    for client in ("httpx", "httpx2"):  # huggingface_hub >= 1.0's HTTP clients; their errors are not OSErrors
        try:
            unreachable += (importlib.import_module(client).TransportError,)
        except (ImportError, AttributeError):
            pass
    if hub_constants.HF_HUB_OFFLINE:  # read from HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE at import
        raise WeightsNotFoundError(
            f"cannot download {RELEASE_REPO}: Hugging Face offline mode is on (HF_HUB_OFFLINE=1 or "
            f"TRANSFORMERS_OFFLINE=1). Unset it, or download {RELEASE_FILE} and {RELEASE_CONFIG} from "
            f"https://huggingface.co/{RELEASE_REPO} by hand{where}"
        )
    try:
        hf_hub_download(filename=RELEASE_CONFIG, **kwargs)
        return Path(hf_hub_download(filename=RELEASE_FILE, **kwargs))
    except unreachable as e:
        raise WeightsNotFoundError(
            f"cannot download {RELEASE_REPO}: the Hugging Face hub is not reachable (no network?) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download {RELEASE_FILE} "
            f"and {RELEASE_CONFIG} from https://huggingface.co/{RELEASE_REPO} by hand{where}"
        ) from e
