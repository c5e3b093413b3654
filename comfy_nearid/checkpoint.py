"""Head checkpoints: a ``.safetensors`` file holding only the head plus metadata.

The metadata (string key/values in the safetensors header) records what the head was trained
on, so that loading it onto any other backbone or preprocessing is refused:

=====================  ============================================================
``format``             ``"nearid-head"``
``format_version``     integer, currently 2 (version 1 files load: they predate ``token_version``)
``backbone``           registry name (e.g. ``siglip2-so400m``)
``open_clip_model``    open_clip model name, ``pretrained_tag`` its weights tag
``image_size``         square input side in pixels; ``interpolation`` the resize filter
``mean`` / ``std``     JSON lists of 3 floats
``embed_dim``          token width = embedding size; ``num_heads``, ``mlp_dim``,
                       ``layer_norm_eps`` the head's shape; ``num_tokens`` patch tokens
``provenance``         JSON object: how the head was made (trainer config, data, steps,
                       metrics; or the converted file and its hash)
``calibration``        optional JSON object for the 0..100 identity match
=====================  ============================================================
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from . import __version__
from .errors import CheckpointError, HeadMismatchError
from .head import HeadConfig, NearIDHead

if TYPE_CHECKING:
    from .backbones import BackboneSpec

FORMAT = "nearid-head"
FORMAT_VERSION = 2  # 2: adds ``token_version`` (the mobilenet-v2 tokens changed, issue 21)
HEAD_KEYS = (
    "probe",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "layernorm.weight",
    "layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


# Bounds on a head file's shape fields, checked before anything is allocated: a tampered
# ``mlp_dim=1e9`` must be refused, not tried (SO400M: embed_dim 1152, mlp_dim 4304, 729 tokens).
MAX_EMBED_DIM = 16384
MLP_RATIO_LIMIT = 16
MAX_IMAGE_SIZE = 8192
MAX_TOKENS = 1_000_000


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _strict_int(text: str) -> int:
    """A plain decimal integer (``int`` would also take ``1_0`` and surrounding spaces)."""
    if not isinstance(text, str) or not text.lstrip("-").isdigit() or not text.isascii():
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _three_floats(text: str) -> tuple[float, ...]:
    from .fileio import loads_json

    value = loads_json(text, "mean/std", CheckpointError)
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)):
        raise ValueError(f"{text!r} is not a list of 3 finite numbers")
    return tuple(float(x) for x in value)


def _json_object(text: str, where: str) -> dict[str, Any]:
    from .fileio import loads_json

    value = loads_json(text, where, CheckpointError)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(value).__name__}: {_clip(text)!r}")
    return value


def head_tensor_shapes(config: HeadConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a head with ``config`` (computed, nothing allocated)."""
    d, m = config.dim, config.mlp_dim
    return {
        "probe": (1, 1, d),
        "attention.in_proj_weight": (3 * d, d),
        "attention.in_proj_bias": (3 * d,),
        "attention.out_proj.weight": (d, d),
        "attention.out_proj.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "mlp.fc1.weight": (m, d),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m),
        "mlp.fc2.bias": (d,),
    }


