"""A CSV tracker for Accelerate (no account, no server): ``<logging_dir>/<run>/metrics.csv``.

Rows are ``step,name,value`` (long format), so the columns never change when a new metric
appears (validation metrics arrive later than the loss), and the file stays valid after a
crash: every row is flushed as it is written. A resumed run appends to the same file.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process


class CSVTracker(GeneralTracker):
    """Accelerate tracker writing ``metrics.csv`` and ``hparams.json``."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_name = run_name
        self.directory = Path(logging_dir) / run_name
        self.path = self.directory / "metrics.csv"
        self._file = None
        self._writer = None

    @on_main_process
    def start(self) -> None:
        # Opened here, not in __init__: Accelerate calls start() once its process state exists.
        self.directory.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new_file:
            self._writer.writerow(["step", "name", "value"])
            self._file.flush()

    @property
    def tracker(self) -> "CSVTracker":
        return self

    @on_main_process
    def store_init_configuration(self, values: dict[str, Any]) -> None:
        (self.directory / "hparams.json").write_text(json.dumps(values, indent=2, default=str), encoding="utf-8")

    @on_main_process
    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                self._writer.writerow([step if step is not None else "", name, repr(float(value))])
        self._file.flush()

    @on_main_process
    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None


def read_metrics(path: str | Path) -> list[tuple[int, str, float]]:
    """Read a ``metrics.csv`` back as ``(step, name, value)`` rows."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [(int(r[0]) if r[0] else -1, r[1], float(r[2])) for r in rows[1:]]
