"""The data contract shared by the readers, the evaluator, the trainer and the demo.

A :class:`Sample` is one identity: up to a few views of the same object in different
contexts, for each view its near-identity distractor(s) from one or more distractor sources
(a distractor shows a different but similar object on the exact same background as its
view), optional object masks and metadata. Images are :class:`ImageRef` objects that decode
only when ``.load()`` is called, so a reader can list a 300,000-image dataset cheaply.

:func:`iter_loaded_samples` decodes samples one by one and skips (and reports, with the
sample id and the slot) any sample holding a corrupt image instead of crashing a long run.
"""

from __future__ import annotations

import hashlib
import io
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from PIL import Image

from ..errors import DatasetError, ImageLoadError, InvalidInputError

logger = logging.getLogger(__name__)

ImageMode = Literal["RGB", "L"]


# --------------------------------------------------------------------------- image refs


def _decode_mask(opener: Any, description: str) -> Image.Image:
    """Decode a mask (file path or BytesIO) into mode "L" (0 = background, 255 = subject).

    Masks are converted directly, not through the RGB path, which composites transparency
    onto white and would turn an RGBA mask into all-subject.
    """
    from ..images import decode_image  # lazy: comfy_nearid.images imports torch

    return decode_image(opener, description, mode="L")


class ImageRef(ABC):
    """A lazily decoded image inside a dataset.

    ``load()`` decodes it (RGB for pictures, "L" for masks; see ``mode``), ``key`` is a stable
    content key (SHA-1 of the encoded bytes, computed once on first use) suitable for caching
    embeddings, ``path`` is the file on disk when there is one, and ``describe()`` says where
    the image lives for error messages.
    """

    __slots__ = ("mode", "_key")

    def __init__(self, mode: ImageMode = "RGB") -> None:
        if mode not in ("RGB", "L"):
            raise InvalidInputError(f"ImageRef mode must be 'RGB' or 'L', got {mode!r}")
        self.mode: ImageMode = mode
        self._key: str | None = None

    @abstractmethod
    def read_bytes(self) -> bytes:
        """The encoded image bytes (PNG/JPEG/...). Raises ImageLoadError when unreadable."""

    @abstractmethod
    def load(self) -> Image.Image:
        """Decode into a PIL image of mode ``self.mode``; raises ImageLoadError naming the image."""

    @abstractmethod
    def describe(self) -> str:
        """Where the image lives: a file path, or dataset / row / column."""

    @property
    def path(self) -> str | None:
        """The file on disk, or None for an image stored inside a table."""
        return None

    @property
    def key(self) -> str:
        """SHA-1 hex digest of the encoded bytes (identical files share a key)."""
        if self._key is None:
            self._key = hashlib.sha1(self.read_bytes()).hexdigest()
        return self._key

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r}, mode={self.mode!r})"


class FileImageRef(ImageRef):
    """An image file on disk."""

    __slots__ = ("_path",)

    def __init__(self, path: str | Path, mode: ImageMode = "RGB") -> None:
        super().__init__(mode)
        self._path = Path(path)

    @property
    def path(self) -> str:
        return str(self._path)

    def describe(self) -> str:
        return str(self._path)

    def read_bytes(self) -> bytes:
        from ..fileio import regular_file_problem

        problem = regular_file_problem(self._path)  # a FIFO would block the read forever
        if problem is not None:
            raise ImageLoadError(self._path, problem)
        try:
            return self._path.read_bytes()
        except OSError as e:
            raise ImageLoadError(self._path, f"cannot read file ({e.strerror or e})") from e

    def load(self) -> Image.Image:
        from ..images import load_image

        return load_image(self._path, self.mode)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileImageRef) and (self._path, self.mode) == (other._path, other.mode)

    def __hash__(self) -> int:
        return hash((self._path, self.mode))