@dataclass
class HeadMetadata:
    backbone: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    embed_dim: int
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float
    num_tokens: int
    token_version: int = 1
    open_clip_model: str = ""
    pretrained_tag: str = ""
    format_version: int = FORMAT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    created: str = ""
    library_version: str = __version__

    @classmethod
    def for_backbone(
        cls, spec: "BackboneSpec", head: HeadConfig, provenance: Mapping[str, Any] | None = None
    ) -> "HeadMetadata":
        return cls(
            backbone=spec.name,
            image_size=spec.image_size,
            mean=tuple(spec.mean),
            std=tuple(spec.std),
            interpolation=spec.interpolation,
            embed_dim=head.dim,
            num_heads=head.num_heads,
            mlp_dim=head.mlp_dim,
            layer_norm_eps=head.layer_norm_eps,
            num_tokens=spec.num_tokens,
            token_version=spec.token_version,
            open_clip_model=spec.open_clip_model or "",
            pretrained_tag=spec.pretrained_tag or "",
            provenance=dict(provenance or {}),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    @property
    def head_config(self) -> HeadConfig:
        return HeadConfig(self.embed_dim, self.num_heads, self.mlp_dim, self.layer_norm_eps)

    def to_strings(self) -> dict[str, str]:
        out = {
            "format": FORMAT,
            "format_version": str(self.format_version),
            "backbone": self.backbone,
            "open_clip_model": self.open_clip_model,
            "pretrained_tag": self.pretrained_tag,
            "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "interpolation": self.interpolation,
            "embed_dim": str(self.embed_dim),
            "num_heads": str(self.num_heads),
            "mlp_dim": str(self.mlp_dim),
            "layer_norm_eps": repr(float(self.layer_norm_eps)),
            "num_tokens": str(self.num_tokens),
            "token_version": str(self.token_version),
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
            "created": self.created,
            "library_version": self.library_version,
        }
        if self.calibration is not None:
            out["calibration"] = json.dumps(self.calibration, sort_keys=True)
        return out

    @classmethod
    def from_strings(cls, meta: Mapping[str, str] | None, source: str) -> "HeadMetadata":
        if not meta:
            raise CheckpointError(f"{source} has no metadata; it is not a NearID head file")
        if meta.get("format") != FORMAT:
            raise CheckpointError(
                f"{source}: metadata field 'format' is {meta.get('format')!r}, expected {FORMAT!r} "
                "(convert the paper's release with `nearid convert`)"
            )

        def get(key: str, parse: Any = str, check: Any = None, allowed: str = "") -> Any:
            """Field ``key`` parsed and checked; a failure names the field, value and what is allowed."""
            if key not in meta:
                raise CheckpointError(f"{source}: metadata field {key!r} is missing")
            raw = meta[key]
            try:
                value = parse(raw)
            except (ValueError, TypeError, CheckpointError) as e:
                raise CheckpointError(
                    f"{source}: metadata field {key!r} = {_clip(raw)!r} is invalid; expected {allowed}"
                ) from e
            if check is not None and not check(value):
                raise CheckpointError(
                    f"{source}: metadata field {key!r} = {_clip(raw)!r} is out of range; expected {allowed}"
                )
            return value

        version = get("format_version", _strict_int, lambda v: v >= 1, "an integer >= 1")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this library supports "
                f"({FORMAT_VERSION}); upgrade comfy-nearid"
            )
        embed_dim = get("embed_dim", _strict_int, lambda v: 1 <= v <= MAX_EMBED_DIM,
                        f"an integer in 1..{MAX_EMBED_DIM}")
        num_heads = get("num_heads", _strict_int, lambda v: 1 <= v <= embed_dim and embed_dim % v == 0,
                        f"an integer >= 1 that divides embed_dim={embed_dim}")
        mlp_dim = get("mlp_dim", _strict_int, lambda v: 1 <= v <= MLP_RATIO_LIMIT * embed_dim,
                      f"an integer in 1..{MLP_RATIO_LIMIT} x embed_dim = {MLP_RATIO_LIMIT * embed_dim}")
        from .images import _RESAMPLE

        return cls(
            backbone=get("backbone", str, bool, "a backbone name"),
            image_size=get("image_size", _strict_int, lambda v: 1 <= v <= MAX_IMAGE_SIZE,
                           f"an integer in 1..{MAX_IMAGE_SIZE}"),
            mean=get("mean", _three_floats, None, "a JSON list of 3 finite numbers"),
            std=get("std", _three_floats, lambda v: all(x > 0 for x in v), "a JSON list of 3 positive numbers"),
            interpolation=get("interpolation", str, lambda v: v in _RESAMPLE, f"one of {sorted(_RESAMPLE)}"),
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            layer_norm_eps=get("layer_norm_eps", float, lambda v: math.isfinite(v) and 0 < v < 1,
                               "a number between 0 and 1 (exclusive)"),
            num_tokens=get("num_tokens", _strict_int, lambda v: 1 <= v <= MAX_TOKENS, f"an integer in 1..{MAX_TOKENS}"),
            # version 1 files predate the field: their heads were trained on version 1 tokens
            token_version=(get("token_version", _strict_int, lambda v: v >= 1, "an integer >= 1")
                           if version >= 2 else 1),
            open_clip_model=meta.get("open_clip_model", ""),
            pretrained_tag=meta.get("pretrained_tag", ""),
            format_version=version,
            provenance=_json_object(meta.get("provenance", "") or "{}", f"{source}: metadata field 'provenance'"),
            calibration=(_json_object(meta["calibration"], f"{source}: metadata field 'calibration'")
                         if meta.get("calibration") else None),
            created=meta.get("created", ""),
            library_version=meta.get("library_version", ""),
        )

    def check_matches(self, spec: "BackboneSpec", source: str) -> None:
        """Raise :class:`HeadMismatchError` naming every field that disagrees with ``spec``."""
        if self.backbone == spec.name and self.token_version != spec.token_version:
            raise HeadMismatchError(
                f"head {source} was trained on version {self.token_version} of the {spec.name} tokens "
                f"(head format version {self.format_version}, {self.embed_dim}-d tokens), but this library "
                f"builds version {spec.token_version} ({spec.embed_dim}-d: {spec.description or spec.name}); "
                "retrain the head on the current tokens (`nearid demo` trains one; `python -m trainer` "
                "on your data)"
            )

        def fields(backbone: str, image_size: int, embed_dim: int, num_tokens: int,
                   mean, std, interpolation: str) -> dict[str, Any]:
            return {"backbone": backbone, "image_size": image_size, "embed_dim": embed_dim,
                    "num_tokens": num_tokens, "mean": tuple(round(x, 6) for x in mean),
                    "std": tuple(round(x, 6) for x in std), "interpolation": interpolation}

        expected = fields(spec.name, spec.image_size, spec.embed_dim, spec.num_tokens,
                          spec.mean, spec.std, spec.interpolation)
        found = fields(self.backbone, self.image_size, self.embed_dim, self.num_tokens,
                       self.mean, self.std, self.interpolation)
        bad = [f"{k}: head has {found[k]!r}, backbone needs {expected[k]!r}" for k in expected if found[k] != expected[k]]
        if bad:
            raise HeadMismatchError(f"head {source} does not match backbone {spec.name}: " + "; ".join(bad))


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_head(
    path: str | Path,
    head: NearIDHead,
    spec: "BackboneSpec",
    provenance: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``head`` (fp32) with its metadata to ``path`` atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"head files are .safetensors; got {path}")
    meta = HeadMetadata.for_backbone(spec, head.config, provenance)
    meta.calibration = dict(calibration) if calibration is not None else None
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    _atomic_save(tensors, meta.to_strings(), path)
    return path


