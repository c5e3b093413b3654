"""Head checkpoints: a ``.safetensors`` file holding only the head plus metadata.

The metadata (string key/values in the safetensors header) records what the head was trained
on, so that loading it onto any other backbone or preprocessing is refused:

=====================  ============================================================
``format``             ``"nearid-head"``
``format_version``     integer, currently 1
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
FORMAT_VERSION = 1
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

        def get(key: str, parse=str):
            if key not in meta:
                raise CheckpointError(f"{source}: metadata field {key!r} is missing")
            try:
                return parse(meta[key])
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{source}: metadata field {key!r} = {meta[key]!r} is invalid") from e

        version = get("format_version", int)
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: format_version {version} is newer than this library supports "
                f"({FORMAT_VERSION}); upgrade comfy-nearid"
            )
        return cls(
            backbone=get("backbone"),
            image_size=get("image_size", int),
            mean=tuple(get("mean", json.loads)),
            std=tuple(get("std", json.loads)),
            interpolation=get("interpolation"),
            embed_dim=get("embed_dim", int),
            num_heads=get("num_heads", int),
            mlp_dim=get("mlp_dim", int),
            layer_norm_eps=get("layer_norm_eps", float),
            num_tokens=get("num_tokens", int),
            open_clip_model=meta.get("open_clip_model", ""),
            pretrained_tag=meta.get("pretrained_tag", ""),
            format_version=version,
            provenance=json.loads(meta.get("provenance", "{}") or "{}"),
            calibration=json.loads(meta["calibration"]) if meta.get("calibration") else None,
            created=meta.get("created", ""),
            library_version=meta.get("library_version", ""),
        )

    def check_matches(self, spec: "BackboneSpec", source: str) -> None:
        """Raise :class:`HeadMismatchError` naming every field that disagrees with ``spec``."""
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
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    p = Path(path)
    meta = read_head_metadata(p)
    try:
        state = load_file(str(p))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot read head file {p}: {e}") from e
    check_head_state(state, meta.head_config, str(p))
    return state, meta


def check_head_state(state: Mapping[str, torch.Tensor], config: HeadConfig, source: str) -> None:
    reference = NearIDHead(config).state_dict()
    missing = [k for k in HEAD_KEYS if k not in state]
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        raise HeadMismatchError(f"head {source}: missing tensors {missing}, unexpected tensors {unexpected}")
    for k, v in reference.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise HeadMismatchError(
                f"head {source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)} "
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