class BytesImageRef(ImageRef):
    """Encoded image bytes held in memory (a cell of a parquet/arrow table).

    ``origin`` describes the cell for error messages, e.g. ``"/data/pos row 17 column img2"``.
    """

    __slots__ = ("_data", "origin", "_path")

    def __init__(self, data: bytes, origin: str, mode: ImageMode = "RGB", path: str | None = None) -> None:
        super().__init__(mode)
        self._data = bytes(data)
        self.origin = origin
        self._path = path

    def describe(self) -> str:
        return self.origin

    def read_bytes(self) -> bytes:
        return self._data

    def load(self) -> Image.Image:
        if not self._data:
            raise ImageLoadError(self.origin, "empty image bytes")
        if self.mode == "RGB":
            from ..images import load_image_bytes

            return load_image_bytes(self._data, self.origin)
        return _decode_mask(io.BytesIO(self._data), self.origin)


# --------------------------------------------------------------------------- samples


def _slot_name(kind: str, k: int, source: str | None = None) -> str:
    """Slot names mirror the folder layout: ``view2``, ``mask1``, ``object/distractor3``."""
    return f"{source}/{kind}{k + 1}" if source is not None else f"{kind}{k + 1}"


@dataclass
class Sample:
    """One identity.

    ``views[k]`` is view k (0-based; None = missing). ``distractors[source][k]`` is that
    source's near-identity distractor of view k (same background), aligned with ``views``.
    ``masks[k]`` is the object mask of view k, ``distractor_masks[source][k]`` the object mask
    of that distractor; masks load as mode "L" (255 = object). ``part_masks[k]`` (MTG data
    only) marks the edited part of view k's part-edited version. Every list is padded with
    None to ``len(views)`` on construction; a longer list is an error.
    """

    id: str
    category: str
    views: list[ImageRef | None]
    distractors: dict[str, list[ImageRef | None]] = field(default_factory=dict)
    masks: list[ImageRef | None] = field(default_factory=list)
    distractor_masks: dict[str, list[ImageRef | None]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    part_masks: list[ImageRef | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.views)
        self.masks = self._aligned(self.masks, n, "masks")
        self.part_masks = self._aligned(self.part_masks, n, "part_masks")
        self.distractors = {s: self._aligned(v, n, f"distractors[{s!r}]") for s, v in self.distractors.items()}
        self.distractor_masks = {
            s: self._aligned(v, n, f"distractor_masks[{s!r}]") for s, v in self.distractor_masks.items()
        }

    def _aligned(self, refs: Sequence[ImageRef | None], n: int, name: str) -> list[ImageRef | None]:
        refs = list(refs)
        if len(refs) > n:
            raise InvalidInputError(
                f"sample {self.id!r}: {name} has {len(refs)} entries but the sample has {n} view slots"
            )
        return refs + [None] * (n - len(refs))

    @property
    def sources(self) -> list[str]:
        """Distractor sources present in this sample, sorted."""
        return sorted(self.distractors)

    def valid_views(self) -> list[int]:
        """0-based indices of the views that are present."""
        return [k for k, v in enumerate(self.views) if v is not None]

    def distractor(self, source: str, k: int) -> ImageRef | None:
        """Distractor of view ``k`` from ``source`` (None when missing or unknown source)."""
        refs = self.distractors.get(source)
        return refs[k] if refs is not None and k < len(refs) else None

    def refs(self) -> Iterator[tuple[str, ImageRef]]:
        """Every present image with its slot name (``view1``, ``object/distractor2``, ...)."""
        for kind, refs in (("view", self.views), ("mask", self.masks), ("part_mask", self.part_masks)):
            for k, ref in enumerate(refs):
                if ref is not None:
                    yield _slot_name(kind, k), ref
        for kind, groups in (("distractor", self.distractors), ("mask", self.distractor_masks)):
            for source in sorted(groups):
                for k, ref in enumerate(groups[source]):
                    if ref is not None:
                        yield _slot_name(kind, k, source), ref

    def load(self, with_masks: bool = True, sources: Iterable[str] | None = None) -> "LoadedSample":
        """Decode every present image (masks too unless ``with_masks=False``).

        Raises :class:`SampleLoadError` naming the sample id and the slot of the first image
        that cannot be decoded.
        """
        wanted = self.sources if sources is None else [s for s in sources if s in self.distractors]

        def load_list(refs: list[ImageRef | None], kind: str, source: str | None = None) -> list[Image.Image | None]:
            out: list[Image.Image | None] = []
            for k, ref in enumerate(refs):
                if ref is None:
                    out.append(None)
                    continue
                try:
                    out.append(ref.load())
                except ImageLoadError as e:
                    raise SampleLoadError(self.id, _slot_name(kind, k, source), e) from e
            return out

        none = [None] * len(self.views)
        return LoadedSample(
            sample=self,
            views=load_list(self.views, "view"),
            distractors={s: load_list(self.distractors[s], "distractor", s) for s in wanted},
            masks=load_list(self.masks, "mask") if with_masks else list(none),
            distractor_masks={
                s: load_list(self.distractor_masks[s], "mask", s) if with_masks else list(none)
                for s in wanted
                if s in self.distractor_masks
            },
            part_masks=load_list(self.part_masks, "part_mask") if with_masks else list(none),
        )


@dataclass
class LoadedSample:
    """A :class:`Sample` with its images decoded (same layout; PIL images instead of refs)."""

    sample: Sample
    views: list[Image.Image | None]
    distractors: dict[str, list[Image.Image | None]]
    masks: list[Image.Image | None]
    distractor_masks: dict[str, list[Image.Image | None]]
    part_masks: list[Image.Image | None]

    @property
    def id(self) -> str:
        return self.sample.id

    @property
    def category(self) -> str:
        return self.sample.category


class SampleLoadError(DatasetError):
    """An image of a sample could not be decoded; names the sample id and the slot."""

    def __init__(self, sample_id: str, slot: str, cause: ImageLoadError) -> None:
        self.sample_id = sample_id
        self.slot = slot
        self.cause = cause
        super().__init__(f"sample {sample_id!r}, slot {slot}: {cause}")


# --------------------------------------------------------------------------- skipping


@dataclass(frozen=True)
class SkippedSample:
    """One sample left out because an image could not be decoded."""

    index: int
    sample_id: str
    slot: str
    reason: str


@dataclass
class SkipReport:
    """Collects the samples :func:`iter_loaded_samples` skipped, so a run can report them."""

    skipped: list[SkippedSample] = field(default_factory=list)
    loaded: int = 0

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.loaded} samples loaded, none skipped"
        head = "; ".join(f"{s.sample_id} ({s.slot})" for s in self.skipped[:5])
        more = f" and {self.count - 5} more" if self.count > 5 else ""
        return f"{self.loaded} samples loaded, {self.count} skipped for unreadable images: {head}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "skipped": [
                {"index": s.index, "id": s.sample_id, "slot": s.slot, "reason": s.reason} for s in self.skipped
            ],
        }


