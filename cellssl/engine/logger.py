"""Run logs: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends metric dicts to ``OUT/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the main rank writes (``enabled=False`` elsewhere). A resumed run keeps appending;
    rows with ``step`` after the resume point from a killed run are dropped first so the
    file never holds a step twice.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", -1) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(k + "\n" for k in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional and slow to import

            self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
        except Exception:  # tensorboard missing or broken: jsonl is the record
            self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        """Write one row (must contain ``step``)."""
        if not self.enabled:
            return
        plain = ("step", "epoch")
        clean = {k: (v if k in plain or isinstance(v, bool) or not isinstance(v, (int, float)) else float(v))
                 for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k not in ("step", "epoch") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl``."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
