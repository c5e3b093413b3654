"""Load NearID Model: a head file from ``models/nearid`` onto the backbone its metadata names."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import comfy_compat

logger = logging.getLogger(__name__)

CATEGORY = "NearID/model"
MODEL_TYPE = "NEARID_MODEL"
DEVICES = ["auto", "cpu", "cuda"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]
READOUTS = ["head", "pooled", "mean"]
CACHE_SIZE = 2


@dataclass(frozen=True)
class CacheKey:
    """A loaded model is reused while all of these stay the same."""

    path: str
    mtime_ns: int
    size: int
    device: str
    dtype: str
    readout: str


@dataclass
class LoadReport:
    """What the last :func:`load_cached` call did (shown on the node and in /history)."""

    cached: bool
    seconds: float
    path: str
    backbone: str


_CACHE: "OrderedDict[CacheKey, Any]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded model (the next load reads the files again)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _backbone_weights_for(backbone: str) -> str | None:
    """A backbone weights file in a registered ``nearid_backbones`` folder, if there is one:
    ``<folder>/<backbone>/<name>`` or ``<folder>/<name>`` with a name the backbone expects
    (open_clip's file names), else the only weights file in ``<folder>/<backbone>/`` (e.g. the
    timm-layout file ``nearid convert --backbone-out`` writes)."""
    from comfy_nearid import get_backbone_spec
    from comfy_nearid.errors import WeightsNotFoundError

    spec = get_backbone_spec(backbone)
    for folder in comfy_compat.backbone_folders():
        for name in spec.weights_files:
            for candidate in (Path(folder) / backbone / name, Path(folder) / name):
                if candidate.is_file():
                    return str(candidate)
        sub = Path(folder) / backbone
        found = sorted(p for p in sub.glob("*") if p.suffix in comfy_compat.BACKBONE_EXTENSIONS and p.is_file())
        if len(found) > 1:
            raise WeightsNotFoundError(
                f"{sub} holds several weights files ({', '.join(p.name for p in found)}); keep one, "
                f"or name it {' or '.join(spec.weights_files)}"
            )
        if found:
            return str(found[0])
    return None


def _build_model(path: str, device: str, dtype: str, readout: str) -> Any:
    """Read the head's metadata, find its backbone, build the model (no download)."""
    from comfy_nearid import get_backbone_spec, load_model
    from comfy_nearid.checkpoint import read_head_metadata
    from comfy_nearid.errors import WeightsNotFoundError

    meta = read_head_metadata(path)
    spec = get_backbone_spec(meta.backbone)
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "readout": readout}
    if spec.has_pretrained:
        weights = _backbone_weights_for(spec.name)
        if weights is not None:
            kwargs["backbone_weights"] = weights
    else:
        # Random-architecture backbones (tests, benchmarks) are rebuilt from the seed the head
        # was made with, recorded in its provenance.
        kwargs["pretrained"] = False
        kwargs["seed"] = int(meta.provenance.get("backbone_seed", 0))
    try:
        return load_model(head=path, **kwargs)
    except WeightsNotFoundError as e:
        folders = ", ".join(comfy_compat.backbone_folders()) or "models/nearid_backbones"
        raise WeightsNotFoundError(
            f"{e}\nIn ComfyUI you can also put the file in {folders} "
            f"(as {spec.name}/{spec.weights_files[0] if spec.weights_files else '<file>'})."
        ) from e


def resolve_head_path(head_name: str) -> str:
    """The absolute path of a head chosen in the loader, or a :class:`CheckpointError` naming
    it and the folders searched."""
    from comfy_nearid.errors import CheckpointError

    path = comfy_compat.head_file_path(head_name)
    if path is None or not os.path.isfile(path):
        folders = ", ".join(comfy_compat.head_folders()) or "models/nearid"
        raise CheckpointError(
            f"NearID head file {head_name!r} was not found in {folders}; put a head .safetensors "
            "file there (or list more folders under 'nearid:' in extra_model_paths.yaml)"
        )
    return path


