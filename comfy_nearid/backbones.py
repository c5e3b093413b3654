"""Frozen backbones that turn pixels into patch tokens, and their registry.

Architectures are JSON files in ``model_configs/`` read into :class:`BackboneSpec`. Two
families exist:

- ``siglip``: a timm SigLIP ViT (the tower open_clip builds for its SigLIP2 models, looked up
  through open_clip's own config so the two never disagree), built with GELU in its tanh form
  as in the reference; tokens are the final-LayerNorm patch tokens, no class token. Its own
  pooling is the pretrained MAP head (``attn_pool``).
- ``mobilenet_v2``: torchvision's ImageNet MobileNetV2 (batch norms folded into the
  convolutions, each convolution + ReLU6 one oneDNN call on CPU); tokens are the stride-16,
  upsampled stride-32 and pooled stride-8 maps, each layer-normalised (no affine), and the
  colour statistics of the pixels under each token (token version 2); its own pooling is the
  global average of the final 1280-channel map.
- ``timm_vit``: a timm ViT with a class token (DINO, DINOv2); tokens are the final-norm patch
  tokens (prefix tokens dropped), its own pooling is the final-norm CLS token (DINO-I, DINOv2).
- ``open_clip``: an open_clip CLIP image tower; tokens are its ``ln_post`` patch tokens, its
  own pooling is the projected image embedding (CLIP-I).

The field's standard metrics are these backbones' own pooling with their conventional
preprocessing (shorter side resized + centre crop, their own interpolation and
normalisation), carried in the spec (``resize``, ``resize_size``) and read by the one
:class:`~comfy_nearid.images.Preprocess`; ``metric_name`` is the scorer name they go by.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InvalidInputError
from .head import HeadConfig, NearIDHead
from .images import Preprocess

logger = logging.getLogger(__name__)

FAMILIES = ("siglip", "mobilenet_v2", "timm_vit", "open_clip")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone, preprocess its input and size its head."""

    name: str
    family: str
    image_size: int
    patch_size: int
    embed_dim: int
    head: HeadConfig
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    resize: str = "squash"  # "squash" (no crop) or "shorter" (shorter side + centre crop)
    resize_size: int | None = None  # with "shorter": the shorter side before the crop
    pooled_dim: int | None = None  # width of the own pooling when it is not embed_dim
    metric_name: str | None = None  # scorer name of the own pooling ("clip-i", "dino-i", ...)
    description: str = ""
    open_clip_model: str | None = None
    pretrained_tag: str | None = None
    open_clip_kwargs: dict[str, Any] = field(default_factory=dict)
    hf_reference: str | None = None
    hf_hub: str | None = None  # Hugging Face repo holding weights_files (when not open_clip's)
    timm_model: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    weights_files: tuple[str, ...] = ()
    weights_sha256: str | None = None
    # Which construction of the tokens from the trunk's maps (bumped when a family's tokens
    # change; recorded in head files and caches, which refuse tokens of another version).
    token_version: int = 1

    @property
    def grid_size(self) -> tuple[int, int]:
        """Token grid (rows, cols); pixels past ``grid * patch`` are not seen (as in the reference)."""
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def num_tokens(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, tuple(self.mean), tuple(self.std), self.interpolation,
                          resize=self.resize, resize_size=self.resize_size)

    @property
    def has_pretrained(self) -> bool:
        return bool(self.weights_files)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "BackboneSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InvalidInputError(f"backbone config {source}: unknown field(s) {sorted(unknown)}")
        missing = {"name", "family", "image_size", "patch_size", "embed_dim", "head"} - set(d)
        if missing:
            raise InvalidInputError(f"backbone config {source}: missing field(s) {sorted(missing)}")
        if d["family"] not in FAMILIES:
            raise InvalidInputError(
                f"backbone config {source}: family {d['family']!r} is not one of {FAMILIES}"
            )
        d = dict(d)
        d["head"] = HeadConfig(dim=int(d["embed_dim"]), **d["head"])
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(x) for x in d[key])
        d["weights_files"] = tuple(d.get("weights_files", ()))
        spec = cls(**d)
        try:
            spec.preprocess
        except InvalidInputError as e:
            raise InvalidInputError(f"backbone config {source}: {e}") from e
        return spec


@lru_cache(maxsize=1)
def _registry() -> dict[str, BackboneSpec]:
    specs: dict[str, BackboneSpec] = {}
    folder = resources.files("comfy_nearid") / "model_configs"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            spec = BackboneSpec.from_dict(json.loads(entry.read_text()), source=entry.name)
            specs[spec.name] = spec
    return specs


def list_backbones() -> list[str]:
    """Names of the registered backbones."""
    return sorted(_registry())


