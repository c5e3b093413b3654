"""Load NearID Model: a head file from ``models/nearid`` onto the backbone its metadata names,
or the paper's transformers release as downloaded (recognised by its tensor layout, converted
once by :func:`comfy_nearid.convert.cached_conversion` and kept in ``models/nearid/.nearid-cache``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
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
#: Where the optional download puts the paper's release, relative to ``models/nearid``; the
#: list always offers it, so that a first graph can fetch it with the ``download`` toggle.
RELEASE_ENTRY = "nearid-siglip2/model.safetensors"


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
    kind: str = "head"  # "head" or "release"
    conversion: str = ""  # releases: "converted" (first time) or "reused" (read from the cache)


@dataclass(frozen=True)
class ModelFileInfo:
    """What a file in ``models/nearid`` is, read from its header: a NearID ``head`` file or a
    transformers ``release``, and the registry backbone it needs."""

    kind: str
    backbone: str
    layout: str = ""  # releases: "transformers 4.x" / "transformers 5.x"


@lru_cache(maxsize=256)
def _describe(path: str, mtime_ns: int, size: int) -> ModelFileInfo:
    from comfy_nearid.checkpoint import read_head_metadata
    from comfy_nearid.convert import inspect_release

    release = inspect_release(path)
    if release is not None:
        return ModelFileInfo("release", release.backbone, release.layout)
    return ModelFileInfo("head", read_head_metadata(path).backbone)


def describe_model_file(path: str) -> ModelFileInfo:
    """Head file or release, and its backbone (header only; remembered per path, mtime, size).
    Raises :class:`~comfy_nearid.errors.CheckpointError` for anything else."""
    st = os.stat(path)
    return _describe(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def release_cache_dir_for(path: str) -> Path:
    """``.nearid-cache`` in the registered ``models/nearid`` folder holding ``path`` (the folder
    of the file outside ComfyUI); ``$NEARID_RELEASE_CACHE`` overrides it."""
    from comfy_nearid.convert import release_cache_dir

    real = os.path.realpath(path)
    holders = [f for f in comfy_compat.head_folders() if real.startswith(os.path.realpath(f) + os.sep)]
    base = max(holders, key=len) if holders else os.path.dirname(real)
    return release_cache_dir(Path(base) / comfy_compat.RELEASE_CACHE_DIRNAME)


def model_list_tooltip(names: list[str]) -> str:
    """The loader's tooltip: each listed file with what it is and the backbone it needs."""
    lines = [
        "A NearID head file, or the paper's transformers release (model.safetensors, any name, "
        "or a sub-folder holding it) from models/nearid.",
    ]
    for name in names:
        path = comfy_compat.head_file_path(name)
        if path is None or not os.path.isfile(path):
            lines.append(f"{name}: the paper's release, not downloaded yet (turn on 'download')")
            continue
        try:
            info = describe_model_file(path)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            lines.append(f"{name}: not usable ({str(e).splitlines()[0][:160]})")
            continue
        if info.kind == "release":
            lines.append(f"{name}: release ({info.layout}) on {info.backbone}, backbone included")
        else:
            lines.append(f"{name}: head file on {info.backbone}")
    return "\n".join(lines)


def model_choices() -> list[str]:
    """The loader's list: every head file and release in models/nearid, plus the download
    location of the paper's release when it is not there yet."""
    names = comfy_compat.head_file_names()
    if comfy_compat.head_folders() and RELEASE_ENTRY not in names:
        names.append(RELEASE_ENTRY)
    return names


_CACHE: "OrderedDict[CacheKey, tuple[Any, str]]" = OrderedDict()  # -> (model, file kind)
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


def _build_model(path: str, device: str, dtype: str, readout: str) -> tuple[Any, ModelFileInfo, str]:
    """Build the model for a head file (backbone weights found on disk, no download) or a
    release (converted once, then read from the conversion cache). Returns (model, what the
    file is, "converted" / "reused" / "" for head files)."""
    from comfy_nearid import get_backbone_spec, load_model
    from comfy_nearid.checkpoint import read_head_metadata
    from comfy_nearid.convert import cached_conversion
    from comfy_nearid.errors import WeightsNotFoundError

    info = describe_model_file(path)
    kwargs: dict[str, Any] = {"device": device, "dtype": dtype, "readout": readout}
    if info.kind == "release":
        converted = cached_conversion(path, release_cache_dir_for(path))
        model = load_model(head=str(converted.head), backbone_weights=str(converted.backbone), **kwargs)
        return model, info, "reused" if converted.reused else "converted"
    meta = read_head_metadata(path)
    spec = get_backbone_spec(meta.backbone)
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
        return load_model(head=path, **kwargs), info, ""
    except WeightsNotFoundError as e:
        folders = ", ".join(comfy_compat.backbone_folders()) or "models/nearid_backbones"
        raise WeightsNotFoundError(
            f"{e}\nIn ComfyUI you can also put the file in {folders} "
            f"(as {spec.name}/{spec.weights_files[0] if spec.weights_files else '<file>'})."
        ) from e


