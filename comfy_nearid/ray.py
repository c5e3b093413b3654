"""Ray Data adapter: identity scoring of millions of images on a Ray cluster.

Two callable classes for ``Dataset.map_batches``, both loading the model once per actor (with
:func:`comfy_nearid.load_model`, the loader the CLI and ComfyUI use) and scoring through the
engine-agnostic :class:`~comfy_nearid.scoring.unit.ScoringUnit`:

- :class:`IdentityScorer`, for users who already hold a Ray dataset of images::

      import ray, comfy_nearid
      from comfy_nearid.ray import IdentityScorer, reference_embeddings

      model = {"head": "nearid_head.safetensors"}               # comfy_nearid.load_model arguments
      refs = reference_embeddings(model, {"dog": ["refs/dog/0.jpg", "refs/dog/1.jpg"]})
      ds = ray.data.read_parquet("s3://bucket/shards/")         # img2dataset parquet
      scored = ds.map_batches(IdentityScorer, fn_constructor_kwargs=dict(model=model, references=refs),
                              batch_size=64, compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1,
                              batch_format="pyarrow")

- :class:`PartitionScorer`, used by :class:`RayEngine` (``nearid score --engine ray``): one
  input partition (a shard, or a slice of a folder plan) per call; the driver writes each
  partition's rows to one parquet file.

Ray is imported only here, and only when needed (``pip install comfy-nearid[scale]``).
"""

from __future__ import annotations

import time

_IMPORT_STARTED = time.time()  # in an actor: its worker process began importing this module

import logging  # noqa: E402 (the clock above starts before the imports it measures)
import os  # noqa: E402
import socket  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from .errors import ConfigError, DatasetError, NearIDError  # noqa: E402
from .scoring.partitions import PartitionOptions, rows_from_table, rows_table, score_partition  # noqa: E402
from .scoring.rows import ScoreRow  # noqa: E402
from .scoring.sources import IMAGE_FIELDS, Partition  # noqa: E402
from .scoring.unit import ImageRef, ScoringUnit, embed_references  # noqa: E402

if TYPE_CHECKING:
    import pyarrow as pa

    from .model import IdentityModel

logger = logging.getLogger(__name__)
_IMPORTED = time.time()  # ... and had imported it (torch, numpy, the scoring modules)

INSTALL_HINT = "Ray is not installed: pip install comfy-nearid[scale]"
# Test hook: "<partition name>=<marker file>" makes the actor that reaches that partition exit
# once (it creates the marker first), so a test can check that Ray restarts it and retries.
_EXIT_ONCE_VAR = "NEARID_TEST_ACTOR_EXIT_ONCE"


class RayNotInstalledError(NearIDError, ImportError):
    """``ray[data]`` is needed for this and is not installed."""


def require_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a :class:`RayNotInstalledError` saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayNotInstalledError(INSTALL_HINT) from e
    return ray


def load_actor_model(model: Mapping[str, Any], expected_identity: str | None = None,
                     torch_threads: int | None = None) -> "IdentityModel":
    """Load the model from :func:`comfy_nearid.load_model` keyword arguments (once per actor).

    ``torch_threads`` (>= 1) is set before the model is built, so that building it and every
    forward use that many threads (an actor holding 1 CPU must not run a thread per core).

    Raises:
        ConfigError: the loaded model is not the one the references were embedded with.
    """
    from . import load_model
    from .embedding_cache import model_cache_identity

    if torch_threads is not None:
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
    loaded = load_model(**dict(model))
    if expected_identity is not None and model_cache_identity(loaded) != expected_identity:
        raise ConfigError(
            f"the worker loaded model {model_cache_identity(loaded)!r} but the references were embedded with "
            f"{expected_identity!r}; give the workers the same model settings and weights")
    return loaded