def metric_backbones() -> dict[str, str]:
    """``{metric name: backbone name}`` for the backbones whose own pooling is a standard
    metric (``clip-i``, ``dino-i``, ...)."""
    return {spec.metric_name: spec.name for spec in _registry().values() if spec.metric_name}


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return _registry()[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown backbone {name!r}; registered backbones: {', '.join(list_backbones())}"
        ) from None


class Backbone(nn.Module):
    """A frozen image encoder returning patch tokens ``[B, N, D]`` (always eval, no grad)."""

    def __init__(self, spec: BackboneSpec, trunk: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights_path: Path | None = None  # the weights file loaded (set by build_backbone)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":  # frozen: never leaves eval mode
        return super().train(False)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.spec.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (s, s):
            raise InvalidInputError(
                f"backbone {self.spec.name} expects preprocessed pixels [B, 3, {s}, {s}], "
                f"got {tuple(pixels.shape)}"
            )

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, S, S]`` -> patch tokens ``[B, N, D]``.

        Tokens only: the layers that serve only the own pooled readout are not run (for
        MobileNetV2 its last block and the 1x1 convolution to 1280 channels, about a seventh of
        its work; for SigLIP the attention-pooling head)."""
        if self.spec.family == "mobilenet_v2":
            self._check_pixels(pixels)
            return self._mobilenet_tokens(pixels)[0]
        if self.spec.family == "siglip":
            self._check_pixels(pixels)
            return self.trunk.forward_features(pixels)
        return self.tokens_and_pooled(pixels)[0]

    @torch.no_grad()
    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooled embedding ``[B, D']`` (not normalised)."""
        return self.tokens_and_pooled(pixels)[1]

    @torch.no_grad()
    def tokens_and_pooled(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass serving both readouts: (patch tokens ``[B, N, D]``, own pooled ``[B, D']``)."""
        self._check_pixels(pixels)
        if self.spec.family == "siglip":
            tokens = self.trunk.forward_features(pixels)
            return tokens, self.trunk.forward_head(tokens, pre_logits=True)
        if self.spec.family == "timm_vit":
            features = self.trunk.forward_features(pixels)  # [B, prefix + N, D], final norm
            return features[:, self.trunk.num_prefix_tokens:], self.trunk.forward_head(features, pre_logits=True)
        if self.spec.family == "open_clip":
            pooled, tokens = self.trunk(pixels)  # output_tokens: (projected embedding, patch tokens)
            return tokens, pooled
        tokens, deep = self._mobilenet_tokens(pixels)
        return tokens, self.trunk.features[17:](deep).mean(dim=(2, 3))

    def _mobilenet_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised pixels ``[B, 3, S, S]`` -> (tokens ``[B, (S/16)^2, D]``, the stride-32 map).

        One token per 16x16-pixel cell (``token_version`` 2, issue 21), the concatenation of
        ``MOBILENET_TOKEN_GROUPS``: the stride-16 map (96 ch), the stride-32 map (160 ch,
        nearest-upsampled), the stride-8 map (32 ch, 2x2 average-pooled), each layer-normalised
        on its own, and the colour of the pixels under the token (mean and standard deviation of
        R, G, B in 0..1, 6 values). The two finer groups carry what the stride-16/32 maps have
        lost: colour and detail.
        """
        feats = self.trunk.features
        x = pixels
        if x.device.type == "cpu":
            # depthwise convolutions run about twice as fast channels-last on CPU
            x = x.contiguous(memory_format=torch.channels_last)
        s8 = feats[:7](x)  # [B, 32, S/8, S/8]
        s16 = feats[7:14](s8)  # [B, 96, S/16, S/16]
        s32 = feats[14:17](s16)  # [B, 160, S/32, S/32]
        grid = s16.shape[-2:]
        maps = [s16, F.interpolate(s32, size=grid, mode="nearest"), F.avg_pool2d(s8, 2)]
        maps = [F.layer_norm(m.permute(0, 2, 3, 1), m.shape[1:2]) for m in maps]  # [B, g, g, C] each
        colour = _cell_colour(pixels, self.spec, grid)  # [B, g, g, 6]; from the caller's layout (pools 2x faster than channels-last)
        tokens = torch.cat([*maps, colour.to(maps[0].dtype)], dim=-1)
        return tokens.flatten(1, 2), s32

    def pooling_head_state(self) -> dict[str, torch.Tensor] | None:
        """The pretrained pooling head in :class:`NearIDHead` names, or None if there is none."""
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is None:
            return None
        return NearIDHead.state_from_timm_attn_pool(
            {k: v.detach().clone() for k, v in pool.state_dict().items()}
        )


# The channels of a mobilenet-v2 token (token_version 2), in order; their sum is embed_dim.
MOBILENET_TOKEN_GROUPS = (("stride16", 96), ("stride32", 160), ("stride8", 32), ("colour", 6))


def _cell_colour(pixels: torch.Tensor, spec: BackboneSpec, grid: tuple[int, int]) -> torch.Tensor:
    """Colour statistics of the pixels under each token: normalised pixels ``[B, 3, S, S]`` ->
    ``[B, gh, gw, 6]``, the mean then the standard deviation of R, G, B (in 0..1) over each
    ``patch x patch`` cell of the token grid."""
    mean = torch.tensor(spec.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    rgb = pixels * std + mean
    p = spec.patch_size
    rgb = rgb[..., : grid[0] * p, : grid[1] * p]
    m = F.avg_pool2d(rgb, p)
    var = (F.avg_pool2d(rgb.square(), p) - m.square()).clamp_min(0)
    return torch.cat([m, var.sqrt()], dim=1).permute(0, 2, 3, 1)


def build_trunk(spec: BackboneSpec) -> nn.Module:
    """Build the backbone network with random weights (no download)."""
    if spec.family == "siglip":
        import timm

        timm_name = spec.timm_model
        if spec.open_clip_model:
            timm_name = _timm_name_from_open_clip(spec)
        kwargs = dict(spec.timm_kwargs)
        kwargs.setdefault("patch_size", spec.patch_size)
        return timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=spec.image_size,
            act_layer="gelu_tanh",  # the reference uses tanh-GELU; timm's SigLIP default is exact
            **kwargs,
        )
    if spec.family == "timm_vit":
        import timm

        kwargs = {"img_size": spec.image_size, **spec.timm_kwargs}
        return timm.create_model(spec.timm_model, pretrained=False, num_classes=0, **kwargs)
    if spec.family == "open_clip":
        return _build_open_clip_visual(spec)
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(weights=None)


def _build_open_clip_visual(spec: BackboneSpec) -> nn.Module:
    """open_clip's image tower alone (no text tower), from open_clip's own model config.

    ``open_clip_kwargs``: ``quick_gelu`` (the OpenAI weights need it), ``embed_dim`` and
    ``vision_cfg`` entries that override the config (tiny test variants)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(spec.open_clip_model)
    if cfg is None:
        raise InvalidInputError(
            f"open_clip does not know model {spec.open_clip_model!r} (backbone {spec.name}); upgrade open_clip_torch"
        )
    options = dict(spec.open_clip_kwargs)
    vision_cfg = {**cfg["vision_cfg"], **options.pop("vision_cfg", {})}
    embed_dim = int(options.pop("embed_dim", cfg["embed_dim"]))
    quick_gelu = bool(options.pop("quick_gelu", cfg.get("quick_gelu", False)))
    if options:
        raise InvalidInputError(
            f"backbone {spec.name}: unknown open_clip_kwargs {sorted(options)}; "
            "allowed: quick_gelu, embed_dim, vision_cfg"
        )
    visual = _build_vision_tower(embed_dim, CLIPVisionCfg(**vision_cfg), quick_gelu=quick_gelu)
    visual.output_tokens = True
    return visual


def _timm_name_from_open_clip(spec: BackboneSpec) -> str:
    import open_clip

    cfg = open_clip.get_model_config(spec.open_clip_model)
    if cfg is None:
        raise InvalidInputError(
            f"open_clip does not know model {spec.open_clip_model!r} (backbone {spec.name}); "
            "upgrade open_clip_torch"
        )
    name = cfg["vision_cfg"].get("timm_model_name")
    if spec.timm_model and name != spec.timm_model:
        logger.warning(
            "open_clip maps %s to timm %s, registry says %s; using open_clip's",
            spec.open_clip_model, name, spec.timm_model,
        )
    return name


def load_backbone_state(
    trunk: nn.Module, spec: BackboneSpec, state: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Load weights in open_clip (``visual.trunk.*``, or ``visual.*`` for CLIP towers), timm or
    torchvision layout, strictly. ``assign``: take the tensors themselves (for a trunk built on
    the meta device)."""
    prefixes = ("visual.", "module.") if spec.family == "open_clip" else ("visual.trunk.", "trunk.", "module.")
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    expected = trunk.state_dict()
    if spec.family == "mobilenet_v2":
        state = {k: v for k, v in state.items() if k in expected or not k.startswith("classifier")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"weights {source} do not fit backbone {spec.name}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} wrong shapes (e.g. {bad_shape[:2]})"
        )
    trunk.load_state_dict(state, strict=True, assign=assign)
    if assign:
        left = [n for n, t in [*trunk.named_parameters(), *trunk.named_buffers()] if t.is_meta]
        if left:  # a buffer the state dict does not hold (non-persistent) would stay empty
            raise CheckpointError(f"weights {source}: backbone {spec.name} has tensors no file holds: {left[:5]}")


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that follows a ``Conv2d`` in an ``nn.Sequential``
    into that convolution (in place; the norm becomes ``nn.Identity``); returns how many.

    A frozen backbone never leaves eval mode, so the norm is a fixed per-channel affine map:
    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``. On CPU
    this halves MobileNetV2's time per image (one pass over each activation instead of two);
    the outputs differ from the unfolded network by float rounding only (issue 21).
    Call it after the weights are loaded: the folded trunk no longer has the norms' keys.
    """
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or bn.running_var is None:
                continue
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, *([1] * (conv.weight.ndim - 1))))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            setattr(seq, bn_name, nn.Identity())
            folded += 1
    return folded


def _fused_conv_available() -> bool:
    """Whether this torch build has oneDNN's convolution with a fused activation (CPU)."""
    global _FUSED_CONV
    if _FUSED_CONV is None:
        try:
            _FUSED_CONV = torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._convolution_pointwise)
        except (AttributeError, RuntimeError):
            _FUSED_CONV = False
    return _FUSED_CONV


_FUSED_CONV: bool | None = None


class Conv2dReLU6(nn.Conv2d):
    """A ``Conv2d`` followed by ReLU6 (``hardtanh(0, 6)``), run as one oneDNN call on CPU.

    Same parameters and state-dict keys as the convolution it replaces. On CPU in float32
    without autograd, the clamp is applied by the convolution kernel as it writes its output
    (one pass over the activation instead of two; ReLU6 alone took a fifth of MobileNetV2's
    time on 2 CPU cores); elsewhere (GPU, other dtypes, gradients, a torch without oneDNN)
    it is the plain convolution then ``hardtanh``. Both give the same numbers.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and _fused_conv_available()):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                "hardtanh", [0.0, 6.0], "",
            )
        return F.hardtanh(super().forward(x), 0.0, 6.0)


def fuse_conv_relu6(module: nn.Module) -> int:
    """Replace every ``Conv2d`` followed (past ``nn.Identity`` children, e.g. folded norms) by
    ``ReLU6`` in an ``nn.Sequential`` with one :class:`Conv2dReLU6` holding the same
    parameters (in place; the ReLU6 becomes ``nn.Identity``); returns how many.

    The state-dict keys do not change, so the weights fingerprint of a feature cache does not
    either. Call it after :func:`fold_batch_norms`.
    """
    fused = 0
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for i, (conv_name, conv) in enumerate(children):
            if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
                continue
            j = i + 1
            while j < len(children) and isinstance(children[j][1], nn.Identity):
                j += 1
            if j == len(children) or not isinstance(children[j][1], nn.ReLU6):
                continue
            with torch.device("meta"):
                conv_act = Conv2dReLU6(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                       conv.padding, conv.dilation, conv.groups, bias=conv.bias is not None)
            conv_act.weight, conv_act.bias = conv.weight, conv.bias
            setattr(seq, conv_name, conv_act)
            setattr(seq, children[j][0], nn.Identity())
            fused += 1
    return fused


def build_backbone(
    name: str | BackboneSpec,
    pretrained: bool = True,
    weights: str | Path | None = None,
    allow_download: bool = False,
) -> Backbone:
    """Build a frozen backbone; with ``pretrained`` its weights are found on disk (see
    :func:`comfy_nearid.weights.resolve_backbone_weights`) or the call fails at once."""
    from .weights import read_state_dict, resolve_backbone_weights

    spec = name if isinstance(name, BackboneSpec) else get_backbone_spec(name)
    path = None
    if pretrained or weights is not None:
        # look the weights up first: a missing file fails at once, before a slow build
        path = resolve_backbone_weights(spec, weights, allow_download=allow_download)
    if path is None:
        trunk = build_trunk(spec)
    else:
        # Weights follow: build on the meta device (no random init, which costs far more than
        # reading the file: ~40 s for SO400M on 2 cores) and take the file's tensors as they are.
        with torch.device("meta"):
            trunk = build_trunk(spec)
        load_backbone_state(trunk, spec, read_state_dict(path), str(path), assign=True)
        trunk = trunk.float()  # as a copy into the fp32 parameters would (files may be fp16)
        logger.info("loaded %s weights from %s", spec.name, path)
    if spec.family == "mobilenet_v2":
        fold_batch_norms(trunk)
        fuse_conv_relu6(trunk)
        trunk = trunk.to(memory_format=torch.channels_last)
    backbone = Backbone(spec, trunk)
    backbone.weights_path = path  # the file actually loaded (None: random weights)
    return backbone
