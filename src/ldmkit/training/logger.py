"""Run logs: a CSV with one row per logged step (columns grow as new metrics appear) and,
when ``tensorboard`` is importable, TensorBoard event files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldmkit.io import atomic_write_text, reporting_write_errors

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def to_float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


class RunLogger:
    """``log(step, {"train/loss": ...})`` appends to ``metrics.csv`` and TensorBoard.

    On resume from step ``resume_step`` the rows logged after it (by the run that was
    killed) are dropped, so that every step appears once.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        with reporting_write_errors(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.run_dir / METRICS_FILE
        self.columns: list[str] = ["step"]
        if self.csv_path.is_file():
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or ["step"])
                rows = [r for r in reader if resume_step is not None and _step(r) <= resume_step]
            self._rewrite(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional (ldmkit[logging])
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(
                    log_dir=str(self.run_dir / TENSORBOARD_DIR),
                    purge_step=resume_step + 1 if resume_step is not None else None,
                )

    def _rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        lines = _csv_text(self.columns, rows)
        atomic_write_text(self.csv_path, lines)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        values = {k: to_float(v) for k, v in metrics.items()}
        new = [k for k in values if k not in self.columns]
        if new:
            rows = []
            if self.csv_path.is_file():
                with open(self.csv_path, newline="", encoding="utf-8") as handle:
                    rows = list(csv.DictReader(handle))
            self.columns += new
            self._rewrite(rows)
        elif not self.csv_path.is_file():
            self._rewrite([])
        with (
            reporting_write_errors(self.csv_path),  # a full disk: one line naming metrics.csv
            open(self.csv_path, "a", newline="", encoding="utf-8") as handle,
        ):
            csv.DictWriter(handle, fieldnames=self.columns).writerow({"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        return values

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        """``image``: C×H×W in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SilentLogger:
    """The logger of ranks other than 0: they log nothing."""

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        return {k: to_float(v) for k, v in metrics.items()}

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _step(row: Mapping[str, Any]) -> int:
    try:
        return int(float(row.get("step") or -1))
    except ValueError:
        return -1


def _csv_text(columns: list[str], rows: list[Mapping[str, Any]]) -> str:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as floats (empty cells omitted)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: float(v) for k, v in row.items() if v not in (None, "")}
                for row in csv.DictReader(handle)]