def reference_embeddings(model: "Mapping[str, Any] | IdentityModel", references: Mapping[str, Sequence[str | Path]],
                         batch_size: int = 32) -> dict[str, np.ndarray]:
    """Subject -> reference embeddings ``[R, D]``, computed once here to be shipped to actors
    (``fn_constructor_kwargs=dict(references=...)``). ``model``: a loaded model or
    :func:`comfy_nearid.load_model` keyword arguments."""
    loaded = load_actor_model(model) if isinstance(model, Mapping) else model
    return embed_references(loaded, references, None, batch_size)


def _column(batch: Mapping[str, Any], name: str) -> list[Any]:
    """One column of a numpy, pandas or arrow batch as a Python list."""
    values = batch[name]
    for method in ("to_pylist", "tolist"):  # arrow, numpy/pandas
        if hasattr(values, method):
            return getattr(values, method)()
    return list(values)


class IdentityScorer:
    """``Dataset.map_batches`` callable: image rows -> score rows.

    Args:
        model: :func:`comfy_nearid.load_model` keyword arguments (``backbone``, ``head``,
            ``device``, ...); loaded once in the constructor, i.e. once per actor.
        references: subject -> reference embeddings ``[R, D]`` (:func:`reference_embeddings`).
        aggregate: ``mean``, ``max`` or ``prototype``.
        image_column: column with encoded image bytes (default: the first of
            ``jpg, jpeg, png, webp, image`` present); without one, ``path`` holds file paths.
        subject_column: column naming each row's subject; not needed with one subject.
        key_column: column that becomes the output ``path`` (default ``key``, else ``path``).
        num_workers: decode threads per actor (0: decode in the calling thread).
        expected_identity: refuse a model other than the one that embedded the references.
        torch_threads: torch threads per actor (default: torch's, which follows the
            ``OMP_NUM_THREADS`` Ray sets from the actor's ``num_cpus``).

    Output columns: ``path, subject, cosines, score, match, calibrated, rank, error`` (``rank`` is
    null: ranks need every row of a subject; see :func:`comfy_nearid.scoring.outputs`).
    """

    def __init__(self, model: Mapping[str, Any], references: Mapping[str, np.ndarray], aggregate: str = "mean",
                 image_column: str | None = None, subject_column: str = "subject", key_column: str | None = None,
                 num_workers: int = 0, expected_identity: str | None = None, torch_threads: int | None = None
                 ) -> None:
        self.unit = ScoringUnit(load_actor_model(model, expected_identity, torch_threads), references, aggregate)
        self.image_column = image_column
        self.subject_column = subject_column
        self.key_column = key_column
        self.num_workers = num_workers

    def refs(self, batch: Mapping[str, Any]) -> list[ImageRef]:
        """The batch's rows as :class:`ImageRef` (bytes, key, subject)."""
        names = list(batch.column_names) if hasattr(batch, "column_names") else list(batch)  # arrow | dict, pandas
        image_col = self.image_column or next((c for c in IMAGE_FIELDS if c in names), None)
        key_col = self.key_column or next((c for c in ("key", "path") if c in names), None)
        if key_col is None or key_col not in names:
            raise DatasetError(f"batch has no key column ({self.key_column or 'key or path'}); columns: {names}")
        if image_col is not None and image_col not in names:
            raise DatasetError(f"batch has no image column {image_col!r}; columns: {names}")
        keys = [str(k) for k in _column(batch, key_col)]
        if self.subject_column in names:
            subjects = [str(s) if s is not None else "" for s in _column(batch, self.subject_column)]
        elif len(self.unit.references) == 1:
            subjects = [next(iter(self.unit.references))] * len(keys)
        else:
            raise DatasetError(f"batch has no subject column {self.subject_column!r} and there are "
                               f"{len(self.unit.references)} subjects; columns: {names}")
        if image_col is None:  # file paths, read by the scorer
            return [ImageRef(k, s) for k, s in zip(keys, subjects)]
        images = _column(batch, image_col)
        return [ImageRef(k, s, bytes(d)) if d else ImageRef(k, s, error=f"no image bytes in column {image_col!r}")
                for k, s, d in zip(keys, subjects, images)]

    def __call__(self, batch: Mapping[str, Any]) -> "pa.Table":
        refs = self.refs(batch)
        rows = [row for _, rows in self.unit.score_batches([refs], self.num_workers, 0) for row in rows]
        return rows_table(rows)


