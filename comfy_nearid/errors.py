"""Exceptions raised by comfy_nearid. Every message names the offending file, field or value."""

from __future__ import annotations

from pathlib import Path


class NearIDError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(NearIDError, ValueError):
    """An argument (tensor, mask, option) has a wrong type, shape, dtype or range."""


class ImageLoadError(NearIDError, ValueError):
    """An image file could not be decoded into an RGB picture."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class CheckpointError(NearIDError, ValueError):
    """A checkpoint file is missing fields, has a wrong format or cannot be parsed."""


class HeadMismatchError(CheckpointError):
    """A head checkpoint does not fit the backbone it is being loaded onto."""


class WeightsNotFoundError(NearIDError, FileNotFoundError):
    """Pretrained weights are not on disk and downloading is not allowed."""


class DatasetError(NearIDError, ValueError):
    """A dataset's layout, columns, ids or split files are inconsistent."""


class ConfigError(NearIDError, ValueError):
    """A configuration file or override has an unknown key or a wrong type."""