def _download_tqdm_class() -> type:
    """A tqdm class that also moves ComfyUI's progress bar on the running node (bytes)."""
    from tqdm.auto import tqdm

    class ComfyProgressTqdm(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._bar = comfy_compat.progress_bar(max(1, int(self.total or 0)))

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self.total:
                self._bar.update_absolute(min(self._done, int(self.total)), int(self.total))
            return super().update(n)

    return ComfyProgressTqdm


def download_release_entry(allow_download: bool) -> str:
    """Fetch the paper's release into ``models/nearid/nearid-siglip2/`` (only with the node's
    ``download`` toggle on), with progress on the node. Returns the file's path."""
    from comfy_nearid.convert import RELEASE_CONFIG, RELEASE_FILE, RELEASE_REPO, download_release
    from comfy_nearid.errors import WeightsNotFoundError

    folders = comfy_compat.head_folders()
    target = Path(folders[0] if folders else ".") / Path(RELEASE_ENTRY).parent
    if not allow_download:
        raise WeightsNotFoundError(
            f"{RELEASE_ENTRY} is not downloaded yet. Turn on 'download' in Load NearID Model to fetch "
            f"{RELEASE_REPO} (about 1.7 GB), or download {RELEASE_FILE} and {RELEASE_CONFIG} from "
            f"https://huggingface.co/{RELEASE_REPO} into {target}"
        )
    logger.info("downloading %s into %s", RELEASE_REPO, target)
    return str(download_release(allow_download=True, local_dir=target, tqdm_class=_download_tqdm_class()))


def resolve_head_path(head_name: str, download: bool = False) -> str:
    """The absolute path of a head file or release chosen in the loader (the paper's release
    is downloaded first when it is missing and ``download`` is on), or an error naming it and
    the folders searched."""
    from comfy_nearid.errors import CheckpointError

    path = comfy_compat.head_file_path(head_name)
    if (path is None or not os.path.isfile(path)) and head_name == RELEASE_ENTRY:
        return download_release_entry(download)
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
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            model, kind = hit
            return model, LoadReport(True, time.perf_counter() - start, path, model.spec.name, kind)
    model, info, conversion = _build_model(path, resolved_device, resolved_dtype, readout)
    seconds = time.perf_counter() - start
    with _CACHE_LOCK:
        # Drop older versions of the same file (it changed on disk) and the least recent.
        for stale in [k for k in _CACHE if k.path == key.path and k.mtime_ns != key.mtime_ns]:
            del _CACHE[stale]
        _CACHE[key] = (model, info.kind)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    logger.info(
        "loaded NearID model %s (%s %s, readout %s%s) in %.2f s", path, info.kind, model.spec.name, readout,
        {"converted": ", converted now", "reused": ", conversion read from the cache"}.get(conversion, ""), seconds,
    )
    return model, LoadReport(False, seconds, path, model.spec.name, info.kind, conversion)


class NearIDModelLoader:
    """Load a NearID head (and the backbone named in its metadata) once; reuse it after."""

    DESCRIPTION = (
        "Loads a NearID identity model from models/nearid: a head file (its frozen backbone's weights "
        "from models/nearid_backbones, NEARID_WEIGHTS_DIR or open_clip's Hugging Face cache), or the "
        "paper's transformers release as downloaded (model.safetensors, backbone included; converted "
        "once and kept in models/nearid/.nearid-cache). Nothing is downloaded unless 'download' is on. "
        "Loaded models are cached by file path and modification time."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("nearid_model",)
    OUTPUT_TOOLTIPS = ("The identity model (frozen backbone + NearID head) for the NearID nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        names = model_choices()
        return {
            "required": {
                "head": (names, {"tooltip": model_list_tooltip(names)}),
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
            },
            "optional": {
                "download": ("BOOLEAN", {
                    "default": False,
                    "tooltip": f"Off: nothing is ever downloaded. On: when {RELEASE_ENTRY} is chosen and missing, "
                               "download the paper's release (Aleksandar/nearid-siglip2, about 1.7 GB) into "
                               "models/nearid with huggingface_hub, with progress on this node.",
                }),
            },
        }

    @classmethod
    def IS_CHANGED(cls, head: str, device: str = "auto", dtype: str = "auto", readout: str = "head",
                   download: bool = False) -> str:
        # Re-run when the file is replaced; otherwise ComfyUI keeps the cached output.
        path = comfy_compat.head_file_path(head)
        if path is None or not os.path.isfile(path):
            return f"missing:{head}"
        st = os.stat(path)
        return f"{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}:{device}:{dtype}:{readout}"

    def load(self, head: str, device: str = "auto", dtype: str = "auto", readout: str = "head",
             download: bool = False) -> dict[str, Any]:
        path = resolve_head_path(head, download)
        model, report = load_cached(path, device, dtype, readout)
        what = {"converted": "release, converted", "reused": "release, cached conversion"}.get(
            report.conversion, report.kind)
        status = (
            f"{head}: {'reused the loaded model' if report.cached else 'loaded'} "
            f"({what}, {report.backbone}, readout {readout}, {model.device}, {report.seconds:.3f} s)"
        )
        return {
            "ui": {
                "text": [status],
                "nearid_load": [{"cached": report.cached, "seconds": report.seconds, "backbone": report.backbone,
                                 "kind": report.kind, "conversion": report.conversion}],
            },
            "result": (model,),
        }


NODE_CLASS_MAPPINGS = {"NearIDModelLoader": NearIDModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"NearIDModelLoader": "Load NearID Model"}