@dataclass(frozen=True)
class PartitionTiming:
    """When an actor scored one partition: ``time.time()`` seconds on the actor's host."""

    partition: str
    actor: str  # host:pid
    import_started: float  # the actor's worker process began importing this module (Ray worker up)
    imported: float  # ... and had imported it (torch and the scoring modules)
    constructed: float  # the actor's constructor began
    ready: float  # its model was loaded
    started: float  # this partition began
    finished: float  # this partition's rows were ready
    rows: int
    torch_threads: int


#: Columns :class:`PartitionScorer` adds to every row besides ``partition`` and ``partition_rows``.
TIMING_COLUMNS = ("actor", "import_started", "imported", "constructed", "ready", "started", "finished", "torch_threads")


class PartitionScorer:
    """``Dataset.map_batches`` callable over a dataset of partitions (column ``partition``:
    :meth:`Partition.to_json`): reads and scores each partition whole, with the model loaded
    once in the constructor. Every output row carries its ``partition``, ``partition_rows``
    (that partition's row count) and the :class:`PartitionTiming` fields (``TIMING_COLUMNS``)."""

    def __init__(self, model: Mapping[str, Any], references: Mapping[str, np.ndarray],
                 options: PartitionOptions, expected_identity: str | None = None,
                 torch_threads: int | None = None) -> None:
        self.constructed = time.time()
        self.unit = ScoringUnit(load_actor_model(model, expected_identity, torch_threads), references,
                                options.aggregate)
        self.options = options
        self.ready = time.time()
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: Mapping[str, Any]) -> "pa.Table":
        import pyarrow as pa
        import torch

        tables = []
        for text in _column(batch, "partition"):
            partition = Partition.from_json(text)
            _exit_once_for_tests(partition.name)
            started = time.time()
            rows = score_partition(self.unit, partition, self.options)
            timing = PartitionTiming(partition.name, self.actor, _IMPORT_STARTED, _IMPORTED, self.constructed,
                                     self.ready, started, time.time(), len(rows), torch.get_num_threads())
            tables.append(rows_table(rows, partition_rows=len(rows), **_timing_columns(timing)))
        if tables:
            return pa.concat_tables(tables)
        return rows_table([], partition_rows=0, **_timing_columns(PartitionTiming("", "", 0, 0, 0, 0, 0, 0, 0, 0)))


def _timing_columns(timing: PartitionTiming) -> dict[str, Any]:
    return {"partition": timing.partition, **{name: getattr(timing, name) for name in TIMING_COLUMNS}}


def actor_phases(timings: Sequence[PartitionTiming], execution_started: float) -> dict[str, float]:
    """Where a Ray run's time went, from the actors' timestamps (seconds unless named otherwise).

    - ``worker_start``: execution start -> the last actor's worker process began importing
      this module (Ray starting the actors' processes; 0 when they were up before);
    - ``imports``: the slowest actor's import of this module (torch, the scoring modules);
    - ``model_load``: the slowest actor's constructor (model load);
    - ``actors_ready``: execution start -> the last actor ready;
    - ``scoring``: the first partition's start -> the last one's end;
    - ``steady_images_per_s``: the pool's rate once started, the sum over actors of
      rows / (last partition end - model ready): idle gaps between partitions count,
      start-up and an actor finishing before the others do not;
    - ``busy``: the fraction of that time the actors spent inside a partition.
    """
    if not timings:
        return {}
    actors: dict[str, list[PartitionTiming]] = {}
    for t in timings:
        actors.setdefault(t.actor, []).append(t)
    steady = busy = span = 0.0
    for parts in actors.values():
        window = max(t.finished for t in parts) - parts[0].ready
        steady += sum(t.rows for t in parts) / window if window > 0 else 0.0
        busy += sum(t.finished - t.started for t in parts)
        span += window
    return {
        "actors": float(len(actors)),
        "worker_start": max(0.0, max(p[0].import_started for p in actors.values()) - execution_started),
        "imports": max(p[0].imported - p[0].import_started for p in actors.values()),
        "model_load": max(p[0].ready - p[0].constructed for p in actors.values()),
        "actors_ready": max(p[0].ready for p in actors.values()) - execution_started,
        "scoring": max(t.finished for t in timings) - min(t.started for t in timings),
        "steady_images_per_s": steady,
        "busy": busy / span if span > 0 else 0.0,
    }