def check_safetensors_file(path: str | Path) -> None:
    """Refuse, in plain words, a file that is not safetensors at all (e.g. a pickled ``.pt`` /
    ``.ckpt`` renamed to ``.safetensors``), before the parser reports "header too large".

    A safetensors file starts with an 8-byte little-endian header length ``n`` followed by
    ``n`` bytes of JSON (an object, so ``{``) that fit in the file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            start = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e}") from e
    if len(start) == 9:
        n = int.from_bytes(start[:8], "little")
        if 2 <= n <= size - 8 and start[8:9] == b"{":
            return
    kind = "a zip archive (torch.save)" if start[:4] == b"PK\x03\x04" else (
        "a pickle" if start[:1] == b"\x80" else f"{size} bytes starting {start[:8].hex()}")
    raise CheckpointError(
        f"{p} is not a safetensors file (a renamed .pt/.ckpt?): it is {kind}; save the weights with "
        "safetensors (head files come from the trainer, `nearid convert` or save_head)"
    )


def read_head_metadata(path: str | Path) -> HeadMetadata:
    """Read only the header of a head file (cheap; no tensors)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"head file {p} does not exist")
    check_safetensors_file(p)
    try:
        with safe_open(str(p), framework="pt") as f:
            return HeadMetadata.from_strings(f.metadata(), str(p))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read head file {p}: {e}") from e


def load_head_file(path: str | Path) -> tuple[dict[str, torch.Tensor], HeadMetadata]:
    """Read a head file: its tensors (checked against the metadata's shapes) and metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    p = Path(path)
    meta = read_head_metadata(p)
    try:
        with safe_open(str(p), framework="pt") as f:  # shapes from the header: nothing allocated yet
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read head file {p}: {e}") from e
    check_head_state(shapes, meta.head_config, str(p))
    try:
        state = load_file(str(p))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read head file {p}: {e}") from e
    check_head_state(state, meta.head_config, str(p))
    return state, meta


def check_head_state(state: Mapping[str, Any], config: HeadConfig, source: str) -> None:
    """Refuse tensors that do not fit ``config`` (missing, unexpected or wrongly shaped).

    ``state`` maps names to tensors or to shapes (a file's header, read before loading)."""
    expected = head_tensor_shapes(config)
    missing = [k for k in HEAD_KEYS if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HeadMismatchError(f"head {source}: missing tensors {missing}, unexpected tensors {unexpected}")
    for k, shape in expected.items():
        found = state[k]
        found_shape = tuple(found.shape) if hasattr(found, "shape") else tuple(found)
        if found_shape != shape:
            raise HeadMismatchError(
                f"head {source}: tensor {k} has shape {found_shape}, expected {shape} "
                f"for dim={config.dim}, mlp_dim={config.mlp_dim}"
            )


def head_hash(state: Mapping[str, torch.Tensor]) -> str:
    """Short content hash of a head's weights (part of a model's cache identity)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