def iter_loaded_samples(
    dataset: Iterable[Sample],
    *,
    on_error: Literal["skip", "raise"] = "skip",
    report: SkipReport | None = None,
    with_masks: bool = True,
    sources: Iterable[str] | None = None,
) -> Iterator[LoadedSample]:
    """Decode the samples of ``dataset`` in order.

    A sample holding an image that cannot be decoded is, with ``on_error="skip"``, logged as
    a warning naming its id and slot, recorded in ``report`` (pass your own
    :class:`SkipReport` to read the counts afterwards) and left out; with
    ``on_error="raise"`` the :class:`SampleLoadError` propagates. A summary is logged at the end.
    """
    if on_error not in ("skip", "raise"):
        raise InvalidInputError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    report = SkipReport() if report is None else report
    source_list = None if sources is None else list(sources)
    for index, sample in enumerate(dataset):
        try:
            loaded = sample.load(with_masks=with_masks, sources=source_list)
        except SampleLoadError as e:
            if on_error == "raise":
                raise
            report.skipped.append(SkippedSample(index, e.sample_id, e.slot, str(e.cause)))
            logger.warning("skipping sample %r (index %d): slot %s: %s", e.sample_id, index, e.slot, e.cause)
            continue
        report.loaded += 1
        yield loaded
    if report.count:
        logger.warning("%s", report.summary())
    else:
        logger.debug("%s", report.summary())
