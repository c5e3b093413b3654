"""Training configuration: typed dataclasses, YAML/JSON loading, command-line overrides.

The defaults are the paper's R7 recipe (PROTOCOL section 6); a config file only needs the
keys it changes. Every field can be overridden on the command line as ``--section.key value``
or ``section.key=value`` (top-level keys without a section: ``--seed 3``, ``seed=3``). Unknown
keys and values of the wrong type are refused with a :class:`ConfigError` naming the key.

Batch sizes are global: ``train.batch_size`` samples per optimizer micro-step over all
processes together, so one config gives the same optimisation on one GPU or on eight.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from comfy_nearid.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "FeaturesConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override_args",
    "write_config",
]


@dataclass
class ModelConfig:
    """The frozen backbone and the head's starting point."""

    backbone: str = "siglip2-so400m"
    pretrained: bool = True
    backbone_weights: str | None = None  # a weights file/folder; None = the usual places on disk
    backbone_seed: int = 0  # weights seed when pretrained is false (tests)
    # "own": the backbone's pretrained pooling head (SigLIP), or a fresh seeded head when it has
    # none; "fresh": always a fresh seeded head; or a path to a head .safetensors file.
    init_head: str = "own"
    head_seed: int = 0


@dataclass
class DataConfig:
    """Where the samples come from and how one training example is drawn from a sample."""

    format: Literal["folder", "published"] = "published"
    train: str = "Aleksandar/NearID"  # folder root / positives dataset path
    train_split: str | None = None  # folder: split sub-folder ("train"); published: DatasetDict split
    train_indices: str | None = None  # index file selecting rows ({"indices": [...]} or a list)
    # published format: {source name: distractor dataset path}; folder format: unused.
    distractor_paths: dict[str, str] = field(default_factory=dict)
    sources: list[str] | None = None  # distractor sources to train on; None = all present
    distractor_mode: Literal["one_source", "all_sources"] = "one_source"
    val: str | None = None  # validation data (same format); None = no separate set
    val_split: str | None = None
    val_indices: str | None = None
    val_sources: list[str] | None = None  # None = the training sources
    val_fraction: float = 0.0  # hold out this share of training samples when val is None
    # how val_fraction holds samples out: random identities, or whole categories (validation,
    # best-head choice and the exported head's calibration then see only unseen categories)
    val_split_by: Literal["identity", "category"] = "identity"
    val_max_samples: int | None = None  # validate on the first N samples only
    test: str | None = None  # held-out test data, evaluated once at the end with the best head
    test_split: str | None = None
    test_indices: str | None = None
    test_sources: list[str] | None = None  # None = every source present (each reported)
    positives: int = 2  # P positive slots per sample
    negatives: int = 3  # K distractor slots per sample
    foreground_mask: bool = False  # restrict the head to the object's tokens (needs masks)
    num_workers: int = 0


@dataclass
class AugmentConfig:
    """Image augmentations (each applied with its probability, independently per image)."""

    flip_prob: float = 0.0
    color_jitter_prob: float = 0.0
    color_jitter_strength: float = 0.2  # brightness/contrast/saturation factors in 1 +- this
    translate_prob: float = 0.0
    translate_fraction: float = 0.1  # max shift as a fraction of the side
    scale_min: float = 0.9
    scale_max: float = 1.1

    @property
    def enabled(self) -> bool:
        return max(self.flip_prob, self.color_jitter_prob, self.translate_prob) > 0.0


@dataclass
class FeaturesConfig:
    """Frozen-feature cache: embed every image's patch tokens once and train from disk."""

    cache: bool = False
    cache_dir: str | None = None  # None = <output_dir>/feature_cache
    dtype: Literal["float16", "float32"] = "float16"  # precision of the tokens the head reads
    batch_size: int = 64  # images per backbone forward when building the cache / live
    max_cache_gb: float = 64.0  # refuse to build a larger cache (the paper's data needs ~600 GB)


@dataclass
class LossConfig:
    temperature: float = 0.07
    alpha: float = 0.5


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0


@dataclass
class TrainLoopConfig:
    epochs: int = 11
    max_steps: int | None = None  # stop after this many optimizer steps (None = all epochs)
    batch_size: int = 128  # global samples per micro-step, over all processes
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    cpu: bool = False  # force CPU even when a GPU is present


@dataclass
class CheckpointConfig:
    every_steps: int = 100  # save_state every N optimizer steps (0 = only at the end)
    total_limit: int = 3  # keep the newest N checkpoints
    resume: str | None = None  # "latest" or a checkpoint folder


@dataclass
class EvalConfig:
    every_steps: int = 100  # validation every N optimizer steps (0 = only at the end)
    batch_size: int = 64
    select_by: Literal["ssr", "pa"] = "ssr"  # the best head is the one with the highest value
    baseline: bool = False  # also score the frozen backbone's own pooling on the test data
    # distractor sources whose pairs fit the exported head's identity-match curve (None = every
    # validation source); a two-parameter curve fits one kind of look-alike, not a mixture
    calibration_sources: list[str] | None = None


