"""NearID data: the sample contract, readers for every layout, and the synthetic benchmark.

- :class:`Sample` / :class:`ImageRef`: one identity with lazily decoded images (the contract
  the evaluator, the trainer and the demo use);
- readers, all lazy, fixed order, ``len()``, indexing and iteration:
  :class:`FolderDataset` (plain folders and the synthetic benchmark),
  :class:`PublishedNearIDDataset` (the paper's positives + distractor sets: ``save_to_disk``
  folders or parquet shards), :class:`MTGFolderDataset` / :class:`PublishedMTGDataset`;
- :func:`iter_loaded_samples`: decode samples, skipping (and reporting) corrupt ones;
- :func:`generate_benchmark`: the synthetic near-identity benchmark (``nearid synth``).

Importing this package does not import torch.
"""

from .base import NearIDDataset, load_split_indices, parse_split_indices
from .folder import FolderDataset
from .mtg import MTG_SOURCE, MTGFolderDataset, PublishedMTGDataset
from .published import HFNearIDDataset, PublishedNearIDDataset, hub_snapshot
from .sample import (
    BytesImageRef,
    FileImageRef,
    ImageRef,
    LoadedSample,
    Sample,
    SampleLoadError,
    SkippedSample,
    SkipReport,
    iter_loaded_samples,
)
from .synth import SynthConfig, generate_benchmark, read_manifest
from .synth_specs import LEVELS

__all__ = [
    "BytesImageRef",
    "FileImageRef",
    "FolderDataset",
    "HFNearIDDataset",
    "ImageRef",
    "LEVELS",
    "LoadedSample",
    "MTGFolderDataset",
    "MTG_SOURCE",
    "NearIDDataset",
    "PublishedMTGDataset",
    "PublishedNearIDDataset",
    "Sample",
    "SampleLoadError",
    "SkipReport",
    "SkippedSample",
    "SynthConfig",
    "generate_benchmark",
    "hub_snapshot",
    "iter_loaded_samples",
    "load_split_indices",
    "parse_split_indices",
    "read_manifest",
]
