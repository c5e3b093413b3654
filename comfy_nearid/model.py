"""IdentityModel (frozen backbone + NearID head) and :func:`load_model`, the one factory that
the CLI, the trainer, the evaluator and the ComfyUI nodes all use."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone, BackboneSpec, build_backbone, get_backbone_spec
from .checkpoint import HeadMetadata, head_hash, load_head_file, read_head_metadata, save_head
from .errors import HeadMismatchError, InvalidInputError
from .head import NearIDHead
from .images import Preprocess, as_mask_arrays, as_pil_images
from .weights import weights_fingerprint

logger = logging.getLogger(__name__)

READOUTS = ("head", "pooled", "mean")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (or fp16) on CUDA, fp32 on CPU (see README: bf16 is opt-in on CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InvalidInputError(f"dtype must be auto, fp32, fp16 or bf16; got {dtype!r}") from None


MaskLike = Union[np.ndarray, Image.Image, None]


def mask_token_grid(mask: MaskLike, spec: BackboneSpec, threshold: float = 0.5) -> torch.Tensor:
    """One subject mask -> bool token mask ``[N]`` over the backbone's token grid.

    ``mask``: a float ``[H, W]`` array in 0..1 (1 = subject), a PIL image (grey levels /255)
    or None. The mask gets the image's own geometry (squash, or shorter side + centre crop;
    bilinear), is cropped to the area the token grid covers and averaged per patch; a token is
    kept when at least
    ``threshold`` of it is subject. The policy for the edge cases, the same for every caller
    (model, trainer, evaluator, nodes):

    - a mask too thin for ``threshold`` keeps every token it touches;
    - a missing mask (None) or an empty one (no subject pixel) keeps every token: the whole
      image is used, as without masks (an empty mask is logged as a warning).
    """
    gh, gw = spec.grid_size
    if mask is None:
        return torch.ones(gh * gw, dtype=torch.bool)
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    else:
        arr = np.asarray(mask, dtype=np.float32)
        if arr.ndim == 3:  # [H, W, C] grey/RGB: channels averaged
            arr = arr.mean(axis=-1)
    if arr.ndim != 2:
        raise InvalidInputError(f"a mask must be [H, W], got shape {tuple(arr.shape)}")
    p = spec.patch_size
    # the image's own geometry (squash, or shorter side + centre crop), bilinear for a mask
    img = spec.preprocess.geometry(Image.fromarray(np.ascontiguousarray(arr), mode="F"), "bilinear")
    resized = np.asarray(img, dtype=np.float32)[: gh * p, : gw * p]
    coverage = resized.reshape(gh, p, gw, p).mean(axis=(1, 3)).reshape(-1)
    keep = coverage >= threshold
    if not keep.any():
        keep = coverage > 1e-6
    if not keep.any():
        logger.warning("an object mask is empty (no subject pixel): its image keeps every token")
        keep = np.ones_like(keep)
    return torch.from_numpy(np.ascontiguousarray(keep))


def masks_to_token_mask(masks: Sequence[MaskLike], spec: BackboneSpec, threshold: float = 0.5) -> torch.Tensor:
    """Subject masks (see :func:`mask_token_grid`; None = no mask) -> bool token mask ``[B, N]``."""
    if not len(masks):
        return torch.ones(0, spec.num_tokens, dtype=torch.bool)
    return torch.stack([mask_token_grid(m, spec, threshold) for m in masks])


def embed_tokens(
    tokens: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    head: nn.Module | None = None,
    readout: str = "head",
) -> torch.Tensor:
    """Patch tokens ``[B, N, D]`` -> unit embeddings ``[B, D]`` (fp32): the one readout.

    Every caller that holds tokens (:class:`IdentityModel`, the trainer's loop and validation,
    the demo, the benchmarks) turns them into embeddings here, so they all compute the same
    numbers. Tokens are read in fp32 whatever precision they were stored in. ``token_mask``
    (bool ``[B, N]``, from :func:`masks_to_token_mask`) restricts the readout to those tokens.
    ``readout``: ``head`` (``head`` required) or ``mean`` (masked mean of the tokens).
    Gradients flow when enabled (the caller decides: ``embed_pixels`` runs under inference mode).
    """
    if readout == "pooled":
        raise InvalidInputError("the 'pooled' readout works on pixels, not tokens; use embed_pixels")
    if readout == "head" and head is None:
        raise InvalidInputError("the 'head' readout needs a head")
    tokens = tokens.float()
    if tokens.is_inference() and torch.is_grad_enabled():
        tokens = tokens.clone()  # backbone tokens from inference mode, read by a trained head
    if token_mask is not None:
        token_mask = token_mask.to(device=tokens.device, dtype=torch.bool)
    if readout == "mean":
        if token_mask is None:
            pooled = tokens.mean(dim=1)
        else:
            w = token_mask.to(tokens.dtype).unsqueeze(-1)
            pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)
    return head(tokens, mask=token_mask).float()


class IdentityModel(nn.Module):
    """A frozen backbone and a NearID head; ``embed`` maps images to unit identity vectors.

    ``readout`` selects how tokens become an embedding: ``head`` (the NearID/MAP head),
    ``pooled`` (the backbone's own pooling, the "frozen backbone" baseline) or ``mean``
    (mean of the patch tokens).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: NearIDHead,
        *,
        readout: str = "head",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = "auto",
        backbone_id: str = "",
        head_source: str = "",
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise InvalidInputError(f"readout must be one of {READOUTS}, got {readout!r}")
        if head.config.dim != backbone.spec.embed_dim:
            raise HeadMismatchError(
                f"head width {head.config.dim} does not match backbone {backbone.spec.name} width {backbone.spec.embed_dim}"
            )
        self.backbone = backbone
        self.head = head
        self.readout = readout
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.backbone_id = backbone_id or backbone.spec.name
        self.head_source = head_source
        self.head.requires_grad_(False)
        self.head.eval()
        self.to(self.device)
        if self.device.type != "cpu" and self.dtype != torch.float32:
            self.backbone.to(self.dtype)  # frozen weights in low precision; the head stays fp32
        self._identity: str | None = None

    # ----------------------------------------------------------------- properties
    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    @property
    def preprocess(self) -> Preprocess:
        return self.spec.preprocess

    @property
    def embed_dim(self) -> int:
        if self.readout == "pooled" and self.spec.pooled_dim:
            return self.spec.pooled_dim
        return self.spec.embed_dim

    @property
    def identity(self) -> str:
        """Stable description of everything that determines an embedding (cache key), from
        content, not names: backbone architecture, ``weights=sha256:`` of the weights file
        loaded (or the random seed), preprocessing, readout, the token construction's version
        when it is not 1, the head's tensor hash and the compute dtype when it is not fp32."""
        if self._identity is None:
            parts = [self.spec.name, self.backbone_id, self.preprocess.describe(), f"readout={self.readout}"]
            if self.spec.token_version != 1 and self.readout != "pooled":  # the tokens changed
                parts.append(f"tokens=v{self.spec.token_version}")
            if self.readout == "head":
                parts.append("head=" + head_hash(self.head.state_dict()))
            if self.dtype != torch.float32:  # low-precision embeddings are not fp32's
                parts.append("dtype=" + str(self.dtype).replace("torch.", ""))
            self._identity = "|".join(parts)
        return self._identity

    def invalidate_identity(self) -> None:
        """Call after changing the head's weights in place."""
        self._identity = None

    # ----------------------------------------------------------------- pieces
    def preprocess_batch(self, images: Any) -> torch.Tensor:
        """Any supported images -> normalised pixels ``[B, 3, S, S]`` (CPU, fp32)."""
        return self.preprocess.batch(as_pil_images(images))

    def token_mask(self, masks: Any, count: int) -> torch.Tensor:
        """Masks (ComfyUI MASK, PIL, paths, arrays; in a list, None = no mask for that image)
        -> bool ``[count, N]`` (policy for missing/empty masks: :func:`mask_token_grid`)."""
        if isinstance(masks, (list, tuple)) and any(m is None for m in masks):
            if len(masks) != count:
                raise InvalidInputError(f"masks: {len(masks)} entries for {count} images")
            arrays = [None if m is None else as_mask_arrays(m, 1)[0] for m in masks]
            return masks_to_token_mask(arrays, self.spec)
        return masks_to_token_mask(as_mask_arrays(masks, count), self.spec)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self.dtype == torch.float32 or self.device.type != "cpu":
            yield
        else:
            with torch.autocast("cpu", dtype=self.dtype):
                yield

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B,3,S,S]`` -> frozen patch tokens ``[B, N, D]`` (fp32)."""
        pixels = pixels.to(self.device)
        if self.device.type != "cpu":
            pixels = pixels.to(self.dtype)
        with torch.inference_mode(), self._precision():
            return self.backbone(pixels).float()

    def embed_tokens(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        head: nn.Module | None = None,
    ) -> torch.Tensor:
        """Patch tokens ``[B, N, D]`` -> unit embeddings ``[B, D]`` (fp32): :func:`embed_tokens`
        with this model's head and readout (or ``head``, the trainer's trainable copy: given, it
        is used whatever ``readout`` says)."""
        if head is not None:
            return embed_tokens(tokens, token_mask, head=head)
        return embed_tokens(tokens, token_mask, head=self.head, readout=self.readout)

    def embed_pixels(self, pixels: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised pixels ``[B,3,S,S]`` -> unit embeddings ``[B, D]`` (fp32, on the model's device)."""
        if self.readout == "pooled":
            if token_mask is not None:
                raise InvalidInputError("the 'pooled' readout cannot use masks; use readout 'head' or 'mean'")
            pixels = pixels.to(self.device)
            if self.device.type != "cpu":
                pixels = pixels.to(self.dtype)
            with torch.inference_mode(), self._precision():
                return F.normalize(self.backbone.pooled(pixels).float(), dim=-1)
        tokens = self.tokens(pixels)
        with torch.inference_mode():
            return self.embed_tokens(tokens, token_mask)

    # ----------------------------------------------------------------- public API
    def embed(
        self,
        images: Any,
        masks: Any = None,
        batch_size: int = 32,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images -> L2-normalised embeddings ``[N, D]`` (float32, CPU).

        ``images``: PIL image(s), path(s), float ``[B,3,H,W]`` / ComfyUI ``[B,H,W,C]`` in 0..1.
        ``masks``: optional subject masks (ComfyUI MASK ``[B,H,W]``, PIL, paths); attention is
        restricted to the masked patches.
        """
        pils = as_pil_images(images)
        token_mask = self.token_mask(masks, len(pils)) if masks is not None else None
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        out = []
        bar = tqdm(total=len(pils), desc="embedding", unit="img", disable=not progress)
        for start in range(0, len(pils), batch_size):
            chunk = pils[start : start + batch_size]
            pixels = self.preprocess.batch(chunk)
            tm = None if token_mask is None else token_mask[start : start + batch_size]
            out.append(self.embed_pixels(pixels, tm).cpu())
            bar.update(len(chunk))
        bar.close()
        return torch.cat(out)

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Cosine similarity matrix ``[len(a), len(b)]`` between two image sets."""
        ea = a if isinstance(a, torch.Tensor) and a.ndim == 2 and a.shape[-1] == self.embed_dim else self.embed(a)
        eb = b if isinstance(b, torch.Tensor) and b.ndim == 2 and b.shape[-1] == self.embed_dim else self.embed(b)
        return ea @ eb.T

    def attention_map(self, image: Any, mask: Any = None) -> torch.Tensor:
        """The head's attention over the token grid for one image: ``[gh, gw]``, sums to 1
        (mean over heads)."""
        pils = as_pil_images(image)[:1]
        pixels = self.preprocess.batch(pils)
        tm = self.token_mask(mask, 1).to(self.device) if mask is not None else None
        tokens = self.tokens(pixels)
        with torch.inference_mode():
            _, attn = self.head(tokens, mask=tm, return_attention=True)
        gh, gw = self.spec.grid_size
        return attn[0].mean(0).reshape(gh, gw).float().cpu()

    def save_head(self, path: str | Path, provenance: dict | None = None, calibration: dict | None = None) -> Path:
        return save_head(path, self.head, self.spec, provenance=provenance, calibration=calibration)


def load_model(
    head: str | Path | NearIDHead | None = None,
    backbone: str | BackboneSpec | None = None,
    *,
    backbone_weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "auto",
    readout: str = "head",
    seed: int = 0,
    allow_download: bool = False,
) -> IdentityModel:
    """Build an :class:`IdentityModel`.

    - ``head``: a head ``.safetensors`` file (its metadata names the backbone), a
      :class:`NearIDHead`, or None: the backbone's own pretrained pooling head (SigLIP) or a
      fresh seeded head (backbones without one; untrained).
    - ``backbone``: registry name; needed when ``head`` is not a file. With a head file it
      must agree with the file's metadata.
    - ``pretrained=False`` builds the backbone with random weights seeded by ``seed``
      (tests); otherwise weights come from ``backbone_weights`` or the usual places on disk.
    """
    meta: HeadMetadata | None = None
    head_source = ""
    if isinstance(head, (str, Path)):
        meta = read_head_metadata(head)
        head_source = str(head)
        if backbone is not None:
            name = backbone.name if isinstance(backbone, BackboneSpec) else backbone
            if name != meta.backbone:
                raise HeadMismatchError(
                    f"head {head} was trained on backbone {meta.backbone!r}, but backbone {name!r} was requested"
                )
        backbone = backbone if isinstance(backbone, BackboneSpec) else meta.backbone
    if backbone is None:
        raise InvalidInputError("load_model needs a head file or a backbone name")
    spec = backbone if isinstance(backbone, BackboneSpec) else get_backbone_spec(backbone)
    if meta is not None:
        meta.check_matches(spec, head_source)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bb = build_backbone(
            spec, pretrained=pretrained, weights=backbone_weights, allow_download=allow_download
        )
        if isinstance(head, NearIDHead):
            nh = head
        else:
            nh = NearIDHead(meta.head_config if meta is not None else spec.head)
            if meta is not None:
                state, _ = load_head_file(head_source)
                nh.load_state_dict(state)
            else:
                own = bb.pooling_head_state()
                if own is not None:
                    nh.load_state_dict(own)
                    head_source = f"{spec.name}:own-pooling-head"
                else:
                    head_source = f"fresh-init(seed={seed})"
                    if readout == "head":
                        logger.warning(
                            "backbone %s has no pooling head of its own: the head is freshly initialised "
                            "and untrained; load a trained head file for meaningful scores", spec.name,
                        )
    # identity from content: the loaded weights file's hash (explicit or auto-located alike)
    backbone_id = f"weights={weights_fingerprint(bb.weights_path)}" if bb.weights_path else f"random(seed={seed})"
    model = IdentityModel(
        bb, nh, readout=readout, device=device, dtype=dtype, backbone_id=backbone_id, head_source=head_source
    )
    model.head_metadata = meta
    return model