@dataclass
class LoggingConfig:
    tracker: Literal["csv", "tensorboard", "none"] = "csv"
    every_steps: int = 10
    progress: bool = True


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults: the paper's R7 recipe."""

    output_dir: str = "runs/nearid"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def check(self) -> None:
        """Cross-field checks; raises :class:`ConfigError` naming the offending key."""
        positive_ints = {
            "data.positives": self.data.positives,
            "data.negatives": self.data.negatives,
            "train.epochs": self.train.epochs,
            "train.batch_size": self.train.batch_size,
            "train.gradient_accumulation_steps": self.train.gradient_accumulation_steps,
            "features.batch_size": self.features.batch_size,
            "eval.batch_size": self.eval.batch_size,
            "checkpoint.total_limit": self.checkpoint.total_limit,
            "logging.every_steps": self.logging.every_steps,
        }
        for key, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        non_negative = {
            "checkpoint.every_steps": self.checkpoint.every_steps,
            "eval.every_steps": self.eval.every_steps,
            "optim.warmup_steps": self.optim.warmup_steps,
            "data.num_workers": self.data.num_workers,
            "optim.weight_decay": self.optim.weight_decay,
            "loss.alpha": self.loss.alpha,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        if self.train.max_steps is not None and self.train.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.train.max_steps}")
        if not self.loss.temperature > 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.loss.temperature}")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.data.val_split_by not in ("identity", "category"):
            raise ConfigError(f"data.val_split_by must be 'identity' or 'category', got {self.data.val_split_by!r}")
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.optim.betas}")
        for key in ("flip_prob", "color_jitter_prob", "translate_prob"):
            p = getattr(self.augment, key)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augment.{key} must be in [0, 1], got {p}")
        if not 0 < self.augment.scale_min <= self.augment.scale_max:
            raise ConfigError(
                f"augment.scale_min/scale_max must satisfy 0 < min <= max, got "
                f"{self.augment.scale_min}, {self.augment.scale_max}"
            )
        if self.features.cache and self.augment.enabled:
            raise ConfigError(
                "features.cache=true cannot be combined with augmentations (augment.*_prob > 0): "
                "the cache holds the tokens of the unaugmented images; turn one of them off"
            )


# --------------------------------------------------------------------------- typed values


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, key: str, from_text: bool) -> Any:
    """Check ``value`` against the type ``tp`` (converting command-line text where needed)."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, from_text)
            except ConfigError:
                continue
        raise wrong
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and from_text:
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, item, f"{key}[{i}]", from_text) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if isinstance(value, str) and from_text:
            value = yaml.safe_load(value)
        if not isinstance(value, Mapping):
            raise wrong
        return {str(k): _coerce(v, item, f"{key}.{k}", from_text) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _update_dataclass(obj: Any, values: Mapping[str, Any], prefix: str, from_text: bool) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    types_ = _field_types(type(obj))
    for raw_key, value in values.items():
        key = str(raw_key)
        full = f"{prefix}.{key}" if prefix else key
        if key not in types_:
            allowed = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key {full!r}; allowed keys here: {allowed}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _update_dataclass(current, value if value is not None else {}, full, from_text)
        else:
            setattr(obj, key, _coerce(value, types_[key], full, from_text))


def config_from_dict(values: Mapping[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a (partial) nested mapping, over ``base`` or the defaults."""
    config = TrainConfig()
    if base is not None:
        _update_dataclass(config, config_to_dict(base), "", from_text=False)
    _update_dataclass(config, values, "", from_text=False)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON serialisable)."""
    return dataclasses.asdict(config)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON config file into a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        values = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}") from e
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, found {type(values).__name__}")
    return values


def _set_dotted(config: TrainConfig, dotted: str, text: str) -> None:
    parts = dotted.split(".")
    obj: Any = config
    for i, part in enumerate(parts[:-1]):
        child = getattr(obj, part, None) if dataclasses.is_dataclass(obj) and part in _field_types(type(obj)) else None
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted}={text}")
        obj = child
    prefix = ".".join(parts[:-1])
    if parts[-1] in _field_types(type(obj)) and dataclasses.is_dataclass(getattr(obj, parts[-1])):
        raise ConfigError(f"config key {dotted!r} is a section; override its keys, e.g. {dotted}.<key>=VALUE")
    _update_dataclass(obj, {parts[-1]: text}, prefix, from_text=True)


# Short spellings accepted on the command line.
ALIASES = {"resume": "checkpoint.resume"}


def parse_override_args(args: Sequence[str]) -> list[tuple[str, str]]:
    """``["--train.epochs", "3", "optim.lr=1e-3", "--resume=latest"]`` -> ``[(key, text), ...]``."""
    out: list[tuple[str, str]] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override {arg} has no value (use {arg} VALUE or {body}=VALUE)")
                key, text = body, args[i + 1]
                i += 1
        elif "=" in arg:
            key, text = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot read override {arg!r}: use --section.key VALUE or section.key=VALUE")
        key = key.replace("-", "_") if key.replace("-", "_") in ALIASES else key
        out.append((ALIASES.get(key, key), text))
        i += 1
    return out


def apply_overrides(config: TrainConfig, overrides: Sequence[tuple[str, str]]) -> TrainConfig:
    """Apply ``(dotted key, text)`` overrides in order (text is parsed to the field's type)."""
    for key, text in overrides:
        _set_dotted(config, key, text)
    return config


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] | Sequence[tuple[str, str]] = (),
) -> TrainConfig:
    """Defaults (paper recipe) <- config file <- overrides, then checked.

    ``overrides`` are command-line strings (``["--train.epochs", "3", "seed=1"]``) or already
    parsed ``(key, text)`` pairs.
    """
    config = TrainConfig()
    if path is not None:
        _update_dataclass(config, read_config_file(path), "", from_text=False)
    pairs = list(overrides)
    if pairs and isinstance(pairs[0], str):
        pairs = parse_override_args(pairs)  # type: ignore[arg-type]
    apply_overrides(config, pairs)  # type: ignore[arg-type]
    config.check()
    return config


def write_config(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (written to a temporary file, then renamed)."""
    from comfy_nearid.fileio import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