def _exit_once_for_tests(partition_name: str) -> None:
    spec = os.environ.get(_EXIT_ONCE_VAR)
    if not spec:
        return
    name, _, marker = spec.partition("=")
    if name == partition_name and marker and not os.path.exists(marker):
        Path(marker).write_text(f"actor {os.getpid()} exited on partition {name}\n")
        logger.warning("test hook %s: actor %d exits on partition %s", _EXIT_ONCE_VAR, os.getpid(), name)
        os._exit(1)


def _embed_references_task(model: Mapping[str, Any], references: Mapping[str, Sequence[str]], batch_size: int,
                           torch_threads: int | None) -> tuple[str, dict[str, np.ndarray]]:
    from .embedding_cache import model_cache_identity

    loaded = load_actor_model(model, torch_threads=torch_threads)
    return model_cache_identity(loaded), embed_references(loaded, references, None, batch_size)


@dataclass
class RayEngine:
    """Runs a partitioned scoring on Ray Data (an engine for
    :func:`~comfy_nearid.scoring.partitions.score_partitions`).

    Args:
        model: :func:`comfy_nearid.load_model` keyword arguments for the actors.
        address: ``None`` starts a local Ray (unless one is running in this process),
            ``auto`` joins the cluster of ``ray start``, ``ray://host:10001`` a remote one.
        concurrency: number of actors (one model each).
        gpus_per_worker: GPUs per actor (1 on a GPU cluster; 0 on CPUs).
        cpus_per_worker: CPUs per actor; a CPU actor runs that many torch threads (at least 1).
        ray_remote_args: more ``map_batches`` remote arguments (``runtime_env``, ``resources``,
            ``max_restarts``, ...). Ray restarts a dead actor and retries its partition by default.

    After a run, ``phases`` holds where its time went (``cluster_start``, ``references`` when
    embedded on a worker, and :func:`actor_phases`) and ``partition_timings`` the actors'
    :class:`PartitionTiming` records.
    """

    model: dict[str, Any]
    address: str | None = None
    concurrency: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    ray_remote_args: dict[str, Any] = field(default_factory=dict)

    phases: dict[str, float] = field(default_factory=dict, init=False)
    partition_timings: list[PartitionTiming] = field(default_factory=list, init=False, repr=False)
    _started_ray: bool = field(default=False, init=False, repr=False)

    def _ray(self) -> Any:
        """Ray, connected (to ``address``, or a local Ray unless this process already has one)."""
        ray = require_ray()
        if not ray.is_initialized():
            start = time.perf_counter()
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
            self.phases["cluster_start"] = time.perf_counter() - start
            self._started_ray = True
        return ray

    def _torch_threads(self) -> int | None:
        """Torch threads per CPU actor: its CPUs (GPU actors keep torch's default)."""
        return None if self.gpus_per_worker else max(1, int(self.cpus_per_worker))

    def close(self) -> None:
        """Shut down the Ray this engine started (a Ray the caller started stays up)."""
        if self._started_ray:
            require_ray().shutdown()
            self._started_ray = False

    def embed_references(self, references: Mapping[str, Sequence[str | Path]], batch_size: int,
                         driver_model: "IdentityModel | None" = None) -> tuple[str, dict[str, np.ndarray]] | None:
        """``(model identity, subject -> [R, D])``, embedded once in a Ray task with the actors'
        resources (a GPU worker embeds the references in the dtype it scores in).

        ``None`` when CPU actors would load the model the driver already holds on its CPU: the
        driver embeds them then (no extra worker loading a model), and each actor still checks
        that its model has the driver's identity."""
        ray = self._ray()
        if not self.gpus_per_worker and driver_model is not None and str(driver_model.device) == "cpu":
            return None
        start = time.perf_counter()
        task = ray.remote(_embed_references_task).options(
            num_gpus=self.gpus_per_worker or None, num_cpus=self.cpus_per_worker,
            **{k: v for k, v in self.ray_remote_args.items() if k in ("runtime_env", "resources", "accelerator_type")})
        try:
            embedded = ray.get(task.remote(self.model, {k: [str(p) for p in v] for k, v in references.items()},
                                           batch_size, self._torch_threads()))
        except Exception as e:  # Ray wraps the worker's error; name its cause
            raise DatasetError(f"embedding the references on Ray failed: {type(e).__name__}: {str(e)[-2000:]}") from e
        self.phases["references"] = time.perf_counter() - start
        return embedded

    def __call__(self, partitions: Sequence[Partition], references: Mapping[str, np.ndarray],
                 options: PartitionOptions, model_identity: str) -> Iterator[tuple[str, list[ScoreRow]]]:
        yield from self._run(self._ray(), partitions, references, options, model_identity)

    def _run(self, ray: Any, partitions: Sequence[Partition], references: Mapping[str, np.ndarray],
             options: PartitionOptions, model_identity: str) -> Iterator[tuple[str, list[ScoreRow]]]:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = options.progress
        context.enable_operator_progress_bars = options.progress
        partitions_ds = ray.data.from_items([{"partition": p.to_json()} for p in partitions],
                                            override_num_blocks=len(partitions))
        scored = partitions_ds.map_batches(
            PartitionScorer,
            fn_constructor_kwargs=dict(model=self.model, references=dict(references), options=options,
                                       expected_identity=model_identity, torch_threads=self._torch_threads()),
            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=self.concurrency),
            num_gpus=self.gpus_per_worker or None, num_cpus=self.cpus_per_worker,
            **self.ray_remote_args,
        )
        import pyarrow.compute as pc

        received: dict[str, list] = {}
        self.partition_timings = []
        execution_started = time.time()
        try:
            for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                if table.num_rows == 0:
                    continue
                for name in dict.fromkeys(table.column("partition").to_pylist()):
                    part = table.filter(pc.equal(table.column("partition"), name))
                    expected = part.column("partition_rows")[0].as_py()
                    received.setdefault(name, []).append(part)
                    if sum(t.num_rows for t in received[name]) >= expected:
                        parts = received.pop(name)
                        first = parts[0].slice(0, 1).to_pylist()[0]
                        self.partition_timings.append(PartitionTiming(
                            name, rows=expected, **{k: first[k] for k in TIMING_COLUMNS}))
                        yield name, [row for t in parts for row in rows_from_table(t)]
            self.phases.update(actor_phases(self.partition_timings, execution_started))
            logger.info("Ray phases: %s", ", ".join(f"{k} {v:.2f}" for k, v in self.phases.items()))
        except Exception as e:  # Ray wraps worker errors in its own types; name the cause
            if isinstance(e, NearIDError):
                raise
            raise DatasetError(f"scoring on Ray failed: {type(e).__name__}: {str(e)[-2000:]}") from e
        if received:
            raise DatasetError(f"Ray returned part of partition(s) {sorted(received)} only; run again with --resume")