def load_cached(path: str, device: str = "auto", dtype: str = "auto", readout: str = "head") -> tuple[Any, LoadReport]:
    """The model for ``path``, loaded once per (path, mtime, size, device, dtype, readout)."""
    import torch

    resolved_device = str(comfy_compat.auto_device() if device == "auto" else torch.device(device))
    resolved_dtype = comfy_compat.auto_dtype(resolved_device) if dtype == "auto" else dtype
    st = os.stat(path)
    key = CacheKey(os.path.realpath(path), st.st_mtime_ns, st.st_size, resolved_device, resolved_dtype, readout)
    start = time.perf_counter()
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is not None:
            _CACHE.move_to_end(key)
            return model, LoadReport(True, time.perf_counter() - start, path, model.spec.name)
    model = _build_model(path, resolved_device, resolved_dtype, readout)
    seconds = time.perf_counter() - start
    with _CACHE_LOCK:
        # Drop older versions of the same file (it changed on disk) and the least recent.
        for stale in [k for k in _CACHE if k.path == key.path and k.mtime_ns != key.mtime_ns]:
            del _CACHE[stale]
        _CACHE[key] = model
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    logger.info("loaded NearID model %s (%s) in %.2f s", path, model.spec.name, seconds)
    return model, LoadReport(False, seconds, path, model.spec.name)


class NearIDModelLoader:
    """Load a NearID head (and the backbone named in its metadata) once; reuse it after."""

    DESCRIPTION = (
        "Loads a NearID identity model: the head file from models/nearid and the frozen backbone "
        "its metadata names (weights from models/nearid_backbones, NEARID_WEIGHTS_DIR or "
        "open_clip's Hugging Face cache; never downloaded). Loaded models are cached by file path "
        "and modification time."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("nearid_model",)
    OUTPUT_TOOLTIPS = ("The identity model (frozen backbone + NearID head) for the NearID nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "head": (comfy_compat.head_file_names(), {
                    "tooltip": "NearID head file (.safetensors) from models/nearid; its metadata names the backbone.",
                }),
                "device": (DEVICES, {
                    "default": "auto",
                    "tooltip": "Where the model runs; auto follows ComfyUI's device (e.g. --cpu).",
                }),
                "dtype": (DTYPES, {
                    "default": "auto",
                    "tooltip": "Backbone precision; auto: fp32 on CPU, bf16/fp16 on GPU as ComfyUI allows. The head always runs in fp32.",
                }),
                "readout": (READOUTS, {
                    "default": "head",
                    "tooltip": "head: NearID identity embedding. pooled / mean: the frozen backbone's own pooling or mean token (baselines for comparison).",
                }),
            }
        }

    @classmethod
    def IS_CHANGED(cls, head: str, device: str = "auto", dtype: str = "auto", readout: str = "head") -> str:
        # Re-run when the file is replaced; otherwise ComfyUI keeps the cached output.
        path = comfy_compat.head_file_path(head)
        if path is None or not os.path.isfile(path):
            return f"missing:{head}"
        st = os.stat(path)
        return f"{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}:{device}:{dtype}:{readout}"

    def load(self, head: str, device: str = "auto", dtype: str = "auto", readout: str = "head") -> dict[str, Any]:
        path = resolve_head_path(head)
        model, report = load_cached(path, device, dtype, readout)
        status = (
            f"{Path(path).name}: {'reused the loaded model' if report.cached else 'loaded'} "
            f"({report.backbone}, {model.device}, {report.seconds:.3f} s)"
        )
        return {
            "ui": {
                "text": [status],
                "nearid_load": [{"cached": report.cached, "seconds": report.seconds, "backbone": report.backbone}],
            },
            "result": (model,),
        }


NODE_CLASS_MAPPINGS = {"NearIDModelLoader": NearIDModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"NearIDModelLoader": "Load NearID Model"}
